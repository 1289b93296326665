"""Causal GQA attention for prefill (flash-style) and decode (one token over the KV cache): NKI
kernels for Trn2 and Trn3.

Prefill (``_cte``): per KV head, K^T [D, S] (TensorE transposes) and V [S, D] (keys on
partitions) are loaded once and shared by the head's query group. Per query head and 128-query
tile, 128-key blocks up to the diagonal are visited with an online softmax: fp32 running max and
sum, scores = (q . k) * scale in fp32 PSUM, the causal mask on the diagonal block by
``affine_select``, P = exp(s - m) rounded to q.dtype for the P.V matmul (as the reference feeds
bf16 probabilities to its second matmul), and O rescaled by exp(m_old - m_new). Blocks above the
diagonal are never computed.

Decode (``_tkg``): per KV head, the query group's 8 heads are the stationary operand and
512-key K^T blocks stream from the cache ([Hkv, D, Lmax], keys transposed: contiguous
[D, 512] tiles with D on partitions); the same online softmax runs over the blocks; positions at
or beyond ``length`` (a run-time value) are masked with an iota comparison, so one compiled kernel
serves every cache length of a bucket. At most one [8, 512] score tile exists at a time. A full
block's V rows arrive in one DMA with key p*4 + c on partition p (one contiguous 1 KiB run per
partition instead of four 256-byte ones), and P.V chunk c transposes the probabilities of keys c,
c + 4, c + 8, .. to match. The block helpers (``load_cache_block``, ``attend_cache_block``) also
serve the fused attention block (``fused_attention.py``).

Decode split-K (``_tkg_split``, flash-decoding style): the bucket is cut into C = 128 / G chunks
(G = 8 query heads per KV head: 16 chunks) of n = ceil(Lmax / C) keys, and chunk c's scores land
on partitions c*G .. c*G+G-1 of one [C*G, n] PSUM tile: C matmuls whose stationary holds the
queries in chunk c's columns and zeros elsewhere accumulate into it. Each chunk then has its own
max and sum (one softmax pass over the whole tile), a combine step turns the C per-chunk maxima
and sums into one weight per (chunk, head), and the probabilities, normalised and rounded once,
meet V in P.V matmuls that accumulate every chunk into O^T [D, G]. K^T of a KV head is one DMA
of Lmax-long rows (full rate from 1024 keys), V one contiguous [<=128, D] run per chunk and tile.
Why and when it wins: the one-pass kernel's score tiles use G = 8 of VectorE/ScalarE's 128 lanes,
and those engines take the same time for 8 rows as for 128, so at long contexts it is bound by
the softmax's elementwise work (Lmax/512 blocks of ~10 instructions over 512 columns per KV head);
split-K does that work once over n = Lmax/16 columns with every lane busy, and is left bound by
HBM. It pays C score matmuls, C P.V matmuls per 128-key tile and the combine (about 15 small
instructions) per KV head whatever the length, so at short contexts (a few hundred keys) the
one-pass kernel wins. Its range: n at most 512 keys on Trn2 (one PSUM bank of fp32 scores) and
1024 on Trn3 (wide moving tiles): buckets up to 8192 / 16384 keys at G = 8.

Decode with the keys on the partitions (``_tkg_bykey``, and the fused attention block): key
p*C + c of an Lmax cache on partition p, column c (C = ceil(Lmax/128)), so K^T [D, 128 C] and V
[128, C, D] each arrive in one DMA of one contiguous run per partition. C score matmuls (the
stationary takes every C-th key of K^T, the group's queries move) fill S^T [128, C, G] in one PSUM
bank; scaling, the length mask, the maximum, exp and the sums then run over C columns per head
on all 128 lanes, about a dozen instructions per KV head whatever the length. Each partition's
maximum per head crosses the partitions by one TensorE transpose and a reduction and comes back
to every partition through a matmul against the identity; P.V accumulates O^T [D, G] over the C
columns, and a ones-matmul puts each head's sum of P on every partition, by which O^T is divided
once. Why it wins: the one-pass kernel's elementwise work is Lmax columns on G lanes and split-K's
Lmax/16 columns plus a combine, where this layout's is Lmax/128 columns. Its range: C x G fp32
scores in one PSUM bank (2 KiB), up to 8192 keys at G = 8.

Rounding differs from the eager reference, which rounds q.k to bf16, then the scaled scores, then
the normalised probabilities: the kernels keep scores in fp32 and normalise once at the end.

Per target: Trn3 computes exp(s - m) and its row sum in one ``nisa.exponential`` (VectorE fast
exp, NeuronCore-v4 only); Trn2 uses ScalarE ``activation(exp)`` with the negated max as bias and
an add reduction.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from nkimoe.hookspecs import hookimpl
from nkimoe.nki import nisa, nki, nl
from nkimoe.registry import Variant
from nkimoe.targets import Target
from nkimoe.variants.tiles import pe_transpose

P = 128
#: Keys per decode block: one PSUM bank of fp32 scores.
DECODE_BLOCK = 512
NEG = -3.0e38
#: Longest split-K chunk: the score tile [C*G, n] fp32 is one PSUM bank (512) on Trn2 and two
#: banks (NeuronCore-v4 wide moving tiles) on Trn3, so that it double-buffers in PSUM.
SPLIT_MAX_CHUNK = 1024

#: bf16: the reference rounds each score to bf16 (relative 2^-9 of |q.k| * scale, scores of a few
#: units here: ~1e-2 absolute) before its softmax and rounds the probabilities to bf16; both
#: perturb each output (a weighted mean of V with |v| ~ 1) by up to ~1e-2. fp32: a few ulps.
ATTENTION_TOLERANCE = {"bfloat16": (2e-2, 2.0**-6), "float32": (1e-5, 1e-4)}


def _softmax_step(ss, m, l, rows: int, cols: int, p_dtype, fast_exp: bool):  # noqa: ANN001, ANN202
    """One online-softmax step over a [rows, cols] fp32 score tile ``ss`` (SBUF): updates the running
    max ``m`` and sum ``l`` ([128, 1] fp32) and returns (P = exp(ss - m_new) in ``p_dtype``, the
    correction exp(m_old - m_new))."""
    blk_max = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=blk_max[0:rows], op=nl.maximum, data=ss[0:rows, 0:cols], axis=1)
    m_new = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=m_new[0:rows], data1=m[0:rows], data2=blk_max[0:rows], op=nl.maximum)
    neg_m = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=neg_m[0:rows], data=m_new[0:rows], op0=nl.multiply, operand0=-1.0)
    corr = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=corr[0:rows], op=nl.exp, data=m[0:rows], bias=neg_m[0:rows])
    p_blk = nl.ndarray((P, cols), dtype=p_dtype, buffer=nl.sbuf)
    row_sum = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    if fast_exp:
        nisa.exponential(dst=p_blk[0:rows], src=ss[0:rows, 0:cols], max_value=m_new[0:rows], reduce_res=row_sum[0:rows],
                         reduce_cmd=nisa.reduce_cmd.reset_reduce)
    else:
        nisa.activation(dst=p_blk[0:rows], op=nl.exp, data=ss[0:rows, 0:cols], bias=neg_m[0:rows], reduce_op=nl.add,
                        reduce_res=row_sum[0:rows], reduce_cmd=nisa.reduce_cmd.reset_reduce)
    nisa.scalar_tensor_tensor(dst=l[0:rows], data=l[0:rows], op0=nl.multiply, operand0=corr[0:rows], op1=nl.add,
                              operand1=row_sum[0:rows])
    nisa.tensor_copy(dst=m[0:rows], src=m_new[0:rows])
    return p_blk, corr


def normalized(o, l, rows: int, d: int, dtype):  # noqa: ANN001, ANN202, E741
    """o / l rounded to ``dtype``: a [128, d] SBUF tile, the first ``rows`` partitions valid."""
    inv = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv[0:rows], data=l[0:rows])
    res = nl.ndarray((P, d), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=res[0:rows], data=o[0:rows], op0=nl.multiply, operand0=inv[0:rows])
    return res


def _finish(o, l, rows: int, d: int, dtype, dst) -> None:  # noqa: ANN001, E741
    """dst = o / l, rounded to ``dtype``."""
    nisa.dma_copy(dst=dst, src=normalized(o, l, rows, d, dtype)[0:rows])


def _max_and_sum():  # noqa: ANN202
    """Online-softmax running max (-3e38) and sum (0), [128, 1] fp32."""
    m = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=m, value=NEG)
    l = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)  # noqa: E741
    nisa.memset(dst=l, value=0.0)
    return m, l


def _running_state(d: int):  # noqa: ANN202
    m, l = _max_and_sum()  # noqa: E741
    o = nl.ndarray((P, d), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=o, value=0.0)
    return m, l, o


@nki.jit
def attention_cte_kernel(q, k, v, scale: float, fast_exp: bool = False):
    """Causal GQA flash attention over a prompt.

    Dimensions: S tokens, Hq query heads, Hkv KV heads, D head_dim (<= 128).
    Args: q [S, Hq, D], k and v [S, Hkv, D] HBM; scale; fast_exp: nisa.exponential (Trn3).
    Returns: [S, Hq, D] HBM in q.dtype.
    """
    s, hq, d = q.shape
    hkv = k.shape[1]
    group = hq // hkv
    tiles = (s + P - 1) // P
    out = nl.ndarray((s, hq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return out
    for g in nl.affine_range(hkv):
        k_t = nl.ndarray((d, tiles * P), dtype=k.dtype, buffer=nl.sbuf)
        v_sb = nl.ndarray((P, tiles, d), dtype=v.dtype, buffer=nl.sbuf)
        for kb in nl.affine_range(tiles):
            pk = min(P, s - kb * P)
            k_rows = nl.ndarray((P, d), dtype=k.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=k_rows[0:pk], src=k[kb * P:kb * P + pk, g, :])
            pe_transpose(k_t[:, kb * P:kb * P + pk], k_rows[0:pk])
            nisa.dma_copy(dst=v_sb[0:pk, kb, :], src=v[kb * P:kb * P + pk, g, :])
        for hh in nl.affine_range(group):
            h = g * group + hh
            for qb in nl.affine_range(tiles):
                pq = min(P, s - qb * P)
                q_rows = nl.ndarray((P, d), dtype=q.dtype, buffer=nl.sbuf)
                nisa.dma_copy(dst=q_rows[0:pq], src=q[qb * P:qb * P + pq, h, :])
                q_t = nl.ndarray((d, P), dtype=q.dtype, buffer=nl.sbuf)
                pe_transpose(q_t[:, 0:pq], q_rows[0:pq])
                m, l, o = _running_state(d)  # noqa: E741
                for kb in nl.affine_range(qb + 1):
                    pk = min(P, s - kb * P)
                    sc = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.psum)
                    nisa.nc_matmul(dst=sc[0:pq, 0:pk], stationary=q_t[:, 0:pq], moving=k_t[:, kb * P:kb * P + pk])
                    ss = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
                    nisa.tensor_scalar(dst=ss[0:pq, 0:pk], data=sc[0:pq, 0:pk], op0=nl.multiply, operand0=scale)
                    if kb == qb:  # diagonal block: keep key j <= query p
                        nisa.affine_select(dst=ss[0:pq, 0:pk], pattern=[[-1, pk]], channel_multiplier=1,
                                           on_true_tile=ss[0:pq, 0:pk], on_false_value=NEG, cmp_op=nl.greater_equal)
                    p_blk, corr = _softmax_step(ss, m, l, pq, pk, q.dtype, fast_exp)
                    p_t = nl.ndarray((P, P), dtype=q.dtype, buffer=nl.sbuf)
                    pe_transpose(p_t[0:pk, 0:pq], p_blk[0:pq, 0:pk])
                    pv = nl.ndarray((P, d), dtype=nl.float32, buffer=nl.psum)
                    nisa.nc_matmul(dst=pv[0:pq], stationary=p_t[0:pk, 0:pq], moving=v_sb[0:pk, kb, :])
                    nisa.scalar_tensor_tensor(dst=o[0:pq], data=o[0:pq], op0=nl.multiply, operand0=corr[0:pq],
                                              op1=nl.add, operand1=pv[0:pq])
                _finish(o, l, pq, d, q.dtype, out[qb * P:qb * P + pq, h, :])
    return out


def decode_block(q_t, k_t, n: int, v_rows: Callable[[int, int], Any], state, scale: float,  # noqa: ANN001
                 fast_exp: bool, penalty=None, key_stride: int = 0) -> None:  # noqa: ANN001
    """One online-softmax block of decode attention for one query group: scores of q_t [D, G]
    against the ``n`` keys of k_t [D, >= n] (SBUF, keys transposed), scaled, plus ``penalty`` [G, n]
    (fp32) when given; P.V over 128-key chunks whose V rows [kc, D] (SBUF) ``v_rows(c, kc)`` gives:
    chunk c holds keys c*128 .. c*128 + kc - 1, or with ``key_stride`` s keys c, c + s, c + 2s, ..
    (V rows laid out key p*s + c on partition p). Updates ``state`` = (running max, running sum,
    fp32 output [G, D])."""
    m, l, o = state  # noqa: E741
    d, group = q_t.shape
    dtype = q_t.dtype
    sc = nl.ndarray((P, DECODE_BLOCK), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=sc[0:group, 0:n], stationary=q_t, moving=k_t[:, 0:n])
    ss = nl.ndarray((P, DECODE_BLOCK), dtype=nl.float32, buffer=nl.sbuf)
    if penalty is None:
        nisa.tensor_scalar(dst=ss[0:group, 0:n], data=sc[0:group, 0:n], op0=nl.multiply, operand0=scale)
    else:
        nisa.scalar_tensor_tensor(dst=ss[0:group, 0:n], data=sc[0:group, 0:n], op0=nl.multiply, operand0=scale,
                                  op1=nl.add, operand1=penalty[0:group, 0:n])
    p_blk, corr = _softmax_step(ss, m, l, group, n, dtype, fast_exp)
    pv = nl.ndarray((P, d), dtype=nl.float32, buffer=nl.psum)
    for c in nl.affine_range((n + P - 1) // P):
        kc = min(P, n - c * P)
        p_t = nl.ndarray((P, P), dtype=dtype, buffer=nl.sbuf)
        keys = slice(c, c + key_stride * (kc - 1) + 1, key_stride) if key_stride else slice(c * P, c * P + kc)
        pe_transpose(p_t[0:kc, 0:group], p_blk[0:group, keys])
        nisa.nc_matmul(dst=pv[0:group], stationary=p_t[0:kc, 0:group], moving=v_rows(c, kc), accumulate=(c > 0))
    nisa.scalar_tensor_tensor(dst=o[0:group], data=o[0:group], op0=nl.multiply, operand0=corr[0:group],
                              op1=nl.add, operand1=pv[0:group])


def load_cache_block(k_cache, v_cache, g: int, blk: int):  # noqa: ANN001, ANN202
    """Block ``blk`` (keys blk*512 ..) of KV head ``g`` of the caches (k_cache [Hkv, D, Lmax], v_cache
    [Hkv, Lmax, D] in HBM) into SBUF: (K^T [D, 512], V [128, 4, D], keys in the block), one DMA for
    K^T and one for V. A block of n = 128 s keys lays V out key p*s + c on partition p, slot c (one
    contiguous run per partition); a shorter last block key c*128 + p (one DMA per 128 keys)."""
    d, lmax = k_cache.shape[1], k_cache.shape[2]
    start = blk * DECODE_BLOCK
    n = min(DECODE_BLOCK, lmax - start)
    k_blk = nl.ndarray((d, DECODE_BLOCK), dtype=k_cache.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=k_blk[:, 0:n], src=k_cache[g, :, start:start + n])
    v_blk = nl.ndarray((P, DECODE_BLOCK // P, d), dtype=v_cache.dtype, buffer=nl.sbuf)
    full, rest = n // P, n % P
    if not rest:
        nisa.dma_copy(dst=v_blk[:, 0:full, :], src=v_cache[g, start:start + n, :].reshape((P, full, d)))
        return k_blk, v_blk, n
    if full:
        nisa.dma_copy(dst=v_blk[:, 0:full, :],
                      src=v_cache[g, start:start + full * P, :].reshape((full, P, d)).permute((1, 0, 2)))
    nisa.dma_copy(dst=v_blk[0:rest, full, :], src=v_cache[g, start + full * P:start + n, :])
    return k_blk, v_blk, n


def cache_penalty(valid_len, blk: int, n: int, rows: int):  # noqa: ANN001, ANN202
    """The mask of cache block ``blk`` (``n`` keys) for ``rows`` query rows: -3e38 at positions at or
    beyond ``valid_len`` ([128, 1] fp32, run time), 0 before; a [128, 512] fp32 tile."""
    pos = nl.ndarray((P, DECODE_BLOCK), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=pos[0:rows, 0:n], pattern=[[1, n]], offset=blk * DECODE_BLOCK)
    nisa.tensor_scalar(dst=pos[0:rows, 0:n], data=pos[0:rows, 0:n], op0=nl.greater_equal,
                       operand0=valid_len[0:rows], op1=nl.multiply, operand1=NEG)
    return pos


def attend_cache_block(q_t, block, penalty, state, scale: float, fast_exp: bool) -> None:  # noqa: ANN001
    """One cache block (``load_cache_block``) of decode attention for the query group q_t [D, G],
    masked by ``penalty`` (``cache_penalty``). Updates ``state``."""
    k_blk, v_blk, n = block
    decode_block(q_t, k_blk, n, lambda c, kc: v_blk[0:kc, c, :], state, scale, fast_exp, penalty=penalty,
                 key_stride=0 if n % P else n // P)


def key_columns(lmax: int) -> int:
    """Columns C of the keys-on-partitions layout of an ``lmax`` cache (key p*C + c on partition p,
    column c): as few as hold every key on the 128 partitions."""
    return -(-lmax // P)


def load_cache_by_key(k_cache, v_cache, g: int):  # noqa: ANN001, ANN202
    """KV head ``g`` of the caches in SBUF with the keys on the partitions (``load_caches_by_key``)."""
    return load_caches_by_key(k_cache, v_cache, g, g + 1)[0]


def load_caches_by_key(k_cache, v_cache, first: int, last: int):  # noqa: ANN001, ANN202
    """KV heads ``first`` .. ``last - 1`` of the caches (k_cache [Hkv, D, Lmax], v_cache [Hkv, Lmax, D]
    in HBM) in SBUF with key p*C + c on partition p (``key_columns``): per head (K^T [D, 128 C],
    V [128, C, D]), views of one tile per cache, each loaded by one DMA for all the heads (one
    contiguous run per partition and head; a ragged last partition takes one more for V). Slots
    past the cache are zeroed, so that the scores and P.V products there are finite (and masked)."""
    n, d, lmax = last - first, k_cache.shape[1], k_cache.shape[2]
    cols = key_columns(lmax)
    k_sb = nl.ndarray((d, n, P * cols), dtype=k_cache.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=k_sb[:, :, 0:lmax], src=k_cache[first:last].permute((1, 0, 2)))
    if lmax < P * cols:
        nisa.memset(dst=k_sb[:, :, lmax:P * cols], value=0.0, engine=nisa.engine.gpsimd)
    v_sb = nl.ndarray((P, n, cols, d), dtype=v_cache.dtype, buffer=nl.sbuf)
    full, rest = lmax // cols, lmax % cols
    by_partition = (1, 0, 2, 3)
    nisa.dma_copy(dst=v_sb[0:full],
                  src=v_cache[first:last, 0:full * cols, :].reshape((n, full, cols, d)).permute(by_partition))
    if rest:
        nisa.dma_copy(dst=v_sb[full:full + 1, :, 0:rest, :],
                      src=v_cache[first:last, full * cols:lmax, :].reshape((n, 1, rest, d)).permute(by_partition))
        nisa.memset(dst=v_sb[full:full + 1, :, rest:cols, :], value=0.0, engine=nisa.engine.gpsimd)
    used = full + (1 if rest else 0)
    if used < P:
        nisa.memset(dst=v_sb[used:P], value=0.0, engine=nisa.engine.gpsimd)
    return [(k_sb[:, i, :], v_sb[:, i, :, :]) for i in range(n)]


def key_penalty(valid_all, cols: int, group: int, extra: bool = True):  # noqa: ANN001, ANN202
    """The length mask of the keys-on-partitions layout, [128, C (+ 1), G] fp32: -3e38 where key
    p*C + c is at or beyond ``valid_all`` ([128, 1] fp32, the run-time length on every partition),
    and with ``extra`` in column C (a new position, on partition 0) on every partition but 0."""
    pen = nl.ndarray((P, cols + extra, group), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=pen[:, 0:cols, :], pattern=[[1, cols], [0, group]], offset=0, channel_multiplier=cols)
    nisa.tensor_scalar(dst=pen[:, 0:cols, :], data=pen[:, 0:cols, :], op0=nl.greater_equal, operand0=valid_all,
                       op1=nl.multiply, operand1=NEG)
    if extra:
        nisa.iota(dst=pen[:, cols, :], pattern=[[0, group]], offset=0, channel_multiplier=1)
        nisa.tensor_scalar(dst=pen[:, cols, :], data=pen[:, cols, :], op0=nl.greater_equal, operand0=1.0,
                           op1=nl.multiply, operand1=NEG)
    return pen


def by_key_constants(dtype):  # noqa: ANN001, ANN202
    """The constants of ``attend_by_key`` (GpSimd, off the critical path): ones [128, 128] in
    ``dtype``, ones [128, 128] fp32 and the fp32 identity [128, 128]."""
    ones = nl.ndarray((P, P), dtype=dtype, buffer=nl.sbuf)
    nisa.memset(dst=ones, value=1.0, engine=nisa.engine.gpsimd)
    ones_f32 = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=ones_f32, value=1.0, engine=nisa.engine.gpsimd)
    eye = nl.ndarray((P, P), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=eye, value=0.0, engine=nisa.engine.gpsimd)
    nisa.affine_select(dst=eye, pattern=[[-1, P]], channel_multiplier=1, on_true_tile=eye, on_false_value=1.0,
                       cmp_op=nl.not_equal)
    return ones, ones_f32, eye


def length_on_partitions(length_f, ones_f32):  # noqa: ANN001, ANN202
    """The run-time length [1, 1] fp32 (SBUF, one DMA) on every partition: [128, 1] fp32, by one
    fp32 matmul against a row of ones (exact for lengths below 2^24)."""
    spread = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=spread, stationary=ones_f32[0:1, :], moving=length_f)
    valid = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=valid, src=spread)
    return valid


def attend_by_key(dst, q_t, cache, new_kv, penalty, consts, scale: float, fast_exp: bool) -> None:  # noqa: ANN001
    """Decode attention of one query group with the keys on the partitions: dst [D, G] = O^T.

    q_t [D, G] (SBUF); cache = ``load_cache_by_key``; new_kv = None, or (K^T [D, 128] holding a new
    key in column 0, V [128, D] holding its value in row 0, zeros elsewhere) attended as one more
    key column; penalty = ``key_penalty`` (with ``extra`` as new_kv); consts = ``by_key_constants``.
    Scores S^T [128, C (+ 1), G] (fp32 PSUM) come from C + 1 matmuls (stationary: every C-th key), so
    every elementwise step runs on C (+ 1) columns per head over all lanes. Each partition's maximum
    per head crosses the partitions by a TensorE transpose and a reduction, and its negation comes
    back to every partition by a matmul against the identity; P = exp(S - max) in q's dtype; P.V
    accumulates O^T over the C + 1 key columns, and a ones-matmul gives each head's sum of P on
    every partition, which O^T is divided by."""
    k_sb, v_sb = cache
    ones, ones_f32, eye = consts
    d, group = q_t.shape
    cols = v_sb.shape[1]
    width = cols + (new_kv is not None)
    sc = nl.ndarray((P, width, group), dtype=nl.float32, buffer=nl.psum)
    for c in nl.affine_range(cols):
        nisa.nc_matmul(dst=sc[:, c, :], stationary=k_sb[:, c:P * cols:cols], moving=q_t)
    if new_kv is not None:
        nisa.nc_matmul(dst=sc[:, cols, :], stationary=new_kv[0], moving=q_t)
    ss = nl.ndarray((P, width, group), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=ss, data=sc, op0=nl.multiply, operand0=scale, op1=nl.add, operand1=penalty)
    part_max = nl.ndarray((P, group), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=part_max, op=nl.maximum, data=ss.permute((0, 2, 1)), axis=2)
    by_head = nl.ndarray((group, P), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_transpose(dst=by_head, data=part_max, engine=nisa.engine.tensor)
    neg_max = nl.ndarray((group, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=neg_max, op=nl.maximum, data=by_head, axis=1, negate=True)
    spread = nl.ndarray((group, P), dtype=nl.float32, buffer=nl.sbuf)  # row h: -max of head h
    nisa.tensor_scalar(dst=spread, data=ones_f32[0:group, :], op0=nl.multiply, operand0=neg_max)
    shift = nl.ndarray((P, group), dtype=nl.float32, buffer=nl.psum)
    nisa.nc_matmul(dst=shift, stationary=spread, moving=eye[0:group, 0:group])
    nisa.tensor_tensor(dst=ss, data1=ss, data2=shift.ap([[group, P], [0, width], [1, group]], offset=0), op=nl.add)
    p_sb = nl.ndarray((P, width, group), dtype=q_t.dtype, buffer=nl.sbuf)
    if fast_exp:
        nisa.exponential(dst=p_sb, src=ss)
    else:
        nisa.activation(dst=p_sb, op=nl.exp, data=ss)
    sums = nl.ndarray((P, width, group), dtype=nl.float32, buffer=nl.psum)  # first: VectorE adds them during P.V
    nisa.nc_matmul(dst=sums, stationary=ones, moving=p_sb)
    total = nl.ndarray((P, group), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_reduce(dst=total, op=nl.add, data=sums.permute((0, 2, 1)), axis=2)
    o_t = nl.ndarray((d, group), dtype=nl.float32, buffer=nl.psum)
    for c in nl.affine_range(cols):
        nisa.nc_matmul(dst=o_t, stationary=v_sb[:, c, :], moving=p_sb[:, c, :], accumulate=(c > 0))
    if new_kv is not None:
        nisa.nc_matmul(dst=o_t, stationary=new_kv[1], moving=p_sb[:, cols, :], accumulate=True)
    nisa.tensor_tensor(dst=dst, data1=o_t, data2=total[0:d], op=nl.divide)


def decode_blocks(lmax: int) -> int:
    """512-key blocks of an ``lmax``-long cache."""
    return (lmax + DECODE_BLOCK - 1) // DECODE_BLOCK


def decode_over_cache(q_t, k_cache, v_cache, g: int, valid_len, state, scale: float,  # noqa: ANN001
                      fast_exp: bool) -> None:
    """Decode attention of one query group q_t [D, G] over KV head ``g`` of the caches, block by
    block, each read once, positions at or beyond ``valid_len`` masked. Updates the online-softmax
    ``state``."""
    for blk in nl.affine_range(decode_blocks(k_cache.shape[2])):
        block = load_cache_block(k_cache, v_cache, g, blk)
        attend_cache_block(q_t, block, cache_penalty(valid_len, blk, block[2], q_t.shape[1]), state, scale, fast_exp)


@nki.jit
def attention_tkg_kernel(q, k_cache, v_cache, length, scale: float, fast_exp: bool = False):
    """One query token over a KV-cache bucket, masking positions >= ``length`` at run time.

    Dimensions: Hq query heads, Hkv KV heads (Hq/Hkv <= 128), D head_dim (<= 128), Lmax bucket.
    Args: q [1, Hq, D]; k_cache [Hkv, D, Lmax] (keys transposed); v_cache [Hkv, Lmax, D];
    length [1, 1] int32 (valid positions); scale; fast_exp: nisa.exponential (Trn3).
    Returns: [1, Hq, D] HBM in q.dtype.
    """
    _, hq, d = q.shape
    hkv = k_cache.shape[0]
    group = hq // hkv
    out = nl.ndarray((1, hq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return out
    valid_len = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=valid_len[0:group], src=length.ap([[0, group], [1, 1]]))
    for g in nl.affine_range(hkv):
        q_t = nl.ndarray((d, group), dtype=q.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=q_t, src=q.reshape((hq, d))[g * group:(g + 1) * group, :].permute((1, 0)))
        m, l, o = _running_state(d)  # noqa: E741
        decode_over_cache(q_t, k_cache, v_cache, g, valid_len, (m, l, o), scale, fast_exp)
        _finish(o, l, group, d, q.dtype, out[0, g * group:(g + 1) * group, :])
    return out


def _share(total: int, me: int, programs: int) -> tuple[int, int]:
    """This program's contiguous share [first, last) of ``total`` items."""
    return me * total // programs, (me + 1) * total // programs


