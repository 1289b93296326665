"""``nkimoe bench select``: verify every candidate of every op at the model's shapes, time the
survivors, and record the winners in the benchmark cache.

Off-hardware, candidates run in the NKI emulator and their time is the cost-model ESTIMATE of
their trace. On a Trainium host with the real SDK, candidates run on the device and are timed
(warm-up, repetitions, median and spread): the method is recorded per entry.

A composite problem's candidates are its fused variants and its chain: the chain's time is the sum
of the times of the variants its parts bind (the cache's records, or a fresh run where the cache
has none) plus ``CHAIN_BOUNDARY_US`` per boundary; it is recorded as the candidate ``chain`` and
wins where no fused variant is faster. Composite problems are selected after the plain ones, so
that their parts' fresh selections decide the chain.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nkimoe.bench.cache import entry_key, make_entry
from nkimoe.bench.trial import Trial, make_inputs, run_trial
from nkimoe.nki import EMULATED
from nkimoe.ops import Problem, get_op
from nkimoe.registry import CHAIN, CHAIN_BOUNDARY_US, CacheLookup, Registry, Variant
from nkimoe.shapes import ModelShapes, call_sites, neuron_call_sites
from nkimoe.targets import Target

WARMUP, REPEATS = 3, 10


@dataclass
class CandidateResult:
    variant: str
    status: str  #: "ok", "rejected: <reason>", "ineligible: <reason>"
    time_us: float | None = None
    spread_us: float | None = None
    method: str = ""
    source_hash: str = ""
    bound_by: str = ""
    busy_us: dict[str, float] = field(default_factory=dict)  #: per engine, for estimates
    parts: list[str] = field(default_factory=list)  #: a composite's chain: the variants of its parts


@dataclass
class Selection:
    problem: Problem
    sites: list[str]
    candidates: list[CandidateResult] = field(default_factory=list)
    winner: str | None = None  #: None when no candidate was verified (the reference falls back)
    winner_hash: str = ""
    method: str = ""

    @property
    def verified(self) -> list[CandidateResult]:
        return [c for c in self.candidates if c.status == "ok"]


def default_problems(shapes: ModelShapes, seq_len: int = 1024, prefill_tokens: Iterable[int] = (128,),
                     dtype: str = "bfloat16", tp: int = 1) -> dict[Problem, list[str]]:
    """Distinct problems of the model's prefill (``seq_len`` and each of ``prefill_tokens`` tokens)
    and decode (a cache of ``seq_len``) phases, with the call sites that issue each: the portable
    model's at ``tp`` 1, one rank's of the Neuron path at tensor parallelism ``tp`` > 1."""
    def sites_of(phase: str, tokens: int) -> dict[str, Problem]:
        return call_sites(shapes, phase, tokens, dtype) if tp == 1 else neuron_call_sites(shapes, tp, phase, tokens, dtype)

    sites: dict[str, Problem] = {}
    for tokens in dict.fromkeys([seq_len, *prefill_tokens]):
        sites.update({f"{s}@{tokens}": p for s, p in sites_of("prefill", tokens).items()})
    sites.update(sites_of("decode", seq_len))
    grouped: dict[Problem, list[str]] = {}
    for site, problem in sites.items():
        grouped.setdefault(problem, []).append(site)
    return grouped


def _measure(variant: Variant, problem: Problem) -> tuple[float, float]:
    """Median and spread (max - min) in microseconds of the variant on the device."""
    args, kwargs = make_inputs(problem, seed=0)
    args = variant.prepare_args(args)
    for _ in range(WARMUP):
        variant.kernel(*args, **kwargs)
    samples = []
    for _ in range(REPEATS):
        start = time.perf_counter()
        variant.kernel(*args, **kwargs)
        samples.append((time.perf_counter() - start) * 1e6)
    return statistics.median(samples), max(samples) - min(samples)


def chain_result(registry: Registry, target: Target, problem: Problem, policy: str,
                 cache: CacheLookup | None) -> CandidateResult:
    """A composite's chain as a candidate: the parts bound as the cache binds them, each timed by its
    cache record or, without one, by a fresh trial (rejected if a part fails its verification)."""
    parts, _, _ = registry.bind_chain(problem.op, target, problem, policy, cache)
    total, method = CHAIN_BOUNDARY_US * (len(parts) - 1), "estimate"
    for part in parts:
        v = part.variant
        recorded = cache.cost_us(target, part.problem, policy, v.name, v.source_hash) if cache is not None else None
        if recorded is None:
            measured = select_problem(registry, target, part.problem, [part.site], policy, only=v.name)
            timed = next((c for c in measured.verified if c.time_us is not None), None)
            if timed is None:
                return CandidateResult(CHAIN, f"rejected: part {part.site} ({v.name}) has no verified time")
            recorded, method = timed.time_us, timed.method if timed.method == "hardware" else method
        total += recorded
    return CandidateResult(CHAIN, "ok", total, None, method, parts=[p.variant.name for p in parts])


def select_problem(registry: Registry, target: Target, problem: Problem, sites: list[str], policy: str,
                   seed: int = 0, *, only: str | None = None, cache: CacheLookup | None = None) -> Selection:
    """Verify and time every candidate of one problem (or only the variant named ``only``); the fastest
    verified one wins. A composite's chain competes, its parts' times taken from ``cache``."""
    result = Selection(problem, sites)
    for candidate in registry.candidates(target, problem, policy):
        v = candidate.variant
        if only is not None and v.name != only:
            continue
        if not candidate.eligible:
            result.candidates.append(CandidateResult(v.name, f"ineligible: {candidate.reason}", source_hash=v.source_hash))
            continue
        trial: Trial = run_trial(v, problem, target, seed=seed)
        if not trial.ok:
            result.candidates.append(CandidateResult(v.name, f"rejected: {trial.detail}", source_hash=v.source_hash))
            continue
        if v.nki and not EMULATED:
            median, spread = _measure(v, problem)
            result.candidates.append(CandidateResult(v.name, "ok", median, spread, "hardware", v.source_hash))
        elif trial.estimate is not None:
            est = trial.estimate
            result.candidates.append(CandidateResult(v.name, "ok", est.micros, None, "estimate", v.source_hash,
                                                     est.bound_by, est.busy_us))
        else:
            result.candidates.append(CandidateResult(v.name, "ok", None, None, "unmeasured", v.source_hash))
    if get_op(problem.op).is_composite and only is None:
        result.candidates.append(chain_result(registry, target, problem, policy, cache))
    timed = [c for c in result.verified if c.time_us is not None]
    if timed:
        best = min(timed, key=lambda c: (c.time_us, c.variant))
        result.winner, result.winner_hash, result.method = best.variant, best.source_hash, best.method
    return result


def run_select(registry: Registry, target: Target, problems: Mapping[Problem, list[str]], policy: str, *,
               starting: Callable[[Problem], None] | None = None,
               finished: Callable[[Selection], None] | None = None,
               cache: Callable[[], CacheLookup] | None = None) -> list[Selection]:
    """Select every problem in turn, composites last; ``starting`` hears of each problem before it
    runs and ``finished`` gets each selection as soon as it is made (to save it, or show progress);
    ``cache`` gives the cache as it stands (read again before each composite, after its parts)."""
    selections = []
    for problem, sites in sorted(problems.items(), key=lambda item: get_op(item[0].op).is_composite):
        if starting is not None:
            starting(problem)
        current = cache() if cache is not None and get_op(problem.op).is_composite else None
        selection = select_problem(registry, target, problem, sites, policy, cache=current)
        if finished is not None:
            finished(selection)
        selections.append(selection)
    return selections


def cache_entries(target: Target, selections: Iterable[Selection], policy: str) -> dict[str, dict[str, Any]]:
    """Cache entries for every selection: the winner (None when no candidate was verified and timed)
    and the verification verdict of every candidate that ran, winner or not."""
    entries = {}
    for s in selections:
        candidates = [
            {"variant": c.variant, "status": c.status, "time_us": None if c.time_us is None else round(c.time_us, 3),
             "spread_us": None if c.spread_us is None else round(c.spread_us, 3), "method": c.method,
             "source_hash": c.source_hash,
             **({"bound_by": c.bound_by, "busy_us": {e: round(t, 3) for e, t in c.busy_us.items()}}
                if c.busy_us else {}),
             **({"parts": c.parts} if c.parts else {})}
            for c in s.candidates
            if not c.status.startswith("ineligible")
        ]
        entries[entry_key(target, s.problem, policy)] = make_entry(target, s.problem, policy, s.winner, s.winner_hash,
                                                                   s.method, candidates)
    return entries
