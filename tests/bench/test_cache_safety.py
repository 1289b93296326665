"""Nothing at the cache path is destroyed: non-files are refused before any work, unwritable paths
fail fast, finished problems are kept, unparsable files are never rewritten by clear, backups are
numbered, and every reader survives any bytes with one warning."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import yaml

from nkimoe.autoselect import bind_model
from nkimoe.bench import select
from nkimoe.bench.cache import CacheFile, entry_key, make_entry, write_entries
from nkimoe.cli import main
from nkimoe.ops import Problem
from nkimoe.plugins import load_registry
from nkimoe.targets import TRN2

REGISTRY = load_registry({})
PROBLEM = Problem.of("rmsnorm", T=1, H=2048)
#: A cheap selection: rope at 8, 4 and 1 tokens.
SELECT = ["bench", "select", "--target", "trn2", "--ops", "rope", "--seq-len", "8", "--tokens", "4", "--quiet"]
#: Not UTF-8, with a NUL and YAML-looking text after it.
BINARY = b"\xff\xfe\x00\x81schema: 1\nentries: {\x9c"


def _entry(winner: str = "rmsnorm_nki_trn2") -> dict:
    return make_entry(TRN2, PROBLEM, "fastest", winner, REGISTRY.variants[winner].source_hash, "estimate",
                      [{"variant": winner, "status": "ok", "time_us": 1.0, "method": "estimate"}])


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, list[str]]:
    """Exit status, stdout and the stderr lines of one in-process command."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err.splitlines()


def _refused(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, path: Path, what: str) -> None:
    def no_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the selection ran although the cache path is unusable")

    monkeypatch.setattr(select, "run_select", no_work)
    code, _, err = _run(capsys, *SELECT, "--cache", str(path))
    assert code == 2 and len(err) == 1, err
    assert err[0].startswith(f"nkimoe: error: benchmark cache {path} ") and what in err[0]


