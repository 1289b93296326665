"""``nkimoe estimate``: collectives, the whole-model report and its use by ``nkimoe score``."""

from __future__ import annotations

import json

import pytest

from nkimoe.bench.estimate import all_gather_seconds, all_reduce_seconds, estimate_model, generation, site_runs
from nkimoe.plugins import get_registry
from nkimoe.shapes import ModelShapes, neuron_call_sites
from nkimoe.targets import TRN2, TRN3
from tests.test_cli import run

HIDDEN_BYTES = 2048 * 2  # one decoded token's hidden state in bf16


@pytest.mark.parametrize("target", [TRN2, TRN3])
def test_all_reduce_costs_more_at_larger_tp(target) -> None:  # noqa: ANN001
    times = [all_reduce_seconds(HIDDEN_BYTES, tp, target) for tp in (1, 2, 4, 8)]
    assert times[0] == 0.0
    assert times[1] < times[2] < times[3]
    # A 4 KiB all-reduce is latency-bound: about one 1-2 us hop, not nanoseconds or milliseconds.
    assert 1e-6 < times[2] < 1e-5
    # A large buffer is bandwidth-bound and grows with it.
    assert all_reduce_seconds(64 << 20, 4, target) > 10 * times[2]
    assert all_gather_seconds(HIDDEN_BYTES, 1, target) == 0.0 < all_gather_seconds(HIDDEN_BYTES, 4, target)


@pytest.fixture(scope="module")
def reports() -> dict[int, dict]:
    registry = get_registry()
    return {tp: estimate_model(registry, TRN2, tp=tp) for tp in (1, 4)}


def test_model_estimate_is_labelled_and_consistent(reports) -> None:  # noqa: ANN001
    for tp, r in reports.items():
        assert r["estimate"] is True and "estimate" in r["method"]
        assert r["tp"] == tp
        # A bound kernel cannot beat reading its weights at full bandwidth.
        assert r["roofline_ms_per_token"] < r["decode_ms_per_token"]
        sites_ms = sum(s["total_ms"] for s in r["decode_sites"])
        assert r["decode_ms_per_token"] == pytest.approx(sites_ms + r["collectives_ms_per_token"], rel=1e-3)
        assert r["prefill_ms"] > r["decode_ms_per_token"]
        # Qwen3-30B-A3B decode on one rank: milliseconds per token, not microseconds or seconds.
        assert 1 < r["decode_ms_per_token"] < 200
    assert reports[1]["collectives_ms_per_token"] == 0.0 < reports[4]["collectives_ms_per_token"]
    # A TP 4 rank reads about a quarter of the expert and lm_head weights.
    assert reports[4]["roofline_bytes_per_token"] < 0.5 * reports[1]["roofline_bytes_per_token"]
    g = generation(reports[4], 100)
    assert g["latency_ms"] == pytest.approx(reports[4]["prefill_ms"] + 100 * reports[4]["decode_ms_per_token"])


def test_cli_estimate_json_and_score_estimate() -> None:
    out = run("estimate", "--target", "trn3", "--tp", "4", "--format", "json")
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    for key in ("decode_ms_per_token", "prefill_ms", "collectives_ms_per_token", "roofline_ms_per_token"):
        assert report[key] > 0
    assert report["estimate"] is True
    table = run("estimate", "--target", "trn3", "--tp", "4")
    assert table.returncode == 0 and "ESTIMATE" in table.stdout and "not a measurement" in table.stdout
    score = run("score", "--target", "trn3", "--estimate", "--tp", "4", "--prompt", "0")
    assert score.returncode == 0, score.stderr
    assert "ESTIMATED" in score.stdout and "estimated (cost model)" in score.stdout
    bad = run("estimate", "--target", "cpu")
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "trn2 or trn3" in bad.stderr


#: The Neuron path's decode sites of the attention half of a layer (NxDI's attention with the part seams).
NEURON_ATTENTION = ("input_norm", "q_proj", "kv_proj", "q_norm", "k_norm", "rope", "attention", "o_proj")


@pytest.mark.parametrize("head_dim,fused", [(128, True), (64, False)])
def test_neuron_attention_sites_run_only_where_the_block_binds_its_chain(head_dim: int, fused: bool) -> None:
    """At TP 4 the fused attention block (D = 128 only) replaces the input norm and every attention
    site of the Neuron path; bound to its chain, those sites run and the block does not."""
    sites = neuron_call_sites(ModelShapes(head_dim=head_dim), 4, "decode", 1024)
    binding = get_registry().bind(TRN3, sites)
    assert site_runs(binding, "decode.attention_block") is fused
    assert [site_runs(binding, f"decode.{name}") for name in NEURON_ATTENTION] == [not fused] * len(NEURON_ATTENTION)
    assert site_runs(binding, "decode.moe_block") and site_runs(binding, "decode.lm_head")


def test_decode_at_tp_4_runs_two_kernels_per_layer(reports) -> None:  # noqa: ANN001
    """The TP 4 rank's decode is the fused attention block and the fused MoE block per layer, plus
    the final norm and lm_head."""
    sites = {s["site"]: s for s in reports[4]["decode_sites"]}
    assert set(sites) == {"attention_block", "moe_block", "final_norm", "lm_head"}
    assert reports[4]["kernel_launches_per_token"] == 2 * 48 + 2
