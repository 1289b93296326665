"""The Neuron path: the contest's ``NeuronQwen3MoeForCausalLM`` built on neuronx-distributed-inference
(NxDI), with every op of the model running through its bound variant.

The contest harness (aws-neuron/nki-moe ``main.py``) uses only ``NeuronQwen3MoeForCausalLM``:
``get_neuron_config_cls()(**kwargs)``, ``get_config_cls()(neuron_config, load_config=...)``, the
constructor ``(model_path, config)``, ``compile(dir)`` and ``load(dir)``. NxDI keeps what it is
good at (tensor-parallel sharding of the checkpoint, the KV-cache manager, bucketing, tracing,
sampling); nkimoe takes each op at NxDI's own seams (read from
``neuronx_distributed_inference/modules/attention/attention_base.py``,
``models/model_base.py``, ``modules/kvcache/kv_cache_manager.py`` and
``neuronx_distributed/parallel_layers/layers.py``):

==============================  ==============================================================
op                              seam
==============================  ==============================================================
rmsnorm (input, q/k, final)     the norm modules (``BoundRMSNorm``)
add_rmsnorm (post-attention)    the decoder layer (``NeuronQwen3MoeDecoderLayer.forward``)
linear (q/k/v, o, lm_head)      each parallel linear's local matmul (``_forward_impl``); the
                                weight is stored in the variant's layout (NxDI's
                                ``transpose_parallel_linear_layer`` for K-major kernels)
rope                            ``apply_rotary_embedding``
attention_prefill               ``perform_prefill``
attention_decode                ``compute_for_token_gen`` (K cache stored transposed)
linear (router gate), router,   nkimoe's sparse MoE block: every rank holds all experts' slice
expert_mlp                      of the intermediate axis (768 over TP 4: 192, unpadded), runs
                                the bound expert variant on it and all-reduces the partial sums
==============================  ==============================================================

Each op is bound the first time a traced forward meets its shape (so the bucket sizes NxDI
traces decide the problems) and each binding is logged once. Weight layouts a variant asks for
(``Variant.prepare``) are applied in the checkpoint conversion, before NxD shards it, when the
layout is a permutation of axes; otherwise at call time.

The layout arithmetic and every per-rank computation are plain functions of tensors, tested on
CPU against HF transformers with the ranks simulated; the classes that subclass NxDI need the
Neuron SDK and are verified only on a Trainium host. Without NxDI the names still import; using
them raises ``NeuronUnavailable`` saying what is missing.
"""

from __future__ import annotations

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

try:  # pragma: no cover - exercised only where the Neuron SDK is installed
    from neuronx_distributed_inference.models.qwen3_moe import (
        modeling_qwen3_moe as _nxdi,
    )

    NEURON_AVAILABLE = True
except ImportError:  # the usual case off Trainium
    _nxdi = None
    NEURON_AVAILABLE = False

log = logging.getLogger("nkimoe.neuron")

class NeuronUnavailable(ImportError):
    """The Neuron path was used where neuronx-distributed-inference cannot be imported."""


class NeuronWiringError(ValueError):
    """An NxDI configuration or a variant layout that the Neuron path cannot wire."""


_MISSING = ("the Neuron path of qwen.py needs neuronx-distributed-inference and the Neuron SDK (a Trainium "
            "host's Neuron venv, e.g. /opt/aws_neuronx_venv_pytorch_2_9_nxd_inference); off Trainium use the "
            "portable model: nkimoe.model.Qwen3Moe")

_DTYPE_NAMES = {torch.bfloat16: "bfloat16", torch.float32: "float32"}

Layout = tuple[int, ...]  #: an axis permutation applied to the reference layout of a weight


# --- binding ------------------------------------------------------------------------------------


