"""The ``nkimoe`` command line."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from tabulate import tabulate

from nkimoe import __version__
from nkimoe.ops import OP_NAMES, OpError
from nkimoe.plugins import get_registry
from nkimoe.bench.trial import run_trial
from nkimoe.ops import Problem
from nkimoe.registry import POLICIES, Candidate, Registry, RegistryError
from nkimoe.targets import Target
from nkimoe.shapes import ModelShapes, call_sites
from nkimoe.targets import TargetError, detect


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit status 2."""


def _registry() -> Registry:
    registry = get_registry()
    for problem in registry.problems:
        print(f"nkimoe: warning: {problem}", file=sys.stderr)
    return registry


def _emit(rows: list[dict[str, Any]], fmt: str, headers: Sequence[str] | None = None) -> None:
    if fmt == "json":
        print(json.dumps(rows, indent=2))
        return
    headers = list(headers or (rows[0].keys() if rows else []))
    table = [[_cell(row.get(h)) for h in headers] for row in rows]
    print(tabulate(table, headers=headers, tablefmt="simple"))


def _cell(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    if isinstance(value, bool):
        return "yes" if value else "no"
    return value


def _check_op(op: str) -> str:
    if op not in OP_NAMES:
        raise UsageError(f"unknown op {op!r}; valid ops: {', '.join(OP_NAMES)}")
    return op


def cmd_target(args: argparse.Namespace) -> int:
    found = detect(known=_registry().targets)
    if args.format == "json":
        print(json.dumps({"target": found.target.name, "source": found.source,
                          "evidence": list(found.evidence), "warnings": list(found.warnings)}, indent=2))
        return 0
    print(f"target: {found.target.name} ({found.target.description})")
    print(f"decided by: {found.source}")
    for item in found.evidence:
        print(f"  evidence: {item}")
    for note in found.warnings:
        print(f"  warning: {note}")
    return 0


def cmd_registry_list(args: argparse.Namespace) -> int:
    registry = _registry()
    variants = registry.for_op(_check_op(args.op)) if args.op else sorted(
        registry.variants.values(), key=lambda v: (OP_NAMES.index(v.op), -v.priority, v.name)
    )
    if args.target:
        family = registry.target(args.target).family
        variants = [v for v in variants if family in v.targets]
    rows = [
        {"op": v.op, "name": v.name, "targets": list(v.targets), "nki": v.nki, "priority": v.priority,
         "exactness": v.exactness, "plugin": v.plugin, "description": v.description}
        for v in variants
    ]
    _emit(rows, args.format, ["op", "name", "targets", "nki", "priority", "exactness", "plugin", "description"])
    return 0


def cmd_registry_explain(args: argparse.Namespace) -> int:
    registry = _registry()
    op = _check_op(args.op)
    target = registry.target(args.target)
    shapes = ModelShapes.from_hf_config(args.config) if args.config else ModelShapes()
    phase = "decode" if args.tokens == 1 else "prefill"
    length = args.context if phase == "decode" else args.tokens
    problems = {p for p in call_sites(shapes, phase, length, args.dtype).values() if p.op == op}
    if not problems:
        raise UsageError(f"op {op!r} has no call site in the {phase} phase; try --tokens 1 or --tokens >1")
    out = []
    for problem in sorted(problems, key=lambda p: p.signature):
        candidates, bound = registry.explain(target, problem, policy=args.policy)
        rows = [
            {"variant": c.variant.name, "nki": c.variant.nki, "priority": c.variant.priority,
             "eligible": c.eligible, "reason": c.reason, "binds": c.variant.name == bound.variant.name,
             **_estimate_columns(c, problem, target, args.estimate)}
            for c in candidates
        ]
        if not any(r["binds"] for r in rows):
            ref = bound.variant
            rows.append({"variant": ref.name, "nki": ref.nki, "priority": ref.priority, "eligible": True,
                         "reason": "reference fallback", "binds": True})
        out.append({"problem": str(problem), "macs": problem.macs, "target": target.name,
                    "binds": bound.variant.name, "decided_by": bound.decided_by, "why": bound.reason,
                    "candidates": rows})
    if args.format == "json":
        print(json.dumps(out, indent=2))
        return 0
    columns = ["variant", "nki", "priority", "eligible", "binds", "est_us", "bound_by", "verified", "reason"]
    for block in out:
        print(f"{block['problem']} on {block['target']} ({block['macs']:,} MACs; est_us = cost-model estimate)")
        _emit(block["candidates"], "table", columns if args.estimate else columns[:5] + columns[-1:])
        print(f"binds {block['binds']}: {block['why']}\n")
    return 0


def _estimate_columns(candidate: Candidate, problem: Problem, target: Target, wanted: bool) -> dict[str, Any]:
    """Verification verdict and cost-model estimate of an eligible NKI candidate on a Neuron target."""
    if not (wanted and candidate.eligible and candidate.variant.nki and target.is_neuron):
        return {"est_us": None, "bound_by": None, "verified": None}
    trial = run_trial(candidate.variant, problem, target)
    est = trial.estimate
    return {
        "est_us": round(est.micros, 2) if est else None,
        "bound_by": est.bound_by if est else None,
        "verified": "yes" if trial.ok else f"no: {trial.detail}",
        "method": est.method if est else None,
    }


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nkimoe",
        description="Kernel variant registry for Qwen3-30B-A3B on AWS Trainium2 (trn2) and Trainium3 (trn3).",
    )
    parser.add_argument("--version", action="version", version=f"nkimoe {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("target", help="show the detected target and the evidence for it",
                       description="Detect the target: NKIMOE_TARGET, then NEURON_PLATFORM_TARGET_OVERRIDE, "
                                   "then local device probes, else cpu.")
    p.add_argument("--format", choices=("text", "json"), default="text")
    p.set_defaults(func=cmd_target)

    reg = sub.add_parser("registry", help="list registered variants or explain a binding")
    reg_sub = reg.add_subparsers(dest="registry_command", metavar="SUBCOMMAND", required=True)
    p = reg_sub.add_parser("list", help="list variants (all, or one op's, or one target's)")
    p.add_argument("--op", help=f"only this op ({', '.join(OP_NAMES)})")
    p.add_argument("--target", help="only variants that run on this target (trn2, trn3, cpu)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_registry_list)

    p = reg_sub.add_parser("explain", help="every candidate for an op on a target, eligible or not, and the winner",
                           description="For each call site of OP at the model's shapes, list every variant "
                                       "with its eligibility on the target and the variant that binds.")
    p.add_argument("op", help=f"one of {', '.join(OP_NAMES)}")
    p.add_argument("--target", required=True, help="trn2, trn3 or cpu")
    p.add_argument("--tokens", type=int, default=1, help="1 for a decode step, >1 for a prefill of N tokens")
    p.add_argument("--context", type=int, default=1024, help="KV-cache length for decode attention (default 1024)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--policy", choices=POLICIES, default="fastest")
    p.add_argument("--config", help="an HF config.json of a Qwen3-MoE model (default: Qwen3-30B-A3B)")
    p.add_argument("--no-estimate", dest="estimate", action="store_false",
                   help="skip verifying and estimating each eligible NKI candidate in the emulator")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_registry_explain)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, TargetError, RegistryError, OpError) as exc:
        print(f"nkimoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
