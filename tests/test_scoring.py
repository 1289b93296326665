"""MAC coverage and the contest's points."""

from __future__ import annotations

import subprocess
import sys

import pytest

from nkimoe.plugins import load_registry
from nkimoe.scoring import BASELINES, coverage, points
from nkimoe.shapes import ModelShapes, call_sites

SMALL = ModelShapes(hidden=256, heads=4, kv_heads=2, head_dim=64, experts=8, top_k=2, moe_intermediate=128,
                    vocab=1000, layers=2)


def _bind(target: str, seq: int):  # noqa: ANN202
    sites = {**call_sites(SMALL, "prefill", seq), **call_sites(SMALL, "decode", seq)}
    return load_registry({}).bind(target, sites)


def test_coverage_matches_a_hand_count() -> None:
    t, layers = 16, 2
    per_layer_prefill = (t * 256 * (4 + 2 * 2) * 64  # fused q|k|v
                         + t * 256 * 256  # o_proj
                         + t * 256 * 8  # router gate
                         + t * 2 * 3 * 256 * 128  # experts: 2 of 8 per token, gate+up+down
                         + 2 * t * t * 4 * 64)  # attention scores and values (dense)
    per_layer_decode = (256 * 512 + 256 * 256 + 256 * 8 + 2 * 3 * 256 * 128 + 2 * t * 4 * 64)
    lm_head = 256 * 1000
    cov = coverage(_bind("trn2", t), SMALL, t, new_tokens=10)
    assert sum(r.macs for r in cov.prefill) == layers * per_layer_prefill + lm_head
    assert sum(r.macs for r in cov.decode) == layers * per_layer_decode + lm_head
    assert cov.fraction == 1.0  # every MAC-bearing op binds an NKI variant on trn2
    assert coverage(_bind("cpu", t), SMALL, t, 10).fraction == 0.0


def test_partial_coverage_weights_prefill_and_one_decode_graph() -> None:
    t = 16
    binding = _bind("trn2", t)
    registry = load_registry({})
    # Swap lm_head for the reference in both phases: coverage loses exactly lm_head's MACs.
    ops = dict(binding.ops)
    for site in ("prefill.lm_head", "decode.lm_head"):
        ops[site] = type(ops[site])(site, ops[site].problem, registry.variants["ref_linear"], "fallback", "test")
    partial = coverage(type(binding)(binding.target, binding.policy, ops), SMALL, t, new_tokens=10)
    total = sum(r.macs for r in partial.prefill) + sum(r.macs for r in partial.decode)
    assert partial.fraction == pytest.approx((total - 2 * 256 * 1000) / total)
    decode = sum(r.macs for r in partial.decode)
    prefill = sum(r.macs for r in partial.prefill)
    assert partial.generation_fraction == pytest.approx(
        (prefill - 256 * 1000 + 10 * (decode - 256 * 1000)) / (prefill + 10 * decode))


def test_default_binding_covers_the_model_on_both_targets() -> None:
    shapes = ModelShapes()
    for target in ("trn2", "trn3"):
        sites = {**call_sites(shapes, "prefill", 1024), **call_sites(shapes, "decode", 1024)}
        assert coverage(load_registry({}).bind(target, sites), shapes, 1024, 128).fraction >= 0.995


def test_score_reproduces_the_contest_example() -> None:
    # README of aws-neuron/nki-moe: 10x lower latency, 2x throughput, 0.85 coverage -> 37 points.
    _, _, base_latency, base_tok_s = BASELINES["trn3"][0]
    value, factors = points("trn3", 0, base_latency / 10, base_tok_s * 2, 0.85)
    assert value == pytest.approx(37.0)
    assert factors["reduced_latency"] == pytest.approx(10) and factors["increased_throughput"] == pytest.approx(2)
    with pytest.raises(ValueError, match="no baseline row for prompt 9 on trn2; public prompts: \\[0, 1, 2, 3, 4\\]"):
        points("trn2", 9, 1.0, 1.0, 0.5)


def test_score_cli_with_results_file(tmp_path) -> None:  # noqa: ANN001
    results = tmp_path / "results.csv"
    results.write_text("prompt,latency_ms,tok_s\n0,1713.828,75.74\n1,1242.741,104.68\n")
    out = subprocess.run([sys.executable, "-m", "nkimoe.cli", "score", "--target", "trn3", "--results", str(results),
                          "--coverage", "0.85"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "total points: 74.000" in out.stdout
    cov = subprocess.run([sys.executable, "-m", "nkimoe.cli", "coverage", "--target", "trn3", "--format", "json"],
                         capture_output=True, text=True, timeout=120)
    assert cov.returncode == 0 and '"nki_fraction": 1.0' in cov.stdout
