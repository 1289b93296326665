"""Each effect of the cost model in isolation: direction and order of magnitude, never exact numbers."""

from __future__ import annotations

import numpy as np

from nkimoe.bench.costmodel import DMA_QUEUE_NS, estimate, schedule
from nkimoe.nki import nki, nisa, nl
from nkimoe.nki.emulator import session
from nkimoe.targets import TRN2, TRN3

ROWS, COLS = 128, 4096  # bf16: 8 KiB per partition, 1 MiB in all


def _trace(kernel, target: str, *args: np.ndarray):  # noqa: ANN001, ANN202
    with session(target) as s:
        kernel(*args)
    return s.trace


def _bf16(*shape: int) -> np.ndarray:
    return np.ones(shape, dtype=np.float16)


@nki.jit
def one_load(x):
    t = nl.ndarray((ROWS, COLS), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    out = nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)
    return out


@nki.jit
def column_loads(x):
    """The same bytes as ``one_load`` in 256 DMAs of 32 B per partition."""
    t = nl.ndarray((ROWS, COLS), dtype=x.dtype, buffer=nl.sbuf)
    for j in nl.affine_range(COLS // 16):
        nisa.dma_copy(dst=t[:, j * 16:(j + 1) * 16], src=x[:, j * 16:(j + 1) * 16])
    return nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)


@nki.jit
def row_loads(x):
    """The same bytes as ``one_load`` in 128 single-partition DMAs of 8 KiB each."""
    t = nl.ndarray((ROWS, COLS), dtype=x.dtype, buffer=nl.sbuf)
    for p in nl.affine_range(ROWS):
        nisa.dma_copy(dst=t[p:p + 1, :], src=x[p:p + 1, :])
    return nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)


def test_many_small_dmas_cost_more_than_one_large() -> None:
    x = _bf16(ROWS, COLS)
    large = estimate(_trace(one_load, "trn2", x), TRN2).micros
    narrow = estimate(_trace(column_loads, "trn2", x), TRN2).micros
    single_row = estimate(_trace(row_loads, "trn2", x), TRN2).micros
    # One 1 MiB load at ~368 GB/s plus ~1.3 us: a few microseconds.
    assert 2 < large < 10
    # 32 B per partition is bound by the per-transfer cost (~1.4 % of peak in AWS's curve): tens of
    # times slower.
    assert 10 * large < narrow < 1000 * large
    # 128 transfers of one queue, each at least DMA_QUEUE_NS apart, whatever their 8 KiB would need.
    queued = 128 * DMA_QUEUE_NS * 1e-3
    assert 10 * large < single_row and queued < single_row < 1.5 * queued


@nki.jit
def store_then_independent_load(x, y):
    """Store a result that needs a long VectorE chain, then load an unrelated input."""
    a = nl.ndarray((ROWS, 512), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=a, src=x)
    for _ in nl.sequential_range(40):
        nisa.tensor_scalar(dst=a, data=a, op0=nl.multiply, operand0=1.0)
    out = nl.ndarray((ROWS, 512), dtype=x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=a)
    b = nl.ndarray((ROWS, 512), dtype=y.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=b, src=y)
    return out


def test_store_queue_does_not_block_an_independent_load() -> None:
    trace = _trace(store_then_independent_load, "trn2", _bf16(ROWS, 512), _bf16(ROWS, 512))
    times = schedule(trace, TRN2)
    dmas = [i for i, instr in enumerate(trace) if instr.engine == "dma"]
    first_load, store, second_load = dmas
    assert times[second_load][1] < times[store][0]  # done before the store can even start
    assert times[second_load][1] < 3 * times[first_load][1]


