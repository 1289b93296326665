"""Emulated ``nki.isa`` (``nisa``): every instruction writes into a caller-allocated ``dst`` and
returns ``None``, with the signatures of aws-neuron-sdk ``nki/api/nki/isa/__init__.py``.

Arithmetic follows the documented hardware behaviour: inputs are cast to fp32 inside the
engines and results are rounded once, on write, to the destination dtype. Known differences
from hardware: fp32 matmul accumulation order follows NumPy's BLAS rather than the PE array;
activation functions are exact NumPy functions rather than the ScalarE piece-wise polynomials;
instructions run in program order (no engine concurrency, which the cost model estimates instead).
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from nkimoe.nki.emulator import dtypes as dt
from nkimoe.nki.emulator.core import (
    DYNAMIC_OFFSETS,
    EmulatorError,
    Instruction,
    MemoryRegion,
    NKIObject,
    NkiTensor,
    OutOfBounds,
    VirtualRegister,
    _Gather,
    _scalar,
    current,
    not_emulated,
    require,
    span_of,
)
from nkimoe.nki.emulator.operators import Op, add, equal, maximum, values


class engine(enum.Enum):  # noqa: N801 (names as in the SDK)
    tensor = 1
    vector = 5
    scalar = 2
    gpsimd = 3
    dma = 4
    sync = 6
    unknown = 0


class reduce_cmd(enum.Enum):  # noqa: N801
    idle = 0
    reset = 1
    reduce = 2
    reset_reduce = 3
    load_reduce = 4


_Cmd = reduce_cmd


class dge_mode(enum.Enum):  # noqa: N801
    unknown = 0
    swdge = 1
    hwdge = 2
    none = 3


#: ``nisa.NkiValidationError``: raised when hardware constraints are violated.
NkiValidationError = EmulatorError


class dma_engine(enum.Enum):  # noqa: N801
    dma = 1
    gpsimd_dma = 2


class oob_mode(enum.Enum):  # noqa: N801
    error = 0
    skip = 1


_Oob, _DmaEngine, _Dge = oob_mode, dma_engine, dge_mode  # the enums, under names their parameters do not shadow


def _member(kind: type[enum.Enum], instr: str, name: str, value: Any) -> enum.Enum:
    """An enum parameter as its member; an integer is taken as the member of that documented value
    (nki-library's 0.3.0 kernels pass ``dge_mode=3``), any other value is refused."""
    if isinstance(value, kind):
        return value
    try:
        return kind(value)
    except ValueError:
        raise _limit(instr, name, f"{value!r} is not a {kind.__name__} value "
                                  f"({', '.join(f'{m.name}={m.value}' for m in kind)})") from None


class matmul_perf_mode(enum.Enum):  # noqa: N801
    none = "none"
    double_row = "double_row"


class nc_version(enum.IntEnum):  # noqa: N801
    gen2 = 2
    gen3 = 3
    gen4 = 4


tensor_engine, vector_engine, scalar_engine, gpsimd_engine = engine.tensor, engine.vector, engine.scalar, engine.gpsimd
unknown_engine = engine.unknown


def get_nc_version() -> nc_version:
    """The NeuronCore version of the emulated target (gen3 on trn2, gen4 on trn3)."""
    return nc_version(current().target.nc_version)


def get_nc_sub_version() -> int:
    return 0


# --- helpers ------------------------------------------------------------------------------------


def _limit(instr: str, operand: str, message: str) -> EmulatorError:
    return EmulatorError(f"nisa.{instr}: {operand} {message} (target {current().target.name})")


def _tile(instr: str, operand: str, t: Any, buffers: Sequence[MemoryRegion] = (MemoryRegion.sbuf, MemoryRegion.psum),
          skip_out_of_bounds: bool = False) -> NkiTensor:
    if not isinstance(t, NkiTensor):
        raise _limit(instr, operand, f"must be a tensor, got {type(t).__name__}")
    if isinstance(t, OutOfBounds) and not (t.dynamic and skip_out_of_bounds):
        raise _limit(instr, operand, t.reason)
    if t.data.size == 0:
        raise _limit(instr, operand, f"is empty: {t!r}")
    if isinstance(t, _Gather) and t.out_of_bounds and not skip_out_of_bounds:
        raise _limit(instr, operand, f"indirect rows {t.out_of_bounds[:8]} index past the end of {t.origin!r} "
                                     "(a DMA with oob_mode=nisa.oob_mode.skip skips such rows)")
    if t.buffer not in buffers:
        raise _limit(instr, operand, f"is in {t.buffer.value}; allowed: {', '.join(b.value for b in buffers)}")
    pmax = current().target.partitions
    if t.buffer.on_chip and t.partitions > pmax:
        raise _limit(instr, operand, f"partition dimension {t.partitions} exceeds maximum {pmax}")
    return t


def _same_layout(instr: str, a: NkiTensor, b: NkiTensor, names: str) -> None:
    if a.partitions != b.partitions or a.free_size != b.free_size:
        raise _limit(instr, names, f"must have the same partitions and elements per partition: {a.shape} vs {b.shape}")


def _two_inputs(instr: str, dst: NkiTensor, first: NkiTensor, second: NkiTensor, names: tuple[str, str]) -> None:
    """Checks shared by the two-tile VectorE instructions: tiles on chip, one layout, not both in PSUM."""
    for operand, t in (("dst", dst), (names[0], first), (names[1], second)):
        _tile(instr, operand, t)
    _same_layout(instr, first, second, f"{names[0]} and {names[1]}")
    _same_layout(instr, dst, first, f"dst and {names[0]}")
    if first.buffer is MemoryRegion.psum and second.buffer is MemoryRegion.psum:
        raise _limit(instr, "/".join(names), "cannot both be in PSUM")


def _flat(t: NkiTensor) -> np.ndarray:
    return values(t).reshape(t.partitions, -1) if t.dtype not in dt.PACKED_X4 else values(t).reshape(t.partitions, -1, 4)


def _store(dst: NkiTensor, stored: np.ndarray, matmul: bool = False) -> None:
    """Put values already in ``dst``'s storage dtype into ``dst`` (scattering through a gather view);
    a write by anything but a matmul ends PSUM accumulation there."""
    stored = np.asarray(stored).reshape(dst.data.shape)
    if isinstance(dst, _Gather):
        dst.scatter(stored)
    else:
        dst.data[...] = stored
    if dst.mm_written is not None and not matmul:
        dst.mm_written[...] = False


def _write(dst: NkiTensor, vals: np.ndarray, matmul: bool = False) -> None:
    """Round computed values to ``dst``'s dtype on write, as the engines do."""
    _store(dst, dt.cast(np.asarray(vals).reshape(dst.data.shape), dst.dtype), matmul)


def _engine(instr: str, requested: Any, default: str, allowed: Sequence[str]) -> str:
    name = requested.name if isinstance(requested, engine) else "unknown"
    if name == "unknown":
        return default
    if name not in allowed:
        raise _limit(instr, "engine", f"{name} is not allowed; use one of {', '.join(allowed)}")
    return name


def _record(name: str, eng: str, reads: Sequence[NkiTensor | None], dst: NkiTensor | Sequence[NkiTensor],
            free: int | None = None, inputs: int = 1, **kw: Any) -> None:
    dsts = [dst] if isinstance(dst, NkiTensor) else list(dst)
    srcs = [r for r in reads if isinstance(r, NkiTensor)]
    dynamic = [t for t in (*srcs, *dsts) if t in DYNAMIC_OFFSETS]
    if dynamic:  # a DGE DMA: its offset tensors are read too
        kw["detail"] = {**kw.get("detail", {}), "dynamic": True}
        srcs += [o for o in (DYNAMIC_OFFSETS[t] for t in dynamic) if o is not None]
    first = dsts[0]
    sixteen = all(t.dtype in dt.SIXTEEN_BIT or t.dtype in dt.FP8 for t in (*srcs, *dsts))
    current().record(Instruction(
        name, eng, tuple(s.storage_id for s in srcs), tuple(d.storage_id for d in dsts),
        first.partitions, first.free_size if free is None else free, inputs, sixteen, **kw,
        read_spans=tuple(span_of(s) for s in srcs), write_spans=tuple(span_of(d) for d in dsts)))


def _op(instr: str, op: Any, kinds: Sequence[str] = ("arith", "compare", "bitvec")) -> Op:
    if not isinstance(op, Op):
        raise _limit(instr, "op", f"{op!r} is not an nl operator")
    if op.kind not in kinds:
        raise _limit(instr, "op", f"nl.{op.name} ({op.kind}) is not allowed here")
    return op


def _scalar_operand(instr: str, name: str, operand: Any, partitions: int) -> np.ndarray | float:
    if isinstance(operand, NkiTensor):
        _tile(instr, name, operand)
        if operand.partitions != partitions or operand.free_size != 1:
            raise _limit(instr, name, f"must be a scalar or a [{partitions}, 1] tile, got {operand.shape}")
        return values(operand).reshape(partitions, 1)
    if operand is None:
        raise _limit(instr, name, "is required")
    return float(operand)


def _apply(op: Op, a: Any, b: Any) -> np.ndarray:
    with np.errstate(all="ignore"):
        result = op.fn(a) if op.arity == 1 else op.fn(a, b)  # a unary operator ignores the second input
        return np.asarray(result, dtype=np.float64 if op.kind == "bitvec" else np.float32)


# --- data movement ------------------------------------------------------------------------------


def dma_copy(dst: NkiTensor, src: NkiTensor, oob_mode: Any = oob_mode.error,
             dge_mode: Any = dge_mode.unknown, engine: Any = engine.unknown, name: Any = None) -> None:
    """``dst = src`` with DMA; HBM or SBUF on either side; dtype converted through fp32."""
    allowed = (MemoryRegion.sbuf, MemoryRegion.hbm, MemoryRegion.shared_hbm, MemoryRegion.private_hbm)
    skip = _member(_Oob, "dma_copy", "oob_mode", oob_mode) is _Oob.skip
    _member(_Dge, "dma_copy", "dge_mode", dge_mode)
    _tile("dma_copy", "dst", dst, allowed, skip)
    _tile("dma_copy", "src", src, (*allowed, MemoryRegion.psum), skip)
    if src.buffer is MemoryRegion.psum:
        current().refuse_removed("nisa.dma_copy reading PSUM", "copy PSUM to SBUF with nisa.tensor_copy first")
    if math.prod(dst.shape) != math.prod(src.shape):
        raise _limit("dma_copy", "dst/src", f"element counts differ: {dst.shape} vs {src.shape}")
    if (dst.dtype in dt.PACKED_X4 or src.dtype in dt.PACKED_X4) and dst.dtype != src.dtype:
        raise _limit("dma_copy", "dst/src", "x4 packed data moves only between tensors of the same x4 dtype")
    if isinstance(dst, OutOfBounds) or isinstance(src, OutOfBounds):  # oob_mode=skip: the transfer is skipped
        pass
    elif isinstance(src, _Gather) and src.out_of_bounds:  # oob_mode=skip: those rows of dst keep their values
        if dst.shape[0] != src.shape[0]:
            raise _limit("dma_copy", "dst", f"must have the gathered rows ({src.shape[0]}) as its first axis "
                                            "when oob_mode=skip skips some")
        kept = np.setdiff1d(np.arange(src.shape[0]), src.out_of_bounds)
        moved = src.data if src.dtype == dst.dtype else dt.cast(values(src), dst.dtype)
        merged = dst.data.copy()
        merged[kept] = moved.reshape(merged.shape)[kept]
        _store(dst, merged)
    elif src.dtype == dst.dtype:
        _store(dst, src.data)
    else:
        _write(dst, values(src))
    nbytes = src.nbytes
    row = src if not src.buffer.on_chip else dst
    contiguous = _contiguous_bytes(row)
    _record("dma_copy", "dma", [src], dst, free=src.free_size, bytes=nbytes, contiguous=contiguous,
            hbm_read=nbytes if not src.buffer.on_chip else 0, hbm_write=nbytes if not dst.buffer.on_chip else 0)


def _contiguous_bytes(t: NkiTensor) -> int:
    """Bytes of the innermost run of consecutive elements in ``t``'s HBM view (for a gather, within
    one gathered row's pattern: the gathered copy is contiguous, the rows it reads are not)."""
    data = t.data
    run = data.itemsize
    if isinstance(t, _Gather):
        shape, strides = t.counts, [s * run for s in t.strides]
    else:
        shape, strides = data.shape, data.strides
    for size, stride in zip(reversed(shape), reversed(strides)):
        if stride != run:
            break
        run *= size
    return int(run)


def dma_transpose(dst: NkiTensor, src: NkiTensor, axes: Any = None, dge_mode: Any = dge_mode.unknown, oob_mode: Any = oob_mode.error, name: Any = None) -> None:
    """Transpose with DMA (2-D: [1, 0]; 3-D: [2, 1, 0]; 4-D: [3, 1, 2, 0]); 2- or 4-byte dtypes,
    2-byte only under ``dge_mode=hwdge`` and for an indirect (``vector_offset``) source."""
    _tile("dma_transpose", "dst", dst, (MemoryRegion.sbuf,))
    _tile("dma_transpose", "src", src, (MemoryRegion.sbuf, MemoryRegion.hbm, MemoryRegion.shared_hbm, MemoryRegion.private_hbm))
    two_bytes = _member(_Dge, "dma_transpose", "dge_mode", dge_mode) is _Dge.hwdge or isinstance(src, _Gather)
    if dt.itemsize(src.dtype) not in ((2,) if two_bytes else (2, 4)):
        raise _limit("dma_transpose", "src", f"dtype {src.dtype} is not a {'2' if two_bytes else '2- or 4'}-byte dtype"
                                             + (" (hardware-DGE and indirect transposes move 2-byte dtypes)"
                                                if two_bytes else ""))
    perm = tuple(axes) if axes is not None else {2: (1, 0), 3: (2, 1, 0), 4: (3, 1, 2, 0)}.get(src.ndim)
    if perm is None:
        raise _limit("dma_transpose", "src", f"rank {src.ndim} is not 2, 3 or 4")
    out = src.data.transpose(perm)
    if out.shape != dst.data.shape and math.prod(out.shape) == math.prod(dst.shape):
        out = out.reshape(dst.data.shape)
    if out.shape != dst.data.shape:
        raise _limit("dma_transpose", "dst", f"shape {dst.shape} does not match the transposed src {out.shape}")
    if src.dtype == dst.dtype:
        _store(dst, out)
    else:
        _write(dst, out.astype(np.float32))
    nbytes = src.nbytes
    _record("dma_transpose", "dma", [src], dst, bytes=nbytes, contiguous=int(dt.itemsize(src.dtype)),
            hbm_read=nbytes if not src.buffer.on_chip else 0)


def tensor_copy(dst: NkiTensor, src: NkiTensor, engine: Any = engine.unknown, name: Any = None) -> None:
    """Copy within SBUF/PSUM: bit-exact for equal dtypes, through fp32 otherwise."""
    eng = _engine("tensor_copy", engine, "vector", ("vector", "scalar", "gpsimd"))
    if eng == "scalar" and current().target.nc_version < 3:
        raise _limit("tensor_copy", "engine", "scalar is not allowed on NeuronCore-v2")
    _tile("tensor_copy", "dst", dst)
    _tile("tensor_copy", "src", src)
    _same_layout("tensor_copy", dst, src, "dst and src")
    if eng == "gpsimd" and MemoryRegion.psum in (dst.buffer, src.buffer):
        raise _limit("tensor_copy", "engine", "gpsimd cannot access PSUM")
    if src.dtype == dst.dtype:
        _store(dst, src.data)
    else:
        _write(dst, values(src))
    _record("tensor_copy", eng, [src], dst)


def memset(dst: NkiTensor, value: Any, engine: Any = engine.unknown, name: Any = None) -> None:
    eng = _engine("memset", engine, "vector", ("vector", "gpsimd"))
    _tile("memset", "dst", dst)
    if dst.dtype in dt.PACKED_X4 and value != 0:
        raise _limit("memset", "value", "must be 0 for x4 packed dtypes")
    _write(dst, np.full(dst.data.shape, float(value), dtype=np.float64 if dst.dtype in dt.INTEGER else np.float32))
    _record("memset", eng, [], dst, inputs=0)


def _pattern_values(instr: str, dst: NkiTensor, pattern: Sequence[Sequence[int]], offset: int,
                    channel_multiplier: int) -> np.ndarray:
    steps = [int(s) for s, _ in pattern]
    counts = [int(c) for _, c in pattern]
    if math.prod(counts) != dst.free_size:
        raise _limit(instr, "pattern", f"covers {math.prod(counts)} elements, dst has {dst.free_size} per partition")
    grids = np.meshgrid(*[np.arange(c, dtype=np.int64) * s for s, c in zip(steps, counts)], indexing="ij")
    free = np.sum(grids, axis=0).reshape(-1) if grids else np.zeros(1, dtype=np.int64)
    part = np.arange(dst.partitions, dtype=np.int64)[:, None] * int(channel_multiplier)
    return (int(offset) + part + free[None, :]).astype(np.int64)


def iota(dst: NkiTensor, pattern: Sequence[Sequence[int]], offset: int = 0, channel_multiplier: int = 0,
         name: Any = None) -> None:
    """``dst[p, ...] = offset + p * channel_multiplier + sum(idx_k * step_k)`` in int32 (GpSimd)."""
    _tile("iota", "dst", dst, (MemoryRegion.sbuf,))
    vals = _pattern_values("iota", dst, pattern, offset, channel_multiplier).astype(np.int32)
    _write(dst, vals.astype(np.float64))
    _record("iota", "gpsimd", [], dst, inputs=0)


def affine_select(dst: NkiTensor, pattern: Sequence[Sequence[int]], channel_multiplier: int,
                  on_true_tile: NkiTensor, on_false_value: float, cmp_op: Op = equal, offset: int = 0,
                  name: Any = None) -> None:
    """``dst = on_true_tile where cmp_op(affine_value, 0) else on_false_value`` (GpSimd; causal masks)."""
    _tile("affine_select", "dst", dst, (MemoryRegion.sbuf,))
    _tile("affine_select", "on_true_tile", on_true_tile, (MemoryRegion.sbuf,))
    _same_layout("affine_select", dst, on_true_tile, "dst and on_true_tile")
    affine = _pattern_values("affine_select", dst, pattern, offset, channel_multiplier)
    predicate = _apply(_op("affine_select", cmp_op, ("compare",)), affine.astype(np.float64), 0.0) != 0
    out = np.where(predicate, _flat(on_true_tile), np.float32(on_false_value))
    _write(dst, out)
    _record("affine_select", "gpsimd", [on_true_tile], dst)


# --- TensorE ------------------------------------------------------------------------------------

_PE_DTYPES = frozenset({dt.float8_e4m3, dt.float8_e5m2, dt.float8_e4m3fn, dt.bfloat16, dt.float16, dt.tfloat32, dt.float32})


def _accumulate(instr: str, dst: NkiTensor, result: np.ndarray, accumulate: Any) -> None:
    """Write ``result`` into PSUM ``dst``, added to what is there where accumulation applies:
    everywhere (True), nowhere (False), or (None) where a matmul wrote since allocation."""
    written = dst.mm_written.reshape(dst.partitions, -1)
    add: bool | np.ndarray
    if accumulate is None:
        add = written if written.any() else False
        if add is not False and add.all():
            add = True
    else:
        add = bool(accumulate)
        if add and not written.all():
            raise _limit(instr, "dst", "accumulate=True on a PSUM location no matmul has written since allocation "
                                       "(undefined behaviour on hardware); start the group with accumulate=False")
    if add is True:
        total = values(dst).reshape(dst.partitions, -1) + result
    elif add is False:
        total = result
    else:
        total = np.where(add, values(dst).reshape(dst.partitions, -1) + result, result)
    _write(dst, np.asarray(total, dtype=np.float32), matmul=True)
    dst.mm_written[...] = True


def _psum_dst(instr: str, dst: NkiTensor, moving_free: int, transpose: bool) -> None:
    target = current().target
    _tile(instr, "dst", dst, (MemoryRegion.psum,))
    if not transpose and dst.dtype != dt.float32:
        if dst.dtype != dt.bfloat16:
            raise _limit(instr, "dst", f"dtype {dst.dtype} must be float32 (or bfloat16 on NeuronCore-v4)")
        require("bf16_psum", f"nisa.{instr} with a bfloat16 PSUM dst")
    fmax = target.matmul_moving_fmax_bf16 if dst.dtype == dt.bfloat16 else target.matmul_moving_fmax_fp32
    if moving_free > fmax:
        raise _limit(instr, "moving", f"free size {moving_free} exceeds the maximum {fmax} for a {dst.dtype} dst")
    per_partition = int(dst.free_size * dt.itemsize(dst.dtype))
    bank = target.psum_bank_bytes
    if not target.has("wide_moving"):
        start = dst.partition_offset_bytes()
        if start // bank != (start + per_partition - 1) // bank:
            raise _limit(instr, "dst", f"spans bytes {start}..{start + per_partition - 1} of its PSUM partition, "
                                       f"crossing a {bank} B PSUM bank boundary: a matmul output must fit in one bank")


def nc_matmul(dst: NkiTensor, stationary: NkiTensor, moving: NkiTensor, is_stationary_onezero: bool = False,
              is_moving_onezero: bool = False, is_transpose: bool = False, accumulate: Any = None,
              tile_position: Any = (), tile_size: Any = (), perf_mode: Any = matmul_perf_mode.none,
              name: Any = None) -> None:
    """``dst[M, N] (PSUM) (+)= stationary[K, M].T @ moving[K, N]``, fp32 accumulation."""
    target = current().target
    _tile("nc_matmul", "stationary", stationary, (MemoryRegion.sbuf,))
    _tile("nc_matmul", "moving", moving, (MemoryRegion.sbuf,))
    for operand, t in (("stationary", stationary), ("moving", moving)):
        if t.dtype not in _PE_DTYPES:
            raise _limit("nc_matmul", operand, f"dtype {t.dtype} is not a TensorE input dtype")
        if t.dtype == dt.float8_e4m3fn:
            require("float8_e4m3fn", "nisa.nc_matmul with float8_e4m3fn inputs")
    fp32 = {stationary.dtype in (dt.float32, dt.tfloat32), moving.dtype in (dt.float32, dt.tfloat32)}
    if len(fp32) == 2:
        raise _limit("nc_matmul", "stationary/moving", "if one input is float32/tfloat32 the other must be too")
    if {stationary.dtype, moving.dtype} == {dt.float8_e4m3, dt.float8_e4m3fn}:
        raise _limit("nc_matmul", "stationary/moving", "legacy float8_e4m3 and OCP float8_e4m3fn cannot be mixed")
    double = perf_mode is matmul_perf_mode.double_row or perf_mode == "double_row"
    if stationary.partitions != moving.partitions:
        raise _limit("nc_matmul", "stationary/moving", f"contraction (partition) sizes differ: "
                                                      f"{stationary.partitions} vs {moving.partitions}")
    k = stationary.partitions
    rows = tile_size[0] if tile_size else target.partitions
    if k > rows:
        raise _limit("nc_matmul", "stationary", f"contraction size {k} exceeds {rows}")
    if double:
        require("double_row_fp8", "nisa.nc_matmul perf_mode=double_row")
        if stationary.dtype not in dt.FP8 or moving.dtype not in dt.FP8:
            raise _limit("nc_matmul", "perf_mode", "double_row needs fp8 stationary and moving")
        if stationary.ndim < 3 or moving.ndim < 3 or stationary.shape[1] != 2 or moving.shape[1] != 2:
            raise _limit("nc_matmul", "perf_mode", "double_row needs [K, 2, M] stationary and [K, 2, N] moving")
        if tile_size and tile_size[1] != 128:
            raise _limit("nc_matmul", "perf_mode", "double_row cannot be combined with column tiling")
        st = values(stationary).reshape(k * 2, -1)  # contraction (k, 2) flattened
        mv = values(moving).reshape(k * 2, -1)
    else:
        st = values(stationary).reshape(k, -1)
        mv = values(moving).reshape(k, -1)
    m, n = st.shape[1], mv.shape[1]
    if m > target.partitions:
        raise _limit("nc_matmul", "stationary", f"free size {m} exceeds {target.partitions}")
    _psum_dst("nc_matmul", dst, n, is_transpose)
    if dst.partitions != m or dst.free_size != n:
        raise _limit("nc_matmul", "dst", f"shape {dst.shape} does not match [{m}, {n}]")
    if is_transpose:
        if dst.dtype != stationary.dtype and not (stationary.dtype in dt.FP8 and dt.itemsize(dst.dtype) == 2):
            raise _limit("nc_matmul", "dst", "transpose mode keeps the input dtype")
        _write(dst, st.T)
    else:
        _accumulate("nc_matmul", dst, st.T @ mv, accumulate)
    macs = k * (2 if double else 1) * m * n
    _record("nc_matmul", "tensor", [stationary, moving], dst, free=n, macs=macs,
            detail={"k": k, "m": m, "n": n, "fp32": bool(fp32 == {True}), "double_row": double,
                    "stationary": stationary.storage_id})


def nc_transpose(dst: NkiTensor, data: NkiTensor, engine: Any = engine.unknown, name: Any = None) -> None:
    """2-D transpose of partition and (flattened) free axes: TensorE (<= [128, 128], SBUF -> PSUM)
    or VectorE (<= [32, 32])."""
    default = "tensor" if (data.partitions > 32 or data.free_size > 32) else "vector"
    eng = _engine("nc_transpose", engine, default, ("tensor", "vector"))
    if dst.dtype != data.dtype:
        raise _limit("nc_transpose", "dst", f"dtype {dst.dtype} must equal data dtype {data.dtype}")
    if eng == "tensor":
        _tile("nc_transpose", "data", data, (MemoryRegion.sbuf,))
        _tile("nc_transpose", "dst", dst, (MemoryRegion.psum,))
        limit = current().target.partitions
    else:
        _tile("nc_transpose", "data", data)
        _tile("nc_transpose", "dst", dst)
        limit = 32
    if data.partitions > limit or data.free_size > limit:
        raise _limit("nc_transpose", "data", f"shape {data.shape} exceeds [{limit}, {limit}] on the {eng} engine")
    if dst.partitions != data.free_size or dst.free_size != data.partitions:
        raise _limit("nc_transpose", "dst", f"shape {dst.shape} is not the transpose of {data.shape}")
    _store(dst, data.data.reshape(data.partitions, -1).T)
    _record("nc_transpose", eng, [data], dst, free=data.partitions,
            detail={"k": data.partitions, "m": data.free_size, "n": data.partitions, "fp32": False,
                    "double_row": False, "stationary": data.storage_id})


def _mx_values(instr: str, data: NkiTensor, scale: NkiTensor, operand: str) -> np.ndarray:
    """Dequantise an MX operand [P, F] x4 with hardware-layout scales into [P, F, 4] fp32."""
    if data.dtype not in dt.PACKED_X4:
        raise _limit(instr, operand, f"dtype {data.dtype} is not an x4 packed MX dtype")
    if scale.dtype not in (dt.float8_e8m0fnu, dt.uint8):
        raise _limit(instr, f"{operand}_scale", f"dtype {scale.dtype} must be float8_e8m0fnu or uint8")
    p = data.partitions
    if p % 32 and p > 32 or p % 8:
        raise _limit(instr, operand, f"partition size {p} must be a multiple of 32 (or 8 within one quadrant)")
    f = data.free_size
    raw = scale.data.reshape(scale.partitions, -1)
    exps = raw.view(np.uint8).astype(np.int32) if scale.dtype == dt.float8_e8m0fnu else raw.astype(np.int32)
    # Scales live in the quadrant of their group: group g (8 partitions) -> partition g//4*32 + g%4.
    rows = [g // 4 * 32 + g % 4 if p > 32 else g for g in range(p // 8)]
    if max(rows) >= scale.partitions or exps.shape[1] < f:
        raise _limit(instr, f"{operand}_scale", f"shape {scale.shape} cannot hold the scales of a {data.shape} operand")
    factors = np.exp2(exps[rows, :f].astype(np.float32) - 127.0)  # [P/8, F]
    vals = data.data.reshape(p, f, 4).astype(np.float32)
    return vals * np.repeat(factors, 8, axis=0)[:, :, None]


def nc_matmul_mx(dst: NkiTensor, stationary: NkiTensor, moving: NkiTensor, stationary_scale: NkiTensor,
                 moving_scale: NkiTensor, tile_position: Any = None, tile_size: Any = None,
                 accumulate: Any = None, name: Any = None) -> None:
    """MXFP8/MXFP4 matmul with integrated dequantisation (NeuronCore-v4 only): contraction over
    the partition axis and the 4 packed values; 32-element scale groups (8 partitions x 4)."""
    require("nc_matmul_mx", "nisa.nc_matmul_mx")
    for operand, t in (("stationary", stationary), ("moving", moving), ("stationary_scale", stationary_scale),
                       ("moving_scale", moving_scale)):
        _tile("nc_matmul_mx", operand, t, (MemoryRegion.sbuf,))
    if stationary.partitions != moving.partitions:
        raise _limit("nc_matmul_mx", "stationary/moving", "partition sizes differ")
    if stationary.free_size > 128 or stationary.free_size % 2:
        raise _limit("nc_matmul_mx", "stationary", f"free size {stationary.free_size} must be even and <= 128")
    st = _mx_values("nc_matmul_mx", stationary, stationary_scale, "stationary")
    mv = _mx_values("nc_matmul_mx", moving, moving_scale, "moving")
    m, n, k = st.shape[1], mv.shape[1], stationary.partitions
    _psum_dst("nc_matmul_mx", dst, n, False)
    if dst.partitions != m or dst.free_size != n:
        raise _limit("nc_matmul_mx", "dst", f"shape {dst.shape} does not match [{m}, {n}]")
    result = np.einsum("kiq,kjq->ij", st, mv, dtype=np.float32)
    _accumulate("nc_matmul_mx", dst, result, accumulate)
    _record("nc_matmul_mx", "tensor", [stationary, moving, stationary_scale, moving_scale], dst, free=n,
            macs=k * 4 * m * n, detail={"k": k, "m": m, "n": n, "fp32": False, "double_row": False, "mx": True,
                                        "stationary": stationary.storage_id})


def quantize_mx(dst: NkiTensor, src: NkiTensor, dst_scale: NkiTensor, name: Any = None) -> None:
    """BF16/FP16 -> MXFP8 data and scales (NeuronCore-v4 VectorE). Scale of a 32-value group:
    ``2^(floor(log2(amax)) - (Emax - 1))`` (Emax 8 for e4m3fn, 15 for e5m2); 2^-127 for zeros."""
    require("quantize_mx", "nisa.quantize_mx")
    for operand, t in (("dst", dst), ("src", src), ("dst_scale", dst_scale)):
        _tile("quantize_mx", operand, t, (MemoryRegion.sbuf,))
    if src.dtype not in dt.SIXTEEN_BIT:
        raise _limit("quantize_mx", "src", f"dtype {src.dtype} must be bfloat16 or float16")
    if dst.dtype not in (dt.float8_e5m2_x4, dt.float8_e4m3fn_x4):
        raise _limit("quantize_mx", "dst", f"dtype {dst.dtype} must be float8_e5m2_x4 or float8_e4m3fn_x4")
    p, f = src.partitions, src.free_size
    if p % 32 and p > 32 or p % 8 or f % 4:
        raise _limit("quantize_mx", "src", f"shape {src.shape}: partitions must be a multiple of 32 and free a multiple of 4")
    if dst.partitions != p or dst.free_size * 4 != f:
        raise _limit("quantize_mx", "dst", f"shape {dst.shape} must be [{p}, {f // 4}]")
    emax = 8 if dst.dtype == dt.float8_e4m3fn_x4 else 15
    vals = values(src).reshape(p // 8, 8, f // 4, 4)
    amax = np.abs(vals).max(axis=(1, 3))
    with np.errstate(divide="ignore"):
        exp = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1.0))) - (emax - 1), -127.0)
    exp = np.clip(exp, -127, 127)
    scaled = vals / np.exp2(exp)[:, None, :, None]
    _write(dst, scaled.reshape(p, f // 4, 4))
    rows = [g // 4 * 32 + g % 4 if p > 32 else g for g in range(p // 8)]
    if max(rows) >= dst_scale.partitions or dst_scale.free_size < f // 4:
        raise _limit("quantize_mx", "dst_scale", f"shape {dst_scale.shape} cannot hold scales for {src.shape}")
    biased = (exp + 127).astype(np.uint8)
    scale_view = dst_scale.data.reshape(dst_scale.partitions, -1)
    if dst_scale.dtype == dt.float8_e8m0fnu:
        scale_view.view(np.uint8)[rows, : f // 4] = biased
    else:
        scale_view[rows, : f // 4] = biased
    _record("quantize_mx", "vector", [src], [dst, dst_scale], free=f, detail={"rate": 4})


# --- VectorE / ScalarE / GpSimd elementwise ------------------------------------------------------


def tensor_tensor(dst: NkiTensor, data1: NkiTensor, data2: NkiTensor, op: Op, engine: Any = engine.unknown,
                  name: Any = None) -> None:
    """``dst = data1 <op> data2`` elementwise (no broadcast), fp32 math."""
    eng = _engine("tensor_tensor", engine, "vector", ("vector", "gpsimd"))
    _two_inputs("tensor_tensor", dst, data1, data2, ("data1", "data2"))
    result = _apply(_op("tensor_tensor", op), _flat(data1), _flat(data2))
    _write(dst, result)
    _record("tensor_tensor", eng, [data1, data2], dst, inputs=2)


def tensor_scalar(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, reverse0: bool = False,
                  op1: Op | None = None, operand1: Any = None, reverse1: bool = False,
                  engine: Any = engine.unknown, name: Any = None) -> None:
    """``dst = (data <op0> operand0) <op1> operand1``; operands are scalars or [P, 1] tiles."""
    eng = _engine("tensor_scalar", engine, "vector", ("vector", "scalar", "gpsimd"))
    if eng == "scalar" and current().target.nc_version < 4:
        combo = (getattr(op0, "name", op0), getattr(op1, "name", None))
        if combo not in (("multiply", "add"), ("multiply", None), ("add", None)):
            raise _limit("tensor_scalar", "engine", f"scalar on NeuronCore-v3 runs only multiply(+add) or add, not "
                                                    f"{combo[0]}{'+' + combo[1] if combo[1] else ''}")
    _tile("tensor_scalar", "dst", dst)
    _tile("tensor_scalar", "data", data)
    _same_layout("tensor_scalar", dst, data, "dst and data")
    vals = _flat(data)
    a = _scalar_operand("tensor_scalar", "operand0", operand0, data.partitions)
    vals = _apply(_op("tensor_scalar", op0), a, vals) if reverse0 else _apply(op0, vals, a)
    if op1 is not None:
        b = _scalar_operand("tensor_scalar", "operand1", operand1, data.partitions)
        vals = _apply(_op("tensor_scalar", op1), b, vals) if reverse1 else _apply(op1, vals, b)
    _write(dst, vals)
    _record("tensor_scalar", eng, [data, operand0, operand1], dst)


def scalar_tensor_tensor(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, op1: Op, operand1: NkiTensor,
                         reverse0: bool = False, reverse1: bool = False, name: Any = None) -> None:
    """``dst = (data <op0> operand0) <op1> operand1`` with operand1 a full tile (VectorE)."""
    _two_inputs("scalar_tensor_tensor", dst, data, operand1, ("data", "operand1"))
    a = _scalar_operand("scalar_tensor_tensor", "operand0", operand0, data.partitions)
    vals = _flat(data)
    vals = _apply(_op("scalar_tensor_tensor", op0, ("arith",)), a, vals) if reverse0 else _apply(op0, vals, a)
    other = _flat(operand1)
    vals = _apply(_op("scalar_tensor_tensor", op1, ("arith",)), other, vals) if reverse1 else _apply(op1, vals, other)
    _write(dst, vals)
    _record("scalar_tensor_tensor", "vector", [data, operand0, operand1], dst, inputs=2)


def reciprocal(dst: NkiTensor, data: NkiTensor, name: Any = None) -> None:
    _tile("reciprocal", "dst", dst)
    _tile("reciprocal", "data", data)
    _same_layout("reciprocal", dst, data, "dst and data")
    with np.errstate(divide="ignore"):
        _write(dst, 1.0 / _flat(data))
    _record("reciprocal", "vector", [data], dst)


def _reduce_regs(eng: str, partitions: int) -> np.ndarray:
    regs = current().reduce_regs
    if eng not in regs:
        regs[eng] = np.zeros(128, dtype=np.float32)
    return regs[eng][:partitions]


def _bias_scale(instr: str, operand: str, value: Any, partitions: int) -> np.ndarray | float:
    if value is None:
        return 0.0
    return _scalar_operand(instr, operand, value, partitions)


def activation(dst: NkiTensor, op: Op, data: NkiTensor, bias: Any = None, scale: Any = 1.0, reduce_op: Any = None,
               reduce_res: NkiTensor | None = None, reduce_cmd: Any = _Cmd.idle, name: Any = None) -> None:
    """``dst = op(data * scale + bias)`` on ScalarE, with an optional add-reduce along the free axis
    into the engine's accumulator registers (``reduce_cmd``) and out to ``reduce_res``."""
    _tile("activation", "dst", dst)
    _tile("activation", "data", data)
    _same_layout("activation", dst, data, "dst and data")
    fn = _op("activation", op, ("activation", "arith"))
    vals = _flat(data) * _bias_scale("activation", "scale", 1.0 if scale is None else scale, data.partitions)
    vals = vals + _bias_scale("activation", "bias", bias, data.partitions)
    with np.errstate(all="ignore"):
        out = np.asarray(fn.fn(vals) if fn.arity == 1 else fn.fn(vals, 0.0), dtype=np.float32)
    _write(dst, out)
    regs = _reduce_regs("scalar", data.partitions)
    if reduce_cmd in (_Cmd.reset, _Cmd.reset_reduce):
        regs[...] = 0.0
    if reduce_op is not None or reduce_res is not None:
        if reduce_op is not None and getattr(reduce_op, "name", None) != "add":
            raise _limit("activation", "reduce_op", "must be nl.add")
        partial = out.reshape(data.partitions, -1).sum(axis=1, dtype=np.float32)
        if reduce_cmd in (_Cmd.reduce, _Cmd.reset_reduce):
            regs[...] += partial
        elif reduce_cmd is _Cmd.idle and reduce_res is not None:
            regs[...] = partial
    if reduce_res is not None:
        _tile("activation", "reduce_res", reduce_res)
        if reduce_res.partitions != data.partitions or reduce_res.free_size != 1:
            raise _limit("activation", "reduce_res", f"must be [{data.partitions}, 1], got {reduce_res.shape}")
        _write(reduce_res, regs.reshape(-1, 1))
    _record("activation", "scalar", [data, bias if isinstance(bias, NkiTensor) else None,
                                     scale if isinstance(scale, NkiTensor) else None],
            [dst] + ([reduce_res] if reduce_res is not None else []), free=data.free_size)


def activation_reduce(dst: NkiTensor, op: Op, data: NkiTensor, reduce_op: Op, reduce_res: NkiTensor,
                      bias: Any = None, scale: Any = 1.0, name: Any = None) -> None:
    """``activation`` with ``reduce_cmd=reset_reduce`` into ``reduce_res``."""
    activation(dst, op, data, bias=bias, scale=scale, reduce_op=reduce_op, reduce_res=reduce_res,
               reduce_cmd=_Cmd.reset_reduce)


def exponential(dst: NkiTensor, src: NkiTensor, max_value: Any = 0.0, reduce_res: NkiTensor | None = None,
                reduce_cmd: Any = _Cmd.idle, reduce_init: Any = 0.0, name: Any = None) -> None:
    """``dst = exp(src - max_value)`` with an optional running sum (NeuronCore-v4 VectorE only)."""
    require("exponential", "nisa.exponential")
    _tile("exponential", "dst", dst)
    _tile("exponential", "src", src)
    _same_layout("exponential", dst, src, "dst and src")
    shift = _scalar_operand("exponential", "max_value", max_value, src.partitions)
    with np.errstate(over="ignore"):
        out = np.exp(_flat(src) - shift).astype(np.float32)
    _write(dst, out)
    regs = _reduce_regs("vector", src.partitions)
    if reduce_cmd is _Cmd.reset_reduce:
        regs[...] = 0.0
    elif reduce_cmd is _Cmd.load_reduce:
        regs[...] = np.asarray(_scalar_operand("exponential", "reduce_init", reduce_init, src.partitions)).reshape(-1)
    if reduce_cmd in (_Cmd.reset_reduce, _Cmd.reduce, _Cmd.load_reduce):
        regs[...] += out.sum(axis=1, dtype=np.float32)
    if reduce_res is not None:
        _tile("exponential", "reduce_res", reduce_res)
        if reduce_res.partitions != src.partitions or reduce_res.free_size != 1:
            raise _limit("exponential", "reduce_res", f"must be [{src.partitions}, 1], got {reduce_res.shape}")
        _write(reduce_res, regs.reshape(-1, 1))
    _record("exponential", "vector", [src], dst, detail={"rate": "fast_exp"})


# --- reductions -----------------------------------------------------------------------------------


def tensor_reduce(dst: NkiTensor, op: Op, data: NkiTensor, axis: Any, negate: bool = False, keepdims: bool = False,
                  name: Any = None) -> None:
    """Reduce the trailing free axes ``axis`` of ``data`` with ``op`` (fp32 math)."""
    _tile("tensor_reduce", "dst", dst)
    _tile("tensor_reduce", "data", data)
    fn = _op("tensor_reduce", op)
    if fn.reduce is None:
        raise _limit("tensor_reduce", "op", f"nl.{fn.name} is not a reduction operator")
    axes = sorted(a % data.ndim for a in (axis if isinstance(axis, (tuple, list)) else (axis,)))
    if 0 in axes:
        raise _limit("tensor_reduce", "axis", "axis 0 (partitions) cannot be reduced; use tensor_partition_reduce")
    if axes != list(range(axes[0], data.ndim)):
        raise _limit("tensor_reduce", "axis", f"{tuple(axes)} must be the last contiguous free axes of {data.shape}")
    vals = values(data)
    out = fn.reduce(vals, axis=tuple(axes)) if fn.name != "average" else vals.mean(axis=tuple(axes))
    out = -out if negate else out
    if dst.partitions != data.partitions or dst.free_size != max(1, math.prod(out.shape[1:])):
        raise _limit("tensor_reduce", "dst", f"shape {dst.shape} does not fit the reduced shape {out.shape}")
    _write(dst, out)
    _record("tensor_reduce", "vector", [data], dst, free=data.free_size)


def tensor_partition_reduce(dst: NkiTensor, op: Op, data: NkiTensor, name: Any = None) -> None:
    """Reduce across partitions (GpSimd): ``dst[0, ...] = op over p of data[p, ...]``."""
    _tile("tensor_partition_reduce", "dst", dst, (MemoryRegion.sbuf,))
    _tile("tensor_partition_reduce", "data", data, (MemoryRegion.sbuf,))
    fn = _op("tensor_partition_reduce", op)
    vals = _flat(data)
    out = fn.reduce(vals, axis=0, keepdims=True) if fn.name != "average" else vals.mean(axis=0, keepdims=True)
    if dst.partitions != 1 or dst.free_size != data.free_size:
        raise _limit("tensor_partition_reduce", "dst", f"shape {dst.shape} must be [1, {data.free_size}]")
    _write(dst, out)
    _record("tensor_partition_reduce", "gpsimd", [data], dst, free=data.free_size * data.partitions)


def bn_stats(dst: NkiTensor, data: NkiTensor, name: Any = None) -> None:
    """Per partition: (count, mean, var*count) of the even and of the odd elements (<= 512 per partition)."""
    _tile("bn_stats", "dst", dst)
    _tile("bn_stats", "data", data)
    if data.free_size > 512:
        raise _limit("bn_stats", "data", f"has {data.free_size} elements per partition, more than 512 (bn_stats_fmax)")
    if dst.free_size != 6 or dst.partitions != data.partitions:
        raise _limit("bn_stats", "dst", f"shape {dst.shape} must be [{data.partitions}, 6]")
    vals = _flat(data)
    cols = []
    for part in (vals[:, 0::2], vals[:, 1::2]):
        count = part.shape[1]
        mean = part.mean(axis=1) if count else np.zeros(part.shape[0], np.float32)
        m2 = ((part - mean[:, None]) ** 2).sum(axis=1) if count else np.zeros(part.shape[0], np.float32)
        cols += [np.full(part.shape[0], count, np.float32), mean, m2]
    _write(dst, np.stack(cols, axis=1))
    _record("bn_stats", "vector", [data], dst, free=data.free_size)


def bn_aggr(dst: NkiTensor, data: NkiTensor, name: Any = None) -> None:
    """Combine (count, mean, var*count) triples into a mean and a (population) variance per partition."""
    _tile("bn_aggr", "dst", dst)
    _tile("bn_aggr", "data", data)
    if data.free_size % 3:
        raise _limit("bn_aggr", "data", f"{data.free_size} elements per partition is not a multiple of 3")
    if dst.free_size != 2 or dst.partitions != data.partitions:
        raise _limit("bn_aggr", "dst", f"shape {dst.shape} must be [{data.partitions}, 2]")
    triples = _flat(data).reshape(data.partitions, -1, 3).astype(np.float64)
    count, mean, m2 = triples[..., 0], triples[..., 1], triples[..., 2]
    total = count.sum(axis=1)
    grand = (count * mean).sum(axis=1) / np.maximum(total, 1)
    var = (m2 + count * (mean - grand[:, None]) ** 2).sum(axis=1) / np.maximum(total, 1)
    _write(dst, np.stack([grand, var], axis=1))
    _record("bn_aggr", "vector", [data], dst)


# --- selection ----------------------------------------------------------------------------------


def select_reduce(dst: NkiTensor, predicate: NkiTensor, on_true: NkiTensor, on_false: Any,
                  reduce_res: NkiTensor | None = None, reduce_cmd: Any = _Cmd.idle, reduce_op: Op = maximum,
                  reverse_pred: bool = False, name: Any = None) -> None:
    """``dst = where(predicate, on_true, on_false)`` with an optional max-reduce (VectorE)."""
    for operand, t in (("dst", dst), ("predicate", predicate), ("on_true", on_true)):
        _tile("select_reduce", operand, t)
    _same_layout("select_reduce", dst, on_true, "dst and on_true")
    _same_layout("select_reduce", predicate, on_true, "predicate and on_true")
    if predicate.dtype not in (dt.int8, dt.uint8, dt.int16, dt.uint16):
        raise _limit("select_reduce", "predicate", f"dtype {predicate.dtype} must be an 8- or 16-bit integer")
    pred = _flat(predicate) != 0
    pred = ~pred if reverse_pred else pred
    other = _scalar_operand("select_reduce", "on_false", on_false, on_true.partitions)
    out = np.where(pred, _flat(on_true), other).astype(np.float32)
    _write(dst, out)
    regs = _reduce_regs("vector", on_true.partitions)
    if reduce_cmd is _Cmd.reset_reduce:
        regs[...] = -np.inf
    if reduce_cmd in (_Cmd.reset_reduce, _Cmd.reduce):
        regs[...] = np.maximum(regs, out.max(axis=1))
    if reduce_res is not None:
        _write(reduce_res, regs.reshape(-1, 1))
    _record("select_reduce", "vector", [predicate, on_true], dst, inputs=2)


def tensor_copy_predicated(dst: NkiTensor, src: Any, predicate: NkiTensor, reverse_pred: bool = False,
                           name: Any = None) -> None:
    """Copy ``src`` (tile or scalar) into ``dst`` where ``predicate`` is true; elsewhere dst is kept."""
    _tile("tensor_copy_predicated", "dst", dst)
    _tile("tensor_copy_predicated", "predicate", predicate)
    _same_layout("tensor_copy_predicated", dst, predicate, "dst and predicate")
    if predicate.dtype not in (dt.uint8, dt.uint16, dt.uint32):
        raise _limit("tensor_copy_predicated", "predicate", f"dtype {predicate.dtype} must be uint8, uint16 or uint32")
    if isinstance(src, NkiTensor):
        _tile("tensor_copy_predicated", "src", src)
        _same_layout("tensor_copy_predicated", dst, src, "dst and src")
        if src.dtype != dst.dtype:
            raise _limit("tensor_copy_predicated", "src", f"dtype {src.dtype} must equal dst dtype {dst.dtype}")
        new = _flat(src)
    else:
        new = np.float32(src)
    pred = _flat(predicate) != 0
    pred = ~pred if reverse_pred else pred
    _write(dst, np.where(pred, new, _flat(dst)))
    _record("tensor_copy_predicated", "vector", [src, predicate], dst, inputs=2)


def _fp32_rows(instr: str, t: NkiTensor) -> np.ndarray:
    rows = _flat(t)
    if not 8 <= rows.shape[1] <= 16384:
        raise _limit(instr, "data", f"has {rows.shape[1]} elements per partition; allowed 8 to 16384")
    return rows


def max8(dst: NkiTensor, src: NkiTensor, name: Any = None) -> None:
    """The 8 largest values per partition, in descending order (computed in fp32)."""
    _tile("max8", "dst", dst)
    _tile("max8", "src", src)
    rows = _fp32_rows("max8", src)
    if dst.partitions != src.partitions or dst.free_size != 8:
        raise _limit("max8", "dst", f"shape {dst.shape} must be [{src.partitions}, 8]")
    _write(dst, -np.sort(-rows, axis=1)[:, :8])
    _record("max8", "vector", [src], dst, free=rows.shape[1])


def nc_find_index8(dst: NkiTensor, data: NkiTensor, vals: NkiTensor, name: Any = None) -> None:
    """Index of the first occurrence of each of the 8 ``vals`` per partition (all-ones if absent).
    Duplicate vals take successive occurrences in ascending order."""
    _tile("nc_find_index8", "dst", dst)
    rows = _fp32_rows("nc_find_index8", _tile("nc_find_index8", "data", data))
    wanted = _flat(_tile("nc_find_index8", "vals", vals))
    if wanted.shape[1] != 8 or dst.free_size != 8:
        raise _limit("nc_find_index8", "vals/dst", "must have exactly 8 elements per partition")
    if dst.dtype not in (dt.uint32, dt.uint16):
        raise _limit("nc_find_index8", "dst", f"dtype {dst.dtype} must be uint32 or uint16")
    sentinel = 0xFFFFFFFF if dst.dtype == dt.uint32 else 0xFFFF
    out = np.full((rows.shape[0], 8), sentinel, dtype=np.int64)
    for p in range(rows.shape[0]):
        used: set[int] = set()
        for j in range(8):
            hits = [int(i) for i in np.flatnonzero(rows[p] == wanted[p, j]) if int(i) not in used]
            if hits:
                out[p, j] = hits[0]
                used.add(hits[0])
    _store(dst, out.astype(dt.STORAGE[dst.dtype]))
    _record("nc_find_index8", "vector", [data, vals], dst, free=rows.shape[1])


def nc_match_replace8(dst: NkiTensor, data: NkiTensor, vals: NkiTensor, imm: float, dst_idx: NkiTensor | None = None,
                      name: Any = None) -> None:
    """Replace the first occurrence of each of the 8 ``vals`` with ``imm``; optionally write their
    indices. Duplicate vals are processed from slot 7 down to 0."""
    _tile("nc_match_replace8", "dst", dst)
    rows = _fp32_rows("nc_match_replace8", _tile("nc_match_replace8", "data", data)).copy()
    wanted = _flat(_tile("nc_match_replace8", "vals", vals))
    _same_layout("nc_match_replace8", dst, data, "dst and data")
    idx = np.zeros((rows.shape[0], 8), dtype=np.int64)
    for p in range(rows.shape[0]):
        for j in range(7, -1, -1):
            hits = np.flatnonzero(rows[p] == wanted[p, j])
            if hits.size:
                idx[p, j] = hits[0]
                rows[p, hits[0]] = imm
    _write(dst, rows)
    if dst_idx is not None:
        _tile("nc_match_replace8", "dst_idx", dst_idx)
        _store(dst_idx, idx.astype(dt.STORAGE[dst_idx.dtype]))
    _record("nc_match_replace8", "vector", [data, vals], [dst] + ([dst_idx] if dst_idx is not None else []),
            free=rows.shape[1])


def topk(val_dst: NkiTensor, idx_dst: NkiTensor, src: NkiTensor, n: int, name: Any = None) -> None:
    """Top-K (K = val_dst free size) of ``n`` BF16 values laid out as a 16-partition snake
    (element i at partition i % 16, column i // 16, within each 16-partition group); values in
    ascending order (GpSimd)."""
    for operand, t in (("val_dst", val_dst), ("idx_dst", idx_dst), ("src", src)):
        _tile("topk", operand, t, (MemoryRegion.sbuf,))
    if src.dtype != dt.bfloat16 or val_dst.dtype != dt.bfloat16 or idx_dst.dtype != dt.uint32:
        raise _limit("topk", "dtypes", "src and val_dst must be bfloat16, idx_dst uint32")
    k = val_dst.free_size
    if not 8 <= n < 65536 or not 1 <= k <= n or src.partitions % 16 or src.free_size * 16 < n:
        raise _limit("topk", "n/K/src", f"need 8 <= n < 65536, 1 <= K <= n, partitions a multiple of 16 and "
                                        f"src free >= ceil(n/16); got n={n}, K={k}, src {src.shape}")
    grid = _flat(src)
    vals_out = np.zeros((src.partitions, k), np.float32)
    idx_out = np.zeros((src.partitions, k), np.int64)
    for g in range(src.partitions // 16):
        snake = grid[g * 16:(g + 1) * 16].T.reshape(-1)[:n]
        order = np.argsort(-snake, kind="stable")[:k][::-1]
        vals_out[g * 16:(g + 1) * 16] = snake[order]
        idx_out[g * 16:(g + 1) * 16] = order
    _write(val_dst, vals_out)
    _store(idx_dst, idx_out.astype(np.uint32))
    _record("topk", "gpsimd", [src], [val_dst, idx_dst], free=4 * n + k)


def nc_stream_shuffle(dst: NkiTensor, src: NkiTensor, shuffle_mask: Sequence[int], name: Any = None) -> None:
    """Within each 32-partition quadrant, ``dst[i] = src[mask[i]]`` (255 leaves dst[i] unchanged)."""
    _tile("nc_stream_shuffle", "dst", dst)
    _tile("nc_stream_shuffle", "src", src)
    mask = [int(m) for m in shuffle_mask]
    if len(mask) != 32:
        raise _limit("nc_stream_shuffle", "shuffle_mask", f"has {len(mask)} entries, must have 32")
    if dst.dtype != src.dtype or dst.free_size != src.free_size:
        raise _limit("nc_stream_shuffle", "dst/src", "must share dtype and elements per partition")
    s_rows = src.data.reshape(src.partitions, -1)
    out = dst.data.reshape(dst.partitions, -1).copy()
    for quad in range(0, max(dst.partitions, 1), 32):
        for i, m in enumerate(mask):
            p = quad + i
            if m == 255 or p >= dst.partitions:
                continue
            if quad + m >= src.partitions and m >= src.partitions:
                raise _limit("nc_stream_shuffle", "shuffle_mask", f"entry {i} reads partition {m} past src's {src.partitions}")
            out[p] = s_rows[min(quad + m, src.partitions - 1) if src.partitions > 32 else m]
    _store(dst, out)
    _record("nc_stream_shuffle", "vector", [src], dst)


# --- registers (dynamic control flow) -----------------------------------------------------------


def register_alloc(x: int | None = None) -> VirtualRegister:
    """A new engine register, optionally initialised to ``x``."""
    return VirtualRegister(0 if x is None else x)


def register_move(dst: VirtualRegister, src: Any) -> None:
    """``dst = src`` (an immediate or another register)."""
    dst.value = _scalar(src)


def register_load(dst: VirtualRegister, src: NkiTensor) -> None:
    """Load the single value of a [1, 1] SBUF (or HBM) tensor into ``dst``."""
    if not isinstance(src, NkiTensor) or src.data.size != 1:
        raise _limit("register_load", "src", f"must be a single-element tensor, got {src!r}")
    dst.value = int(np.asarray(src.data, dtype=np.float64).reshape(-1)[0])
    current().record(Instruction("register_load", "scalar", (src.storage_id,), (), 1, 1))


def register_store(dst: NkiTensor, src: VirtualRegister) -> None:
    """Store a register's value into a [1, 1] SBUF tensor."""
    _write(dst, np.full(dst.data.shape, float(src.value)))
    current().record(Instruction("register_store", "scalar", (), (dst.storage_id,), 1, 1))


# --- LNC=2: the two programs of a kernel[2] -------------------------------------------------------


def _lnc(instr: str) -> Any:
    s = current()
    if s.target.nc_version < 3:
        raise _limit(instr, "target", "needs NeuronCore-v3 or newer")
    if s.lnc is None:
        raise _limit(instr, "kernel", "synchronises the programs of an LNC=2 kernel; launch it as kernel[2](...)")
    return s


def core_barrier(data: NkiTensor, cores: Any, engine: Any = engine.gpsimd, name: Any = None) -> None:
    """Wait until both programs of the LNC=2 kernel reach this barrier (on ``data`` in shared HBM)."""
    s = _lnc("core_barrier")
    _tile("core_barrier", "data", data, (MemoryRegion.shared_hbm,))
    if tuple(cores) != (0, 1):
        raise _limit("core_barrier", "cores", f"{tuple(cores)} is not supported; only (0, 1)")
    eng = _engine("core_barrier", engine, "gpsimd", ("gpsimd", "vector", "scalar", "tensor", "sync"))
    current().record(Instruction("core_barrier", eng, (data.storage_id,), (), 0, 0, 0))
    s.lnc.barrier(s.program_id, "nisa.core_barrier")


def sendrecv(src: NkiTensor, dst: NkiTensor, send_to_rank: int, recv_from_rank: int, pipe_id: int,
             dma_engine: Any = dma_engine.dma, name: Any = None) -> None:
    """Send ``src`` to program ``send_to_rank``'s ``dst`` while receiving program
    ``recv_from_rank``'s ``src`` into this program's ``dst`` (SBUF to SBUF)."""
    s = _lnc("sendrecv")
    _tile("sendrecv", "src", src, (MemoryRegion.sbuf,))
    _tile("sendrecv", "dst", dst, (MemoryRegion.sbuf,))
    if src.shape != dst.shape or src.dtype != dst.dtype:
        raise _limit("sendrecv", "src/dst", f"must share shape and dtype: {src!r} vs {dst!r}")
    for operand, rank in (("send_to_rank", send_to_rank), ("recv_from_rank", recv_from_rank)):
        if int(rank) not in range(s.num_programs):
            raise _limit("sendrecv", operand, f"{rank} is not a program of this LNC={s.num_programs} kernel")
    if dma_engine is _DmaEngine.gpsimd_dma:
        per_partition = src.free_size * dt.itemsize(src.dtype)
        if src.partitions % 16 or per_partition > 256 * dt.itemsize(src.dtype):
            raise _limit("sendrecv", "src", "with gpsimd_dma needs partitions a multiple of 16 and at most "
                                            "1024/512/256 B per partition for 32/16/8-bit dtypes")
    s.lnc.send(int(send_to_rank), int(pipe_id), src.data.copy())
    received = s.lnc.receive(s.program_id, int(pipe_id), "nisa.sendrecv")
    _store(dst, received)
    _record("sendrecv", "dma", [src], dst, bytes=src.nbytes, contiguous=int(src.free_size * dt.itemsize(src.dtype)))


# --- further VectorE / GpSimd instructions --------------------------------------------------------


def tensor_scalar_reduce(dst: NkiTensor, data: NkiTensor, op0: Op, operand0: Any, reduce_op: Op, reduce_res: NkiTensor,
                         reverse0: bool = False, name: Any = None) -> None:
    """``dst = data <op0> operand0`` and ``reduce_res = reduce_op`` over all free elements of dst."""
    if reverse0:
        raise _limit("tensor_scalar_reduce", "reverse0", "is documented as not supported yet")
    _tile("tensor_scalar_reduce", "dst", dst)
    _tile("tensor_scalar_reduce", "data", data)
    _tile("tensor_scalar_reduce", "reduce_res", reduce_res)
    _same_layout("tensor_scalar_reduce", dst, data, "dst and data")
    if reduce_res.partitions != data.partitions or reduce_res.free_size != 1:
        raise _limit("tensor_scalar_reduce", "reduce_res", f"must be [{data.partitions}, 1], got {reduce_res.shape}")
    red = _op("tensor_scalar_reduce", reduce_op, ("arith",))
    if red.reduce is None or red.name not in ("add", "subtract", "multiply", "maximum", "minimum"):
        raise _limit("tensor_scalar_reduce", "reduce_op", f"nl.{red.name} is not add, subtract, multiply, max or min")
    a = _scalar_operand("tensor_scalar_reduce", "operand0", operand0, data.partitions)
    vals = _apply(_op("tensor_scalar_reduce", op0, ("arith",)), _flat(data), a)
    _write(dst, vals)
    _write(reduce_res, red.reduce(vals, axis=1).reshape(-1, 1))
    _record("tensor_scalar_reduce", "vector", [data, operand0], [dst, reduce_res], free=data.free_size)


def _initial(instr: str, value: Any, partitions: int) -> np.ndarray:
    return np.broadcast_to(np.asarray(_scalar_operand(instr, "initial", value, partitions), dtype=np.float32),
                           (partitions, 1)).reshape(partitions)


def tensor_tensor_scan(dst: NkiTensor, data0: NkiTensor, data1: NkiTensor, initial: Any, op0: Op, op1: Op,
                       reverse0: bool = False, reverse1: bool = False, name: Any = None) -> None:
    """Per partition: ``r[i] = op1(op0(data0[i], r[i-1]), data1[i])`` with ``r[-1] = initial`` (fp32)."""
    _two_inputs("tensor_tensor_scan", dst, data0, data1, ("data0", "data1"))
    f0, f1 = _op("tensor_tensor_scan", op0, ("arith",)), _op("tensor_tensor_scan", op1, ("arith",))
    a, b = _flat(data0), _flat(data1)
    out = np.empty_like(a, dtype=np.float32)
    prev = _initial("tensor_tensor_scan", initial, data0.partitions)
    for i in range(a.shape[1]):
        step = _apply(f0, prev, a[:, i]) if reverse0 else _apply(f0, a[:, i], prev)
        prev = _apply(f1, b[:, i], step) if reverse1 else _apply(f1, step, b[:, i])
        out[:, i] = prev
    _write(dst, out)
    _record("tensor_tensor_scan", "vector", [data0, data1], dst, inputs=2)


_CUMULATIVE_START = {"add": 0.0, "subtract": 0.0, "multiply": 1.0, "maximum": -np.inf, "minimum": np.inf}


def tensor_scalar_cumulative(dst: NkiTensor, src: NkiTensor, op0: Op, op1: Op, imm0: Any, imm1: Any = None,
                             reduce_cmd: Any = reduce_cmd.reset_reduce, name: Any = None) -> None:
    """Per partition: ``reg = op1(op0(src[i], imm0), reg); dst[i] = reg`` with the VectorE
    accumulator set by ``reduce_cmd`` (reset to op1's identity, load ``imm1``, or continue)."""
    _tile("tensor_scalar_cumulative", "dst", dst)
    _tile("tensor_scalar_cumulative", "src", src)
    _same_layout("tensor_scalar_cumulative", dst, src, "dst and src")
    for operand, t in (("dst", dst), ("src", src)):
        if t.dtype in (dt.int32, dt.uint32):
            raise _limit("tensor_scalar_cumulative", operand, f"dtype {t.dtype} is not supported (ISA limitation)")
    f0 = _op("tensor_scalar_cumulative", op0, ("arith",))
    f1 = _op("tensor_scalar_cumulative", op1, ("arith",))
    if f1.name not in _CUMULATIVE_START:
        raise _limit("tensor_scalar_cumulative", "op1", f"nl.{f1.name} is not add, subtract, multiply, max or min")
    regs = _reduce_regs("vector", src.partitions)
    if reduce_cmd is _Cmd.reset_reduce:
        regs[...] = _CUMULATIVE_START[f1.name]
    elif reduce_cmd is _Cmd.load_reduce:
        regs[...] = _initial("tensor_scalar_cumulative", imm1, src.partitions)
    elif reduce_cmd is not _Cmd.reduce:
        raise _limit("tensor_scalar_cumulative", "reduce_cmd", f"{reduce_cmd} is not reset_reduce, load_reduce or reduce")
    scaled = _apply(f0, _flat(src), _scalar_operand("tensor_scalar_cumulative", "imm0", imm0, src.partitions))
    out = np.empty_like(scaled, dtype=np.float32)
    for i in range(scaled.shape[1]):
        regs[...] = _apply(f1, scaled[:, i], regs)
        out[:, i] = regs
    _write(dst, out)
    _record("tensor_scalar_cumulative", "vector", [src], dst)


def range_select(dst: NkiTensor, on_true_tile: NkiTensor, comp_op0: Op, comp_op1: Op, bound0: NkiTensor,
                 bound1: NkiTensor, reduce_cmd: Any = reduce_cmd.reset_reduce, reduce_res: NkiTensor | None = None,
                 reduce_op: Op = maximum, range_start: Any = 0, on_false_value: float = -3.4028235e+38,
                 name: Any = None) -> None:
    """``dst = on_true_tile where comp_op0(i, bound0) and comp_op1(i, bound1) else on_false_value``
    (``i`` = range_start + free index, fp32), with a max-reduce into ``reduce_res`` (NeuronCore-v3+)."""
    if current().target.nc_version < 3:
        raise _limit("range_select", "target", "needs NeuronCore-v3 or newer")
    for operand, t in (("dst", dst), ("on_true_tile", on_true_tile), ("bound0", bound0), ("bound1", bound1)):
        _tile("range_select", operand, t)
    _same_layout("range_select", dst, on_true_tile, "dst and on_true_tile")
    if on_true_tile.dtype in dt.INTEGER:
        raise _limit("range_select", "on_true_tile", f"dtype {on_true_tile.dtype} must be a float dtype")
    c0 = _op("range_select", comp_op0, ("compare",))
    c1 = _op("range_select", comp_op1, ("compare",))
    if _op("range_select", reduce_op).name != "maximum":
        raise _limit("range_select", "reduce_op", "must be nl.maximum")
    b0 = _scalar_operand("range_select", "bound0", bound0, on_true_tile.partitions)
    b1 = _scalar_operand("range_select", "bound1", bound1, on_true_tile.partitions)
    index = np.float32(_scalar(range_start)) + np.arange(on_true_tile.free_size, dtype=np.float32)[None, :]
    mask = (_apply(c0, index, b0) != 0) & (_apply(c1, index, b1) != 0)
    out = np.where(mask, _flat(on_true_tile), np.float32(on_false_value)).astype(np.float32)
    _write(dst, out)
    regs = _reduce_regs("vector", on_true_tile.partitions)
    if reduce_cmd in (_Cmd.reset, _Cmd.reset_reduce):
        regs[...] = -np.inf
    if reduce_cmd in (_Cmd.reduce, _Cmd.reset_reduce):
        regs[...] = np.maximum(regs, values(dst).reshape(dst.partitions, -1).max(axis=1))
    if reduce_res is not None:
        _tile("range_select", "reduce_res", reduce_res)
        _write(reduce_res, regs.reshape(-1, 1))
    _record("range_select", "vector", [on_true_tile, bound0, bound1], [dst] + ([reduce_res] if reduce_res else []))


def nc_n_gather(dst: NkiTensor, data: NkiTensor, indices: NkiTensor, name: Any = None) -> None:
    """Per partition, ``dst[p, j] = data[p].flatten()[indices[p, j]]`` (GpSimd, SBUF only)."""
    for operand, t in (("dst", dst), ("data", data), ("indices", indices)):
        _tile("nc_n_gather", operand, t, (MemoryRegion.sbuf,))
    if indices.dtype != dt.uint32:
        raise _limit("nc_n_gather", "indices", f"dtype {indices.dtype} must be uint32")
    if dst.dtype != data.dtype:
        raise _limit("nc_n_gather", "dst", f"dtype {dst.dtype} must equal data dtype {data.dtype}")
    if not dst.partitions == data.partitions == indices.partitions or dst.free_size != indices.free_size:
        raise _limit("nc_n_gather", "dst/indices", "need the same partitions and elements per partition")
    idx = indices.data.reshape(indices.partitions, -1).astype(np.int64)
    if idx.size and (idx.min() < 0 or idx.max() >= data.free_size):
        raise _limit("nc_n_gather", "indices", f"values must lie in [0, {data.free_size})")
    _store(dst, np.take_along_axis(data.data.reshape(data.partitions, -1), idx, axis=1))
    _record("nc_n_gather", "gpsimd", [data, indices], dst)


def nonzero_with_count(dst: NkiTensor, src: NkiTensor, index_offset: int = 0, padding_val: int = -1,
                       name: Any = None) -> None:
    """On partitions 0, 16, ..., 112: the indices (+ index_offset) of src's nonzero elements, then
    ``padding_val``, then their count in the last slot; other partitions of dst are kept."""
    if current().target.nc_version < 3:
        raise _limit("nonzero_with_count", "target", "needs NeuronCore-v3 or newer")
    _tile("nonzero_with_count", "dst", dst, (MemoryRegion.sbuf,))
    _tile("nonzero_with_count", "src", src, (MemoryRegion.sbuf,))
    if src.dtype not in (dt.float32, dt.int32) or dst.dtype != dt.int32:
        raise _limit("nonzero_with_count", "dtypes", "src must be float32 or int32 and dst int32")
    if dst.partitions != src.partitions or dst.free_size != src.free_size + 1:
        raise _limit("nonzero_with_count", "dst", f"must be [{src.partitions}, {src.free_size + 1}], got {dst.shape}")
    rows = _flat(src)
    out = dst.data.reshape(dst.partitions, -1).copy()
    for p in range(0, src.partitions, 16):
        hits = np.flatnonzero(rows[p] != 0)
        out[p, :] = padding_val
        out[p, :hits.size] = hits + int(index_offset)
        out[p, -1] = hits.size
    _store(dst, out)
    _record("nonzero_with_count", "gpsimd", [src], dst)


def dma_compute(dst: NkiTensor, srcs: Sequence[NkiTensor], reduce_op: Op, scales: Any = None,
                unique_indices: bool = True, name: Any = None) -> None:
    """``dst = srcs[0] + srcs[1] + ...`` computed in fp32 by the DMA engines (scatter/gather
    read-modify-write when a source is an indirect access pattern)."""
    if _op("dma_compute", reduce_op).name != "add":
        raise _limit("dma_compute", "reduce_op", "only nl.add is supported")
    if scales is not None and any(float(x) != 1.0 for x in scales):
        raise _limit("dma_compute", "scales", "must all be 1.0 (or None)")
    if not unique_indices:
        raise _limit("dma_compute", "unique_indices", "must be True (non-unique indices are not supported)")
    allowed = (MemoryRegion.sbuf, MemoryRegion.hbm, MemoryRegion.shared_hbm, MemoryRegion.private_hbm)
    _tile("dma_compute", "dst", dst, allowed)
    for k, src in enumerate(srcs):
        _tile("dma_compute", f"srcs[{k}]", src, allowed)
        if math.prod(src.shape) != math.prod(dst.shape):
            raise _limit("dma_compute", f"srcs[{k}]", f"element count differs from dst: {src.shape} vs {dst.shape}")
    total = sum(values(src).reshape(dst.data.shape) for src in srcs)
    _write(dst, total)
    nbytes = sum(src.nbytes for src in srcs)
    _record("dma_compute", "dma", list(srcs), dst, bytes=nbytes + dst.nbytes, contiguous=_contiguous_bytes(dst),
            hbm_read=sum(s.nbytes for s in srcs if not s.buffer.on_chip),
            hbm_write=dst.nbytes if not dst.buffer.on_chip else 0)


def dropout(dst: NkiTensor, data: NkiTensor, prob: Any, name: Any = None) -> None:
    """Zero each element of ``data`` with probability ``prob`` (scalar or [P, 1]); the program's
    generator draws the decisions, not the hardware PRNG."""
    _tile("dropout", "dst", dst)
    _tile("dropout", "data", data)
    _same_layout("dropout", dst, data, "dst and data")
    if dst.dtype != data.dtype:
        raise _limit("dropout", "dst", f"dtype {dst.dtype} must equal data dtype {data.dtype}")
    p = _scalar_operand("dropout", "prob", prob, data.partitions)
    rows = _flat(data)
    keep = current().rng.random(rows.shape, dtype=np.float32) >= p
    _write(dst, np.where(keep, rows, 0.0))
    _record("dropout", "vector", [data, prob], dst)


_INT_BITS = (dt.int8, dt.int16, dt.int32, dt.uint8, dt.uint16, dt.uint32)


def rng(dst: NkiTensor, engine: Any = engine.unknown, name: Any = None) -> None:
    """Random bits (the low bits of 32 per element) from the program's generator, not the
    hardware XORWOW sequence."""
    eng = _engine("rng", engine, "vector", ("vector", "gpsimd"))
    _tile("rng", "dst", dst, (MemoryRegion.sbuf,) if eng == "gpsimd" else (MemoryRegion.sbuf, MemoryRegion.psum))
    if dst.dtype not in _INT_BITS:
        raise _limit("rng", "dst", f"dtype {dst.dtype} must be an integer type")
    bits = current().rng.integers(0, 2**32, size=dst.data.shape, dtype=np.uint64)
    _store(dst, (bits & np.uint64(2 ** (8 * dt.STORAGE[dst.dtype].itemsize) - 1)).astype(dt.STORAGE[dst.dtype]))
    _record("rng", eng, [], dst, inputs=0)


def rand2(dst: NkiTensor, min: Any, max: Any, name: Any = None) -> None:  # noqa: A002
    """Uniform random values in [min, max) (scalars or [P, 1] tiles) from the program's generator."""
    _tile("rand2", "dst", dst)
    lo = _scalar_operand("rand2", "min", min, dst.partitions)
    hi = _scalar_operand("rand2", "max", max, dst.partitions)
    u = current().rng.random((dst.partitions, dst.free_size), dtype=np.float32)
    _write(dst, lo + u * (np.asarray(hi) - np.asarray(lo)))
    _record("rand2", "vector", [min, max], dst, inputs=0)


def set_rng_seed(src_seeds: NkiTensor, name: Any = None) -> None:
    """Seed the program's generator from a [1, 1] 32-bit tile (same seed, same sequence)."""
    _tile("set_rng_seed", "src_seeds", src_seeds)
    if src_seeds.data.size != 1 or dt.itemsize(src_seeds.dtype) != 4:
        raise _limit("set_rng_seed", "src_seeds", f"must be a [1, 1] 32-bit tile, got {src_seeds!r}")
    current().rng = np.random.default_rng(int(np.asarray(src_seeds.data).reshape(-1)[0]))
    current().record(Instruction("set_rng_seed", "vector", (src_seeds.storage_id,), (), 1, 1))


def rand_get_state(dst: NkiTensor, engine: Any = engine.unknown, name: Any = None) -> None:
    raise not_emulated("nisa.rand_get_state", "the engines' XORWOW generator state has no equivalent in the "
                                              "emulator's generator (seed with nisa.set_rng_seed instead)")


def rand_set_state(src_seeds: NkiTensor, engine: Any = engine.unknown, name: Any = None) -> None:
    raise not_emulated("nisa.rand_set_state", "the engines' XORWOW generator state has no equivalent in the "
                                              "emulator's generator (seed with nisa.set_rng_seed instead)")


def local_gather(dst: NkiTensor, src_buffer: NkiTensor, index: NkiTensor, num_elem_per_idx: int = 1,
                 num_valid_indices: Any = None, name: Any = None) -> None:
    raise not_emulated("nisa.local_gather", "the layout of its output across the 16 partitions of each GpSimd "
                                            "core is not specified by the 0.3.0 API documentation")


def sequence_bounds(dst: NkiTensor, segment_ids: NkiTensor, name: Any = None) -> None:
    raise not_emulated("nisa.sequence_bounds", "whether a segment's end index is inclusive is not specified by "
                                               "the 0.3.0 API documentation")