class Kernels:
    """Binds op problems for the detected target on first use and logs each binding once."""

    def __init__(self) -> None:
        self._bound: dict[Problem, BoundOp] = {}

    def bound(self, op: str, dtype: torch.dtype, **dims: int) -> BoundOp:
        if dtype not in _DTYPE_NAMES:
            raise NeuronWiringError(f"{op}: dtype {dtype} has no variants; valid: {', '.join(_DTYPE_NAMES.values())}")
        problem = Problem.of(op, _DTYPE_NAMES[dtype], **dims)
        hit = self._bound.get(problem)
        if hit is None:
            binding, detection = bind_model({str(problem): problem})
            hit = binding.ops[str(problem)]
            log.info("nkimoe %s: %s -> %s (%s: %s)", detection.target.name, problem, hit.variant.name,
                     hit.decided_by, hit.reason)
            self._bound[problem] = hit
        return hit

    def clear(self) -> None:
        """Forget every binding: the next use binds afresh for the target detected then."""
        self._bound.clear()

    def problems(self) -> list[Problem]:
        """The problems bound so far."""
        return list(self._bound)


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


def call_bound(bound: BoundOp, args: Sequence[Any], stored: Mapping[str, Layout]) -> Any:
    """Call the bound variant on ``args`` whose weights (by argument name) are stored permuted by
    ``stored``; a weight stored in another layout than the variant's is re-laid-out for the call."""
    names = get_op(bound.problem.op).arg_names
    ready = []
    for name, arg in zip(names, args):
        if name in stored:
            have = stored[name]
            want = variant_layout(bound, name, arg.dim())
            if want != have:
                reference = arg.permute(tuple(have.index(a) for a in range(arg.dim())))
                convert = bound.variant.prepare.get(name)
                arg = reference if convert is None else convert(reference)
            arg = arg.contiguous()
        ready.append(arg)
    return bound.fn(*ready)


# --- per-rank computations (plain tensors; NxDI layouts) -----------------------------------------


