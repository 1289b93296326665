"""``nkimoe estimate``: the whole model's per-token decode and prefill time on one TP rank, as bound.

Every figure is a cost-model ESTIMATE. Each call site's time is its bound variant's estimate (the
benchmark cache's, when it holds the bound variant at this shape with a matching source hash,
else a fresh emulator run); sites bound to a torch reference have no kernel estimate and count
at their HBM roofline (flagged). Kernels run back to back: every call is a kernel-launch boundary
with no overlap across it (no AWS document gives a fixed cost per boundary inside one graph, so
none is added). Collectives at TP N > 1 come from documented link bandwidth and per-hop latency
(``Target.neuronlink_bytes_per_s``, ``Target.collective_hop_ns``): the Neuron path all-reduces the
hidden state after o_proj and after the experts in every layer, and all-gathers lm_head's
vocabulary slices once per pass. A composite site counts where it runs a fused variant (and its
part sites then do not); bound to its chain, its parts count.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nkimoe.bench.cache import BenchCache
from nkimoe.bench.trial import run_trial
from nkimoe.ops import Problem
from nkimoe.registry import Binding, Registry, default_policy
from nkimoe.shapes import NEURON_CALLS_PER_LAYER, NEURON_REPLACED, ModelShapes, call_sites, neuron_call_sites
from nkimoe.targets import Target

#: Sites that run once per pass; every other site runs once per layer.
ONCE_PER_PASS = frozenset({"first_norm", "final_norm", "lm_head"})
BF16_BYTES = 2


def all_reduce_seconds(nbytes: int, ranks: int, target: Target) -> float:
    """The faster of a ring (2(N-1) hops, 2(N-1)/N of the buffer per rank) and a single-step mesh
    (one hop, the whole buffer to each of N-1 peers) all-reduce (neuron-runtime/explore/
    intranode-collective-comm.rst)."""
    if ranks <= 1:
        return 0.0
    hop, bandwidth = target.collective_hop_ns * 1e-9, target.neuronlink_bytes_per_s
    ring = 2 * (ranks - 1) * hop + 2 * (ranks - 1) / ranks * nbytes / bandwidth
    mesh = hop + (ranks - 1) * nbytes / bandwidth
    return min(ring, mesh)


def all_gather_seconds(nbytes_per_rank: int, ranks: int, target: Target) -> float:
    """A mesh all-gather (one hop) of ``nbytes_per_rank`` from each of the other ranks."""
    if ranks <= 1:
        return 0.0
    return target.collective_hop_ns * 1e-9 + (ranks - 1) * nbytes_per_rank / target.neuronlink_bytes_per_s


def must_read_bytes(problem: Problem) -> int:
    """HBM bytes one call of ``problem`` cannot avoid reading: its weights (and a KV cache)."""
    d = problem.dim
    if problem.parts:
        return sum(must_read_bytes(part) for part in problem.parts.values())
    if problem.op == "linear":
        return d["K"] * d["N"] * BF16_BYTES
    if problem.op == "expert_mlp":
        return d["K"] * 3 * d["H"] * d["I"] * BF16_BYTES
    if problem.op == "attention_decode":
        return 2 * d["L"] * d["Hkv"] * d["D"] * BF16_BYTES
    if problem.op in ("rmsnorm", "add_rmsnorm"):
        return d["H"] * BF16_BYTES
    return 0


@dataclass
class SiteEstimate:
    """One call site: its bound variant and the time of all its calls in one pass (estimates)."""

    site: str
    variant: str
    calls: int
    us_per_call: float
    source: str  #: "cache", "emulator" or "roofline (torch reference)"
    roofline_us: float  #: all calls' must-read bytes at the rank's HBM bandwidth
    busy_us: dict[str, float] = field(default_factory=dict)  #: per engine, all calls

    @property
    def total_us(self) -> float:
        return self.calls * self.us_per_call


@dataclass
class PhaseEstimate:
    sites: list[SiteEstimate]
    collectives_us: float

    @property
    def kernels_us(self) -> float:
        return sum(s.total_us for s in self.sites)

    @property
    def total_us(self) -> float:
        return self.kernels_us + self.collectives_us

    def per_engine_us(self) -> dict[str, float]:
        engines: dict[str, float] = defaultdict(float)
        for s in self.sites:
            for engine, us in s.busy_us.items():
                engines[engine] += us
        return dict(engines)


def _site_sets(shapes: ModelShapes, tp: int, phase: str, tokens: int) -> dict[str, Problem]:
    return call_sites(shapes, phase, tokens) if tp == 1 else neuron_call_sites(shapes, tp, phase, tokens)


def site_runs(binding: Binding, site: str) -> bool:
    """Whether ``site`` issues calls: :meth:`Binding.runs`, and not a Neuron-path site that a fused
    composite of its phase replaces (``NEURON_REPLACED``)."""
    phase, _, name = site.rpartition(".")
    return binding.runs(site) and not any(
        name in replaced and binding.fused(f"{phase}.{composite}") for composite, replaced in NEURON_REPLACED.items())


def _cached(cache: BenchCache, target: Target, problem: Problem, policy: str, variant: Any) -> dict | None:
    found = cache.entry(target, problem, policy)
    if found is None:
        return None
    for c in found[1].get("candidates", []):
        if c.get("variant") == variant.name and c.get("source_hash") == variant.source_hash \
                and c.get("method") == "estimate" and c.get("time_us") is not None:
            return c
    return None


def _estimate_site(binding: Binding, site: str, calls: int, cache: BenchCache, target: Target) -> SiteEstimate:
    bound = binding.ops[site]
    name = site.split(".", 1)[1]
    variant, problem = bound.variant, bound.problem
    roofline = must_read_bytes(problem) / (target.hbm_bytes_per_s_per_core * target.lnc) * 1e6
    if not variant.nki:
        return SiteEstimate(name, variant.name, calls, roofline, "roofline (torch reference)", calls * roofline)
    hit = _cached(cache, target, problem, binding.policy, variant)
    if hit is not None:
        busy = {e: calls * us for e, us in (hit.get("busy_us") or {}).items()}
        return SiteEstimate(name, variant.name, calls, float(hit["time_us"]), "cache", calls * roofline, busy)
    trial = run_trial(variant, problem, target)
    if not trial.ok or trial.estimate is None:
        raise ValueError(f"{variant.name} failed at {site} ({problem}): {trial.detail}")
    est = trial.estimate
    return SiteEstimate(name, variant.name, calls, est.micros, "emulator", calls * roofline,
                        {e: calls * us for e, us in est.busy_us.items()})


def _collectives_us(shapes: ModelShapes, tp: int, tokens: int, target: Target) -> float:
    hidden = tokens * shapes.hidden * BF16_BYTES
    per_layer = 2 * all_reduce_seconds(hidden, tp, target)
    logits = all_gather_seconds(shapes.vocab // tp * BF16_BYTES, tp, target)
    return (shapes.layers * per_layer + logits) * 1e6


def estimate_model(registry: Registry, target: Target, *, tp: int = 1, seq_len: int = 1024,
                   shapes: ModelShapes | None = None, cache: BenchCache | None = None) -> dict[str, Any]:
    """Decode (one token, cache of ``seq_len``) and prefill (``seq_len`` tokens) of one TP rank."""
    if not target.is_neuron:
        raise ValueError(f"target {target.name!r} has no cost model; use trn2 or trn3")
    shapes = shapes or ModelShapes()
    cache = cache or BenchCache.load()
    phases: dict[str, PhaseEstimate] = {}
    roofline_bytes = 0
    for phase in ("decode", "prefill"):
        problems = _site_sets(shapes, tp, phase, seq_len)
        binding = registry.bind(target, problems, policy=default_policy(), cache=cache)
        sites = []
        for site, problem in problems.items():
            if not site_runs(binding, site):
                continue
            name = site.split(".", 1)[1]
            calls = 1 if name in ONCE_PER_PASS else shapes.layers * NEURON_CALLS_PER_LAYER.get(name, 1)
            sites.append(_estimate_site(binding, site, calls, cache, target))
            if phase == "decode":
                roofline_bytes += calls * must_read_bytes(problem)
        tokens = 1 if phase == "decode" else seq_len
        phases[phase] = PhaseEstimate(sites, _collectives_us(shapes, tp, tokens, target))
    decode, prefill = phases["decode"], phases["prefill"]
    rank_bandwidth = target.hbm_bytes_per_s_per_core * target.lnc
    return {
        "estimate": True,
        "method": "estimate (cost model; not a measurement)",
        "target": target.name,
        "tp": tp,
        "seq_len": seq_len,
        "decode_ms_per_token": decode.total_us / 1e3,
        "prefill_ms": prefill.total_us / 1e3,
        "collectives_ms_per_token": decode.collectives_us / 1e3,
        "prefill_collectives_ms": prefill.collectives_us / 1e3,
        "roofline_ms_per_token": roofline_bytes / rank_bandwidth * 1e3,
        "roofline_bytes_per_token": roofline_bytes,
        "kernel_launches_per_token": sum(s.calls for s in decode.sites),
        "kernel_launches_prefill": sum(s.calls for s in prefill.sites),
        "decode_engines_ms": {e: us / 1e3 for e, us in decode.per_engine_us().items()},
        "prefill_engines_ms": {e: us / 1e3 for e, us in prefill.per_engine_us().items()},
        "decode_sites": [_row(s) for s in decode.sites],
        "prefill_sites": [_row(s) for s in prefill.sites],
    }


def _row(s: SiteEstimate) -> dict[str, Any]:
    return {"site": s.site, "variant": s.variant, "calls": s.calls, "us_per_call": round(s.us_per_call, 3),
            "total_ms": round(s.total_us / 1e3, 4), "roofline_ms": round(s.roofline_us / 1e3, 4), "source": s.source}


def generation(report: Mapping[str, Any], new_tokens: int) -> dict[str, float]:
    """End-to-end latency (prefill + ``new_tokens`` decode steps) and decode throughput (estimates)."""
    latency = report["prefill_ms"] + new_tokens * report["decode_ms_per_token"]
    return {"new_tokens": new_tokens, "latency_ms": latency, "tok_s": 1e3 / report["decode_ms_per_token"]}
