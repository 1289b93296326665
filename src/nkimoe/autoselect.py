"""Load-time binding: detect the target, read the benchmark cache, bind every call site once."""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

from nkimoe.bench.cache import BenchCache
from nkimoe.ops import Problem
from nkimoe.plugins import get_registry, load_registry
from nkimoe.registry import Binding, Registry, default_policy
from nkimoe.targets import Detection, detect


def bind_model(problems: Mapping[str, Problem], *, env: Mapping[str, str] | None = None,
               registry: Registry | None = None) -> tuple[Binding, Detection]:
    """Bind ``problems`` for the detected target with the cache's winners and ``NKIMOE_POLICY``.

    Plugins load from ``env`` when it is given (else the process-wide registry is used).

    Problems with plugins, the cache file or stale entries are reported in one summary warning;
    none of them makes loading fail.
    """
    if registry is None:
        registry = get_registry() if env is None else load_registry(env)
    env = os.environ if env is None else env
    detection = detect(env, known=registry.targets)
    cache = BenchCache.load(env, targets=(detection.target.family,))  # the shipped table this target reads
    binding = registry.bind(detection.target, problems, policy=default_policy(env), cache=cache)
    notes = [*registry.problems, *cache.problems, *binding.warnings]
    if notes:
        warnings.warn(f"nkimoe: {len(notes)} binding note(s): " + "; ".join(notes), stacklevel=2)
    return binding, detection
