"""Launch the off-hardware NxDI checks from any interpreter and judge their results.

The checks need torch 2.9 / torch-xla 2.9 / transformers 4.57 (the ``[nxdi]`` extra), usually a
second virtualenv: ``NKIMOE_NXDI_PYTHON`` names its interpreter, else the project's ``.venv-nxdi``.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from nkimoe.offhw.environment import vendor_root

ROOT = Path(__file__).resolve().parents[3]

#: What the checks drive: fp32 at TP 1 (NxDI's ``to_cpu()`` refuses bf16 over more than one rank).
CPU_HARNESS_ARGS = ("--tp-degree=1", "--torch-dtype=float32")


class NxdiCheckError(RuntimeError):
    """The NxDI checks could not run or found a difference."""


def nxdi_python(root: Path = ROOT) -> Path | None:
    """The interpreter of the NxDI environment, or None where there is none."""
    named = os.environ.get("NKIMOE_NXDI_PYTHON")
    candidate = Path(named) if named else root / ".venv-nxdi" / "bin" / "python"
    return candidate if candidate.exists() else None


def _run(python: Path, args: Sequence[str], timeout: float, module: str | None = "nkimoe.offhw.checks") -> str:
    env = {**os.environ, "PJRT_DEVICE": "CPU"}
    env.pop("NKIMOE_TARGET", None)
    run = subprocess.run([str(python), *(["-m", module] if module else []), *args], capture_output=True, text=True,
                         timeout=timeout, env=env, cwd=str(ROOT))
    if run.returncode != 0:
        raise NxdiCheckError(f"the NxDI checks failed ({' '.join(args[:2])}):\n{run.stderr[-4000:]}")
    return run.stdout


def write_checkpoints(python: Path, directory: Path) -> dict[str, Path]:
    """The tiny and the full-width random checkpoints, written by the NxDI interpreter's transformers."""
    _run(python, ["--write-checkpoints", str(directory)], timeout=600)
    return {"tiny": directory / "tiny", "full": directory / "full"}


def run_checks(python: Path, sdk: str, model: Path, qwen_files: Sequence[Path], targets: Sequence[str],
               work: Path, vendor: Path | None = None, timeout: float = 1800,
               harness_args: Sequence[str] = ()) -> dict[str, Any]:
    """One SDK release, one checkpoint: NxDI's model, each qwen file on each target, HF transformers.
    ``harness_args`` follow ``CPU_HARNESS_ARGS`` (a later flag wins, e.g. ``--torch-dtype=bfloat16``)."""
    args = ["--sdk", sdk, "--vendor", str(vendor or vendor_root()), "--work", str(work), "--model", str(model),
            "--targets", ",".join(targets), *(f"--harness-arg={a}" for a in (*CPU_HARNESS_ARGS, *harness_args))]
    for path in qwen_files:
        args += ["--qwen", str(path)]
    out = _run(python, args, timeout)
    line = next(line for line in reversed(out.splitlines()) if line.startswith("NKIMOE-RESULT "))
    return json.loads(line.removeprefix("NKIMOE-RESULT "))


def run_tensor_parallel(python: Path, sdk: str, model: Path, qwen_file: Path, target: str, work: Path, tp: int = 2,
                        vendor: Path | None = None, timeout: float = 1800) -> dict[str, Any]:
    """``qwen_file`` on ``target`` at TP ``tp`` under ``torchrun`` (gloo, one process per rank); rank 0's run."""
    args = ["-m", "torch.distributed.run", f"--nproc_per_node={tp}", "-m", "nkimoe.offhw.checks", "--sdk", sdk,
            "--vendor", str(vendor or vendor_root()), "--work", str(work), "--model", str(model), "--qwen",
            str(qwen_file), "--targets", target, "--no-references",
            *(f"--harness-arg={a}" for a in CPU_HARNESS_ARGS), f"--harness-arg=--tp-degree={tp}"]
    out = _run(python, args, timeout, module=None)
    line = next(line for line in out.splitlines() if line.startswith("NKIMOE-RESULT "))
    return json.loads(line.removeprefix("NKIMOE-RESULT "))


