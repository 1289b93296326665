"""``nkimoe submit``: one self-contained ``qwen.py`` for both rounds.

The bundle carries the sources of the modules the model needs (targets, op contracts, the
registry core, the NKI shim and emulator, the variant modules whose variants can bind, the model
and its Neuron path) under a private package name, a static registration in place of the pluggy
plugin manager, and the selection tables as Python literals. It imports only the standard
library, torch and numpy, plus the Neuron SDK where present; where the SDK is absent its emulator
needs ml-dtypes and the portable model's checkpoint loader needs safetensors.

Before the file is written, the bundle is imported in a fresh isolated interpreter (``python -I``)
in which ``nkimoe`` cannot be imported, and on a tiny random checkpoint it must reproduce the
package path's tokens and logits on ``cpu`` and on each emulated target; a bundle that fails is
not written. The same inputs give a byte-identical file.
"""

from __future__ import annotations

import importlib
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from nkimoe import __version__
from nkimoe.bench.cache import BenchCache
from nkimoe.registry import CHAIN, Registry

BUNDLE_PACKAGE = "_nkimoe_bundle"

#: The package's modules the bundle carries (variant modules are added per registry).
CORE_MODULES: tuple[str, ...] = (
    "nkimoe", "nkimoe.targets", "nkimoe.ops", "nkimoe.registry", "nkimoe.userfiles", "nkimoe.shapes",
    "nkimoe.nki", "nkimoe.nki.emulator", "nkimoe.nki.emulator.dtypes", "nkimoe.nki.emulator.memory",
    "nkimoe.nki.emulator.core", "nkimoe.nki.emulator.operators", "nkimoe.nki.emulator.isa",
    "nkimoe.nki.emulator.language", "nkimoe.nki.emulator.collectives", "nkimoe.nki.emulator.typing",
    "nkimoe.nki.emulator.lnc", "nkimoe.nki.emulator.runtime", "nkimoe.nki.emulator.aliases",
    "nkimoe.variants", "nkimoe.variants.tiles", "nkimoe.model", "nkimoe.neuron", "nkimoe.neuron.seams",
    "nkimoe.neuron.nxdi",
)

#: Stand-in for nkimoe.hookspecs: variants are registered statically, so the marker does nothing.
_HOOKSPECS = '''"""Bundled stand-in for nkimoe.hookspecs: no plugin manager, variants register statically."""


def hookimpl(function):
    return function
'''

#: Bundled nkimoe.autoselect: the minimal registry core and the embedded selection tables.
_AUTOSELECT = '''"""Bundled load-time binding: static registration and the selection tables of the submission."""

import dataclasses
import importlib
import os
import warnings

from {pkg}.ops import OP_NAMES
from {pkg}.registry import CHAIN, CacheHit, Registry, default_policy, reference_variant
from {pkg}.targets import BUILTIN_TARGETS, detect

VARIANT_MODULES = {modules!r}
#: variant name -> source hash of the package's code it was bundled from
SOURCE_HASHES = {hashes!r}
#: "target|policy|op|shape|dtype" -> (winner, source hash, how it was chosen,
#: {{candidate: (source hash, time in us)}}); a composite's winner may be its chain
TABLES = {tables!r}


def get_registry():
    builtin = [name for name in VARIANT_MODULES if name.startswith("{pkg}.")]
    registry = Registry(builtin_plugins=frozenset([*builtin, "bundle"]))
    for target in BUILTIN_TARGETS:
        registry.add_target(target, "bundle")
    for name in VARIANT_MODULES:
        contributed = []
        importlib.import_module(name).register_variants(contributed.append)
        for variant in contributed:
            registry.add_variant(dataclasses.replace(variant, source_hash=SOURCE_HASHES[variant.name]), name)
    for op in OP_NAMES:
        if "ref_" + op not in registry.variants:
            registry.add_variant(reference_variant(op), "bundle")
    return registry


class Tables:
    """The selection tables as the registry's cache: a plugin variant is verified where it won."""

    problems = []

    @staticmethod
    def _row(target, problem, policy):
        return TABLES.get("|".join([target.name, policy, problem.op, problem.signature, problem.dtype]))

    def winner(self, target, problem, policy):
        entry = self._row(target, problem, policy)
        return None if entry is None else CacheHit(entry[0], entry[1], "bundled " + target.name, entry[2])

    def verified(self, target, problem, policy, variant, source_hash):
        entry = self._row(target, problem, policy)
        return entry is not None and entry[:2] == (variant, source_hash)

    def cost_us(self, target, problem, policy, variant, source_hash):
        entry = self._row(target, problem, policy)
        recorded = None if entry is None else entry[3].get(variant)
        if recorded is None or (variant != CHAIN and recorded[0] != source_hash):
            return None
        return recorded[1]


def bind_model(problems, *, env=None, registry=None):
    env = os.environ if env is None else env
    registry = registry or get_registry()
    detection = detect(env, known=registry.targets)
    binding = registry.bind(detection.target, problems, policy=default_policy(env), cache=Tables())
    if binding.warnings:
        warnings.warn("nkimoe bundle: " + "; ".join(binding.warnings), stacklevel=2)
    return binding, detection
'''

