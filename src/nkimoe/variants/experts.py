"""MoE expert MLP (SwiGLU over the selected experts, weighted and summed): NKI kernels for Trn2
and Trn3, decode (a few tokens) and prefill (tokens grouped by expert).

Weight layout (load time, part of the variants): ``w_gate_up [E, 2I, H] -> [E, H, 2I]`` and
``w_down [E, H, I] -> [E, I, H]``, contraction-major, so that one expert's gate|up block is one
[128, H/128, 2I] DMA with 2I*2 = 3 KiB contiguous per partition row, and its down block one
[128, I/128, H] DMA with 4 KiB rows (the DMA guide's >= 2 KiB for full rate). Experts are chosen
at run time: the expert id is a dynamic ``scalar_offset`` of the weight access pattern, so only
the selected experts' bytes are read.

The intermediate axis need not be a multiple of 128: a tensor-parallel rank's slice (768 over
TP 4: 192) runs as full partition tiles plus a ragged last one (64 rows) that every matmul over
the intermediate axis contracts on its first I % 128 partitions only, so no rank reads padding.
Both kernels read gate|up with the hidden rows partition-major (partition p holds rows
p*H/128 ... p*H/128 + H/128 - 1), one contiguous run per partition however narrow 2I is.

Rounding: gate and up are accumulated in fp32 PSUM and rounded to x.dtype, SiLU(gate) is
rounded, and SiLU(gate)*up is rounded, exactly where the reference rounds (the SwiGLU product is
the bit-exact cut point). The down projection, the routing weight and the sum over experts stay
in fp32 and are rounded once at the end, where the reference rounds twice more per (token, slot)
(the expert's output and its weighted output) before its fp32 sum: the kernel is the more
accurate of the two, and their difference is bounded by those roundings.

Decode (``_tkg``): weights are the stationary operand (128 output features per matmul) and the
token column streams, so results land with features on partitions and the down projection needs
no transpose; HBM-bandwidth-bound by design. The same kernel is best on both targets (no Trn3-only
instruction shortens a bandwidth-bound GEMV), so it is registered for both. The down projection's
stationary reads every H/128-th weight column, so that partition p of output tile c holds hidden
p * H/128 + c and the output is stored in runs of H/128 elements. On an LNC=2 rank the same kernel
runs as ``kernel[2]`` (``expert_mlp_tkg_lnc2_*``): each core reads half of the selected experts.
At a TP 4 slice (I = 192) the last 64 rows of each down block would be a DMA over 64 partitions,
half the DMA engines: two experts' share one 128-partition gather DMA (``decode_experts``), and
the second expert's last gate|up matmuls take columns 64..191 so that its features 128..191 land
on partitions 64..127 next to its rows.

Decode, tokens stationary (``_tkg_tokens``): the launcher lists the distinct selected experts and,
per expert, every token's routing weight (0 for tokens that did not choose it); a dynamic loop
reads each listed expert once and applies it to all T <= 128 tokens, x^T the stationary and the
weight columns streaming 512 (Trn2) or 1024 (Trn3) at a time, into an fp32 SBUF accumulator.
When each design wins (TensorE takes max(N, 64) cycles per matmul of N moving columns, a quarter
of max(M, 64) to load a stationary of M columns): for one token the weights-stationary kernel
spends about half the TensorE time per weight tile (a 32-cycle load and a 64-cycle matmul against
128 moving columns) and keeps SwiGLU and the weighting on [128, few] tiles, so it wins at every
slice width (I = 768, 192, 96 at TP 1, 4, 8); with more tokens the tokens-stationary kernel reads
each shared expert once where the other reads one per (token, slot), the tokens' stationary
costs nothing extra up to 128, and it avoids the prefill kernel's per-block HBM accumulator.

Prefill (``_cte``): the launcher sorts the (token, slot) pairs by expert and cuts them into blocks
of up to 128 tokens of one expert; only blocks of experts that received tokens exist, and the
kernel runs a dynamic loop over them (``nl.dynamic_range`` on a register), gathering the block's
token rows with a ``vector_offset`` DMA, computing SwiGLU with tokens on partitions, and
accumulating weighted results into an fp32 HBM buffer by gather-add-scatter (token indices are
unique within a block). Trn2 streams 512 weight columns per matmul (one PSUM bank); Trn3 streams
1024 (NeuronCore-v4 wide moving tiles), which Trn2 cannot run.
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
#: Tokens per prefill block (one partition tile).
BLOCK = 128
#: Most tokens of the weights-stationary decode kernel (an expert pass per token and slot).
TKG_MAX_TOKENS = 4

#: bf16: the reference rounds more often than the kernel (see the module docstring), each
#: at most half an ulp of values up to the output's magnitude: 2 ulps relative (2^-6) plus an
#: absolute floor of 2 ulps at the expert outputs' scale (|y| < 1 here: 2 * 2^-8) for outputs
#: that cancel. fp32: summation order only.
EXPERT_TOLERANCE = {"bfloat16": (2.0**-7, 2.0**-6), "float32": (1e-5, 1e-5)}


def gate_up_h_major(w_gate_up: torch.Tensor) -> torch.Tensor:
    """Load-time layout: ``[E, 2I, H] -> [E, H, 2I]`` contiguous."""
    return w_gate_up.transpose(1, 2).contiguous()


def down_i_major(w_down: torch.Tensor) -> torch.Tensor:
    """Load-time layout: ``[E, H, I] -> [E, I, H]`` contiguous."""
    return w_down.transpose(1, 2).contiguous()


def _intermediate_tiles(i: int) -> tuple[int, int, int]:
    """The intermediate axis in partition tiles: ``(tiles, full tiles, rows of the last tile)``;
    192 (768 over TP 4) is one full tile and one of 64 rows."""
    tiles = -(-i // P)
    return tiles, i // P, i - (tiles - 1) * P


def _gate_up_block(w_gu, expert):  # noqa: ANN001, ANN202
    """Expert ``expert``'s gate|up block [128, H/128, 2I], hidden rows partition-major (dynamic offset)."""
    _, h, i2 = w_gu.shape
    hf = h // P
    return w_gu.ap([[hf * i2, P], [i2, hf], [1, i2]], offset=0, scalar_offset=expert, indirect_dim=0)


