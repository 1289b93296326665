"""The Neuron path's per-rank computations: plain functions of NxDI-layout tensors, each op through
its bound variant, testable anywhere (no NxDI needed). ``nkimoe.neuron.nxdi`` wires them into NxDI's
classes at its seams."""

from __future__ import annotations

import inspect
import itertools
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from nkimoe.autoselect import bind_model
from nkimoe.ops import Problem, get_op
from nkimoe.registry import BoundOp
from nkimoe.shapes import intermediate_per_rank

log = logging.getLogger("nkimoe.neuron")


class NeuronWiringError(ValueError):
    """An NxDI configuration or a variant layout that the Neuron path cannot wire."""


_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}

Layout = tuple[int, ...]  #: an axis permutation applied to the reference layout of a weight


# --- binding ------------------------------------------------------------------------------------


class Kernels:
    """Binds op problems for the detected target on first use and logs each binding once.

    ``lnc`` is the launch grid of every NKI kernel: the rank's logical-core count (NxDI's
    ``logical_nc_config``), which neuronx-cc requires each kernel of a graph to match
    (compiler/error-codes/EVRF066.rst: NCC_EVRF066)."""

    def __init__(self, lnc: int = 1) -> None:
        self._bound: dict[Problem, BoundOp] = {}
        self.lnc = lnc

    def bound(self, op: str, dtype: torch.dtype, **dims: int) -> BoundOp:
        if dtype not in _DTYPE_NAMES:
            raise NeuronWiringError(f"{op}: dtype {dtype} has no variants; valid: {', '.join(_DTYPE_NAMES.values())}")
        problem = Problem.of(op, _DTYPE_NAMES[dtype], **dims)
        hit = self._bound.get(problem)
        if hit is None:
            binding, detection = bind_model({str(problem): problem})
            hit = binding.ops[str(problem)]
            log.info("nkimoe %s: %s -> %s (%s: %s)", detection.target.name, problem, hit.name,
                     hit.decided_by, hit.reason)
            self._bound[problem] = hit
        return hit

    def clear(self) -> None:
        """Forget every binding: the next use binds afresh for the target detected then."""
        self._bound.clear()

    def problems(self) -> list[Problem]:
        """The problems bound so far."""
        return list(self._bound)

    def bound_names(self) -> dict[str, str]:
        """Each problem bound so far and the name of what it is bound to (a variant or a chain)."""
        return {str(problem): bound.name for problem, bound in self._bound.items()}


def axis_permutation(convert: Callable[[torch.Tensor], Any], ndim: int) -> Layout | None:
    """The axis permutation that ``convert`` (a variant's ``prepare``) applies, or None if it does
    something else. Found by converting a probe tensor with distinct sizes and values."""
    sizes = (2, 3, 5, 7)[:ndim]
    probe = torch.arange(math.prod(sizes)).reshape(sizes)
    out = convert(probe)
    for perm in itertools.permutations(range(ndim)):
        if tuple(out.shape) == tuple(sizes[p] for p in perm) and torch.equal(out, probe.permute(perm)):
            return perm
    return None


def variant_layout(bound: BoundOp, arg: str, ndim: int) -> Layout | None:
    """The layout the bound variant wants for weight ``arg``: identity when it prepares nothing."""
    convert = bound.variant.prepare.get(arg)
    return tuple(range(ndim)) if convert is None else axis_permutation(convert, ndim)


def permuted_shape(shape: Sequence[int], layout: Layout) -> tuple[int, ...]:
    return tuple(shape[a] for a in layout)


def kernel_tensor(value: Any) -> Any:
    """A tensor as NxDI 2.29 hands it to an NKI kernel (``attention_base.perform_prefill``, ``gqa.py``): a
    Parameter's ``.data``, and a plain ``torch.Tensor`` in place of a tensor subclass (a tracing
    placeholder); anything else unchanged."""
    if isinstance(value, nn.Parameter):
        value = value.data
    if isinstance(value, torch.Tensor) and type(value) is not torch.Tensor:
        value = value.as_subclass(torch.Tensor)
    return value


