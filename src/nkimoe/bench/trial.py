"""Run one variant on one problem: verify it against the op's reference on seeded random inputs and,
for NKI variants off-hardware, estimate its time from the emulator trace."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nkimoe.bench.costmodel import Estimate, estimate
from nkimoe.nki import EMULATED
from nkimoe.nki.emulator import session
from nkimoe.ops import DTYPES, Problem, compare, get_op
from nkimoe.registry import Variant
from nkimoe.targets import Target


@dataclass(frozen=True)
class Trial:
    variant: str
    problem: Problem
    target: str
    ok: bool
    detail: str  #: the comparison's verdict, or why the run failed
    estimate: Estimate | None = None


def make_inputs(problem: Problem, seed: int) -> tuple[tuple, dict]:
    gen = torch.Generator().manual_seed(seed)
    return get_op(problem.op).make_inputs(problem.dim, DTYPES[problem.dtype], gen)


def run_trial(variant: Variant, problem: Problem, target: Target, *, seed: int = 0) -> Trial:
    """Verify ``variant`` on ``problem`` for ``target``; never raises for a failing variant."""
    args, kwargs = make_inputs(problem, seed)
    expected = get_op(problem.op).reference(*args, **kwargs)
    tolerance = variant.tolerance_for(problem.dtype)
    if tolerance is None:
        return Trial(variant.name, problem, target.name, False, f"no tolerance declared for {problem.dtype}")
    est = None
    try:
        args = variant.prepare_args(args)  # load-time re-layout, outside the timed kernel
        if variant.nki and EMULATED:
            with session(target) as s:
                actual = variant.kernel(*args, **kwargs)
            est = estimate(s.trace, target)
        else:
            actual = variant.kernel(*args, **kwargs)
    except Exception as exc:  # a failing candidate is rejected, not fatal
        return Trial(variant.name, problem, target.name, False, f"raised {type(exc).__name__}: {exc}")
    ok, detail = compare(actual, expected, *tolerance)
    return Trial(variant.name, problem, target.name, ok, detail, est)