def load_expert(w_gu, w_dn, expert, h: int, i2: int, ragged: bool = True):  # noqa: ANN001, ANN202
    """DMA one expert's gate|up [128, H/128, 2I] and down [128, ceil(I/128), H] blocks into SBUF
    (a ragged last down tile fills its first I % 128 partitions only; ``ragged=False`` leaves it to
    the caller and returns the full tiles only); ``expert`` is a [1, 1] SBUF tensor or register
    holding the expert id (dynamic offset).

    Gate|up hidden rows go to partitions partition-major, ``h = p * H/128 + k`` at [p, k]: each
    partition reads one contiguous run of H/128 rows (12 KiB at I = 192, where a single row is
    768 B, below the DMA's full-rate size); the moving operand must use the same hidden order."""
    tiles, full, last = _intermediate_tiles(i2 // 2)
    hf = h // P
    gu = nl.ndarray((P, hf, i2), dtype=w_gu.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=gu, src=_gate_up_block(w_gu, expert))
    dn = nl.ndarray((P, tiles if ragged else full, h), dtype=w_dn.dtype, buffer=nl.sbuf)
    if full:
        nisa.dma_copy(dst=dn[:, 0:full, :], src=w_dn.ap([[h, P], [P * h, full], [1, h]], offset=0,
                                                        scalar_offset=expert, indirect_dim=0))
    if ragged and full < tiles:
        nisa.dma_copy(dst=dn[0:last, full, :], src=w_dn.ap([[h, last], [1, h]], offset=full * P * h,
                                                           scalar_offset=expert, indirect_dim=0))
    return gu, dn


def _hidden_partition_major(rows, t: int):  # noqa: ANN001, ANN202
    """x^T [128, H/128, t] of token rows ``rows`` [>= t, H] (SBUF) in the weights' partition-major
    hidden order: ``x_t[p, k, token]`` holds hidden p * H/128 + k (TensorE transposes reading the
    rows with a stride of H/128 elements)."""
    hf = rows.shape[1] // P
    x_t = nl.ndarray((P, hf, t), dtype=rows.dtype, buffer=nl.sbuf)
    by_k = rows[0:t].reshape((t, P, hf)).permute((0, 2, 1))
    for kk in nl.affine_range(hf):
        pe_transpose(x_t[:, kk, :], by_k[:, kk, :])
    return x_t


def _routing_to_sbuf(ids, weights):  # noqa: ANN001, ANN202
    """The decode kernels' routing inputs in SBUF: the expert ids [1, T*K] int32 (one row), and the
    routing weights broadcast to all partitions, [128, T*K] fp32 (a stride-0 DMA)."""
    n = ids.shape[0] * ids.shape[1]
    ids_row = nl.ndarray((1, n), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=ids_row, src=ids.reshape((1, n)))
    w_bc = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=w_bc, src=weights.reshape((1, n)).ap([[0, P], [1, n]]))
    return ids_row, w_bc


def on_all_partitions(row):  # noqa: ANN001, ANN201
    """The fp32 SBUF row ``row`` [1, n] on every partition, [128, n] fp32, by a ones-matmul in fp32
    (exact: products with 1.0)."""
    n = row.shape[1]
    ones = nl.ndarray((1, P), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0)
    ps = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=ps, stationary=ones, moving=row)
    bc = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=bc, src=ps)
    return bc


def _pairs_ragged_tiles(i: int) -> bool:
    """Whether two experts' ragged last down tiles (I % 128 rows each) share one DMA over twice the
    partitions: a full tile before it (the second expert's gate|up columns then end at I) and a
    ragged tile of at most 64 rows at a 32-partition boundary (192 = 128 + 64: one 128-partition DMA
    instead of two over 64 partitions, i.e. 8 of the 16 DMA engines)."""
    _, full, last = _intermediate_tiles(i)
    return full >= 1 and 0 < last and 2 * last <= P and last % 32 == 0


def _load_ragged(w_dn, ids_bc, cols: list[int]):  # noqa: ANN001, ANN202
    """Rows 128*full ... I-1 of the down blocks of the experts ``ids_bc[:, cols]`` (ids [128, n] fp32,
    each on every partition) in one gather DMA, expert k's on partitions k*r ... k*r + r - 1 (r = I % 128)."""
    e, i, h = w_dn.shape
    _, full, last = _intermediate_tiles(i)
    n = len(cols)
    rows = _expert_rows(ids_bc, cols, last, i, full * P)
    tail = nl.ndarray((n * last, h), dtype=w_dn.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tail, src=w_dn.reshape((e * i, h)).ap([[h, n * last], [1, h]], offset=0, vector_offset=rows,
                                                            indirect_dim=0))
    return tail


def _expert_rows(ids_bc, cols: list[int], per: int, stride: int, first: int):  # noqa: ANN001, ANN202
    """Gather offsets [len(cols) * per, 1] int32: partition k*per + q reads row
    ``id_k * stride + first + q`` (id_k = ``ids_bc[:, cols[k]]``, fp32 on every partition)."""
    n = len(cols)
    base = nl.ndarray((n * per, n), dtype=nl.int32, buffer=nl.sbuf)  # column k: first + p - k*per
    nisa.iota(dst=base, pattern=[[-per, n]], offset=first, channel_multiplier=1)
    rows = nl.ndarray((n * per, 1), dtype=nl.int32, buffer=nl.sbuf)
    for k, col in enumerate(cols):
        part = slice(k * per, (k + 1) * per)
        nisa.tensor_scalar(dst=rows[part], data=ids_bc[part, col:col + 1], op0=nl.multiply, operand0=float(stride),
                           op1=nl.add, operand1=base[part, k:k + 1])
    return rows


