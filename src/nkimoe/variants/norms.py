"""RMSNorm, fused residual-add + RMSNorm and QK-norm: NKI kernels for Trn2 and Trn3.

Layout: rows (tokens, or token x head for QK-norm) on partitions, 128 per tile, the normalised
axis on the free dimension; the weight is broadcast to every partition once by a stride-0 DMA.

Rounding follows the reference exactly: the sum of squares and ``rsqrt`` in fp32, the normalised
value rounded to the input dtype, then the weight product rounded to the input dtype. Only the
summation order of the squares differs; through the two roundings that is at most two units in
the last place.

Per target: no Trn3-only instruction helps a norm (the fast exponential, MX matmul and BF16
PSUM do not apply, and the sum of squares must stay fp32), so both targets run the same
algorithm; the variants differ in which engine squares and sums. Trn2's VectorE streams BF16
at 4x ScalarE's rate, so the Trn2 kernels keep everything on VectorE; Trn3's ScalarE doubles its
BF16 rate, so the Trn3 kernels move the square-and-sum to ScalarE (``activation`` with an add
reduction) and overlap it with VectorE's normalisation of the neighbouring tile.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from nkimoe.hookspecs import hookimpl
from nkimoe.nki import nisa, nki, nl
from nkimoe.registry import Variant
from nkimoe.targets import Target

P = 128

#: bf16: the output is rounded twice (normalised value, then the weight product), so a one-ulp
#: difference in the first rounding (from the summation order) can become two ulps (2 x 2^-7
#: relative), plus a floor for values near zero. fp32: a few fp32 ulps.
NORM_TOLERANCE = {"bfloat16": (1e-3, 2.0**-6), "float32": (1e-6, 1e-5)}


def _broadcast_rows(vec, width: int, rows: int):  # noqa: ANN001, ANN202
    """Load an HBM vector [width] into the first ``rows`` partitions of a [128, width] SBUF tile
    (stride-0 DMA)."""
    tile = nl.ndarray((P, width), dtype=vec.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile[0:rows], src=vec.reshape((1, width)).ap([[0, rows], [1, width]]))
    return tile


def normalize_rows(out_rows, x_rows, w_tile, rows: int, width: int, eps: float, square_on_scalar: bool) -> None:  # noqa: ANN001
    """out[r] = w * (x[r] * rsqrt(mean(x[r]^2) + eps)) for ``rows`` <= 128 rows already in SBUF."""
    sq = nl.ndarray((P, width), dtype=nl.float32, buffer=nl.sbuf)
    ss = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    if square_on_scalar:
        nisa.activation(dst=sq[0:rows], op=nl.square, data=x_rows[0:rows], reduce_op=nl.add,
                        reduce_res=ss[0:rows], reduce_cmd=nisa.reduce_cmd.reset_reduce)
    else:
        nisa.tensor_tensor(dst=sq[0:rows], data1=x_rows[0:rows], data2=x_rows[0:rows], op=nl.multiply)
        nisa.tensor_reduce(dst=ss[0:rows], op=nl.add, data=sq[0:rows], axis=1)
    rstd = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=rstd[0:rows], data=ss[0:rows], op0=nl.multiply, operand0=1.0 / width, op1=nl.add,
                       operand1=eps)
    nisa.activation(dst=rstd[0:rows], op=nl.rsqrt, data=rstd[0:rows])
    normed = nl.ndarray((P, width), dtype=x_rows.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=normed[0:rows], data=x_rows[0:rows], op0=nl.multiply, operand0=rstd[0:rows])
    nisa.tensor_tensor(dst=out_rows[0:rows], data1=normed[0:rows], data2=w_tile[0:rows], op=nl.multiply)


def _rmsnorm_2d(x, weight, out, eps: float, square_on_scalar: bool) -> None:  # noqa: ANN001
    """RMSNorm of every row of the HBM matrix ``x`` [R, W] into ``out``."""
    rows, width = x.shape
    w_tile = _broadcast_rows(weight, width, min(P, rows))
    for t in nl.affine_range((rows + P - 1) // P):
        p = min(P, rows - t * P)
        xt = nl.ndarray((P, width), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt[0:p], src=x[t * P:t * P + p, :])
        yt = nl.ndarray((P, width), dtype=x.dtype, buffer=nl.sbuf)
        normalize_rows(yt, xt, w_tile, p, width, eps, square_on_scalar)
        nisa.dma_copy(dst=out[t * P:t * P + p, :], src=yt[0:p])


@nki.jit
def rmsnorm_kernel(x, weight, eps: float = 1e-6, square_on_scalar: bool = False):
    """RMSNorm.

    Dimensions: T tokens, H hidden.
    Args: x [T, H] HBM bf16|fp32; weight [H] HBM, x.dtype; eps; square_on_scalar picks ScalarE
    for the square-and-sum (Trn3) instead of VectorE (Trn2).
    Returns: [T, H] HBM, x.dtype.
    """
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return out
    _rmsnorm_2d(x, weight, out, eps, square_on_scalar)
    return out


@nki.jit
def add_rmsnorm_kernel(x, residual, weight, eps: float = 1e-6, square_on_scalar: bool = False):
    """Residual add then RMSNorm in one pass over each 128-token tile.

    Dimensions: T tokens, H hidden.
    Args: x, residual [T, H] HBM; weight [H] HBM.
    Returns: (x + residual, rmsnorm(x + residual)), both [T, H] HBM in x.dtype. The sum is rounded
    to x.dtype before it is normalised, as the reference does.
    """
    rows, width = x.shape
    summed = nl.ndarray((rows, width), dtype=x.dtype, buffer=nl.shared_hbm)
    out = nl.ndarray((rows, width), dtype=x.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return summed, out
    w_tile = _broadcast_rows(weight, width, min(P, rows))
    for t in nl.affine_range((rows + P - 1) // P):
        p = min(P, rows - t * P)
        xt = nl.ndarray((P, width), dtype=x.dtype, buffer=nl.sbuf)
        rt = nl.ndarray((P, width), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=xt[0:p], src=x[t * P:t * P + p, :])
        nisa.dma_copy(dst=rt[0:p], src=residual[t * P:t * P + p, :])
        st = nl.ndarray((P, width), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=st[0:p], data1=xt[0:p], data2=rt[0:p], op=nl.add)
        nisa.dma_copy(dst=summed[t * P:t * P + p, :], src=st[0:p])
        yt = nl.ndarray((P, width), dtype=x.dtype, buffer=nl.sbuf)
        normalize_rows(yt, st, w_tile, p, width, eps, square_on_scalar)
        nisa.dma_copy(dst=out[t * P:t * P + p, :], src=yt[0:p])
    return summed, out


@nki.jit
def qk_norm_kernel(q, k, q_weight, k_weight, eps: float = 1e-6, square_on_scalar: bool = False):
    """Per-head RMSNorm of q and k: every (token, head) row of head_dim values is one partition row.

    Dimensions: T tokens, Hq and Hkv heads, D head_dim.
    Args: q [T, Hq, D], k [T, Hkv, D] HBM; q_weight, k_weight [D] HBM.
    Returns: normalised q [T, Hq, D] and k [T, Hkv, D] HBM.
    """
    t, hq, d = q.shape
    hkv = k.shape[1]
    q_out = nl.ndarray((t, hq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    k_out = nl.ndarray((t, hkv, d), dtype=k.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return q_out, k_out
    _rmsnorm_2d(q.reshape((t * hq, d)), q_weight, q_out.reshape((t * hq, d)), eps, square_on_scalar)
    _rmsnorm_2d(k.reshape((t * hkv, d)), k_weight, k_out.reshape((t * hkv, d)), eps, square_on_scalar)
    return q_out, k_out


def load_spread(x):  # noqa: ANN001, ANN202
    """Decode layout of an HBM matrix [T, H]: a [128, T, H/128] SBUF tile, partition p holding
    columns p*H/128 .. (p+1)*H/128 - 1 of every row (one contiguous run per partition and row)."""
    t, h = x.shape
    tile = nl.ndarray((P, t, h // P), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=x.reshape((t, P, h // P)).permute((1, 0, 2)))
    return tile


def store_spread(out, y) -> None:  # noqa: ANN001
    """Write a decode-layout tile [128, T, F] to the HBM matrix ``out`` [T, 128*F]."""
    _, t, f = y.shape
    nisa.dma_copy(dst=out.reshape((t, P, f)).permute((1, 0, 2)), src=y)


def add_spread(x, residual):  # noqa: ANN001, ANN202
    """``x + residual`` (HBM [T, H] each) as a decode-layout tile, rounded to x.dtype as the reference adds."""
    xt, rt = load_spread(x), load_spread(residual)
    st = nl.ndarray(xt.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=st, data1=xt, data2=rt, op=nl.add)
    return st


def spread_rmsnorm(xt, weight, eps: float):  # noqa: ANN001, ANN202
    """RMSNorm of the rows of a decode-layout tile xt [128, T, F] (``load_spread``) with the HBM
    weight [128*F] spread the same way (``spread_normalize``). Returns [128, T, F] in xt.dtype (SBUF)."""
    f = xt.shape[2]
    w = nl.ndarray((P, f), dtype=weight.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w, src=weight.reshape((P, f)))
    return spread_normalize(xt, w, eps)


def spread_normalize(xt, w, eps: float, ones=None):  # noqa: ANN001, ANN202
    """RMSNorm of the rows of a decode-layout tile xt [128, T, F] with the weight w [128, F] (on
    chip) spread the same way; the sum of squares crosses partitions through one fp32 ones-matmul
    (``ones`` [128, 128] fp32 when the caller has one), which also broadcasts it. Returns
    [128, T, F] in xt.dtype (SBUF)."""
    _, t, f = xt.shape
    sq = nl.ndarray((P, t, f), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=sq, data1=xt, data2=xt, op=nl.multiply)
    partial = nl.ndarray((P, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=partial, op=nl.add, data=sq, axis=2)
    if ones is None:
        ones = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
        nisa.memset(dst=ones, value=1.0, engine=nisa.engine.gpsimd)  # off VectorE, which waits for the input
    total = nl.ndarray((P, t), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=total, stationary=ones, moving=partial)
    rstd = nl.ndarray((P, t), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=rstd, data=total, op0=nl.multiply, operand0=1.0 / (P * f), op1=nl.add, operand1=eps)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=rstd)
    y = nl.ndarray((P, t, f), dtype=xt.dtype, buffer=nl.sbuf)
    for i in nl.affine_range(t):
        normed = nl.ndarray((P, f), dtype=xt.dtype, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=normed, data=xt[:, i, :], op0=nl.multiply, operand0=rstd[:, i:i + 1])
        nisa.tensor_tensor(dst=y[:, i, :], data1=normed, data2=w, op=nl.multiply)
    return y


@nki.jit
def rmsnorm_tkg_kernel(x, weight, eps: float = 1e-6):
    """RMSNorm for decode (a few tokens): hidden spread over all 128 partitions.

    Same on Trn2 and Trn3 (one tiny fp32 matmul and a handful of 16-element VectorE steps; no
    Trn3-only instruction applies), so it is registered for both.
    Dimensions: T tokens (<= 8), H hidden (multiple of 128).
    Args: x [T, H] HBM; weight [H] HBM. Returns: [T, H] HBM, x.dtype.
    """
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return out
    store_spread(out, spread_rmsnorm(load_spread(x), weight, eps))
    return out


@nki.jit
def add_rmsnorm_tkg_kernel(x, residual, weight, eps: float = 1e-6):
    """Residual add then RMSNorm for decode, hidden spread over 128 partitions (see rmsnorm_tkg_kernel);
    the sum is normalised from SBUF.

    Dimensions: T tokens (<= 8), H hidden (multiple of 128).
    Returns: (x + residual, rmsnorm(x + residual)), [T, H] HBM each.
    """
    summed = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return summed, out
    st = add_spread(x, residual)
    store_spread(summed, st)
    store_spread(out, spread_rmsnorm(st, weight, eps))
    return summed, out


# --- launchers and support checks ---------------------------------------------------------------


def _fits_sbuf(width_key: str) -> Callable[[Mapping[str, int], str, Target], tuple[bool, str]]:
    def check(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
        width = dims[width_key]
        # Per partition: x, normed and output tiles, the weight (<= 4 B each) and fp32 squares.
        need = width * (4 * 4 + 4)
        if need > target.sbuf_usable_bytes_per_partition:
            return False, f"{width_key}={width} needs {need} B per partition, {target.name} has {target.sbuf_usable_bytes_per_partition}"
        return True, f"{width_key}={width} fits SBUF; any token count (128-row tiles, ragged last tile)"

    return check


def _launchers(square_on_scalar: bool) -> dict[str, Callable[..., Any]]:
    def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, lnc: int = 1) -> torch.Tensor:
        return rmsnorm_kernel[lnc](x, weight, eps=eps, square_on_scalar=square_on_scalar)

    def add_rmsnorm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                    eps: float = 1e-6, lnc: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(add_rmsnorm_kernel[lnc](x, residual, weight, eps=eps, square_on_scalar=square_on_scalar))

    def qk_norm(q: torch.Tensor, k: torch.Tensor, q_weight: torch.Tensor, k_weight: torch.Tensor,
                eps: float = 1e-6, lnc: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(qk_norm_kernel[lnc](q, k, q_weight, k_weight, eps=eps, square_on_scalar=square_on_scalar))

    return {"rmsnorm": rmsnorm, "add_rmsnorm": add_rmsnorm, "qk_norm": qk_norm}


_WIDTH = {"rmsnorm": "H", "add_rmsnorm": "H", "qk_norm": "D"}

#: Decode kernels pay a strided DMA per token; past a few tokens the 128-row tiles win.
TKG_MAX_TOKENS = 8


def _tkg_supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    if dims["T"] > TKG_MAX_TOKENS:
        return False, f"T={dims['T']} > {TKG_MAX_TOKENS}: a decode kernel"
    if dims["H"] % P:
        return False, f"H={dims['H']} is not a multiple of {P}"
    return True, f"T <= {TKG_MAX_TOKENS}, H a multiple of {P}"


def _rmsnorm_tkg(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6, lnc: int = 1) -> torch.Tensor:
    return rmsnorm_tkg_kernel[lnc](x, weight, eps=eps)


def _add_rmsnorm_tkg(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                     eps: float = 1e-6, lnc: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(add_rmsnorm_tkg_kernel[lnc](x, residual, weight, eps=eps))


def variants() -> list[Variant]:
    out = []
    for target, on_scalar, engines in (("trn2", False, "all on VectorE"), ("trn3", True, "squares on ScalarE")):
        for op, launcher in _launchers(on_scalar).items():
            out.append(Variant(
                op=op, name=f"{op}_nki_{target}", targets=(target,), kernel=launcher, nki=True, priority=10,
                supports=_fits_sbuf(_WIDTH[op]), tolerance=NORM_TOLERANCE,
                description=f"128-row tiles, fp32 statistics, {engines}",
            ))
    for op, launcher in (("rmsnorm", _rmsnorm_tkg), ("add_rmsnorm", _add_rmsnorm_tkg)):
        out.append(Variant(
            op=op, name=f"{op}_tkg_nki", targets=("trn2", "trn3"), kernel=launcher, nki=True, priority=20,
            supports=_tkg_supports, tolerance=NORM_TOLERANCE,
            description="decode: hidden over 128 partitions, cross-partition sum by a ones-matmul (same on both targets)",
        ))
    return out


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
