"""Emulated ``nki.language`` (``nl``): dtypes, buffers, tensor creation, loops, math operators.

Operators such as ``nl.add`` or ``nl.exp`` serve both as the ``op=`` argument of ``nisa``
instructions and, called directly, as the value-returning convenience API (a new SBUF tile).
"""

from __future__ import annotations

import builtins
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np

from nkimoe.nki.emulator import dtypes as _dt
from nkimoe.nki.emulator.core import (
    DynSlice,
    EmulatorError,
    Instruction,
    MemoryRegion,
    NkiTensor,
    VirtualRegister,
    current,
    region,
)
from nkimoe.nki.emulator.dtypes import (  # noqa: F401  (re-exported as nl.<dtype>)
    bfloat16,
    bool_,
    float4_e2m1fn_x4,
    float8_e4m3,
    float8_e4m3fn,
    float8_e4m3fn_x4,
    float8_e5m2,
    float8_e5m2_x4,
    float8_e8m0fnu,
    float16,
    float32,
    int8,
    int16,
    int32,
    tfloat32,
    uint8,
    uint16,
    uint32,
)

sbuf = MemoryRegion.sbuf
psum = MemoryRegion.psum
hbm = MemoryRegion.hbm
private_hbm = MemoryRegion.private_hbm
shared_hbm = MemoryRegion.shared_hbm


def is_hbm(buffer: Any) -> bool:
    return not region(buffer).on_chip


def is_on_chip(buffer: Any) -> bool:
    return region(buffer).on_chip


def is_psum(buffer: Any) -> bool:
    return region(buffer) is MemoryRegion.psum


def is_sbuf(buffer: Any) -> bool:
    return region(buffer) is MemoryRegion.sbuf


class _TileSize:
    """``nl.tile_size``: hardware tile constants of the emulated target."""

    pmax = 128
    psum_bank_fmax = 512  # fp32 elements per PSUM bank per partition (2 KiB)
    psum_fmax = 512  # deprecated alias of psum_bank_fmax
    psum_bank_fmax_bytes = 2048
    gemm_stationary_fmax = 128
    gemm_moving_fmax = 512
    bn_stats_fmax = 512
    psum_min_align = 4
    sbuf_min_align = 1

    @property
    def psum_num_banks(self) -> int:
        return current().target.psum_banks

    @property
    def sbuf_fmax_bytes(self) -> int:
        return current().target.sbuf_usable_bytes_per_partition

    @property
    def sbuf_fmax(self) -> int:
        return self.sbuf_fmax_bytes // 4

    @property
    def sbuf_size_bytes(self) -> int:
        t = current().target
        return t.partitions * t.sbuf_bytes_per_partition

    @property
    def total_available_sbuf_size(self) -> int:
        return self.sbuf_fmax_bytes


tile_size = _TileSize()


# --- operators ----------------------------------------------------------------------------------


class Op:
    """An ALU operator or activation function usable as ``op=`` and callable as ``nl.<name>(...)``."""

    def __init__(self, name: str, fn: Callable[..., np.ndarray], arity: int, kind: str,
                 reduce: Callable[..., np.ndarray] | None = None, identity: float | None = None) -> None:
        self.name, self.fn, self.arity, self.kind, self.reduce, self.identity = name, fn, arity, kind, reduce, identity

    def __repr__(self) -> str:
        return f"nl.{self.name}"

    def __call__(self, x: Any, y: Any = None, dtype: Any = None) -> NkiTensor:
        inputs = [x] if self.arity == 1 else [x, y]
        tiles = [t for t in inputs if isinstance(t, NkiTensor)]
        if not tiles:
            raise EmulatorError(f"nl.{self.name}: at least one argument must be a tile")
        vals = [_values(t) if isinstance(t, NkiTensor) else np.float32(t) for t in inputs]
        result = self.fn(*vals)
        out_dtype = _dt.normalize(dtype) if dtype is not None else tiles[0].dtype
        shape = np.broadcast_shapes(*(t.shape for t in tiles))
        return _new_tile(shape, out_dtype, np.broadcast_to(result, shape), self.name, tiles)


