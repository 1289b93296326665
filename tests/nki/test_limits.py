"""Each hardware limit the emulator enforces, triggered on purpose, with the message it gives."""

from __future__ import annotations

import numpy as np
import pytest

from nkimoe.nki import nisa, nl
from nkimoe.nki.emulator import EmulatorError, session


def sb(shape: tuple[int, ...], dtype: str = nl.bfloat16):  # noqa: ANN201
    return nl.ndarray(shape, dtype=dtype, buffer=nl.sbuf)


def ps(shape: tuple[int, ...], dtype: str = nl.float32):  # noqa: ANN201
    return nl.ndarray(shape, dtype=dtype, buffer=nl.psum)


def test_partition_dimension_over_128() -> None:
    with session("trn2"), pytest.raises(EmulatorError, match="partition dimension 256 exceeds maximum 128 on trn2"):
        sb((256, 4))


@pytest.mark.parametrize(
    "stationary,moving,match",
    [
        ((128, 129), (128, 64), "stationary free size 129 exceeds 128"),
        ((128, 64), (128, 513), "moving free size 513 exceeds the maximum 512"),
    ],
)
def test_matmul_tile_limits_on_trn2(stationary: tuple[int, int], moving: tuple[int, int], match: str) -> None:
    with session("trn2"):
        dst = ps((min(stationary[1], 128), moving[1]))
        with pytest.raises(EmulatorError, match=f"nisa.nc_matmul: {match}.*target trn2"):
            nisa.nc_matmul(dst, sb(stationary), sb(moving))


def test_matmul_contraction_mismatch() -> None:
    with session("trn3"), pytest.raises(EmulatorError, match="contraction \\(partition\\) sizes differ: 128 vs 64"):
        nisa.nc_matmul(ps((64, 64)), sb((128, 64)), sb((64, 64)))


def test_trn3_takes_wide_moving_that_trn2_rejects() -> None:
    with session("trn3"):
        nisa.nc_matmul(ps((64, 2048)), _zeros((128, 64)), _zeros((128, 2048)))
    with session("trn2"), pytest.raises(EmulatorError, match="moving free size 2048 exceeds the maximum 512"):
        nisa.nc_matmul(ps((64, 512)), sb((128, 64)), sb((128, 2048)))


def _zeros(shape: tuple[int, ...]):  # noqa: ANN202
    t = sb(shape)
    nisa.memset(t, 0.0)
    return t


def test_matmul_output_crossing_a_psum_bank() -> None:
    with session("trn2"):
        acc = ps((128, 1024))  # two banks
        nisa.nc_matmul(acc[:, 512:1024], _zeros((128, 128)), _zeros((128, 512)))  # second bank: fine
        with pytest.raises(EmulatorError, match="crossing a 2048 B PSUM bank boundary"):
            nisa.nc_matmul(acc[:, 256:768], _zeros((128, 128)), _zeros((128, 512)))


def test_live_sbuf_beyond_capacity_depends_on_target() -> None:
    shape = (128, 110 * 1024 // 4)  # 110 KiB per partition in fp32
    with session("trn3"):
        kept = [sb(shape, nl.float32), sb(shape, nl.float32)]  # 220 KiB < 240 KiB usable on trn3
        assert len(kept) == 2
    with session("trn2"):
        first = sb(shape, nl.float32)
        second = sb(shape, nl.float32)  # fine while first is never used again
        with pytest.raises(EmulatorError, match=r"live sbuf to 225280 B per partition, over trn2's \d+ B"):
            nisa.tensor_copy(dst=second, src=first)  # first was live across second's allocation
        del first, second
        assert sb(shape, nl.float32) is not None  # freed storage is reusable


def test_live_psum_beyond_16k() -> None:
    with session("trn2"):
        banks = [ps((128, 512)) for _ in range(9)]
        with pytest.raises(EmulatorError, match="live psum to 18432 B per partition, over trn2's 16384 B"):
            for bank in banks:  # all nine are used after the ninth allocation: live together
                nisa.memset(bank, 0.0)


def test_matmul_into_sbuf_and_engines_reading_hbm() -> None:
    with session("trn2"):
        with pytest.raises(EmulatorError, match="nisa.nc_matmul: dst is in sbuf; allowed: psum"):
            nisa.nc_matmul(sb((64, 64), nl.float32), _zeros((128, 64)), _zeros((128, 64)))
        hbm = nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.shared_hbm)
        with pytest.raises(EmulatorError, match="nisa.tensor_tensor: data1 is in shared_hbm; allowed: sbuf, psum"):
            nisa.tensor_tensor(sb((128, 64), nl.float32), hbm, hbm, op=nl.add)
        with pytest.raises(EmulatorError, match="nisa.nc_matmul: moving is in psum; allowed: sbuf"):
            nisa.nc_matmul(ps((64, 64)), _zeros((128, 64)), ps((128, 64)))


