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
instructions and stationary loads, which Trn2 cannot run. A tile is live from its allocation to
its last use (in the emulator as in the compiler), so a loop's accumulator and output tile are
free for the next iteration once its copy and store have read them; an fp32 [128, 1024]
accumulator takes two of PSUM's eight 2 KiB banks.

Decode on both cores of an LNC=2 rank (``linear_tkg_lnc2_*``, a few tokens): the single-core kernel
reads a column block's weight in one DMA of 2 KiB rows and starts its matmuls only when the
whole block has arrived.
The LNC=2 kernel (same K-major weight) gives each physical core half of the contraction rows when
N <= 2048, laid partition-major so that a partition's rows are one contiguous run of the weight
(the cores then swap their fp32 partial sums with ``sendrecv``), and half of the columns for wider
outputs (lm_head), read in 2048-column chunks (4 KiB runs). Every weight DMA moves 512 KiB at the
engines' full rate over all 16 engines of its core, into a ring of SBUF slots deep enough that
the next transfers are queued while TensorE works on the last one (the DMA fixed cost overlaps).
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
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return out
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


#: Weight bytes per partition of one LNC=2 weight DMA (128 partitions: 512 KiB per transfer, the
#: DMA guide's full-rate size per partition).
LNC_CHUNK_BYTES = 4096
#: Ring slots of weight chunks in SBUF: DMAs in flight ahead of TensorE.
LNC_RING = 4
#: Most tokens of the LNC=2 decode kernel (x^T is a DMA of short runs per token).
LNC_MAX_TOKENS = 8
#: Widest output the LNC=2 kernel splits by contraction rows (its fp32 [T, N] accumulator is half
#: of PSUM); wider outputs are split by columns.
LNC_SPLIT_K_MAX_N = 2048


