from __future__ import annotations

from collections.abc import Callable

import pytest

from nkimoe.ops import OP_NAMES, Problem, rmsnorm
from nkimoe.registry import CacheHit, Registry, RegistryError, Variant
from nkimoe.shapes import ModelShapes, call_sites

TRN2_PLUGIN = """
from nkimoe.hookspecs import hookimpl
from nkimoe.registry import Variant
from nkimoe import ops

def rms_kernel(x, weight, eps=1e-6):
    return ops.rmsnorm(x, weight, eps)

def small_only(dims, dtype, target):
    return (dims["T"] <= 128, f"T={dims['T']} > 128" if dims["T"] > 128 else "T <= 128")

@hookimpl
def register_variants(register):
    register(Variant(op="rmsnorm", name="test_rmsnorm_trn2", targets=("trn2",), kernel=rms_kernel,
                     nki=False, priority=50, supports=small_only, tolerance={"bfloat16": (1e-2, 1e-2)}))
"""


def test_variant_declarations_are_validated() -> None:
    with pytest.raises(RegistryError, match="unknown op 'softmax'"):
        Variant(op="softmax", name="x", targets=("trn2",), kernel=rmsnorm, nki=True, exactness="bitexact")
    with pytest.raises(RegistryError, match="declare a tolerance per dtype"):
        Variant(op="rmsnorm", name="x", targets=("trn2",), kernel=rmsnorm, nki=True)
    with pytest.raises(RegistryError, match="cannot target 'cpu'"):
        Variant(op="rmsnorm", name="x", targets=("cpu",), kernel=rmsnorm, nki=True, exactness="bitexact")
    with pytest.raises(RegistryError, match="targets must be a non-empty tuple"):
        Variant(op="rmsnorm", name="x", targets="trn2", kernel=rmsnorm, nki=True, exactness="bitexact")  # type: ignore[arg-type]


class VerifiedCache:
    """A cache without winners that records passing verifications of the given (variant, hash) pairs."""

    def __init__(self, *verified: tuple[str, str]) -> None:
        self.passed = set(verified)

    def winner(self, target, problem, policy):  # noqa: ANN001, ANN201
        return None

    def verified(self, target, problem, policy, variant, source_hash):  # noqa: ANN001, ANN201
        return (variant, source_hash) in self.passed


def test_plugin_variant_binds_on_its_target_once_verified(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(trn2_rms=TRN2_PLUGIN)
    assert not registry.problems
    variant = registry.variants["test_rmsnorm_trn2"]
    assert variant.plugin == "trn2_rms"
    sites = {"decode.norm": Problem.of("rmsnorm", T=1, H=2048)}
    binding = registry.bind("trn2", sites, cache=VerifiedCache(("test_rmsnorm_trn2", variant.source_hash)))
    bound = binding.ops["decode.norm"]
    assert bound.variant.name == "test_rmsnorm_trn2" and bound.decided_by == "priority"
    assert binding["decode.norm"] is variant.kernel
    for cache in (None, VerifiedCache(), VerifiedCache(("test_rmsnorm_trn2", "0" * 16))):  # none, other, stale
        bound = registry.bind("trn2", sites, cache=cache).ops["decode.norm"]
        assert bound.variant.name == "rmsnorm_tkg_nki" and bound.variant.plugin == "nkimoe.variants.norms"
        candidates, _ = registry.explain("trn2", sites["decode.norm"], cache=cache)
        skipped = next(c for c in candidates if c.variant.name == "test_rmsnorm_trn2")
        assert not skipped.eligible and "no passing verification" in skipped.reason


def test_fallback_to_reference_with_reason(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(trn2_rms=TRN2_PLUGIN)
    # Too wide for the builtin kernels' SBUF budget and too many tokens for the plugin's.
    big = registry.bind("trn2", {"prefill.norm": Problem.of("rmsnorm", T=1024, H=100_000)}).ops["prefill.norm"]
    assert big.variant.name == "ref_rmsnorm" and big.decided_by == "fallback"
    assert "test_rmsnorm_trn2: T=1024 > 128" in big.reason
    assert "rmsnorm_nki_trn2: H=100000 needs" in big.reason
    other = registry.bind("trn3", {"decode.norm": Problem.of("rmsnorm", T=1024, H=100_000)}).ops["decode.norm"]
    assert other.decided_by == "fallback" and "test_rmsnorm_trn2: built for trn2, not trn3" in other.reason


def test_bitexact_policy_excludes_tolerance_variants(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(trn2_rms=TRN2_PLUGIN)
    bound = registry.bind("trn2", {"s": Problem.of("rmsnorm", T=1, H=2048)}, policy="bitexact").ops["s"]
    assert bound.variant.name == "ref_rmsnorm"
    assert "policy bitexact" in bound.reason
    with pytest.raises(RegistryError, match="unknown policy 'quick'"):
        registry.bind("trn2", {"s": Problem.of("rmsnorm", T=1, H=2048)}, policy="quick")


def test_cache_winner_binds_and_stale_hash_falls_back(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(trn2_rms=TRN2_PLUGIN)
    variant = registry.variants["test_rmsnorm_trn2"]
    problem = Problem.of("rmsnorm", T=1, H=2048)

    class Cache:
        def __init__(self, digest: str) -> None:
            self.digest = digest

        def winner(self, target, problem, policy):  # noqa: ANN001, ANN201
            return CacheHit("test_rmsnorm_trn2", self.digest, "trn2/rmsnorm/T=1,H=2048", "estimate")

        def verified(self, target, problem, policy, variant, source_hash):  # noqa: ANN001, ANN201
            return source_hash == self.digest

    fresh = registry.bind("trn2", {"s": problem}, cache=Cache(variant.source_hash))
    assert fresh.ops["s"].decided_by == "cache" and "estimate" in fresh.ops["s"].reason
    stale = registry.bind("trn2", {"s": problem}, cache=Cache("0" * 16))
    assert stale.ops["s"].decided_by == "priority" and stale.ops["s"].variant.name == "rmsnorm_tkg_nki"
    assert stale.warnings and "stale source hash" in stale.warnings[0]


def test_every_model_call_site_binds_on_every_target() -> None:
    from nkimoe.plugins import load_registry

    registry = load_registry({})
    sites = {**call_sites(ModelShapes(), "prefill", 1024), **call_sites(ModelShapes(), "decode", 1024)}
    assert {p.op for p in sites.values()} == set(OP_NAMES)
    for target in ("cpu", "trn2", "trn3"):
        binding = registry.bind(target, sites)
        assert set(binding.ops) == set(sites)
        assert all(callable(binding[s]) for s in sites)


def test_unknown_target_names_valid_ones() -> None:
    from nkimoe.plugins import load_registry

    with pytest.raises(RegistryError, match="unknown target 'trn9'.*valid targets: cpu, gen3, gen4, trn2, trn3"):
        load_registry({}).bind("trn9", {})
