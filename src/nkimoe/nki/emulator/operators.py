"""NKI's ALU operators and activation functions (``nl.add``, ``nl.exp``, ...).

Each serves as the ``op=`` argument of ``nisa`` instructions and, called directly, as the
value-returning ``nl`` convenience API (a new SBUF tile). ``nki.language`` re-exports them;
``nki.isa`` imports them from here, so neither namespace imports the other's module circle.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from nkimoe.nki.emulator import dtypes as _dt
from nkimoe.nki.emulator.core import EmulatorError, Instruction, MemoryRegion, NkiTensor, OutOfBounds, current

_P = inspect.Parameter
_UNARY = inspect.Signature([_P("x", _P.POSITIONAL_OR_KEYWORD), _P("dtype", _P.POSITIONAL_OR_KEYWORD, default=None)])
_BINARY = inspect.Signature([_P("x", _P.POSITIONAL_OR_KEYWORD), _P("y", _P.POSITIONAL_OR_KEYWORD),
                             _P("dtype", _P.POSITIONAL_OR_KEYWORD, default=None)])

class Op:
    """An ALU operator or activation function usable as ``op=`` and callable as ``nl.<name>(...)``."""

    def __init__(self, name: str, fn: Callable[..., np.ndarray], arity: int, kind: str,
                 reduce: Callable[..., np.ndarray] | None = None, identity: float | None = None) -> None:
        self.name, self.fn, self.arity, self.kind, self.reduce, self.identity = name, fn, arity, kind, reduce, identity
        #: The documented ``nl.<name>(x[, y], dtype=None)`` signature (what ``inspect`` reports).
        self.__signature__ = _UNARY if arity == 1 else _BINARY

    def __repr__(self) -> str:
        return f"nl.{self.name}"

    def __call__(self, *args: Any, **kwargs: Any) -> NkiTensor:
        try:
            bound = self.__signature__.bind(*args, **kwargs).arguments
        except TypeError as exc:
            raise EmulatorError(f"nl.{self.name}{self.__signature__}: {exc}") from None
        dtype = bound.get("dtype")
        inputs = [bound["x"]] if self.arity == 1 else [bound["x"], bound["y"]]
        tiles = [t for t in inputs if isinstance(t, NkiTensor)]
        if not tiles:
            raise EmulatorError(f"nl.{self.name}: at least one argument must be a tile")
        vals = [values(t) if isinstance(t, NkiTensor) else np.float32(t) for t in inputs]
        result = self.fn(*vals)
        out_dtype = _dt.normalize(dtype) if dtype is not None else tiles[0].dtype
        shape = np.broadcast_shapes(*(t.shape for t in tiles))
        return new_tile(shape, out_dtype, np.broadcast_to(result, shape), self.name, tiles)


def values(t: NkiTensor) -> np.ndarray:
    """The tensor's values as float32 (integers as float64, x4 types unpacked in the last axis)."""
    if isinstance(t, OutOfBounds):
        raise EmulatorError(t.reason)
    if t.dtype in _dt.INTEGER:
        return t.data.astype(np.float64)
    return t.data.astype(np.float32, copy=False)


def new_tile(shape: Sequence[int], dtype: str, vals: np.ndarray, name: str, srcs: Sequence[NkiTensor],
             engine: str = "vector") -> NkiTensor:
    """A new SBUF tile holding ``vals`` (rounded to ``dtype``), recorded as one ``nl.<name>`` instruction."""
    out = NkiTensor.allocate(shape, dtype, MemoryRegion.sbuf, name=name)
    out.data[...] = _dt.cast(vals, dtype)
    free = out.free_size
    current().record(Instruction(
        f"nl.{name}", engine, tuple(s.storage_id for s in srcs), (out.storage_id,), out.partitions, free,
        len(srcs), all(s.dtype in _dt.SIXTEEN_BIT for s in (*srcs, out))))
    return out


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


_erf = np.vectorize(math.erf, otypes=[np.float32])


def _gelu(x: np.ndarray) -> np.ndarray:
    return 0.5 * x * (1.0 + _erf(x / np.sqrt(2.0)))


def _gelu_dx(x: np.ndarray) -> np.ndarray:
    """d/dx of x * Phi(x): Phi(x) + x * phi(x)."""
    return 0.5 * (1.0 + _erf(x / np.sqrt(2.0))) + x * np.exp(-0.5 * x * x) / np.sqrt(2.0 * np.pi)


def _gelu_sigmoid_dx(x: np.ndarray) -> np.ndarray:
    """d/dx of x * sigmoid(1.702 x)."""
    s = _sigmoid(1.702 * x)
    return s + 1.702 * x * s * (1.0 - s)


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
    # The unary arithmetic ALU operators of the ISA's operator table (nki.api.shared.rst), also
    # activation functions: as an ALU ``op`` they apply to the first input.
    rsqrt = _unary("rsqrt", lambda x: 1.0 / np.sqrt(x), "arith")
    reciprocal = _unary("reciprocal", lambda x: 1.0 / x, "arith")
    square = _unary("square", np.square)
    abs = _unary("abs", np.abs, "arith")  # noqa: A001
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
    erf = _unary("erf", _erf)
    erf_dx = _unary("erf_dx", lambda x: 2.0 / np.sqrt(np.pi) * np.exp(-x * x))
    gelu_dx = _unary("gelu_dx", _gelu_dx)
    gelu_apprx_sigmoid_dx = _unary("gelu_apprx_sigmoid_dx", _gelu_sigmoid_dx)
    invert = _unary("invert", lambda x: np.invert(np.asarray(x).astype(np.int64)), "bitvec")
    logical_not = _unary("logical_not", lambda x: np.logical_not(x).astype(np.float32), "compare")

average = Op("average", lambda a, b: (a + b) / 2, 2, "arith", lambda v, axis: np.mean(v, axis=axis))
bypass = Op("bypass", lambda a, b=None: a, 2, "arith")
