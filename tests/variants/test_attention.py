"""Attention variants in the emulator against the reference and HF transformers' eager Qwen3-MoE
attention, at prefill lengths 1, 100, 512, 1024 and decode cache lengths 1, 100, 4096 (one-pass,
split-K and keys on the partitions), and split-K and keys on the partitions at one TP 4 rank's
heads with ragged buckets."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from nkimoe.bench.trial import run_trial
from nkimoe.nki.emulator import session
from nkimoe.ops import Problem, attention_decode, attention_prefill, compare
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


def _decode_case(variant: str, target: str, length: int, bucket: int, hq: int = HQ, hkv: int = HKV) -> None:
    """``variant`` on ``target`` over the first ``length`` positions of a ``bucket``-long cache, against
    the reference and HF eager attention."""
    g = torch.Generator().manual_seed(length)
    q = _rand((1, hq, D), g)
    k_cache, v_cache = _rand((hkv, bucket, D), g), _rand((hkv, bucket, D), g)
    k_t_cache = k_cache.transpose(1, 2).contiguous()
    with session(target):
        actual = REGISTRY.variants[f"{variant}_{target}"].kernel(q, k_t_cache, v_cache, length, SCALE)
    reference = attention_decode(q, k_t_cache, v_cache, length, SCALE)
    module = types.SimpleNamespace(num_key_value_groups=hq // hkv, training=False)
    hf_out = hf.eager_attention_forward(module, q.transpose(0, 1)[None], k_cache[None, :, :length],
                                        v_cache[None, :, :length], None, scaling=SCALE)[0][0]
    atol, rtol = ATTENTION_TOLERANCE["bfloat16"]
    for name, expected in (("reference", reference), ("HF eager", hf_out)):
        ok, detail = compare(actual, expected, atol, rtol)
        assert ok, f"vs {name}: {detail}"


@pytest.mark.parametrize("variant", ["attention_tkg", "attention_tkg_split", "attention_tkg_bykey",
                                     "attention_tkg_bykey_lnc2"])
@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("length", [1, 100, 4096])
def test_decode_matches_reference_and_hf(variant: str, target: str, length: int) -> None:
    _decode_case(variant, target, length, -(-length // 512) * 512 + 512)  # a bucket longer than the valid length


#: One TP 4 rank's heads (8 query heads, 1 KV head): split-K's chunking at a bucket of one key,
#: buckets that leave a short last chunk (1000 = 15 x 63 + 55; 17 = 8 x 2 + 1), the contest's
#: context, and the longest bucket split-K takes on Trn2.
@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("length,bucket", [(1, 1), (17, 17), (999, 1000), (1024, 1024), (5000, 8192)])
def test_split_decode_at_a_tp4_rank(target: str, length: int, bucket: int) -> None:
    _decode_case("attention_tkg_split", target, length, bucket, hq=8, hkv=1)


def test_split_decode_states_its_range() -> None:
    """Chunks of up to 512 keys (one PSUM bank of fp32 scores) on Trn2, 1024 (wide moving tiles) on Trn3."""
    for target, longest in (("trn2", 8192), ("trn3", 16384)):
        supports = REGISTRY.variants[f"attention_tkg_split_{target}"].supports
        for hq, hkv, limit in ((8, 1, longest), (32, 4, longest)):
            dims = {"Hq": hq, "Hkv": hkv, "D": D}
            assert supports({**dims, "L": limit}, "bfloat16", REGISTRY.targets[target])[0]
            ok, reason = supports({**dims, "L": limit + 1}, "bfloat16", REGISTRY.targets[target])
            assert not ok and f"up to {limit}" in reason


#: LNC=2 split-K: the second core's half fully masked (length 1 and 500 of 1024), split mid-half,
#: the contest's context, a longer bucket, and the full model's heads (4 KV heads, 4 query heads
#: stored per core).
@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("length,bucket,hq,hkv", [(1, 1024, 8, 1), (500, 1024, 8, 1), (700, 1024, 8, 1),
                                                  (1024, 1024, 8, 1), (3000, 4096, 8, 1), (100, 1024, HQ, HKV)])
def test_split_lnc2_decode_matches_reference_and_hf(target: str, length: int, bucket: int, hq: int, hkv: int) -> None:
    _decode_case("attention_tkg_split_lnc2", target, length, bucket, hq=hq, hkv=hkv)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("length", [1024, 4096])
def test_split_lnc2_is_estimated_faster_than_one_core_at_tp4(target: str, length: int) -> None:
    """Split-K on two cores beats split-K on one at a TP 4 rank's heads; it beats the one-pass kernel
    at 4096 keys, while at 1024 the one-pass kernel's fewer transfers win (per-transfer DMA cost)."""
    problem = Problem.of("attention_decode", "bfloat16", L=length, Hq=8, Hkv=1, D=D)
    tgt = REGISTRY.targets[target]
    lnc2 = run_trial(REGISTRY.variants[f"attention_tkg_split_lnc2_{target}"], problem, tgt, seed=2)
    assert lnc2.ok, lnc2.detail
    one_pass = run_trial(REGISTRY.variants[f"attention_tkg_{target}"], problem, tgt, seed=2).estimate
    split = run_trial(REGISTRY.variants[f"attention_tkg_split_{target}"], problem, tgt, seed=2).estimate
    assert lnc2.estimate.programs == 2 and lnc2.estimate.micros < split.micros, split.describe()
    assert (lnc2.estimate.micros < one_pass.micros) == (length == 4096), one_pass.describe()


