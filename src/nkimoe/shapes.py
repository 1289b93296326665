"""The model's dimensions and the op problems (call sites) that one forward pass issues."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from nkimoe.ops import Problem
from nkimoe.userfiles import read_text

#: The fields of an HF Qwen3-MoE config.json that decide op shapes.
REQUIRED_FIELDS: tuple[str, ...] = ("hidden_size", "num_attention_heads", "num_key_value_heads", "num_experts",
                                    "num_experts_per_tok", "moe_intermediate_size", "vocab_size", "num_hidden_layers")


class ConfigError(ValueError):
    """A model config that cannot be read as a Qwen3-MoE config.json: one line naming the file."""


@dataclass(frozen=True)
class ModelShapes:
    """The dimensions of a Qwen3-MoE model that decide op shapes (defaults: Qwen3-30B-A3B)."""

    hidden: int = 2048
    heads: int = 32
    kv_heads: int = 4
    head_dim: int = 128
    experts: int = 128
    top_k: int = 8
    moe_intermediate: int = 768
    vocab: int = 151_936
    layers: int = 48
    max_positions: int = 40_960  #: max_position_embeddings: the longest context the model takes

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any] | str | Path) -> ModelShapes:
        """Read the dims from an HF ``config.json`` (path or parsed dict) of a Qwen3-MoE model;
        :class:`ConfigError` names the file and what is wrong with it."""
        where = "config" if isinstance(config, Mapping) else f"config {config}"
        if not isinstance(config, Mapping):
            config = _read_json(Path(config))
        if not isinstance(config, Mapping):
            raise ConfigError(f"{where} holds a JSON {type(config).__name__}, expected an object "
                              f"(an HF config.json with {', '.join(REQUIRED_FIELDS)})")
        if "num_experts" not in config and "num_local_experts" in config:
            config = {**config, "num_experts": config["num_local_experts"]}
        missing = [f for f in REQUIRED_FIELDS if f not in config]
        if missing:
            raise ConfigError(f"{where}: missing field {missing[0]!r} (a Qwen3-MoE config.json has "
                              f"{', '.join(REQUIRED_FIELDS)})")
        optional = {f: config[f] for f in ("head_dim", "max_position_embeddings") if config.get(f) is not None}
        dims = {**{f: config[f] for f in REQUIRED_FIELDS}, **optional}
        bad = [f for f, v in dims.items() if isinstance(v, bool) or not isinstance(v, int) or v < 1]
        if bad:
            raise ConfigError(f"{where}: {bad[0]} is {dims[bad[0]]!r}, expected a positive integer")
        return cls(
            hidden=dims["hidden_size"],
            heads=dims["num_attention_heads"],
            kv_heads=dims["num_key_value_heads"],
            head_dim=dims.get("head_dim", dims["hidden_size"] // dims["num_attention_heads"]),
            experts=dims["num_experts"],
            top_k=dims["num_experts_per_tok"],
            moe_intermediate=dims["moe_intermediate_size"],
            vocab=dims["vocab_size"],
            layers=dims["num_hidden_layers"],
            max_positions=dims.get("max_position_embeddings", cls.max_positions),
        )

    def check_positions(self, positions: int, flag: str) -> None:
        """Raise :class:`ConfigError` unless ``positions`` (given by ``flag``) is 1..max_positions."""
        if not 1 <= positions <= self.max_positions:
            raise ConfigError(f"{flag} {positions}: the model takes 1 to {self.max_positions} positions "
                              f"(max_position_embeddings)")


def _read_json(path: Path) -> Any:
    text = read_text(path, "config", "give the path of an HF config.json", ConfigError)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"config {path} is not JSON (line {exc.lineno}: {exc.msg})") from None


#: The contest's global sequence length (aws-neuron/nki-moe README: ``--seq-len 1024``) and a
#: short prompt: the default prefill shapes that ``bench select`` measures.
DEFAULT_PREFILL_TOKENS: tuple[int, ...] = (1024, 128)


def call_sites(shapes: ModelShapes, phase: str, tokens: int, dtype: str = "bfloat16") -> dict[str, Problem]:
    """Every distinct op problem of one decoder pass of ``phase`` ("prefill" of ``tokens`` prompt
    tokens, or "decode" with a KV cache of ``tokens`` positions), keyed ``phase.site``.

    The sites are the model's (``nkimoe.model``): the first layer's input norm is a plain RMSNorm,
    every later norm fuses the residual add; q, k and v are one fused projection; in prefill only
    the last position reaches the final norm and lm_head. The composite sites ``moe_block`` (both
    phases) and ``attention_block`` (decode) bind a fused variant or the chain of the part sites
    named in their contracts.
    """
    if phase not in ("prefill", "decode"):
        raise ValueError(f"unknown phase {phase!r}; valid: prefill, decode")
    s = shapes
    t = tokens if phase == "prefill" else 1
    heads = {"Hq": s.heads, "Hkv": s.kv_heads, "D": s.head_dim}
    sites = {
        "first_norm": Problem.of("rmsnorm", dtype, T=t, H=s.hidden),
        "add_norm": Problem.of("add_rmsnorm", dtype, T=t, H=s.hidden),
        "final_norm": Problem.of("add_rmsnorm", dtype, T=1, H=s.hidden),
        "qkv_proj": Problem.of("linear", dtype, T=t, K=s.hidden, N=(s.heads + 2 * s.kv_heads) * s.head_dim),
        "o_proj": Problem.of("linear", dtype, T=t, K=s.heads * s.head_dim, N=s.hidden),
        "qk_norm": Problem.of("qk_norm", dtype, T=t, **heads),
        "rope": Problem.of("rope", dtype, T=t, **heads),
        "router_gate": Problem.of("linear", dtype, T=t, K=s.hidden, N=s.experts),
        "router": Problem.of("router", dtype, T=t, E=s.experts, K=s.top_k),
        "experts": Problem.of("expert_mlp", dtype, T=t, H=s.hidden, I=s.moe_intermediate, E=s.experts, K=s.top_k),
        "lm_head": Problem.of("linear", dtype, T=1, K=s.hidden, N=s.vocab),
    }
    sites["moe_block"] = Problem.of("moe_block", dtype, T=t, H=s.hidden, E=s.experts, K=s.top_k,
                                    I=s.moe_intermediate)
    if phase == "prefill":
        sites["attention"] = Problem.of("attention_prefill", dtype, S=t, **heads)
    else:
        sites["attention"] = Problem.of("attention_decode", dtype, L=tokens, **heads)
        sites["attention_block"] = Problem.of("attention_block", dtype, H=s.hidden, L=tokens, **heads)
    return {f"{phase}.{name}": problem for name, problem in sites.items()}


def intermediate_per_rank(inter: int, tp: int) -> int:
    """Each rank's slice of the expert intermediate axis under tensor parallelism ``tp``:
    Qwen3-30B-A3B's 768 over TP 4 gives 192 (the expert variants run a ragged last partition tile,
    so the slice is not padded and no rank reads bytes it does not use)."""
    if tp < 1 or inter % tp:
        raise ValueError(f"moe_intermediate_size={inter} does not split over tp_degree={tp}")
    return inter // tp


def neuron_call_sites(shapes: ModelShapes, tp: int, phase: str, tokens: int, dtype: str = "bfloat16",
                      fused_qkv: bool = False) -> dict[str, Problem]:
    """The op problems one rank binds on the Neuron path (``nkimoe.neuron``) at tensor parallelism
    ``tp``, batch 1, keyed ``phase.site``: query heads, the projections' output (or contraction)
    features, the vocabulary and the expert intermediate axis split over the ranks; KV
    heads split, or replicated to one per rank when there are fewer than ``tp`` (NxDI's
    ``GQA.REPLICATE_TO_TP_DEGREE``). q/k norms run per head row; every position reaches the final
    norm and only the last one lm_head. The composite ``moe_block`` covers add_norm, router_gate,
    router and experts (a fused variant, or their chain); in decode, where KV heads split over the
    ranks, ``attention_block`` covers the input norm and the attention sites (``NEURON_REPLACED``).
    """
    if phase not in ("prefill", "decode"):
        raise ValueError(f"unknown phase {phase!r}; valid: prefill, decode")
    s = shapes
    bad = [f"{name}={value}" for name, value in (("heads", s.heads), ("vocab", s.vocab)) if value % tp]
    if s.kv_heads % tp and tp % s.kv_heads:
        bad.append(f"kv_heads={s.kv_heads}")
    if bad:
        raise ValueError(f"{', '.join(bad)} do not split over tp_degree={tp}")
    t = tokens if phase == "prefill" else 1
    hq, hkv = s.heads // tp, max(1, s.kv_heads // tp)
    heads = {"Hq": hq, "Hkv": hkv, "D": s.head_dim}
    sites = {
        "input_norm": Problem.of("rmsnorm", dtype, T=t, H=s.hidden),
        "q_norm": Problem.of("rmsnorm", dtype, T=t * hq, H=s.head_dim),
        "k_norm": Problem.of("rmsnorm", dtype, T=t * hkv, H=s.head_dim),
        "rope": Problem.of("rope", dtype, T=t, **heads),
        "o_proj": Problem.of("linear", dtype, T=t, K=hq * s.head_dim, N=s.hidden),
        "add_norm": Problem.of("add_rmsnorm", dtype, T=t, H=s.hidden),
        "router_gate": Problem.of("linear", dtype, T=t, K=s.hidden, N=s.experts),
        "router": Problem.of("router", dtype, T=t, E=s.experts, K=s.top_k),
        "experts": Problem.of("expert_mlp", dtype, T=t, H=s.hidden, I=intermediate_per_rank(s.moe_intermediate, tp),
                              E=s.experts, K=s.top_k),
        "moe_block": Problem.of("moe_block", dtype, T=t, H=s.hidden, E=s.experts, K=s.top_k,
                                I=intermediate_per_rank(s.moe_intermediate, tp)),
        "final_norm": Problem.of("rmsnorm", dtype, T=t, H=s.hidden),
        "lm_head": Problem.of("linear", dtype, T=1, K=s.hidden, N=s.vocab // tp),
    }
    if fused_qkv:
        sites["qkv_proj"] = Problem.of("linear", dtype, T=t, K=s.hidden, N=(hq + 2 * hkv) * s.head_dim)
    else:
        sites["q_proj"] = Problem.of("linear", dtype, T=t, K=s.hidden, N=hq * s.head_dim)
        sites["kv_proj"] = Problem.of("linear", dtype, T=t, K=s.hidden, N=hkv * s.head_dim)
    if phase == "prefill":
        sites["attention"] = Problem.of("attention_prefill", dtype, S=t, **heads)
    else:
        sites["attention"] = Problem.of("attention_decode", dtype, L=tokens, **heads)
        if s.kv_heads % tp == 0:  # KV heads split, not replicated: the fused block's weights shard per rank
            sites["attention_block"] = Problem.of("attention_block", dtype, H=s.hidden, L=tokens, **heads)
    return {f"{phase}.{name}": problem for name, problem in sites.items()}


#: Neuron-path sites issued more than once per layer: ``kv_proj`` is the problem of NxDI's k_proj
#: and of its v_proj (two projections of the same shape, unless q|k|v are fused).
NEURON_CALLS_PER_LAYER: dict[str, int] = {"kv_proj": 2}

#: Neuron-path sites that a fused composite replaces besides those named like its parts: the fused
#: attention block runs the input norm and NxDI's attention (q and k|v as two projections, q and k
#: norms as plain RMSNorms over head rows) in one kernel.
NEURON_REPLACED: dict[str, tuple[str, ...]] = {
    "attention_block": ("input_norm", "q_proj", "kv_proj", "qkv_proj", "q_norm", "k_norm"),
}