def values(t: NkiTensor) -> np.ndarray:
    """The tensor's values as float32 (integers as float64, x4 types unpacked in the last axis)."""
    if t.dtype in _dt.INTEGER:
        return t.data.astype(np.float64)
    return t.data.astype(np.float32)


_values = values


def _new_tile(shape: Sequence[int], dtype: str, vals: np.ndarray, name: str, srcs: Sequence[NkiTensor],
              engine: str = "vector") -> NkiTensor:
    out = NkiTensor.allocate(shape, dtype, sbuf, name=name)
    out.data[...] = _dt.cast(vals, dtype)
    free = out.free_size
    current().record(Instruction(
        f"nl.{name}", engine, tuple(s.storage_id for s in srcs), (out.storage_id,), out.partitions, free,
        len(srcs), all(s.dtype in _dt.SIXTEEN_BIT for s in (*srcs, out))))
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _gelu(x: np.ndarray) -> np.ndarray:
    from math import erf

    return 0.5 * x * (1.0 + np.vectorize(erf, otypes=[np.float32])(x / np.sqrt(2.0)))


def _gelu_tanh(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + np.tanh(0.7978845608 * (x + 0.044715 * x**3)))


def _binary(name: str, fn: Callable[..., np.ndarray], kind: str = "arith",
            reduce: Callable[..., np.ndarray] | None = None, identity: float | None = None) -> Op:
    return Op(name, fn, 2, kind, reduce, identity)


def _unary(name: str, fn: Callable[..., np.ndarray], kind: str = "activation") -> Op:
    return Op(name, fn, 1, kind)


