"""Third-party plugins: the example package through a real entry point, and through NKIMOE_PLUGINS;
a plugin never breaks a model load."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from nkimoe.autoselect import bind_model
from nkimoe.bench.trial import run_trial
from nkimoe.nki.emulator import session
from nkimoe.ops import Problem
from nkimoe.plugins import load_registry
from nkimoe.registry import Registry

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "nkimoe-example-plugin"
EXAMPLE_ENV = {"NKIMOE_PLUGINS": "nkimoe_example_plugin"}


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The example plugin pip-installed (without dependencies) into a fresh target directory."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src") / "plugin"
    shutil.copytree(EXAMPLE, source)  # the build writes metadata next to the sources: keep the repo clean
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
                    "--target", str(target), str(source)], check=True, capture_output=True, timeout=600)
    return target


def _cli(site: Path, *args: str, cache: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(site)}
    env.pop("NKIMOE_PLUGINS", None)
    if cache is not None:
        env["NKIMOE_CACHE"] = str(cache)
    return subprocess.run([sys.executable, "-m", "nkimoe.cli", *args], capture_output=True, text=True, env=env,
                          timeout=600)


def test_installed_entry_point_is_listed_verified_and_timed_side_by_side(installed: Path, tmp_path: Path) -> None:
    plugins = json.loads(_cli(installed, "plugins", "list", "--format", "json").stdout)
    example = next(p for p in plugins if p["name"] == "example")
    assert example["source"] == "entry point nkimoe-example-plugin 0.1.0" and example["status"] == "ok"
    assert example["variants"] == ["rmsnorm_multitile_trn3"] and example["targets"] == ["trn3-lnc1"]
    listed = json.loads(_cli(installed, "registry", "list", "--op", "rmsnorm", "--target", "trn3", "--format",
                             "json").stdout)
    assert any(r["name"] == "rmsnorm_multitile_trn3" and r["plugin"] == "example" for r in listed)
    out = _cli(installed, "bench", "select", "--target", "trn3", "--ops", "rmsnorm", "--format", "json", "--quiet",
               cache=tmp_path / "bench.yaml")
    assert out.returncode == 0, out.stderr
    results = json.loads(out.stdout)["results"]
    rows = [r for r in results if r["candidate"] == "rmsnorm_multitile_trn3"]
    assert rows and all(r["status"] == "ok" for r in rows)  # verified against the reference at every shape
    for row in rows:  # timed beside the builtins: it wins a shape exactly where no builtin is faster
        rivals = [r["time_us"] for r in results if r["shape"] == row["shape"] and r["status"] == "ok"
                  and r["candidate"] != row["candidate"]]
        assert row["winner"] == (row["time_us"] < min(rivals)) or row["time_us"] == min(rivals), row


@pytest.fixture
def example_path(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.syspath_prepend(str(EXAMPLE / "src"))


@pytest.mark.parametrize("tokens", [1, 300, 1024])
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_example_variant_passes_verification(example_path: None, tokens: int, dtype: str) -> None:
    registry = load_registry(EXAMPLE_ENV)
    assert not registry.problems
    trial = run_trial(registry.variants["rmsnorm_multitile_trn3"], Problem.of("rmsnorm", dtype, T=tokens, H=2048),
                      registry.targets["trn3"], seed=tokens)
    assert trial.ok, trial.detail


def test_example_target_profile(example_path: None, tmp_path: Path) -> None:
    registry = load_registry(EXAMPLE_ENV)
    profile = registry.targets["trn3-lnc1"]
    assert profile.family == "trn3" and profile.lnc == 1
    binding, detection = bind_model({"s": Problem.of("router", T=1, E=128, K=8)}, registry=registry,
                                    env={**EXAMPLE_ENV, "NKIMOE_TARGET": "trn3-lnc1",
                                         "NKIMOE_CACHE": str(tmp_path / "c.yaml")})
    assert detection.target is profile and binding.ops["s"].variant.name == "router_nki_trn3"
    with session(profile) as s:
        binding["s"](__import__("torch").randn(1, 128).to(__import__("torch").bfloat16))
    assert s.target.name == "trn3-lnc1" and s.trace


BROKEN_IMPORT = "raise ImportError('needs a kernel library that is not installed')\n"
BAD_TARGET = """
from nkimoe.hookspecs import hookimpl

@hookimpl
def register_targets(register):
    register("trn9")
"""


def test_model_load_survives_broken_plugins(registry_with: Callable[..., Registry],
                                            plugin_dir: Callable[[str, str], str], tmp_path: Path) -> None:
    plugin_dir("broken_import", BROKEN_IMPORT)
    plugin_dir("bad_target", BAD_TARGET)
    env = {"NKIMOE_PLUGINS": "broken_import,bad_target,missing_module", "NKIMOE_TARGET": "trn2",
           "NKIMOE_CACHE": str(tmp_path / "c.yaml")}
    with pytest.warns(UserWarning) as record:
        binding, _ = bind_model({"s": Problem.of("rmsnorm", T=1, H=2048)}, env=env)
    assert binding.ops["s"].variant.name == "rmsnorm_tkg_nki"
    assert len(record) == 1  # one summary warning per load
    text = str(record[0].message)
    assert "'broken_import'" in text and "not installed" in text
    assert "'bad_target'" in text and "not a nkimoe.targets.Target" in text
    assert "'missing_module'" in text and "ModuleNotFoundError" in text
