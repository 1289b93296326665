"""The NxDI subclasses of the Neuron path (where neuronx-distributed-inference imports) and their
adaptations across SDK releases (each found by feature, not by version); elsewhere importable
stand-ins that raise ``NeuronUnavailable`` when used."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from nkimoe.neuron.seams import (
    KERNELS,
    BoundRMSNorm,
    Layout,
    LocalMatmul,
    attention_block_binding,
    attention_block_step,
    attention_block_weights,
    check_neuron_config,
    decode_attention,
    decode_layouts,
    moe_layer_partial,
    moe_partial,
    permuted_shape,
    prefill_attention,
    rotary,
    stack_experts,
    variant_layout,
)
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

class NeuronUnavailable(ImportError):
    """The Neuron path was used where neuronx-distributed-inference cannot be imported."""



_MISSING = ("the Neuron path of qwen.py needs neuronx-distributed-inference and the Neuron SDK (a Trainium "
            "host's Neuron venv, e.g. /opt/aws_neuronx_venv_pytorch_2_9_nxd_inference); off Trainium use the "
            "portable model: nkimoe.model.Qwen3Moe")


def router_dtype(neuron_config: Any) -> torch.dtype:
    """The dtype NxDI's own Qwen3-MoE router gate computes in: ``router_config.dtype`` (fp32, set by
    ``Qwen3MoeInferenceConfig``) under ``cast_type="as-declared"``; under ``"config"`` (the default,
    and the contest harness's) NxDI casts every floating parameter to ``torch_dtype``
    (models/model_wrapper.py ``load_module``, models/application_base.py ``_cast_helper``; ``to_cpu()``
    casts the whole model to bf16 under either)."""
    declared = getattr(getattr(neuron_config, "router_config", None), "dtype", None)
    if declared is None or getattr(neuron_config, "cast_type", "config") == "config":
        return neuron_config.torch_dtype
    return declared


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
        nc = config.neuron_config
        return decode_layouts(KERNELS, nc.torch_dtype, _decode_tokens(config), config.hidden_size,
                              intermediate_per_rank(inter, tp), experts, config.num_experts_per_tok,
                              gate_dtype=router_dtype(nc))

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

    def _head_dim(config: Any) -> int:
        return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    def attention_block_variant(config: Any) -> BoundOp | None:
        """The fused ``attention_block`` variant whose weights every layer stores (bound for a decode
        step over NxDI's whole KV cache, ``seq_len`` positions), or None where decode runs NxDI's
        attention through the part seams."""
        nc = config.neuron_config
        dtype = getattr(nc, "attention_dtype", None) or nc.torch_dtype  # the attention module's (attention_base.py)
        return attention_block_binding(KERNELS, dtype, config.hidden_size, config.num_attention_heads,
                                       config.num_key_value_heads, _head_dim(config), nc.seq_len, nc.tp_degree)

    class AttentionBlockWeights(BaseParallelLinear):
        """This rank's q|k|v and o_proj weights for the fused attention block, in its variant's layout
        (``attention_block_weights`` stacks the ranks' on axis 0; NxD hands each rank its own)."""

        def __init__(self, config: Any, bound: BoundOp) -> None:
            super().__init__()
            tp, d, h = config.neuron_config.tp_degree, _head_dim(config), config.hidden_size
            hq, hkv = config.num_attention_heads // tp, config.num_key_value_heads // tp
            for name, arg, shape in (("qkv", "w_qkv", ((hq + 2 * hkv) * d, h)), ("o", "w_o", (h, hq * d))):
                local = tuple(bound.variant.prepare_arg(arg, torch.empty(shape, device="meta")).shape)
                setattr(self, name, nn.Parameter(torch.empty(local, dtype=getattr(torch, bound.problem.dtype)),
                                                 requires_grad=False))
                set_tensor_model_parallel_attributes(getattr(self, name), is_parallel=True, dim=0, stride=1,
                                                     num_partitions=tp)

    class NeuronQwen3MoEAttention(_nxdi.NeuronQwen3MoEAttention):
        """NxDI's attention with nkimoe's q/k norms, projections, RoPE, prefill and decode; a decode
        step runs the fused attention block where one is bound (:meth:`decode_block`)."""

        def __init__(self, config: Any) -> None:
            super().__init__(config)
            self.kernels = KERNELS
            self.q_layernorm = BoundRMSNorm(self.head_dim, self.rms_norm_eps, KERNELS)
            self.k_layernorm = BoundRMSNorm(self.head_dim, self.rms_norm_eps, KERNELS)
            for proj in (self.qkv_proj, self.o_proj):
                for module in proj.modules():
                    if isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
                        _wire_linear(module, config)
            self.block_variant = attention_block_variant(config)
            if self.block_variant is not None:
                self.block = AttentionBlockWeights(config, self.block_variant)

        def decode_block(self, hidden_states: torch.Tensor, norm: BoundRMSNorm, position_ids: torch.Tensor,
                         past_key_value: Any, cos_cache: torch.Tensor | None = None,
                         sin_cache: torch.Tensor | None = None, rotary_position_ids: torch.Tensor | None = None,
                         get_kv_per_layer: bool = False, update_kv_per_layer: bool = False,
                         **_: Any) -> tuple | None:
            """One decode step of ``norm`` and this attention through the fused block: ``(attention
            output (all-reduced), (k, v) of the new token for the KV-cache manager, cos, sin)``; None
            where NxDI's attention runs instead (context encoding, several new tokens per step, per-layer
            KV-cache access, no block weights, or a block bound at this cache length to its chain or to
            a variant wanting other weight layouts)."""
            if (self.block_variant is None or past_key_value is None or get_kv_per_layer or update_kv_per_layer
                    or hidden_states.shape[1] != 1 or not self.k_cache_transposed):
                return None
            k_prior, v_prior = past_key_value[0], past_key_value[1]
            bound = self.kernels.bound("attention_block", self.torch_dtype, H=hidden_states.shape[-1],
                                       Hq=self.num_heads, Hkv=self.num_key_value_heads, D=self.head_dim,
                                       L=v_prior.shape[2])
            if bound.is_chain or bound.variant.prepare != self.block_variant.variant.prepare:
                return None
            x = hidden_states.to(self.torch_dtype)
            if cos_cache is None or sin_cache is None:
                cos_cache, sin_cache = self.rotary_emb(x, position_ids if rotary_position_ids is None
                                                       else rotary_position_ids)
            out, k, v = attention_block_step(self.kernels, bound, x, norm.weight, norm.variance_epsilon,
                                             self.block.qkv, self.q_layernorm.weight, self.k_layernorm.weight,
                                             cos_cache, sin_cache, k_prior, v_prior, position_ids, self.block.o,
                                             _score_scale(self))
            out = reduce_from_tensor_model_parallel_region(out).to(hidden_states.dtype)
            return out, (k.permute(0, 1, 3, 2), v), cos_cache, sin_cache

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
            self.gate = RouterGate(config.num_experts, config.hidden_size, self.gate_layout,
                                   router_dtype(config.neuron_config))
            self.experts = ExpertWeights(config, self.expert_layouts)
            self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob

        def forward(self, hidden_states: torch.Tensor, *_: Any, **__: Any) -> tuple[torch.Tensor]:
            partial = moe_partial(KERNELS, hidden_states, self.gate.weight, self.gate_layout, self.experts.gate_up_proj,
                                  self.experts.down_proj, self.expert_layouts, self.top_k, self.norm_topk_prob)
            return (reduce_from_tensor_model_parallel_region(partial),)

        def with_norm(self, attn: torch.Tensor, residual: torch.Tensor,
                      norm: BoundRMSNorm) -> tuple[torch.Tensor, torch.Tensor]:
            """``(attn + residual, the block's output on norm(attn + residual))`` through the bound
            ``moe_block`` composite (one fused kernel or its chain)."""
            summed, partial = moe_layer_partial(
                KERNELS, attn, residual, norm.weight, norm.variance_epsilon, self.gate.weight, self.gate_layout,
                self.experts.gate_up_proj, self.experts.down_proj, self.expert_layouts, self.top_k, self.norm_topk_prob)
            return summed, reduce_from_tensor_model_parallel_region(partial)

    class NeuronQwen3MoeDecoderLayer(nn.Module):
        """Norm, attention, residual add fused with the post-attention norm, MoE, residual add; in a
        decode step the norm and the attention run as one fused block where one is bound."""

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
            step = self.self_attn.decode_block(residual, self.input_layernorm, position_ids, past_key_value, **kwargs)
            if step is None:
                step = self.self_attn(hidden_states=self.input_layernorm(residual), attention_mask=attention_mask,
                                      position_ids=position_ids, past_key_value=past_key_value, **kwargs)
            attn, present_key_value, cos_cache, sin_cache = step
            residual, moe_out = self.mlp.with_norm(attn, residual, self.post_attention_layernorm)
            hidden_states = ModuleMarkerEndWrapper()(residual + moe_out)
            return hidden_states, present_key_value, cos_cache, sin_cache, None

    class NeuronQwen3MoeModel(_nxdi.NeuronQwen3MoeModel):
        """NxDI's traced Qwen3-MoE model over nkimoe's layers, final norm and lm_head."""

        def init_model(self, config: Any) -> None:
            KERNELS.lnc = int(getattr(config.neuron_config, "logical_nc_config", 1))  # each kernel's launch grid
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
        block = attention_block_variant(config)
        experts = config.num_experts
        for layer in range(config.num_hidden_layers):
            p = f"layers.{layer}."
            if block is not None:
                weights = attention_block_weights(block, *(sd[f"{p}self_attn.{n}_proj.weight"] for n in "qkvo"), tp)
                sd[f"{p}self_attn.block.qkv"], sd[f"{p}self_attn.block.o"] = weights["w_qkv"], weights["w_o"]
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