def _gate_up_act(gu, x_col, p0: int, act, tail_act, dtype):  # noqa: ANN001, ANN202
    """Gate|up of one expert on one token (weights stationary, features on partitions), rounded to
    ``dtype``, and SiLU(gate) * up rounded, into ``act`` [128, full] (intermediate tile t in column t)
    and, for a ragged last tile, ``tail_act`` [p0 + r, 1] at partitions p0 ... p0 + r - 1: its gate|up
    matmuls take the 128-aligned columns that end at I when p0 > 0, so that the features land there."""
    i = gu.shape[2] // 2
    tiles, full, last = _intermediate_tiles(i)
    ps = nl.ndarray((P, 2 * tiles), dtype=nl.float32, buffer=nl.psum)  # gate tiles, then up tiles
    for g in range(2):
        for t in range(tiles):
            rows = P if t < full else p0 + last
            first = g * i + (t * P if t < full else i - rows)
            matmul_accumulate(ps[0:rows, g * tiles + t:g * tiles + t + 1], gu[:, :, first:first + rows], x_col)
    gu_out = nl.ndarray((P, 2 * tiles), dtype=dtype, buffer=nl.sbuf)
    staged = (gu_out.reshape((P, 2, tiles)), ps.reshape((P, 2, tiles)))
    for part, lo, hi, dst in ((slice(0, P), 0, full, act), (slice(p0, p0 + last), full, tiles, tail_act)):
        if hi > lo:
            nisa.tensor_copy(dst=staged[0][part, :, lo:hi], src=staged[1][part, :, lo:hi])
            nisa.activation(dst=dst[part], op=nl.silu, data=gu_out[part, lo:hi])
            nisa.tensor_tensor(dst=dst[part], data1=dst[part], data2=gu_out[part, tiles + lo:tiles + hi], op=nl.multiply)
    return gu_out, ps


