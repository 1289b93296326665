"""bench select: verification gates every candidate, the fastest verified one wins, tables and cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from nkimoe.bench.cache import BenchCache, CacheFile, entry_key, write_entries
from nkimoe.bench.select import cache_entries, default_problems, select_problem
from nkimoe.cli import main
from nkimoe.ops import OP_NAMES, Problem
from nkimoe.registry import Registry
from nkimoe.scoring import coverage
from nkimoe.shapes import ModelShapes, call_sites

WRONG_PLUGIN = """
from nkimoe.hookspecs import hookimpl
from nkimoe.nki import nisa, nki, nl
from nkimoe.registry import Variant

@nki.jit
def copy_kernel(x, weight, eps=1e-6):
    # Fast and wrong: returns x unnormalised.
    out = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.shared_hbm)
    t = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=t, src=x)
    nisa.dma_copy(dst=out, src=t)
    return out

def launcher(x, weight, eps=1e-6):
    return copy_kernel(x, weight, eps=eps)

@hookimpl
def register_variants(register):
    register(Variant(op="rmsnorm", name="wrong_rmsnorm_trn2", targets=("trn2",), kernel=launcher, nki=True,
                     priority=100, tolerance={"bfloat16": (1e-3, 1e-2), "float32": (1e-6, 1e-5)}))
