"""Each op reference against an independent implementation: HF transformers' Qwen3-MoE modules,
at full width (hidden 2048, 32/4 heads of 128, 128 experts, top-8, intermediate 768)."""

from __future__ import annotations

import types

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from nkimoe import ops
from nkimoe.ops import OpError, Problem

H, HQ, HKV, D, E, K, I = 2048, 32, 4, 128, 128, 8, 768


@pytest.fixture(scope="module")
def config() -> Qwen3MoeConfig:
    return Qwen3MoeConfig(
        hidden_size=H, num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, num_experts=E,
        num_experts_per_tok=K, moe_intermediate_size=I, norm_topk_prob=True, rms_norm_eps=1e-6,
        num_hidden_layers=1, vocab_size=1024, rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0},
    )


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rmsnorm_and_qk_norm_match_hf(dtype: torch.dtype) -> None:
    g = _gen()
    norm = hf.Qwen3MoeRMSNorm(H, eps=1e-6).to(dtype)
    head_norm = hf.Qwen3MoeRMSNorm(D, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(H, generator=g) * 0.1 + 1)
        head_norm.weight.copy_(torch.randn(D, generator=g) * 0.1 + 1)
    x = torch.randn(37, H, generator=g).to(dtype)
    residual = torch.randn(37, H, generator=g).to(dtype)
    q = torch.randn(37, HQ, D, generator=g).to(dtype)
    k = torch.randn(37, HKV, D, generator=g).to(dtype)
    with torch.no_grad():
        # Same operations in the same order: bit-exact is the expectation.
        assert torch.equal(ops.rmsnorm(x, norm.weight), norm(x))
        summed, normed = ops.add_rmsnorm(x, residual, norm.weight)
        assert torch.equal(summed, x + residual) and torch.equal(normed, norm(x + residual))
        qn, kn = ops.qk_norm(q, k, head_norm.weight, head_norm.weight)
        assert torch.equal(qn, head_norm(q)) and torch.equal(kn, head_norm(k))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_matches_hf(config: Qwen3MoeConfig, dtype: torch.dtype) -> None:
    g = _gen(1)
    positions = torch.arange(500, 600)
    rotary = hf.Qwen3MoeRotaryEmbedding(config)
    q = torch.randn(100, HQ, D, generator=g).to(dtype)
    k = torch.randn(100, HKV, D, generator=g).to(dtype)
    hf_cos, hf_sin = rotary(q, positions[None])
    cos, sin = ops.rope_cos_sin(positions, D, 1_000_000.0, dtype)
    assert torch.equal(cos, hf_cos[0]) and torch.equal(sin, hf_sin[0])
    hq, hk = hf.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], hf_cos, hf_sin)
    rq, rk = ops.rope(q, k, cos, sin)
    assert torch.equal(rq, hq[0].transpose(0, 1)) and torch.equal(rk, hk[0].transpose(0, 1))


def test_router_matches_hf(config: Qwen3MoeConfig) -> None:
    g = _gen(2)
    gate = hf.Qwen3MoeTopKRouter(config).to(torch.bfloat16)
    with torch.no_grad():
        gate.weight.copy_(torch.randn(E, H, generator=g) * 0.02)
        x = torch.randn(64, H, generator=g).to(torch.bfloat16)
        logits, hf_weights, hf_ids = gate(x)
        weights, ids = ops.router(logits, K, True)
    assert torch.equal(ids, hf_ids)
    assert weights.dtype == hf_weights.dtype == torch.bfloat16
    assert torch.equal(weights, hf_weights)


def _hf_grouped_experts(config: Qwen3MoeConfig, g: torch.Generator) -> hf.Qwen3MoeExperts:
    """HF's experts module with the implementation ``from_pretrained`` selects (``grouped_mm``)."""
    grouped = Qwen3MoeConfig(**{**config.to_dict(), "experts_implementation": "grouped_mm"})
    experts = hf.Qwen3MoeExperts(grouped)
    with torch.no_grad():
        experts.gate_up_proj.copy_(torch.randn(E, 2 * I, H, generator=g) / H**0.5)
        experts.down_proj.copy_(torch.randn(E, H, I, generator=g) / I**0.5)
    return experts.to(torch.bfloat16)


