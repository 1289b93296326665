"""NKI MAC coverage of a binding and the contest's per-prompt points.

Coverage is counted as the contest's harness counts it (aws-neuron/nki-moe ``main.py``,
``count_nki_flop_ratio``): MACs inside NKI custom calls over all dot MACs, summed over the
context-encoding (prefill) graph and one token-generation (decode) graph.

Points (``calculate_score`` in the same file): accuracy x (baseline latency / latency) x
(throughput / baseline throughput) x (1 + NKI coverage), where latency is the prompt's end-to-end
latency p99 in ms and throughput its tokens/s, against that prompt's baseline row.
"""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nkimoe.registry import Binding
from nkimoe.shapes import ModelShapes, call_sites
from nkimoe.userfiles import read_text

#: Calls of each site per pass: per-layer sites run once per layer, the others once.
_ONCE = frozenset({"first_norm", "final_norm", "lm_head"})

#: Baseline rows of the public prompts: prompt id -> (context length, sequence length, base latency
#: ms, base throughput tok/s). Source: aws-neuron/nki-moe prompt_data_trn2.csv and
#: prompt_data_trn3.csv (commit f742418).
BASELINES: Mapping[str, Mapping[int, tuple[int, int, float, float]]] = {
    "trn2": {
        0: (18, 64, 12498.0, 51.86),
        1: (126, 256, 9432.19, 70.24),
        2: (43, 128, 12089.08, 54.40),
        3: (10, 64, 12868.67, 50.89),
        4: (402, 640, 3041.92, 217.74),
    },
    "trn3": {
        0: (18, 64, 17138.28, 37.87),
        1: (126, 256, 12427.41, 52.34),
        2: (43, 128, 16208.29, 40.25),
        3: (10, 64, 17177.15, 37.93),
        4: (402, 640, 3871.62, 168.39),
    },
}


@dataclass(frozen=True)
class SiteCoverage:
    site: str
    op: str
    variant: str
    nki: bool
    calls: int
    macs: int  #: MACs of all calls of the site in one pass


@dataclass(frozen=True)
class Coverage:
    prefill: list[SiteCoverage]
    decode: list[SiteCoverage]
    new_tokens: int

    @staticmethod
    def _sum(rows: list[SiteCoverage], nki_only: bool) -> int:
        return sum(r.macs for r in rows if r.nki or not nki_only)

    @property
    def fraction(self) -> float:
        """The contest's ratio: NKI MACs over all MACs of the prefill graph plus one decode graph."""
        total = self._sum(self.prefill, False) + self._sum(self.decode, False)
        return (self._sum(self.prefill, True) + self._sum(self.decode, True)) / total if total else 0.0

    @property
    def generation_fraction(self) -> float:
        """The same ratio weighting the decode graph by the number of generated tokens."""
        n = self.new_tokens
        total = self._sum(self.prefill, False) + n * self._sum(self.decode, False)
        nki = self._sum(self.prefill, True) + n * self._sum(self.decode, True)
        return nki / total if total else 0.0


def coverage(binding: Binding, shapes: ModelShapes, seq_len: int, new_tokens: int) -> Coverage:
    """Per call site: MACs per prefill of ``seq_len`` tokens and per decode step (cache ``seq_len``)."""
    phases = {}
    for phase in ("prefill", "decode"):
        rows = []
        for site, problem in call_sites(shapes, phase, seq_len).items():
            if site in binding.ops and not binding.runs(site):
                continue  # a chain's MACs count at its parts, a fused variant's at the composite
            calls = 1 if site.split(".", 1)[1] in _ONCE else shapes.layers
            bound = binding.ops.get(site)
            variant = bound.variant if bound is not None else None
            rows.append(SiteCoverage(site, problem.op, variant.name if variant else "unbound",
                                     bool(variant and variant.nki), calls, calls * problem.macs))
        phases[phase] = rows
    return Coverage(phases["prefill"], phases["decode"], new_tokens)


def points(target: str, prompt: int, latency_ms: float, tok_s: float, nki_coverage: float,
           accuracy: float = 1.0) -> tuple[float, dict[str, float]]:
    """The contest's points for one prompt, and the factors behind them."""
    rows = BASELINES.get(target)
    if rows is None:
        raise ValueError(f"no baseline rows for target {target!r}; valid: {', '.join(BASELINES)}")
    if prompt not in rows:
        raise ValueError(f"no baseline row for prompt {prompt} on {target}; public prompts: {sorted(rows)}")
    if not (math.isfinite(latency_ms) and math.isfinite(tok_s) and latency_ms > 0 and tok_s > 0):
        raise ValueError(f"latency and throughput must be positive finite numbers, got {latency_ms} ms and "
                         f"{tok_s} tok/s")
    if not 0.0 <= nki_coverage <= 1.0:
        raise ValueError(f"coverage must be within 0..1, got {nki_coverage}")
    _, _, base_latency, base_tok_s = rows[prompt]
    factors = {"reduced_latency": base_latency / latency_ms, "increased_throughput": tok_s / base_tok_s,
               "coverage_factor": 1.0 + nki_coverage, "accuracy": accuracy}
    return accuracy * factors["reduced_latency"] * factors["increased_throughput"] * factors["coverage_factor"], factors


def read_results(path: Path) -> list[tuple[int, float, float]]:
    """Rows ``prompt,latency_ms,tok_s`` (header optional) of a measured-results CSV; ValueError
    names the file (and line) when it is missing, not text, malformed or without a row."""
    expected = "expected CSV rows 'prompt,latency_ms,tok_s'"
    text = read_text(path, "results file", expected)
    out = []
    try:
        for number, row in enumerate(csv.reader(io.StringIO(text, newline="")), start=1):
            if not row or row[0].strip().lower() in ("prompt", "prompt id", "#"):
                continue
            try:
                out.append((int(row[0]), float(row[1]), float(row[2])))
            except (ValueError, IndexError):
                got = ",".join(row)[:80]
                raise ValueError(f"results file {path}, line {number}: {expected}, got {got!r}") from None
    except csv.Error as exc:
        raise ValueError(f"results file {path}: {exc}; {expected}") from None
    if not out:
        raise ValueError(f"results file {path} has no result rows; {expected}")
    return out
