"""The emulator runs Beta-2-style kernels unchanged and matches NumPy, on both targets where legal."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import pytest
import torch

from nkimoe.nki.emulator import EmulatorError, last_session, session
from nkimoe.nki import examples as kernels

BF16 = ml_dtypes.bfloat16
TARGETS = ["trn2", "trn3"]


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


@pytest.mark.parametrize("target", TARGETS)
@pytest.mark.parametrize("dtype", [BF16, np.float32])
def test_tiled_matmul_accumulates_over_k(target: str, dtype: type) -> None:
    r = rng(1)
    lhs_t = r.standard_normal((512, 128)).astype(dtype)
    rhs = r.standard_normal((512, 1024)).astype(dtype)
    with session(target) as s:
        out = kernels.matmul_kernel(lhs_t, rhs)
    expected = lhs_t.astype(np.float64).T @ rhs.astype(np.float64)
    # fp32 accumulation of 512 exact products (bf16 or fp32 inputs): a few fp32 ulps of the sum.
    np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-4)
    assert sum(i.macs for i in s.trace) == 512 * 128 * 1024


@pytest.mark.parametrize("target", TARGETS)
def test_softmax_ragged_rows(target: str) -> None:
    x = rng(2).standard_normal((300, 128)).astype(np.float32) * 4
    with session(target):
        out = kernels.softmax_kernel(x)
    e = np.exp(x - x.max(axis=1, keepdims=True))
    # fp32 throughout: relative error of exp, sum and reciprocal, a few ulps.
    np.testing.assert_allclose(out, e / e.sum(axis=1, keepdims=True), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("target", TARGETS)
def test_rmsnorm_beta2_idioms_with_torch_tensors(target: str) -> None:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(200, 2048, generator=g).to(torch.bfloat16)
    w = (torch.randn(2048, generator=g) * 0.1 + 1).to(torch.bfloat16)
    with session(target, nki_version="0.2.0"):
        out = kernels.rmsnorm_kernel(x, w)
    assert isinstance(out, torch.Tensor) and out.dtype == torch.bfloat16
    xf = x.float()
    expected = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)).to(torch.bfloat16) * w
    # The kernel rounds the normalised value to bf16, then the weight product to bf16 (as the
    # reference does); the sum of squares is accumulated in a different order: within 1 bf16 ulp.
    torch.testing.assert_close(out.float(), expected.float(), rtol=2 ** -7, atol=1e-6)


@pytest.mark.parametrize("target", TARGETS)
def test_transposes(target: str) -> None:
    x = rng(4).standard_normal((96, 128)).astype(BF16)
    with session(target):
        assert np.array_equal(kernels.transpose_kernel(x), x.T)
        assert np.array_equal(kernels.dma_transpose_kernel(x), x.T)


@pytest.mark.parametrize("target", TARGETS)
def test_top8_with_max8_and_find_index8(target: str) -> None:
    r = rng(5)
    scores = np.stack([r.permutation(128) for _ in range(64)]).astype(np.float32) / 7.0
    with session(target):
        vals, idx = kernels.top8_kernel(scores)
    order = np.argsort(-scores, axis=1)[:, :8]
    assert np.array_equal(idx.astype(np.int64), order)
    assert np.array_equal(vals, np.take_along_axis(scores, order, axis=1))


def _mx_quantize_golden(x: np.ndarray) -> np.ndarray:
    """Independent NumPy MXFP8 (e4m3fn) quantise-dequantise of an interleaved [P, 4F] tile: groups of
    8 partitions x 4 values share the scale 2^(floor(log2 amax) - 7) (nisa.quantize_mx docstring)."""
    p, f = x.shape
    v = x.astype(np.float64).reshape(p // 8, 8, f // 4, 4)
    scale = 2.0 ** (np.floor(np.log2(np.abs(v).max(axis=(1, 3)))) - 7)[:, None, :, None]
    q = np.clip(v / scale, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    return (q * scale).reshape(p, f)


def test_mx_matmul_on_trn3_and_rejected_on_trn2() -> None:
    r = rng(6)
    a = r.standard_normal((128, 4 * 64)).astype(BF16)
    b = r.standard_normal((128, 4 * 512)).astype(BF16)
    with session("trn3"):
        out = kernels.mx_matmul_kernel(a, b)

    def mx_product(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        return np.einsum("piq,pjq->ij", x.reshape(128, 64, 4), y.reshape(128, 512, 4))

    golden = mx_product(_mx_quantize_golden(a), _mx_quantize_golden(b))
    # Same quantised operands: only fp32 accumulation order differs (|sums| <= ~100, 512 terms).
    np.testing.assert_allclose(out, golden, rtol=0, atol=1e-3)
    exact = mx_product(a.astype(np.float64), b.astype(np.float64))
    # e4m3fn keeps 3 mantissa bits: relative rounding error up to 2^-4 per value, ~5% rms per
    # product; random signs keep the sums' relative (Frobenius) error near that.
    assert np.linalg.norm(out - exact) / np.linalg.norm(exact) < 0.06
    with session("trn2"), pytest.raises(EmulatorError, match="nisa.quantize_mx is not available on trn2"):
        kernels.mx_matmul_kernel(a, b)


def test_new_tensors_are_nan_and_integer_sentinel() -> None:
    from nkimoe.nki import nl

    with session("trn2"):
        t = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.sbuf)
        i = nl.ndarray((4, 4), dtype=nl.int32, buffer=nl.sbuf)
        assert np.isnan(t.data).all() and (i.data == 4).all()


def test_simulate_returns_the_input_kind_and_records_a_trace() -> None:
    from nkimoe.nki import nki

    x = rng(7).standard_normal((64, 32)).astype(BF16)
    out = nki.simulate(kernels.transpose_kernel)(x)
    assert isinstance(out, np.ndarray) and out.dtype == BF16
    names = [i.name for i in last_session().trace]
    assert names == ["dma_copy", "nc_transpose", "tensor_copy", "dma_copy"]
    with pytest.raises(EmulatorError, match="torch.int64 has no NKI dtype"):
        kernels.transpose_kernel(torch.zeros(4, 4, dtype=torch.int64))
