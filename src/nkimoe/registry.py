"""The variant registry: :class:`Variant` records, their eligibility, and load-time binding.

``bind(target, problems)`` resolves each call site once to a plain callable, keeping the reason
for every choice: a benchmark-cache winner, else the highest-priority eligible variant, else the
op's torch reference (the fallback on every target). A variant from a non-builtin plugin is a
candidate only where the cache records a passing verification of its current source for that
problem (builtin variants are verified by the shipped tables and the test suite).
"""

from __future__ import annotations

import hashlib
import inspect
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal, Protocol

from nkimoe.ops import DTYPES, OP_NAMES, Problem, get_op
from nkimoe.targets import Target, TargetError, resolve

Exactness = Literal["bitexact", "tolerance"]
POLICIES: tuple[str, ...] = ("fastest", "bitexact")
Supports = Callable[[Mapping[str, int], str, Target], "tuple[bool, str]"]
#: The name a composite's chain of part variants goes by in the benchmark cache and in explain.
CHAIN = "chain"
#: Estimated cost of one op boundary inside a chain, on top of the parts' own estimates: zero. Each
#: part's estimate already runs from its first input DMA to the completion of its last output store,
#: so the HBM round trip of the activations across a boundary (the producer's store, the consumer's
#: load, each with the DMA fixed latency of nki/deep-dives/nki-dma-bandwidth-guide.rst) is counted
#: in the parts; the parts run back to back without overlap (as ``nkimoe estimate`` adds them), and
#: no AWS document gives a further fixed cost per kernel boundary inside one graph.
CHAIN_BOUNDARY_US = 0.0


class RegistryError(ValueError):
    """An invalid variant declaration, duplicate name, or unknown name asked of the registry."""


def default_policy(env: Mapping[str, str] | None = None) -> str:
    """The selection policy from ``NKIMOE_POLICY`` (``fastest`` when unset)."""
    value = ((os.environ if env is None else env).get("NKIMOE_POLICY") or "fastest").strip()
    if value not in POLICIES:
        raise RegistryError(f"unknown policy {value!r} from NKIMOE_POLICY; valid: {', '.join(POLICIES)}")
    return value


