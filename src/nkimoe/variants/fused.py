"""Fused ``moe_block`` for decode: residual add + RMSNorm, router gate, router and the selected
experts' SwiGLU in one NKI kernel, for Trn2 and Trn3.

The chain runs four kernels and passes the normalised hidden state, the logits, the routing
weights and the ids through HBM; each of those kernels also pays the DMA fixed latency on its
first load and last store. The fused kernel keeps all of them in SBUF: the only HBM traffic is
x and the residual in, the weights (norm, gate, the selected experts' blocks), and the residual
sum and the experts' output out.

Layout (one token): the hidden axis lies over the 128 partitions partition-major (hidden
p * H/128 + k at [p, k]) from the norm on, which is the order the expert blocks are laid out in
(``experts.gate_up_h_major``), so the normalised token is the experts' moving column as it is.
The router gate ``w_gate`` is prepared K-major ``[H, E]`` (``linear.weight_k_major``) and read as
[128, H/128, E] in the same hidden order; the gate's columns are the stationary against the token
column, and the rounded logits are transposed into one row, the router's layout (tokens on
partitions; ``_gate_logits``). The routing
weights and ids are broadcast to all partitions by a ones-matmul (exact: products with 1.0, fp32).

Critical path: the expert loads wait for the ids, so the kernel gets to them early. The load
queue starts one transfer every ~850 ns, so its four transfers are ordered by when they are
needed: the gate's 512 KiB first (it depends on nothing), then x and the residual, spread over the
partitions directly (runs of H/128 elements: a few ns of descriptors per DMA engine) and added on
VectorE while the norm weight, needed only by the norm's last product, loads last. The ids come
from the logits before the softmax (``route_rows``); the residual sum's store is issued after
the expert loads (a store holds every DMA engine for its completion semaphore). The selected
experts' loads then stream back to back on each core (``experts.decode_experts``), the ragged
rows of two experts' down blocks in one DMA.

On the two cores of an LNC=2 rank with a TP slice of the intermediate axis (I a multiple of 64, at
most 256: ``experts.splits_hidden``), the cores split the experts' work by hidden output instead
(``experts.decode_experts_split``): each computes SiLU(gate) * up of its half of the slots and
sends it to the other while the weights stream, then reads the down rows' halves of all of them,
so that after the last weight byte only the last down matmuls and one store of the core's half
remain (the expert split swaps the fp32 partial sums there: ~1.4 us of DMA latency).

The building blocks are shared with the chain's kernels: ``norms.spread_normalize``,
``routing.route_rows``, ``experts.decode_experts``; the sum x + residual is the DMA engines' fp32
add (``nisa.dma_compute``), rounded as ``add_spread`` rounds it; only the gate matmul's summation
order differs from ``linear_kernel``'s (hidden partition-major instead of tile-major). Rounding
points are the chain's: the sum, the
normalised value and its weight product, the logits and the routing weights are rounded to the
input dtype where the chain's kernels store them.

Per target: the Trn3 kernel takes the router's fast exponential (``nisa.exponential``); the rest
is the same (bandwidth-bound GEMVs, no Trn3-only instruction shortens them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch

from nkimoe.hookspecs import hookimpl
from nkimoe.nki import nisa, nki, nl
from nkimoe.registry import Variant
from nkimoe.targets import Target
from nkimoe.variants.experts import EXPERT_TOLERANCE, _expert_sbuf_bytes, decode_experts, decode_experts_split, \
    down_i_major, gate_up_h_major, lnc2_supports, on_all_partitions, split_sbuf_bytes, splits_hidden, \
    swap_and_store
from nkimoe.variants.linear import weight_k_major
from nkimoe.variants.norms import spread_normalize, store_spread
from nkimoe.variants.routing import route_rows
from nkimoe.variants.tiles import matmul_accumulate

P = 128

#: The expert tolerance widened by what reaches the experts through their inputs. The kernel's
#: normalised token and routing weights may each differ by an ulp from the reference's (norm:
#: summation order of the squares; router: reciprocal-multiply, see norms.py and routing.py), and
#: the logits by an ulp (gate summation order; the inputs keep top-k unambiguous, so the ids agree).
#: A relative error e in the token moves each expert's output by about e (SwiGLU is smooth and the
#: 2I- and H-term sums average independent roundings), a relative error in a routing weight moves
#: its slot by the same: bf16 adds 2^-7 (one ulp of each) to the expert tolerance's relative part,
#: and doubles its absolute floor for outputs that cancel. fp32: summation orders only.
MOE_BLOCK_TOLERANCE = {"bfloat16": (2 * EXPERT_TOLERANCE["bfloat16"][0], EXPERT_TOLERANCE["bfloat16"][1] + 2.0**-7),
                       "float32": (2e-5, 2e-5)}


def spread_view(x):  # noqa: ANN001, ANN202
    """The HBM matrix ``x`` [T, H] in the decode layout [128, T, H/128] (partition p: columns
    p*H/128 ... (p+1)*H/128 - 1 of every row), as a DMA source."""
    t, h = x.shape
    return x.reshape((t, P, h // P)).permute((1, 0, 2))


def _gate_logits(normed, gate, dtype):  # noqa: ANN001, ANN202
    """The router's logits [1, E] (in an SBUF [128, E] tile) of the token ``normed`` [128, H/128, 1]
    against the gate [128, H/128, E], rounded to ``dtype`` as the gate projection's output is.

    The gate's columns are the stationary, 128 experts per matmul against the one token column (64
    cycles of MultiplyMoving and 32 of LoadStationary per matmul, where the token as the stationary
    against 128 streaming columns takes 128 and 16), so the logits land on partitions; rounded, they
    are transposed on TensorE (exact) into the router's row."""
    e = gate.shape[2]
    spans = [(c, min(P, e - c)) for c in range(0, e, P)]
    ps = nl.ndarray((P, len(spans)), dtype=nl.float32, buffer=nl.psum)
    col = nl.ndarray((P, len(spans)), dtype=dtype, buffer=nl.sbuf)
    row = nl.ndarray((1, e), dtype=dtype, buffer=nl.psum)
    for n, (c, m) in enumerate(spans):
        matmul_accumulate(ps[0:m, n:n + 1], gate[:, :, c:c + m], normed)
        nisa.tensor_copy(dst=col[0:m, n:n + 1], src=ps[0:m, n:n + 1])
        nisa.nc_transpose(dst=row[:, c:c + m], data=col[0:m, n:n + 1])
    logits = nl.ndarray((P, e), dtype=dtype, buffer=nl.sbuf)
    nisa.tensor_copy(dst=logits[0:1], src=row)
    return logits