@nki.jit
def reuse_one_tile(x):
    """Load, consume and reload one SBUF tile: every reload waits for the previous read (WAR)."""
    t = nl.ndarray((ROWS, 2048), dtype=x.dtype, buffer=nl.sbuf)
    acc = nl.ndarray((ROWS, 2048), dtype=x.dtype, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    for j in nl.sequential_range(8):
        nisa.dma_copy(dst=t, src=x[:, j * 2048:(j + 1) * 2048])
        nisa.tensor_tensor(dst=acc, data1=acc, data2=t, op=nl.add)
    out = nl.ndarray((ROWS, 2048), dtype=x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=acc)
    return out


@nki.jit
def fresh_tile_each_time(x):
    """As ``reuse_one_tile`` with a new tile per load: the loads run ahead."""
    acc = nl.ndarray((ROWS, 2048), dtype=x.dtype, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    tiles = [nl.ndarray((ROWS, 2048), dtype=x.dtype, buffer=nl.sbuf) for _ in range(8)]
    for j in nl.sequential_range(8):
        nisa.dma_copy(dst=tiles[j], src=x[:, j * 2048:(j + 1) * 2048])
        nisa.tensor_tensor(dst=acc, data1=acc, data2=tiles[j], op=nl.add)
    out = nl.ndarray((ROWS, 2048), dtype=x.dtype, buffer=nl.shared_hbm)
    nisa.dma_copy(dst=out, src=acc)
    return out


def test_write_after_read_serialises_reloads_of_one_tile() -> None:
    x = _bf16(ROWS, 8 * 2048)
    reuse = estimate(_trace(reuse_one_tile, "trn3", x), TRN3).micros
    fresh = estimate(_trace(fresh_tile_each_time, "trn3", x), TRN3).micros
    assert 1.2 * fresh < reuse < 10 * fresh


@nki.jit
def halves_of_one_tile(x):
    """Write the second half of a tile while the first half is read: disjoint bytes, no hazard."""
    t = nl.ndarray((ROWS, 2048), dtype=x.dtype, buffer=nl.sbuf)
    u = nl.ndarray((ROWS, 1024), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t[:, :1024], src=x[:, :1024])
    for _ in nl.sequential_range(20):
        nisa.tensor_copy(dst=u, src=t[:, :1024])
    nisa.dma_copy(dst=t[:, 1024:], src=x[:, 1024:])
    nisa.dma_copy(dst=t[:, :1024], src=x[:, 1024:])
    return nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)


def test_hazards_are_tracked_per_byte_range() -> None:
    trace = _trace(halves_of_one_tile, "trn2", _bf16(ROWS, 2048))
    times = schedule(trace, TRN2)
    last_read = max(i for i, instr in enumerate(trace) if instr.name == "tensor_copy")
    other_half, same_half = [i for i, instr in enumerate(trace) if instr.engine == "dma"][1:]
    assert times[other_half][0] < times[last_read][1]  # no wait for the reads of the other half
    assert times[same_half][0] >= times[last_read][1]  # WAR on the half that is read


@nki.jit
def split_copy(x):
    """Each program copies its share of the columns (LNC=2 splits the work between the cores)."""
    rows, cols = x.shape
    out = nl.ndarray((rows, cols), dtype=x.dtype, buffer=nl.shared_hbm)
    share = cols // nl.num_programs()
    base = nl.program_id(0) * share
    for j in nl.affine_range(share // 2048):
        t = nl.ndarray((128, 2048), dtype=x.dtype, buffer=nl.sbuf)
        lo = base + j * 2048
        nisa.dma_copy(dst=t, src=x[:, lo:lo + 2048])
        nisa.dma_copy(dst=out[:, lo:lo + 2048], src=t)
    return out


def test_two_cores_beat_one_on_a_bandwidth_bound_kernel() -> None:
    x = _bf16(128, 16 * 2048)
    one = estimate(_trace(split_copy, "trn2", x), TRN2)
    two = estimate(_trace(split_copy[2], "trn2", x), TRN2)
    assert one.programs == 1 and two.programs == 2
    assert one.hbm_bytes == two.hbm_bytes
    # Two cores with their own DMA engines, sharing one HBM stack: close to, not above, 2x.
    assert 1.5 < one.micros / two.micros <= 2.05


@nki.jit
def dynamic_offset_load(x, index):
    """Load the row block that a run-time index selects (a DGE DMA that reads ``index``)."""
    idx = nl.ndarray((1, 1), dtype=index.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx, src=index)
    t = nl.ndarray((ROWS, 512), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x.ap([[512, ROWS], [1, 512]], offset=0, scalar_offset=idx, indirect_dim=0))
    return nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)


@nki.jit
def static_offset_load(x, index):
    idx = nl.ndarray((1, 1), dtype=index.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=idx, src=index)
    t = nl.ndarray((ROWS, 512), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x[0:ROWS, :])
    return nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)