def _always(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    return True, "any shape"


def source_hash(obj: Any) -> str:
    """A short hash of the source of the module defining ``obj`` and of the sibling modules it uses
    (same parent package, e.g. shared kernel helpers), so that an edit to a kernel or its helpers
    changes the hash that cache entries are checked against."""
    module = inspect.getmodule(obj)
    if module is None:
        return hashlib.sha256(repr(obj).encode()).hexdigest()[:16]
    parent = module.__name__.rpartition(".")[0]
    used = {module}
    for value in vars(module).values():
        other = inspect.getmodule(value)
        if other is not None and parent and other.__name__.rpartition(".")[0] == parent:
            used.add(other)
    digest = hashlib.sha256()
    for each in sorted(used, key=lambda m: m.__name__):
        try:
            digest.update(inspect.getsource(each).encode())
        except (OSError, TypeError):
            digest.update(repr(each).encode())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class Variant:
    """One implementation of one op.

    ``kernel`` takes the op's reference arguments (torch tensors) and returns what the reference
    returns; for an NKI variant it is the launcher that runs the NKI kernel (on the device, or in
    the emulator off-hardware). ``targets`` lists target families. ``tolerance`` maps a dtype name
    to ``(atol, rtol)`` against the reference; ``exactness="bitexact"`` declares that the output
    equals the reference bit for bit.
    """

    op: str
    name: str
    targets: tuple[str, ...]
    kernel: Callable[..., Any]
    nki: bool
    priority: int = 0
    supports: Supports = _always
    tolerance: Mapping[str, tuple[float, float]] = field(default_factory=dict)
    exactness: Exactness = "tolerance"
    description: str = ""
    #: One-time re-layout of weight arguments at load time, by argument name: the kernel then
    #: receives ``prepare[name](weight)`` in place of the weight (part of the variant, verified with it).
    prepare: Mapping[str, Callable[[Any], Any]] = field(default_factory=dict)
    source_hash: str = ""
    plugin: str = ""

    def __post_init__(self) -> None:
        where = f"variant {self.name!r}"
        if self.op not in OP_NAMES:
            raise RegistryError(f"{where}: unknown op {self.op!r}; valid ops: {', '.join(OP_NAMES)}")
        if not self.name or not self.name.replace("_", "").replace("-", "").isalnum():
            raise RegistryError(f"{where}: a name is letters, digits, '_' and '-' only")
        if isinstance(self.targets, str) or not self.targets:
            raise RegistryError(f"{where}: targets must be a non-empty tuple of target families")
        if not callable(self.kernel):
            raise RegistryError(f"{where}: kernel {self.kernel!r} is not callable")
        if self.exactness not in ("bitexact", "tolerance"):
            raise RegistryError(f"{where}: exactness {self.exactness!r} is not 'bitexact' or 'tolerance'")
        bad = [d for d in self.tolerance if d not in DTYPES]
        if bad:
            raise RegistryError(f"{where}: tolerance for unknown dtypes {bad}; valid: {', '.join(DTYPES)}")
        if self.exactness == "tolerance" and not self.tolerance:
            raise RegistryError(f"{where}: declare a tolerance per dtype or exactness='bitexact'")
        if self.nki and "cpu" in self.targets:
            raise RegistryError(f"{where}: an NKI variant cannot target 'cpu'")
        names = get_op(self.op).arg_names if self.op in OP_NAMES else ()
        bad = [n for n in self.prepare if n not in names]
        if bad:
            raise RegistryError(f"{where}: prepare names unknown arguments {bad}; {self.op} takes {', '.join(names)}")
        if not self.source_hash:
            object.__setattr__(self, "source_hash", source_hash(self.kernel))

    def prepare_args(self, args: tuple[Any, ...]) -> tuple[Any, ...]:
        """The op's positional arguments with each prepared weight re-laid-out."""
        if not self.prepare:
            return args
        names = get_op(self.op).arg_names
        return tuple(self.prepare_arg(n, a) for n, a in zip(names, args))

    def prepare_arg(self, name: str, value: Any) -> Any:
        """Argument ``name``'s ``value`` in the layout the variant loads it in (``value`` itself where
        the variant prepares nothing for it)."""
        convert = self.prepare.get(name)
        return value if convert is None else convert(value)

    def tolerance_for(self, dtype: str) -> tuple[float, float] | None:
        """``(atol, rtol)`` for ``dtype``, ``(0, 0)`` when bit-exact, ``None`` when undeclared."""
        if self.exactness == "bitexact":
            return (0.0, 0.0)
        return self.tolerance.get(dtype)


class CacheLookup(Protocol):
    """What :meth:`Registry.bind` asks of a benchmark cache."""

    def winner(self, target: Target, problem: Problem, policy: str) -> CacheHit | None: ...

    def verified(self, target: Target, problem: Problem, policy: str, variant: str, source_hash: str) -> bool: ...

    def cost_us(self, target: Target, problem: Problem, policy: str, variant: str, source_hash: str) -> float | None:
        """The recorded time of ``variant`` at ``source_hash`` on the problem (``CHAIN``: the chain's
        recorded sum, any hash), or None."""
        ...


@dataclass(frozen=True)
class CacheHit:
    variant: str
    source_hash: str
    key: str  #: the cache key that decided, for explain()
    method: str  #: "hardware" or "estimate"


@dataclass(frozen=True)
class Candidate:
    variant: Variant
    eligible: bool
    reason: str


@dataclass(frozen=True)
class BoundOp:
    """A resolved call site: ``fn`` is the variant's plain callable.

    A composite site bound to its chain has ``parts`` (one bound part site each, in call order) and
    the composite's reference as ``variant`` (what the chain computes); its ``fn`` calls the parts'
    variants, preparing their weights on every call (callers on a hot path call the parts with
    weights prepared once instead). ``fused_us`` and ``chain_us`` are the costs the binder compared.
    """

    site: str
    problem: Problem
    variant: Variant
    decided_by: Literal["cache", "priority", "fallback"]
    reason: str
    parts: tuple[BoundOp, ...] = ()
    fused_us: float | None = None
    chain_us: float | None = None

    @property
    def is_chain(self) -> bool:
        return bool(self.parts)

    @property
    def name(self) -> str:
        """The bound variant's name, or ``chain(<part variants>)``."""
        if self.parts:
            return f"{CHAIN}({', '.join(p.variant.name for p in self.parts)})"
        return self.variant.name

    @property
    def fn(self) -> Callable[..., Any]:
        if not self.parts:
            return self.variant.kernel
        prepared = [(lambda *a, _v=p.variant, **k: _v.kernel(*_v.prepare_args(a), **k)) for p in self.parts]
        compose = get_op(self.problem.op).compose
        assert compose is not None  # parts are only bound for a composite
        return compose(*prepared)


@dataclass(frozen=True)
class Binding:
    target: Target
    policy: str
    ops: Mapping[str, BoundOp]
    warnings: tuple[str, ...] = ()

    def __getitem__(self, site: str) -> Callable[..., Any]:
        return self.ops[site].fn

    def summary(self) -> list[tuple[str, str, str, str]]:
        """Rows ``(site, variant, decided_by, reason)`` in site order."""
        return [(s, b.name, b.decided_by, b.reason) for s, b in self.ops.items()]

    def fused(self, site: str) -> bool:
        """Whether ``site`` is bound and runs one variant (a plain op, or a composite's fused variant)."""
        return site in self.ops and not self.ops[site].is_chain

    def runs(self, site: str) -> bool:
        """Whether ``site`` issues calls of its own in a pass: not a composite bound to its chain, nor a
        part site every composite of its phase that lists it replaces with a fused variant."""
        if not self.fused(site):
            return False
        phase, _, name = site.rpartition(".")
        users = [b for s, b in self.ops.items() if s.rpartition(".")[0] == phase and name in b.problem.parts]
        return not users or any(b.is_chain for b in users)


@dataclass
class Registry:
    """Targets and variants contributed by plugins, with the problems met while loading them."""

    targets: dict[str, Target] = field(default_factory=dict)
    variants: dict[str, Variant] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    plugins: list[Any] = field(default_factory=list)
    #: Plugins whose variants bind without a verification in the cache (the package's own).
    builtin_plugins: frozenset[str] = frozenset()

    # --- contribution ------------------------------------------------------------------------
    def add_target(self, target: Target, plugin: str) -> None:
        if not isinstance(target, Target):
            raise RegistryError(f"plugin {plugin!r} registered {target!r}, which is not a nkimoe.targets.Target")
        if target.name in self.targets:
            raise RegistryError(f"plugin {plugin!r}: target {target.name!r} is already registered")
        self.targets[target.name] = target

    def add_variant(self, variant: Variant, plugin: str) -> None:
        if not isinstance(variant, Variant):
            raise RegistryError(f"plugin {plugin!r} registered {variant!r}, which is not a nkimoe.registry.Variant")
        families = {t.family for t in self.targets.values()}
        unknown = [t for t in variant.targets if t not in families]
        if unknown:
            raise RegistryError(
                f"plugin {plugin!r}: variant {variant.name!r} targets unknown families {unknown}; "
                f"known: {', '.join(sorted(families))}"
            )
        existing = self.variants.get(variant.name)
        if existing is not None:
            raise RegistryError(
                f"variant name {variant.name!r} from plugin {plugin!r} collides with the one "
                f"from plugin {existing.plugin!r}; rename one of them"
            )
        self.variants[variant.name] = replace(variant, plugin=plugin)

    # --- queries -----------------------------------------------------------------------------
    def target(self, name: str) -> Target:
        try:
            return resolve(name, self.targets)
        except TargetError as exc:
            raise RegistryError(str(exc)) from None

    def for_op(self, op: str) -> list[Variant]:
        get_op(op)
        return sorted((v for v in self.variants.values() if v.op == op), key=lambda v: (-v.priority, v.name))

    def reference(self, op: str) -> Variant:
        return self.variants[f"ref_{op}"]

    def candidates(self, target: Target, problem: Problem, policy: str = "fastest") -> list[Candidate]:
        """Every variant of the problem's op with whether it may run on ``target`` and why."""
        if policy not in POLICIES:
            raise RegistryError(f"unknown policy {policy!r}; valid: {', '.join(POLICIES)}")
        rows = []
        composite = get_op(problem.op).is_composite
        for v in self.for_op(problem.op):
            if composite and v.name == f"ref_{problem.op}":
                continue  # a composite's reference is its chain of references, bound as the chain
            ok, reason = self._eligible(v, target, problem, policy)
            rows.append(Candidate(v, ok, reason))
        return rows

    @staticmethod
    def _eligible(v: Variant, target: Target, problem: Problem, policy: str) -> tuple[bool, str]:
        if target.family not in v.targets:
            return False, f"built for {', '.join(v.targets)}, not {target.name}"
        if policy == "bitexact" and v.exactness != "bitexact":
            return False, "policy bitexact: variant is only within tolerance"
        if v.tolerance_for(problem.dtype) is None:
            return False, f"no tolerance declared for {problem.dtype}"
        try:
            ok, reason = v.supports(problem.dim, problem.dtype, target)
        except Exception as exc:  # a plugin's supports() must never break binding
            return False, f"supports() raised {type(exc).__name__}: {exc}"
        return bool(ok), reason

    # --- binding -----------------------------------------------------------------------------
    def bind(
        self,
        target: Target | str,
        problems: Mapping[str, Problem],
        *,
        policy: str = "fastest",
        cache: CacheLookup | None = None,
    ) -> Binding:
        """Resolve every call site in ``problems`` to a variant, once."""
        target = self.target(target) if isinstance(target, str) else target
        ops: dict[str, BoundOp] = {}
        notes: list[str] = []
        for site, problem in problems.items():
            bound, note = self._bind_one(site, target, problem, policy, cache)
            ops[site] = bound
            if note:
                notes.append(note)
        return Binding(target, policy, ops, tuple(dict.fromkeys(notes)))  # a composite repeats its parts' notes

    def _bind_one(
        self, site: str, target: Target, problem: Problem, policy: str, cache: CacheLookup | None
    ) -> tuple[BoundOp, str | None]:
        if get_op(problem.op).is_composite:
            return self._bind_composite(site, target, problem, policy, cache)
        candidates = self.load_candidates(target, problem, policy, cache)
        eligible = {c.variant.name: c.variant for c in candidates if c.eligible}
        note = None
        hit = cache.winner(target, problem, policy) if cache is not None else None
        if hit is not None:
            chosen, known = eligible.get(hit.variant), self.variants.get(hit.variant)
            if known is not None and known.source_hash != hit.source_hash:
                note = f"{site}: cached winner {hit.variant!r} ({hit.key}) has a stale source hash"
            elif chosen is None:
                note = f"{site}: cached winner {hit.variant!r} ({hit.key}) is unknown or not eligible"
            else:
                reason = f"benchmark cache ({hit.method}) entry {hit.key}"
                return BoundOp(site, problem, chosen, "cache", reason), None
        if eligible:
            chosen = next(iter(eligible.values()))
            reason = f"highest priority ({chosen.priority}) eligible on {target.name}"
            if cache is not None and hit is None:
                reason += "; no cache entry"
            return BoundOp(site, problem, chosen, "priority", reason), note
        rejected = "; ".join(f"{c.variant.name}: {c.reason}" for c in candidates) or "no variants"
        reason = f"no eligible variant on {target.name} ({rejected}); torch reference"
        return BoundOp(site, problem, self.reference(problem.op), "fallback", reason), note

    def bind_chain(
        self, site: str, target: Target, problem: Problem, policy: str, cache: CacheLookup | None
    ) -> tuple[tuple[BoundOp, ...], float | None, list[str]]:
        """A composite's parts bound as their own sites (``<phase>.<part>`` beside ``site``), the chain's
        cost from the cache (the parts' recorded times plus ``CHAIN_BOUNDARY_US`` per boundary; None
        when a part has no recorded time) and the parts' binding notes."""
        prefix = site.rpartition(".")[0]
        parts: list[BoundOp] = []
        notes: list[str] = []
        total: float | None = 0.0
        for name, part in problem.parts.items():
            bound, note = self._bind_one(f"{prefix}.{name}" if prefix else name, target, part, policy, cache)
            parts.append(bound)
            notes.extend([note] if note else [])
            cost = None if cache is None else cache.cost_us(target, part, policy, bound.variant.name,
                                                            bound.variant.source_hash)
            total = None if cost is None or total is None else total + cost
        if total is not None:
            total += CHAIN_BOUNDARY_US * (len(parts) - 1)
        return tuple(parts), total, notes

    def _bind_composite(
        self, site: str, target: Target, problem: Problem, policy: str, cache: CacheLookup | None
    ) -> tuple[BoundOp, str | None]:
        """A composite site: its fastest fused variant or its chain, by the cache's costs; without
        them the highest-priority eligible fused variant, else the chain."""
        parts, chain_us, notes = self.bind_chain(site, target, problem, policy, cache)
        reference = self.reference(problem.op)
        candidates = self.load_candidates(target, problem, policy, cache)
        eligible = {c.variant.name: c.variant for c in candidates if c.eligible}
        hit = cache.winner(target, problem, policy) if cache is not None else None
        fused = None
        if hit is not None and hit.variant != CHAIN:
            known = self.variants.get(hit.variant)
            if known is not None and known.source_hash != hit.source_hash:
                notes.append(f"{site}: cached winner {hit.variant!r} ({hit.key}) has a stale source hash")
            elif hit.variant not in eligible:
                notes.append(f"{site}: cached winner {hit.variant!r} ({hit.key}) is unknown or not eligible")
            else:
                fused = eligible[hit.variant]
        note = "; ".join(notes) or None
        if fused is not None:
            fused_us = cache.cost_us(target, problem, policy, fused.name, fused.source_hash) if cache else None
            if chain_us is None and cache is not None:
                chain_us = cache.cost_us(target, problem, policy, CHAIN, "")
            if fused_us is not None and chain_us is not None and chain_us <= fused_us:
                reason = (f"benchmark cache ({hit.method}) {hit.key}: chain {chain_us:.2f} us <= {fused.name} "
                          f"{fused_us:.2f} us")
                return BoundOp(site, problem, reference, "cache", reason, parts, fused_us, chain_us), note
            costs = "" if fused_us is None or chain_us is None else f": {fused_us:.2f} us < chain {chain_us:.2f} us"
            reason = f"benchmark cache ({hit.method}) entry {hit.key}{costs}"
            return BoundOp(site, problem, fused, "cache", reason, (), fused_us, chain_us), note
        if hit is not None and hit.variant == CHAIN:
            reason = f"benchmark cache ({hit.method}) entry {hit.key}: the chain beat every fused variant"
            return BoundOp(site, problem, reference, "cache", reason, parts, None, chain_us), note
        if eligible:
            chosen = next(iter(eligible.values()))
            reason = f"fused variant of highest priority ({chosen.priority}) eligible on {target.name}"
            if cache is not None:
                reason += "; no cache entry"
            return BoundOp(site, problem, chosen, "priority", reason, (), None, chain_us), note
        rejected = "; ".join(f"{c.variant.name}: {c.reason}" for c in candidates) or "no fused variants"
        reason = f"chain of its parts: no eligible fused variant on {target.name} ({rejected})"
        return BoundOp(site, problem, reference, "fallback", reason, parts, None, chain_us), note

    def load_candidates(
        self, target: Target, problem: Problem, policy: str, cache: CacheLookup | None
    ) -> list[Candidate]:
        """:meth:`candidates` as binding sees them: an eligible variant of a non-builtin plugin stays
        eligible only where ``cache`` records a passing verification of its current source."""
        rows = []
        for c in self.candidates(target, problem, policy):
            v = c.variant
            if c.eligible and v.plugin not in self.builtin_plugins and not (
                    cache is not None and cache.verified(target, problem, policy, v.name, v.source_hash)):
                c = Candidate(v, False, f"plugin {v.plugin!r}: no passing verification of this source for this "
                                        f"problem in the benchmark cache (run nkimoe bench select)")
            rows.append(c)
        return rows

    def explain(
        self, target: Target | str, problem: Problem, *, policy: str = "fastest", cache: CacheLookup | None = None
    ) -> tuple[list[Candidate], BoundOp]:
        """Every candidate with its eligibility at load, and the call site it would bind."""
        target = self.target(target) if isinstance(target, str) else target
        bound, _ = self._bind_one(problem.op, target, problem, policy, cache)
        return self.load_candidates(target, problem, policy, cache), bound


def reference_variant(op: str) -> Variant:
    """The torch reference of ``op`` as a variant: runs anywhere torch does, bit-exact by definition."""
    contract = get_op(op)
    return Variant(
        op=op,
        name=f"ref_{op}",
        targets=("cpu",),
        kernel=contract.reference,
        nki=False,
        priority=0,
        exactness="bitexact",
        description=f"torch reference: {contract.summary}",
    )