@nki.jit
def attention_tkg_bykey_kernel(q, k_cache, v_cache, length, scale: float, fast_exp: bool = False):
    """One query token over a KV-cache bucket with the keys on the partitions (``attend_by_key``):
    per KV head, K^T and V in one DMA each and about a dozen elementwise steps over C = Lmax/128
    columns per head, on all lanes. On a grid of programs (``kernel[2]``: both cores of an LNC=2
    rank) program r takes the r-th share of the query heads (reading the caches of their KV heads)
    and stores their rows.

    Dimensions: as ``attention_tkg_kernel``, with ceil(Lmax/128) * G <= 512 (one PSUM bank of fp32
    scores per KV head). Args: as ``attention_tkg_kernel``. Returns: [1, Hq, D] HBM in q.dtype.
    """
    _, hq, d = q.shape
    hkv, _, lmax = k_cache.shape
    group = hq // hkv
    out = nl.ndarray((1, hq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    q0, q1 = _share(hq, nl.program_id(0), nl.num_programs())
    nq = q1 - q0
    q_rows = nl.ndarray((P, d), dtype=q.dtype, buffer=nl.sbuf)  # contiguous rows, then TensorE
    nisa.dma_copy(dst=q_rows[0:nq], src=q[0, q0:q1, :])
    length_f = nl.ndarray((1, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=length_f, src=length)
    consts = by_key_constants(q.dtype)
    penalty = key_penalty(length_on_partitions(length_f, consts[1]), key_columns(lmax), group, extra=False)
    q_t = nl.ndarray((d, P), dtype=q.dtype, buffer=nl.sbuf)
    pe_transpose(q_t[:, 0:nq], q_rows[0:nq])
    attn_t = nl.ndarray((d, P), dtype=q.dtype, buffer=nl.sbuf)
    for g in nl.affine_range(q0 // group, -(-q1 // group)):
        a, b = max(q0, g * group) - q0, min(q1, (g + 1) * group) - q0  # this program's heads of KV head g
        attend_by_key(attn_t[:, a:b], q_t[:, a:b], load_cache_by_key(k_cache, v_cache, g), None,
                      penalty[:, :, 0:b - a], consts, scale, fast_exp)
    o_rows = nl.ndarray((P, d), dtype=q.dtype, buffer=nl.sbuf)
    pe_transpose(o_rows[0:nq], attn_t[:, 0:nq])
    nisa.dma_copy(dst=out[0, q0:q1, :], src=o_rows[0:nq])
    return out


def split_chunks(lmax: int, group: int) -> tuple[int, int]:
    """Split-K decode layout of an ``lmax`` bucket for a query group of ``group`` heads:
    ``(keys per chunk, chunks)``, as many chunks as fit the partitions (128 // group) with every
    chunk but the last full and the last non-empty."""
    per_chunk = -(-lmax // (P // group))
    return per_chunk, -(-lmax // per_chunk)


def _split_penalty(length, chunks: int, group: int, n: int, chunk_step: int, key_step: int, base: int = 0):  # noqa: ANN001, ANN202
    """The split-K length mask, [128, n] fp32: row (c, h) = partition c*G + h, column j holds
    -3e38 where its key ``base + c * chunk_step + j * key_step`` is at or beyond ``length`` (a run-time
    [1, 1] int32 in HBM), else 0."""
    rows = chunks * group
    part = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=part[0:rows], pattern=[[0, 1]], offset=0, channel_multiplier=1)
    head = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=head[0:rows], data=part[0:rows], op0=nl.mod, operand0=float(group))
    start = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=start[0:rows], data1=part[0:rows], data2=head[0:rows], op=nl.subtract)
    nisa.tensor_scalar(dst=start[0:rows], data=start[0:rows], op0=nl.multiply, operand0=float(chunk_step),
                       op1=nl.divide, operand1=float(group))
    valid = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.dma_copy(dst=valid[0:rows], src=length.ap([[0, rows], [1, 1]]))
    if base:
        nisa.tensor_scalar(dst=valid[0:rows], data=valid[0:rows], op0=nl.subtract, operand0=float(base))
    nisa.tensor_tensor(dst=valid[0:rows], data1=valid[0:rows], data2=start[0:rows], op=nl.subtract)
    penalty = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.iota(dst=penalty[0:rows], pattern=[[key_step, n]], offset=0)
    nisa.tensor_scalar(dst=penalty[0:rows], data=penalty[0:rows], op0=nl.greater_equal, operand0=valid[0:rows],
                       op1=nl.multiply, operand1=NEG)
    return penalty


@nki.jit
def attention_tkg_split_kernel(q, k_cache, v_cache, length, scale: float, fast_exp: bool = False):
    """One query token over a KV-cache bucket, split-K: chunks of the cache side by side on the
    partitions, a softmax per chunk, then one combine.

    Dimensions: Hq query heads, Hkv KV heads, G = Hq/Hkv, D head_dim (<= 128), Lmax bucket; C
    chunks of n keys (``split_chunks``), C*G <= 128 and n at most one matmul's moving size.
    Args: as ``attention_tkg_kernel``. Returns: [1, Hq, D] HBM in q.dtype.
    """
    _, hq, d = q.shape
    hkv, _, lmax = k_cache.shape
    group = hq // hkv
    n, chunks = split_chunks(lmax, group)
    rows = chunks * group  # partition c*G + h: chunk c, head h of the group
    last = lmax - (chunks - 1) * n
    out = nl.ndarray((1, hq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    if nl.program_id(0) > 0:  # a one-core kernel on an LNC=2 grid: program 0 does the work
        return out
    # Row (c, h) keeps key offsets j < length - c*n; the penalty is the same for every KV head.
    penalty = _split_penalty(length, chunks, group, n, chunk_step=n, key_step=1)
    # Stationary of chunk c: the group's queries in columns c*G .. c*G+G-1, zeros elsewhere, so that
    # the C score matmuls accumulate into one [C*G, n] PSUM tile, chunk c on its own partitions.
    q_blocks = nl.ndarray((d, chunks, rows), dtype=q.dtype, buffer=nl.sbuf)
    nisa.memset(dst=q_blocks, value=0.0)
    diagonal = q_blocks.ap([[chunks * rows, d], [rows + group, chunks], [1, group]], offset=0)
    for g in nl.affine_range(hkv):
        q_t = nl.ndarray((d, group), dtype=q.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=q_t, src=q.reshape((hq, d))[g * group:(g + 1) * group, :].permute((1, 0)))
        nisa.tensor_copy(dst=diagonal, src=q_t.ap([[group, d], [0, chunks], [1, group]], offset=0))
        k_t = nl.ndarray((d, lmax), dtype=k_cache.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=k_t, src=k_cache[g])
        sc = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.psum)
        for c in nl.affine_range(chunks):
            width = n if c < chunks - 1 else last
            nisa.nc_matmul(dst=sc[0:rows, 0:width], stationary=q_blocks[:, c, :], moving=k_t[:, c * n:c * n + width],
                           accumulate=(c > 0))
        p_blk = _split_probabilities(sc, penalty, scale, chunks, group, q.dtype, fast_exp, 1)
        o_t = nl.ndarray((d, group), dtype=nl.float32, buffer=nl.psum)  # O^T: head_dim on partitions
        tiles = (n + P - 1) // P
        for kb in nl.affine_range(tiles):
            kc = min(P, n - kb * P)
            p_t = nl.ndarray((P, P), dtype=q.dtype, buffer=nl.sbuf)
            pe_transpose(p_t[0:kc, 0:rows], p_blk[0:rows, kb * P:kb * P + kc])
            for c in nl.affine_range(chunks):
                keys = kc if c < chunks - 1 else min(kc, max(0, last - kb * P))
                if keys:  # one contiguous [keys, D] run of the cache per chunk
                    v_blk = nl.ndarray((P, d), dtype=v_cache.dtype, buffer=nl.sbuf)
                    first = c * n + kb * P
                    nisa.dma_copy(dst=v_blk[0:keys], src=v_cache[g, first:first + keys, :])
                    nisa.nc_matmul(dst=o_t, stationary=v_blk[0:keys], moving=p_t[0:keys, c * group:(c + 1) * group],
                                   accumulate=(kb > 0 or c > 0))
        res = nl.ndarray((d, group), dtype=q.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res, src=o_t)
        nisa.dma_copy(dst=out[0, g * group:(g + 1) * group, :].permute((1, 0)), src=res)
    return out


def lnc_chunks(lmax: int, group: int, cores: int = 2) -> tuple[int, int]:
    """LNC=2 split-K layout: each of ``cores`` programs takes a contiguous half of the bucket and
    interleaves it over C = 128 // group chunks (key ``m * C + c`` of the half in chunk c, column m):
    ``(keys per chunk, chunks)``."""
    chunks = P // group
    return lmax // (cores * chunks), chunks


@nki.jit
def attention_tkg_split_lnc_kernel(q, k_cache, v_cache, length, scale: float, fast_exp: bool = False):
    """One query token over a KV-cache bucket on both cores of an LNC=2 rank: program r takes keys
    r*Lmax/2 .. (r+1)*Lmax/2 - 1 and runs split-K over them with the chunks interleaved (chunk c
    holds every C-th key), so that V of a chunk column m is one contiguous run of C keys; the
    programs swap their per-chunk maxima and sums before the combine, and their P.V partial sums
    after it, and each stores half of the query heads.

    Dimensions: as ``attention_tkg_split_kernel``, with Lmax a multiple of 2*C and n = Lmax/(2C) <= 128.
    Args: as ``attention_tkg_kernel``. Returns: [1, Hq, D] HBM in q.dtype.
    """
    _, hq, d = q.shape
    hkv, _, lmax = k_cache.shape
    group = hq // hkv
    me, cores = nl.program_id(0), nl.num_programs(0)
    n, chunks = lnc_chunks(lmax, group, cores)
    rows = chunks * group
    half = lmax // cores
    keys = slice(me * half, (me + 1) * half)
    lo, hi = me * group // cores, (me + 1) * group // cores  # the query heads this program stores
    out = nl.ndarray((1, hq, d), dtype=q.dtype, buffer=nl.shared_hbm)
    penalty = _split_penalty(length, chunks, group, n, chunk_step=1, key_step=chunks, base=me * half)
    q_blocks = nl.ndarray((d, chunks, rows), dtype=q.dtype, buffer=nl.sbuf)
    nisa.memset(dst=q_blocks, value=0.0)
    diagonal = q_blocks.ap([[chunks * rows, d], [rows + group, chunks], [1, group]], offset=0)
    for g in nl.affine_range(hkv):
        q_rows = nl.ndarray((P, d), dtype=q.dtype, buffer=nl.sbuf)  # contiguous rows, then TensorE
        nisa.dma_copy(dst=q_rows[0:group], src=q[0, g * group:(g + 1) * group, :])
        q_t = nl.ndarray((d, group), dtype=q.dtype, buffer=nl.sbuf)
        pe_transpose(q_t, q_rows[0:group])
        nisa.tensor_copy(dst=diagonal, src=q_t.ap([[group, d], [0, chunks], [1, group]], offset=0))
        k_t = nl.ndarray((d, half), dtype=k_cache.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=k_t, src=k_cache[g, :, keys])
        # v_sb[m, c, :] = V of key m*C + c of this half: C keys contiguous per partition.
        v_sb = nl.ndarray((P, chunks, d), dtype=v_cache.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=v_sb[0:n], src=v_cache[g, keys, :].reshape((n, chunks, d)))
        sc = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.psum)
        by_chunk = k_t.reshape((d, n, chunks))
        for c in nl.affine_range(chunks):
            nisa.nc_matmul(dst=sc[0:rows, 0:n], stationary=q_blocks[:, c, :], moving=by_chunk[:, :, c],
                           accumulate=(c > 0))
        p_blk = _split_probabilities(sc, penalty, scale, chunks, group, q.dtype, fast_exp, cores)
        p_t = nl.ndarray((P, P), dtype=q.dtype, buffer=nl.sbuf)
        pe_transpose(p_t[0:n, 0:rows], p_blk[0:rows, 0:n])
        o = nl.ndarray((P, d), dtype=nl.float32, buffer=nl.psum)  # heads on partitions
        for c in nl.affine_range(chunks):
            nisa.nc_matmul(dst=o[0:group], stationary=p_t[0:n, c * group:(c + 1) * group], moving=v_sb[0:n, c, :],
                           accumulate=(c > 0))
        mine = nl.ndarray((P, d), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_copy(dst=mine[0:group], src=o[0:group])
        if cores > 1:
            theirs = nl.ndarray((P, d), dtype=nl.float32, buffer=nl.sbuf)
            nisa.sendrecv(src=mine[0:group], dst=theirs[0:group], send_to_rank=1 - me, recv_from_rank=1 - me,
                          pipe_id=1)
            nisa.tensor_tensor(dst=mine[0:group], data1=mine[0:group], data2=theirs[0:group], op=nl.add)
        res = nl.ndarray((P, d), dtype=q.dtype, buffer=nl.sbuf)
        nisa.tensor_copy(dst=res[lo:hi], src=mine[lo:hi])
        nisa.dma_copy(dst=out[0, g * group + lo:g * group + hi, :], src=res[lo:hi])
    return out


def _split_probabilities(sc, penalty, scale: float, chunks: int, group: int, dtype, fast_exp: bool,  # noqa: ANN001, ANN202
                         cores: int):
    """Split-K scores [C*G, n] (PSUM, fp32) to probabilities in ``dtype``: scaled, masked by
    ``penalty``, a softmax per chunk row, then normalised by the combine's weight per (chunk, head)
    and rounded once, so that every chunk is on the same scale and the P.V matmuls of all chunks
    accumulate into one output; ``cores`` programs hold the chunks (see ``_chunk_weights``)."""
    rows, n = chunks * group, sc.shape[1]
    ss = nl.ndarray((P, n), dtype=nl.float32, buffer=nl.sbuf)
    nisa.scalar_tensor_tensor(dst=ss[0:rows], data=sc[0:rows], op0=nl.multiply, operand0=scale, op1=nl.add,
                              operand1=penalty[0:rows])
    m, l = _max_and_sum()  # noqa: E741
    p_exp, _ = _softmax_step(ss, m, l, rows, n, nl.float32, fast_exp)
    p_blk = nl.ndarray((P, n), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=p_blk[0:rows], data=p_exp[0:rows], op0=nl.multiply,
                       operand0=_chunk_weights(m, l, chunks, group, cores)[0:rows])
    return p_blk


def _chunk_weights(m, l, chunks: int, group: int, cores: int):  # noqa: ANN001, ANN202, E741
    """The combine step of split-K: per row (c, h), ``w = exp(m_c - M_h) / sum_c' exp(m_c' - M_h) l_c'``
    with ``M_h`` the head's maximum over the chunks, returned as a [128, 1] fp32 column. The
    per-chunk maxima and sums are transposed to one row and combined along the free axis. Under
    LNC=2 the programs swap their rows first (``sendrecv``) and both combine the chunks of both, in
    program order, so that they agree bit for bit and each keeps the weights of its own rows. A
    one-core kernel passes ``cores=1`` whatever its grid (its other programs do nothing)."""
    rows = chunks * group
    me = nl.program_id(0) if cores > 1 else 0
    everyone = cores * chunks
    stats = nl.ndarray((1, 2, cores * rows), dtype=nl.float32, buffer=nl.sbuf)  # maxima | sums, program order
    pe_transpose(stats[:, 0, me * rows:(me + 1) * rows], m[0:rows])
    pe_transpose(stats[:, 1, me * rows:(me + 1) * rows], l[0:rows])
    if cores > 1:
        peer = 1 - me
        theirs = nl.ndarray((1, 2, rows), dtype=nl.float32, buffer=nl.sbuf)
        nisa.sendrecv(src=stats[:, :, me * rows:(me + 1) * rows], dst=theirs, send_to_rank=peer,
                      recv_from_rank=peer, pipe_id=0)
        nisa.tensor_copy(dst=stats[:, :, peer * rows:(peer + 1) * rows], src=theirs)
    m_row, l_row = stats[:, 0], stats[:, 1]

    def per_chunk(t):  # noqa: ANN001, ANN202
        return t.reshape((1, everyone, group))

    def over_chunks(t):  # noqa: ANN001, ANN202
        return t.ap([[group, 1], [0, everyone], [1, group]], offset=0)

    def reduce_chunks(dst, t, op) -> None:  # noqa: ANN001
        nisa.tensor_reduce(dst=dst, op=op, data=per_chunk(t).permute((0, 2, 1)), axis=2)

    m_head = nl.ndarray((1, group), dtype=nl.float32, buffer=nl.sbuf)
    reduce_chunks(m_head, m_row, nl.maximum)
    w_row = nl.ndarray((1, cores * rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=per_chunk(w_row), data1=per_chunk(m_row), data2=over_chunks(m_head), op=nl.subtract)
    nisa.activation(dst=w_row, op=nl.exp, data=w_row)
    scaled_sums = nl.ndarray((1, cores * rows), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_tensor(dst=scaled_sums, data1=w_row, data2=l_row, op=nl.multiply)
    inv = nl.ndarray((1, group), dtype=nl.float32, buffer=nl.sbuf)
    reduce_chunks(inv, scaled_sums, nl.add)
    nisa.reciprocal(dst=inv, data=inv)
    nisa.tensor_tensor(dst=per_chunk(w_row), data1=per_chunk(w_row), data2=over_chunks(inv), op=nl.multiply)
    w_col = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    pe_transpose(w_col[0:rows], w_row[:, me * rows:(me + 1) * rows])
    return w_col


# --- launchers and support checks ----------------------------------------------------------------


def _head_checks(dims: Mapping[str, int]) -> str | None:
    if dims["D"] > P:
        return f"D={dims['D']} > {P}: head_dim must fit the partitions"
    if dims["Hq"] // dims["Hkv"] > P:
        return f"query group {dims['Hq'] // dims['Hkv']} > {P}"
    return None


def _cte_supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    problem = _head_checks(dims)
    if problem:
        return False, problem
    item = 2 if dtype == "bfloat16" else 4
    tiles = -(-dims["S"] // P)
    need = item * (tiles * P + tiles * dims["D"]) + 4 * 4 * P + 2 * item * P
    if need > target.sbuf_usable_bytes_per_partition:
        return False, f"S={dims['S']} needs {need} B per partition for K^T and V, {target.name} has {target.sbuf_usable_bytes_per_partition}"
    return True, f"causal prefill, K^T and V of one KV head resident ({need} B per partition)"


def _tkg_supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    problem = _head_checks(dims)
    return (False, problem) if problem else (True, "any cache length; 512-key blocks, run-time length mask")


def _bykey_supports(programs: int) -> Callable[[Mapping[str, int], str, Target], tuple[bool, str]]:
    def check(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
        if programs > 1 and target.lnc != programs:
            return False, f"an LNC={programs} kernel; {target.name} runs LNC={target.lnc}"
        problem = _head_checks(dims)
        if problem:
            return False, problem
        if not programs <= dims["Hq"] <= P * programs:
            return False, f"Hq={dims['Hq']}: each of {programs} program(s) takes 1 to {P} query heads (rows of O)"
        group, cols = dims["Hq"] // dims["Hkv"], key_columns(dims["L"])
        if cols * group * 4 > target.psum_bank_bytes:
            return False, (f"L={dims['L']}: {cols} key columns x {group} heads of fp32 scores exceed one PSUM bank "
                           f"({target.psum_bank_bytes} B): cache lengths up to {P * (target.psum_bank_bytes // (4 * group))}")
        item = 2 if dtype == "bfloat16" else 4
        need = 2 * item * P * cols + 4 * 3 * P + 8 * 4 * cols * group
        if need > target.sbuf_usable_bytes_per_partition:
            return False, f"L={dims['L']} needs {need} B per partition, {target.name} has {target.sbuf_usable_bytes_per_partition}"
        return True, f"{programs} program(s); {cols} key columns per partition, one softmax pass"

    return check


def _split_supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    problem = _head_checks(dims)
    if problem:
        return False, problem
    group = dims["Hq"] // dims["Hkv"]
    per_chunk, chunks = split_chunks(dims["L"], group)
    most = target.matmul_moving_fmax_fp32 if target.has("wide_moving") else target.psum_bank_bytes // 4
    most = min(most, SPLIT_MAX_CHUNK)
    if per_chunk > most:
        return False, (f"L={dims['L']} needs {per_chunk}-key chunks ({chunks} chunks of {group} heads on the partitions), "
                       f"more than {most}: cache lengths up to {(P // group) * most}")
    return True, f"L <= {(P // group) * most}; {chunks} chunks of {per_chunk} keys, combined once"


def _split_lnc_supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    if target.lnc != 2:
        return False, f"{target.name} runs LNC={target.lnc}: this kernel splits the cache over the 2 physical cores of an LNC=2 rank"
    problem = _head_checks(dims)
    if problem:
        return False, problem
    group = dims["Hq"] // dims["Hkv"]
    n, chunks = lnc_chunks(dims["L"], group)
    if dims["L"] % (2 * chunks) or not 0 < n <= P:
        return False, (f"L={dims['L']} must be a multiple of {2 * chunks} (2 cores x {chunks} chunks of {group} heads) "
                       f"and at most {2 * chunks * P}")
    return True, f"LNC=2: {dims['L'] // 2} keys per core in {chunks} interleaved chunks of {n}, one combine"


def _cte_launcher(fast_exp: bool) -> Callable[..., torch.Tensor]:
    def attention_prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float,
                          lnc: int = 1) -> torch.Tensor:
        return attention_cte_kernel[lnc](q, k, v, scale=scale, fast_exp=fast_exp)

    return attention_prefill


def _tkg_launcher(kernel: Callable[..., Any], fast_exp: bool, programs: int = 1) -> Callable[..., torch.Tensor]:
    """A decode launcher of ``kernel``, by default on ``programs`` cores (the kernels split their work
    over the programs of any grid, one program doing it all)."""
    def attention_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: int | torch.Tensor,
                         scale: float, lnc: int = programs) -> torch.Tensor:
        # A tensor length stays a tensor, so that a traced graph reads it at run time.
        valid = torch.as_tensor(length, dtype=torch.int32).reshape(1, 1)
        return kernel[lnc](q, k_cache, v_cache, valid, scale=scale, fast_exp=fast_exp)

    return attention_decode


def variants() -> list[Variant]:
    out = []
    for target, fast, exp_name in (("trn2", False, "ScalarE exp"), ("trn3", True, "VectorE fast exp (NC-v4)")):
        out.append(Variant(op="attention_prefill", name=f"attention_cte_{target}", targets=(target,),
                           kernel=_cte_launcher(fast), nki=True, priority=10, supports=_cte_supports,
                           tolerance=ATTENTION_TOLERANCE,
                           description=f"flash attention, 128x128 blocks to the diagonal, online softmax with {exp_name}"))
        out.append(Variant(op="attention_decode", name=f"attention_tkg_{target}", targets=(target,),
                           kernel=_tkg_launcher(attention_tkg_kernel, fast), nki=True, priority=10,
                           supports=_tkg_supports, tolerance=ATTENTION_TOLERANCE,
                           description=f"decode over K^T cache in 512-key blocks, run-time length mask, {exp_name}"))
        out.append(Variant(op="attention_decode", name=f"attention_tkg_split_{target}", targets=(target,),
                           kernel=_tkg_launcher(attention_tkg_split_kernel, fast), nki=True, priority=5,
                           supports=_split_supports, tolerance=ATTENTION_TOLERANCE,
                           description=f"decode split-K: cache chunks side by side on the partitions, one combine, "
                                       f"{exp_name}"))
        out.append(Variant(op="attention_decode", name=f"attention_tkg_split_lnc2_{target}", targets=(target,),
                           kernel=_tkg_launcher(attention_tkg_split_lnc_kernel, fast, 2), nki=True, priority=12,
                           supports=_split_lnc_supports, tolerance=ATTENTION_TOLERANCE,
                           description=f"decode split-K on both cores of an LNC=2 rank: half the cache each in "
                                       f"interleaved chunks, maxima/sums and outputs swapped by sendrecv, {exp_name}"))
        for programs, suffix, cores in ((1, "", "one core"), (2, "_lnc2", "both cores of an LNC=2 rank (query heads split)")):
            out.append(Variant(op="attention_decode", name=f"attention_tkg_bykey{suffix}_{target}", targets=(target,),
                               kernel=_tkg_launcher(attention_tkg_bykey_kernel, fast, programs), nki=True, priority=11 + 2 * programs,
                               supports=_bykey_supports(programs), tolerance=ATTENTION_TOLERANCE,
                               description=f"decode with the keys on the partitions: scores over Lmax/128 columns "
                                           f"on all lanes, cross-partition max by transpose, {exp_name}, {cores}"))
    return out


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
