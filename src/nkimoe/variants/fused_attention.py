"""The decode attention block in one NKI kernel, for Trn2 and Trn3: residual add + RMSNorm ->
fused q|k|v projection -> QK-norm -> RoPE -> attention over the KV cache and the new position ->
o_proj, with every activation kept in SBUF between the stages.

Layout, stage by stage (T = 1):

- add + RMSNorm: x, the residual and the norm weight arrive spread over the 128 partitions
  (hidden p*H/128 + j on partition p, slot j: the layout of the projection's contraction), one
  DMA each (eight 32-byte descriptors per DMA engine, a few ns each), converted to fp32 on the
  way; x and the residual are summed in fp32 and rounded once, as the reference adds; the sum of
  squares crosses partitions through a ones-matmul (``norms.spread_normalize``).
- q|k|v projection, weights stationary: per head, the [128 (hidden), D] tiles of its block
  (``head_blocks``: a contiguous run of H/128 x D values per partition and head) against the
  token's column accumulate the head as a column [D, 1] in fp32 PSUM, so that q, k and v land
  with head_dim on the partitions, rounded once.
- QK-norm and RoPE on those columns: the sum of squares over head_dim by an fp32 ones-matmul
  (which leaves it on every partition), the weights, cos and sin as per-partition fp32 scalars
  (each loaded as one column), rotate-half as a matmul with a +-1 matrix (exact); ten
  [128, heads] steps.
- attention with the keys on the partitions (``attention.attend_by_key``): the cache of every KV
  head in two DMAs (``load_caches_by_key``), the new position one more key column (its key in column 0
  of a zero K^T tile, its value in row 0 of a zero V tile), masked at the run-time ``length``;
  the output lands as O^T [D, Hq].
- o_proj: weights stationary (``output_on_partitions``): per output slot c and head h, a
  [128 (d), 128] tile of ``W_o`` against the O^T column of head h accumulates outputs
  p*H/128 + c on partition p, slot by slot in the order W_o arrives. One token moves one column
  per matmul (64 cycles at the minimum, plus 32 to load the stationary) where streaming the
  weight as 128 moving columns against a one-token stationary takes 128, and the result lands
  spread over the partitions, a short copy and a full-width store instead of an H-wide row on one
  partition.

DMA order: the loads go out in the order of use (x, the residual and the norm weight, the q|k|v
weights, the QK stage's small operands, the cache, then W_o), into tiles allocated up front where
they fit (``RESIDENT_BYTES``, ``CACHE_BYTES``), so the weight and cache traffic overlaps the norm,
the projections, the QK stage and the attention. A DMA queue starts at most one transfer every
~850 ns however small, so the eight small operands cost more queue time than their bytes: under
LNC=2 each program loads four (``SMALL_OPERANDS``) and the two exchange them. An on-chip transfer
or a store holds every DMA engine for a moment, and a load cannot straddle it: the exchanges are
issued where the load queue leaves the engines idle (behind a small load, behind the cache) and
the stores behind the loads. Instructions that wait for late operands come after the projections
in program order (each engine runs in order). Estimates and what bounds them: README, "Fused
decode attention block".

LNC=2 (``kernel[2]``, Trn2 and Trn3 ranks): each program loads half of the small operands and the
two swap them, the norm's before it (``sendrecv``, while the first q|k|v weights arrive); program p
projects the p-th half of the q|k|v heads (every weight byte is read once), the two programs swap
their projected columns in fp32 with the QK stage's operands (while the cache arrives) and round
them once, both run QK-norm, RoPE and the attention for every head (so nothing
is exchanged after the attention), and each computes half of the o_proj output slots from its
half of ``W_o``, which goes out behind the swap. Arithmetic and rounding are those of the
one-program kernel.

Rounding: as the chain of the part kernels (each stage rounds to the activation dtype where the
reference does); sums run in other orders and the attention keeps fp32 scores (see
``attention.py``), so outputs agree within ``BLOCK_TOLERANCE``. Caches too long for one PSUM bank
of keys-on-partitions scores (more than 8064 positions at 8 query heads per KV head) take the
one-pass kernel's 512-key blocks instead (``_attend_by_block``).

Per target: Trn3 computes exp with VectorE's fast exponential, squares and RoPE's sin products
on ScalarE (doubled BF16 rate, beside VectorE); Trn2 keeps them on ScalarE exp and VectorE. Trn3's
wide moving tiles and BF16 PSUM do not apply: the projections of one token move one column per
matmul and every accumulation is fp32.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from nkimoe.hookspecs import hookimpl
from nkimoe.nki import nisa, nki, nl
from nkimoe.registry import Variant
from nkimoe.targets import Target
from nkimoe.variants.attention import (
    DECODE_BLOCK,
    _running_state,
    _share,
    attend_by_key,
    by_key_constants,
    attend_cache_block,
    cache_penalty,
    decode_block,
    decode_blocks,
    decode_over_cache,
    key_columns,
    key_penalty,
    length_on_partitions,
    load_cache_block,
    load_cache_by_key,
    load_caches_by_key,
    normalized,
)
from nkimoe.variants.norms import spread_normalize
from nkimoe.variants.tiles import matmul_accumulate, pe_transpose

P = 128

#: bf16. ``summed`` is one bf16 add, bit-exact. ``k`` and ``v`` carry the projection's tolerance
#: (one rounding of a reordered fp32 sum: 1 ulp) through QK-norm (two roundings, whose inputs may
#: differ by that ulp: 2 + 1 ulps) and RoPE (three roundings of products of those): a few bf16
#: ulps, 2^-5 relative plus the norm's 1e-3 floor, below. ``out`` sums Hq*D products of attention
#: outputs (each within the attention tolerance, 2e-2 + 2^-6 relative at |v| ~ 1, not correlated
#: in sign) with o_proj weights of magnitude ~1/sqrt(Hq*D): its error stays at the attention's
#: absolute scale, and the projection adds its own 1 ulp; 3e-2 absolute and 2^-5 relative cover
#: both with the q/k perturbation of the scores (a few ulps of q.k*scale ~ 1e-2 per probability).
BLOCK_TOLERANCE = {"bfloat16": (3e-2, 2.0**-5), "float32": (1e-4, 1e-4)}


def head_blocks(w: torch.Tensor) -> torch.Tensor:
    """Load-time layout of the q|k|v weight ``W [N, H]``: ``[N/128, 128, H/128, 128]``, block c (one
    head at D = 128) holding columns c*128 .. of ``W^T`` with hidden index p*H/128 + j on (partition
    p, slot j), the decode-norm layout of the token: one contiguous run per partition and head."""
    n, k = w.shape
    return w.reshape(n // P, P, P, k // P).permute(0, 2, 3, 1).contiguous()


def output_on_partitions(w: torch.Tensor) -> torch.Tensor:
    """Load-time layout of ``W_o [H, K]`` for a weights-stationary projection of one token:
    ``[128 (d), H/128 (c), K/128 (h), 128 (p)]`` holding ``W_o[p*H/128 + c, h*128 + d]``, so that
    tile (c, h) is the stationary [k = h*128 + d, output p*H/128 + c] and the output lands with
    hidden index p*H/128 + c on partition p (the decode-norm layout). One contiguous run per partition."""
    h, k = w.shape
    return w.reshape(P, h // P, k // P, P).permute(3, 1, 2, 0).contiguous()


def _load(dst, w_blocks, per_load: int) -> None:  # noqa: ANN001
    """DMA ``w_blocks`` [nb, 128, KT, W] (HBM, ``head_blocks``) into ``dst`` [128, nb, KT, W] (SBUF),
    ``per_load`` blocks per transfer (one contiguous run of KT*W values per partition and block)."""
    nb = w_blocks.shape[0]
    for load in nl.affine_range((nb + per_load - 1) // per_load):
        first = load * per_load
        last = min(nb, first + per_load)
        nisa.dma_copy(dst=dst[:, first:last], src=w_blocks[first:last].permute((1, 0, 2, 3)))


def _weight_blocks(w_blocks, resident):  # noqa: ANN001, ANN202
    """The weight blocks w_blocks [heads, 128, H/128, D] (HBM, ``head_blocks``), one [128, H/128, D]
    SBUF tile per head in order: from ``resident`` [128, heads, H/128, D] when given (loaded earlier
    by ``_load``), otherwise loaded here ``QKV_HEADS_PER_LOAD`` at a time into double-buffered tiles."""
    heads, _, kt, d = w_blocks.shape
    for load in nl.affine_range((heads + QKV_HEADS_PER_LOAD - 1) // QKV_HEADS_PER_LOAD):
        a = load * QKV_HEADS_PER_LOAD
        b = min(heads, a + QKV_HEADS_PER_LOAD)
        if resident is None:
            w_sb = nl.ndarray((P, QKV_HEADS_PER_LOAD, kt, d), dtype=w_blocks.dtype, buffer=nl.sbuf)
            _load(w_sb[:, 0:b - a], w_blocks[a:b], QKV_HEADS_PER_LOAD)
        else:
            w_sb = resident[:, a:b]
        for i in range(b - a):
            yield w_sb[:, i]


#: The block's small operands, by program (``kernel[2]``: an LNC=2 pair splits them): those that
#: travel before the norm (``early``: the residual add's and the norm's inputs, and under LNC=2 the
#: length, so that the mask is ready early) and those that travel with the projected heads
#: (``late``: the QK stage's). A DMA queue starts at most one transfer every ~850 ns, however small,
#: so each program loads only its own (one DMA each) and the two exchange them (``sendrecv``) while
#: the weights stream or beside the heads they exchange anyway. Each program's early operands are
#: two loads, so that both sides of an exchange are ready at the same time.
SMALL_OPERANDS = {
    1: ((("x", "residual", "norm_weight"), ("q_norm_weight", "k_norm_weight", "cos", "sin", "length")),),
    2: ((("x", "norm_weight"), ("q_norm_weight", "k_norm_weight")), (("residual", "length"), ("cos", "sin"))),
}

#: The small operands spread over the partitions (hidden p*H/128 + j on partition p, slot j); the
#: others are columns (head_dim on the partitions) and the length one value on partition 0.
_SPREAD = ("x", "residual", "norm_weight")


def _small_columns(names, f: int, tile, start: int) -> dict:  # noqa: ANN001
    """Where each of ``names`` lives in ``tile`` [128, W] (fp32, SBUF): consecutive columns from
    ``start``, ``f`` for a spread operand, one otherwise."""
    where = {}
    for name in names:
        width = f if name in _SPREAD else 1
        where[name] = tile[:, start:start + width]
        start += width
    return where


def _load_small(where: Mapping, sources: Mapping, names) -> None:  # noqa: ANN001
    """One DMA per operand of ``names`` from HBM (``sources``) into its place (``where``), converted to
    fp32 on the way: spread rows as [128, H/128], vectors as one column, the length on partition 0."""
    for name in names:
        src, dst = sources[name], where[name]
        if name == "length":
            nisa.dma_copy(dst=dst[0:1, :], src=src)
        else:
            nisa.dma_copy(dst=dst, src=src.reshape(dst.shape))


def _rotate_half_matrix(d: int, dtype):  # noqa: ANN001, ANN202
    """The stationary [d, d] of rotate-half on a column: -1 at (m + d/2, m), +1 at (m - d/2, m)."""
    rot = nl.ndarray((d, d), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=rot, value=0.0, engine=nisa.engine.gpsimd)
    for offset, value in ((-(d // 2), -1.0), (d // 2, 1.0)):
        nisa.affine_select(dst=rot, pattern=[[-1, d]], channel_multiplier=1, offset=offset, on_true_tile=rot,
                           on_false_value=value, cmp_op=nl.not_equal)
    return rot


def _qk_columns(dst, x, vectors, nq: int, ones_f32, rot, eps: float, square_on_scalar: bool,  # noqa: ANN001
                sin_on_scalar: bool) -> None:
    """QK-norm then RoPE of the q and k heads held as columns (head_dim on the partitions):
    ``x`` [D, rows] (SBUF, the rounded projection; the first ``nq`` columns q, the rest k) into
    ``dst`` [D, rows] (SBUF). ``vectors``: the q and k norm weights, cos and sin, each a [D, 1] fp32
    column (per-partition scalars). The sum of squares over head_dim crosses the partitions through
    an fp32 ones-matmul (which leaves it on every partition), rotate-half is a +-1 matmul (exact).
    Rounding as the reference: the normalised value, the weight product, both
    RoPE products and their sum are each rounded once to the activation dtype."""
    d, rows = x.shape
    dtype = dst.dtype
    q_weight, k_weight, cos, sin = vectors
    sq = nl.ndarray((d, rows), dtype=nl.float32, buffer=nl.sbuf)
    if square_on_scalar:
        nisa.activation(dst=sq, op=nl.square, data=x)
    else:
        nisa.tensor_tensor(dst=sq, data1=x, data2=x, op=nl.multiply)
    total = nl.ndarray((d, rows), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=total, stationary=ones_f32, moving=sq)
    rstd = nl.ndarray((d, rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=rstd, data=total, op0=nl.multiply, operand0=1.0 / d, op1=nl.add, operand1=eps)
    nisa.activation(dst=rstd, op=nl.rsqrt, data=rstd)
    normed = nl.ndarray((d, rows), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=normed, data1=x, data2=rstd, op=nl.multiply)
    for a, b, w in ((0, nq, q_weight), (nq, rows, k_weight)):
        nisa.tensor_scalar(dst=normed[:, a:b], data=normed[:, a:b], op0=nl.multiply, operand0=w)
    turned = nl.ndarray((d, rows), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=turned, stationary=rot, moving=normed)
    by_cos = nl.ndarray((d, rows), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=by_cos, data=normed, op0=nl.multiply, operand0=cos)
    by_sin = nl.ndarray((d, rows), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=by_sin, data=turned, op0=nl.multiply, operand0=sin,
                       engine=nisa.engine.scalar if sin_on_scalar else nisa.engine.vector)
    nisa.tensor_tensor(dst=dst, data1=by_cos, data2=by_sin, op=nl.add)


@nki.jit
def attention_block_kernel(x, residual, norm_weight, w_qkv_blocks, q_norm_weight, k_norm_weight, cos, sin, k_cache_t,
                           v_cache, length, w_o_t, scale: float, eps: float = 1e-6, fast_exp: bool = False,
                           square_on_scalar: bool = False, sin_on_scalar: bool = False):
    """The decode attention block (see the module docstring).

    Dimensions: H hidden (multiple of 128), Hq query and Hkv KV heads (Hq + Hkv <= 128), D = 128
    head_dim, C cache positions. Under LNC=2, Hq and H/128 are even.
    Args: x, residual [1, H]; norm_weight [H]; w_qkv_blocks [Hq + 2 Hkv, 128, H/128, D]
    (``head_blocks(w_qkv)``); q_norm_weight, k_norm_weight [D]; cos, sin [1, D]; k_cache_t
    [Hkv, D, C]; v_cache [Hkv, C, D]; length [1, 1] int32 (valid cache positions); w_o_t
    [128, H/128, Hq, 128] (``output_on_partitions(w_o)``);
    scale; eps; fast_exp, square_on_scalar, sin_on_scalar: the Trn3 engine choices (fast exp,
    squares and RoPE's sin products on ScalarE).
    Returns: summed [1, H], out [1, H], k [1, Hkv, D], v [1, Hkv, D] (HBM, x.dtype).
    """
    h = x.shape[1]
    f = h // P
    hkv, d, capacity = k_cache_t.shape
    hq = w_o_t.shape[2]
    group = hq // hkv
    heads = hq + 2 * hkv  # projected heads: q, then k, then v
    me, programs = nl.program_id(0), nl.num_programs()
    peer = 1 - me
    summed = nl.ndarray((1, h), dtype=x.dtype, buffer=nl.shared_hbm)
    out = nl.ndarray((1, h), dtype=x.dtype, buffer=nl.shared_hbm)
    k_out = nl.ndarray((1, hkv, d), dtype=x.dtype, buffer=nl.shared_hbm)
    v_out = nl.ndarray((1, hkv, d), dtype=x.dtype, buffer=nl.shared_hbm)
    b0, b1 = _share(heads, me, programs)  # the heads this program projects (as many on either)
    c0, c1 = _share(f, me, programs)  # its o_proj output slots (hidden p*H/128 + c)
    key_cols = key_columns(capacity)
    by_key = (key_cols + 1) * group * 4 <= BANK_BYTES
    item = 2 if x.dtype == nl.bfloat16 else 4

    # Tiles loaded ahead are allocated first, so that their loads wait for no earlier tile.
    w_o_sb = nl.ndarray((P, c1 - c0, hq, P), dtype=w_o_t.dtype, buffer=nl.sbuf)
    w_qkv_sb = None
    if item * ((b1 - b0) * f * d + (c1 - c0) * hq * P) <= RESIDENT_BYTES:
        w_qkv_sb = nl.ndarray((P, b1 - b0, f, d), dtype=w_qkv_blocks.dtype, buffer=nl.sbuf)
    # The small operands (``SMALL_OPERANDS``), program p's in [:, p] of ``early`` (exchanged before the
    # norm) and ``late`` (after its projected heads' fp32 sums: exchanged with them).
    plan = SMALL_OPERANDS[programs]
    early = nl.ndarray((P, programs, max(f * len(e) for e, _ in plan)), dtype=nl.float32, buffer=nl.sbuf)
    share = b1 - b0
    late = nl.ndarray((P, programs, share + max(len(lt) for _, lt in plan)), dtype=nl.float32, buffer=nl.sbuf)
    where = {}
    for p, (early_names, late_names) in enumerate(plan):
        where.update(_small_columns(early_names, f, early[:, p, :], 0))
        where.update(_small_columns(late_names, f, late[:, p, :], share))
    sources = {"x": x, "residual": residual, "norm_weight": norm_weight, "q_norm_weight": q_norm_weight,
               "k_norm_weight": k_norm_weight, "cos": cos, "sin": sin, "length": length}
    mine_early, mine_late = plan[me]

    # 1. x, the residual and the norm weight arrive spread over the partitions (the layout of the
    # projection's contraction), one DMA each, under LNC=2 from either program; the first late
    # operand fills the queue while they are exchanged.
    _load_small(where, sources, mine_early)
    _load_small(where, sources, mine_late[0:1])
    if programs > 1:
        nisa.sendrecv(src=early[:, me, :], dst=early[:, peer, :], send_to_rank=peer, recv_from_rank=peer, pipe_id=0)
    consts = by_key_constants(x.dtype)
    ones_f32 = consts[1]
    # residual add (in fp32, rounded once as the reference's add) + RMSNorm
    st = nl.ndarray((P, 1, f), dtype=x.dtype, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=st[:, 0, :], data1=where["x"], data2=where["residual"], op=nl.add)
    normed = spread_normalize(st, where["norm_weight"], eps, ones_f32)

    # 2. this program's q|k|v weights, its other late operands, then the cache, in the order of use
    # (W_o after the exchange of the projections, below).
    if w_qkv_sb is not None:
        _load(w_qkv_sb, w_qkv_blocks[b0:b1], QKV_HEADS_PER_LOAD)
    rot = _rotate_half_matrix(d, x.dtype)
    k_new = nl.ndarray((d, hkv, P), dtype=x.dtype, buffer=nl.sbuf)  # the new key in column 0 per KV head
    nisa.memset(dst=k_new, value=0.0, engine=nisa.engine.gpsimd)
    v_new = nl.ndarray((P, hkv, d), dtype=x.dtype, buffer=nl.sbuf)  # its value in row 0
    nisa.memset(dst=v_new, value=0.0, engine=nisa.engine.gpsimd)

    # 3. this program's heads of the projection as columns (head_dim on partitions); under LNC=2 the
    # programs swap their fp32 sums (with the late operands) and round every head once, as one
    # program rounds its own.
    x_t = normed.reshape((P, f, 1))
    sums = nl.ndarray((d, share), dtype=nl.float32, buffer=nl.psum)
    for i, w_sb in enumerate(_weight_blocks(w_qkv_blocks[b0:b1], w_qkv_sb)):
        matmul_accumulate(sums[:, i:i + 1], w_sb, x_t)
    _load_small(where, sources, mine_late[1:])
    cache = None
    if by_key and item * 2 * P * key_cols * hkv <= CACHE_BYTES:
        cache = load_caches_by_key(k_cache_t, v_cache, 0, hkv)
    elif not by_key and item * 2 * DECODE_BLOCK * decode_blocks(capacity) * hkv <= CACHE_BYTES:
        cache = [[load_cache_block(k_cache_t, v_cache, g, blk) for blk in range(decode_blocks(capacity))]
                 for g in range(hkv)]
    qkv = nl.ndarray((d, heads), dtype=x.dtype, buffer=nl.sbuf)
    if programs > 1:
        nisa.tensor_copy(dst=late[:, me, 0:share], src=sums)
        nisa.sendrecv(src=late[:, me, :], dst=late[:, peer, :], send_to_rank=peer, recv_from_rank=peer, pipe_id=1)
        nisa.tensor_copy(dst=qkv.reshape((d, programs, share)), src=late[:, :, 0:share])
    else:
        nisa.tensor_copy(dst=qkv, src=sums)
    per_piece = -(-W_O_PIECE_BYTES // (item * P * hq * P))  # output slots per W_o DMA
    for a in nl.affine_range(0, c1 - c0, per_piece):  # in pieces: the first slots' matmuls start early
        b = min(c1 - c0, a + per_piece)
        nisa.dma_copy(dst=w_o_sb[:, a:b], src=w_o_t[:, c0 + a:c0 + b])
    valid = length_on_partitions(where["length"][0:1, :], ones_f32)
    if by_key:
        penalty = key_penalty(valid, key_cols, group)

    # 4. QK-norm and RoPE on the q and k columns, the new keys and values into their attention tiles
    # (the values as rows, needed last).
    qk_t = nl.ndarray((d, hq + hkv), dtype=x.dtype, buffer=nl.sbuf)  # q^T then k^T, head_dim on partitions
    vectors = tuple(where[name] for name in ("q_norm_weight", "k_norm_weight", "cos", "sin"))
    _qk_columns(qk_t, qkv[:, 0:hq + hkv], vectors, hq, ones_f32, rot, eps, square_on_scalar, sin_on_scalar)
    for g in nl.affine_range(hkv):
        nisa.tensor_copy(dst=k_new[:, g, 0:1], src=qk_t[:, hq + g:hq + g + 1])
    for g in nl.affine_range(hkv):
        pe_transpose(v_new[0:1, g, :], qkv[:, hq + hkv + g:hq + hkv + g + 1])

    # 5. attention: per KV head, over the cache (read once) and the new position.
    attn_t = nl.ndarray((d, hq), dtype=x.dtype, buffer=nl.sbuf)  # O^T, head_dim on partitions
    for g in nl.affine_range(hkv):
        q_t = qk_t[:, g * group:(g + 1) * group]
        if by_key:
            blocks = cache[g] if cache is not None else load_cache_by_key(k_cache_t, v_cache, g)
            attend_by_key(attn_t[:, g * group:(g + 1) * group], q_t, blocks, (k_new[:, g, :], v_new[:, g, :]),
                          penalty, consts, scale, fast_exp)
        else:
            _attend_by_block(attn_t[:, g * group:(g + 1) * group], q_t, qk_t[:, hq + g:hq + g + 1], v_new[0:1, g, :],
                             k_cache_t, v_cache, g, valid, None if cache is None else cache[g], scale, fast_exp)

    if me == 0:  # behind the loads and the attention (a store between loads holds every DMA engine)
        nisa.dma_copy(dst=summed.reshape((P, f)), src=st[:, 0, :])
        nisa.dma_copy(dst=k_out[0].permute((1, 0)), src=qk_t[:, hq:hq + hkv])  # from the columns: 2-byte runs
        nisa.dma_copy(dst=v_out[0].permute((1, 0)), src=qkv[:, hq + hkv:heads])

    # 6. o_proj, weights stationary: per output slot c, the Hq tiles [128 (d), 128 (p)] against the
    # O^T columns accumulate out[p*H/128 + c] on partition p; this program's share of the slots.
    acc = nl.ndarray((P, c1 - c0), dtype=nl.float32, buffer=nl.psum)
    for slot in nl.affine_range(c1 - c0):  # slot by slot, in the order W_o arrives
        for hh in nl.affine_range(hq):
            nisa.nc_matmul(dst=acc[:, slot:slot + 1], stationary=w_o_sb[:, slot, hh, :], moving=attn_t[:, hh:hh + 1],
                           accumulate=(hh > 0))
    out_sb = nl.ndarray((P, c1 - c0), dtype=x.dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=out_sb, src=acc)
    nisa.dma_copy(dst=out.reshape((P, h // P))[:, c0:c1], src=out_sb)
    return summed, out, k_out, v_out


def _attend_by_block(dst, q_t, k_new, v_new, k_cache_t, v_cache, g: int, valid, blocks, scale: float,  # noqa: ANN001
                     fast_exp: bool) -> None:
    """Attention of one query group over caches too long for ``attend_by_key``: the new position as
    one online-softmax block, then the cache in 512-key blocks (``blocks`` when loaded ahead)."""
    d, width = q_t.shape
    state = _running_state(d)
    decode_block(q_t, k_new, 1, lambda ch, kc: v_new, state, scale, fast_exp)
    if blocks is None:
        decode_over_cache(q_t, k_cache_t, v_cache, g, valid, state, scale, fast_exp)
    else:
        for blk in nl.affine_range(len(blocks)):
            penalty = cache_penalty(valid, blk, blocks[blk][2], width)
            attend_cache_block(q_t, blocks[blk], penalty, state, scale, fast_exp)
    pe_transpose(dst, normalized(state[2], state[1], width, d, q_t.dtype)[0:width])


# --- launchers and support checks ----------------------------------------------------------------

#: Projection weight blocks per DMA of the q|k|v weight: 2 heads, 2 x 128 x H/128 values per
#: partition in runs of 128 * H/128 (4 KiB at H = 2048, past the size where a DMA descriptor's
#: fixed cost stops dominating).
QKV_HEADS_PER_LOAD = 2

#: Bytes of W_o per DMA (whole output slots): at least ~850 ns of both targets' DMA engines (a
#: queue's least time per transfer; 368 / 528 B/ns per core), so that the pieces stream at the
#: engines' rate, and small enough that the matmuls of the last piece are a short tail.
W_O_PIECE_BYTES = 512 * 1024

#: SBUF bytes per partition for weights loaded ahead of their use (W_o always; the q|k|v blocks
#: too when both fit): well below both targets' usable SBUF (207 KiB Trn2, 239 KiB Trn3), leaving
#: room for the streamed q|k|v loads, the cache blocks and the activations.
RESIDENT_BYTES = 128 * 1024

#: Bytes per partition of one PSUM bank: the keys-on-partitions scores [128, C + 1, G] fp32 of one
#: attention call fit one (both targets: 8 banks of 2 KiB, trainium2_arch.rst / trainium3_arch.rst).
BANK_BYTES = 2048

#: SBUF bytes per partition for the cache loaded ahead of W_o (K^T and V of every KV head: 512 B per
#: 128 positions in bf16); a longer cache is loaded per KV head when its attention comes.
CACHE_BYTES = 32 * 1024

#: Per target: (fast exp, squares on ScalarE, RoPE's sin products on ScalarE): Trn3's fast
#: exponential and doubled ScalarE BF16 rate.
_ENGINES = {"trn2": (False, False, False), "trn3": (True, True, True)}


def _supports(programs: int) -> Callable[[Mapping[str, int], str, Target], tuple[bool, str]]:
    def check(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
        h, hq, hkv, d = dims["H"], dims["Hq"], dims["Hkv"], dims["D"]
        if programs > 1 and target.lnc != programs:
            return False, f"an LNC={programs} kernel; {target.name} runs LNC={target.lnc}"
        if d != P:
            return False, f"D={d}: the o_proj contraction puts head_dim on the {P} partitions"
        if h % (P * programs) or hq % programs:
            return False, f"H={h} must be a multiple of {P * programs} and Hq={hq} of {programs}"
        if hq + hkv > P:
            return False, f"Hq + Hkv = {hq + hkv} q and k rows exceed the {P} partitions"
        item = 2 if dtype == "bfloat16" else 4
        w_o_share = item * hq * (h // programs)
        if w_o_share > RESIDENT_BYTES:
            return False, f"this core's W_o share needs {w_o_share} B per partition, more than {RESIDENT_BYTES}"
        # Resident weights (or double-buffered q|k|v loads); the cache, resident when every KV
        # head's fits ``CACHE_BYTES``, else a KV head's (keys on partitions) or a 512-key block
        # double-buffered; the small operands and the projected heads in fp32 (``SMALL_OPERANDS``),
        # the sum and the normalised token; the constants and the new key's and value's tiles;
        # fp32 scores, their mask and probabilities.
        group, cols = hq // hkv, -(-dims["L"] // P)
        by_key = (cols + 1) * group * 4 <= BANK_BYTES
        head = 2 * item * (P * cols if by_key else DECODE_BLOCK * decode_blocks(dims["L"]))
        cache = hkv * head if hkv * head <= CACHE_BYTES else 2 * (head if by_key else 2 * item * DECODE_BLOCK)
        scores = 3 * (cols + 1) * group if by_key else 2 * DECODE_BLOCK
        small = 4 * (4 * h // P + hq + 2 * hkv + 5)  # early: at most 4 H/128 columns; late: heads + 5
        working = (item * (2 * QKV_HEADS_PER_LOAD * h + 2 * h // P + 2 * P + 2 * hkv * P + 2 * (hq + 2 * hkv))
                   + small + 4 * (2 * P + scores))
        need = RESIDENT_BYTES + cache + working
        if need > target.sbuf_usable_bytes_per_partition:
            return False, (f"needs {need} B per partition of SBUF, {target.name} has "
                           f"{target.sbuf_usable_bytes_per_partition}")
        return True, f"D={P}, {programs} program(s), {need} B per partition of SBUF"

    return check


#: The load-time re-layout of both projections' weights.
PREPARE = {"w_qkv": head_blocks, "w_o": output_on_partitions}


def launcher(target: str, programs: int = 1) -> Callable[..., tuple[torch.Tensor, ...]]:
    """The block's launcher (the op's signature) for ``target`` (trn2 | trn3), by default on
    ``programs`` physical cores; ``w_qkv`` and ``w_o`` arrive prepared (``PREPARE``)."""
    fast_exp, square_on_scalar, sin_on_scalar = _ENGINES[target]
    def attention_block(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, w_qkv: torch.Tensor,
                        q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor, cos: torch.Tensor,
                        sin: torch.Tensor, k_cache_t: torch.Tensor, v_cache: torch.Tensor,
                        length: int | torch.Tensor, w_o: torch.Tensor, scale: float,
                        eps: float = 1e-6, lnc: int = programs) -> tuple[torch.Tensor, ...]:
        """The kernel splits its heads over the programs of any grid: it launches on the rank's ``lnc``."""
        valid = torch.as_tensor(length, dtype=torch.int32).reshape(1, 1)  # a tensor stays a run-time value
        return tuple(attention_block_kernel[lnc](x, residual, norm_weight, w_qkv, q_norm_weight, k_norm_weight, cos, sin, k_cache_t,
                            v_cache, valid, w_o, scale=scale, eps=eps, fast_exp=fast_exp,
                            square_on_scalar=square_on_scalar, sin_on_scalar=sin_on_scalar))

    return attention_block


def variants() -> list[Variant]:
    """The ``attention_block`` variants."""
    out = []
    for target in _ENGINES:
        for programs in (1, 2):
            cores = ("one core" if programs == 1
                     else "both cores of an LNC=2 rank (query heads and o_proj outputs split)")
            out.append(Variant(
                op="attention_block", name=f"attention_block_{target}" + ("_lnc2" if programs == 2 else ""),
                targets=(target,), kernel=launcher(target, programs), nki=True, priority=20 + programs,
                supports=_supports(programs), tolerance=BLOCK_TOLERANCE, prepare=PREPARE,
                description=f"add+RMSNorm -> q|k|v -> QK-norm -> RoPE -> attention -> o_proj in one kernel, "
                            f"activations in SBUF, weights and cache loaded ahead, o_proj weights stationary, {cores}"))
    return out


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
