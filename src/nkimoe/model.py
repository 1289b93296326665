"""The portable Qwen3-MoE: a complete torch model whose every op runs through its bound variant.

Loads real HF checkpoint directories (``config.json`` plus ``model.safetensors`` or a sharded
``model.safetensors.index.json``), binds every call site once at load (target detection, the
benchmark cache, ``NKIMOE_POLICY``), then runs prefill and greedy decode with a KV cache. On
``cpu`` the ops are the torch references; with ``NKIMOE_TARGET=trn2`` or ``trn3`` the NKI
variants run in the emulator (or on the device where the Neuron SDK is present). A layer's
attention half and its MoE half each run as one call of the composite ``attention_block`` /
``moe_block`` where a fused variant is bound, and as the chain of their parts otherwise.

KV cache layout (per layer): K transposed ``[Hkv, D, capacity]`` and V ``[Hkv, capacity, D]``,
the layout the ``attention_decode`` contract takes.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from nkimoe.ops import rope_cos_sin
from nkimoe.shapes import ConfigError, ModelShapes, call_sites

log = logging.getLogger("nkimoe")

#: Prefill bucket the model binds for (the contest's global sequence length).
DEFAULT_MAX_PREFILL = 1024
#: Decode cache bucket the model binds for; generation rounds its cache up to 512-position steps.
DEFAULT_MAX_CONTEXT = 4096
CACHE_STEP = 512


class CheckpointError(ValueError):
    """A checkpoint directory that cannot be loaded: names the file, key or field at fault."""


@dataclass(frozen=True)
class ModelConfig:
    """The fields of a Qwen3-MoE ``config.json`` the model uses."""

    shapes: ModelShapes
    rms_norm_eps: float
    rope_theta: float
    norm_topk_prob: bool
    dtype: torch.dtype

    @classmethod
    def from_json(cls, path: Path) -> ModelConfig:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise CheckpointError(f"{path} not found: a checkpoint directory needs config.json") from None
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read {path}: {exc}") from None
        if not isinstance(raw, dict):
            raise CheckpointError(f"{path} holds a JSON {type(raw).__name__}, expected an object (an HF config.json)")
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any], where: str = "config") -> ModelConfig:
        model_type = raw.get("model_type")
        if model_type != "qwen3_moe":
            raise CheckpointError(f"{where}: model_type {model_type!r} is not 'qwen3_moe' (Qwen3MoeForCausalLM)")
        if raw.get("mlp_only_layers") or int(raw.get("decoder_sparse_step", 1)) != 1:
            raise CheckpointError(f"{where}: dense MLP layers (mlp_only_layers / decoder_sparse_step) are not supported")
        if raw.get("tie_word_embeddings"):
            raise CheckpointError(f"{where}: tied word embeddings are not supported (Qwen3-MoE unties lm_head)")
        try:
            shapes = ModelShapes.from_hf_config(raw)
        except ConfigError as exc:
            raise CheckpointError(f"{where}: {str(exc).removeprefix('config: ')}") from None
        rope = raw.get("rope_parameters") or {}
        theta = rope.get("rope_theta", raw.get("rope_theta"))
        if theta is None:
            raise CheckpointError(f"{where}: missing field 'rope_theta'")
        if rope.get("rope_type", "default") != "default" or raw.get("rope_scaling"):
            raise CheckpointError(f"{where}: only default RoPE is supported, got {rope or raw.get('rope_scaling')}")
        dtype_name = str(raw.get("dtype") or raw.get("torch_dtype") or "bfloat16")
        dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{where}: dtype {dtype_name!r} is not bfloat16 or float32")
        return cls(shapes, float(raw.get("rms_norm_eps", 1e-6)), float(theta), bool(raw.get("norm_topk_prob", True)), dtype)


def load_state_dict(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint (single file or sharded with an index)."""
    from safetensors import SafetensorError, safe_open

    index = directory / "model.safetensors.index.json"
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise CheckpointError(f"cannot read the shard index {index}: {exc}") from None
        files = sorted(set(weight_map.values()))
    elif (directory / "model.safetensors").exists():
        files = ["model.safetensors"]
    else:
        raise CheckpointError(f"{directory} holds neither model.safetensors nor model.safetensors.index.json")
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        path = directory / name
        try:
            with safe_open(str(path), "pt") as handle:
                for key in handle.keys():
                    tensors[key] = handle.get_tensor(key)
        except (OSError, SafetensorError, ValueError) as exc:
            raise CheckpointError(f"cannot read checkpoint shard {path}: {exc}") from None
    return tensors


