"""LNC=2 as the hardware runs it, the compiler's memory model, per-SDK strictness and the 0.3.0
instructions the emulator gained (each against a NumPy golden)."""

from __future__ import annotations

import numpy as np
import pytest

from nkimoe.nki.emulator import EmulatorError, collectives, isa as nisa, jit, language as nl, session

F32 = np.float32


# --- LNC=2 ----------------------------------------------------------------------------------------


@jit
def _halves_kernel(x):  # noqa: ANN001, ANN202
    """Each program doubles its half of the rows into one shared output."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    half = x.shape[0] // nl.num_programs()
    rows = slice(nl.program_id(0) * half, (nl.program_id(0) + 1) * half)
    tile = nl.ndarray((half, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=x[rows, :])
    nisa.tensor_scalar(dst=tile, data=tile, op0=nl.multiply, operand0=2.0)
    nisa.dma_copy(dst=out[rows, :], src=tile)
    return out


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_lnc2_programs_write_halves_of_one_shared_output(target: str) -> None:
    x = np.arange(256 * 8, dtype=F32).reshape(256, 8)
    with session(target) as s:
        out = _halves_kernel[2](x)
    np.testing.assert_array_equal(out, 2 * x)  # exact: doubling is exact in fp32
    # The trace holds program 0's instructions, then program 1's.
    assert [i.name for i in s.trace] == ["dma_copy", "tensor_scalar", "dma_copy"] * 2


@jit
def _barrier_kernel(x):  # noqa: ANN001, ANN202
    """Program 0 writes the shared scratch; after the barrier program 1 reads it."""
    scratch = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    tile = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    if nl.program_id(0) == 0:
        nisa.dma_copy(dst=tile, src=x)
        nisa.dma_copy(dst=scratch, src=tile)
    nisa.core_barrier(scratch, (0, 1))
    if nl.program_id(0) == 1:
        nisa.dma_copy(dst=tile, src=scratch)
        nisa.dma_copy(dst=out, src=tile)
    return out


def test_core_barrier_orders_the_programs() -> None:
    x = np.random.default_rng(0).standard_normal((64, 32)).astype(F32)
    with session("trn2"):
        np.testing.assert_array_equal(_barrier_kernel[2](x), x)
        with pytest.raises(EmulatorError, match="launch it as kernel\\[2\\]"):
            _barrier_kernel(x)


@jit
def _swap_kernel(x):  # noqa: ANN001, ANN202
    """Each program sends its half to the other: the output has the halves swapped."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    me, half = nl.program_id(0), x.shape[0] // 2
    mine = nl.ndarray((half, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf)
    theirs = nl.ndarray((half, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=mine, src=x[me * half:(me + 1) * half, :])
    nisa.sendrecv(src=mine, dst=theirs, send_to_rank=1 - me, recv_from_rank=1 - me, pipe_id=0)
    nisa.dma_copy(dst=out[me * half:(me + 1) * half, :], src=theirs)
    return out


def test_sendrecv_exchanges_tiles_between_programs() -> None:
    x = np.random.default_rng(1).standard_normal((128, 16)).astype(F32)
    with session("trn3"):
        out = _swap_kernel[2](x)
    np.testing.assert_array_equal(out, np.concatenate([x[64:], x[:64]]))


@jit
def _private_kernel(x):  # noqa: ANN001, ANN202
    """Each program stages its own id in private HBM; the shared output shows no crosstalk."""
    out = nl.ndarray((2, 4), dtype=nl.float32, buffer=nl.shared_hbm)
    private = nl.ndarray((1, 4), dtype=nl.float32, buffer=nl.private_hbm)
    me = nl.program_id(0)
    tile = nl.full((1, 4), float(me + 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=private, src=tile)
    nisa.core_barrier(out, (0, 1))  # both have written their private copy
    back = nl.ndarray((1, 4), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=back, src=private)
    nisa.dma_copy(dst=out[me:me + 1, :], src=back)
    return out


def test_private_hbm_stays_private_under_lnc2() -> None:
    with session("trn2"):
        out = _private_kernel[2](np.zeros((1, 1), F32))
    np.testing.assert_array_equal(out, [[1.0] * 4, [2.0] * 4])


@jit
def _failing_kernel(x):  # noqa: ANN001, ANN202
    if nl.program_id(0) == 0:
        raise ValueError("program 0 fails")
    nisa.core_barrier(nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.shared_hbm), (0, 1))


def test_a_failing_program_releases_its_waiting_peer() -> None:
    with session("trn2"), pytest.raises(ValueError, match="program 0 fails"):
        _failing_kernel[2](np.zeros((1, 1), F32))


# --- memory as the compiler allocates it ----------------------------------------------------------


@jit
def _looped_kernel(x):  # noqa: ANN001, ANN202
    """Per iteration one 120 KiB SBUF tile: two iterations' tiles exceed trn2's SBUF, one does not."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    for i in nl.affine_range(x.shape[0] // 128):
        tile = nl.ndarray((128, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf, name="row_block")
        nisa.dma_copy(dst=tile, src=x[i * 128:(i + 1) * 128, :])
        nisa.dma_copy(dst=out[i * 128:(i + 1) * 128, :], src=tile)
    return out


@jit
def _hoarding_kernel(x):  # noqa: ANN001, ANN202
    """The same tiles, all kept live to the end: over capacity."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    tiles = []
    for i in nl.affine_range(x.shape[0] // 128):
        tile = nl.ndarray((128, x.shape[1]), dtype=x.dtype, buffer=nl.sbuf, name="row_block")
        nisa.dma_copy(dst=tile, src=x[i * 128:(i + 1) * 128, :])
        tiles.append(tile)
    for i, tile in enumerate(tiles):
        nisa.dma_copy(dst=out[i * 128:(i + 1) * 128, :], src=tile)
    return out


def test_loop_tiles_are_reused_and_real_overflow_is_refused() -> None:
    x = np.ones((256, 120 * 1024 // 4), F32)  # 120 KiB per partition per tile
    with session("trn2"):
        np.testing.assert_array_equal(_looped_kernel(x), x)
        with pytest.raises(EmulatorError, match=r"live sbuf to 245760 B per partition, over trn2's \d+ B per "
                                                r"partition; live tiles: row_block \(122880 B, allocated at "
                                                r"test_runtime_model.py:\d+\)"):
            _hoarding_kernel(x)


def test_pinned_tiles_may_share_bytes_only_when_not_live_together() -> None:
    """A pinned tile takes its bytes at its first use; tiles may be declared over the same bytes up front."""
    with session("trn2"):
        a = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum, address=(0, 0), name="a")
        nisa.memset(a, 0.0)
        b = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum, address=(0, 0), name="b")
        nisa.memset(b, 1.0)  # a is dead: reusing its bank is what the pin asks for
        c = nl.ndarray((128, 256), dtype=nl.float32, buffer=nl.psum, address=(0, 1024), name="c")
        nisa.memset(b, 2.0)  # c is declared over b's bytes but holds none yet
        nisa.memset(c, 3.0)
        with pytest.raises(EmulatorError, match="b .* is used after c .* took its bytes"):
            nisa.memset(b, 4.0)
        assert c.shape == (128, 256)
        with pytest.raises(EmulatorError, match="ends at byte 18432, past trn2's 16384 B of psum"):
            nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum, address=(0, 16384))


# --- per-SDK strictness ---------------------------------------------------------------------------


@jit
def _beta2_kernel(x):  # noqa: ANN001, ANN202
    """NKI 0.2.0 idioms: a string buffer name, an nl.hbm output, a DMA straight out of PSUM."""
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.hbm)
    tile = nl.ndarray(x.shape, dtype=x.dtype, buffer="sbuf")
    nisa.dma_copy(dst=tile, src=x)
    acc = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.psum)
    nisa.tensor_copy(dst=acc, src=tile)
    nisa.dma_copy(dst=out, src=acc)
    return out