_LOADER = '''
import importlib.abc
import importlib.util
import linecache
import sys

_PACKAGES = {packages!r}


class _BundleImporter(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves the modules embedded in this file."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname not in _SOURCES:
            return None
        return importlib.util.spec_from_loader(fullname, self, is_package=fullname in _PACKAGES)

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        name = module.__name__
        filename = "<nkimoe bundle>/" + name.replace(".", "/") + (".__init__" if name in _PACKAGES else "") + ".py"
        source = _SOURCES[name]
        linecache.cache[filename] = (len(source), None, source.splitlines(True), filename)
        module.__file__ = filename
        if name in _PACKAGES:
            module.__path__ = []
        exec(compile(source, filename, "exec"), module.__dict__)


if not any(isinstance(f, _BundleImporter) for f in sys.meta_path):
    sys.meta_path.insert(0, _BundleImporter())
'''

_IMPORT = re.compile(r"^(\s*)(from|import) nkimoe(?=[.\s])", re.MULTILINE)


class SubmitError(RuntimeError):
    """The bundle could not be built or did not reproduce the package path."""


class OutputError(SubmitError):
    """The output path cannot take the bundle (a directory, not writable, a write that failed)."""


def _rename(source: str) -> str:
    return _IMPORT.sub(rf"\1\2 {BUNDLE_PACKAGE}", source)


def _bundle_name(module: str) -> str:
    return BUNDLE_PACKAGE + module[len("nkimoe"):] if module == "nkimoe" or module.startswith("nkimoe.") else module


def _module_source(name: str) -> str:
    return inspect.getsource(importlib.import_module(name))


def variant_modules(registry: Registry) -> list[str]:
    """Modules defining the registry's variants (builtin and plugin), in a stable order."""
    names = {inspect.getmodule(v.kernel).__name__ for v in registry.variants.values()}
    names.add("nkimoe.variants.reference")
    names.discard("nkimoe.ops")
    return sorted(names)


def selection_tables(registry: Registry, cache: BenchCache,
                     targets: Sequence[str]) -> dict[str, tuple[str, str, str, dict[str, tuple[str, float]]]]:
    """The cache's winners for ``targets`` (local entries over shipped ones), keyed without SDK or LNC,
    with the recorded times of the verified candidates (a composite's binding compares them)."""
    tables: dict[str, tuple[str, str, str, dict[str, tuple[str, float]]]] = {}
    for source in (*reversed(cache.shipped), cache.local):
        for entry in source.entries.values():
            winner = entry.get("winner")
            if entry.get("target") not in targets or (winner not in registry.variants and winner != CHAIN):
                continue
            key = "|".join(str(entry.get(k)) for k in ("target", "policy", "op", "shape", "dtype"))
            costs = {str(c["variant"]): (str(c.get("source_hash", "")), float(c["time_us"]))
                     for c in entry.get("candidates", []) if c.get("status") == "ok" and c.get("time_us") is not None}
            tables[key] = (str(winner), str(entry.get("winner_hash", "")), str(entry.get("method", "")),
                           dict(sorted(costs.items())))
    return dict(sorted(tables.items()))