@nki.jit
def moe_block_tkg_kernel(x, residual, norm_weight, w_gate_t, w_gu, w_dn, top_k: int = 8, norm_topk_prob: bool = True,
                         eps: float = 1e-6, fast_exp: bool = False):
    """Decode MoE block for one token: add + RMSNorm, router gate, router, selected experts.

    Dimensions: H hidden (a multiple of 128), E experts (8..16384), K = top_k (<= 8), I intermediate.
    Args: x, residual [1, H] HBM; norm_weight [H]; w_gate_t [H, E] (K-major gate); w_gu [E, H, 2I],
    w_dn [E, I, H] (load-time layout of the experts); fast_exp: the router's nisa.exponential (Trn3).
    Returns: (x + residual, the experts' output), both [1, H] HBM in x.dtype.
    """
    t, h = x.shape
    e = w_gate_t.shape[1]
    hf = h // P
    summed = nl.ndarray((t, h), dtype=x.dtype, buffer=nl.shared_hbm)
    out = nl.ndarray((t, h), dtype=x.dtype, buffer=nl.shared_hbm)
    gate = nl.ndarray((P, hf, e), dtype=w_gate_t.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=gate, src=w_gate_t.reshape((P, hf, e)))
    st = nl.ndarray((P, t, hf), dtype=x.dtype, buffer=nl.sbuf)  # x + residual, added in fp32 by the DMA engines
    nisa.dma_compute(dst=st, srcs=[spread_view(x), spread_view(residual)], reduce_op=nl.add)
    w = nl.ndarray((P, hf), dtype=norm_weight.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=w, src=norm_weight.reshape((P, hf)))
    normed = spread_normalize(st, w, eps).reshape((P, hf, t))
    weights, idx = route_rows(_gate_logits(normed, gate, x.dtype), t, top_k, norm_topk_prob, fast_exp, x.dtype)
    # the routing weights and ids on every partition, [128, K] fp32 each
    route = nl.ndarray((t, 2 * top_k), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=route[:, 0:top_k], src=weights[0:t])
    nisa.tensor_copy(dst=route[:, top_k:2 * top_k], src=idx[0:t, 0:top_k])
    bc = on_all_partitions(route)
    me, cores = nl.program_id(0), nl.num_programs(0)
    ids = [idx[0:1, slot:slot + 1] for slot in range(top_k)]
    if splits_hidden(w_dn.shape[1], h, top_k, cores):
        # each core sums every expert over its half of the hidden outputs: no swap after the last byte
        if me == 0:  # its data is ready long before the expert stream, which it then does not hold up
            store_spread(summed, st)
        decode_experts_split(out, w_gu, w_dn, ids, bc[:, top_k:2 * top_k], bc[:, 0:top_k], normed)
        return summed, out
    # the experts' output in the normalised token's (partition-major) hidden order: [128, 1, H/128];
    # under LNC=2 each program takes every other slot
    acc = nl.ndarray((P, t, hf), dtype=nl.float32, buffer=nl.sbuf)
    nisa.memset(dst=acc, value=0.0)
    jobs = [(ids[slot], slot, normed, acc[:, 0, :]) for slot in range(me, top_k, cores)]
    held = decode_experts(w_gu, w_dn, jobs, bc[:, top_k:2 * top_k], bc[:, 0:top_k], x.dtype)  # noqa: F841
    if me == 0:  # under LNC=2 both programs hold the sum; one stores it, after the loads in program order
        store_spread(summed, st)
    swap_and_store(out, acc)
    return summed, out


