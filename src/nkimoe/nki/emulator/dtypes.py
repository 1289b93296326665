"""NKI dtypes: string constants (as the SDK stub types them) mapped to NumPy / ml_dtypes storage.

Low-precision floats are stored exactly with ml_dtypes (as the SDK simulator does with
``NKI_PRECISE_FP=1``). ``tfloat32`` is stored as float32 rounded to 10 mantissa bits. The x4
packed MX types are stored with a trailing axis of 4 hidden from the tensor's shape.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

bool_ = "bool_"
int8, int16, int32 = "int8", "int16", "int32"
uint8, uint16, uint32 = "uint8", "uint16", "uint32"
float16, float32, bfloat16, tfloat32 = "float16", "float32", "bfloat16", "tfloat32"
float8_e4m3, float8_e4m3fn, float8_e5m2 = "float8_e4m3", "float8_e4m3fn", "float8_e5m2"
float8_e8m0fnu = "float8_e8m0fnu"
float8_e5m2_x4, float8_e4m3fn_x4, float4_e2m1fn_x4 = "float8_e5m2_x4", "float8_e4m3fn_x4", "float4_e2m1fn_x4"

#: dtype name -> NumPy storage dtype (for x4 types: the dtype of each of the 4 packed values).
STORAGE: dict[str, np.dtype] = {
    bool_: np.dtype(np.uint8),
    int8: np.dtype(np.int8),
    int16: np.dtype(np.int16),
    int32: np.dtype(np.int32),
    uint8: np.dtype(np.uint8),
    uint16: np.dtype(np.uint16),
    uint32: np.dtype(np.uint32),
    float16: np.dtype(np.float16),
    float32: np.dtype(np.float32),
    tfloat32: np.dtype(np.float32),
    bfloat16: np.dtype(ml_dtypes.bfloat16),
    # nki-library core/utils/kernel_helpers.py: legacy float8_e4m3 saturates at 240 (IEEE-style,
    # ml_dtypes.float8_e4m3); OCP float8_e4m3fn at 448.
    float8_e4m3: np.dtype(ml_dtypes.float8_e4m3),
    float8_e4m3fn: np.dtype(ml_dtypes.float8_e4m3fn),
    float8_e5m2: np.dtype(ml_dtypes.float8_e5m2),
    float8_e8m0fnu: np.dtype(ml_dtypes.float8_e8m0fnu),
    float8_e5m2_x4: np.dtype(ml_dtypes.float8_e5m2),
    float8_e4m3fn_x4: np.dtype(ml_dtypes.float8_e4m3fn),
    float4_e2m1fn_x4: np.dtype(ml_dtypes.float4_e2m1fn),
}

PACKED_X4 = frozenset({float8_e5m2_x4, float8_e4m3fn_x4, float4_e2m1fn_x4})
FP8 = frozenset({float8_e4m3, float8_e4m3fn, float8_e5m2})
SIXTEEN_BIT = frozenset({bfloat16, float16})
INTEGER = frozenset({bool_, int8, int16, int32, uint8, uint16, uint32})
#: Dtypes whose storage holds a NaN fill exactly, so new tensors are filled directly.
EXACT_FILL = frozenset({float32, bfloat16, float16})
ALL = frozenset(STORAGE)

_FROM_NUMPY = {
    np.dtype(np.float32): float32,
    np.dtype(np.float16): float16,
    np.dtype(ml_dtypes.bfloat16): bfloat16,
    np.dtype(np.int8): int8,
    np.dtype(np.int16): int16,
    np.dtype(np.int32): int32,
    np.dtype(np.uint8): uint8,
    np.dtype(np.uint16): uint16,
    np.dtype(np.uint32): uint32,
    np.dtype(np.bool_): bool_,
    np.dtype(ml_dtypes.float8_e4m3): float8_e4m3,
    np.dtype(ml_dtypes.float8_e4m3fn): float8_e4m3fn,
    np.dtype(ml_dtypes.float8_e5m2): float8_e5m2,
    np.dtype(ml_dtypes.float8_e8m0fnu): float8_e8m0fnu,
}


def from_numpy(dtype: np.dtype) -> str:
    """The NKI dtype name of a NumPy array dtype; int64/float64 have no NKI equivalent."""
    try:
        return _FROM_NUMPY[np.dtype(dtype)]
    except KeyError:
        raise TypeError(
            f"NumPy dtype {np.dtype(dtype)} has no NKI equivalent; use one of "
            f"{', '.join(sorted(set(_FROM_NUMPY.values())))}"
        ) from None


def normalize(dtype: object) -> str:
    """Accept an NKI dtype name or a NumPy dtype; return the NKI name."""
    if isinstance(dtype, str) and dtype in STORAGE:
        return dtype
    try:
        return from_numpy(np.dtype(dtype))  # type: ignore[call-overload]
    except TypeError:
        raise TypeError(f"unknown NKI dtype {dtype!r}; valid: {', '.join(sorted(STORAGE))}") from None


def itemsize(dtype: str) -> float:
    """Bytes per element as NKI counts it (x4 packed: the 4 values together)."""
    if dtype == float4_e2m1fn_x4:
        return 2.0
    if dtype in PACKED_X4:
        return 4.0
    return float(STORAGE[dtype].itemsize)


def cast(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round fp32 (or any) values to ``dtype`` the way an engine writes its destination:
    round-to-nearest-even for floats, saturating to the finite range for fp8 formats without
    infinities, truncation toward zero with wrap for integers (via int64)."""
    storage = STORAGE[dtype]
    if dtype == tfloat32:
        bits = np.asarray(values, dtype=np.float32).view(np.uint32)
        rounded = (bits + np.uint32(0x0FFF) + ((bits >> np.uint32(13)) & np.uint32(1))) & np.uint32(0xFFFFE000)
        return rounded.view(np.float32)
    if dtype in INTEGER:
        as_float = np.asarray(values, dtype=np.float64)
        return np.nan_to_num(np.trunc(as_float)).astype(np.int64).astype(storage)
    if dtype in (float8_e4m3fn, float8_e4m3fn_x4, float4_e2m1fn_x4):
        finfo = ml_dtypes.finfo(storage)
        values = np.clip(np.asarray(values, dtype=np.float32), float(finfo.min), float(finfo.max))
    return np.asarray(values).astype(storage, copy=False)