def test_a_directory_at_the_cache_path_is_refused_and_kept(capsys, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    directory = tmp_path / "bench.yaml"
    directory.mkdir()
    (directory / "notes.txt").write_text("mine")
    _refused(capsys, monkeypatch, directory, "is a directory")
    link = tmp_path / "link.yaml"
    link.symlink_to(directory)
    _refused(capsys, monkeypatch, link, "is a directory")
    assert (directory / "notes.txt").read_text() == "mine" and link.is_symlink()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bench.yaml", "link.yaml"]


def test_a_device_at_the_cache_path_is_refused(capsys, monkeypatch) -> None:  # noqa: ANN001
    _refused(capsys, monkeypatch, Path("/dev/null"), "is a device")
    assert Path("/dev/null").is_char_device()


@pytest.mark.parametrize("where", ["under a file", "under /proc"])
def test_an_unwritable_cache_path_fails_before_the_run(capsys, monkeypatch, tmp_path: Path,  # noqa: ANN001
                                                       where: str) -> None:
    if where == "under a file":
        (tmp_path / "file").write_text("")
        path = tmp_path / "file" / "bench.yaml"
    else:
        path = Path("/proc/nkimoe-cache/bench.yaml")  # no lock file can be created there either
    _refused(capsys, monkeypatch, path, "is not writable" if where == "under /proc" else "Not a directory")


def test_finished_problems_are_saved_when_the_run_is_interrupted(monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    real = select.select_problem
    done: list[Problem] = []

    def interrupted_after_two(*args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        if len(done) == 2:
            raise KeyboardInterrupt
        result = real(*args, **kwargs)
        done.append(result.problem)
        return result

    monkeypatch.setattr(select, "select_problem", interrupted_after_two)
    path = tmp_path / "bench.yaml"
    with pytest.raises(KeyboardInterrupt):
        main([*SELECT, "--cache", str(path)])
    entries = CacheFile.read(path).entries
    assert {(e["op"], e["shape"]) for e in entries.values()} == {(p.op, p.signature) for p in done}


def test_clear_refuses_a_file_it_cannot_parse(capsys, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "bench.yaml"
    text = yaml.safe_dump({"schema": 2, "entries": {"k": {"winner": "x", "target": "trn2"}}})
    path.write_text(text)
    monkeypatch.setenv("NKIMOE_CACHE", str(path))
    code, _, err = _run(capsys, "bench", "clear", "--target", "trn3")
    assert code == 2 and len(err) == 1
    assert f"benchmark cache {path} has schema 2, expected 1; not clearing it" in err[0]
    assert path.read_text() == text
    assert {p.name for p in tmp_path.iterdir()} == {"bench.yaml", "bench.yaml.lock"}  # no rewrite, no backup


def test_backups_of_unparsable_files_are_numbered_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "bench.yaml"
    key = entry_key(TRN2, PROBLEM, "fastest")
    for number, junk in enumerate([b"entries: [", BINARY], start=1):
        path.write_bytes(junk)
        write_entries(path, {key: _entry()})
        assert (tmp_path / f"bench.yaml.corrupt-{number}").read_bytes() == junk
        assert CacheFile.read(path).entries[key]["winner"] == "rmsnorm_nki_trn2"


def test_a_symlink_to_a_cache_file_stays_a_symlink(tmp_path: Path) -> None:
    real, link = tmp_path / "real.yaml", tmp_path / "link.yaml"
    link.symlink_to(real)
    write_entries(link, {entry_key(TRN2, PROBLEM, "fastest"): _entry()})
    assert link.is_symlink() and CacheFile.read(real).entries


def test_a_binary_cache_file_survives_every_reader(capsys, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "bench.yaml"
    path.write_bytes(BINARY)
    monkeypatch.setenv("NKIMOE_CACHE", str(path))
    commands = [
        ("bench", "show"),
        ("registry", "explain", "rmsnorm", "--target", "trn2", "--no-estimate"),
        ("coverage", "--target", "trn2"),
        ("score", "--target", "trn2", "--prompt", "0", "--latency-ms", "9000", "--tok-s", "60"),
    ]
    for argv in commands:
        code, _, err = _run(capsys, *argv)
        assert code == 0, (argv, err)
        assert [line for line in err if "warning" in line] == [
            f"nkimoe: warning: benchmark cache {path} is not UTF-8 text (byte 0); ignoring it"], argv
    code, _, err = _run(capsys, "bench", "clear")
    assert code == 2 and len(err) == 1 and f"{path} is not UTF-8 text (byte 0); not clearing it" in err[0]
    with pytest.warns(UserWarning, match="not UTF-8 text") as record:
        binding, _ = bind_model({"s": PROBLEM}, env={"NKIMOE_CACHE": str(path), "NKIMOE_TARGET": "trn2"},
                                registry=REGISTRY)
    assert len(record) == 1 and binding.ops["s"].variant.name == "rmsnorm_tkg_nki"
    assert path.read_bytes() == BINARY  # readers never write
    code, _, err = _run(capsys, *SELECT, "--cache", str(path))  # a writer keeps it as a backup first
    assert code == 0 and (tmp_path / "bench.yaml.corrupt-1").read_bytes() == BINARY
    assert CacheFile.read(path).entries


def test_a_malformed_entry_is_skipped_with_one_warning(capsys, monkeypatch, tmp_path: Path) -> None:  # noqa: ANN001
    path = tmp_path / "bench.yaml"
    good = _entry()
    path.write_text(yaml.safe_dump({"schema": 1, "entries": {
        "good": good, "bad": {**good, "candidates": "rmsnorm_nki_trn2"}}}))
    monkeypatch.setenv("NKIMOE_CACHE", str(path))
    code, out, err = _run(capsys, "bench", "show", "--target", "trn2")
    assert code == 0 and len(err) == 1
    assert "ignoring 1 malformed entry (first 'bad': candidates is not a list of mappings)" in err[0]
    assert "local" in out and "rmsnorm_nki_trn2" in out


@pytest.mark.parametrize("content", [b"date: 2024-13-45\n", b"entries: !!python/object:os.system {}\n",
                                     b"\x00" * 64, random.Random(0).randbytes(256)])
def test_any_bytes_read_as_one_problem(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "bench.yaml"
    path.write_bytes(content)
    read = CacheFile.read(path)
    assert len(read.problems) == 1 and not read.entries
