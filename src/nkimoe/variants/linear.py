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

Decode on both cores of an LNC=2 rank (``linear_tkg_lnc2_*``, a few tokens): the single-core kernel
reads a column block's weight in one DMA of 2 KiB rows (a descriptor per 2 KiB costs more engine
time than the bytes at 23-33 B/ns) and starts its matmuls only when the whole block has arrived.
The LNC=2 kernel gives each physical core half of the output columns (``kernel[2]``, one shared
output, disjoint columns, so no barrier), and lays the weight out at load time in column blocks
whose rows for one partition are one contiguous run (``weight_column_blocks``): every weight DMA
moves about 1 MiB as 128 runs of ~8 KiB, at the engines' full rate, spread over all 16 engines
of its core, into a ring of SBUF slots deep enough that the next transfers are already queued
while TensorE works on the last one (the DMA fixed cost overlaps). The contraction axis is
partition-major (partition p holds rows p*K/128 .. p*K/128 + K/128 - 1), so x^T is one DMA of
K/128-element runs.
"""

from __future__ import annotations

import functools
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


#: Weight bytes per partition of one LNC=2 weight DMA (128 partitions: ~1 MiB per transfer, well
#: above the DMA guide's full-rate size of a few KiB per partition).
LNC_CHUNK_BYTES = 4096
#: Ring slots of weight chunks in SBUF: DMAs in flight ahead of TensorE.
LNC_RING = 4
#: Most tokens of the LNC=2 decode kernel (x^T is a DMA of K/128-element runs per token).
LNC_MAX_TOKENS = 8


def column_blocks(n: int, block: int, cores: int = 2) -> list[list[tuple[int, int]]]:
    """Per core, its column blocks ``(first column, width)``: core c takes the c-th of ``cores``
    near-equal column ranges, cut into blocks of at most ``block`` columns."""
    share = -(-n // cores)
    out = []
    for c in range(cores):
        lo, hi = min(n, c * share), min(n, (c + 1) * share)
        out.append([(c0, min(block, hi - c0)) for c0 in range(lo, hi, block)])
    return out


def weight_column_blocks(w: torch.Tensor, block: int) -> torch.Tensor:
    """Load-time layout of the LNC=2 kernel: ``W [N, K]`` -> the column blocks of ``column_blocks``
    one after the other, block ``(c0, width)`` stored as [128, K/128, width] with element [p, j, c] =
    ``W[c0 + c, p * K/128 + j]``. Returned with shape [N, K] (same bytes, same count)."""
    n, k = w.shape
    parts = [w[c0:c0 + width].t().reshape(P, k // P, width).reshape(-1)
             for blocks in column_blocks(n, block) for c0, width in blocks]
    return torch.cat(parts).reshape(n, k)


def chunk_elements(block: int, itemsize: int) -> int:
    """Elements per partition of one weight DMA (a ring slot) of the LNC=2 kernel: at least one
    row of a block."""
    return max(LNC_CHUNK_BYTES // itemsize, block)


def _chunks(blocks: list[tuple[int, int]], kt: int, per_slot: int) -> list[tuple[int, int, int, int]]:
    """The weight DMAs of one core in order: ``(first column, width, first row, rows)`` over the
    K/128 contraction rows of each block, as many rows as a slot holds."""
    out = []
    for c0, width in blocks:
        rows = max(1, min(kt, per_slot // width))
        out += [(c0, width, j0, min(rows, kt - j0)) for j0 in range(0, kt, rows)]
    return out


@nki.jit
def linear_lnc_kernel(x, w_blocks, block: int = 512):
    """``y[T, N] = x[T, K] @ W^T``, the output columns split over the programs of ``kernel[2]``.

    Dimensions: T tokens (few), K contraction (multiple of 128), N output features (any).
    Args: x [T, K] HBM; w_blocks [N, K] HBM in ``weight_column_blocks(W, block)`` layout; block:
    moving columns per matmul (512 on Trn2, 1024 on Trn3).
    Returns: y [T, N] HBM in x.dtype.
    """
    t, k = x.shape
    n = w_blocks.shape[0]
    kt = k // P
    per_slot = chunk_elements(block, 2 if w_blocks.dtype == nl.bfloat16 else 4)
    out = nl.ndarray((t, n), dtype=x.dtype, buffer=nl.shared_hbm)
    x_t = nl.ndarray((P, t, kt), dtype=x.dtype, buffer=nl.sbuf)  # x_t[p, :, j] = x[:, p * kt + j]
    nisa.dma_copy(dst=x_t, src=x.reshape((t, P, kt)).permute((1, 0, 2)))
    ring = nl.ndarray((P, LNC_RING, per_slot), dtype=w_blocks.dtype, buffer=nl.sbuf)
    blocks = column_blocks(n, block, nl.num_programs(0))[nl.program_id(0)]
    lo, hi = (blocks[0][0], blocks[-1][0] + blocks[-1][1]) if blocks else (0, 0)
    # This core's output columns, stored in one DMA at the end: a small store between the weight
    # loads would hold every DMA engine for its completion semaphore.
    y = nl.ndarray((P, max(hi - lo, 1)), dtype=x.dtype, buffer=nl.sbuf)
    chunks = _chunks(blocks, kt, per_slot)
    for i in nl.static_range(len(chunks)):
        c0, width, j0, rows = chunks[i]
        if j0 == 0:
            acc = nl.ndarray((P, block), dtype=nl.float32, buffer=nl.psum)
        slot = ring[:, i % LNC_RING, 0:rows * width].reshape((P, rows, width))
        nisa.dma_copy(dst=slot, src=w_blocks.ap([[kt * width, P], [width, rows], [1, width]], offset=c0 * k + j0 * width))
        for j in nl.affine_range(rows):
            nisa.nc_matmul(dst=acc[0:t, 0:width], stationary=x_t[:, :, j0 + j], moving=slot[:, j, :],
                           accumulate=(j0 + j > 0))
        if j0 + rows == kt:  # the block's last rows: round its columns
            nisa.tensor_copy(dst=y[0:t, c0 - lo:c0 - lo + width], src=acc[0:t, 0:width])
    if hi > lo:
        nisa.dma_copy(dst=out[:, lo:hi], src=y[0:t, 0:hi - lo])
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


def _lnc_supports(block: int) -> Callable[[Mapping[str, int], str, Target], tuple[bool, str]]:
    def check(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
        k, t = dims["K"], dims["T"]
        if target.lnc != 2:
            return False, f"{target.name} runs LNC={target.lnc}: this kernel splits the columns over the 2 physical cores of an LNC=2 rank"
        if k % P:
            return False, f"K={k} is not a multiple of {P}"
        if t > LNC_MAX_TOKENS:
            return False, f"T={t} > {LNC_MAX_TOKENS}: a decode kernel (x^T read by a strided DMA)"
        itemsize = 2 if dtype == "bfloat16" else 4
        need = itemsize * ((k // P) * t + LNC_RING * chunk_elements(block, itemsize) + -(-dims["N"] // 2))
        if need > target.sbuf_usable_bytes_per_partition:
            return False, f"K={k} needs {need} B per partition of SBUF, {target.name} has {target.sbuf_usable_bytes_per_partition}"
        return True, f"LNC=2, T <= {LNC_MAX_TOKENS}: half the columns per core, ~1 MiB weight DMAs; {need} B per partition"

    return check


def _lnc_launcher(block: int) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    def linear(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``w`` arrives prepared: ``weight_column_blocks(W, block)``."""
        return linear_lnc_kernel[2](x, w, block=block)

    return linear


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
    ] + [
        Variant(op="linear", name=f"linear_tkg_lnc2_{target}", targets=(target,), kernel=_lnc_launcher(block),
                nki=True, priority=12, supports=_lnc_supports(block), tolerance=LINEAR_TOLERANCE,
                prepare={"w": functools.partial(weight_column_blocks, block=block)},
                description=f"decode on both cores of an LNC=2 rank: half the columns each, contiguous ~1 MiB "
                            f"weight DMAs into a {LNC_RING}-slot ring, {block}-column moving blocks")
        for target, block in (("trn2", 512), ("trn3", 1024))
    ]


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