def takes_grid(fn: Callable[..., Any]) -> bool:
    """Whether a variant's launcher takes ``lnc``, the grid it launches its kernel with (``kernel[lnc]``)."""
    try:
        return "lnc" in inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False


def launch(bound: BoundOp, *args: Any, lnc: int = 1) -> Any:
    """Run the bound variant on ``args`` given as NxDI gives kernels their tensors (``kernel_tensor``),
    its kernel launched on ``lnc`` logical cores where its launcher takes the grid. A launcher without
    ``lnc`` launches its kernel with no grid, i.e. ``kernel[1]``: correct wherever it runs (the emulator,
    an LNC=1 graph), and named in the log once when the rank's LNC is larger, since neuronx-cc rejects
    a kernel whose LNC differs from the graph's (NCC_EVRF066)."""
    tensors = [kernel_tensor(a) for a in args]
    if takes_grid(bound.fn):
        return bound.fn(*tensors, lnc=lnc)
    if lnc > 1 and bound.variant.nki and bound.variant.name not in _UNGRIDDED:
        _UNGRIDDED.add(bound.variant.name)
        log.warning("nkimoe: %s launches its kernel without a grid (LNC 1) on an LNC=%d rank; neuronx-cc needs "
                    "kernel[%d] (NCC_EVRF066)", bound.variant.name, lnc, lnc)
    return bound.fn(*tensors)


#: NKI variants already named in the log for launching without a grid on an LNC > 1 rank.
_UNGRIDDED: set[str] = set()


def call_bound(bound: BoundOp, args: Sequence[Any], stored: Mapping[str, Layout], lnc: int = 1) -> Any:
    """Call the bound variant on ``args`` whose weights (by argument name) are stored permuted by
    ``stored``; a weight stored in another layout than the variant's is re-laid-out for the call."""
    names = get_op(bound.problem.op).arg_names
    ready = []
    for name, arg in zip(names, args):
        if name in stored:
            have = stored[name]
            want = variant_layout(bound, name, arg.dim())
            if want != have:
                arg = bound.variant.prepare_arg(name, arg.permute(tuple(have.index(a) for a in range(arg.dim()))))
            arg = arg.contiguous()
        ready.append(arg)
    return launch(bound, *ready, lnc=lnc)


# --- per-rank computations (plain tensors; NxDI layouts) -----------------------------------------


