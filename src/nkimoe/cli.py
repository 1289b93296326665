"""The ``nkimoe`` command line."""

from __future__ import annotations

import argparse
import json
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tabulate import tabulate

from nkimoe import __version__
from nkimoe.bench.cache import BenchCache, CacheError
from nkimoe.ops import OP_NAMES, OpError, get_op
from nkimoe.plugins import get_registry
from nkimoe.bench.trial import run_trial
from nkimoe.ops import Problem
from nkimoe.registry import CHAIN, CHAIN_BOUNDARY_US, POLICIES, Binding, BoundOp, Candidate, Registry, RegistryError
from nkimoe.targets import Target
from nkimoe.shapes import ConfigError, ModelShapes, call_sites
from nkimoe.targets import TargetError, detect


class UsageError(Exception):
    """Bad input from the user: printed without a traceback, exit status 2."""


def _registry() -> Registry:
    registry = get_registry()
    for problem in registry.problems:
        print(f"nkimoe: warning: {problem}", file=sys.stderr)
    return registry


def _cache() -> BenchCache:
    """The benchmark cache; each problem met reading its files is printed as a warning."""
    cache = BenchCache.load()
    for problem in cache.problems:
        print(f"nkimoe: warning: {problem}", file=sys.stderr)
    return cache


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
        {"op": v.op, "replaces": [part.op for part in get_op(v.op).parts], "name": v.name, "targets": list(v.targets),
         "nki": v.nki, "priority": v.priority, "exactness": v.exactness, "plugin": v.plugin,
         "description": v.description}
        for v in variants
    ]
    _emit(rows, args.format, ["op", "replaces", "name", "targets", "nki", "priority", "exactness", "plugin",
                              "description"])
    return 0


def cmd_registry_explain(args: argparse.Namespace) -> int:
    registry = _registry()
    op = _check_op(args.op)
    target = registry.target(args.target)
    shapes = _shapes(args)
    shapes.check_positions(args.tokens, "--tokens")
    shapes.check_positions(args.context, "--context")
    phase = "decode" if args.tokens == 1 else "prefill"
    length = args.context if phase == "decode" else args.tokens
    problems = {p for p in call_sites(shapes, phase, length, args.dtype).values() if p.op == op}
    if not problems:
        raise UsageError(f"op {op!r} has no call site in the {phase} phase; try --tokens 1 or --tokens >1")
    cache = _cache()
    out = []
    for problem in sorted(problems, key=lambda p: p.dims):
        candidates, bound = registry.explain(target, problem, policy=args.policy, cache=cache)
        rows = [
            {"variant": c.variant.name, "nki": c.variant.nki, "priority": c.variant.priority,
             "eligible": c.eligible, "reason": c.reason, "binds": c.variant.name == bound.name,
             **_estimate_columns(c, problem, target, args.estimate)}
            for c in candidates
        ]
        if problem.parts:
            rows = [{**r, "cache_us": cache.cost_us(target, problem, args.policy, c.variant.name,
                                                    c.variant.source_hash)} for r, c in zip(rows, candidates)]
            rows.append(_chain_row(registry, target, problem, args.policy, cache, bound))
        if not any(r["binds"] for r in rows):
            ref = bound.variant
            rows.append({"variant": ref.name, "nki": ref.nki, "priority": ref.priority, "eligible": True,
                         "reason": "reference fallback", "binds": True})
        out.append({"problem": str(problem), "macs": problem.macs, "target": target.name,
                    "binds": bound.name, "decided_by": bound.decided_by, "why": bound.reason,
                    "candidates": rows})
    if args.format == "json":
        print(json.dumps(out, indent=2))
        return 0
    columns = ["variant", "nki", "priority", "eligible", "binds", "est_us", "bound_by", "verified", "reason"]
    for block in out:
        print(f"{block['problem']} on {block['target']} ({block['macs']:,} MACs; est_us = cost-model estimate)")
        shown = columns if args.estimate else columns[:5] + columns[-1:]
        if any("cache_us" in r for r in block["candidates"]):  # a composite: the costs the binder compared
            shown = [*shown[:-1], "cache_us", shown[-1]]
        _emit(block["candidates"], "table", shown)
        print(f"binds {block['binds']}: {block['why']}\n")
    return 0