def run_shard_check(python: Path, sdk: str, model: Path, qwen_file: Path, targets: Sequence[str], work: Path,
                    vendor: Path | None = None, timeout: float = 1800) -> dict[str, Any]:
    """``shard_checkpoint()`` at the harness defaults (TP 4, bf16) for ``qwen_file`` on each target."""
    args = ["--shard", "--sdk", sdk, "--vendor", str(vendor or vendor_root()), "--work", str(work), "--model",
            str(model), "--qwen", str(qwen_file), "--targets", ",".join(targets)]
    out = _run(python, args, timeout)
    line = next(line for line in reversed(out.splitlines()) if line.startswith("NKIMOE-RESULT "))
    return json.loads(line.removeprefix("NKIMOE-RESULT "))


def shard_differences(result: dict[str, Any]) -> list[str]:
    """Shards that are not the rank's slice of the HF weights in the bound variants' layout."""
    return [f"SDK {result['sdk']}, {target}, rank {rank}: {name} {shard['shape']} is not its slice in layout "
            f"{shard['layout']}"
            for target, entry in result["targets"].items() for rank, shards in enumerate(entry["ranks"])
            for name, shard in shards.items() if not shard["equal"]]


def within_tol_map(actual: list[list[float]], expected: list[list[float]],
                   tol_map: Sequence[tuple[int | None, Sequence[float]]], relative_to: str = "logit") -> list[str]:
    """The harness's ``tol_map`` (top-k -> (atol, rtol); None: every logit) applied to each step's
    logits over the expected top k: |actual - expected| <= atol + rtol * |expected| (``relative_to=
    "logit"``), or rtol times the step's largest finite |expected| (``"step"``, the scale NxDI's open
    port of ``logit_validation`` normalises its errors by: experimental/core/accuracy/logit_validation.py).
    Positions where either side is -inf (a token generation prohibits, e.g. EOS before the minimum
    length) are left out, as that port's ``_preprocess_logits`` does. Returns the violations."""
    import torch

    a, e = torch.tensor(actual), torch.tensor(expected)
    if a.shape != e.shape:
        return [f"logit shapes differ: {tuple(a.shape)} vs {tuple(e.shape)}"]
    if relative_to not in ("logit", "step"):
        raise ValueError(f"relative_to is 'logit' or 'step', not {relative_to!r}")
    problems = []
    for k, (atol, rtol) in tol_map:
        idx = e.argsort(dim=-1, descending=True)[:, : (e.shape[-1] if k is None else k)]
        ea, aa = e.gather(-1, idx), a.gather(-1, idx)
        off = torch.where(aa.isneginf() | ea.isneginf(), 0.0, (aa - ea).abs())
        finite = torch.where(e.isfinite(), e.abs(), 0.0)
        scale = ea.abs() if relative_to == "logit" else finite.max(dim=-1, keepdim=True).values
        excess = off - (atol + rtol * scale)
        if (excess > 0).any():
            step = int(excess.max(dim=-1).values.argmax())
            problems.append(f"top-{k}: {int((excess > 0).sum())} logits out, step {step} off by "
                            f"{float(off[step].max()):.3g} (atol {atol}, rtol {rtol})")
    return problems


def differences(result: dict[str, Any], relative_to: str = "logit") -> list[str]:
    """What differs in one ``run_checks`` result: every run's greedy tokens against HF transformers',
    and its logits against NxDI's own Qwen3-MoE within the harness's tolerances (``within_tol_map``
    with ``relative_to``)."""
    runs = result["runs"]
    problems = [f"{label}: {run['error']}" for label, run in runs.items() if "error" in run]
    if problems:
        return problems
    hf, nxdi = runs["hf"], runs["nxdi"]
    for label, run in runs.items():
        if label == "hf":
            continue
        if run["tokens"] != hf["tokens"]:
            problems.append(f"{label}: tokens {run['tokens']} differ from HF transformers' {hf['tokens']}")
        if label != "nxdi":
            problems += [f"{label} vs NxDI: {p}"
                         for p in within_tol_map(run["logits"], nxdi["logits"], result["tol_map"], relative_to)]
    return [f"SDK {result['sdk']}, {result['model']} checkpoint: {p}" for p in problems]