def build_bundle(registry: Registry, cache: BenchCache, targets: Sequence[str], qwen_source: str) -> str:
    """The text of the single-file bundle (deterministic for the same inputs)."""
    modules = variant_modules(registry)
    sources: dict[str, str] = {}
    for name in (*CORE_MODULES, *modules):
        sources[_bundle_name(name)] = _rename(_module_source(name))
    packages = {_bundle_name(n) for n in ("nkimoe", "nkimoe.nki", "nkimoe.nki.emulator", "nkimoe.variants",
                                          "nkimoe.neuron")}
    for name in modules:  # parent packages of plugin modules
        parts = name.split(".")
        for i in range(1, len(parts)):
            parent = ".".join(parts[:i])
            if parent != "nkimoe" and not parent.startswith("nkimoe."):
                sources.setdefault(parent, "")
                packages.add(parent)
    sources[f"{BUNDLE_PACKAGE}.hookspecs"] = _HOOKSPECS
    bundled_modules = [_bundle_name(m) for m in modules]
    hashes = {v.name: v.source_hash for v in sorted(registry.variants.values(), key=lambda v: v.name)}
    sources[f"{BUNDLE_PACKAGE}.autoselect"] = _AUTOSELECT.format(
        pkg=BUNDLE_PACKAGE, modules=bundled_modules, hashes=hashes, tables=selection_tables(registry, cache, targets))
    header = (f'"""Qwen3-30B-A3B for the AWS Trainium2/3 MoE Kernel Challenge: one file for {", ".join(targets)}.\n\n'
              f"Generated by nkimoe {__version__} (`nkimoe submit`); edit the nkimoe sources, not this file.\n"
              f"It detects the target at load and binds every op to the variant its selection table names.\n"
              '"""\n\n')
    body = [header, "# fmt: off\n", "_SOURCES = {\n"]
    for name in sorted(sources):
        body.append(f"    {name!r}: {sources[name]!r},\n")
    body.append("}\n")
    body.append(_LOADER.format(packages=sorted(packages)))
    body.append("\n# --- the model (qwen.py of the nkimoe repository) ---\n")
    model_part = qwen_source.split('"""', 2)[2].replace("from __future__ import annotations\n", "")
    body.append(_rename(model_part))
    return "".join(body)


# --- verification --------------------------------------------------------------------------------

_PROBE = """
import json, sys
sys.modules["nkimoe"] = None  # the package must not be needed
sys.path.insert(0, {bundle_dir!r})
import torch
import qwen
model = qwen.Qwen3Moe.from_pretrained({checkpoint!r}, max_context=1024, env={env!r})
out = model.generate({prompt!r}, {new_tokens})
print(json.dumps({{"tokens": out.tokens, "logits": out.prefill_logits.float().tolist(),
                  "bindings": {{s: b.name for s, b in model.binding.ops.items()}}}}))
"""


def _package_run(checkpoint: Path, env: Mapping[str, str], prompt: list[int], new_tokens: int) -> dict[str, Any]:
    from nkimoe.model import Qwen3Moe

    model = Qwen3Moe.from_pretrained(checkpoint, max_context=1024, env=env)
    out = model.generate(prompt, new_tokens)
    return {"tokens": out.tokens, "logits": out.prefill_logits.float().tolist(),
            "bindings": {s: b.name for s, b in model.binding.ops.items()}}


def verify_bundle(bundle: Path, targets: Iterable[str], cache_env: Mapping[str, str],
                  progress: Callable[[str], None] = print, new_tokens: int = 4) -> None:
    """Raise SubmitError unless the bundle reproduces the package path on cpu and each target."""
    from nkimoe.demo import write_random_checkpoint

    prompt = [3, 141, 59, 26, 535, 89, 79, 32]
    with tempfile.TemporaryDirectory(prefix="nkimoe-verify-") as tmp:
        checkpoint = write_random_checkpoint(Path(tmp) / "ckpt", layers=1)
        for target in ("cpu", *targets):
            env = {**cache_env, "NKIMOE_TARGET": target}
            progress(f"verifying the bundle on {target} ...")
            expected = _package_run(checkpoint, env, prompt, new_tokens)
            code = _PROBE.format(bundle_dir=str(bundle.parent), checkpoint=str(checkpoint), env=env, prompt=prompt,
                                 new_tokens=new_tokens)
            run = subprocess.run([sys.executable, "-I", "-c", code], capture_output=True, text=True, timeout=1800)
            if run.returncode != 0:
                raise SubmitError(f"the bundle failed on {target} in an isolated interpreter:\n{run.stderr[-3000:]}")
            actual = json.loads(run.stdout.strip().splitlines()[-1])
            for field, what in (("bindings", "binds different variants"), ("tokens", "generates different tokens"),
                                ("logits", "gives different logits")):
                if actual[field] != expected[field]:
                    raise SubmitError(f"the bundle {what} than the package on {target}")


