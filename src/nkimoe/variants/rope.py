"""Rotary embedding (rotate-half) of q and k: NKI kernels for Trn2 and Trn3.

Layout: tokens on partitions (128 per tile), heads x head_dim on the free axis; the cos and sin
rows of each token are broadcast over the heads by a stride-0 DMA. The kernel rounds after every
multiply and add exactly where the reference does (``q*cos``, ``rotate_half(q)*sin``, their sum),
and a product of two bf16 values is exact in fp32, so the output is bit-exact.

Per target: RoPE is elementwise, so no Trn3-only instruction applies. The Trn2 kernel runs all
products on VectorE; the Trn3 kernel moves the sin products to GpSimd so that they overlap with
VectorE's cos products and sums (worth it where VectorE is not already 4x faster per BF16
element than the alternative, as the cost model estimates per target).
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


def rotate_rows(y, xt, c, s, rows: int, sin_engine) -> None:  # noqa: ANN001
    """``y = xt*c + rotate_half(xt)*s`` on the first ``rows`` partitions of SBUF tiles [128, heads, D],
    rounding after each product and the sum as the reference does."""
    half = xt.shape[2] // 2
    d = 2 * half
    a = nl.ndarray(xt.shape, dtype=xt.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=a[0:rows], data1=xt[0:rows], data2=c[0:rows], op=nl.multiply)
    r = nl.ndarray(xt.shape, dtype=xt.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=r[0:rows, :, 0:half], data1=xt[0:rows, :, half:d], data2=s[0:rows, :, 0:half],
                       op=nl.multiply, engine=sin_engine)
    nisa.tensor_tensor(dst=r[0:rows, :, half:d], data1=xt[0:rows, :, 0:half], data2=s[0:rows, :, half:d],
                       op=nl.multiply, engine=sin_engine)
    nisa.tensor_tensor(dst=y[0:rows, :, 0:half], data1=a[0:rows, :, 0:half], data2=r[0:rows, :, 0:half],
                       op=nl.subtract)
    nisa.tensor_tensor(dst=y[0:rows, :, half:d], data1=a[0:rows, :, half:d], data2=r[0:rows, :, half:d], op=nl.add)


def _rotate(x, x_out, cos, sin, t0: int, rows: int, sin_engine) -> None:  # noqa: ANN001
    """x_out[t0:t0+rows] = x*cos + rotate_half(x)*sin for one tile of tokens (x [T, H, D] in HBM)."""
    _, heads, d = x.shape
    xt = nl.ndarray((P, heads, d), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=xt[0:rows], src=x[t0:t0 + rows])
    c = nl.ndarray((P, heads, d), dtype=cos.dtype, buffer=nl.sbuf)
    s = nl.ndarray((P, heads, d), dtype=sin.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=c[0:rows], src=cos.ap([[d, rows], [0, heads], [1, d]], offset=t0 * d))
    nisa.dma_copy(dst=s[0:rows], src=sin.ap([[d, rows], [0, heads], [1, d]], offset=t0 * d))
    y = nl.ndarray((P, heads, d), dtype=x.dtype, buffer=nl.sbuf)
    rotate_rows(y, xt, c, s, rows, sin_engine)
    nisa.dma_copy(dst=x_out[t0:t0 + rows], src=y[0:rows])


@nki.jit
def rope_kernel(q, k, cos, sin, sin_on_gpsimd: bool = False):
    """Rotary embedding of q and k.

    Dimensions: T tokens, Hq and Hkv heads, D head_dim (even).
    Args: q [T, Hq, D], k [T, Hkv, D] HBM; cos, sin [T, D] HBM in q.dtype; sin_on_gpsimd runs
    the sin products on GpSimd (Trn3) instead of VectorE (Trn2).
    Returns: rotated q and k, HBM, same shapes and dtype.
    """
    t = q.shape[0]
    q_out = nl.ndarray(q.shape, dtype=q.dtype, buffer=nl.shared_hbm)
    k_out = nl.ndarray(k.shape, dtype=k.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return q_out, k_out
    engine = nisa.engine.gpsimd if sin_on_gpsimd else nisa.engine.vector
    for tile in nl.affine_range((t + P - 1) // P):
        rows = min(P, t - tile * P)
        _rotate(q, q_out, cos, sin, tile * P, rows, engine)
        _rotate(k, k_out, cos, sin, tile * P, rows, engine)
    return q_out, k_out


def _supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    heads = max(dims["Hq"], dims["Hkv"])
    need = heads * dims["D"] * 4 * 6  # x, cos, sin, products, sums: six [heads, D] tiles, <= 4 B each
    if need > target.sbuf_usable_bytes_per_partition:
        return False, f"{heads} heads x D={dims['D']} need {need} B per partition, {target.name} has {target.sbuf_usable_bytes_per_partition}"
    return True, "any token count (128-token tiles, ragged last tile)"


def _launcher(sin_on_gpsimd: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             lnc: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(rope_kernel[lnc](q, k, cos, sin, sin_on_gpsimd=sin_on_gpsimd))

    return rope


def variants() -> list[Variant]:
    return [
        Variant(op="rope", name=f"rope_nki_{target}", targets=(target,), kernel=_launcher(gpsimd), nki=True,
                priority=10, supports=_supports, exactness="bitexact",
                description=f"128-token tiles, stride-0 cos/sin broadcast, sin products on {engine}")
        for target, gpsimd, engine in (("trn2", False, "VectorE"), ("trn3", True, "GpSimd"))
    ]


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
