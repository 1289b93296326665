"""The benchmark cache: round trip, stale hashes, corrupt files, concurrent writers, load-time binding."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest
import yaml

from nkimoe.autoselect import bind_model
from nkimoe.bench.cache import BenchCache, CacheFile, entry_key, make_entry, shipped_path, write_entries
from nkimoe.ops import Problem
from nkimoe.plugins import load_registry
from nkimoe.registry import CHAIN
from nkimoe.targets import TRN2, TRN3

REGISTRY = load_registry({})
PROBLEM = Problem.of("rmsnorm", T=1, H=2048)
SITES = {"decode.final_norm": PROBLEM}


def _entry(target, winner: str, digest: str | None = None) -> dict:  # noqa: ANN001
    variant = REGISTRY.variants[winner]
    return make_entry(target, PROBLEM, "fastest", winner, digest or variant.source_hash, "estimate",
                      [{"variant": winner, "status": "ok", "time_us": 1.0, "method": "estimate"}])


def _env(path: Path, **extra: str) -> dict[str, str]:
    return {"NKIMOE_CACHE": str(path), **extra}


def test_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    key = entry_key(TRN3, PROBLEM, "fastest")
    write_entries(path, {key: _entry(TRN3, "rmsnorm_nki_trn3")})
    read = CacheFile.read(path)
    assert read.entries[key]["winner"] == "rmsnorm_nki_trn3" and not read.problems
    assert yaml.safe_load(path.read_text())["entries"][key]["method"] == "estimate"
    hit = BenchCache(read).winner(TRN3, PROBLEM, "fastest")
    assert hit.variant == "rmsnorm_nki_trn3" and hit.method == "estimate" and key in hit.key


def test_trn3_cache_binds_cached_winners(tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    # The cache picks the lower-priority 128-row kernel over the decode kernel priority would pick.
    write_entries(path, {entry_key(TRN3, PROBLEM, "fastest"): _entry(TRN3, "rmsnorm_nki_trn3")})
    binding, detection = bind_model(SITES, env=_env(path, NKIMOE_TARGET="trn3"), registry=REGISTRY)
    assert detection.target.name == "trn3"
    bound = binding.ops["decode.final_norm"]
    assert bound.variant.name == "rmsnorm_nki_trn3" and bound.decided_by == "cache"
    assert "local trn3|lnc2|" in bound.reason
    without = REGISTRY.bind("trn3", SITES).ops["decode.final_norm"]
    assert without.variant.name == "rmsnorm_tkg_nki"


def test_stale_hash_is_ignored_with_one_warning(tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    write_entries(path, {entry_key(TRN3, PROBLEM, "fastest"): _entry(TRN3, "rmsnorm_nki_trn3", "0" * 16)})
    with pytest.warns(UserWarning, match="stale source hash") as record:
        binding, _ = bind_model(SITES, env=_env(path, NKIMOE_TARGET="trn3"), registry=REGISTRY)
    assert len(record) == 1
    assert binding.ops["decode.final_norm"].decided_by == "priority"


@pytest.mark.parametrize("content", ["entries: {a: [1, 2", "- just\n- a list\n", "schema: 99\nentries: {}\n"])
def test_corrupt_or_truncated_file_warns_and_binds(tmp_path: Path, content: str) -> None:
    path = tmp_path / "bench.yaml"
    path.write_text(content)
    with pytest.warns(UserWarning, match="benchmark cache .* ignoring it"):
        binding, _ = bind_model(SITES, env=_env(path, NKIMOE_TARGET="trn2"), registry=REGISTRY)
    assert binding.ops["decode.final_norm"].variant.name == "rmsnorm_tkg_nki"
    write_entries(path, {entry_key(TRN2, PROBLEM, "fastest"): _entry(TRN2, "rmsnorm_nki_trn2")})
    assert (tmp_path / "bench.yaml.corrupt-1").read_text() == content  # set aside, not lost
    assert CacheFile.read(path).entries


def test_trn2_never_binds_a_trn3_variant_even_if_the_cache_says_so(tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    write_entries(path, {entry_key(TRN2, PROBLEM, "fastest"): _entry(TRN2, "rmsnorm_nki_trn3")})
    with pytest.warns(UserWarning, match="unknown or not eligible"):
        binding, _ = bind_model(SITES, env=_env(path, NKIMOE_TARGET="trn2"), registry=REGISTRY)
    assert "trn2" in binding.ops["decode.final_norm"].variant.targets


def test_policy_from_environment(tmp_path: Path) -> None:
    binding, _ = bind_model(SITES, env=_env(tmp_path / "none.yaml", NKIMOE_TARGET="trn2", NKIMOE_POLICY="bitexact"),
                            registry=REGISTRY)
    assert binding.policy == "bitexact" and binding.ops["decode.final_norm"].variant.name == "ref_rmsnorm"
    with pytest.raises(ValueError, match="unknown policy 'speedy' from NKIMOE_POLICY"):
        bind_model(SITES, env=_env(tmp_path / "none.yaml", NKIMOE_POLICY="speedy"), registry=REGISTRY)


def _writer(path: str, prefix: str, count: int) -> None:
    for i in range(count):
        write_entries(Path(path), {f"{prefix}-{i}": {"winner": f"{prefix}{i}", "target": "trn2"}})


def test_concurrent_writers_merge(tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(str(path), name, 15)) for name in ("a", "b")]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    entries = CacheFile.read(path).entries
    assert {f"{n}-{i}" for n in "ab" for i in range(15)} <= set(entries)


def test_shipped_defaults_cover_both_targets() -> None:
    cache = BenchCache.load({"NKIMOE_CACHE": "/nonexistent/bench.yaml"})
    assert not cache.problems
    for target in (TRN2, TRN3):
        hit = cache.winner(target, PROBLEM, "fastest")
        assert hit is not None and hit.key.startswith("shipped") and hit.method == "estimate"
        assert target.family in REGISTRY.variants[hit.variant].targets


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_shipped_defaults_match_the_current_variant_sources(target: str) -> None:
    """A kernel edit makes its shipped entries stale (they stop deciding bindings): regenerate them
    with the command the README gives."""
    entries = CacheFile.read(shipped_path(target)).entries
    assert entries
    # a composite whose chain won names no kernel of its own: its parts have entries of their own
    stale = sorted({e["winner"] for e in entries.values()
                    if e["winner"] != CHAIN and REGISTRY.variants[e["winner"]].source_hash != e["winner_hash"]})
    assert not stale, f"shipped {target} entries with a stale source hash: {stale}"