def linear_rows(kernels: Kernels, x: torch.Tensor, weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """``x @ W^T`` over the last axis of ``x`` with the bound ``linear`` variant; ``weight`` is
    W [N, K] stored permuted by ``layout``."""
    k = x.shape[-1]
    n = weight.shape[layout.index(0)]
    rows = x.reshape(-1, k)
    bound = kernels.bound("linear", x.dtype, T=rows.shape[0], K=k, N=n)
    return call_bound(bound, (rows, weight), {"w": layout}).reshape(*x.shape[:-1], n)


def rms_norm(kernels: Kernels, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    rows = x.reshape(-1, x.shape[-1])
    bound = kernels.bound("rmsnorm", x.dtype, T=rows.shape[0], H=rows.shape[1])
    return bound.fn(rows, weight.to(x.dtype), eps).reshape(x.shape)


def add_rms_norm(kernels: Kernels, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x + residual, rmsnorm(x + residual))`` with the bound ``add_rmsnorm`` variant."""
    rows, res = x.reshape(-1, x.shape[-1]), residual.reshape(-1, x.shape[-1])
    bound = kernels.bound("add_rmsnorm", x.dtype, T=rows.shape[0], H=rows.shape[1])
    summed, normed = bound.fn(rows, res, weight.to(x.dtype), eps)
    return summed.reshape(x.shape), normed.reshape(x.shape)


def _heads_last(t: torch.Tensor) -> torch.Tensor:
    """[H, S, D] (one batch row of NxDI's BHSD) -> [S, H, D], the op contracts' layout."""
    return t.transpose(0, 1).contiguous()


def rotary(kernels: Kernels, q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
           sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RoPE of q [B, Hq, S, D] and k [B, Hkv, S, D] with cos, sin [B, S, D] (NxDI's layouts)."""
    b, hq, s, d = q.shape
    bound = kernels.bound("rope", q.dtype, T=s, Hq=hq, Hkv=k.shape[1], D=d)
    pairs = [bound.fn(_heads_last(q[i]), _heads_last(k[i]), cos[i].to(q.dtype), sin[i].to(q.dtype)) for i in range(b)]
    return (torch.stack([qi.transpose(0, 1) for qi, _ in pairs]), torch.stack([ki.transpose(0, 1) for _, ki in pairs]))


def prefill_attention(kernels: Kernels, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of q [B, Hq, S, D] over k, v [B, Hkv, S, D]; returns [B, Hq, S, D].

    NxDI pads prompts on the right, so causal masking alone keeps every real query off padding."""
    b, hq, s, d = q.shape
    bound = kernels.bound("attention_prefill", q.dtype, S=s, Hq=hq, Hkv=k.shape[1], D=d)
    return torch.stack([bound.fn(_heads_last(q[i]), _heads_last(k[i]), _heads_last(v[i]), scale).transpose(0, 1)
                        for i in range(b)])


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
            out = bound.fn(query, k_cache.contiguous(), v_cache.contiguous(), length, scale)
        else:
            out = _masked_decode(query, k_cache, v_cache, length, scale)
        outs.append(out.transpose(0, 1))
    return torch.stack(outs)


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
    results (NxD's all-reduce) gives the block's output."""
    rows = x.reshape(-1, x.shape[-1])
    logits = linear_rows(kernels, rows, gate, gate_layout)
    router = kernels.bound("router", x.dtype, T=rows.shape[0], E=logits.shape[1], K=top_k)
    weights, ids = router.fn(logits, top_k, norm_topk_prob)
    h_axis = expert_layouts["w_down"].index(1)
    i_axis = expert_layouts["w_down"].index(2)
    experts = kernels.bound("expert_mlp", x.dtype, T=rows.shape[0], H=down.shape[h_axis], I=down.shape[i_axis],
                            E=down.shape[expert_layouts["w_down"].index(0)], K=top_k)
    out = call_bound(experts, (rows, weights, ids, gate_up, down), expert_layouts)
    return out.reshape(x.shape)


def decode_layouts(kernels: Kernels, dtype: torch.dtype, tokens: int, hidden: int, inter_local: int, experts: int,
                   top_k: int) -> tuple[Layout, dict[str, Layout]]:
    """Storage layouts of the router gate and the expert weights: those of the variants bound for
    decode (the phase the contest's latency is made of); prefill variants that want another
    layout get their weights re-laid-out per call."""
    gate = kernels.bound("linear", dtype, T=tokens, K=hidden, N=experts)
    expert = kernels.bound("expert_mlp", dtype, T=tokens, H=hidden, I=inter_local, E=experts, K=top_k)
    layouts = {"w_gate_up": variant_layout(expert, "w_gate_up", 3), "w_down": variant_layout(expert, "w_down", 3)}
    gate_layout = variant_layout(gate, "w", 2)
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


if NEURON_AVAILABLE:  # pragma: no cover - needs the Neuron SDK
    from neuronx_distributed.parallel_layers.layers import (
        BaseParallelLinear,
        ColumnParallelLinear,
        ParallelEmbedding,
        RowParallelLinear,
    )
    from neuronx_distributed.parallel_layers.mappings import (
        reduce_from_tensor_model_parallel_region,
    )
    from neuronx_distributed.parallel_layers.utils import (
        set_tensor_model_parallel_attributes,
    )
    from neuronx_distributed_inference.models.layer_boundary_marker import (
        ModuleMarkerEndWrapper,
        ModuleMarkerStartWrapper,
    )
    from neuronx_distributed_inference.modules.attention.attention_base import (
        FlashAttentionStrategy,
    )
    from neuronx_distributed_inference.modules.attention.utils import (
        transpose_parallel_linear_layer,
    )

    def _decode_tokens(config: Any) -> int:
        return int(config.neuron_config.batch_size)

    def _wire_linear(module: Any, config: Any) -> None:
        """Store ``module``'s weight in the layout of its decode-bound variant (for the model's
        dtype; NxDI casts the modules to it) and compute its local matmul with the bound variant."""
        n, k = module.weight.shape
        bound = KERNELS.bound("linear", config.neuron_config.torch_dtype, T=_decode_tokens(config), K=k, N=n)
        layout = variant_layout(bound, "w", 2) or (0, 1)
        if layout == (1, 0):
            module.weight = transpose_parallel_linear_layer(module.weight)
        module._forward_impl = LocalMatmul(KERNELS, layout)

    def _moe_dims(config: Any) -> tuple[int, int, int]:
        """(experts, HF's intermediate size, tp degree)."""
        inter = config.moe_intermediate_size - getattr(config, "moe_intermediate_pad_size", 0)
        return config.num_experts, inter, config.neuron_config.tp_degree

    def model_layouts(config: Any) -> tuple[Layout, dict[str, Layout]]:
        """Storage layouts of the router gate and the expert weights for ``config`` (decode-bound variants)."""
        experts, inter, tp = _moe_dims(config)
        return decode_layouts(KERNELS, config.neuron_config.torch_dtype, _decode_tokens(config), config.hidden_size,
                              intermediate_per_rank(inter, tp), experts, config.num_experts_per_tok)

    class Qwen3MoeInferenceConfig(_nxdi.Qwen3MoeInferenceConfig):
        """NxDI's Qwen3-MoE config, checked for what the Neuron path wires; the K cache is stored
        transposed ([B, Hkv, D, L]), the ``attention_decode`` layout."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            check_neuron_config(self.neuron_config)
            self.neuron_config.k_cache_transposed = True

    def _score_scale(attention: Any) -> float:
        """The factor on q.k: 2.29's attention has ``softmax_scale`` (the divisor); the releases before it
        divide by sqrt(head_dim) in place (modules/attention/attention_base.py)."""
        divisor = getattr(attention, "softmax_scale", None)
        return 1.0 / (math.sqrt(attention.head_dim) if divisor is None else divisor)

    class NeuronQwen3MoEAttention(_nxdi.NeuronQwen3MoEAttention):
        """NxDI's attention with nkimoe's q/k norms, projections, RoPE, prefill and decode."""

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.kernels = KERNELS
            self.q_layernorm = BoundRMSNorm(self.head_dim, self.rms_norm_eps, KERNELS)
            self.k_layernorm = BoundRMSNorm(self.head_dim, self.rms_norm_eps, KERNELS)
            for proj in (self.qkv_proj, self.o_proj):
                for module in proj.modules():
                    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                        _wire_linear(module, config)

        def apply_rotary_embedding(self, Q, K, V, position_ids, cos_cache, sin_cache, use_polar_compatible_rope):
            if use_polar_compatible_rope:
                return super().apply_rotary_embedding(Q, K, V, position_ids, cos_cache, sin_cache, use_polar_compatible_rope)
            if cos_cache is None or sin_cache is None:
                cos_cache, sin_cache = self.rotary_emb(V, position_ids)
            Q, K = rotary(self.kernels, Q, K, cos_cache, sin_cache)
            return Q, K, cos_cache, sin_cache

        def perform_prefill(self, Q, K, V, q_len, bsz, attention_mask):
            return prefill_attention(self.kernels, Q, K, V, _score_scale(self)), FlashAttentionStrategy.NONE

        def compute_for_token_gen(self, Q, K, V, position_ids, past_key_value, attention_mask, active_mask,
                                  is_prefix_caching=False):
            if is_prefix_caching or position_ids.shape[-1] != 1:  # speculation: several new tokens per step
                return super().compute_for_token_gen(Q, K, V, position_ids, past_key_value, attention_mask,
                                                     active_mask, is_prefix_caching)
            return decode_attention(self.kernels, Q, K, V, past_key_value[0], past_key_value[1], position_ids,
                                    _score_scale(self), self.k_cache_transposed)

    class ExpertWeights(BaseParallelLinear):
        """All experts' weights for this rank's slice of the intermediate axis, stored in the bound
        variant's layout, with NxD's sharding attributes (a parallel layer, so NxD shards it)."""

        def __init__(self, config: Any, layouts: Mapping[str, Layout]) -> None:
            super().__init__()
            experts, inter, tp = _moe_dims(config)
            ip, dtype = intermediate_per_rank(inter, tp), config.neuron_config.torch_dtype
            shapes = {"w_gate_up": (experts, 2 * ip, config.hidden_size), "w_down": (experts, config.hidden_size, ip)}
            # Sharded axis (in the reference layout) and stride, as stack_experts arranges them.
            split = {"w_gate_up": (1, 2), "w_down": (2, 1)}
            for arg, name in (("w_gate_up", "gate_up_proj"), ("w_down", "down_proj")):
                layout = layouts[arg]
                # Registered first, then given NxD's attributes, as NxD's layers do: NxD's meta-device build
                # (init_on_device) re-creates a Parameter at registration with its __dict__ as arguments.
                setattr(self, name, nn.Parameter(torch.empty(permuted_shape(shapes[arg], layout), dtype=dtype),
                                                 requires_grad=False))
                axis, stride = split[arg]
                set_tensor_model_parallel_attributes(getattr(self, name), is_parallel=True, dim=layout.index(axis),
                                                     stride=stride, num_partitions=tp)

    class RouterGate(nn.Module):
        """The router gate's weight [E, H], replicated on every rank, stored in ``layout``."""

        def __init__(self, experts: int, hidden: int, layout: Layout, dtype: torch.dtype) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.empty(permuted_shape((experts, hidden), layout), dtype=dtype),
                                       requires_grad=False)

    class NeuronQwen3MoeSparseBlock(nn.Module):
        """Router gate, router and experts through their bound variants; partial sums all-reduced."""

        def __init__(self, config: Any) -> None:
            super().__init__()
            self.gate_layout, self.expert_layouts = model_layouts(config)
            self.gate = RouterGate(config.num_experts, config.hidden_size, self.gate_layout, config.neuron_config.torch_dtype)
            self.experts = ExpertWeights(config, self.expert_layouts)
            self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob

        def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> tuple[torch.Tensor]:
            partial = moe_partial(KERNELS, hidden_states, self.gate.weight, self.gate_layout, self.experts.gate_up_proj,
                                  self.experts.down_proj, self.expert_layouts, self.top_k, self.norm_topk_prob)
            return (reduce_from_tensor_model_parallel_region(partial),)

    class NeuronQwen3MoeDecoderLayer(nn.Module):
        """Norm, attention, residual add fused with the post-attention norm, MoE, residual add."""

        def __init__(self, config: Any, layer_idx: int) -> None:
            super().__init__()
            eps = config.rms_norm_eps
            self.self_attn = NeuronQwen3MoEAttention(config)
            self.input_layernorm = BoundRMSNorm(config.hidden_size, eps, KERNELS)
            self.post_attention_layernorm = BoundRMSNorm(config.hidden_size, eps, KERNELS)
            self.mlp = NeuronQwen3MoeSparseBlock(config)

        def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                    position_ids: torch.Tensor | None = None, past_key_value: Any = None, **kwargs: Any) -> tuple:
            kwargs.pop("padding_mask", None)
            residual = ModuleMarkerStartWrapper()(hidden_states)
            attn, present_key_value, cos_cache, sin_cache = self.self_attn(
                hidden_states=self.input_layernorm(residual), attention_mask=attention_mask, position_ids=position_ids,
                past_key_value=past_key_value, **kwargs)
            norm = self.post_attention_layernorm
            residual, normed = add_rms_norm(KERNELS, attn, residual, norm.weight, norm.variance_epsilon)
            hidden_states = ModuleMarkerEndWrapper()(residual + self.mlp(normed)[0])
            return hidden_states, present_key_value, cos_cache, sin_cache, None

    class NeuronQwen3MoeModel(_nxdi.NeuronQwen3MoeModel):
        """NxDI's traced Qwen3-MoE model over nkimoe's layers, final norm and lm_head."""

        def init_model(self, config: Any) -> None:
            self.padding_idx, self.vocab_size = config.pad_token_id, config.vocab_size
            self.embed_tokens = ParallelEmbedding(config.vocab_size, config.hidden_size, self.padding_idx,
                                                  dtype=config.neuron_config.torch_dtype, shard_across_embedding=True)
            self.layers = nn.ModuleList(
                [NeuronQwen3MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)])
            self.norm = BoundRMSNorm(config.hidden_size, config.rms_norm_eps, KERNELS)
            self.lm_head = ColumnParallelLinear(config.hidden_size, config.vocab_size, bias=False,
                                                gather_output=not self.on_device_sampling)
            _wire_linear(self.lm_head, config)

    def convert_qwen3_moe_hf_to_neuron_state_dict(neuron_state_dict: dict, config: Any) -> dict:
        """HF Qwen3-MoE weights -> this model's names and layouts (NxD shards the result per rank)."""
        _nxdi.maybe_dequantize_layer(neuron_state_dict, config)
        sd = neuron_state_dict
        tp = config.neuron_config.tp_degree
        sd["rank_util.rank"] = torch.arange(0, tp, dtype=torch.int32)
        gate_layout, expert_layouts = model_layouts(config)
        experts = config.num_experts
        for layer in range(config.num_hidden_layers):
            p = f"layers.{layer}."
            sd[f"{p}self_attn.rank_util.rank"] = torch.arange(0, tp, dtype=torch.int32)
            sd[f"{p}self_attn.q_layernorm.weight"] = sd.pop(f"{p}self_attn.q_norm.weight")
            sd[f"{p}self_attn.k_layernorm.weight"] = sd.pop(f"{p}self_attn.k_norm.weight")
            sd[f"{p}mlp.gate.weight"] = sd[f"{p}mlp.gate.weight"].permute(gate_layout).contiguous()
            gate_up, down = stack_experts(sd, f"{p}mlp.", experts, tp)
            for e in range(experts):
                for name in ("gate_proj", "up_proj", "down_proj"):
                    del sd[f"{p}mlp.experts.{e}.{name}.weight"]
            sd[f"{p}mlp.experts.gate_up_proj"] = gate_up.permute(expert_layouts["w_gate_up"]).contiguous()
            sd[f"{p}mlp.experts.down_proj"] = down.permute(expert_layouts["w_down"]).contiguous()
        if config.neuron_config.fused_qkv:
            sd = _nxdi.convert_state_dict_to_fused_qkv(sd, config)
        return sd

    class NeuronQwen3MoeForCausalLM(_nxdi.NeuronQwen3MoeForCausalLM):
        """The class the contest harness loads: NxDI's causal LM over nkimoe's model."""

        _model_cls = NeuronQwen3MoeModel

        @classmethod
        def get_config_cls(cls) -> type:
            return Qwen3MoeInferenceConfig

        @staticmethod
        def convert_hf_to_neuron_state_dict(state_dict: dict, config: Any) -> dict:
            return convert_qwen3_moe_hf_to_neuron_state_dict(state_dict, config)

else:

    class _Unavailable:
        """Stands in for an NxDI class where NxDI is absent: importable, unusable, says why."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise NeuronUnavailable(_MISSING)

    class Qwen3MoeInferenceConfig(_Unavailable):
        """NxDI's Qwen3-MoE inference config (Neuron path only)."""

        @classmethod
        def get_neuron_config_cls(cls) -> Any:
            raise NeuronUnavailable(_MISSING)

    class NeuronQwen3MoeModel(_Unavailable):
        """nkimoe's NxDI model (Neuron path only)."""

    class NeuronQwen3MoeForCausalLM(_Unavailable):
        """The class the contest harness loads (Neuron path only)."""

        _model_cls = NeuronQwen3MoeModel

        @classmethod
        def get_neuron_config_cls(cls) -> Any:
            raise NeuronUnavailable(_MISSING)

        @classmethod
        def get_config_cls(cls) -> Any:
            raise NeuronUnavailable(_MISSING)

        def compile(self, compiled_model_path: str, debug: bool = False) -> None:
            raise NeuronUnavailable(_MISSING)

        def load(self, compiled_model_path: str) -> None:
            raise NeuronUnavailable(_MISSING)

    def convert_qwen3_moe_hf_to_neuron_state_dict(neuron_state_dict: dict, config: Any) -> dict:
        raise NeuronUnavailable(_MISSING)