@dataclass
class LayerWeights:
    first_norm: torch.Tensor
    post_norm: torch.Tensor
    qkv: torch.Tensor  #: q, k, v projections concatenated [(Hq + 2 Hkv) D, H]
    o: torch.Tensor
    q_norm: torch.Tensor
    k_norm: torch.Tensor
    router_gate: torch.Tensor
    gate_up: torch.Tensor  #: [E, 2I, H], gate rows then up rows
    down: torch.Tensor  #: [E, H, I]


@dataclass
class Weights:
    embed: torch.Tensor
    layers: list[LayerWeights]
    final_norm: torch.Tensor
    lm_head: torch.Tensor

    @classmethod
    def from_state_dict(cls, sd: Mapping[str, torch.Tensor], config: ModelConfig) -> Weights:
        s = config.shapes

        def take(key: str, shape: Sequence[int]) -> torch.Tensor:
            if key not in sd:
                raise CheckpointError(f"checkpoint is missing tensor {key!r}")
            tensor = sd[key]
            if tuple(tensor.shape) != tuple(shape):
                raise CheckpointError(f"tensor {key!r} has shape {tuple(tensor.shape)}, expected {tuple(shape)}")
            return tensor.to(config.dtype)

        q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
        layers = []
        for i in range(s.layers):
            p = f"model.layers.{i}."
            experts = [
                (take(f"{p}mlp.experts.{e}.gate_proj.weight", (s.moe_intermediate, s.hidden)),
                 take(f"{p}mlp.experts.{e}.up_proj.weight", (s.moe_intermediate, s.hidden)),
                 take(f"{p}mlp.experts.{e}.down_proj.weight", (s.hidden, s.moe_intermediate)))
                for e in range(s.experts)
            ]
            layers.append(LayerWeights(
                first_norm=take(f"{p}input_layernorm.weight", (s.hidden,)),
                post_norm=take(f"{p}post_attention_layernorm.weight", (s.hidden,)),
                qkv=torch.cat([take(f"{p}self_attn.q_proj.weight", (q_out, s.hidden)),
                               take(f"{p}self_attn.k_proj.weight", (kv_out, s.hidden)),
                               take(f"{p}self_attn.v_proj.weight", (kv_out, s.hidden))]),
                o=take(f"{p}self_attn.o_proj.weight", (s.hidden, q_out)),
                q_norm=take(f"{p}self_attn.q_norm.weight", (s.head_dim,)),
                k_norm=take(f"{p}self_attn.k_norm.weight", (s.head_dim,)),
                router_gate=take(f"{p}mlp.gate.weight", (s.experts, s.hidden)),
                gate_up=torch.stack([torch.cat([g, u]) for g, u, _ in experts]),
                down=torch.stack([d for _, _, d in experts]),
            ))
        return cls(
            embed=take("model.embed_tokens.weight", (s.vocab, s.hidden)),
            layers=layers,
            final_norm=take("model.norm.weight", (s.hidden,)),
            lm_head=take("lm_head.weight", (s.vocab, s.hidden)),
        )


@dataclass
class KVCache:
    k_t: list[torch.Tensor]  #: per layer [Hkv, D, capacity]
    v: list[torch.Tensor]  #: per layer [Hkv, capacity, D]
    length: int = 0


@dataclass
class Generation:
    tokens: list[int]  #: the new tokens (greedy)
    prefill_logits: torch.Tensor  #: last prompt position's logits [vocab]
    step_logits: list[torch.Tensor] = field(default_factory=list)


