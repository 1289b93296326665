"""The benchmark cache: which variant won each (target, LNC, SDK, policy, op, shape, dtype), and
the verification verdict of every candidate that ran.

A YAML file under the user cache directory, or the file named by ``NKIMOE_CACHE`` (or
``--cache``). Reading survives any content: a file that is not a regular file, not UTF-8, not
YAML, of another schema, or holding malformed entries is reported in one line and its unusable
part ignored. Writing only ever replaces a regular file: anything else at the path (a directory,
a device, a symlink to one) is a :class:`CacheError` before any work starts. Writes take a file
lock, re-read the file, merge, and replace it atomically (temporary file + rename), so concurrent
runs keep each other's results; a file that cannot be parsed is first kept as a numbered backup
(``<name>.corrupt-<n>``, never overwritten). Shipped default tables
(``nkimoe/data/default_cache_<target>.yaml``, estimates made by ``nkimoe bench select``) answer
where the local cache has no entry.
"""

from __future__ import annotations

import datetime as _dt
import os
import shutil
import stat
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from filelock import FileLock
from platformdirs import user_cache_dir

from nkimoe.nki import BACKEND, nki
from nkimoe.ops import Problem
from nkimoe.registry import CHAIN, CacheHit
from nkimoe.targets import Target

SCHEMA = 1
#: libyaml's parser where PyYAML was built with it (about 8x faster on the shipped tables).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)
LOCK_TIMEOUT_S = 60


class CacheError(Exception):
    """The cache path cannot be written or cleared; the message names the path and the way out."""


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
        entries, problem = _load_entries(path)
        found.entries = dict(entries)
        if problem:
            found.problems.append(problem)
        return found


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "of an unknown kind"


_Parsed = tuple[dict[str, dict[str, Any]], str | None]
#: path -> (device, inode, mtime, ctime, size) and the entries and problem parsed from that version:
#: a file is parsed once per change.
_PARSED: dict[str, tuple[tuple[int, ...], _Parsed]] = {}


def _load_entries(path: Path) -> _Parsed:
    """The valid entries of the file at ``path`` and the one problem met, if any; never raises.
    The returned mapping is shared between readers of an unchanged file: copy before changing it."""
    try:
        info = path.stat()
    except FileNotFoundError:
        return {}, None
    except OSError as exc:
        return {}, f"benchmark cache {path} is unreadable ({exc.strerror or exc}); ignoring it"
    if not stat.S_ISREG(info.st_mode):
        return {}, f"benchmark cache {path} is {_kind(info.st_mode)}, not a regular file; ignoring it"
    version = (info.st_dev, info.st_ino, info.st_mtime_ns, info.st_ctime_ns, info.st_size)
    known = _PARSED.get(str(path))
    if known is None or known[0] != version:
        known = _PARSED[str(path)] = (version, _parse(path))
    return known[1]


def _parse(path: Path) -> _Parsed:
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return {}, f"benchmark cache {path} is unreadable ({exc.strerror or exc}); ignoring it"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {}, f"benchmark cache {path} is not UTF-8 text (byte {exc.start}); ignoring it"
    try:
        data = yaml.load(text, Loader=_LOADER) if text.strip() else {}
    except Exception as exc:  # any content: YAML errors, and constructors' ValueError/OverflowError on odd scalars
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return {}, f"benchmark cache {path} is corrupt ({reason}); ignoring it"
    if not isinstance(data, dict) or not isinstance(data.get("entries", {}), dict):
        return {}, f"benchmark cache {path} does not hold a mapping of entries; ignoring it"
    if data.get("schema", SCHEMA) != SCHEMA:
        return {}, f"benchmark cache {path} has schema {data.get('schema')!r}, expected {SCHEMA}; ignoring it"
    entries, bad = {}, []
    for key, value in (data.get("entries") or {}).items():
        why = _malformed(key, value)
        if why:
            bad.append(f"{key!r}: {why}")
        else:
            entries[key] = value
    if bad:
        return entries, (f"benchmark cache {path}: ignoring {len(bad)} malformed entr{'y' if len(bad) == 1 else 'ies'}"
                         f" (first {bad[0]})")
    return entries, None


def _malformed(key: Any, entry: Any) -> str | None:
    """Why a cache entry cannot be used, or None."""
    if not isinstance(key, str):
        return "the key is not a string"
    if not isinstance(entry, dict):
        return "not a mapping"
    if "winner" not in entry:
        return "no winner field"
    if entry["winner"] is not None and not isinstance(entry["winner"], str):
        return "winner is not a variant name"
    if not isinstance(entry.get("winner_hash", ""), str):
        return "winner_hash is not a string"
    candidates = entry.get("candidates", [])
    if not isinstance(candidates, list) or not all(isinstance(c, dict) for c in candidates):
        return "candidates is not a list of mappings"
    return None


def check_writable(path: Path) -> Path:
    """Raise :class:`CacheError` unless the cache at ``path`` can be written: nothing there yet, or a
    readable regular file (through symlinks), in a directory where files can be created. Returns the
    path that writes replace (a symlink's target)."""
    hint = "give --cache (or NKIMOE_CACHE) the path of a file"
    try:
        info = path.stat()
    except FileNotFoundError:
        info = None
    except OSError as exc:
        raise CacheError(f"benchmark cache {path} is not usable ({exc.strerror or exc}); {hint}") from None
    if info is not None and not stat.S_ISREG(info.st_mode):
        raise CacheError(f"benchmark cache {path} is {_kind(info.st_mode)}, not a regular file; {hint}")
    real = path.resolve()
    try:
        if info is not None:
            with open(real, "rb"):
                pass
        real.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=real.name + ".", suffix=".probe", dir=real.parent):
            pass
    except OSError as exc:
        raise CacheError(f"benchmark cache {path} is not writable ({exc.strerror or exc}); {hint} in a writable "
                         f"directory") from None
    return real