def test_nki_version_follows_the_target_with_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    x = np.ones((4, 4), F32)
    with session("trn2") as s:
        assert s.nki_version == "0.2.0"
        np.testing.assert_array_equal(_beta2_kernel(x), x)
    with session("trn3") as s:
        assert s.nki_version == "0.3.0"
        with pytest.raises(EmulatorError, match="the string buffer name 'sbuf' was removed in NKI 0.3.0"):
            _beta2_kernel(x)
    with session("trn3", nki_version="0.2.0"):
        np.testing.assert_array_equal(_beta2_kernel(x), x)
    monkeypatch.setenv("NKIMOE_NKI_VERSION", "0.3.0")
    with session("trn2") as s:
        assert s.nki_version == "0.3.0"
    monkeypatch.setenv("NKIMOE_NKI_VERSION", "0.9")
    with pytest.raises(EmulatorError, match="NKIMOE_NKI_VERSION='0.9' is not an emulated NKI; valid: 0.2.0, 0.3.0"):
        with session("trn2"):
            pass


@pytest.mark.parametrize("idiom,match", [
    ("hbm_output", "returning the hbm tensor out from a kernel was removed in NKI 0.3.0"),
    ("psum_dma", "nisa.dma_copy reading PSUM was removed in NKI 0.3.0"),
    ("buffer_none", "buffer=None was removed in NKI 0.3.0"),
])
def test_what_0_3_0_removed_is_refused(idiom: str, match: str) -> None:
    @jit
    def kernel(x):  # noqa: ANN001, ANN202
        out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.hbm if idiom == "hbm_output" else nl.shared_hbm,
                         name="out")
        tile = nl.ndarray(x.shape, dtype=x.dtype, buffer=None if idiom == "buffer_none" else nl.sbuf)
        nisa.dma_copy(dst=tile, src=x)
        if idiom == "psum_dma":
            acc = nl.ndarray(x.shape, dtype=nl.float32, buffer=nl.psum)
            nisa.tensor_copy(dst=acc, src=tile)
            nisa.dma_copy(dst=out, src=acc)
        else:
            nisa.dma_copy(dst=out, src=tile)
        return out

    x = np.ones((4, 4), F32)
    with session("trn2", nki_version="0.3.0"), pytest.raises(EmulatorError, match=match):
        kernel(x)
    with session("trn2", nki_version="0.2.0"):
        np.testing.assert_array_equal(kernel(x), x)