class Qwen3Moe:
    """A Qwen3-MoE whose ops are the variants bound at load time."""

    def __init__(self, config: ModelConfig, weights: Weights, *, max_prefill: int = DEFAULT_MAX_PREFILL,
                 max_context: int = DEFAULT_MAX_CONTEXT, env: Mapping[str, str] | None = None,
                 observer: Callable[[str, tuple[Any, ...], Any], None] | None = None) -> None:
        """``observer(site, args, result)``, when given, sees every op call (for validation and debugging)."""
        from nkimoe.autoselect import bind_model

        self.config, self.weights, self.observer = config, weights, observer
        self.max_prefill, self.max_context = max_prefill, max_context
        dtype = "bfloat16" if config.dtype == torch.bfloat16 else "float32"
        sites = {**call_sites(config.shapes, "prefill", max_prefill, dtype),
                 **call_sites(config.shapes, "decode", max_context, dtype)}
        self.binding, self.detection = bind_model(sites, env=env)
        self.fn: dict[str, Callable[..., Any]] = {site: self._observed(site, bound.fn)
                                                  for site, bound in self.binding.ops.items()}
        self._prepared: dict[tuple[int, int], Any] = {}
        self.site_weights = {phase: self._prepare(phase) for phase in ("prefill", "decode")}
        log.info("nkimoe: target %s (%s); bindings:\n%s", self.detection.target.name, self.detection.source,
                 self.binding_table())

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs: Any) -> Qwen3Moe:
        directory = Path(directory)
        if not directory.is_dir():
            raise CheckpointError(f"checkpoint directory {directory} does not exist")
        config = ModelConfig.from_json(directory / "config.json")
        return cls(config, Weights.from_state_dict(load_state_dict(directory), config), **kwargs)

    def _observed(self, site: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        if self.observer is None:
            return fn
        observer = self.observer

        def call(*args: Any) -> Any:
            result = fn(*args)
            observer(site, args, result)
            return result

        return call

    def binding_table(self) -> str:
        return "\n".join(f"  {site:<22} -> {name:<24} [{how}] {why}" for site, name, how, why in self.binding.summary())

    # --- load-time weight layouts ------------------------------------------------------------------
    def _prepared_weight(self, site: str, arg: str, tensor: torch.Tensor) -> Any:
        variant = self.binding.ops[site].variant
        convert = variant.prepare.get(arg)
        if convert is None:
            return tensor
        key = (id(tensor), id(convert))
        if key not in self._prepared:
            self._prepared[key] = convert(tensor)
        return self._prepared[key]

    def _prepare(self, phase: str) -> list[dict[str, Any]]:
        """Each layer's weights in the layouts of the variants that take them: a composite bound to a
        fused variant takes its weights, otherwise its parts do."""
        attention, moe = f"{phase}.attention_block", f"{phase}.moe_block"
        attention_sites = ((attention, "w_qkv"), (attention, "w_o")) if self.binding.fused(attention) else \
            ((f"{phase}.qkv_proj", "w"), (f"{phase}.o_proj", "w"))
        moe_sites = ((moe, "w_gate"), (moe, "w_gate_up"), (moe, "w_down")) if self.binding.fused(moe) else \
            ((f"{phase}.router_gate", "w"), (f"{phase}.experts", "w_gate_up"), (f"{phase}.experts", "w_down"))
        out = []
        for lw in self.weights.layers:
            tensors = {"qkv": lw.qkv, "o": lw.o, "router_gate": lw.router_gate, "gate_up": lw.gate_up, "down": lw.down}
            out.append({key: self._prepared_weight(site, arg, tensors[key])
                        for key, (site, arg) in zip(tensors, (*attention_sites, *moe_sites))})
        out.append({"lm_head": self._prepared_weight(f"{phase}.lm_head", "w", self.weights.lm_head)})
        return out

    # --- forward -----------------------------------------------------------------------------------
    def _layers(self, phase: str, h: torch.Tensor, cache: KVCache, positions: torch.Tensor) -> torch.Tensor:
        s, c, fn = self.config.shapes, self.config, self.fn
        eps = c.rms_norm_eps
        t = h.shape[0]
        cos, sin = rope_cos_sin(positions, s.head_dim, c.rope_theta, c.dtype)
        q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
        prepared = self.site_weights[phase]
        attention_fused = self.binding.fused(f"{phase}.attention_block")
        moe_fused = self.binding.fused(f"{phase}.moe_block")
        residual, mlp_out = h, None
        start, scale = cache.length, s.head_dim ** -0.5
        for i, lw in enumerate(self.weights.layers):
            pw = prepared[i]
            if attention_fused:  # layer 0 adds a zero residual: h + 0 == h, so its norm is rmsnorm(h)
                x, res = (h, torch.zeros_like(h)) if mlp_out is None else (mlp_out, residual)
                residual, attn_out, k, v = fn[f"{phase}.attention_block"](
                    x, res, lw.first_norm, pw["qkv"], lw.q_norm, lw.k_norm, cos, sin, cache.k_t[i], cache.v[i],
                    start, pw["o"], scale, eps)
                cache.k_t[i][:, :, start:start + t] = k.permute(1, 2, 0)
                cache.v[i][:, start:start + t] = v.transpose(0, 1)
            else:
                if mlp_out is None:
                    normed = fn[f"{phase}.first_norm"](h, lw.first_norm, eps)
                else:
                    residual, normed = fn[f"{phase}.add_norm"](mlp_out, residual, lw.first_norm, eps)
                qkv = fn[f"{phase}.qkv_proj"](normed, pw["qkv"])
                q = qkv[:, :q_out].reshape(t, s.heads, s.head_dim)
                k = qkv[:, q_out:q_out + kv_out].reshape(t, s.kv_heads, s.head_dim)
                v = qkv[:, q_out + kv_out:].reshape(t, s.kv_heads, s.head_dim)
                q, k = fn[f"{phase}.qk_norm"](q, k, lw.q_norm, lw.k_norm, eps)
                q, k = fn[f"{phase}.rope"](q, k, cos, sin)
                cache.k_t[i][:, :, start:start + t] = k.permute(1, 2, 0)
                cache.v[i][:, start:start + t] = v.transpose(0, 1)
                if phase == "prefill":
                    attn = fn["prefill.attention"](q, k, v, scale)
                else:
                    attn = fn["decode.attention"](q, cache.k_t[i], cache.v[i], start + t, scale)
                attn_out = fn[f"{phase}.o_proj"](attn.reshape(t, q_out), pw["o"])
            if moe_fused:
                residual, mlp_out = fn[f"{phase}.moe_block"](attn_out, residual, lw.post_norm, pw["router_gate"],
                                                             pw["gate_up"], pw["down"], s.top_k, c.norm_topk_prob, eps)
            else:
                residual, normed = fn[f"{phase}.add_norm"](attn_out, residual, lw.post_norm, eps)
                logits = fn[f"{phase}.router_gate"](normed, pw["router_gate"])
                weights, ids = fn[f"{phase}.router"](logits, s.top_k, c.norm_topk_prob)
                mlp_out = fn[f"{phase}.experts"](normed, weights, ids, pw["gate_up"], pw["down"])
        cache.length += t
        _, final = fn[f"{phase}.final_norm"](mlp_out[-1:], residual[-1:], self.weights.final_norm, eps)
        return fn[f"{phase}.lm_head"](final, prepared[-1]["lm_head"])[0]

    def new_cache(self, capacity: int) -> KVCache:
        s = self.config.shapes
        shape_k, shape_v = (s.kv_heads, s.head_dim, capacity), (s.kv_heads, capacity, s.head_dim)
        return KVCache([torch.zeros(shape_k, dtype=self.config.dtype) for _ in range(s.layers)],
                       [torch.zeros(shape_v, dtype=self.config.dtype) for _ in range(s.layers)])

    @torch.no_grad()
    def generate(self, input_ids: Sequence[int], max_new_tokens: int, *,
                 on_token: Callable[[int], None] | None = None, forced: Sequence[int] | None = None) -> Generation:
        """Prefill ``input_ids`` then decode ``max_new_tokens`` tokens greedily.

        With ``forced`` (teacher forcing, as logit validation does), step i feeds ``forced[i]``
        instead of the model's own choice; ``tokens`` still records the model's argmax per step.
        """
        if forced is not None and len(forced) < max_new_tokens:
            raise ValueError(f"forced has {len(forced)} tokens, fewer than max_new_tokens={max_new_tokens}")
        ids = [int(i) for i in input_ids]
        vocab = self.config.shapes.vocab
        if not ids:
            raise ValueError("input_ids is empty")
        bad = [i for i in ids if not 0 <= i < vocab]
        if bad:
            raise ValueError(f"token ids {bad[:5]} are outside the vocabulary [0, {vocab})")
        if len(ids) > self.max_prefill:
            raise ValueError(f"prompt of {len(ids)} tokens exceeds the bound prefill bucket of {self.max_prefill}")
        total = len(ids) + max_new_tokens
        if total > self.max_context:
            raise ValueError(f"{total} positions exceed the bound decode bucket of {self.max_context}")
        cache = self.new_cache(min(self.max_context, math.ceil(total / CACHE_STEP) * CACHE_STEP))
        h = self.weights.embed[torch.tensor(ids)]
        logits = self._layers("prefill", h, cache, torch.arange(len(ids)))
        result = Generation([], logits.clone())
        for _ in range(max_new_tokens):
            token = int(torch.argmax(logits))
            result.tokens.append(token)
            if on_token is not None:
                on_token(token)
            if len(result.tokens) == max_new_tokens:
                break
            position = cache.length
            fed = token if forced is None else int(forced[len(result.tokens) - 1])
            logits = self._layers("decode", self.weights.embed[torch.tensor([fed])], cache, torch.tensor([position]))
            result.step_logits.append(logits.clone())
        return result