def lnc_share(k: int, n: int, program: int, cores: int = 2) -> tuple[int, int, int, int]:
    """What program ``program`` of the LNC=2 linear computes: ``(first contraction row, rows,
    first column, columns)``. Up to ``LNC_SPLIT_K_MAX_N`` output columns each core takes half the
    contraction rows (every weight row is then one run of N elements, and the partial sums are
    added across the cores); wider outputs are split by columns."""
    if n <= LNC_SPLIT_K_MAX_N and n % cores == 0 and k % (P * cores) == 0:
        return program * k // cores, k // cores, 0, n
    share = -(-n // cores)
    lo = min(n, program * share)
    return 0, k, lo, min(n, lo + share) - lo


@nki.jit
def linear_lnc_kernel(x, w_t, block: int = 512):
    """``y[T, N] = x[T, K] @ w_t[K, N]`` on the programs of ``kernel[2]``, each taking the
    contraction rows and output columns ``lnc_share`` gives it.

    Dimensions: T tokens (few), K contraction (multiple of 128), N output features (any).
    Args: x [T, K] HBM; w_t [K, N] HBM (K-major weight, as ``linear_kernel``); block: moving
    columns per matmul (512 on Trn2, 1024 on Trn3).
    Returns: y [T, N] HBM in x.dtype.

    A core's rows are partition-major (partition p holds rows base + p*kc .. base + p*kc + kc - 1):
    a DMA of r of them and w columns reads r runs of w elements per partition, or one run of r*N
    when w = N. Chunks hold ``LNC_CHUNK_BYTES`` per partition and stream into a ring of SBUF slots.
    """
    t, k = x.shape
    n = w_t.shape[1]
    me, cores = nl.program_id(0), nl.num_programs(0)
    base, rows, lo, cols = lnc_share(k, n, me, cores)
    split_k = rows < k
    kc = rows // P
    # a slot holds one chunk, a moving block, and (split by rows) at least one whole weight row
    per_slot = max(LNC_CHUNK_BYTES // (2 if w_t.dtype == nl.bfloat16 else 4), block, cols if split_k else 0)
    group = cols if split_k else per_slot  # columns of one accumulator
    step = max(1, min(kc, per_slot // cols)) if split_k else 1  # rows per partition of one DMA
    out = nl.ndarray((t, n), dtype=x.dtype, buffer=nl.shared_hbm)
    x_t = nl.ndarray((P, t, kc), dtype=x.dtype, buffer=nl.sbuf)  # x_t[p, :, j] = x[:, base + p*kc + j]
    nisa.dma_copy(dst=x_t, src=x[:, base:base + rows].reshape((t, P, kc)).permute((1, 0, 2)))
    ring = nl.ndarray((P, LNC_RING, per_slot), dtype=w_t.dtype, buffer=nl.sbuf)
    # This core's result, stored once at the end (a small store between the weight loads would
    # hold every DMA engine for its completion semaphore); fp32 partial sums when split by rows.
    y = nl.ndarray((P, max(cols, 1)), dtype=nl.float32 if split_k else x.dtype, buffer=nl.sbuf)
    chunk = 0
    for g0 in nl.static_range(lo, lo + cols, group):
        gw = min(group, lo + cols - g0)
        acc = nl.ndarray((P, group), dtype=nl.float32, buffer=nl.psum)
        for j0 in nl.static_range(0, kc, step):
            r = min(step, kc - j0)
            slot = ring[:, chunk % LNC_RING, 0:r * gw].reshape((P, r, gw))
            chunk += 1
            nisa.dma_copy(dst=slot, src=w_t.ap([[kc * n, P], [n, r], [1, gw]], offset=(base + j0) * n + g0))
            for j in nl.affine_range(r):
                for b in nl.affine_range(-(-gw // block)):
                    bw = min(block, gw - b * block)
                    nisa.nc_matmul(dst=acc[0:t, b * block:b * block + bw], stationary=x_t[:, :, j0 + j],
                                   moving=slot[:, j, b * block:b * block + bw], accumulate=(j0 + j > 0))
        if not split_k:
            nisa.tensor_copy(dst=y[0:t, g0 - lo:g0 - lo + gw], src=acc[0:t, 0:gw])
    if split_k:  # one accumulator of all N: send the peer's half of it, add the peer's to this core's half
        half = n // cores
        mine, peers = slice(me * half, (me + 1) * half), slice((1 - me) * half, (2 - me) * half)
        nisa.tensor_copy(dst=y[0:t, 0:half], src=acc[0:t, peers])
        theirs = nl.ndarray((P, half), dtype=nl.float32, buffer=nl.sbuf)
        nisa.sendrecv(src=y[0:t, 0:half], dst=theirs[0:t], send_to_rank=1 - me, recv_from_rank=1 - me, pipe_id=0)
        lo, cols = me * half, half
        y = nl.ndarray((P, half), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=y[0:t], data1=acc[0:t, mine], data2=theirs[0:t], op=nl.add)  # fp32 sum, one rounding
    if cols:
        nisa.dma_copy(dst=out[:, lo:lo + cols], src=y[0:t, 0:cols])
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
        slots = LNC_RING * max(LNC_CHUNK_BYTES // itemsize, block, min(dims["N"], LNC_SPLIT_K_MAX_N))
        need = itemsize * ((k // P) * t + slots) + 4 * 3 * min(dims["N"], LNC_SPLIT_K_MAX_N) + itemsize * -(-dims["N"] // 2)
        if need > target.sbuf_usable_bytes_per_partition:
            return False, f"K={k} needs {need} B per partition of SBUF, {target.name} has {target.sbuf_usable_bytes_per_partition}"
        how = "contraction rows" if lnc_share(k, dims["N"], 0)[1] < k else "columns"
        return True, f"LNC=2, T <= {LNC_MAX_TOKENS}: half the {how} per core, 512 KiB weight DMAs; {need} B per partition"

    return check


def _lnc_launcher(block: int) -> Callable[..., torch.Tensor]:
    def linear(x: torch.Tensor, w: torch.Tensor, lnc: int = 2) -> torch.Tensor:
        """``w`` arrives prepared: W^T [K, N]. The kernel splits its work over the programs of any
        grid (one program does it all), so it launches on the rank's ``lnc``."""
        return linear_lnc_kernel[lnc](x, w, block=block)

    return linear


def _launcher(block: int) -> Callable[..., torch.Tensor]:
    def linear(x: torch.Tensor, w: torch.Tensor, lnc: int = 1) -> torch.Tensor:
        """``w`` arrives prepared: W^T [K, N]."""
        return linear_kernel[lnc](x, w, block=block)

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
                prepare={"w": weight_k_major},
                description=f"decode on both cores of an LNC=2 rank: half the contraction rows (N <= "
                            f"{LNC_SPLIT_K_MAX_N}) or columns each, 512 KiB weight DMAs into a {LNC_RING}-slot ring, "
                            f"{block}-column moving blocks")
        for target, block in (("trn2", 512), ("trn3", 1024))
    ]


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