def _backup(path: Path) -> Path:
    """Keep the file at ``path`` as the first free ``<name>.corrupt-<n>``; no backup is ever overwritten."""
    n = 0
    while True:
        n += 1
        backup = path.with_name(f"{path.name}.corrupt-{n}")
        try:
            os.link(path, backup)
        except FileExistsError:
            continue
        except OSError:  # no hard links on this file system: copy into a freshly created file
            try:
                with open(path, "rb") as src, open(backup, "xb") as dst:
                    shutil.copyfileobj(src, dst)
            except FileExistsError:
                continue
        return backup


def _locked(real: Path) -> FileLock:
    return FileLock(str(real) + ".lock", timeout=LOCK_TIMEOUT_S)


def write_entries(path: Path, new: Mapping[str, dict[str, Any]]) -> None:
    """Merge ``new`` into the file at ``path`` under a lock, atomically. A file with problems (not
    parsable, malformed entries) is kept as a numbered backup before it is replaced."""
    real = check_writable(path)
    try:
        with _locked(real):
            entries, problem = _load_entries(real)
            if problem and real.exists():
                _backup(real)
            _atomic_write(real, {"schema": SCHEMA, "entries": dict(sorted({**entries, **new}.items()))})
    except OSError as exc:
        raise CacheError(f"cannot write the benchmark cache {path}: {exc.strerror or exc}") from None


def remove_entries(path: Path, target: str | None) -> int:
    """Drop every entry (or those of ``target``); returns how many were removed. A file that cannot
    be parsed is left as it is: :class:`CacheError` names it and the problem."""
    if not path.exists() and not path.is_symlink():
        return 0
    real = check_writable(path)
    try:
        with _locked(real):
            entries, problem = _load_entries(real)
            if problem:
                raise CacheError(f"{problem.replace('; ignoring it', '')}; not clearing it: fix, move or delete "
                                 f"the file yourself")
            keep = {k: v for k, v in entries.items() if target is not None and v.get("target") != target}
            _atomic_write(real, {"schema": SCHEMA, "entries": keep})
            return len(entries) - len(keep)
    except OSError as exc:
        raise CacheError(f"cannot write the benchmark cache {path}: {exc.strerror or exc}") from None


def _atomic_write(path: Path, data: Mapping[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        with os.fdopen(fd, "w") as handle:
            yaml.dump(data, handle, Dumper=_DUMPER, sort_keys=False, default_flow_style=False)
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

    def entries_for(self, target: Target, problem: Problem, policy: str) -> Iterator[tuple[str, dict[str, Any], str]]:
        """``(key, entry, where)`` for the problem: the local entry first, then the shipped ones.
        Shipped tables are estimates made with the emulator and answer for any SDK version."""
        key = entry_key(target, problem, policy)
        if key in self.local.entries:
            yield key, self.local.entries[key], "local"
        shipped_key = entry_key(target, problem, policy, sdk="emulator")
        for source in self.shipped:
            if shipped_key in source.entries:
                yield shipped_key, source.entries[shipped_key], "shipped"

    def entry(self, target: Target, problem: Problem, policy: str) -> tuple[str, dict[str, Any], str] | None:
        """The first entry naming a winner for the problem (local over shipped), or None."""
        return next(((k, e, w) for k, e, w in self.entries_for(target, problem, policy) if e["winner"] is not None),
                    None)

    def winner(self, target: Target, problem: Problem, policy: str) -> CacheHit | None:
        found = self.entry(target, problem, policy)
        if found is None:
            return None
        key, entry, where = found
        return CacheHit(str(entry["winner"]), str(entry.get("winner_hash", "")), f"{where} {key}",
                        str(entry.get("method", "estimate")))

    def cost_us(self, target: Target, problem: Problem, policy: str, variant: str, source_hash: str) -> float | None:
        """The time the first entry that ran ``variant`` on the problem records for it at ``source_hash``
        (for ``chain``, a composite's recorded chain sum, whatever the hash), or None."""
        for _, entry, _ in self.entries_for(target, problem, policy):
            record = next((c for c in entry.get("candidates", []) if c.get("variant") == variant), None)
            if record is not None:
                fresh = variant == CHAIN or record.get("source_hash") == source_hash
                time_us = record.get("time_us")
                return float(time_us) if fresh and record.get("status") == "ok" and time_us is not None else None
        return None

    def verified(self, target: Target, problem: Problem, policy: str, variant: str, source_hash: str) -> bool:
        """Whether the first entry that ran ``variant`` on the problem records it as verified at
        ``source_hash`` (the code that is loaded now)."""
        for _, entry, _ in self.entries_for(target, problem, policy):
            record = next((c for c in entry.get("candidates", []) if c.get("variant") == variant), None)
            if record is not None:
                return record.get("status") == "ok" and record.get("source_hash") == source_hash
        return False


def make_entry(target: Target, problem: Problem, policy: str, winner: str | None, winner_hash: str, method: str,
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