def _chain_row(registry: Registry, target: Target, problem: Problem, policy: str, cache: Any,
               bound: BoundOp) -> dict[str, Any]:
    """The explain row of a composite's chain: its parts' variants and recorded costs (estimates
    unless the cache says hardware), boundaries included, and whether it binds."""
    parts, chain_us, _ = registry.bind_chain(problem.op, target, problem, policy, cache)
    costs = [cache.cost_us(target, p.problem, policy, p.variant.name, p.variant.source_hash) for p in parts]
    listed = " -> ".join(f"{p.site}: {p.variant.name} ({'?' if c is None else f'{c:.2f}'} us)"
                         for p, c in zip(parts, costs))
    boundary = f"; {len(parts) - 1} boundaries at {CHAIN_BOUNDARY_US} us each"
    return {"variant": CHAIN, "nki": all(p.variant.nki for p in parts), "priority": None, "eligible": True,
            "binds": bound.is_chain, "cache_us": chain_us, "reason": listed + boundary,
            "parts": [{"site": p.site, "variant": p.variant.name, "cache_us": c} for p, c in zip(parts, costs)]}


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


def _parse_ints(text: str, what: str, minimum: int = 1) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UsageError(f"{what} takes comma-separated integers, got {text!r}") from None
    if not values or any(v < minimum for v in values):
        raise UsageError(f"{what} needs integers >= {minimum}, got {text!r}")
    return values


def _shapes(args: argparse.Namespace) -> ModelShapes:
    """The model's shapes from ``--config`` (Qwen3-30B-A3B's without it)."""
    if not args.config:
        return ModelShapes()
    try:
        return ModelShapes.from_hf_config(args.config)
    except ConfigError as exc:
        raise UsageError(f"--config: {exc}") from None


def _positive(value: int, flag: str) -> None:
    if value < 1:
        raise UsageError(f"{flag} must be a positive integer, got {value}")


def _wrap(text: str, width: int) -> str:
    """``text`` wrapped at word boundaries to lines of ``width`` (a word longer than that stays whole)."""
    return "\n".join(textwrap.wrap(text, width, break_long_words=False, break_on_hyphens=False)) or text