def linear_rows(kernels: Kernels, x: torch.Tensor, weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``x @ W^T`` over the last axis of ``x`` with the bound ``linear`` variant; ``weight`` is
    W [N, K] stored permuted by ``layout``."""
    k = x.shape[-1]
    n = weight.shape[layout.index(0)]
    rows = x.reshape(-1, k)
    bound = kernels.bound("linear", x.dtype, T=rows.shape[0], K=k, N=n)
    return call_bound(bound, (rows, weight), {"w": layout}, kernels.lnc).reshape(*x.shape[:-1], n)


def rms_norm(kernels: Kernels, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    bound = kernels.bound("rmsnorm", x.dtype, T=rows.shape[0], H=rows.shape[1])
    return launch(bound, rows, weight.to(x.dtype), eps, lnc=kernels.lnc).reshape(x.shape)


def add_rms_norm(kernels: Kernels, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, rmsnorm(x + residual))`` with the bound ``add_rmsnorm`` variant."""
    rows, res = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    bound = kernels.bound("add_rmsnorm", x.dtype, T=rows.shape[0], H=rows.shape[1])
    summed, normed = launch(bound, rows, res, weight.to(x.dtype), eps, lnc=kernels.lnc)
    return summed.reshape(x.shape), normed.reshape(x.shape)


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """[H, S, D] (one batch row of NxDI's BHSD) -> [S, H, D], the op contracts' layout."""
    return t.transpose(0, 1).contiguous()


def rotary(kernels: Kernels, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [B, Hq, S, D] and k [B, Hkv, S, D] with cos, sin [B, S, D] (NxDI's layouts)."""
    b, hq, s, d = q.shape
    bound = kernels.bound("rope", q.dtype, T=s, Hq=hq, Hkv=k.shape[1], D=d)
    pairs = [launch(bound, _heads_last(q[i]), _heads_last(k[i]), cos[i].to(q.dtype), sin[i].to(q.dtype), lnc=kernels.lnc)
             for i in range(b)]
    return (torch.stack([qi.transpose(0, 1) for qi, _ in pairs]), torch.stack([ki.transpose(0, 1) for _, ki in pairs]))


def prefill_attention(kernels: Kernels, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [B, Hq, S, D] over k, v [B, Hkv, S, D]; returns [B, Hq, S, D].

    NxDI pads prompts on the right, so causal masking alone keeps every real query off padding."""
    b, hq, s, d = q.shape
    bound = kernels.bound("attention_prefill", q.dtype, S=s, Hq=hq, Hkv=k.shape[1], D=d)
    return torch.stack([launch(bound, _heads_last(q[i]), _heads_last(k[i]), _heads_last(v[i]), scale, lnc=kernels.lnc)
                        .transpose(0, 1) for i in range(b)])


def _masked_decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, length: torch.Tensor,
                   scale: float) -> torch.Tensor:
    """The ``attention_decode`` reference with the cache length as a mask over every position,
    which a traced graph can take at run time (reference variants slice by a Python int)."""
    groups = q.shape[1] // k_cache.shape[0]
    keys = k_cache.transpose(1, 2).repeat_interleave(groups, dim=0)
    values = v_cache.repeat_interleave(groups, dim=0)
    scores = (q.transpose(0, 1) @ keys.transpose(1, 2)) * scale
    live = torch.arange(k_cache.shape[2], device=k_cache.device) < length.reshape(())
    scores = scores.masked_fill(~live, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return (probs @ values).transpose(0, 1)


def decode_attention(kernels: Kernels, q: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
                     k_prior: torch.Tensor, v_prior: torch.Tensor, position: torch.Tensor, scale: float,
                     k_transposed: bool) -> torch.Tensor:
    """One new token per sequence over its KV cache, NxDI's token-generation inputs.

    q [B, Hq, 1, D]; k_new, v_new [B, Hkv, 1, D]; k_prior [B, Hkv, D, L] when ``k_transposed``
    (NxDI's ``k_cache_transposed``, the ``attention_decode`` layout) else [B, Hkv, L, D];
    v_prior [B, Hkv, L, D]; position [B, 1], the new token's index. The caches do not hold the new
    token yet (NxDI writes it after the layer), so it is written into a copy at ``position`` and
    the variant reads ``position + 1`` entries. Returns [B, Hq, 1, D].
    """
    b, hq, _, d = q.shape
    hkv, lmax = k_new.shape[1], v_prior.shape[2]
    bound = kernels.bound("attention_decode", q.dtype, L=lmax, Hq=hq, Hkv=hkv, D=d)
    outs = []
    for i in range(b):
        k_cache = k_prior[i] if k_transposed else k_prior[i].transpose(1, 2)
        where = position[i].reshape(1, 1, 1).to(torch.int64)
        k_cache = k_cache.scatter(2, where.expand(hkv, d, 1), k_new[i].transpose(1, 2))
        v_cache = v_prior[i].scatter(1, where.expand(hkv, 1, d), v_new[i])
        length = (position[i].reshape(1, 1) + 1).to(torch.int32)
        query = _heads_last(q[i])
        if bound.variant.nki:
            out = launch(bound, query, k_cache.contiguous(), v_cache.contiguous(), length, scale, lnc=kernels.lnc)
        else:
            out = _masked_decode(query, k_cache, v_cache, length, scale)
        outs.append(out.transpose(0, 1))
    return torch.stack(outs)


def attention_block_binding(kernels: Kernels, dtype: torch.dtype, hidden: int, heads: int, kv_heads: int,
                            head_dim: int, cache_len: int, tp: int) -> BoundOp | None:
    """The fused ``attention_block`` variant bound for one rank's decode step (a KV cache of
    ``cache_len`` positions), or None where the Neuron path keeps NxDI's attention and its part
    seams: the block binds its chain, or the heads do not split over the ranks (NxDI replicates
    KV heads when there are fewer than ``tp``)."""
    if heads % tp or kv_heads % tp:
        return None
    bound = kernels.bound("attention_block", dtype, H=hidden, Hq=heads // tp, Hkv=kv_heads // tp, D=head_dim,
                          L=cache_len)
    return None if bound.is_chain else bound


def attention_block_weights(bound: BoundOp, w_q: torch.Tensor, w_k: torch.Tensor, w_v: torch.Tensor,
                            w_o: torch.Tensor, tp: int) -> dict[str, torch.Tensor]:
    """The fused ``attention_block`` variant's weights for every rank, from the whole model's
    projections (HF's q/k/v [heads * D, H] and o [H, Hq * D]): rank r's q|k|v rows (its query
    heads, then its KV heads' k and v rows) and its columns of W_o, each in the bound variant's
    load-time layout (``prepare``), stacked on axis 0 so that NxD's contiguous split of that axis
    (``dim=0, stride=1``) hands every rank its own. KV heads must split over the ranks (no
    replication), as the rank's KV cache then holds exactly the heads its query heads read."""
    kv_rows = w_k.shape[0]
    if w_q.shape[0] % tp or kv_rows % tp or w_o.shape[1] % tp:
        raise NeuronWiringError(f"attention_block: q rows {w_q.shape[0]}, k/v rows {kv_rows} and W_o columns "
                                f"{w_o.shape[1]} must split over tp_degree={tp}")
    qkv, out = [], []
    for q, k, v, o in zip(*(torch.chunk(w, tp, dim=0) for w in (w_q, w_k, w_v)), torch.chunk(w_o, tp, dim=1)):
        qkv.append(bound.variant.prepare_arg("w_qkv", torch.cat([q, k, v])))
        out.append(bound.variant.prepare_arg("w_o", o.contiguous()))
    return {"w_qkv": torch.cat(qkv), "w_o": torch.cat(out)}


def attention_block_step(kernels: Kernels, bound: BoundOp, x: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         w_qkv: torch.Tensor, q_norm_weight: torch.Tensor, k_norm_weight: torch.Tensor,
                         cos: torch.Tensor, sin: torch.Tensor, k_prior: torch.Tensor, v_prior: torch.Tensor,
                         position: torch.Tensor, w_o: torch.Tensor,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The attention half of a decode layer on one rank in the bound fused ``attention_block``
    variant: input norm, q|k|v, QK-norm, RoPE, attention over the cache and the new position, o_proj.

    x [B, 1, H] is the layer's input (the residual sum already: the block adds zeros to it);
    w_qkv, w_o this rank's weights in the variant's layout (:func:`attention_block_weights`);
    cos, sin [B, 1, D]; k_prior [B, Hkv, D, L] (NxDI's transposed K cache) and v_prior [B, Hkv, L, D]
    without the new token; position [B, 1]. Returns this rank's o_proj partial sum [B, 1, H] (the
    ranks' sum is the attention output) and the new token's k, v [B, Hkv, 1, D] for NxDI's KV-cache
    manager to write at ``position``."""
    zeros = torch.zeros(1, x.shape[-1], dtype=x.dtype, device=x.device)
    outs, ks, vs = [], [], []
    for i in range(x.shape[0]):
        _, out, k, v = launch(bound, x[i], zeros, norm_weight.to(x.dtype), w_qkv, q_norm_weight.to(x.dtype),
                              k_norm_weight.to(x.dtype), cos[i].to(x.dtype), sin[i].to(x.dtype), k_prior[i],
                              v_prior[i], position[i].reshape(1, 1).to(torch.int32), w_o, scale, eps, lnc=kernels.lnc)
        outs.append(out)
        ks.append(k.transpose(0, 1))
        vs.append(v.transpose(0, 1))
    return torch.stack(outs), torch.stack(ks), torch.stack(vs)


def stack_experts(state_dict: Mapping[str, torch.Tensor], prefix: str, experts: int, tp: int) -> tuple[torch.Tensor, torch.Tensor]:
    """HF's per-expert weights of one layer as the full (all-rank) expert tensors NxD shards.

    Returns ``gate_up [E, 2I, H]``: every expert's gate rows, then its up rows (HF's
    ``gate_up_proj``), so that sharding axis 1 with stride 2 (NxD's ``create_local_weight``) hands
    rank r ``[gate_r; up_r]``, the ``w_gate_up`` layout of its slice; and ``down [E, H, I]``, rank
    r's slice contiguous along axis 2.
    """
    intermediate_per_rank(state_dict[f"{prefix}experts.0.gate_proj.weight"].shape[0], tp)  # checks the split
    names = ("gate_proj", "up_proj", "down_proj")
    gate, up, down = (torch.stack([state_dict[f"{prefix}experts.{e}.{name}.weight"] for e in range(experts)])
                      for name in names)
    return torch.cat([gate, up], dim=1), down


def moe_partial(kernels: Kernels, x: torch.Tensor, gate: torch.Tensor, gate_layout: Layout, gate_up: torch.Tensor,
                down: torch.Tensor, expert_layouts: Mapping[str, Layout], top_k: int, norm_topk_prob: bool) -> torch.Tensor:
    """One rank's share of the sparse MoE block: router gate, router and the experts' slice of
    the intermediate axis this rank holds. x [B, S, H]; gate [E, H] stored by ``gate_layout``;
    gate_up, down this rank's expert weights stored by ``expert_layouts``. Summing the ranks'
    results (NxD's all-reduce) gives the block's output.

    The router runs in the gate weight's dtype, as NxD's ``RouterBase.get_router_logits`` casts the
    hidden states to it (neuronx_distributed/modules/moe/routing.py); its weights come back in x's dtype."""
    rows = x.reshape(-1, x.shape[-1])
    logits = linear_rows(kernels, rows.to(gate.dtype), gate, gate_layout)
    router = kernels.bound("router", logits.dtype, T=rows.shape[0], E=logits.shape[1], K=top_k)
    weights, ids = launch(router, logits, top_k, norm_topk_prob, lnc=kernels.lnc)
    weights = weights.to(x.dtype)
    h_axis = expert_layouts["w_down"].index(1)
    i_axis = expert_layouts["w_down"].index(2)
    experts = kernels.bound("expert_mlp", x.dtype, T=rows.shape[0], H=down.shape[h_axis], I=down.shape[i_axis],
                            E=down.shape[expert_layouts["w_down"].index(0)], K=top_k)
    out = call_bound(experts, (rows, weights, ids, gate_up, down), expert_layouts, kernels.lnc)
    return out.reshape(x.shape)


def moe_layer_partial(kernels: Kernels, attn: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor,
                      eps: float, gate: torch.Tensor, gate_layout: Layout, gate_up: torch.Tensor, down: torch.Tensor,
                      expert_layouts: Mapping[str, Layout], top_k: int,
                      norm_topk_prob: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The MoE half of a layer on one rank: ``(attn + residual, this rank's share of the sparse MoE
    block of rmsnorm(attn + residual))``, through the bound ``moe_block`` composite: one fused
    variant where one is bound (and the router gate is stored in the activations' dtype, the
    composite's contract), else its chain (``add_rms_norm`` then :func:`moe_partial`). Weights as
    :func:`moe_partial` takes them."""
    rows, res = attn.reshape(-1, attn.shape[-1]), residual.reshape(-1, attn.shape[-1])
    block = kernels.bound("moe_block", attn.dtype, T=rows.shape[0], H=rows.shape[1], E=gate.shape[gate_layout.index(0)],
                          K=top_k, I=down.shape[expert_layouts["w_down"].index(2)])
    if block.is_chain or gate.dtype != attn.dtype:
        summed, normed = add_rms_norm(kernels, attn, residual, norm_weight, eps)
        return summed, moe_partial(kernels, normed, gate, gate_layout, gate_up, down, expert_layouts, top_k,
                                   norm_topk_prob)
    stored = {"w_gate": gate_layout, **expert_layouts}
    summed, out = call_bound(block, (rows, res, norm_weight.to(attn.dtype), gate, gate_up, down, top_k, norm_topk_prob,
                                     eps), stored, kernels.lnc)
    return summed.reshape(attn.shape), out.reshape(attn.shape)


def decode_layouts(kernels: Kernels, dtype: torch.dtype, tokens: int, hidden: int, inter_local: int, experts: int,
                   top_k: int, gate_dtype: torch.dtype | None = None) -> tuple[Layout, dict[str, Layout]]:
    """Storage layouts of the router gate (computed in ``gate_dtype``, default ``dtype``) and the
    expert weights: those of the variants bound for decode (the phase the contest's latency is made
    of): the fused ``moe_block`` variant where one is bound and the gate is stored in ``dtype``
    (the composite's contract), else the router gate's and the experts'; variants that want another
    layout get their weights re-laid-out per call."""
    block = kernels.bound("moe_block", dtype, T=tokens, H=hidden, E=experts, K=top_k, I=inter_local)
    if block.is_chain or (gate_dtype or dtype) != dtype:
        gate = kernels.bound("linear", gate_dtype or dtype, T=tokens, K=hidden, N=experts)
        expert = kernels.bound("expert_mlp", dtype, T=tokens, H=hidden, I=inter_local, E=experts, K=top_k)
        owners = {"w_gate": (gate, "w"), "w_gate_up": (expert, "w_gate_up"), "w_down": (expert, "w_down")}
    else:
        owners = {name: (block, name) for name in ("w_gate", "w_gate_up", "w_down")}
    layouts = {name: variant_layout(bound, arg, 2 if name == "w_gate" else 3) for name, (bound, arg) in owners.items()}
    gate_layout = layouts.pop("w_gate")
    return gate_layout or (0, 1), {k: v or (0, 1, 2) for k, v in layouts.items()}


#: NxDI features whose code paths bypass the seams above (or shard differently), by flag.
_UNSUPPORTED_FLAGS = {
    "sequence_parallel_enabled": "sequence parallelism (the linear seam computes whole sequences)",
    "flash_decoding_enabled": "flash decoding (KV split by sequence across ranks)",
    "qkv_kernel_enabled": "NxDI's fused QKV kernel (replaces the norm and projection seams)",
    "qkv_nki_kernel_enabled": "NxDI's QKV NKI kernel (replaces the projection seam)",
    "attn_block_tkg_nki_kernel_enabled": "NxDI's attention-block decode kernel (replaces the attention seams)",
    "moe_fused_nki_kernel_enabled": "NxDI's fused MoE kernel (nkimoe runs its own MoE block)",
    "is_prefix_caching": "prefix caching",
    "is_chunked_prefill": "chunked prefill",
}


def check_neuron_config(neuron_config: Any) -> None:
    """Raise ``NeuronWiringError`` naming every NxDI setting the Neuron path cannot honour."""
    problems = [f"{flag}=True: {why}" for flag, why in _UNSUPPORTED_FLAGS.items() if getattr(neuron_config, flag, False)]
    for name in ("cp_degree", "attention_dp_degree", "moe_ep_degree"):
        value = getattr(neuron_config, name, 1) or 1
        if value > 1:
            problems.append(f"{name}={value}: nkimoe shards attention and experts over tensor parallelism only")
    if problems:
        raise NeuronWiringError("nkimoe's Neuron path cannot use: " + "; ".join(problems)
                                + ". Leave these at their defaults (the contest harness does).")


class BoundRMSNorm(nn.Module):
    """RMSNorm whose computation is the bound ``rmsnorm`` variant (an NKI kernel on Trainium)."""

    def __init__(self, size: int, eps: float, kernels: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps
        self.kernels = kernels

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return rms_norm(self.kernels, hidden_states, self.weight, self.variance_epsilon)


class LocalMatmul:
    """Stands in for a parallel linear layer's ``_forward_impl`` (its local matmul; NxD's layer
    still does the collectives), computing it with the bound ``linear`` variant."""

    def __init__(self, kernels: Kernels, layout: Layout) -> None:
        self.kernels, self.layout = kernels, layout

    def __call__(self, input: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 sequence_parallel_enabled: bool = False, **_: Any) -> torch.Tensor:
        if sequence_parallel_enabled:
            raise NeuronWiringError("sequence_parallel_enabled=True: the linear seam computes whole sequences")
        out = linear_rows(self.kernels, input, weight, self.layout)
        return out if bias is None else out + bias


#: One binding table for the whole model (every layer's call sites share their problems).
KERNELS = Kernels()
