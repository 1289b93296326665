"""A small random full-width Qwen3-MoE checkpoint, written with safetensors like an HF checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from safetensors.torch import save_file


def write_random_checkpoint(directory: Path, *, layers: int = 2, vocab: int = 1024, moe_intermediate: int = 128,
                            seed: int = 0) -> Path:
    """Qwen3-30B-A3B's width (hidden 2048, 32/4 heads of 128, 128 experts, top-8) with ``layers``
    layers, a ``vocab``-token vocabulary and ``moe_intermediate`` (small, so that 128 experts stay
    light); bf16 weights with std 1/sqrt(fan-in), norms near 1."""
    g = torch.Generator().manual_seed(seed)
    hidden, heads, kv_heads, head_dim, experts = 2048, 32, 4, 128, 128

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) / math.sqrt(shape[-1])).to(torch.bfloat16)

    def norm(size: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(size, generator=g)).to(torch.bfloat16)

    sd = {"model.embed_tokens.weight": rand(vocab, hidden) * 32, "model.norm.weight": norm(hidden),
          "lm_head.weight": rand(vocab, hidden)}
    for i in range(layers):
        p = f"model.layers.{i}."
        sd.update({
            f"{p}input_layernorm.weight": norm(hidden), f"{p}post_attention_layernorm.weight": norm(hidden),
            f"{p}self_attn.q_proj.weight": rand(heads * head_dim, hidden),
            f"{p}self_attn.k_proj.weight": rand(kv_heads * head_dim, hidden),
            f"{p}self_attn.v_proj.weight": rand(kv_heads * head_dim, hidden),
            f"{p}self_attn.o_proj.weight": rand(hidden, heads * head_dim),
            f"{p}self_attn.q_norm.weight": norm(head_dim), f"{p}self_attn.k_norm.weight": norm(head_dim),
            f"{p}mlp.gate.weight": rand(experts, hidden),
        })
        for e in range(experts):
            sd[f"{p}mlp.experts.{e}.gate_proj.weight"] = rand(moe_intermediate, hidden)
            sd[f"{p}mlp.experts.{e}.up_proj.weight"] = rand(moe_intermediate, hidden)
            sd[f"{p}mlp.experts.{e}.down_proj.weight"] = rand(hidden, moe_intermediate)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(directory / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "hidden_size": hidden,
        "num_attention_heads": heads, "num_key_value_heads": kv_heads, "head_dim": head_dim,
        "num_experts": experts, "num_experts_per_tok": 8, "moe_intermediate_size": moe_intermediate,
        "intermediate_size": moe_intermediate, "num_hidden_layers": layers, "vocab_size": vocab,
        "norm_topk_prob": True, "rms_norm_eps": 1e-6, "rope_theta": 1_000_000.0, "max_position_embeddings": 4096,
        "tie_word_embeddings": False, "hidden_act": "silu", "decoder_sparse_step": 1, "mlp_only_layers": [],
        "torch_dtype": "bfloat16",
    }
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory
