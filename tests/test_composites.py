"""Composite ops (``moe_block``, ``attention_block``): their references compose their parts', and
the binder chooses per call site between a fused variant and the chain of the parts' variants."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import pytest
import torch

from nkimoe.bench.estimate import must_read_bytes
from nkimoe.ops import COMPOSITES, Problem, add_rmsnorm, attention_decode, expert_mlp, get_op, linear, qk_norm, rope, \
    router
from nkimoe.plugins import load_registry
from nkimoe.registry import CHAIN, CacheHit, Registry
from nkimoe.scoring import coverage
from nkimoe.shapes import ModelShapes, call_sites, neuron_call_sites

REGISTRY = load_registry({})
MOE = Problem.of("moe_block", T=1, H=2048, E=128, K=8, I=192)
SMALL_MOE = {"T": 2, "H": 256, "E": 16, "K": 4, "I": 64}

#: A plugin's fused moe_block for trn2: the composed reference, declared bit-exact.
FUSED_PLUGIN = """
from nkimoe.hookspecs import hookimpl
from nkimoe.registry import Variant
from nkimoe import ops

@hookimpl
def register_variants(register):
    register(Variant(op="moe_block", name="test_moe_block_trn2", targets=("trn2",), kernel=ops.moe_block,
                     nki=False, priority=50, exactness="bitexact"))
