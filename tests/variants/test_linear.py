"""The NKI linear variants against the reference at the model's projection shapes, in the emulator,
on each target: decode (T=1) and prefill (ragged and full), lm_head at the full vocabulary."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nkimoe.bench.select import select_problem
from nkimoe.bench.trial import run_trial
from nkimoe.nki.emulator import EmulatorError, session
from nkimoe.ops import Problem
from nkimoe.plugins import load_registry
from nkimoe.variants.linear import LNC_CHUNK_BYTES, linear_kernel, linear_lnc_kernel, lnc_share, weight_k_major

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


# --- LNC=2 decode: half the columns per physical core ---------------------------------------------

LNC2 = [("linear_tkg_lnc2_trn2", "linear_nki_trn2", "trn2"), ("linear_tkg_lnc2_trn3", "linear_nki_trn3", "trn3")]
#: One TP-4 rank's decode projections (Qwen3-30B-A3B at --tp-degree 4).
TP4_DECODE = [
    pytest.param(2048, 1024, id="q_proj"),
    pytest.param(2048, 256, id="kv_proj"),
    pytest.param(1024, 2048, id="o_proj"),
    pytest.param(2048, 128, id="router_gate"),
    pytest.param(2048, 151_936 // 4, id="lm_head"),
]


@pytest.mark.parametrize("name,single,target", LNC2)
@pytest.mark.parametrize("k,n", TP4_DECODE)
def test_lnc2_linear_matches_reference_and_is_estimated_faster(name: str, single: str, target: str, k: int,
                                                                n: int) -> None:
    problem = Problem.of("linear", "bfloat16", T=1, K=k, N=n)
    tgt = REGISTRY.targets[target]
    trial = run_trial(REGISTRY.variants[name], problem, tgt, seed=n)
    assert trial.ok, trial.detail
    assert trial.estimate.programs == 2 and trial.estimate.macs == k * n
    one_core = run_trial(REGISTRY.variants[single], problem, tgt, seed=n).estimate
    assert trial.estimate.micros < one_core.micros, (trial.estimate.describe(), one_core.describe())


@pytest.mark.parametrize("name,single,target", LNC2)
@pytest.mark.parametrize("n", [1000, 1001])
def test_lnc2_linear_few_tokens_fp32(name: str, single: str, target: str, n: int) -> None:
    # N even: the cores split the contraction rows and swap partial sums; N odd: they take 501 and
    # 500 columns. T=3 tokens; fp32.
    problem = Problem.of("linear", "float32", T=3, K=256, N=n)
    assert (lnc_share(256, n, 1)[1] < 256) == (n % 2 == 0)
    trial = run_trial(REGISTRY.variants[name], problem, REGISTRY.targets[target], seed=3)
    assert trial.ok, trial.detail


def test_lnc2_linear_weight_dmas_are_large_and_contiguous() -> None:
    # q_proj at TP 4 on trn3: each core reads half the contraction rows, partition-major, so every
    # weight DMA moves 128 partitions x 4 KiB, one run per partition; the weight is read once.
    g = torch.Generator().manual_seed(0)
    w = torch.randn(1024, 2048, generator=g).to(torch.bfloat16)
    x = torch.randn(1, 2048, generator=g).to(torch.bfloat16)
    with session("trn3") as s:
        y = linear_lnc_kernel[2](x, weight_k_major(w), block=1024)
    torch.testing.assert_close(torch.as_tensor(y).float(), (x.float() @ w.float().t()), rtol=2.0**-7, atol=1e-4)
    loads = [i for i in s.trace if i.name == "dma_copy" and i.bytes == 128 * LNC_CHUNK_BYTES]
    assert len(loads) == 2 * 4 and all(i.contiguous == LNC_CHUNK_BYTES for i in loads)
    assert sum(i.hbm_read for i in s.trace) == (w.numel() + x.numel()) * 2


def test_lnc2_linear_is_ineligible_without_lnc2_or_beyond_decode() -> None:
    variant = REGISTRY.variants["linear_tkg_lnc2_trn3"]
    lnc1 = dataclasses.replace(REGISTRY.targets["trn3"], name="trn3-lnc1", lnc=1)
    ok, reason = variant.supports({"T": 1, "K": 2048, "N": 1024}, "bfloat16", lnc1)
    assert not ok and "LNC=1" in reason
    ok, reason = variant.supports({"T": 128, "K": 2048, "N": 1024}, "bfloat16", REGISTRY.targets["trn3"])
    assert not ok and "decode kernel" in reason


def test_bench_select_picks_lnc2_for_large_decode_and_one_core_for_a_tiny_batch() -> None:
    # Estimates: at q_proj's decode shape the two cores stream the 4 MiB weight in parallel; at a
    # tiny 8-token problem the LNC=2 kernel's per-token x^T DMA costs more than the weight.
    trn3 = REGISTRY.targets["trn3"]
    big = select_problem(REGISTRY, trn3, Problem.of("linear", "bfloat16", T=1, K=2048, N=1024), ["s"], "fastest")
    assert big.winner == "linear_tkg_lnc2_trn3"
    tiny = select_problem(REGISTRY, trn3, Problem.of("linear", "bfloat16", T=8, K=256, N=128), ["s"], "fastest")
    assert tiny.winner == "linear_nki_trn3"
    assert any(c.variant == "linear_tkg_lnc2_trn3" and c.status == "ok" for c in tiny.candidates)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_lnc2_linear_in_fp32_where_a_weight_row_outgrows_a_chunk(target: str) -> None:
    """o_proj at a TP 4 rank in fp32 (the NxDI CPU runs): a 2048-column row is 8 KiB, two chunks."""
    registry = load_registry({})
    problem = Problem.of("linear", "float32", T=1, K=1024, N=2048)
    trial = run_trial(registry.variants[f"linear_tkg_lnc2_{target}"], problem, registry.targets[target])
    assert trial.ok, trial.detail  # within LINEAR_TOLERANCE["float32"]
