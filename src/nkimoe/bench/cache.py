"""The benchmark cache: which variant won each (target, LNC, SDK, policy, op, shape, dtype).

A YAML file (read with ``yaml.safe_load``) under the user cache directory, or the file named by
``NKIMOE_CACHE``. Writes take a file lock, re-read the file, merge, and replace it atomically
(temporary file + rename), so concurrent runs keep each other's results. A corrupt file is
reported, set aside as ``<name>.corrupt``, and treated as empty. Shipped default tables
(``nkimoe/data/default_cache_<target>.yaml``, estimates made by ``nkimoe bench select``) answer
where the local cache has no entry.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from platformdirs import user_cache_dir

from nkimoe.nki import BACKEND, nki
from nkimoe.ops import Problem
from nkimoe.registry import CacheHit
from nkimoe.targets import Target

SCHEMA = 1


def sdk_version() -> str:
    """``emulator`` off-hardware; the Neuron SDK's NKI version on a Trainium host."""
    if BACKEND == "emulator":
        return "emulator"
    return str(getattr(nki, "__version__", "unknown"))


def cache_path(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if env.get("NKIMOE_CACHE"):
        return Path(env["NKIMOE_CACHE"]).expanduser()
    return Path(user_cache_dir("nkimoe")) / "bench.yaml"


def entry_key(target: Target, problem: Problem, policy: str, sdk: str | None = None) -> str:
    """``target|lnc<N>|<sdk>|<policy>|<op>|<shape signature>|<dtype>``."""
    return "|".join([target.name, f"lnc{target.lnc}", sdk or sdk_version(), policy, problem.op, problem.signature,
                     problem.dtype])


@dataclass
class CacheFile:
    """One YAML cache file: its entries and the problems met reading it."""

    path: Path
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> CacheFile:
        found = cls(path)
        found.entries, problem = _load_entries(path)
        if problem:
            found.problems.append(problem)
        return found


def _load_entries(path: Path) -> tuple[dict[str, dict[str, Any]], str | None]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"benchmark cache {path} is unreadable ({exc}); ignoring it"
    try:
        data = yaml.safe_load(text) if text.strip() else {}
    except yaml.YAMLError as exc:
        return {}, f"benchmark cache {path} is corrupt ({str(exc).splitlines()[0]}); ignoring it"
    if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
        return {}, f"benchmark cache {path} does not hold a mapping of entries; ignoring it"
    if data.get("schema", SCHEMA) != SCHEMA:
        return {}, f"benchmark cache {path} has schema {data.get('schema')!r}, expected {SCHEMA}; ignoring it"
    entries = {k: v for k, v in (data.get("entries") or {}).items() if isinstance(v, dict) and "winner" in v}
    return entries, None


def write_entries(path: Path, new: Mapping[str, dict[str, Any]]) -> None:
    """Merge ``new`` into the file at ``path`` under a lock, atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock", timeout=60):
        entries, problem = _load_entries(path)
        if problem and path.exists():
            path.replace(path.with_name(path.name + ".corrupt"))  # keep the evidence, never overwrite it
        entries.update(new)
        _atomic_write(path, {"schema": SCHEMA, "entries": dict(sorted(entries.items()))})


def remove_entries(path: Path, target: str | None) -> int:
    """Drop every entry (or those of ``target``); returns how many were removed."""
    if not path.exists():
        return 0
    with FileLock(str(path) + ".lock", timeout=60):
        entries, _ = _load_entries(path)
        keep = {k: v for k, v in entries.items() if target is not None and v.get("target") != target}
        _atomic_write(path, {"schema": SCHEMA, "entries": keep})
        return len(entries) - len(keep)


def _atomic_write(path: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.safe_dump(data, handle, sort_keys=False, default_flow_style=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def shipped_path(target: str) -> Path:
    return Path(str(resources.files("nkimoe") / "data" / f"default_cache_{target}.yaml"))


class BenchCache:
    """The local cache layered over the shipped defaults; answers ``Registry.bind``'s lookups."""

    def __init__(self, local: CacheFile, shipped: Iterable[CacheFile] = ()) -> None:
        self.local = local
        self.shipped = list(shipped)

    @classmethod
    def load(cls, env: Mapping[str, str] | None = None, *, targets: Iterable[str] = ("trn2", "trn3")) -> BenchCache:
        return cls(CacheFile.read(cache_path(env)), [CacheFile.read(shipped_path(t)) for t in targets])

    @property
    def problems(self) -> list[str]:
        return [p for f in (self.local, *self.shipped) for p in f.problems]

    def entry(self, target: Target, problem: Problem, policy: str) -> tuple[str, dict[str, Any], str] | None:
        """``(key, entry, where)``: the local entry if any, else a shipped one. Shipped tables are
        estimates made with the emulator and answer for any SDK version."""
        key = entry_key(target, problem, policy)
        if key in self.local.entries:
            return key, self.local.entries[key], "local"
        shipped_key = entry_key(target, problem, policy, sdk="emulator")
        for source in self.shipped:
            if shipped_key in source.entries:
                return shipped_key, source.entries[shipped_key], "shipped"
        return None

    def winner(self, target: Target, problem: Problem, policy: str) -> CacheHit | None:
        found = self.entry(target, problem, policy)
        if found is None:
            return None
        key, entry, where = found
        return CacheHit(str(entry["winner"]), str(entry.get("winner_hash", "")), f"{where} {key}",
                        str(entry.get("method", "estimate")))


def make_entry(target: Target, problem: Problem, policy: str, winner: str, winner_hash: str, method: str,
               candidates: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "target": target.name,
        "lnc": target.lnc,
        "sdk": sdk_version(),
        "policy": policy,
        "op": problem.op,
        "shape": problem.signature,
        "dtype": problem.dtype,
        "winner": winner,
        "winner_hash": winner_hash,
        "method": method,
        "date": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "candidates": candidates,
    }
