"""Attention variants in the emulator against the reference and HF transformers' eager Qwen3-MoE
attention, at prefill lengths 1, 100, 512, 1024 and decode cache lengths 1, 100, 4096."""

from __future__ import annotations

import types

import pytest
import torch
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from nkimoe.nki.emulator import session
from nkimoe.ops import attention_decode, attention_prefill, compare
from nkimoe.plugins import load_registry
from nkimoe.variants.attention import ATTENTION_TOLERANCE

HQ, HKV, D = 32, 4, 128
SCALE = D**-0.5
REGISTRY = load_registry({})


def hf_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    """HF eager attention on [S, H, D] tensors (batch 1), with HF's additive causal mask."""
    seq = k.shape[0]
    mask = None
    if causal:
        mask = torch.full((seq, seq), torch.finfo(q.dtype).min).triu(1).to(q.dtype)[None, None]
    module = types.SimpleNamespace(num_key_value_groups=HQ // HKV, training=False)
    out, _ = hf.eager_attention_forward(module, q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                        v.transpose(0, 1)[None], mask, scaling=SCALE)
    return out[0]


def _rand(shape: tuple[int, ...], g: torch.Generator) -> torch.Tensor:
    return torch.randn(*shape, generator=g).to(torch.bfloat16)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("seq", [1, 100, 512, 1024])
def test_prefill_matches_reference_and_hf(target: str, seq: int) -> None:
    g = torch.Generator().manual_seed(seq)
    q, k, v = _rand((seq, HQ, D), g), _rand((seq, HKV, D), g), _rand((seq, HKV, D), g)
    with session(target):
        actual = REGISTRY.variants[f"attention_cte_{target}"].kernel(q, k, v, SCALE)
    atol, rtol = ATTENTION_TOLERANCE["bfloat16"]
    for name, expected in (("reference", attention_prefill(q, k, v, SCALE)), ("HF eager", hf_eager(q, k, v, True))):
        ok, detail = compare(actual, expected, atol, rtol)
        assert ok, f"vs {name}: {detail}"


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("length", [1, 100, 4096])
def test_decode_matches_reference_and_hf(target: str, length: int) -> None:
    g = torch.Generator().manual_seed(length)
    bucket = -(-length // 512) * 512 + 512  # a cache bucket longer than the valid length
    q = _rand((1, HQ, D), g)
    k_cache, v_cache = _rand((HKV, bucket, D), g), _rand((HKV, bucket, D), g)
    k_t_cache = k_cache.transpose(1, 2).contiguous()
    with session(target):
        actual = REGISTRY.variants[f"attention_tkg_{target}"].kernel(q, k_t_cache, v_cache, length, SCALE)
    reference = attention_decode(q, k_t_cache, v_cache, length, SCALE)
    hf_out = hf_eager(q, k_cache[:, :length].transpose(0, 1), v_cache[:, :length].transpose(0, 1), False)
    atol, rtol = ATTENTION_TOLERANCE["bfloat16"]
    for name, expected in (("reference", reference), ("HF eager", hf_out)):
        ok, detail = compare(actual, expected, atol, rtol)
        assert ok, f"vs {name}: {detail}"


def test_positions_past_length_do_not_leak() -> None:
    g = torch.Generator().manual_seed(1)
    q = _rand((1, HQ, D), g)
    k_t, v = _rand((HKV, D, 1024), g), _rand((HKV, 1024, D), g)
    poisoned_v = v.clone()
    poisoned_v[:, 700:] = 1e4  # beyond the valid length
    with session("trn2"):
        clean = REGISTRY.variants["attention_tkg_trn2"].kernel(q, k_t, v, 700, SCALE)
        poisoned = REGISTRY.variants["attention_tkg_trn2"].kernel(q, k_t, poisoned_v, 700, SCALE)
    assert torch.equal(clean, poisoned)


@pytest.mark.parametrize("dtype", ["float32"])
@pytest.mark.parametrize("op,dims", [("attention_prefill", {"S": 300}), ("attention_decode", {"L": 700})])
def test_fp32_within_declared_tolerance(op: str, dims: dict, dtype: str) -> None:
    from nkimoe.bench.trial import run_trial
    from nkimoe.ops import Problem

    for target in ("trn2", "trn3"):
        name = ("attention_cte_" if op == "attention_prefill" else "attention_tkg_") + target
        trial = run_trial(REGISTRY.variants[name], Problem.of(op, dtype, Hq=HQ, Hkv=HKV, D=D, **dims),
                          REGISTRY.targets[target])
        assert trial.ok, trial.detail
