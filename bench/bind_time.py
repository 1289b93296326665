"""Load-time binding on the shipped selection tables: what ``Qwen3Moe`` does at load for its call
sites (prefill of 1024 tokens, decode with a 1024-position cache), timed on this machine.

    python bench/bind_time.py [--target trn3] [--runs 7]

Each run is a fresh interpreter with nkimoe and its builtin plugin modules imported (warm in the
OS file cache; imports are not timed) that times one ``bind_model``: plugin registration,
reading the cache files and binding every call site; then plugin registration and the cache
files again, each alone, and a repeated bind (files are parsed once per change). Medians of
``--runs``; the goal is at most 50 ms for the first bind.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile

RUN = """
import importlib, json, os, time, warnings
from nkimoe.autoselect import bind_model
from nkimoe.bench import cache
from nkimoe.plugins import DEFAULT_PLUGINS, get_registry
from nkimoe.shapes import ModelShapes, call_sites

for name in DEFAULT_PLUGINS:  # imports are not binding
    importlib.import_module(name)

os.environ.update(NKIMOE_TARGET={target!r}, NKIMOE_CACHE={cache!r})
sites = {{**call_sites(ModelShapes(), "prefill", 1024), **call_sites(ModelShapes(), "decode", 1024)}}
timings = {{}}
with warnings.catch_warnings():
    warnings.simplefilter("error")  # a note would mean the tables did not decide: fail loudly
    start = time.perf_counter()
    binding, _ = bind_model(sites)
    timings["first bind"] = time.perf_counter() - start
    assert all(b.decided_by == "cache" for b in binding.ops.values()), binding.summary()
    start = time.perf_counter()
    get_registry(reload=True)
    timings["  plugins (again)"] = time.perf_counter() - start
    cache._PARSED.clear()
    start = time.perf_counter()
    cache.BenchCache.load(targets=({target!r},))
    timings["  cache files (again)"] = time.perf_counter() - start
    repeats = []
    for _ in range(5):
        start = time.perf_counter()
        bind_model(sites)
        repeats.append(time.perf_counter() - start)
    timings["repeated bind"] = sorted(repeats)[2]
print(json.dumps(timings))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="trn3", choices=("trn2", "trn3"))
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    runs = []
    with tempfile.TemporaryDirectory(prefix="nkimoe-bind-") as tmp:
        code = RUN.format(target=args.target, cache=f"{tmp}/none.yaml")  # shipped tables only
        for _ in range(args.runs + 1):  # the first run warms the OS file cache and is not counted
            out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
            runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    runs = runs[1:]
    print(f"load-time binding on {args.target}, shipped tables, median of {args.runs} fresh processes "
          f"(wall time on this machine)")
    for name in runs[0]:
        print(f"  {name:<22} {1e3 * statistics.median(r[name] for r in runs):7.1f} ms")


if __name__ == "__main__":
    main()