def test_dynamic_dma_reads_its_offset_and_pays_descriptor_generation() -> None:
    x, index = _bf16(2 * ROWS, 512), np.zeros((1, 1), dtype=np.int32)
    trace = _trace(dynamic_offset_load, "trn2", x, index)
    offset_load, gather = trace[0], trace[1]
    assert gather.detail.get("dynamic") and offset_load.writes[0] in gather.reads
    times = schedule(trace, TRN2)
    assert times[1][0] >= times[0][1]  # the DGE DMA waits for its offset (read-after-write)
    dynamic = estimate(trace, TRN2).micros
    static = estimate(_trace(static_offset_load, "trn2", x, index), TRN2).micros
    # Serialised behind the offset's load and ~600 ns of descriptor generation: slower, same magnitude.
    assert static + TRN2.dge_ns * 1e-3 < dynamic < 3 * static


@nki.jit
def elementwise(x, kind):
    a = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    b = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=a, src=x)
    for _ in nl.sequential_range(50):
        if kind == "copy":
            nisa.tensor_copy(dst=b, src=a)
        else:
            nisa.tensor_tensor(dst=b, data1=a, data2=a, op=nl.add)
    return nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)


def test_vector_performance_mode_applies_per_instruction() -> None:
    x16, x32 = _bf16(ROWS, 2048), np.ones((ROWS, 2048), dtype=np.float32)
    busy = {(kind, x.dtype.name): estimate(_trace(elementwise, "trn2", x, kind), TRN2).busy_us["vector"]
            for kind in ("copy", "tensor") for x in (x16, x32)}
    # 16-bit SBUF tensor_copy at 4x, fp32 at 1x; tensor_tensor streams two inputs at 2x (16-bit).
    assert 3 < busy["copy", "float32"] / busy["copy", "float16"] < 4.5
    assert 3 < busy["tensor", "float16"] / busy["copy", "float16"] < 4.5


@nki.jit
def matmuls(lhs_t, rhs, gaps):
    """Eight matmuls, back to back or each after a chain of 40 VectorE instructions (TensorE idle)."""
    a = nl.ndarray((ROWS, 128), dtype=lhs_t.dtype, buffer=nl.sbuf)
    b = nl.ndarray((ROWS, 512), dtype=rhs.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=a, src=lhs_t)
    nisa.dma_copy(dst=b, src=rhs)
    for i in nl.sequential_range(8):
        if gaps:
            for _ in nl.sequential_range(40):
                nisa.tensor_scalar(dst=b, data=b, op0=nl.multiply, operand0=1.0)
        acc = nl.ndarray((ROWS, 512), dtype=nl.float32, buffer=nl.psum)
        nisa.nc_matmul(dst=acc, stationary=a, moving=b)
    return nl.ndarray((1, 1), dtype=lhs_t.dtype, buffer=nl.shared_hbm)


def test_tensor_engine_ramps_up_after_idle() -> None:
    lhs_t, rhs = _bf16(ROWS, 128), _bf16(ROWS, 512)
    for target, name in ((TRN2, "trn2"), (TRN3, "trn3")):
        steady = estimate(_trace(matmuls, name, lhs_t, rhs, False), target).busy_us["tensor"]
        bursts = estimate(_trace(matmuls, name, lhs_t, rhs, True), target).busy_us["tensor"]
        # 512 columns: ~213 ns at full rate each. Back to back, the first ~3 us of work ramps from
        # half rate; after every idle gap each matmul starts again at half rate: close to 2x.
        full = 8 * 512 / target.tensor_hz * 1e6
        assert full < steady < 1.5 * full
        assert 1.6 * full < bursts <= 2.05 * full
