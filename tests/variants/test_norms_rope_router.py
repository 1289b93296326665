"""Every NKI variant of rmsnorm, add_rmsnorm, qk_norm, rope and router, verified in the emulator
against its op's reference over decode and prefill shapes (ragged token counts included), on each
target it claims, in bf16 and fp32, within the tolerance the variant declares."""

from __future__ import annotations

import pytest
import torch

from nkimoe.bench.trial import run_trial
from nkimoe.nki.emulator import EmulatorError, session
from nkimoe.ops import Problem, router, untied_logits
from nkimoe.plugins import load_registry
from nkimoe.registry import Registry
from nkimoe.shapes import ModelShapes, call_sites
from nkimoe.variants.routing import router_kernel

OPS = ("rmsnorm", "add_rmsnorm", "qk_norm", "rope", "router")
TOKENS = (1, 5, 300, 1024)
REGISTRY = load_registry({})


@pytest.fixture(scope="module")
def registry() -> Registry:
    return REGISTRY


def _problem(op: str, tokens: int, dtype: str) -> Problem:
    dims = {"rmsnorm": {"H": 2048}, "add_rmsnorm": {"H": 2048}, "router": {"E": 128, "K": 8}}.get(
        op, {"Hq": 32, "Hkv": 4, "D": 128})
    return Problem.of(op, dtype, T=tokens, **dims)


#: (variant, target, tokens): every NKI variant of these ops, on every target it claims, at every
#: token count of TOKENS that its supports() accepts.
CASES = [
    (v.name, target, tokens)
    for v in sorted(REGISTRY.variants.values(), key=lambda v: v.name)
    if v.nki and v.op in OPS
    for target in v.targets
    for tokens in TOKENS
    if v.supports(_problem(v.op, tokens, "bfloat16").dim, "bfloat16", REGISTRY.targets[target])[0]
]


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("name,target,tokens", CASES)
def test_variant_matches_reference(registry: Registry, name: str, target: str, tokens: int, dtype: str) -> None:
    variant = registry.variants[name]
    trial = run_trial(variant, _problem(variant.op, tokens, dtype), registry.targets[target], seed=tokens)
    assert trial.ok, trial.detail
    assert trial.estimate is not None and trial.estimate.micros > 0


def test_cases_cover_decode_and_ragged_prefill_on_both_targets() -> None:
    for op in OPS:
        for target in ("trn2", "trn3"):
            tokens = {t for name, tg, t in CASES if tg == target and REGISTRY.variants[name].op == op}
            assert {1, 300, 1024} <= tokens, (op, target, tokens)


def test_every_small_op_has_nki_variants_on_both_targets(registry: Registry) -> None:
    for target in ("trn2", "trn3"):
        family = registry.targets[target].family
        nki_ops = {v.op for v in registry.variants.values() if v.nki and family in v.targets}
        assert set(OPS) <= nki_ops


def test_trn2_binding_never_takes_a_trn3_variant(registry: Registry) -> None:
    sites = {**call_sites(ModelShapes(), "prefill", 1024), **call_sites(ModelShapes(), "decode", 512)}
    binding = registry.bind("trn2", sites)
    for bound in binding.ops.values():
        assert "trn3" not in bound.variant.targets or "trn2" in bound.variant.targets
    assert binding.ops["decode.router"].variant.name == "router_nki_trn2"
    assert registry.bind("trn3", sites).ops["decode.router"].variant.name == "router_nki_trn3"


def test_trn3_router_kernel_is_rejected_by_the_trn2_emulator() -> None:
    logits = untied_logits(4, 128, torch.bfloat16, torch.Generator().manual_seed(0))
    with session("trn2"), pytest.raises(EmulatorError, match="nisa.exponential is not available on trn2"):
        router_kernel(logits, fast_exp=True)


def test_router_ids_agree_whenever_logits_are_untied(registry: Registry) -> None:
    # untied_logits spaces the 128 logits of a row at least 0.02 apart after bf16 rounding: the
    # softmax keeps their order, so the top-8 ids are unambiguous and must agree exactly.
    logits = untied_logits(300, 128, torch.bfloat16, torch.Generator().manual_seed(9), margin=0.02)
    expected_w, expected_ids = router(logits)
    for name, target in (("router_nki_trn2", "trn2"), ("router_nki_trn3", "trn3")):
        with session(target):
            weights, ids = registry.variants[name].kernel(logits)
        assert torch.equal(ids, expected_ids)
        torch.testing.assert_close(weights.float(), expected_w.float(), atol=1e-3, rtol=2**-7)
        torch.testing.assert_close(weights.float().sum(-1), torch.ones(300), atol=8 * 2**-8, rtol=0)


@pytest.mark.parametrize("tokens", [1, 300])
def test_router_on_two_logical_cores_equals_one(registry: Registry, tokens: int) -> None:
    """``lnc=2`` launches ``router_kernel[2]``: the programs split the 128-token tiles (300 tokens: 3
    tiles, 2 + 1; 1 token: program 1 has none) and together write what one program does, bit for bit."""
    logits = untied_logits(tokens, 128, torch.bfloat16, torch.Generator().manual_seed(4), margin=0.02)
    for name, target in (("router_nki_trn2", "trn2"), ("router_nki_trn3", "trn3")):
        launcher = registry.variants[name].kernel
        with session(target):
            one = launcher(logits)
        with session(target):
            two = launcher(logits, lnc=2)
        assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[1])
