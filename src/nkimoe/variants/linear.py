"""Dense projections ``y = x @ W^T`` (q/k/v/o, the fused q|k|v, the router gate, lm_head): NKI
kernels for Trn2 and Trn3.

Weight layout: at load time the variant re-lays ``W [N, K]`` out as ``W^T [K, N]`` (K-major),
so that every weight tile is a contiguous [128, n] DMA with the contraction on partitions.

Tiling: tokens are the stationary operand (up to 128 per tile, so PSUM rows are tokens and the
output needs no transpose), weight columns stream as the moving operand, K accumulates in fp32
PSUM over 128-row slices. Each token tile of x is transposed once on TensorE. The loop runs over
weight column blocks outermost, so each weight byte is read from HBM once whatever the token count.

Rounding: fp32 accumulation, one rounding to x.dtype on the PSUM -> SBUF copy, as torch's bf16
matmul does; the sum order differs, so results agree within bf16 (or fp32) rounding of the sum.

Per target: Trn2 moves at most 512 fp32 columns per matmul (one PSUM bank); the Trn3 kernel uses
NeuronCore-v4's wide moving tiles (1024 columns over 2 banks per instruction), half the
instructions and stationary loads, which Trn2 cannot run. Tiles allocated inside a loop are
double-buffered (the emulator, like the compiler, keeps the previous iteration's tile live while
the next is allocated), which bounds the block at 1024: two fp32 [128, 1024] accumulators use
half of PSUM.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from nkimoe.hookspecs import hookimpl
from nkimoe.nki import nisa, nki, nl
from nkimoe.registry import Variant
from nkimoe.targets import Target
from nkimoe.variants.tiles import matmul_accumulate, pe_transpose

P = 128

#: bf16 output: one rounding of an fp32 sum whose order differs from torch's (1 ulp, 2^-7
#: relative) plus an absolute floor for sums that cancel to near zero (K=4096 products of
#: magnitude ~1/sqrt(K): fp32 sum error ~1e-6, bf16 ulp at 1e-2 is 6e-5). fp32: order only.
LINEAR_TOLERANCE = {"bfloat16": (1e-4, 2.0**-7), "float32": (1e-5, 1e-5)}


def weight_k_major(w: torch.Tensor) -> torch.Tensor:
    """Load-time layout: ``W [N, K]`` -> contiguous ``W^T [K, N]``."""
    return w.t().contiguous()


@nki.jit
def linear_kernel(x, w_t, block: int = 512):
    """``y[T, N] = x[T, K] @ w_t[K, N]``.

    Dimensions: T tokens, K contraction (multiple of 128), N output features (any).
    Args: x [T, K] HBM; w_t [K, N] HBM (K-major weight); block: moving columns per matmul
    (512 = one PSUM bank; 1024 on Trn3's wide moving tiles).
    Returns: y [T, N] HBM in x.dtype.
    """
    t, k = x.shape
    n = w_t.shape[1]
    kt = k // P
    tiles = (t + P - 1) // P
    out = nl.ndarray((t, n), dtype=x.dtype, buffer=nl.shared_hbm)
    # x^T for all tokens: [128 (k within slice), kt, T]
    x_t = nl.ndarray((P, kt, t), dtype=x.dtype, buffer=nl.sbuf)
    for tile in nl.affine_range(tiles):
        p = min(P, t - tile * P)
        rows = nl.ndarray((P, k), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows[0:p], src=x[tile * P:tile * P + p, :])
        for j in nl.affine_range(kt):
            pe_transpose(x_t[:, j, tile * P:tile * P + p], rows[0:p, j * P:(j + 1) * P])
    for c in nl.affine_range((n + block - 1) // block):
        cols = min(block, n - c * block)
        w_blk = nl.ndarray((P, kt, block), dtype=w_t.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=w_blk[:, :, 0:cols],
                      src=w_t[:, c * block:c * block + cols].reshape((kt, P, cols)).permute((1, 0, 2)))
        for tile in nl.affine_range(tiles):
            p = min(P, t - tile * P)
            acc = nl.ndarray((P, block), dtype=nl.float32, buffer=nl.psum)
            matmul_accumulate(acc[0:p, 0:cols], x_t[:, :, tile * P:tile * P + p], w_blk[:, :, 0:cols])
            y = nl.ndarray((P, block), dtype=x.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=y[0:p, 0:cols], src=acc[0:p, 0:cols])
            nisa.dma_copy(dst=out[tile * P:tile * P + p, c * block:c * block + cols], src=y[0:p, 0:cols])
    return out


def _supports(block: int) -> Callable[[Mapping[str, int], str, Target], tuple[bool, str]]:
    def check(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
        k, t = dims["K"], dims["T"]
        if k % P:
            return False, f"K={k} is not a multiple of {P}"
        itemsize = 2 if dtype == "bfloat16" else 4
        # x^T for all tokens and one x row tile; double-buffered weight block and output tile.
        need = itemsize * ((k // P) * t + k + 2 * ((k // P) * block + block))
        if need > target.sbuf_usable_bytes_per_partition:
            return False, f"T={t}, K={k} need {need} B per partition of SBUF, {target.name} has {target.sbuf_usable_bytes_per_partition}"
        return True, f"K a multiple of {P}, {need} B per partition of SBUF"

    return check


def _launcher(block: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``w`` arrives prepared: W^T [K, N]."""
        return linear_kernel(x, w, block=block)

    return linear


def variants() -> list[Variant]:
    return [
        Variant(op="linear", name="linear_nki_trn2", targets=("trn2",), kernel=_launcher(512), nki=True,
                priority=10, supports=_supports(512), tolerance=LINEAR_TOLERANCE,
                prepare={"w": weight_k_major},
                description="K-major weight, tokens stationary, 512-column moving blocks (one PSUM bank)"),
        Variant(op="linear", name="linear_nki_trn3", targets=("trn3",), kernel=_launcher(1024), nki=True,
                priority=10, supports=_supports(1024), tolerance=LINEAR_TOLERANCE,
                prepare={"w": weight_k_major},
                description="K-major weight, tokens stationary, 1024-column moving blocks (NC-v4 wide moving)"),
    ]


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