def check_output(output: Path) -> None:
    """Raise :class:`OutputError` unless a file can be written at ``output``."""
    if output.is_dir():
        raise OutputError(f"-o {output} is a directory; give a file path such as {output / 'qwen.py'}")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(prefix=output.name + ".", suffix=".probe", dir=output.parent):
            pass
    except OSError as exc:
        raise OutputError(f"-o {output}: cannot write there ({exc.strerror or exc})") from None


def verify_through_nxdi(bundle: Path, targets: Sequence[str], root: Path, sdks: Sequence[str],
                        progress: Callable[[str], None] = print) -> None:
    """Where the NxDI environment exists (``nkimoe.offhw``: the vendored NxD / NxDI sources and the
    ``[nxdi]`` interpreter), raise SubmitError unless the bundle, loaded by the contest harness's own
    config path on each SDK release in ``sdks``, generates HF transformers' tokens with logits within
    the harness's tolerances of NxDI's own Qwen3-MoE, on cpu and each target."""
    from nkimoe.offhw import runner
    from nkimoe.offhw.environment import vendor_root

    python, vendor = runner.nxdi_python(root), vendor_root(root)
    if not sdks or python is None or not (vendor / "nki-moe" / "main.py").exists():
        return
    with tempfile.TemporaryDirectory(prefix="nkimoe-nxdi-") as tmp:
        harness_file = Path(tmp) / "qwen_with_nki.py"
        harness_file.write_text(bundle.read_text())
        checkpoint = runner.write_checkpoints(python, Path(tmp) / "ckpt")["tiny"]
        for sdk in sdks:
            progress(f"checking the bundle through NxDI {sdk} on CPU ...")
            try:
                result = runner.run_checks(python, sdk, checkpoint, [harness_file], ("cpu", *targets), Path(tmp), vendor)
            except runner.NxdiCheckError as error:
                raise SubmitError(str(error)) from error
            problems = runner.differences(result)
            if problems:
                raise SubmitError("the bundle fails the NxDI check: " + "; ".join(problems))


def submit(output: Path, targets: Sequence[str], registry: Registry, *, root: Path, verify: bool = True,
           progress: Callable[[str], None] = print, nxdi_sdks: Sequence[str] | None = None) -> Path:
    """Build, verify (also through NxDI on ``nxdi_sdks``, default every vendored SDK release, where
    that environment exists) and write the bundle; nothing is written when any step fails."""
    from nkimoe.offhw.environment import SDK_VERSIONS

    from nkimoe.bench.cache import cache_path

    qwen_file = root / "qwen.py"
    if not qwen_file.exists():
        raise SubmitError(f"{qwen_file} not found: run submit from the nkimoe repository")
    check_output(output)  # before minutes of verification
    cache = BenchCache.load(targets=targets)
    text = build_bundle(registry, cache, targets, qwen_file.read_text())
    with tempfile.TemporaryDirectory(prefix="nkimoe-submit-") as tmp:
        candidate = Path(tmp) / "qwen.py"
        candidate.write_text(text)
        if verify:
            verify_bundle(candidate, targets, {"NKIMOE_CACHE": str(cache_path())}, progress)
            verify_through_nxdi(candidate, targets, root, SDK_VERSIONS if nxdi_sdks is None else nxdi_sdks, progress)
    partial = None
    try:  # a file of our own next to the output, renamed over it only once complete
        fd, partial = tempfile.mkstemp(prefix=output.name + ".", suffix=".partial", dir=output.parent)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
        os.chmod(partial, 0o644)
        os.replace(partial, output)
    except OSError as exc:
        if partial is not None:
            Path(partial).unlink(missing_ok=True)
        raise OutputError(f"-o {output}: cannot write the bundle ({exc.strerror or exc})") from None
    return output
