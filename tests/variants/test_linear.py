"""The NKI linear variants against the reference at the model's projection shapes, in the emulator,
on each target: decode (T=1) and prefill (ragged and full), lm_head at the full vocabulary."""

from __future__ import annotations

import pytest
import torch

from nkimoe.bench.trial import run_trial
from nkimoe.nki.emulator import EmulatorError, session
from nkimoe.ops import Problem
from nkimoe.plugins import load_registry
from nkimoe.variants.linear import linear_kernel, weight_k_major

REGISTRY = load_registry({})
VARIANTS = [("linear_nki_trn2", "trn2"), ("linear_nki_trn3", "trn3")]

SHAPES = [
    pytest.param(1, 2048, 4096, "bfloat16", id="decode-q"),
    pytest.param(1, 2048, 512, "bfloat16", id="decode-kv"),
    pytest.param(1, 4096, 2048, "bfloat16", id="decode-o"),
    pytest.param(1, 2048, 5120, "bfloat16", id="decode-qkv-fused"),
    pytest.param(1, 2048, 128, "bfloat16", id="decode-router-gate"),
    pytest.param(1, 2048, 151_936, "bfloat16", id="lm_head-full-vocab"),
    pytest.param(300, 2048, 4096, "bfloat16", id="prefill-300-q"),
    pytest.param(1024, 4096, 2048, "bfloat16", id="prefill-1024-o"),
    pytest.param(100, 2048, 640, "float32", id="prefill-100-fp32"),
]


@pytest.mark.parametrize("name,target", VARIANTS)
@pytest.mark.parametrize("tokens,k,n,dtype", SHAPES)
def test_linear_variant_matches_reference(name: str, target: str, tokens: int, k: int, n: int, dtype: str) -> None:
    variant = REGISTRY.variants[name]
    problem = Problem.of("linear", dtype, T=tokens, K=k, N=n)
    ok, reason = variant.supports(problem.dim, dtype, REGISTRY.targets[target])
    assert ok, reason
    trial = run_trial(variant, problem, REGISTRY.targets[target], seed=tokens + n)
    assert trial.ok, trial.detail
    assert trial.estimate.macs == tokens * k * n


def test_weight_is_read_once_whatever_the_token_count() -> None:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=g).to(torch.bfloat16)
    reads = {}
    for tokens in (1, 384):
        x = torch.randn(tokens, 2048, generator=g).to(torch.bfloat16)
        with session("trn2") as s:
            linear_kernel(x, weight_k_major(w))
        reads[tokens] = sum(i.hbm_read for i in s.trace)
    weight_bytes = w.numel() * 2
    assert reads[1] == weight_bytes + 2048 * 2
    assert reads[384] == weight_bytes + 384 * 2048 * 2


def test_wide_moving_block_is_trn3_only() -> None:
    x = torch.zeros(1, 256, dtype=torch.bfloat16)
    w_t = torch.zeros(256, 1024, dtype=torch.bfloat16)
    with session("trn2"), pytest.raises(EmulatorError, match="moving free size 1024 exceeds the maximum 512"):
        linear_kernel(x, w_t, block=1024)
    with session("trn3"):
        assert linear_kernel(x, w_t, block=1024).shape == (1, 1024)


def test_supports_rejects_what_does_not_fit() -> None:
    variant = REGISTRY.variants["linear_nki_trn2"]
    ok, reason = variant.supports({"T": 1024, "K": 4096, "N": 2048}, "float32", REGISTRY.targets["trn2"])
    assert not ok and "need 282624 B per partition" in reason
    ok, reason = variant.supports({"T": 1, "K": 2050, "N": 8}, "bfloat16", REGISTRY.targets["trn2"])
    assert not ok and "not a multiple of 128" in reason