"""


def test_wrong_variant_is_rejected_and_never_wins(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(wrong_plugin=WRONG_PLUGIN)
    problem = Problem.of("rmsnorm", T=1, H=2048)
    # Priority alone would rank it first:
    assert registry.for_op("rmsnorm")[0].name == "wrong_rmsnorm_trn2"
    result = select_problem(registry, registry.targets["trn2"], problem, ["s"], "fastest")
    wrong = next(c for c in result.candidates if c.variant == "wrong_rmsnorm_trn2")
    assert wrong.status.startswith("rejected: output 0: |diff|")
    assert result.winner in {"rmsnorm_tkg_nki", "rmsnorm_nki_trn2"}
    assert all(c.method == "estimate" for c in result.verified)


def test_default_problems_cover_every_op_in_both_phases() -> None:
    problems = default_problems(ModelShapes(), 1024, (128,))
    ops = {p.op for p in problems}
    assert len(ops) == 11  # 9 ops and the composites moe_block and attention_block
    assert Problem.of("attention_decode", L=1024, Hq=32, Hkv=4, D=128) in problems
    assert Problem.of("attention_prefill", S=128, Hq=32, Hkv=4, D=128) in problems
    assert Problem.of("linear", T=1, K=2048, N=151_936) in problems


def test_default_problems_at_tp4_are_one_ranks_shapes() -> None:
    problems = default_problems(ModelShapes(), 1024, (128,), tp=4)
    # NxDI's q/k norm modules take head rows: rmsnorm problems, no qk_norm (the fused attention block
    # runs one in decode; its chain's parts are timed with it).
    assert {p.op for p in problems} == set(OP_NAMES) - {"qk_norm"}
    assert Problem.of("attention_decode", L=1024, Hq=8, Hkv=1, D=128) in problems
    assert Problem.of("attention_block", H=2048, Hq=8, Hkv=1, D=128, L=1024) in problems
    assert Problem.of("expert_mlp", T=1, H=2048, I=192, E=128, K=8) in problems  # 768 / 4, unpadded
    assert Problem.of("linear", T=1, K=2048, N=151_936 // 4) in problems  # lm_head's vocabulary slice
    assert Problem.of("linear", T=128, K=1024, N=2048) in problems  # o_proj contracts this rank's heads
    assert Problem.of("rmsnorm", T=8, H=128) in problems  # q norm of 8 heads in decode
    assert not any(p.dim.get("Hq") == 32 for p in problems)


def _cli(*args: str, cache: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NKIMOE_CACHE": str(cache)}
    return subprocess.run([sys.executable, "-m", "nkimoe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=300)


def test_cli_select_show_clear(tmp_path: Path) -> None:
    cache = tmp_path / "bench.yaml"
    out = _cli("bench", "select", "--target", "trn2", "--ops", "router,rope", "--quiet", cache=cache)
    assert out.returncode == 0, out.stderr
    assert "cost-model estimate" in out.stdout and "estimate" in out.stdout
    assert "router_nki_trn2" in out.stdout and f"to {cache}" in out.stdout
    data = json.loads(_cli("bench", "select", "--target", "trn3", "--ops", "router", "--format", "json", "--quiet",
                           cache=cache).stdout)
    assert {r["method"] for r in data["results"] if r["status"] == "ok"} == {"estimate"}
    assert any(r["winner"] and r["candidate"] == "router_nki_trn3" for r in data["results"])
    shown = json.loads(_cli("bench", "show", "--format", "json", cache=cache).stdout)
    local = [e for e in shown["entries"] if e["source"] == "local"]
    assert {e["target"] for e in local} == {"trn2", "trn3"} and {e["method"] for e in local} == {"estimate"}
    cleared = _cli("bench", "clear", "--target", "trn2", cache=cache)
    assert cleared.returncode == 0 and "removed 6 entries for trn2" in cleared.stdout
    shown = json.loads(_cli("bench", "show", "--format", "json", cache=cache).stdout)
    assert {e["target"] for e in shown["entries"] if e["source"] == "local"} == {"trn3"}


def test_cli_select_rejects_cpu_and_unknown_ops(tmp_path: Path) -> None:
    out = _cli("bench", "select", "--target", "cpu", cache=tmp_path / "c.yaml")
    assert out.returncode == 2 and "needs a Neuron target, not 'cpu'; valid: trn2, trn3" in out.stderr
    out = _cli("bench", "select", "--target", "trn2", "--ops", "softmax", cache=tmp_path / "c.yaml")
    assert out.returncode == 2 and "unknown op 'softmax'" in out.stderr
    out = _cli("bench", "select", "--target", "trn2", "--tp", "3", cache=tmp_path / "c.yaml")
    assert out.returncode == 2 and "--tp 3: heads=32, vocab=151936, kv_heads=4 do not split over tp_degree=3" in out.stderr
    assert not (tmp_path / "c.yaml").exists()


def test_a_plugin_variant_binds_only_after_passing_verification(registry_with: Callable[..., Registry],
                                                                tmp_path: Path) -> None:
    registry = registry_with(wrong_plugin=WRONG_PLUGIN)
    trn2 = registry.targets["trn2"]
    path = tmp_path / "bench.yaml"
    cache = BenchCache(CacheFile.read(path))  # no shipped tables: priority decides where nothing is cached
    sites = {**call_sites(ModelShapes(), "prefill", 128), **call_sites(ModelShapes(), "decode", 128)}
    rows = coverage(registry.bind(trn2, sites, cache=cache), ModelShapes(), 128, 1)
    bound = {r.variant for r in (*rows.prefill, *rows.decode) if r.op == "rmsnorm"}
    assert bound and all(registry.variants[v].plugin == "nkimoe.variants.norms" for v in bound)
    candidates, _ = registry.explain(trn2, Problem.of("rmsnorm", T=1, H=2048), cache=cache)
    wrong = next(c for c in candidates if c.variant.name == "wrong_rmsnorm_trn2")
    assert not wrong.eligible and "plugin 'wrong_plugin': no passing verification" in wrong.reason

    # Too wide for the builtin kernels: the plugin's is the only candidate, fails, and nothing wins;
    # at the model's width it fails and a builtin wins. Both verdicts are recorded.
    wide, narrow = Problem.of("rmsnorm", T=1, H=100_000), Problem.of("rmsnorm", T=1, H=2048)
    selections = [select_problem(registry, trn2, p, ["s"], "fastest") for p in (wide, narrow)]
    entries = cache_entries(trn2, selections, "fastest")
    write_entries(path, entries)
    for problem, winner in ((wide, None), (narrow, selections[1].winner)):
        entry = entries[entry_key(trn2, problem, "fastest")]
        assert entry["winner"] == winner
        record = next(c for c in entry["candidates"] if c["variant"] == "wrong_rmsnorm_trn2")
        assert record["status"].startswith("rejected") and record["source_hash"]
    cache = BenchCache(CacheFile.read(path))
    bound = registry.bind(trn2, {"s": wide}, cache=cache).ops["s"]
    assert bound.variant.name == "ref_rmsnorm" and "wrong_rmsnorm_trn2: plugin 'wrong_plugin'" in bound.reason


def test_select_table_shows_eligible_candidates_within_120_columns(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    argv = ["bench", "select", "--target", "trn2", "--ops", "rmsnorm,router", "--seq-len", "8", "--tokens", "4",
            "--cache", str(tmp_path / "c.yaml")]
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert "rmsnorm T=8,H=2048" in err and "router T=1,E=128,K=8" in err  # the bar names the problem
    assert "ineligible:" not in out and "ineligible candidates not shown (--all shows them)" in out
    assert max(len(line) for line in out.splitlines() if str(tmp_path) not in line) <= 120
    assert main([*argv, "--all", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "ineligible: built for trn3, not trn2" in out
    assert max(len(line) for line in out.splitlines() if str(tmp_path) not in line) <= 120


class PartCosts:
    """A cache stub recording the same time for every part variant of a chain."""

    def __init__(self, us: float) -> None:
        self.us = us

    def winner(self, target, problem, policy):  # noqa: ANN001, ANN201
        return None

    def verified(self, target, problem, policy, variant, source_hash):  # noqa: ANN001, ANN201
        return True

    def cost_us(self, target, problem, policy, variant, source_hash):  # noqa: ANN001, ANN201
        return self.us


def test_a_composite_selection_records_the_chain_and_binds_the_winner(tmp_path: Path) -> None:
    from nkimoe.plugins import load_registry
    from nkimoe.registry import CHAIN

    registry = load_registry({})
    target = registry.target("trn3")
    problem = Problem.of("moe_block", T=1, H=2048, E=128, K=8, I=192)
    parts, _, _ = registry.bind_chain("decode.moe_block", target, problem, "fastest", None)
    for part_us, winner in ((100.0, "moe_block_tkg_trn3_lnc2"), (1.0, CHAIN)):  # 4 parts: 400 us or 4 us
        selection = select_problem(registry, target, problem, ["decode.moe_block"], "fastest", cache=PartCosts(part_us))
        chain = next(c for c in selection.candidates if c.variant == CHAIN)
        assert chain.status == "ok" and chain.time_us == 4 * part_us
        assert chain.parts == [p.variant.name for p in parts]
        fused = {c.variant: c for c in selection.candidates if c.variant.startswith("moe_block_tkg_trn3")}
        assert all(c.status == "ok" and c.method == "estimate" and 4 < c.time_us < 400 for c in fused.values())
        assert fused["moe_block_tkg_trn3_lnc2"].time_us < fused["moe_block_tkg_trn3"].time_us
        assert selection.winner == winner
        path = tmp_path / f"{winner}.yaml"
        write_entries(path, cache_entries(target, [selection], "fastest"))
        bound = registry.bind(target, {"decode.moe_block": problem},
                              cache=BenchCache(CacheFile.read(path))).ops["decode.moe_block"]
        assert bound.decided_by == "cache" and bound.is_chain == (winner == CHAIN)