def _supports(dims: Mapping[str, int], dtype: str, target: Target, programs: int = 1) -> tuple[bool, str]:
    if dims["T"] != 1:
        return False, f"T={dims['T']}: a decode kernel for one token (batch 1)"
    if dims["H"] % P:
        return False, f"H={dims['H']} is not a multiple of {P}"
    if dims["K"] > 8 or not 8 <= dims["E"] <= 16384:
        return False, f"K={dims['K']}, E={dims['E']}: one max8 pass takes K <= 8 of 8..16384 experts"
    item = 2 if dtype == "bfloat16" else 4
    experts = _expert_sbuf_bytes(dims)
    if splits_hidden(dims["I"], dims["H"], dims["K"], programs):
        experts = max(experts, split_sbuf_bytes(dims))
    need = experts * item // 2 + item * dims["H"] // P * dims["E"] + 16 * dims["E"]
    if need > target.sbuf_usable_bytes_per_partition:
        return False, f"needs {need} B per partition, {target.name} has {target.sbuf_usable_bytes_per_partition}"
    return True, f"T = 1, H a multiple of {P}, K <= 8; {need} B per partition"


def _launcher(fast_exp: bool, programs: int) -> Callable[..., tuple[torch.Tensor, torch.Tensor]]:
    def moe_block(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, w_gate: torch.Tensor,
                  w_gate_up: torch.Tensor, w_down: torch.Tensor, top_k: int = 8, norm_topk_prob: bool = True,
                  eps: float = 1e-6, lnc: int = programs) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights arrive prepared: w_gate [H, E], w_gate_up [E, H, 2I], w_down [E, I, H]. The kernel
        deals the experts out to the programs of any grid, so it launches on the rank's ``lnc``."""
        return tuple(moe_block_tkg_kernel[lnc](x, residual, norm_weight, w_gate, w_gate_up, w_down, top_k=top_k,
                            norm_topk_prob=norm_topk_prob, eps=eps, fast_exp=fast_exp))

    return moe_block


_PREPARE = {"w_gate": weight_k_major, "w_gate_up": gate_up_h_major, "w_down": down_i_major}


def variants() -> list[Variant]:
    return [
        Variant(op="moe_block", name=f"moe_block_tkg_{target}" + ("_lnc2" if programs == 2 else ""),
                targets=(target,), kernel=_launcher(fast, programs), nki=True, priority=10 + 12 * (programs - 1),
                supports=_supports if programs == 1 else lnc2_supports(partial(_supports, programs=2)),
                tolerance=MOE_BLOCK_TOLERANCE,
                prepare=_PREPARE,
                description=f"decode, one kernel: add+RMSNorm, gate, router ({exp}), selected experts weights "
                            f"stationary; activations stay in SBUF"
                            + ("; both cores of an LNC=2 rank, half the experts each (at a TP slice of I, half the "
                               "hidden outputs of every expert)" if programs == 2 else ""))
        for target, fast, exp in (("trn2", False, "ScalarE exp"), ("trn3", True, "VectorE fast exp"))
        for programs in (1, 2)
    ]


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for variant in variants():
        register(variant)