@pytest.mark.parametrize(
    "call,match",
    [
        (lambda: nisa.exponential(sb((4, 8)), _zeros((4, 8))), "nisa.exponential is not available on trn2"),
        (lambda: nisa.nc_matmul(ps((64, 64), nl.bfloat16), _zeros((128, 64)), _zeros((128, 64))),
         "bfloat16 PSUM dst is not available on trn2"),
        (lambda: nisa.nc_matmul_mx(ps((4, 4)), sb((32, 4), nl.float8_e4m3fn_x4), sb((32, 4), nl.float8_e4m3fn_x4),
                                   sb((32, 4), nl.uint8), sb((32, 4), nl.uint8)), "nisa.nc_matmul_mx is not available on trn2"),
        (lambda: nisa.nc_matmul(ps((64, 64)), sb((128, 64), nl.float8_e4m3fn), sb((128, 64), nl.float8_e4m3fn)),
         "float8_e4m3fn inputs is not available on trn2"),
    ],
)
def test_trn3_only_features_raise_on_trn2(call, match: str) -> None:  # noqa: ANN001
    with session("trn2"), pytest.raises(EmulatorError, match=match):
        call()


def test_accumulate_true_on_fresh_psum_is_rejected() -> None:
    with session("trn3"), pytest.raises(EmulatorError, match="accumulate=True on a PSUM location no matmul has written"):
        nisa.nc_matmul(ps((64, 64)), _zeros((128, 64)), _zeros((128, 64)), accumulate=True)


def test_bf16_psum_accumulation_on_trn3_rounds_each_step() -> None:
    with session("trn3"):
        a, b = sb((128, 1), nl.bfloat16), sb((128, 1), nl.bfloat16)
        nisa.memset(a, 1.0)
        nisa.memset(b, 1.0 / 128)
        acc = ps((1, 1), nl.bfloat16)
        for i in range(300):
            nisa.nc_matmul(acc, a, b, accumulate=i > 0)  # adds 1.0 per step
        # bf16 has 8 significant bits: above 256 an add of 1.0 rounds to even and stalls at 256.
        assert float(acc.data.astype(np.float32)[0, 0]) == 256.0


def test_dma_transpose_dtype_sizes() -> None:
    """4-byte dtypes transpose by DMA, except under hardware DGE (2-byte only); 1-byte never."""
    with session("trn2"):
        src = _zeros((16, 128))
        words = nl.ndarray((16, 128), dtype=nl.int32, buffer=nl.sbuf)
        nisa.memset(words, 7)
        out = nl.ndarray((128, 16), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_transpose(out, words)
        np.testing.assert_array_equal(out.data, 7)
        nisa.dma_transpose(sb((128, 16)), src, dge_mode=nisa.dge_mode.hwdge)
        with pytest.raises(EmulatorError, match="dtype int32 is not a 2-byte dtype \\(hardware-DGE"):
            nisa.dma_transpose(out, words, dge_mode=nisa.dge_mode.hwdge)
        with pytest.raises(EmulatorError, match="dtype int8 is not a 2- or 4-byte dtype"):
            nisa.dma_transpose(sb((128, 16), nl.int8), sb((16, 128), nl.int8))