def test_split_lnc2_states_its_range() -> None:
    supports = REGISTRY.variants["attention_tkg_split_lnc2_trn3"].supports
    dims = {"Hq": 8, "Hkv": 1, "D": D}
    assert supports({**dims, "L": 4096}, "bfloat16", REGISTRY.targets["trn3"])[0]
    for length in (1000, 4128):  # not a multiple of 2 x 16 chunks; more than 128 keys per chunk
        ok, reason = supports({**dims, "L": length}, "bfloat16", REGISTRY.targets["trn3"])
        assert not ok and "multiple of 32" in reason
    lnc1 = dataclasses.replace(REGISTRY.targets["trn3"], name="trn3-lnc1", lnc=1)
    ok, reason = supports({**dims, "L": 1024}, "bfloat16", lnc1)
    assert not ok and "LNC=1" in reason


#: Keys on the partitions at one TP 4 rank's heads: buckets of one key, of 17 keys (17 partitions
#: of one column), of 125 x 8 keys and a ragged last partition of one (1001), the contest's context
#: and the longest bucket at G = 8 (64 key columns, one PSUM bank of fp32 scores).
@pytest.mark.parametrize("variant", ["attention_tkg_bykey", "attention_tkg_bykey_lnc2"])
@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("length,bucket", [(1, 1), (17, 17), (999, 1001), (1024, 1024), (8000, 8192)])
def test_bykey_decode_at_a_tp4_rank(variant: str, target: str, length: int, bucket: int) -> None:
    _decode_case(variant, target, length, bucket, hq=8, hkv=1)


def test_bykey_decode_states_its_range() -> None:
    """One PSUM bank (2 KiB) of fp32 scores per KV head: ceil(L/128) key columns x G heads <= 512."""
    for name in ("attention_tkg_bykey_trn2", "attention_tkg_bykey_lnc2_trn3"):
        supports = REGISTRY.variants[name].supports
        target = REGISTRY.targets[name.rsplit("_", 1)[1]]
        for hq, hkv, limit in ((8, 1, 8192), (32, 4, 8192), (4, 1, 16384)):
            dims = {"Hq": hq, "Hkv": hkv, "D": D}
            assert supports({**dims, "L": limit}, "bfloat16", target)[0]
            ok, reason = supports({**dims, "L": limit + 1}, "bfloat16", target)
            assert not ok and f"up to {limit}" in reason
    lnc1 = dataclasses.replace(REGISTRY.targets["trn3"], name="trn3-lnc1", lnc=1)
    ok, reason = REGISTRY.variants["attention_tkg_bykey_lnc2_trn3"].supports({"Hq": 8, "Hkv": 1, "D": D, "L": 1024},
                                                                            "bfloat16", lnc1)
    assert not ok and "LNC=1" in reason


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_bykey_is_estimated_faster_than_split_k_at_tp4(target: str) -> None:
    """Cost-model estimates at the contest's context: keys on the partitions beat split-K, one core
    against one core and LNC=2 against LNC=2, and the LNC=2 form beats the one-core form."""
    problem = Problem.of("attention_decode", "bfloat16", L=1024, Hq=8, Hkv=1, D=D)
    tgt = REGISTRY.targets[target]
    micros = {}
    for kind in ("split", "split_lnc2", "bykey", "bykey_lnc2"):
        trial = run_trial(REGISTRY.variants[f"attention_tkg_{kind}_{target}"], problem, tgt, seed=2)
        assert trial.ok, trial.detail
        micros[kind] = trial.estimate.micros
    assert micros["bykey"] < micros["split"] and micros["bykey_lnc2"] < micros["split_lnc2"], micros
    assert micros["bykey_lnc2"] < micros["bykey"], micros


@pytest.mark.parametrize("variant", ["attention_tkg_trn2", "attention_tkg_split_trn2", "attention_tkg_split_lnc2_trn2",
                                     "attention_tkg_bykey_trn2", "attention_tkg_bykey_lnc2_trn2"])
def test_positions_past_length_do_not_leak(variant: str) -> None:
    g = torch.Generator().manual_seed(1)
    q = _rand((1, HQ, D), g)
    k_t, v = _rand((HKV, D, 1024), g), _rand((HKV, 1024, D), g)
    poisoned_v = v.clone()
    poisoned_v[:, 700:] = 1e4  # beyond the valid length
    with session("trn2"):
        clean = REGISTRY.variants[variant].kernel(q, k_t, v, 700, SCALE)
        poisoned = REGISTRY.variants[variant].kernel(q, k_t, poisoned_v, 700, SCALE)
    assert torch.equal(clean, poisoned)


@pytest.mark.parametrize("dtype", ["float32"])
@pytest.mark.parametrize("op,dims", [("attention_prefill", {"S": 300}), ("attention_decode", {"L": 700})])
def test_fp32_within_declared_tolerance(op: str, dims: dict, dtype: str) -> None:
    from nkimoe.bench.trial import run_trial
    from nkimoe.ops import Problem

    kinds = (("attention_cte_",) if op == "attention_prefill"
             else ("attention_tkg_", "attention_tkg_split_", "attention_tkg_bykey_", "attention_tkg_bykey_lnc2_"))
    for target in ("trn2", "trn3"):
        for kind in kinds:
            trial = run_trial(REGISTRY.variants[kind + target], Problem.of(op, dtype, Hq=HQ, Hkv=HKV, D=D, **dims),
                              REGISTRY.targets[target])
            assert trial.ok, trial.detail
