"""nkimoe submit: a deterministic single-file bundle, verified in an isolated interpreter."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nkimoe.bench.cache import BenchCache
from nkimoe.plugins import load_registry
from nkimoe.registry import Registry
from nkimoe.submit import SubmitError, build_bundle, submit

ROOT = Path(__file__).resolve().parents[1]

BROKEN_PLUGIN = """
import broken_helper  # a module of its own that the bundle does not carry
from nkimoe.hookspecs import hookimpl
from nkimoe.registry import Variant
from nkimoe import ops

def rmsnorm(x, weight, eps=1e-6):
    return broken_helper.scale(ops.rmsnorm(x, weight, eps))

@hookimpl
def register_variants(register):
    register(Variant(op="rmsnorm", name="broken_rmsnorm", targets=("trn2",), kernel=rmsnorm, nki=False,
                     priority=99, exactness="bitexact"))
"""


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One verified bundle: submit() raises unless it reproduces the package on cpu, trn2 and trn3."""
    out = tmp_path_factory.mktemp("dist") / "qwen.py"
    submit(out, ["trn2", "trn3"], load_registry({}), root=ROOT, progress=lambda _: None, nxdi_sdks=())
    return out


def test_bundle_imports_in_isolation_without_nkimoe(bundle: Path) -> None:
    code = (
        "import sys; sys.modules['nkimoe'] = None; sys.path.insert(0, %r); import qwen; "
        "banned = {'pluggy', 'yaml', 'tabulate', 'filelock', 'platformdirs', 'nkimoe'}; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in banned and sys.modules[m] is not None)); "
        "print(qwen.NeuronQwen3MoeForCausalLM.__name__)" % str(bundle.parent)
    )
    out = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=300,
                         cwd=bundle.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split("\n")[:2] == ["[]", "NeuronQwen3MoeForCausalLM"]


def test_builds_are_byte_identical(bundle: Path) -> None:
    registry = load_registry({})
    first = build_bundle(registry, BenchCache.load(), ["trn2", "trn3"], (ROOT / "qwen.py").read_text())
    second = build_bundle(load_registry({}), BenchCache.load(), ["trn2", "trn3"], (ROOT / "qwen.py").read_text())
    assert first == second
    assert bundle.read_text() == first


def test_broken_variant_fails_submit_and_writes_nothing(registry_with: Callable[..., Registry], tmp_path: Path,
                                                        plugin_dir: Callable[[str, str], str]) -> None:
    plugin_dir("broken_helper", "def scale(t):\n    return t\n")
    registry = registry_with(broken_plugin=BROKEN_PLUGIN)
    assert "broken_rmsnorm" in registry.variants and not registry.problems
    out = tmp_path / "dist" / "qwen.py"
    with pytest.raises(SubmitError, match=r"(?s)failed on cpu in an isolated interpreter.*No module named 'broken_helper'"):
        submit(out, ["trn2"], registry, root=ROOT, progress=lambda _: None, nxdi_sdks=())
    assert not out.exists() and not out.with_name("qwen.py.partial").exists()


_BIND_IN_BUNDLE = """
import json, sys
sys.modules["nkimoe"] = None
sys.path.insert(0, {where!r})
import qwen
from _nkimoe_bundle.autoselect import bind_model
from _nkimoe_bundle.shapes import ModelShapes, call_sites
problem = call_sites(ModelShapes(), "decode", 1024)["decode.moe_block"]
out = {{}}
for target in ("trn2", "trn3"):
    bound = bind_model({{"decode.moe_block": problem}}, env={{"NKIMOE_TARGET": target}})[0].ops["decode.moe_block"]
    out[target] = [bound.name, bound.decided_by]
print(json.dumps(out))
"""


def test_bundle_carries_the_fused_variants_and_the_composites_selection(tmp_path: Path) -> None:
    from nkimoe.bench.cache import CacheFile, entry_key, make_entry, shipped_path, write_entries
    from nkimoe.registry import CHAIN
    from nkimoe.shapes import ModelShapes, call_sites

    registry = load_registry({})
    trn3 = registry.target("trn3")
    problem = call_sites(ModelShapes(), "decode", 1024)["decode.moe_block"]
    fused = registry.variants["moe_block_tkg_trn3"]
    candidates = [{"variant": fused.name, "status": "ok", "time_us": 180.0, "method": "estimate",
                   "source_hash": fused.source_hash},
                  {"variant": CHAIN, "status": "ok", "time_us": 150.0, "method": "estimate", "source_hash": ""}]
    local = tmp_path / "bench.yaml"
    write_entries(local, {entry_key(trn3, problem, "fastest", sdk="emulator"):
                          make_entry(trn3, problem, "fastest", CHAIN, "", "estimate", candidates)})
    cache = BenchCache(CacheFile.read(local), [CacheFile.read(shipped_path(t)) for t in ("trn2", "trn3")])
    text = build_bundle(registry, cache, ["trn2", "trn3"], (ROOT / "qwen.py").read_text())
    assert "'_nkimoe_bundle.variants.fused'" in text and "def moe_block_tkg_kernel" in text
    (tmp_path / "qwen.py").write_text(text)
    out = subprocess.run([sys.executable, "-I", "-c", _BIND_IN_BUNDLE.format(where=str(tmp_path))], capture_output=True,
                         text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    bound = json.loads(out.stdout.strip().splitlines()[-1])
    # trn3: the local table records the chain as faster; trn2: the shipped table's winner
    assert bound["trn3"][0].startswith("chain(") and bound["trn3"][1] == "cache"
    assert bound["trn2"] == ["moe_block_tkg_trn2_lnc2", "cache"]
    package = registry.bind(trn3, {"decode.moe_block": problem}, cache=cache).ops["decode.moe_block"]
    assert package.name == bound["trn3"][0]
