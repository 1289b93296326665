from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from nkimoe.ops import OP_NAMES


def run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("NKIMOE_TARGET", "NEURON_PLATFORM_TARGET_OVERRIDE")}
    return subprocess.run(
        [sys.executable, "-m", "nkimoe.cli", *args], capture_output=True, text=True, env={**clean, **env}, timeout=120
    )


def test_registry_list_has_every_op() -> None:
    table = run("registry", "list")
    assert table.returncode == 0, table.stderr
    for op in OP_NAMES:
        assert f"ref_{op}" in table.stdout
    rows = json.loads(run("registry", "list", "--format", "json").stdout)
    assert {r["op"] for r in rows} == set(OP_NAMES)
    assert {"op", "name", "targets", "nki", "priority"} <= set(rows[0])


def test_target_from_env() -> None:
    out = run("target", NKIMOE_TARGET="trn3")
    assert out.returncode == 0 and "target: trn3" in out.stdout and "NKIMOE_TARGET=trn3" in out.stdout
    out = run("target", "--format", "json", NEURON_PLATFORM_TARGET_OVERRIDE="trn2")
    assert json.loads(out.stdout)["target"] == "trn2"


@pytest.mark.parametrize(
    "args,env,message",
    [
        (("target",), {"NKIMOE_TARGET": "trn9"}, "unknown target 'trn9' from NKIMOE_TARGET; valid targets: cpu, gen3, gen4, trn2, trn3"),
        (("registry", "list", "--op", "softmax"), {}, "unknown op 'softmax'; valid ops: rmsnorm"),
        (("registry", "list", "--target", "tpu"), {}, "unknown target 'tpu'"),
        (("registry", "explain", "gelu", "--target", "trn2"), {}, "unknown op 'gelu'"),
    ],
)
def test_bad_names_exit_2_with_valid_names(args: tuple[str, ...], env: dict[str, str], message: str) -> None:
    out = run(*args, **env)
    assert out.returncode == 2
    assert message in out.stderr


def test_explain_shows_candidates_and_the_binding() -> None:
    out = run("registry", "explain", "rmsnorm", "--target", "trn2", "--tokens", "1024", "--format", "json")
    assert out.returncode == 0, out.stderr
    (block,) = json.loads(out.stdout)
    assert block["problem"].startswith("rmsnorm[T=1024,H=2048]")
    assert any(c["binds"] for c in block["candidates"])
    assert block["why"]


def test_explain_shows_a_composites_fused_candidates_and_its_chain(tmp_path: Path) -> None:
    out = run("registry", "explain", "moe_block", "--target", "trn3", "--tokens", "1", "--no-estimate", "--format",
              "json", NKIMOE_CACHE=str(tmp_path / "none.yaml"))
    assert out.returncode == 0, out.stderr
    (block,) = json.loads(out.stdout)
    rows = {r["variant"]: r for r in block["candidates"]}
    assert set(rows) == {"moe_block_tkg_trn2", "moe_block_tkg_trn3", "moe_block_tkg_trn2_lnc2",
                         "moe_block_tkg_trn3_lnc2", "chain"}
    assert rows["moe_block_tkg_trn3_lnc2"]["binds"] and not rows["chain"]["binds"]
    assert [p["site"] for p in rows["chain"]["parts"]] == ["add_norm", "router_gate", "router", "experts"]
    assert "boundaries at 0.0 us" in rows["chain"]["reason"]
    assert block["binds"] == "moe_block_tkg_trn3_lnc2" and block["decided_by"] == "cache"  # the shipped table
    prefill = json.loads(run("registry", "explain", "moe_block", "--target", "trn3", "--tokens", "128",
                             "--no-estimate", "--format", "json").stdout)[0]
    # the shipped table holds the prefill composite: its chain beat every (ineligible) fused variant
    assert prefill["binds"].startswith("chain(") and "the chain beat every fused variant" in prefill["why"]
    fused_rows = [r for r in prefill["candidates"] if r["variant"].startswith("moe_block_tkg_trn3")]
    assert fused_rows and all("T=128: a decode kernel" in r["reason"] for r in fused_rows)
    listed = json.loads(run("registry", "list", "--op", "moe_block", "--format", "json").stdout)
    assert {r["name"] for r in listed} == {"moe_block_tkg_trn2", "moe_block_tkg_trn3", "moe_block_tkg_trn2_lnc2",
                                           "moe_block_tkg_trn3_lnc2", "ref_moe_block"}
    assert all(r["replaces"] == ["add_rmsnorm", "linear", "router", "expert_mlp"] for r in listed)