def _bits(fn: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> Callable[..., np.ndarray]:
    return lambda a, b: fn(np.asarray(a).astype(np.int64), np.asarray(b).astype(np.int64))


with np.errstate(all="ignore"):
    add = _binary("add", np.add, reduce=np.add.reduce, identity=0.0)
    subtract = _binary("subtract", np.subtract, reduce=np.subtract.reduce)
    multiply = _binary("multiply", np.multiply, reduce=np.multiply.reduce, identity=1.0)
    divide = _binary("divide", np.divide)
    maximum = _binary("maximum", np.maximum, reduce=np.maximum.reduce, identity=-np.inf)
    minimum = _binary("minimum", np.minimum, reduce=np.minimum.reduce, identity=np.inf)
    power = _binary("power", np.power)
    abs_max = _binary("abs_max", lambda a, b: np.where(np.abs(a) > np.abs(b), a, b))
    abs_min = _binary("abs_min", lambda a, b: np.where(np.abs(a) < np.abs(b), a, b))
    fmod = _binary("fmod", np.fmod)
    mod = _binary("mod", np.mod)
    equal = _binary("equal", lambda a, b: (a == b).astype(np.float32), "compare")
    not_equal = _binary("not_equal", lambda a, b: (a != b).astype(np.float32), "compare")
    less = _binary("less", lambda a, b: (a < b).astype(np.float32), "compare")
    less_equal = _binary("less_equal", lambda a, b: (a <= b).astype(np.float32), "compare")
    greater = _binary("greater", lambda a, b: (a > b).astype(np.float32), "compare")
    greater_equal = _binary("greater_equal", lambda a, b: (a >= b).astype(np.float32), "compare")
    logical_and = _binary("logical_and", lambda a, b: np.logical_and(a, b).astype(np.float32), "compare",
                          np.logical_and.reduce)
    logical_or = _binary("logical_or", lambda a, b: np.logical_or(a, b).astype(np.float32), "compare",
                         np.logical_or.reduce)
    logical_xor = _binary("logical_xor", lambda a, b: np.logical_xor(a, b).astype(np.float32), "compare")
    bitwise_and = _binary("bitwise_and", _bits(np.bitwise_and), "bitvec", np.bitwise_and.reduce)
    bitwise_or = _binary("bitwise_or", _bits(np.bitwise_or), "bitvec", np.bitwise_or.reduce)
    bitwise_xor = _binary("bitwise_xor", _bits(np.bitwise_xor), "bitvec", np.bitwise_xor.reduce)
    left_shift = _binary("left_shift", _bits(np.left_shift), "bitvec")
    # ISA: "Arithmetic shift right NOT supported (right_shift = logical)" (nki.api.shared.rst).
    right_shift = _binary("right_shift", lambda a, b: (np.asarray(a).astype(np.int64) & 0xFFFFFFFF)
                          >> np.asarray(b).astype(np.int64), "bitvec")

    copy = _unary("copy", lambda x: x)
    exp = _unary("exp", np.exp)
    log = _unary("log", np.log)
    sqrt = _unary("sqrt", np.sqrt)
    rsqrt = _unary("rsqrt", lambda x: 1.0 / np.sqrt(x))
    reciprocal = _unary("reciprocal", lambda x: 1.0 / x)
    square = _unary("square", np.square)
    abs = _unary("abs", np.abs)  # noqa: A001
    negative = _unary("negative", np.negative)
    sign = _unary("sign", np.sign)
    sin = _unary("sin", np.sin)
    cos = _unary("cos", np.cos)
    tan = _unary("tan", np.tan)
    tanh = _unary("tanh", np.tanh)
    arctan = _unary("arctan", np.arctan)
    ceil = _unary("ceil", np.ceil)
    floor = _unary("floor", np.floor)
    trunc = _unary("trunc", np.trunc)
    sigmoid = _unary("sigmoid", _sigmoid)
    relu = _unary("relu", lambda x: np.maximum(x, 0.0))
    silu = _unary("silu", lambda x: x * _sigmoid(x))
    silu_dx = _unary("silu_dx", lambda x: _sigmoid(x) * (1.0 + x * (1.0 - _sigmoid(x))))
    gelu = _unary("gelu", _gelu)
    gelu_apprx_tanh = _unary("gelu_apprx_tanh", _gelu_tanh)
    gelu_apprx_sigmoid = _unary("gelu_apprx_sigmoid", lambda x: x * _sigmoid(1.702 * x))
    softplus = _unary("softplus", lambda x: np.log1p(np.exp(x)))
    mish = _unary("mish", lambda x: x * np.tanh(np.log1p(np.exp(x))))
    erf = _unary("erf", lambda x: np.vectorize(math.erf, otypes=[np.float32])(x))
    invert = _unary("invert", lambda x: np.invert(np.asarray(x).astype(np.int64)), "bitvec")
    logical_not = _unary("logical_not", lambda x: np.logical_not(x).astype(np.float32), "compare")

average = Op("average", lambda a, b: (a + b) / 2, 2, "arith", lambda v, axis: np.mean(v, axis=axis))
bypass = Op("bypass", lambda a, b=None: a, 2, "arith")


# --- creation -----------------------------------------------------------------------------------


def _default_buffer(buffer: Any) -> MemoryRegion:
    return MemoryRegion.sbuf if buffer is None else region(buffer)  # 0.2.0 default None meant SBUF


def ndarray(shape: Sequence[int], dtype: Any, buffer: Any = sbuf, name: str = "", address: Any = None) -> NkiTensor:
    """A new tensor; on-chip contents start as NaN (ints: 4), as in the SDK simulator."""
    return NkiTensor.allocate(shape, dtype, _default_buffer(buffer), name)


def _filled(shape: Sequence[int], value: float, dtype: Any, buffer: Any, name: str) -> NkiTensor:
    out = NkiTensor.allocate(shape, dtype, _default_buffer(buffer), name)
    out.data[...] = _dt.cast(np.full(out.data.shape, value, dtype=np.float32), out.dtype)
    if out.buffer.on_chip:
        current().record(Instruction("nl.memset", "vector", (), (out.storage_id,), out.partitions, out.free_size))
    return out


def zeros(shape: Sequence[int], dtype: Any, buffer: Any = sbuf, name: str = "") -> NkiTensor:
    return _filled(shape, 0.0, dtype, buffer, name)


def ones(shape: Sequence[int], dtype: Any, buffer: Any = sbuf, name: str = "") -> NkiTensor:
    return _filled(shape, 1.0, dtype, buffer, name)


def full(shape: Sequence[int], fill_value: float, dtype: Any, buffer: Any = sbuf, name: str = "") -> NkiTensor:
    return _filled(shape, fill_value, dtype, buffer, name)


def zeros_like(x: NkiTensor, dtype: Any = None, buffer: Any = None, name: str = "") -> NkiTensor:
    return _filled(x.shape, 0.0, dtype or x.dtype, buffer or x.buffer, name)


def empty_like(x: NkiTensor, dtype: Any = None, buffer: Any = None, name: str = "") -> NkiTensor:
    return NkiTensor.allocate(x.shape, dtype or x.dtype, buffer or x.buffer, name)


def ds(start: int, size: int) -> DynSlice:
    """A slice of ``size`` elements starting at ``start``."""
    return DynSlice(int(start), int(size))


# --- loops (all fully unrolled Python loops, as the docs now describe them) -----------------------


def affine_range(start: int, stop: int | None = None, step: int = 1) -> Iterable[int]:
    return builtins.range(start, stop, step) if stop is not None else builtins.range(start)


sequential_range = affine_range
static_range = affine_range


def dynamic_range(start: Any, stop: Any = None, step: int = 1) -> Iterable[VirtualRegister]:
    """A loop whose bounds may be registers (run-time values); the loop variable is a register."""
    lo, hi = (0, start) if stop is None else (start, stop)
    bound = [v.value if isinstance(v, VirtualRegister) else int(v) for v in (lo, hi)]
    return (VirtualRegister(i) for i in builtins.range(bound[0], bound[1], int(step)))


# --- data movement and convenience wrappers -------------------------------------------------------


def load(src: NkiTensor, dtype: Any = None) -> NkiTensor:
    """HBM -> new SBUF tile (a ``dma_copy``)."""
    from nkimoe.nki.emulator import isa

    out = NkiTensor.allocate(src.shape, dtype or src.dtype, sbuf)
    isa.dma_copy(dst=out, src=src)
    return out


def store(dst: NkiTensor, value: NkiTensor) -> None:
    """SBUF tile -> HBM (a ``dma_copy``)."""
    from nkimoe.nki.emulator import isa

    isa.dma_copy(dst=dst, src=value)


def _reduce(op: Op, x: NkiTensor, axis: Any, dtype: Any, keepdims: bool) -> NkiTensor:
    axes = tuple(axis) if isinstance(axis, (tuple, list)) else (axis,)
    axes = tuple(a % x.ndim for a in axes)
    if 0 in axes:
        raise EmulatorError(f"nl.{op.name}: reducing the partition axis is not supported; reduce free axes")
    vals = _values(x)
    result = op.reduce(vals, axis=axes, keepdims=True) if op.name != "average" else np.mean(vals, axis=axes, keepdims=True)
    shape = result.shape if keepdims else tuple(s for i, s in enumerate(x.shape) if i not in axes) or (x.shape[0], 1)
    return _new_tile(shape, _dt.normalize(dtype) if dtype else x.dtype, result.reshape(shape), op.name, [x])


def sum(x: NkiTensor, axis: Any, dtype: Any = None, keepdims: bool = False) -> NkiTensor:  # noqa: A001
    return _reduce(add, x, axis, dtype, keepdims)


def max(x: NkiTensor, axis: Any, dtype: Any = None, keepdims: bool = False) -> NkiTensor:  # noqa: A001
    return _reduce(maximum, x, axis, dtype, keepdims)


def min(x: NkiTensor, axis: Any, dtype: Any = None, keepdims: bool = False) -> NkiTensor:  # noqa: A001
    return _reduce(minimum, x, axis, dtype, keepdims)


def mean(x: NkiTensor, axis: Any, dtype: Any = None, keepdims: bool = False) -> NkiTensor:
    return _reduce(average, x, axis, dtype, keepdims)


def program_id(axis: int = 0) -> int:
    return current().program_id


def num_programs(axes: int = 0) -> int:
    return current().num_programs


def program_ndim() -> int:
    return 1


def device_print(print_prefix: str, tensor: NkiTensor) -> None:
    print(print_prefix, _values(tensor))