def test_nki_object_fields_may_be_unannotated() -> None:
    """``@dataclass`` over ``nl.NKIObject`` takes the class attributes as fields, as attention_cte's
    ``SectionParams(section_idx=...)`` needs; methods stay methods."""
    from dataclasses import dataclass

    @dataclass
    class Params(nl.NKIObject):
        index = None
        size: int = 4

        def twice(self) -> int:
            return 2 * self.size

    p = Params(index=3)
    assert (p.index, p.size, p.twice()) == (3, 4, 8)


def test_a_kernel_may_return_the_output_it_is_passed() -> None:
    """nki-library passes outputs in (``must_alias_input``) and returns them; a tensor the kernel
    allocates in ``nl.hbm`` still may not be returned under 0.3.0."""
    @jit
    def kernel(x, out):  # noqa: ANN001, ANN202
        tile = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=tile, src=x)
        nisa.dma_copy(dst=out, src=tile)
        return out

    x, out = np.arange(16, dtype=F32).reshape(4, 4), np.zeros((4, 4), F32)
    with session("trn2", nki_version="0.3.0"):
        np.testing.assert_array_equal(kernel(x, out), x)
    np.testing.assert_array_equal(out, x)  # written in place


def test_enum_parameters_take_their_documented_integer_values() -> None:
    """``dge_mode=3`` (nki-library's ``_DGE_MODE_NONE``) is ``dge_mode.none``; no member has 7."""
    with session("trn2", nki_version="0.3.0"):
        src, dst = _sbuf(np.ones((2, 4), F32)), nl.ndarray((2, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=dst, src=src, dge_mode=3)
        np.testing.assert_array_equal(dst.data, 1.0)
        with pytest.raises(EmulatorError, match=r"dge_mode 7 is not a dge_mode value \(unknown=0, swdge=1"):
            nisa.dma_copy(dst=dst, src=src, dge_mode=7)


# --- 0.3.0 instructions -------------------------------------------------------------------------


def _sbuf(values: np.ndarray, dtype: str = nl.float32):  # noqa: ANN202
    t = nl.ndarray(values.shape, dtype=dtype, buffer=nl.sbuf)
    t.data[...] = values
    return t


def test_scan_cumulative_and_scalar_reduce_match_numpy() -> None:
    r = np.random.default_rng(2)
    a, b = r.standard_normal((4, 16)).astype(F32), r.standard_normal((4, 16)).astype(F32)
    with session("trn2"):
        dst = nl.ndarray((4, 16), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_tensor_scan(dst, _sbuf(a), _sbuf(b), 0.5, nl.multiply, nl.add)
        expected, prev = np.empty_like(a), np.full(4, 0.5, F32)
        for i in range(16):
            prev = a[:, i] * prev + b[:, i]
            expected[:, i] = prev
        np.testing.assert_allclose(dst.data, expected, rtol=1e-6)  # same fp32 ops in the same order
        nisa.tensor_scalar_cumulative(dst, _sbuf(a), nl.multiply, nl.add, 2.0)
        np.testing.assert_allclose(dst.data, np.cumsum(2 * a, axis=1), rtol=1e-5, atol=1e-6)
        res = nl.ndarray((4, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar_reduce(dst, _sbuf(a), nl.add, 1.0, nl.maximum, res)
        np.testing.assert_array_equal(res.data[:, 0], (a + 1).max(axis=1))


def test_unary_alu_operators_apply_to_the_first_input() -> None:
    """nl.abs, nl.rsqrt and nl.reciprocal are arithmetic ALU operators (the ISA's operator table):
    rmsnorm_quant takes each row's absolute maximum with ``tensor_scalar_reduce(op0=nl.abs, operand0=0.0)``."""
    x = np.random.default_rng(6).standard_normal((4, 16)).astype(F32)
    with session("trn2"):
        dst, res = nl.ndarray((4, 16), dtype=nl.float32, buffer=nl.sbuf), nl.ndarray((4, 1), dtype=nl.float32,
                                                                                       buffer=nl.sbuf)
        nisa.tensor_scalar_reduce(dst, _sbuf(x), nl.abs, 0.0, nl.maximum, res)
        np.testing.assert_array_equal(dst.data, np.abs(x))
        np.testing.assert_array_equal(res.data[:, 0], np.abs(x).max(axis=1))
        nisa.tensor_scalar(dst, _sbuf(np.abs(x)), nl.rsqrt, 0.0)
        np.testing.assert_allclose(dst.data, 1 / np.sqrt(np.abs(x)), rtol=1e-6)  # fp32 rsqrt vs NumPy's


def test_a_matmul_into_an_access_pattern_of_psum_accumulates_as_into_a_slice() -> None:
    """attention_tkg writes its QK matmuls through ``TensorView(...).get_view()`` (an ``ap`` pattern):
    the pattern keeps PSUM's record of what matmuls wrote, so ``accumulate=None`` decides as for a slice."""
    r = np.random.default_rng(7)
    a, b = r.standard_normal((8, 4)).astype(F32), r.standard_normal((8, 6)).astype(F32)
    with session("trn2"):
        acc = nl.ndarray((4, 12), dtype=nl.float32, buffer=nl.psum)
        half = acc.ap([[12, 4], [1, 6]], offset=6)  # columns 6..11
        nisa.nc_matmul(half, _sbuf(a), _sbuf(b))
        nisa.nc_matmul(half, _sbuf(a), _sbuf(b))  # accumulates: a matmul wrote there
        np.testing.assert_allclose(acc.data[:, 6:], 2 * (a.T @ b), rtol=1e-5)
        nisa.nc_matmul(acc[:, 0:6], _sbuf(a), _sbuf(b))  # starts fresh: nothing written there yet
        np.testing.assert_allclose(acc.data[:, :6], a.T @ b, rtol=1e-5)


def test_range_select_nonzero_and_gather() -> None:
    r = np.random.default_rng(3)
    x = r.standard_normal((2, 8)).astype(F32)
    with session("trn3"):
        dst, res = nl.ndarray((2, 8), dtype=nl.float32, buffer=nl.sbuf), nl.ndarray((2, 1), dtype=nl.float32,
                                                                                      buffer=nl.sbuf)
        lo, hi = _sbuf(np.array([[2.0], [0.0]], F32)), _sbuf(np.array([[5.0], [3.0]], F32))
        nisa.range_select(dst, _sbuf(x), nl.greater_equal, nl.less, lo, hi, reduce_res=res, on_false_value=-9.0)
        idx = np.arange(8)
        mask = np.stack([(idx >= 2) & (idx < 5), (idx >= 0) & (idx < 3)])
        np.testing.assert_array_equal(dst.data, np.where(mask, x, -9.0))
        np.testing.assert_array_equal(res.data[:, 0], np.where(mask, x, -9.0).max(axis=1))
        flags = np.zeros((16, 8), F32)
        flags[0, [1, 2, 5]] = 1.0
        found = nl.ndarray((16, 9), dtype=nl.int32, buffer=nl.sbuf)
        nisa.nonzero_with_count(found, _sbuf(flags), index_offset=16)
        assert found.data[0].tolist() == [17, 18, 21, -1, -1, -1, -1, -1, 3]  # the documented example
        gathered = nl.ndarray((2, 3), dtype=nl.float32, buffer=nl.sbuf)
        nisa.nc_n_gather(gathered, _sbuf(x), _sbuf(np.array([[7, 0, 3], [1, 1, 6]]), nl.uint32))
        np.testing.assert_array_equal(gathered.data, [[x[0, 7], x[0, 0], x[0, 3]], [x[1, 1], x[1, 1], x[1, 6]]])


def test_language_conveniences_match_numpy() -> None:
    r = np.random.default_rng(4)
    x = r.standard_normal((8, 32)).astype(F32)
    with session("trn3"):
        t = _sbuf(x)
        np.testing.assert_allclose(nl.softmax(t, axis=1).data, np.exp(x) / np.exp(x).sum(1, keepdims=True), rtol=1e-5)
        np.testing.assert_array_equal(nl.broadcast_to(_sbuf(x[:, :1]), (8, 32)).data, np.broadcast_to(x[:, :1], (8, 32)))
        np.testing.assert_array_equal(nl.where(nl.greater(t, 0.0), t, 0.0).data, np.maximum(x, 0))
        ident = nl.shared_identity_matrix(8, dtype=nl.float32)
        product = nl.matmul(ident, t, transpose_x=True)
        assert product.buffer is nl.psum
        np.testing.assert_array_equal(product.data, x)  # identity matmul is exact in fp32
        np.testing.assert_allclose(nl.var(t, axis=1).data, x.var(axis=1), rtol=1e-5)


def test_collectives_run_one_rank_and_refuse_others() -> None:
    x = np.arange(8, dtype=F32).reshape(2, 4)
    with session("trn2"):
        src, dst = _sbuf(x), nl.ndarray((2, 4), dtype=nl.float32, buffer=nl.sbuf)
        collectives.all_reduce([src], [dst], collectives.ReplicaGroup([[0]]), nl.add)
        np.testing.assert_array_equal(dst.data, x)
        with pytest.raises(EmulatorError, match="all_gather is not emulated: replica group \\[0, 1\\] spans ranks"):
            collectives.all_gather([src], [dst], collectives.ReplicaGroup([[0, 1]]), 0)


def test_unemulated_apis_say_why() -> None:
    with session("trn3"), pytest.raises(EmulatorError, match="nisa.rand_get_state is not emulated: .*XORWOW"):
        nisa.rand_get_state(nl.ndarray((1, 6), dtype=nl.uint32, buffer=nl.sbuf))


@jit
def _scatter_rows_kernel(cache, rows, ids):  # noqa: ANN001, ANN202
    """Indirect scatter of ``rows`` into ``cache`` at row ``ids`` (KV-cache style), skipping ids past the end."""
    idx = nl.ndarray(ids.shape, dtype=ids.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx, src=ids)
    tile = nl.ndarray(rows.shape, dtype=rows.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=rows)
    width = cache.shape[1]
    nisa.dma_copy(dst=cache.ap([[width, rows.shape[0]], [1, width]], vector_offset=idx), src=tile,
                  oob_mode=nisa.oob_mode.skip)


@jit
def _gather_rows_kernel(cache, ids):  # noqa: ANN001, ANN202
    out = nl.ndarray((ids.shape[0], cache.shape[1]), dtype=cache.dtype, buffer=nl.shared_hbm)
    idx = nl.ndarray(ids.shape, dtype=ids.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx, src=ids)
    tile = nl.ndarray((ids.shape[0], cache.shape[1]), dtype=cache.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=cache.ap([[cache.shape[1], ids.shape[0]], [1, cache.shape[1]]], vector_offset=idx))
    nisa.dma_copy(dst=out, src=tile)
    return out


def test_indirect_dma_skips_out_of_bounds_rows_only_when_asked() -> None:
    cache = np.zeros((8, 4), F32)
    rows = np.arange(12, dtype=F32).reshape(3, 4) + 1
    ids = np.array([[2], [99], [5]], dtype=np.int32)
    with session("trn3"):
        _scatter_rows_kernel(cache, rows, ids)  # written in place, as on hardware
        expected = np.zeros((8, 4), F32)
        expected[2], expected[5] = rows[0], rows[2]
        np.testing.assert_array_equal(cache, expected)
        with pytest.raises(EmulatorError, match=r"indirect rows \[1\] index past the end .*oob_mode.skip"):
            _gather_rows_kernel(cache, ids)


def test_a_gather_records_the_runs_its_rows_read() -> None:
    """A gather whose row pattern reads two runs of 4 elements per row (every other half row) moves
    runs of 16 bytes, though its gathered copy is contiguous: the DMA's descriptor count follows."""
    with session("trn3") as s:
        table = nl.ndarray((6, 16), dtype=nl.float32, buffer=nl.private_hbm)
        table.data[...] = np.arange(96, dtype=F32).reshape(6, 16)
        rows = _sbuf(np.array([[4], [0]], np.int32), nl.int32)
        tile = nl.ndarray((2, 2, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=tile, src=table.ap([[16, 2], [8, 2], [1, 4]], vector_offset=rows, indirect_dim=0))
    np.testing.assert_array_equal(tile.data, table.data[[4, 0]].reshape(2, 2, 8)[:, :, 0:4])
    assert s.trace[-1].contiguous == 16


def test_a_dynamic_address_out_of_bounds_skips_the_dma_only_when_asked() -> None:
    """``scalar_offset`` past the end: ``oob_mode=skip`` skips the transfer (nki-library's
    indexed_flatten parks unused rows at offset -1e6); the default raises."""
    with session("trn2"):
        cache = nl.ndarray((4, 8), dtype=nl.float32, buffer=nl.private_hbm)
        cache.data[...] = 0.0
        tile = _sbuf(np.ones((2, 8), F32))
        for row in (1, -1000000):  # rows 1-2 written, then a transfer skipped
            offset = _sbuf(np.array([[row]], np.int32), nl.int32)
            nisa.dma_copy(dst=cache.ap([[8, 2], [1, 8]], scalar_offset=offset, indirect_dim=0), src=tile,
                          oob_mode=nisa.oob_mode.skip)
        np.testing.assert_array_equal(cache.data, np.array([[0.0] * 8, [1.0] * 8, [1.0] * 8, [0.0] * 8], F32))
        with pytest.raises(EmulatorError, match="at element -8000000 reaches past the end"):
            nisa.dma_copy(dst=cache.ap([[8, 2], [1, 8]], scalar_offset=offset, indirect_dim=0), src=tile)


def test_an_empty_view_is_legal_to_build_not_to_access() -> None:
    """nki-library's cross_entropy gives an LNC=2 program with no positions ``x[nl.ds(0, 0)]``
    and never touches it; an instruction that does is refused."""
    with session("trn2"):
        hbm = nl.ndarray((4,), dtype=nl.int32, buffer=nl.shared_hbm)
        empty = hbm[nl.ds(0, 0)]
        assert empty.shape == (0,)
        with pytest.raises(EmulatorError, match="nisa.dma_copy: src is empty"):
            nisa.dma_copy(dst=nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf), src=empty)


def test_ap_dtype_reinterprets_the_bytes() -> None:
    """nki-library's mxfp_load_utils reads bf16 pairs as fp32 words with ``.ap(dtype=nl.float32)``."""
    import ml_dtypes

    pairs = np.random.default_rng(5).standard_normal((4, 8)).astype(ml_dtypes.bfloat16)
    with session("trn3"):
        src = _sbuf(pairs, nl.bfloat16)
        words = nl.ndarray((4, 4), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=words, src=src.ap([[4, 4], [1, 4]], dtype=nl.float32))
        np.testing.assert_array_equal(words.data.view(np.uint32), pairs.view(np.uint32))  # the same bits
        odd = src[:, 1:4]
        with pytest.raises(EmulatorError, match="do not split into float32 elements"):
            odd.ap([[4, 4], [1, 1]], dtype=nl.float32)


def test_storage_ids_are_never_reused() -> None:
    """Each allocation keeps its own storage id even after Python frees an earlier one (``id()``
    reuse would hand a new tile the pending accesses of a dead one, and with them false
    dependencies in the cost model's schedule)."""
    seen = []
    with session("trn2"):
        for _ in range(200):
            seen.append(nl.ndarray((128, 64), dtype=nl.float32, buffer=nl.sbuf).storage_id)
    assert len(set(seen)) == len(seen)