def decode_experts(w_gu, w_dn, jobs, ids_bc, w_bc, dtype) -> list:  # noqa: ANN001
    """Weights-stationary SwiGLU of the selected experts on single tokens, summed into fp32
    accumulators: ``acc += weight * down(SiLU(gate) * up)`` per job, gate|up and SiLU(gate)*up
    rounded to ``dtype``.

    Args: w_gu [E, H, 2I], w_dn [E, I, H] HBM (load-time layout); jobs: (expert, col, x_col, acc)
    per selected expert: the id as a [1, 1] SBUF tensor (dynamic DMA offset), its column in
    ``ids_bc`` / ``w_bc``, the token [128, H/128, 1] in the weights' partition-major hidden order,
    and the fp32 accumulator [128, H/128], column c holding hidden p * H/128 + c on partition p (the
    down projection's stationary reads every H/128-th weight column, so that the output rows are
    runs of H/128 elements); ids_bc [128, n] fp32 every job's expert id on all partitions (read where
    ragged tiles are paired); w_bc [128, n] fp32 the routing weights likewise.

    Per group of jobs (two where ``_pairs_ragged_tiles``, else one) the DMAs are issued first, in the
    order of use (gate|up, full down tiles, then the group's ragged down rows in one DMA); TensorE
    runs every job's gate|up and full-tile down matmuls before the ragged rows' matmuls, which take
    the group's experts at once (one column each, zeros against the other expert's rows).
    Returns the last group's tiles: a caller's loop keeps them until the next iteration's are
    allocated, so that consecutive experts use different buffers (as the compiler double-buffers
    the tiles of a loop body).
    """
    h, i2 = w_dn.shape[2], w_gu.shape[2]
    hf = h // P
    tiles, full, last = _intermediate_tiles(i2 // 2)
    paired = _pairs_ragged_tiles(i2 // 2)
    held: list = []
    for first in range(0, len(jobs), 2 if paired else 1):
        group = jobs[first:first + (2 if paired else 1)]
        n = len(group)
        blocks = [load_expert(w_gu, w_dn, expert, h, i2, ragged=not paired) for expert, _, _, _ in group]
        tail = None
        if full < tiles:
            tail = _load_ragged(w_dn, ids_bc, [col for _, col, _, _ in group]) if paired else blocks[0][1][0:last, full, :]
        tail_act = nl.ndarray((n * last, n), dtype=dtype, buffer=nl.sbuf)
        if n > 1:
            nisa.memset(dst=tail_act, value=0.0)
        y = nl.ndarray((P, hf, n), dtype=nl.float32, buffer=nl.psum)  # job k's down output in [:, :, k]
        held = [tail_act, y]
        for k, ((_, _, x_col, _), (gu, dn)) in enumerate(zip(group, blocks)):
            act = nl.ndarray((P, max(full, 1)), dtype=dtype, buffer=nl.sbuf)
            held += [act, *_gate_up_act(gu, x_col, k * last, act, tail_act[:, k:k + 1], dtype)]
            by_tile = dn.reshape((P, dn.shape[1], P, hf)).permute((0, 1, 3, 2))  # [k, tile, c, m]: weight column m*hf + c
            for c in nl.affine_range(hf):
                for t in range(full):
                    nisa.nc_matmul(dst=y[:, c, k:k + 1], stationary=by_tile[:, t, c, :], moving=act[:, t:t + 1],
                                   accumulate=t > 0)
        if tail is not None:
            tail_by = tail.reshape((n * last, P, hf)).permute((0, 2, 1))
            for c in nl.affine_range(hf):
                nisa.nc_matmul(dst=y[:, c, :], stationary=tail_by[:, c, :], moving=tail_act, accumulate=full > 0)
        for k, (_, col, _, acc) in enumerate(group):
            nisa.scalar_tensor_tensor(dst=acc, data=y[:, :, k], op0=nl.multiply, operand0=w_bc[:, col:col + 1],
                                      op1=nl.add, operand1=acc)
    return held


def splits_hidden(i: int, h: int, slots: int, cores: int) -> bool:
    """Whether ``decode_experts_split`` takes the shape: two cores with pairs of slots each, an
    intermediate axis of whole 64-row groups up to 256 (a TP >= 3 slice of 768; two pairs of
    gate|up blocks and four pairs' down halves then fit SBUF), a hidden axis of whole 256 columns."""
    return cores == 2 and i % (P // 2) == 0 and i <= 2 * P and h % (2 * P) == 0 and slots % 4 == 0


def _pair_activations(gu, x_col, dtype):  # noqa: ANN001, ANN202
    """SiLU(gate) * up of a pair of experts ``gu`` [128, 2, H/128, 2I] on the token ``x_col``
    [128, H/128, 1], rounded to ``dtype`` where ``_gate_up_act`` rounds, as the down projection's
    moving operand [128, r, 2]: feature r*q + j of expert k at [64k + q, j, k], zeros at [64k + q, j,
    1 - k] (r = I/64; each gate|up stationary takes 64 columns of both experts)."""
    half, hf, i = P // 2, gu.shape[2], gu.shape[3] // 2
    r = i // half
    by_feature = gu.reshape((P, 2, hf, 2, half, r))  # [p, expert, k, gate|up, q, j]: feature r*q + j
    ps = nl.ndarray((P, 2, r), dtype=nl.float32, buffer=nl.psum)
    for g in range(2):
        for j in range(r):
            for k in nl.affine_range(hf):
                nisa.nc_matmul(dst=ps[:, g, j:j + 1], stationary=by_feature[:, :, k, g, :, j], moving=x_col[:, k, :],
                               accumulate=k > 0)
    gu_out = nl.ndarray((P, 2, r), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=gu_out, src=ps)
    act = nl.ndarray((P, r, 2), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=act, value=0.0, engine=nisa.engine.gpsimd)
    for k in range(2):
        rows = slice(k * half, (k + 1) * half)
        nisa.activation(dst=act[rows, :, k], op=nl.silu, data=gu_out[rows, 0, :])
        nisa.tensor_tensor(dst=act[rows, :, k], data1=act[rows, :, k], data2=gu_out[rows, 1, :], op=nl.multiply)
    return act


def _exchange(mine, pipe: int):  # noqa: ANN001, ANN202
    """The other program's tile of the same shape, sent ``mine`` in exchange (``sendrecv``)."""
    me = nl.program_id(0)
    theirs = nl.ndarray(mine.shape, dtype=mine.dtype, buffer=nl.sbuf)
    nisa.sendrecv(src=mine, dst=theirs, send_to_rank=1 - me, recv_from_rank=1 - me, pipe_id=pipe)
    return theirs


def split_sbuf_bytes(dims: Mapping[str, int]) -> int:
    """Per partition, bf16: ``decode_experts_split``'s gate|up tiles (two experts per pair of a
    core's K/2 slots) and down halves (r rows of H/2 for every pair of the K slots)."""
    pairs, hf, r = dims["K"] // 2, dims["H"] // P, dims["I"] // (P // 2)
    return 2 * (pairs * hf * 2 * dims["I"] + pairs * r * dims["H"] // 2)


def decode_experts_split(out, w_gu, w_dn, ids, ids_bc, w_bc, x_col) -> None:  # noqa: ANN001
    """The selected experts on one token over the two cores of an LNC=2 rank, split by hidden output
    instead of by expert, so that no partial sums are swapped after the last weight byte.

    Each core computes SiLU(gate) * up for its slots (me, me + 2, ...; gate|up read as in
    ``load_expert``) and sends it to the other while the weights stream; each then reads its half of
    the hidden columns of every selected expert's down block (2 KiB runs) and sums
    ``weight * down(act)`` over all of them for that half. Two experts share each down DMA: a gather
    of 128 partitions, r = I/64 rows of one expert per partition (expert k's rows r*q ... r*q + r - 1
    on partition 64k + q), so a pair's activations lie the same way: feature r*q + j of expert k on
    partition 64k + q, column j (the gate|up stationary reads every r-th column).

    Args: out [1, H] HBM; w_gu [E, H, 2I], w_dn [E, I, H] HBM; ids: per slot the id as a [1, 1]
    SBUF tensor (dynamic offset); ids_bc, w_bc [128, K] fp32 the ids and routing weights on every
    partition; x_col the token [128, H/128, 1] in the weights' partition-major hidden order.
    Stores this core's half of ``out`` [1, H] (HBM; summed in fp32, rounded to out.dtype once), from
    [128, H/256] with hidden me*H/2 + p*H/256 + c at [p, c]."""
    e, i, h = w_dn.shape
    dtype = out.dtype
    half, hf = P // 2, h // P
    r, hf2 = i // half, hf // 2
    me = nl.program_id(0)

    def pairs(core: int) -> list[tuple[int, int]]:
        return [(s, s + 2) for s in range(core, len(ids), 4)]

    own, theirs = pairs(me), pairs(1 - me)
    gus = []
    for pair in own:  # one tile per pair, expert outermost (each DMA writes its own byte range)
        gu = nl.ndarray((P, 2, hf, 2 * i), dtype=w_gu.dtype, buffer=nl.sbuf)
        for k, slot in enumerate(pair):
            nisa.dma_copy(dst=gu[:, k], src=_gate_up_block(w_gu, ids[slot]))
        gus.append(gu)
    rows = [_expert_rows(ids_bc, list(pair), half, half, 0) for pair in own + theirs]
    # program order places each exchange after the transfers that end before its data is ready:
    # the pair's activations go out between two weight transfers, not in front of one
    acts = [_pair_activations(gus[0], x_col, dtype)]
    got = [_exchange(acts[0], 1)]
    downs = []
    for offsets in rows:
        dn = nl.ndarray((P, r, h // 2), dtype=w_dn.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=dn, src=w_dn.reshape((e * half, r * h)).ap([[r * h, P], [h, r], [1, h // 2]],
                                                                     offset=me * (h // 2), vector_offset=offsets,
                                                                     indirect_dim=0))
        downs.append(dn)
    for q, gu in enumerate(gus[1:], start=1):
        acts.append(_pair_activations(gu, x_col, dtype))
        got.append(_exchange(acts[q], 1 + q))
    acc = nl.ndarray((P, hf2), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    res = nl.ndarray((P, hf2), dtype=out.dtype, buffer=nl.sbuf)
    jobs = list(zip(own + theirs, downs, acts + got))
    for n, (pair, dn, act) in enumerate(jobs):
        by_tile = dn.reshape((P, r, P, hf2))  # [row, j, m, c]: hidden column m*hf2 + c of this half
        y = nl.ndarray((P, hf2, 2), dtype=nl.float32, buffer=nl.psum)
        for c in nl.affine_range(hf2):
            matmul_accumulate(y[:, c, :], by_tile[:, :, :, c], act)
        for k, slot in enumerate(pair):
            last = n == len(jobs) - 1 and k == 1  # the last product is rounded as it is added
            nisa.scalar_tensor_tensor(dst=res if last else acc, data=y[:, :, k], op0=nl.multiply,
                                      operand0=w_bc[:, slot:slot + 1], op1=nl.add, operand1=acc)
    nisa.dma_copy(dst=out.reshape((2, P, hf2))[me], src=res)


@nki.jit
def expert_mlp_tkg_kernel(x, weights, ids, w_gu, w_dn):
    """Decode: every token's top-K experts, one at a time, weights stationary; on one core, or on
    both cores of an LNC=2 rank (``kernel[2]``): the (token, slot) pairs dealt out to the programs,
    each core reading only its experts; the cores swap their fp32 partial sums (``sendrecv``), add
    them in the same order and each stores half of the hidden columns.

    Dimensions: T tokens (few), H hidden (a multiple of 128), I intermediate, E experts, K top-k.
    Args: x [T, H] HBM; weights [T, K] HBM x.dtype; ids [T, K] HBM int32; w_gu [E, H, 2I] and
    w_dn [E, I, H] HBM (load-time layout).
    Returns: [T, H] HBM, x.dtype. The down projection's output tile c holds hidden p * H/128 + c on
    partition p, so the output store reads H/128-element runs.
    """
    t, h = x.shape
    top_k = ids.shape[1]
    hf = h // P
    me, cores = nl.program_id(0), nl.num_programs(0)
    mine = [(tok, slot) for tok in range(t) for slot in range(top_k)][me::cores]
    out = nl.ndarray((t, h), dtype=x.dtype, buffer=nl.shared_hbm)
    ids_row, w_bc = _routing_to_sbuf(ids, weights)
    # x^T, hidden partition-major, one run of H/128 elements per (partition, token): [128, T, H/128]
    x_t = nl.ndarray((P, t, hf), dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=x_t, src=x.reshape((t, P, hf)).permute((1, 0, 2)))
    ids_bc = None
    if _pairs_ragged_tiles(w_gu.shape[2] // 2):  # paired ragged tiles gather by every partition's expert id
        ids_f32 = nl.ndarray((1, t * top_k), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=ids_f32, src=ids_row)
        ids_bc = on_all_partitions(ids_f32)
    acc = nl.ndarray((P, t, hf), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    cols = [(tok, tok * top_k + slot) for tok, slot in mine]
    jobs = [(ids_row[0:1, col:col + 1], col, x_t[:, tok:tok + 1, :].permute((0, 2, 1)), acc[:, tok, :])
            for tok, col in cols]
    held = decode_experts(w_gu, w_dn, jobs, ids_bc, w_bc, x.dtype)  # noqa: F841
    swap_and_store(out, acc)
    return out


def swap_and_store(out, acc) -> None:  # noqa: ANN001
    """Round the fp32 partial sums ``acc`` [128, T, H/128] (hidden p * H/128 + c at [p, :, c]) to
    out.dtype and store them to ``out`` [T, H] (HBM). Under LNC=2 the two programs first swap their
    partial sums (``sendrecv``) and add them (fp32 a + b == b + a: both hold the same sum), then each
    stores half of the hidden columns."""
    t, hf = acc.shape[1], acc.shape[2]
    me, cores = nl.program_id(0), nl.num_programs(0)
    if cores > 1:
        theirs = nl.ndarray((P, t, hf), dtype=nl.float32, buffer=nl.sbuf)
        nisa.sendrecv(src=acc, dst=theirs, send_to_rank=1 - me, recv_from_rank=1 - me, pipe_id=0)
        nisa.tensor_tensor(dst=acc, data1=acc, data2=theirs, op=nl.add)
    lo, hi = me * hf // cores, (me + 1) * hf // cores
    if hi > lo:  # a hidden size of one 128-row tile leaves the first program nothing to store
        res = nl.ndarray((P, t, hf), dtype=out.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res[:, :, lo:hi], src=acc[:, :, lo:hi])
        nisa.dma_copy(dst=out.reshape((t, P, hf)).permute((1, 0, 2))[:, :, lo:hi], src=res[:, :, lo:hi])


def _count_register(count_hbm):  # noqa: ANN001, ANN202
    """A register holding the int32 count ``count_hbm`` [1, 1] (HBM): a dynamic loop's trip count."""
    count = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=count, src=count_hbm)
    reg = nisa.register_alloc()
    nisa.register_load(reg, count)
    return reg


def _table_entry(table, index):  # noqa: ANN001, ANN202
    """Entry ``index`` (a loop register) of the int32 table [N] (HBM) as a [1, 1] SBUF tile."""
    entry = nl.ndarray((1, 1), dtype=nl.int32, buffer=nl.sbuf)
    nisa.dma_copy(dst=entry, src=table.ap([[1, 1], [1, 1]], offset=0, scalar_offset=index, indirect_dim=0))
    return entry


@nki.jit
def expert_mlp_cte_kernel(x, n_blocks, block_expert, block_tokens, block_weights, w_gu, w_dn, block: int = 512):
    """Prefill: blocks of up to 128 tokens of one expert, only for experts that received tokens.

    Dimensions: T tokens, H hidden (a multiple of 128), I intermediate, NB block slots.
    Args: x [T + 1, H] HBM (row T is zeros: padding rows of a block point at it); n_blocks [1, 1]
    int32 (blocks in use); block_expert [NB, 1] int32; block_tokens [NB, 128] int32 token rows;
    block_weights [NB, 128] fp32 routing weights (0 for padding); w_gu [E, H, 2I], w_dn [E, I, H]
    (load-time layout); block: weight columns per matmul (512 on Trn2, 1024 on Trn3).
    Returns: [T, H] HBM, x.dtype.
    """
    t1, h = x.shape
    t = t1 - 1
    i2 = w_gu.shape[2]
    i = i2 // 2
    hf = h // P
    tiles, _, last = _intermediate_tiles(i)
    acc = nl.ndarray((t1, h), dtype=nl.float32, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return nl.ndarray((t, h), dtype=x.dtype, buffer=nl.shared_hbm)  # the output, as program 0 allocates it
    zeros = nl.ndarray((P, h), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=zeros, value=0.0)
    for r in nl.affine_range((t1 + P - 1) // P):
        rows = min(P, t1 - r * P)
        nisa.dma_copy(dst=acc[r * P:r * P + rows, :], src=zeros[0:rows])
    for b in nl.dynamic_range(_count_register(n_blocks)):
        expert = _table_entry(block_expert, b)
        gu, dn = load_expert(w_gu, w_dn, expert, h, i2)
        tok = nl.ndarray((P, 1), dtype=nl.int32, buffer=nl.sbuf)
        nisa.dma_copy(dst=tok, src=block_tokens.ap([[1, P], [1, 1]], offset=0, scalar_offset=b, indirect_dim=0))
        wt = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=wt, src=block_weights.ap([[1, P], [1, 1]], offset=0, scalar_offset=b, indirect_dim=0))
        rows = nl.ndarray((P, h), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows, src=x.ap([[h, P], [1, h]], offset=0, vector_offset=tok, indirect_dim=0))
        x_t = _hidden_partition_major(rows, P)
        gu_out = nl.ndarray((P, i2), dtype=x.dtype, buffer=nl.sbuf)
        for c in nl.affine_range((i2 + block - 1) // block):
            cols = min(block, i2 - c * block)
            ps = nl.ndarray((P, block), dtype=nl.float32, buffer=nl.psum)
            matmul_accumulate(ps[:, 0:cols], x_t, gu[:, :, c * block:c * block + cols])
            nisa.tensor_copy(dst=gu_out[:, c * block:c * block + cols], src=ps[:, 0:cols])
        act = nl.ndarray((P, i), dtype=x.dtype, buffer=nl.sbuf)
        nisa.activation(dst=act, op=nl.silu, data=gu_out[:, 0:i])
        nisa.tensor_tensor(dst=act, data1=act, data2=gu_out[:, i:i2], op=nl.multiply)
        act_t = nl.ndarray((P, tiles, P), dtype=x.dtype, buffer=nl.sbuf)
        for kk in nl.affine_range(tiles):
            rows_i = min(P, i - kk * P)
            pe_transpose(act_t[0:rows_i, kk, :], act[:, kk * P:kk * P + rows_i])
        prev = nl.ndarray((P, h), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=prev, src=acc.ap([[h, P], [1, h]], offset=0, vector_offset=tok, indirect_dim=0))
        for c in nl.affine_range((h + block - 1) // block):
            cols = min(block, h - c * block)
            ps = nl.ndarray((P, block), dtype=nl.float32, buffer=nl.psum)
            matmul_accumulate(ps[:, 0:cols], act_t, dn[:, :, c * block:c * block + cols], last_rows=last)
            nisa.scalar_tensor_tensor(dst=prev[:, c * block:c * block + cols], data=ps[:, 0:cols], op0=nl.multiply,
                                      operand0=wt, op1=nl.add, operand1=prev[:, c * block:c * block + cols])
        nisa.dma_copy(dst=acc.ap([[h, P], [1, h]], offset=0, vector_offset=tok, indirect_dim=0), src=prev)
    out = nl.ndarray((t, h), dtype=x.dtype, buffer=nl.shared_hbm)
    for r in nl.affine_range((t + P - 1) // P):
        rows_n = min(P, t - r * P)
        a = nl.ndarray((P, h), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=a[0:rows_n], src=acc[r * P:r * P + rows_n, :])
        y = nl.ndarray((P, h), dtype=x.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=y[0:rows_n], src=a[0:rows_n])
        nisa.dma_copy(dst=out[r * P:r * P + rows_n, :], src=y[0:rows_n])
    return out


@nki.jit
def expert_mlp_tokens_kernel(x, n_used, slot_expert, slot_weights, w_gu, w_dn, block: int = 512):
    """Decode, tokens stationary: each selected expert read once and applied to all T tokens.

    Dimensions: T tokens (<= 128), H hidden (a multiple of 128), I intermediate, S expert slots.
    Args: x [T, H] HBM; n_used [1, 1] int32 (slots in use); slot_expert [S, 1] int32 (distinct
    experts first); slot_weights [S, T] fp32 (token t's routing weight for the slot's expert, 0
    if t did not choose it); w_gu [E, H, 2I], w_dn [E, I, H] (load-time layout); block: weight
    columns per matmul (512 on Trn2, 1024 on Trn3).
    Returns: [T, H] HBM, x.dtype.
    """
    t, h = x.shape
    i2 = w_gu.shape[2]
    i = i2 // 2
    hf = h // P
    tiles, _, last = _intermediate_tiles(i)
    # The stationary: x^T in the weights' partition-major hidden order, read column by column for a
    # few tokens (2-byte runs, a few KiB), from contiguous rows and transposed on TensorE for more.
    if t <= TKG_MAX_TOKENS:
        x_t = nl.ndarray((P, hf, t), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=x_t, src=x.reshape((t, P, hf)).permute((1, 2, 0)))
    else:
        rows = nl.ndarray((P, h), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=rows[0:t], src=x)
        x_t = _hidden_partition_major(rows, t)
    acc = nl.ndarray((P, h), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc[0:t], value=0.0)
    for s in nl.dynamic_range(_count_register(n_used)):
        expert = _table_entry(slot_expert, s)
        wt = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=wt[0:t], src=slot_weights.ap([[1, t], [1, 1]], offset=0, scalar_offset=s, indirect_dim=0))
        gu, dn = load_expert(w_gu, w_dn, expert, h, i2)
        gu_out = nl.ndarray((P, i2), dtype=x.dtype, buffer=nl.sbuf)
        for c in nl.affine_range((i2 + block - 1) // block):
            cols = min(block, i2 - c * block)
            ps = nl.ndarray((P, block), dtype=nl.float32, buffer=nl.psum)
            matmul_accumulate(ps[0:t, 0:cols], x_t, gu[:, :, c * block:c * block + cols])
            nisa.tensor_copy(dst=gu_out[0:t, c * block:c * block + cols], src=ps[0:t, 0:cols])
        act = nl.ndarray((P, i), dtype=x.dtype, buffer=nl.sbuf)
        nisa.activation(dst=act[0:t], op=nl.silu, data=gu_out[0:t, 0:i])
        nisa.tensor_tensor(dst=act[0:t], data1=act[0:t], data2=gu_out[0:t, i:i2], op=nl.multiply)
        act_t = nl.ndarray((P, tiles, t), dtype=x.dtype, buffer=nl.sbuf)
        for kk in nl.affine_range(tiles):
            rows_i = min(P, i - kk * P)
            pe_transpose(act_t[0:rows_i, kk, :], act[0:t, kk * P:kk * P + rows_i])
        for c in nl.affine_range((h + block - 1) // block):
            cols = min(block, h - c * block)
            ps = nl.ndarray((P, block), dtype=nl.float32, buffer=nl.psum)
            matmul_accumulate(ps[0:t, 0:cols], act_t, dn[:, :, c * block:c * block + cols], last_rows=last)
            nisa.scalar_tensor_tensor(dst=acc[0:t, c * block:c * block + cols], data=ps[0:t, 0:cols], op0=nl.multiply,
                                      operand0=wt[0:t], op1=nl.add, operand1=acc[0:t, c * block:c * block + cols])
    out = nl.ndarray((t, h), dtype=x.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return out
    y = nl.ndarray((P, h), dtype=x.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=y[0:t], src=acc[0:t])
    nisa.dma_copy(dst=out, src=y[0:t])
    return out


def expert_slots(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """The distinct selected experts and each token's routing weight for them.

    Returns ``n_used [1, 1]`` int32, ``slot_expert [S, 1]`` int32 (the used experts in ascending
    order, then unused ones) and ``slot_weights [S, T]`` fp32 (0 where a token did not choose the
    slot's expert), S = min(E, T*K). Tensor operations with shapes fixed by (T, K, E) only, so a
    traced graph computes them at run time.
    """
    t, k = ids.shape
    experts = torch.arange(num_experts, dtype=torch.int64)
    chosen = ids.to(torch.int64)[:, :, None] == experts[None, None, :]  # [T, K, E]
    used = chosen.any(dim=(0, 1))
    slots = min(num_experts, t * k)
    slot_expert = torch.argsort((~used).to(torch.int8), stable=True)[:slots]
    dense = (chosen * weights.to(torch.float32)[:, :, None]).sum(dim=1)  # [T, E]
    return (used.sum().reshape(1, 1).to(torch.int32), slot_expert.reshape(-1, 1).to(torch.int32),
            dense[:, slot_expert].t().contiguous())


def expert_blocks(ids: torch.Tensor, weights: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, ...]:
    """Group (token, slot) pairs by expert into blocks of up to 128 tokens of one expert.

    Returns ``n_blocks [1, 1]``, ``block_expert [NB, 1]``, ``block_tokens [NB, 128]`` (padding
    rows point at token T, a zero row) and ``block_weights [NB, 128]`` (fp32, 0 for padding), with
    NB = the static worst case ``ceil(T*K/128) + min(E, T*K)``; only the first ``n_blocks`` are used
    (later slots name expert E-1 and hold padding rows only).

    Built from tensor operations with shapes fixed by (T, K, E) and no value-dependent Python
    control flow, so that a traced graph (torch-xla on a Neuron device) computes it at run time.
    """
    t, k = ids.shape
    pairs = t * k
    flat_ids = ids.reshape(-1).to(torch.int64)
    order = torch.argsort(flat_ids, stable=True)
    sorted_tokens = (order // k).to(torch.int32)
    sorted_weights = weights.reshape(-1)[order].to(torch.float32)
    experts = torch.arange(num_experts, dtype=torch.int64)
    counts = (flat_ids[:, None] == experts[None, :]).sum(dim=0)
    first_pair = torch.cumsum(counts, 0) - counts  # where each expert's pairs start in sorted order
    blocks_per_expert = (counts + BLOCK - 1) // BLOCK
    blocks_end = torch.cumsum(blocks_per_expert, 0)
    n_blocks = blocks_end[-1]
    slots = -(-pairs // BLOCK) + min(num_experts, pairs)
    slot = torch.arange(slots, dtype=torch.int64)
    slot_expert = (slot[:, None] >= blocks_end[None, :]).sum(dim=1).clamp(max=num_experts - 1)
    block_in_expert = slot - (blocks_end - blocks_per_expert)[slot_expert]
    row = block_in_expert[:, None] * BLOCK + torch.arange(BLOCK, dtype=torch.int64)[None, :]
    valid = (row < counts[slot_expert][:, None]) & (slot < n_blocks)[:, None]
    pair = (first_pair[slot_expert][:, None] + row).clamp(max=pairs - 1)
    block_tokens = torch.where(valid, sorted_tokens[pair], torch.full_like(sorted_tokens[pair], t))
    block_weights = torch.where(valid, sorted_weights[pair], torch.zeros_like(sorted_weights[pair]))
    return (n_blocks.reshape(1, 1).to(torch.int32), slot_expert.reshape(-1, 1).to(torch.int32),
            block_tokens.to(torch.int32), block_weights)


# --- launchers ----------------------------------------------------------------------------------


def _dims_ok(dims: Mapping[str, int]) -> str | None:
    if dims["H"] % P:
        return f"H={dims['H']} must be a multiple of {P}"
    return None


def _expert_sbuf_bytes(dims: Mapping[str, int]) -> int:
    """One expert's gate|up and down blocks per partition, double-buffered, bf16."""
    return 2 * 2 * (dims["H"] // P * 2 * dims["I"] + _intermediate_tiles(dims["I"])[0] * dims["H"])


def _tkg_supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    problem = _dims_ok(dims)
    if problem:
        return False, problem
    if dims["T"] > TKG_MAX_TOKENS:
        return False, f"T={dims['T']} > {TKG_MAX_TOKENS}: a decode kernel (one expert pass per token and slot)"
    need = _expert_sbuf_bytes(dims) * (2 if dtype == "float32" else 1)
    if need > target.sbuf_usable_bytes_per_partition:
        return False, f"expert blocks need {need} B per partition, {target.name} has {target.sbuf_usable_bytes_per_partition}"
    return True, f"T <= {TKG_MAX_TOKENS}; expert blocks {need} B per partition"


def lnc2_supports(supports: Callable[[Mapping[str, int], str, Target], tuple[bool, str]]
                  ) -> Callable[[Mapping[str, int], str, Target], tuple[bool, str]]:
    """``supports`` of a decode kernel that deals the selected experts out to the two physical cores
    of an LNC=2 rank, for that kernel as a variant of its own: ineligible where the target runs
    another LNC."""
    def check(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
        if target.lnc != 2:
            return False, f"{target.name} runs LNC={target.lnc}: this kernel deals the experts out to the 2 physical cores of an LNC=2 rank"
        ok, reason = supports(dims, dtype, target)
        return (ok, f"LNC=2, half the experts per core; {reason}" if ok else reason)

    return check


def _tokens_supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    problem = _dims_ok(dims)
    if problem:
        return False, problem
    if dims["T"] > P:
        return False, f"T={dims['T']} > {P}: the tokens are one stationary tile"
    item = 2 if dtype == "bfloat16" else 4
    tokens_t, activations = dims["H"] // P * dims["T"], 3 * dims["I"]
    need = _expert_sbuf_bytes(dims) * item // 2 + 4 * dims["H"] + item * (tokens_t + activations)
    if need > target.sbuf_usable_bytes_per_partition:
        return False, f"needs {need} B per partition, {target.name} has {target.sbuf_usable_bytes_per_partition}"
    return True, f"T <= {P}; each selected expert read once for all tokens; {need} B per partition"


def _cte_supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    problem = _dims_ok(dims)
    if problem:
        return False, problem
    item = 2 if dtype == "bfloat16" else 4
    need = _expert_sbuf_bytes(dims) * item // 2 + 4 * dims["H"] * item + 4 * dims["I"] * item
    if need > target.sbuf_usable_bytes_per_partition:
        return False, f"needs {need} B per partition, {target.name} has {target.sbuf_usable_bytes_per_partition}"
    return True, f"any token count; {need} B per partition"


def _tkg_launcher(programs: int) -> Callable[..., torch.Tensor]:
    def expert_mlp(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gu: torch.Tensor,
                   w_dn: torch.Tensor, lnc: int = programs) -> torch.Tensor:
        """The kernel deals the experts out to the programs of any grid: it launches on the rank's ``lnc``."""
        return expert_mlp_tkg_kernel[lnc](x, weights, ids.to(torch.int32), w_gu, w_dn)

    return expert_mlp


def _cte_launcher(block: int) -> Callable[..., torch.Tensor]:
    def expert_mlp(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gu: torch.Tensor,
                   w_dn: torch.Tensor, lnc: int = 1) -> torch.Tensor:
        n_blocks, block_expert, block_tokens, block_weights = expert_blocks(ids, weights, w_gu.shape[0])
        x_pad = torch.cat([x, torch.zeros(1, x.shape[1], dtype=x.dtype)])
        return expert_mlp_cte_kernel[lnc](x_pad, n_blocks, block_expert, block_tokens, block_weights, w_gu, w_dn,
                                          block=block)

    return expert_mlp


def _tokens_launcher(block: int) -> Callable[..., torch.Tensor]:
    def expert_mlp(x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor, w_gu: torch.Tensor,
                   w_dn: torch.Tensor, lnc: int = 1) -> torch.Tensor:
        n_used, slot_expert, slot_weights = expert_slots(ids, weights, w_gu.shape[0])
        return expert_mlp_tokens_kernel[lnc](x, n_used, slot_expert, slot_weights, w_gu, w_dn, block=block)

    return expert_mlp


_PREPARE = {"w_gate_up": gate_up_h_major, "w_down": down_i_major}


def variants() -> list[Variant]:
    return [
        Variant(op="expert_mlp", name="expert_mlp_tkg_nki", targets=("trn2", "trn3"), kernel=_tkg_launcher(1), nki=True,
                priority=20, supports=_tkg_supports, tolerance=EXPERT_TOLERANCE, prepare=_PREPARE,
                description="decode: selected experts only (dynamic DMA by id), weights stationary, fp32 sum"),
        *(Variant(op="expert_mlp", name=f"expert_mlp_tkg_lnc2_{target}", targets=(target,), kernel=_tkg_launcher(2),
                  nki=True, priority=22, supports=lnc2_supports(_tkg_supports), tolerance=EXPERT_TOLERANCE,
                  prepare=_PREPARE,
                  description="decode on both cores of an LNC=2 rank: half the selected experts each, weights "
                              "stationary, partial sums swapped by sendrecv")
          for target in ("trn2", "trn3")),
        Variant(op="expert_mlp", name="expert_mlp_tkg_tokens_trn2", targets=("trn2",),
                kernel=_tokens_launcher(512), nki=True, priority=15, supports=_tokens_supports, tolerance=EXPERT_TOLERANCE, prepare=_PREPARE,
                description="decode: tokens stationary, each selected expert read once for all tokens, "
                            "512-column matmuls"),
        Variant(op="expert_mlp", name="expert_mlp_tkg_tokens_trn3", targets=("trn3",),
                kernel=_tokens_launcher(1024), nki=True, priority=15, supports=_tokens_supports, tolerance=EXPERT_TOLERANCE, prepare=_PREPARE,
                description="decode: tokens stationary, each selected expert read once for all tokens, "
                            "1024-column matmuls (NC-v4)"),
        Variant(op="expert_mlp", name="expert_mlp_cte_trn2", targets=("trn2",), kernel=_cte_launcher(512), nki=True,
                priority=10, supports=_cte_supports, tolerance=EXPERT_TOLERANCE, prepare=_PREPARE,
                description="prefill: 128-token blocks per expert, empty experts skipped, 512-column matmuls"),
        Variant(op="expert_mlp", name="expert_mlp_cte_trn3", targets=("trn3",), kernel=_cte_launcher(1024), nki=True,
                priority=10, supports=_cte_supports, tolerance=EXPERT_TOLERANCE, prepare=_PREPARE,
                description="prefill: 128-token blocks per expert, empty experts skipped, 1024-column matmuls (NC-v4)"),
    ]


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
