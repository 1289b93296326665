"""MoE router: softmax in fp32, top-8, renormalise. NKI kernels for Trn2 and Trn3.

Layout: tokens on partitions (128 per tile), the E expert logits on the free axis. The top-8 is
``max8`` of the logits (8 largest, descending; softmax is monotone) followed by ``nc_find_index8``
(their positions), so ids come out in descending order of probability as ``torch.topk`` gives them,
before the softmax.

Per target: the Trn3 kernel computes ``exp(logits - max)`` and its row sum in one
``nisa.exponential`` (VectorE fast exp, 4x ScalarE's exp rate; NeuronCore-v4 only). Trn2 has no
such instruction: its kernel uses ScalarE ``activation(exp)`` with the negated max as bias and an
add reduction. Both divide by the sum as a multiply by its reciprocal, so weights match the
reference within a few fp32 ulps before the final rounding to the logits' dtype.
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

#: bf16 weights: one ulp (2^-7 relative) after fp32 math; fp32: a few fp32 ulps (reciprocal-multiply
#: instead of a division, another summation order).
ROUTER_TOLERANCE = {"bfloat16": (1e-3, 2.0**-7), "float32": (1e-6, 1e-5)}


def route_rows(lg, p: int, top_k: int, norm_topk_prob: bool, fast_exp: bool, dtype):  # noqa: ANN001, ANN201
    """Softmax, top-k and renormalisation of the first ``p`` rows of the SBUF logits ``lg [128, E]``
    (any float dtype; the arithmetic is fp32). Returns SBUF tiles: weights [128, K] in ``dtype`` and
    ids [128, 8] uint32 (descending probability).

    The ids come first, from the logits (softmax is monotone, so their top 8 are the probabilities'),
    so that a caller's expert loads need not wait for the softmax; the first of the 8 is the row's
    maximum, and the top 8 probabilities are exp(top logit - max) times 1 / (sum over all E), the same
    fp32 operations on the same values as exponentiating the whole row."""
    e = lg.shape[1]
    top_lg = nl.ndarray((P, 8), dtype=nl.float32, buffer=nl.sbuf)
    nisa.max8(dst=top_lg[0:p], src=lg[0:p])
    idx = nl.ndarray((P, 8), dtype=nl.uint32, buffer=nl.sbuf)
    nisa.nc_find_index8(dst=idx[0:p], data=lg[0:p], vals=top_lg[0:p])
    row_max = top_lg[0:p, 0:1]
    probs = nl.ndarray((P, e), dtype=nl.float32, buffer=nl.sbuf)
    total = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    top = nl.ndarray((P, 8), dtype=nl.float32, buffer=nl.sbuf)
    if fast_exp:
        nisa.exponential(dst=probs[0:p], src=lg[0:p], max_value=row_max, reduce_res=total[0:p],
                         reduce_cmd=nisa.reduce_cmd.reset_reduce)
        nisa.exponential(dst=top[0:p], src=top_lg[0:p], max_value=row_max)
    else:
        neg_max = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=neg_max[0:p], data=row_max, op0=nl.multiply, operand0=-1.0)
        nisa.activation(dst=probs[0:p], op=nl.exp, data=lg[0:p], bias=neg_max[0:p], reduce_op=nl.add,
                        reduce_res=total[0:p], reduce_cmd=nisa.reduce_cmd.reset_reduce)
        nisa.activation(dst=top[0:p], op=nl.exp, data=top_lg[0:p], bias=neg_max[0:p])
    inv = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.reciprocal(dst=inv[0:p], data=total[0:p])
    nisa.tensor_scalar(dst=top[0:p], data=top[0:p], op0=nl.multiply, operand0=inv[0:p])
    w = nl.ndarray((P, top_k), dtype=dtype, buffer=nl.sbuf)
    if norm_topk_prob:
        top_sum = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
        nisa.tensor_reduce(dst=top_sum[0:p], op=nl.add, data=top[0:p, 0:top_k], axis=1)
        nisa.reciprocal(dst=top_sum[0:p], data=top_sum[0:p])
        nisa.tensor_scalar(dst=w[0:p], data=top[0:p, 0:top_k], op0=nl.multiply, operand0=top_sum[0:p])
    else:
        nisa.tensor_copy(dst=w[0:p], src=top[0:p, 0:top_k])
    return w, idx


@nki.jit
def router_kernel(logits, top_k: int = 8, norm_topk_prob: bool = True, fast_exp: bool = False):
    """Softmax (fp32), top-k (k <= 8) and renormalisation over the top-k.

    Dimensions: T tokens, E experts (8 <= E <= 16384), K = top_k.
    Args: logits [T, E] HBM bf16|fp32; fast_exp uses nisa.exponential (Trn3 only).
    Returns: weights [T, K] HBM in logits.dtype, ids [T, K] HBM uint32 (descending probability).
    Launched as ``kernel[lnc]``: program p of the grid takes the 128-token tiles p, p + lnc, ...
    """
    t, e = logits.shape
    weights = nl.ndarray((t, top_k), dtype=logits.dtype, buffer=nl.shared_hbm)
    ids = nl.ndarray((t, top_k), dtype=nl.uint32, buffer=nl.shared_hbm)
    for tile in nl.affine_range(nl.program_id(0), (t + P - 1) // P, nl.num_programs(0)):
        p = min(P, t - tile * P)
        lg = nl.ndarray((P, e), dtype=nl.float32, buffer=nl.sbuf)
        nisa.dma_copy(dst=lg[0:p], src=logits[tile * P:tile * P + p, :])
        w, idx = route_rows(lg, p, top_k, norm_topk_prob, fast_exp, logits.dtype)
        nisa.dma_copy(dst=weights[tile * P:tile * P + p, :], src=w[0:p])
        nisa.dma_copy(dst=ids[tile * P:tile * P + p, :], src=idx[0:p, 0:top_k])
    return weights, ids


def _supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    if dims["K"] > 8:
        return False, f"K={dims['K']} > 8: one max8 pass yields 8 values"
    if not 8 <= dims["E"] <= 16384:
        return False, f"E={dims['E']} outside max8's 8..16384 elements per partition"
    return True, "K <= 8, 8 <= E <= 16384, any token count"


def _launcher(fast_exp: bool) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def router(logits: torch.Tensor, top_k: int = 8, norm_topk_prob: bool = True,
               lnc: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        weights, ids = router_kernel[lnc](logits, top_k=top_k, norm_topk_prob=norm_topk_prob, fast_exp=fast_exp)
        return weights, torch.as_tensor(ids).to(torch.int64)

    return router


def variants() -> list[Variant]:
    return [
        Variant(op="router", name="router_nki_trn2", targets=("trn2",), kernel=_launcher(False), nki=True,
                priority=10, supports=_supports, tolerance=ROUTER_TOLERANCE,
                description="ScalarE exp with bias=-max and add-reduce; max8 + nc_find_index8"),
        Variant(op="router", name="router_nki_trn3", targets=("trn3",), kernel=_launcher(True), nki=True,
                priority=10, supports=_supports, tolerance=ROUTER_TOLERANCE,
                description="VectorE fast exp (nisa.exponential, Trn3 only) with fused sum; max8 + nc_find_index8"),
    ]


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