"""


class Costs:
    """A cache stub: a winner per op, every (variant, hash) verified, recorded times by variant name."""

    def __init__(self, winners: Mapping[str, str], costs: Mapping[str, float], hashes: Mapping[str, str]) -> None:
        self.winners, self.costs, self.hashes = winners, costs, hashes

    def winner(self, target, problem, policy):  # noqa: ANN001, ANN201
        name = self.winners.get(problem.op)
        return None if name is None else CacheHit(name, self.hashes.get(name, ""), f"stub {problem.op}", "estimate")

    def verified(self, target, problem, policy, variant, source_hash):  # noqa: ANN001, ANN201
        return True

    def cost_us(self, target, problem, policy, variant, source_hash):  # noqa: ANN001, ANN201
        return self.costs.get(variant)


def _hashes(registry: Registry) -> dict[str, str]:
    return {v.name: v.source_hash for v in registry.variants.values()}


def test_composite_references_are_the_composition_of_their_parts() -> None:
    g = torch.Generator().manual_seed(3)
    args, kwargs = get_op("moe_block").make_inputs(SMALL_MOE, torch.bfloat16, g)
    x, residual, norm_weight, w_gate, w_gate_up, w_down = args
    summed, normed = add_rmsnorm(x, residual, norm_weight, kwargs["eps"])
    weights, ids = router(linear(normed, w_gate), kwargs["top_k"], kwargs["norm_topk_prob"])
    expected = (summed, expert_mlp(normed, weights, ids, w_gate_up, w_down))
    actual = get_op("moe_block").reference(*args, **kwargs)
    assert all(torch.equal(a, e) for a, e in zip(actual, expected))
    # The input maker keeps routing unambiguous: every pair of logits at least 0.02 apart.
    logits = linear(normed, w_gate).float().sort(dim=-1).values
    assert float((logits[:, 1:] - logits[:, :-1]).min()) >= 0.02

    dims = {"H": 256, "Hq": 4, "Hkv": 2, "D": 32, "L": 9}
    args, kwargs = get_op("attention_block").make_inputs(dims, torch.float32, g)
    x, residual, nw, w_qkv, qw, kw, cos, sin, k_cache_t, v_cache, length, w_o, scale = args
    before = (k_cache_t.clone(), v_cache.clone())
    summed, out, k, v = get_op("attention_block").reference(*args, **kwargs)
    assert torch.equal(k_cache_t, before[0]) and torch.equal(v_cache, before[1])  # inputs untouched
    _, normed = add_rmsnorm(x, residual, nw)
    qkv = linear(normed, w_qkv)
    q, k_ref = rope(*qk_norm(qkv[:, :128].reshape(1, 4, 32), qkv[:, 128:192].reshape(1, 2, 32), qw, kw), cos, sin)
    assert torch.equal(k, k_ref) and torch.equal(v, qkv[:, 192:].reshape(1, 2, 32))
    k_cache_t[:, :, length], v_cache[:, length] = k[0], v[0]
    expected = linear(attention_decode(q, k_cache_t, v_cache, length + 1, scale).reshape(1, 128), w_o)
    assert torch.equal(summed, x + residual) and torch.equal(out, expected)


def test_composite_problems_name_their_parts_and_count_their_macs() -> None:
    assert set(COMPOSITES) == {"moe_block", "attention_block"}
    parts = MOE.parts
    assert list(parts) == ["add_norm", "router_gate", "router", "experts"]
    assert parts["router_gate"] == Problem.of("linear", T=1, K=2048, N=128)
    assert MOE.macs == sum(p.macs for p in parts.values()) == 2048 * 128 + 8 * 3 * 2048 * 192
    assert must_read_bytes(MOE) == sum(must_read_bytes(p) for p in parts.values())
    decode = call_sites(ModelShapes(), "decode", 1024)
    for composite in ("decode.moe_block", "decode.attention_block"):  # parts are the model's own sites
        assert all(decode[f"decode.{name}"] == p for name, p in decode[composite].parts.items())
    neuron = neuron_call_sites(ModelShapes(), 4, "decode", 1024)
    assert all(neuron[f"decode.{name}"] == p for name, p in neuron["decode.moe_block"].parts.items())


def test_fused_variant_binds_by_priority_without_cache_and_chain_when_ineligible() -> None:
    bound = REGISTRY.bind("trn3", {"decode.moe_block": MOE}).ops["decode.moe_block"]
    assert bound.variant.name == "moe_block_tkg_trn3_lnc2" and bound.decided_by == "priority" and not bound.is_chain
    prefill = Problem.of("moe_block", T=128, H=2048, E=128, K=8, I=192)
    binding = REGISTRY.bind("trn3", {"prefill.moe_block": prefill})
    chain = binding.ops["prefill.moe_block"]
    assert chain.is_chain and chain.decided_by == "fallback" and chain.variant.name == "ref_moe_block"
    assert "moe_block_tkg_trn3: T=128: a decode kernel" in chain.reason
    assert [p.site for p in chain.parts] == ["prefill.add_norm", "prefill.router_gate", "prefill.router",
                                             "prefill.experts"]
    assert chain.name == f"{CHAIN}(add_rmsnorm_nki_trn3, linear_nki_trn3, router_nki_trn3, expert_mlp_tkg_tokens_trn3)"
    # cpu has no fused variant: the composite's reference is its chain, not a candidate
    cpu = REGISTRY.bind("cpu", {"decode.moe_block": MOE}).ops["decode.moe_block"]
    assert cpu.is_chain and all(p.variant.name.startswith("ref_") for p in cpu.parts)


def test_the_cache_decides_between_the_fused_variant_and_the_chain() -> None:
    hashes = _hashes(REGISTRY)
    sites = {"decode.moe_block": MOE}
    chain, _, _ = REGISTRY.bind_chain("decode.moe_block", REGISTRY.targets["trn3"], MOE, "fastest", None)
    parts = dict(zip((p.variant.name for p in chain), (6.0, 19.0, 4.0, 75.0)))
    slower = Costs({"moe_block": "moe_block_tkg_trn3"}, {**parts, "moe_block_tkg_trn3": 110.0}, hashes)
    bound = REGISTRY.bind("trn3", sites, cache=slower).ops["decode.moe_block"]
    assert bound.is_chain and bound.decided_by == "cache"
    assert bound.chain_us == pytest.approx(104.0) and bound.fused_us == 110.0
    assert "chain 104.00 us <= moe_block_tkg_trn3 110.00 us" in bound.reason
    faster = Costs({"moe_block": "moe_block_tkg_trn3"}, {**parts, "moe_block_tkg_trn3": 80.0}, hashes)
    bound = REGISTRY.bind("trn3", sites, cache=faster).ops["decode.moe_block"]
    assert bound.variant.name == "moe_block_tkg_trn3" and bound.decided_by == "cache"
    assert "80.00 us < chain 104.00 us" in bound.reason
    # A part without a recorded time: the chain sum recorded with the composite decides.
    partial = Costs({"moe_block": "moe_block_tkg_trn3"}, {"moe_block_tkg_trn3": 80.0, CHAIN: 70.0}, hashes)
    assert REGISTRY.bind("trn3", sites, cache=partial).ops["decode.moe_block"].is_chain
    # The chain won at selection.
    chain_won = Costs({"moe_block": CHAIN}, {}, hashes)
    bound = REGISTRY.bind("trn3", sites, cache=chain_won).ops["decode.moe_block"]
    assert bound.is_chain and bound.decided_by == "cache" and "chain beat every fused variant" in bound.reason
    # A stale fused winner is reported and priority decides.
    stale = Costs({"moe_block": "moe_block_tkg_trn3"}, {}, {"moe_block_tkg_trn3": "0" * 16})
    binding = REGISTRY.bind("trn3", sites, cache=stale)
    assert binding.ops["decode.moe_block"].decided_by == "priority" and "stale source hash" in binding.warnings[0]


def test_bitexact_policy_takes_only_a_bitexact_fused_variant(registry_with: Callable[..., Registry]) -> None:
    sites = {"decode.moe_block": MOE}
    bound = REGISTRY.bind("trn2", sites, policy="bitexact").ops["decode.moe_block"]
    assert bound.is_chain and "policy bitexact" in bound.reason  # the builtin fused kernel is within tolerance
    assert all(p.variant.name.startswith("ref_") for p in bound.parts)
    registry = registry_with(fused=FUSED_PLUGIN)
    verified = Costs({}, {}, {})
    for policy in ("bitexact", "fastest"):
        bound = registry.bind("trn2", sites, policy=policy, cache=verified).ops["decode.moe_block"]
        assert bound.variant.name == "test_moe_block_trn2" and bound.variant.plugin == "fused"
    # A plugin's fused variant, like any plugin variant, needs a passing verification in the cache.
    unverified = registry.bind("trn2", sites).ops["decode.moe_block"]
    assert unverified.variant.name == "moe_block_tkg_trn2_lnc2"


def test_chain_callable_composes_the_bound_parts_with_their_layouts() -> None:
    problem = Problem.of("moe_block", "float32", **SMALL_MOE)
    bound = REGISTRY.bind("cpu", {"decode.moe_block": problem}).ops["decode.moe_block"]
    args, kwargs = get_op("moe_block").make_inputs(problem.dim, torch.float32, torch.Generator().manual_seed(1))
    expected = get_op("moe_block").reference(*args, **kwargs)
    assert all(torch.equal(a, e) for a, e in zip(bound.fn(*args, **kwargs), expected))


def test_a_fused_composite_replaces_its_parts_in_estimates_and_coverage() -> None:
    shapes = ModelShapes()
    sites = {**call_sites(shapes, "prefill", 1024), **call_sites(shapes, "decode", 1024)}
    fused = REGISTRY.bind("trn3", sites)
    assert fused.fused("decode.moe_block") and fused.fused("decode.attention_block")
    assert not fused.fused("prefill.moe_block")  # the fused kernel takes one token
    runs = {s for s in sites if fused.runs(s)}
    assert {"decode.moe_block", "decode.attention_block", "prefill.router", "prefill.experts",
            "prefill.add_norm"} <= runs
    assert not {"decode.router_gate", "decode.router", "decode.experts", "decode.qkv_proj", "decode.qk_norm",
                "decode.rope", "decode.attention", "decode.o_proj", "prefill.moe_block"} & runs
    assert "decode.add_norm" not in runs  # both composites that list it are fused
    chain = REGISTRY.bind("cpu", sites)
    assert chain.runs("decode.add_norm") and not chain.runs("decode.moe_block")
    fused_cov, chain_cov = coverage(fused, shapes, 1024, 1), coverage(chain, shapes, 1024, 1)
    total = sum(r.macs for r in fused_cov.decode)
    assert total == sum(r.macs for r in chain_cov.decode)  # the same MACs, counted once either way
    row = next(r for r in fused_cov.decode if r.site == "decode.moe_block")
    assert row.nki and row.variant == "moe_block_tkg_trn3_lnc2" and row.macs == 48 * sites["decode.moe_block"].macs
    assert fused_cov.fraction == 1.0 and chain_cov.fraction == 0.0