def cmd_bench_select(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from nkimoe.bench.cache import cache_path, check_writable, write_entries
    from nkimoe.bench.select import Selection, cache_entries, default_problems, run_select

    registry = _registry()
    target = registry.target(args.target)
    if not target.is_neuron:
        raise UsageError(f"bench select needs a Neuron target, not {target.name!r}; valid: "
                         f"{', '.join(sorted(n for n, t in registry.targets.items() if t.is_neuron))}")
    ops = [_check_op(o.strip()) for o in args.ops.split(",")] if args.ops else None
    shapes = _shapes(args)
    tokens = _parse_ints(args.tokens, "--tokens") if args.tokens else [128]
    shapes.check_positions(args.seq_len, "--seq-len")
    for count in tokens:
        shapes.check_positions(count, "--tokens")
    _positive(args.tp, "--tp")
    try:
        all_problems = default_problems(shapes, args.seq_len, tokens, args.dtype, args.tp)
    except ValueError as err:
        raise UsageError(f"--tp {args.tp}: {err}") from None
    problems = {p: s for p, s in all_problems.items() if ops is None or p.op in ops}
    path = Path(args.cache) if args.cache else cache_path()
    check_writable(path)  # before minutes of work, not after
    saved: list[str] = []
    bar = tqdm(total=len(problems), desc=f"bench select {target.name}", unit="problem", file=sys.stderr,
               disable=args.quiet)

    def save(selection: Selection) -> None:  # each problem as it finishes: an interruption keeps them
        entries = cache_entries(target, [selection], args.policy)
        write_entries(path, entries)
        saved.extend(entries)
        bar.update(1)

    with bar:
        selections = run_select(registry, target, problems, args.policy,
                                starting=lambda p: bar.set_postfix_str(f"{p.op} {p.signature}", refresh=True),
                                finished=save, cache=lambda: BenchCache.load({"NKIMOE_CACHE": str(path)}))
    rows = []
    for sel in sorted(selections, key=lambda s: (OP_NAMES.index(s.problem.op), s.problem.dims)):
        for c in sel.candidates:
            rows.append({"op": sel.problem.op, "shape": sel.problem.signature, "dtype": sel.problem.dtype,
                         "candidate": c.variant, "time_us": c.time_us and round(c.time_us, 2),
                         "method": c.method, "bound_by": c.bound_by, "status": c.status,
                         "winner": c.variant == sel.winner})
    failed = sorted({s.problem.op for s in selections} - {s.problem.op for s in selections if s.verified})
    if args.format == "json":
        print(json.dumps({"target": target.name, "policy": args.policy, "cache": str(path), "results": rows,
                          "failed_ops": failed}, indent=2))
    else:
        shown = [r for r in rows if args.all or not r["status"].startswith("ineligible")]
        print(f"{target.name}, policy {args.policy}: time_us is a cost-model estimate unless method says hardware")
        for problem in dict.fromkeys((r["op"], r["shape"], r["dtype"]) for r in shown):
            print(f"\n{' '.join(problem)}")
            block = [r for r in shown if (r["op"], r["shape"], r["dtype"]) == problem]
            _emit([{**r, "status": _wrap(r["status"], 50)} for r in block], "table",
                  ["candidate", "time_us", "method", "bound_by", "status", "winner"])
        hidden = len(rows) - len(shown)
        if hidden:
            print(f"\n{hidden} ineligible candidates not shown (--all shows them)")
        print(f"\nwrote {len(saved)} entries to {path}")
    for op in failed:
        print(f"nkimoe: error: no verified candidate for {op} on {target.name}", file=sys.stderr)
    return 1 if failed else 0


def cmd_bench_show(args: argparse.Namespace) -> int:
    cache = _cache()
    if args.target:
        _registry().target(args.target)
    rows = []
    for where, source in (("local", cache.local), *(("shipped", f) for f in cache.shipped)):
        for key, entry in source.entries.items():
            if args.target and entry.get("target") != args.target:
                continue
            if entry["winner"] is None:
                continue  # verification records only: no candidate was verified and timed
            best = next((c for c in entry.get("candidates", []) if c.get("variant") == entry["winner"]), {})
            rows.append({"source": where, "target": entry.get("target"), "op": entry.get("op"),
                         "shape": entry.get("shape"), "dtype": entry.get("dtype"), "policy": entry.get("policy"),
                         "winner": entry["winner"], "time_us": best.get("time_us"), "method": entry.get("method"),
                         "sdk": entry.get("sdk"), "date": entry.get("date")})
    if args.format == "json":
        print(json.dumps({"local": str(cache.local.path), "entries": rows}, indent=2))
        return 0
    print(f"local cache: {cache.local.path} (time_us: cost-model estimate unless method is hardware)")
    _emit(rows, "table", ["source", "target", "op", "shape", "dtype", "policy", "winner", "time_us", "method", "sdk"])
    return 0


def cmd_bench_clear(args: argparse.Namespace) -> int:
    from nkimoe.bench.cache import cache_path, remove_entries

    if args.target:
        _registry().target(args.target)
    path = cache_path()
    removed = remove_entries(path, args.target)
    print(f"removed {removed} entries{' for ' + args.target if args.target else ''} from {path}")
    return 0


def _run_generation(directory: Path, prompt: list[int], new_tokens: int, args: argparse.Namespace) -> int:
    import time

    from nkimoe.model import Qwen3Moe

    start = time.perf_counter()
    model = Qwen3Moe.from_pretrained(directory, max_context=max(1024, len(prompt) + new_tokens))
    loaded = time.perf_counter()
    print(f"target: {model.detection.target.name} ({model.detection.source}); binding:")
    print(model.binding_table())
    tokens: list[int] = []
    first: list[float] = []

    def on_token(token: int) -> None:
        if not first:
            first.append(time.perf_counter())
        tokens.append(token)
        if not args.quiet:
            print(f"  token {len(tokens)}: {token}", flush=True)

    gen_start = time.perf_counter()
    model.generate(prompt, new_tokens, on_token=on_token)
    done = time.perf_counter()
    decode_tps = (len(tokens) - 1) / (done - first[0]) if len(tokens) > 1 else float("nan")
    print(f"prompt {len(prompt)} tokens -> {tokens}")
    print(f"load {loaded - start:.2f} s; prefill {first[0] - gen_start:.2f} s "
          f"({len(prompt) / (first[0] - gen_start):.1f} tok/s); decode {decode_tps:.2f} tok/s "
          f"(wall time on this machine{', NKI kernels emulated' if model.detection.target.is_neuron else ''})")
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    import tempfile

    from nkimoe.demo import write_random_checkpoint

    if not (args.random_tiny or args.model):
        raise UsageError("give --model DIR or --random-tiny")
    _positive(args.new_tokens, "--new-tokens")
    prompt = _parse_ints(args.prompt_ids, "--prompt-ids", minimum=0) if args.prompt_ids else [1, 2, 3, 4, 5, 6, 7, 8]
    if not args.random_tiny:
        return _generate_from(Path(args.model), prompt, args)
    _positive(args.layers, "--layers")
    if args.keep:
        keep = Path(args.keep)
        if keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
            raise UsageError(f"--keep {keep}: give a new or empty directory for the checkpoint")
        write_random_checkpoint(keep, layers=args.layers)
        print(f"random checkpoint kept in {keep}")
        return _generate_from(keep, prompt, args)
    with tempfile.TemporaryDirectory(prefix="nkimoe-demo-") as tmp:  # removed afterwards; --keep DIR keeps it
        return _generate_from(write_random_checkpoint(Path(tmp), layers=args.layers), prompt, args)


def _generate_from(directory: Path, prompt: list[int], args: argparse.Namespace) -> int:
    from nkimoe.model import CheckpointError

    try:
        return _run_generation(directory, prompt, args.new_tokens, args)
    except (CheckpointError, ValueError) as exc:
        raise UsageError(str(exc)) from None


def cmd_demo(args: argparse.Namespace) -> int:
    args.random_tiny, args.model, args.prompt_ids = True, None, None
    return cmd_generate(args)


def _targets_arg(registry: Registry, text: str) -> list[str]:
    names = [t.strip() for t in text.split(",") if t.strip()]
    if not names:
        raise UsageError(f"--targets needs at least one Neuron target (trn2, trn3), got {text!r}")
    for name in names:
        if not registry.target(name).is_neuron:
            raise UsageError(f"--targets takes Neuron targets (trn2, trn3), got {name!r}")
    return names


def cmd_submit(args: argparse.Namespace) -> int:
    from nkimoe.submit import OutputError, SubmitError, submit

    registry = _registry()
    targets = _targets_arg(registry, args.targets)
    root = Path(args.root).resolve()
    try:
        out = submit(Path(args.output), targets, registry, root=root, verify=not args.no_verify,
                     progress=lambda msg: print(msg, file=sys.stderr))
    except OutputError as exc:
        raise UsageError(str(exc)) from None
    except SubmitError as exc:
        print(f"nkimoe: error: {exc}", file=sys.stderr)
        print(f"nkimoe: nothing was written to {args.output}", file=sys.stderr)
        return 1
    size = out.stat().st_size
    print(f"wrote {out} ({size / 1e6:.1f} MB) for {', '.join(targets)}"
          f"{'' if args.no_verify else '; verified against the package on cpu and ' + ', '.join(targets)}")
    return 0


def _binding_for(registry: Registry, target_name: str, shapes: ModelShapes, seq_len: int) -> Binding:
    from nkimoe.registry import default_policy

    target = registry.target(target_name)
    sites = {**call_sites(shapes, "prefill", seq_len), **call_sites(shapes, "decode", seq_len)}
    return registry.bind(target, sites, policy=default_policy(), cache=_cache())


def cmd_coverage(args: argparse.Namespace) -> int:
    from nkimoe.scoring import coverage

    registry = _registry()
    shapes = _shapes(args)
    shapes.check_positions(args.seq_len, "--seq-len")
    _positive(args.new_tokens, "--new-tokens")
    target = args.target or detect(known=registry.targets).target.name
    cov = coverage(_binding_for(registry, target, shapes, args.seq_len), shapes, args.seq_len, args.new_tokens)
    rows = [{"phase": r.site.split(".")[0], "site": r.site.split(".", 1)[1], "op": r.op, "variant": r.variant,
             "nki": r.nki, "calls": r.calls, "macs": r.macs} for r in (*cov.prefill, *cov.decode)]
    if args.format == "json":
        print(json.dumps({"target": target, "seq_len": args.seq_len, "new_tokens": args.new_tokens,
                          "nki_fraction": cov.fraction, "generation_nki_fraction": cov.generation_fraction,
                          "sites": rows}, indent=2))
        return 0
    print(f"{target}: prefill of {args.seq_len} tokens and one decode step (cache {args.seq_len})")
    _emit([{**r, "macs": f"{r['macs']:,}"} for r in rows], "table",
          ["phase", "site", "op", "variant", "nki", "calls", "macs"])
    print(f"NKI MAC fraction (prefill + one decode graph, as the contest counts): {cov.fraction:.4f}")
    print(f"NKI MAC fraction over a generation of {args.new_tokens} tokens: {cov.generation_fraction:.4f}")
    return 0


def cmd_score(args: argparse.Namespace) -> int:
    from nkimoe.scoring import BASELINES, coverage, points, read_results

    registry = _registry()
    target = registry.target(args.target).name
    if args.coverage is None:
        shapes = ModelShapes()
        nki_fraction = coverage(_binding_for(registry, target, shapes, 1024), shapes, 1024, 1).fraction
        source = "nkimoe coverage of the current binding"
    else:
        nki_fraction, source = args.coverage, "--coverage"
    method = "measured"
    if args.estimate:
        from nkimoe.bench.estimate import generation

        report, method = _estimate_report(args), "estimated (cost model)"
        prompts = [args.prompt] if args.prompt is not None else sorted(BASELINES[target])
        if any(p not in BASELINES[target] for p in prompts):
            raise UsageError(f"no baseline row for prompt {args.prompt} on {target}; public prompts: {sorted(BASELINES[target])}")
        measured = []
        for prompt in prompts:
            context, total, _, _ = BASELINES[target][prompt]
            g = generation(report, total - context)
            measured.append((prompt, round(g["latency_ms"], 3), round(g["tok_s"], 3)))
    elif args.results:
        try:
            measured = read_results(Path(args.results))
        except ValueError as exc:
            raise UsageError(f"--results: {exc}") from None
    elif args.prompt is not None and args.latency_ms is not None and args.tok_s is not None:
        measured = [(args.prompt, args.latency_ms, args.tok_s)]
    else:
        raise UsageError("give --prompt N --latency-ms X --tok-s Y, --results FILE, or --estimate")
    rows, total = [], 0.0
    for prompt, latency, tok_s in measured:
        try:
            value, factors = points(target, prompt, latency, tok_s, nki_fraction)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        total += value
        _, _, base_latency, base_tok_s = BASELINES[target][prompt]
        rows.append({"prompt": prompt, "method": method, "latency_ms": latency, "base_latency_ms": base_latency, "tok_s": tok_s,
                     "base_tok_s": base_tok_s, "latency_x": round(factors["reduced_latency"], 3),
                     "throughput_x": round(factors["increased_throughput"], 3), "points": round(value, 3)})
    if args.format == "json":
        print(json.dumps({"target": target, "coverage": nki_fraction, "coverage_source": source, "prompts": rows,
                          "total": total, "estimate": args.estimate}, indent=2))
        return 0
    print(f"{target}: coverage {nki_fraction:.4f} ({source}); accuracy assumed to pass")
    _emit(rows, "table", list(rows[0]))
    print(f"total points{' (ESTIMATED from the cost model, not measured)' if args.estimate else ''}: {total:.3f}")
    return 0


def _estimate_report(args: argparse.Namespace) -> dict[str, Any]:
    from nkimoe.bench.estimate import estimate_model

    registry = _registry()
    target = registry.target(args.target)
    shapes = ModelShapes.from_hf_config(args.config) if getattr(args, "config", None) else ModelShapes()
    try:
        return estimate_model(registry, target, tp=args.tp, seq_len=args.seq_len, shapes=shapes)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_estimate(args: argparse.Namespace) -> int:
    from nkimoe.bench.estimate import generation

    report = _estimate_report(args)
    report["generation"] = generation(report, args.new_tokens)
    if args.format == "json":
        print(json.dumps(report, indent=2))
        return 0
    print(f"ESTIMATE (cost model, not a measurement): {report['target']}, one TP rank at --tp {report['tp']}, "
          f"prefill of {report['seq_len']} tokens, decode with a cache of {report['seq_len']}")
    for phase in ("decode", "prefill"):
        print(f"\n{phase} per call site (estimates)")
        _emit(report[f"{phase}_sites"], "table", ["site", "variant", "calls", "us_per_call", "total_ms", "source"])
        engines = ", ".join(f"{e} {ms:.3f}" for e, ms in report[f"{phase}_engines_ms"].items())
        print(f"{phase} engine busy ms (estimates, sites from the cache or emulator): {engines}")
    g = report["generation"]
    print(f"\ndecode ms/token (estimate): {report['decode_ms_per_token']:.3f}, of which collectives "
          f"{report['collectives_ms_per_token']:.3f}; {report['kernel_launches_per_token']} kernel launches")
    print(f"HBM roofline ms/token (must-read bytes / the rank's bandwidth): {report['roofline_ms_per_token']:.3f}")
    print(f"prefill ms (estimate): {report['prefill_ms']:.3f}, of which collectives {report['prefill_collectives_ms']:.3f}")
    print(f"{g['new_tokens']} new tokens (estimate): {g['latency_ms']:.1f} ms end to end, {g['tok_s']:.1f} tok/s decode")
    return 0


def cmd_plugins_list(args: argparse.Namespace) -> int:
    registry = get_registry()
    rows = []
    for info in registry.plugins:
        contributed = [registry.variants[v] for v in info.variants if v in registry.variants]
        rows.append({"name": info.name, "source": info.source, "status": info.status,
                     "variants": info.variants, "targets": info.targets,
                     "variant_targets": sorted({t for v in contributed for t in v.targets})})
    if args.format == "json":
        print(json.dumps(rows, indent=2))
        return 0
    def brief(names: list[str]) -> str:
        text = ",".join(names)
        return f"{len(names)}: {text if len(text) <= 60 else text[:57] + '...'}" if names else "-"

    _emit([{**r, "variants": brief(r["variants"]), "status": r["status"][:80]} for r in rows], "table",
          ["name", "source", "status", "variants", "targets", "variant_targets"])
    return 0


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

    bench = sub.add_parser("bench", help="verify, time and cache the winning variant per op and shape")
    bench_sub = bench.add_subparsers(dest="bench_command", metavar="SUBCOMMAND", required=True)
    p = bench_sub.add_parser(
        "select", help="verify every candidate, time the survivors, cache the winners",
        description="For every op at the model's shapes (prefill of --seq-len and --tokens tokens, decode with a "
                    "cache of --seq-len), verify each candidate against the op's reference on seeded random "
                    "inputs, time the survivors (cost-model estimates off-hardware, measured on a Trainium host), "
                    "and write the winners to the benchmark cache.")
    p.add_argument("--target", required=True, help="trn2 or trn3")
    p.add_argument("--config", help="an HF config.json of a Qwen3-MoE model (default: Qwen3-30B-A3B)")
    p.add_argument("--ops", help=f"comma-separated ops (default: all of {', '.join(OP_NAMES)})")
    p.add_argument("--tokens", help="comma-separated extra prefill token counts (default: 128)")
    p.add_argument("--seq-len", type=int, default=1024, help="prefill length and decode cache length (default 1024)")
    p.add_argument("--tp", type=int, default=1,
                   help="1 (default): the portable model's full-width shapes; N > 1: one rank's shapes on the Neuron "
                        "path at tensor parallelism N (the contest harness runs --tp-degree 4)")
    p.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--policy", choices=POLICIES, default="fastest",
                   help="fastest: any verified variant; bitexact: only variants declared and verified bit-exact")
    p.add_argument("--cache", help="cache file to write (default: NKIMOE_CACHE or the user cache directory)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--all", action="store_true", help="also list the candidates ineligible on the target")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_bench_select)
    p = bench_sub.add_parser("show", help="list cached winners (local and shipped)")
    p.add_argument("--target", help="only this target")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_bench_show)
    p = bench_sub.add_parser("clear", help="remove local cache entries (all, or one target's)")
    p.add_argument("--target", help="only this target")
    p.set_defaults(func=cmd_bench_clear)

    p = sub.add_parser("generate", help="greedy generation with the portable model on a checkpoint",
                       description="Load an HF Qwen3-MoE checkpoint directory through nkimoe's loader, bind every "
                                   "op for the detected target (NKIMOE_TARGET=trn2|trn3 runs the NKI variants in "
                                   "the emulator), prefill the prompt and decode greedily.")
    p.add_argument("--model", help="checkpoint directory (config.json + safetensors)")
    p.add_argument("--random-tiny", action="store_true", help="use a fresh random full-width checkpoint instead")
    p.add_argument("--layers", type=int, default=2, help="layers of the --random-tiny checkpoint (default 2)")
    p.add_argument("--keep", metavar="DIR", help="write the --random-tiny checkpoint to DIR and keep it (default: a "
                                                 "temporary directory, removed afterwards)")
    p.add_argument("--prompt-ids", help="comma-separated token ids (default 1..8)")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--quiet", action="store_true", help="do not print each token as it comes")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="build a random full-width checkpoint, load it back and generate",
                       description="Write a random Qwen3-MoE checkpoint (hidden 2048, 128 experts, 2 layers, vocab "
                                   "1024) with safetensors, load it through the real loader, generate, and print "
                                   "tokens/s and the binding.")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--keep", metavar="DIR", help="write the checkpoint to DIR and keep it (default: a temporary "
                                                 "directory, removed afterwards)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(func=cmd_demo)

    plugins = sub.add_parser("plugins", help="list plugins: builtin, entry points and NKIMOE_PLUGINS")
    plugins_sub = plugins.add_subparsers(dest="plugins_command", metavar="SUBCOMMAND", required=True)
    p = plugins_sub.add_parser("list", help="each plugin with its source, status and contributions",
                               description="Every plugin found (builtin modules, the 'nkimoe' entry-point group, "
                                           "NKIMOE_PLUGINS) with where it came from, whether it loaded, and the "
                                           "variants and targets it contributed.")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_plugins_list)

    p = sub.add_parser("submit", help="build the single self-contained qwen.py for the contest",
                       description="Bundle the target detection, the registry core, the variants, the selection "
                                   "tables and the model (both paths) into one file; verify it in an isolated "
                                   "interpreter against the package path on cpu and each emulated target; write it "
                                   "only if it reproduces the package's tokens and logits.")
    p.add_argument("-o", "--output", default="dist/qwen.py")
    p.add_argument("--targets", default="trn2,trn3")
    p.add_argument("--root", default=".", help="the nkimoe repository (holds qwen.py); default: current directory")
    p.add_argument("--no-verify", action="store_true", help="skip the isolated-interpreter verification")
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("coverage", help="NKI share of the model's MACs under the current binding",
                       description="Per call site: MACs per prefill and per decode step, the bound variant, whether "
                                   "it is NKI, and the NKI fraction of all MACs as the contest counts it.")
    p.add_argument("--target", help="trn2, trn3 or cpu (default: detected)")
    p.add_argument("--seq-len", type=int, default=1024)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--config", help="an HF config.json of a Qwen3-MoE model (default: Qwen3-30B-A3B)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_coverage)

    p = sub.add_parser("estimate", help="ESTIMATED per-token decode and prefill time of the bound model on one TP rank",
                       description="Per call site and engine, plus collectives and kernel launches, from the cost "
                                   "model: every figure is an estimate, never a measurement.")
    p.add_argument("--target", required=True, help="trn2 or trn3")
    p.add_argument("--tp", type=int, default=1, help="tensor parallelism: one rank's Neuron-path problems")
    p.add_argument("--seq-len", type=int, default=1024, help="prefill tokens and decode cache length")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--config", help="an HF config.json of a Qwen3-MoE model (default: Qwen3-30B-A3B)")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_estimate)

    p = sub.add_parser("score", help="the contest's points for measured latency and throughput",
                       description="accuracy x (baseline latency / latency p99) x (tok/s / baseline tok/s) x "
                                   "(1 + NKI coverage), against the public prompts' baseline rows.")
    p.add_argument("--target", required=True, help="trn2 or trn3 (whose baseline rows to use)")
    p.add_argument("--prompt", type=int, help="public prompt id (0-4)")
    p.add_argument("--latency-ms", type=float, help="end-to-end latency p99 in ms")
    p.add_argument("--tok-s", type=float, help="throughput in tokens/s")
    p.add_argument("--coverage", type=float, help="NKI MAC fraction (default: nkimoe coverage of the binding)")
    p.add_argument("--results", help="CSV of prompt,latency_ms,tok_s rows for several prompts")
    p.add_argument("--estimate", action="store_true",
                   help="score ESTIMATED latency and throughput from `nkimoe estimate` (all prompts, or --prompt)")
    p.add_argument("--tp", type=int, default=1, help="with --estimate: tensor parallelism of the estimate")
    p.add_argument("--seq-len", type=int, default=1024, help="with --estimate: the estimate's sequence length")
    p.add_argument("--format", choices=("table", "json"), default="table")
    p.set_defaults(func=cmd_score)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (UsageError, TargetError, RegistryError, OpError, CacheError, ConfigError) as exc:
        print(f"nkimoe: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