@pytest.mark.parametrize("tokens", [1, 17])
def test_expert_mlp_matches_hf_experts(config: Qwen3MoeConfig, tokens: int) -> None:
    g = _gen(3)
    experts = _hf_grouped_experts(config, g)
    x = torch.randn(tokens, H, generator=g).to(torch.bfloat16)
    weights, ids = ops.router(ops.untied_logits(tokens, E, torch.float32, g), K)
    weights = weights.to(torch.bfloat16)
    with torch.no_grad():
        expected = experts(x, ids, weights)
        actual = ops.expert_mlp(x, weights, ids, experts.gate_up_proj, experts.down_proj)
    # The same grouped matmuls, the same bf16 roundings, the same fp32 sum over the top-k.
    assert torch.equal(actual, expected)


def test_expert_mlp_without_grouped_mm_computes_the_same(config: Qwen3MoeConfig,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    g = _gen(4)
    experts = _hf_grouped_experts(config, g)
    x = torch.randn(9, H, generator=g).to(torch.bfloat16)
    weights, ids = ops.router(ops.untied_logits(9, E, torch.float32, g), K)
    weights = weights.to(torch.bfloat16)
    args = (x, weights, ids, experts.gate_up_proj.detach(), experts.down_proj.detach())
    grouped = ops.expert_mlp(*args)
    monkeypatch.delattr(torch.nn.functional, "grouped_mm")  # torch releases before grouped_mm
    # A matmul per expert computes each row as the grouped matmul does: bit-exact.
    assert torch.equal(ops.expert_mlp(*args), grouped)


def _hf_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    module = types.SimpleNamespace(num_key_value_groups=HQ // HKV, training=False)
    out, _ = hf.eager_attention_forward(
        module, q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None], mask, scaling=D**-0.5
    )
    return out[0]


@pytest.mark.parametrize("seq", [1, 100, 300])
def test_attention_prefill_matches_hf_eager(seq: int) -> None:
    g = _gen(4)
    q, k, v = (torch.randn(seq, h, D, generator=g).to(torch.bfloat16) for h in (HQ, HKV, HKV))
    mask = torch.full((seq, seq), torch.finfo(torch.bfloat16).min).triu(1).to(torch.bfloat16)[None, None]
    expected = _hf_attention(q, k, v, mask)
    actual = ops.attention_prefill(q, k, v, D**-0.5)
    # HF adds a bf16 -inf-like mask, the reference fills it: identical probabilities, so identical output.
    assert torch.equal(actual, expected)


def test_attention_decode_matches_hf_eager() -> None:
    g = _gen(5)
    length, cap = 333, 512
    q = torch.randn(1, HQ, D, generator=g).to(torch.bfloat16)
    k_cache, v_cache = (torch.randn(HKV, cap, D, generator=g).to(torch.bfloat16) for _ in range(2))
    expected = _hf_attention(q, k_cache[:, :length].transpose(0, 1), v_cache[:, :length].transpose(0, 1), None)
    k_t_cache = k_cache.transpose(1, 2).contiguous()  # the decode contract keeps K transposed
    assert torch.equal(ops.attention_decode(q, k_t_cache, v_cache, length, D**-0.5), expected)


def test_linear_matches_nn_linear() -> None:
    g = _gen(6)
    layer = torch.nn.Linear(H, 512, bias=False).to(torch.bfloat16)
    x = torch.randn(9, H, generator=g).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ops.linear(x, layer.weight), layer(x))


def test_problem_signature_and_macs() -> None:
    p = Problem.of("expert_mlp", T=1, H=H, I=I, E=E, K=K)
    assert p.signature == "T=1,H=2048,I=768,E=128,K=8"
    assert p.macs == 8 * 3 * 2048 * 768
    assert Problem.of("linear", T=1, K=2048, N=151_936).macs == 2048 * 151_936
    with pytest.raises(OpError, match="takes dims T, K, N; missing \\['N'\\]"):
        Problem.of("linear", T=1, K=2)
    with pytest.raises(OpError, match="unknown op 'softmax'; valid ops: rmsnorm"):
        Problem.of("softmax", T=1)
    with pytest.raises(OpError, match="Hq=6 must be a multiple of Hkv=4"):
        Problem.of("rope", T=1, Hq=6, Hkv=4, D=128)


def test_compare_reports_the_worst_element() -> None:
    e = torch.zeros(4)
    ok, detail = ops.compare(torch.tensor([0.0, 0.0, 0.5, 0.0]), e, atol=0.1, rtol=0.0)
    assert not ok and "flat index 2" in detail
    ok, detail = ops.compare((torch.tensor([1, 2]),), (torch.tensor([1, 3]),), 0, 0)
    assert not ok and "1 of 2 integer values differ" in detail
