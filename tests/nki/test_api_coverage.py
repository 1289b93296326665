"""Every public name of the vendored NKI 0.3.0 API stubs exists in the emulator with the same
parameter list (names, kinds and defaults' presence), read from the stubs with ``ast``."""

from __future__ import annotations

import ast
import inspect
from pathlib import Path
from types import ModuleType

import pytest

from nkimoe.nki import emulator

API = Path(__file__).resolve().parents[2] / ".." / "shared" / "vendor" / "aws-neuron-sdk-nki-0.3.0" / "nki" / "api" / "nki"
NAMESPACES = {
    "nki": ("__init__.py", emulator),
    "nki.language": ("language/__init__.py", emulator.language),
    "nki.isa": ("isa/__init__.py", emulator.isa),
    "nki.collectives": ("collectives/__init__.py", emulator.collectives),
}

pytestmark = pytest.mark.skipif(not API.is_dir(), reason=f"vendored NKI 0.3.0 API absent at {API}")


def _stub_names(tree: ast.Module) -> dict[str, ast.AST]:
    names: dict[str, ast.AST] = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = node
        elif isinstance(node, ast.Assign):
            names.update({t.id: node for t in node.targets if isinstance(t, ast.Name)})
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names[node.target.id] = node
    return {n: node for n, node in names.items() if not n.startswith("_")}


def _stub_params(fn: ast.FunctionDef) -> list[tuple[str, str, bool]]:
    """(name, kind, has default) for each parameter, as ``inspect`` would report it."""
    a = fn.args
    positional = a.posonlyargs + a.args
    defaults = [False] * (len(positional) - len(a.defaults)) + [True] * len(a.defaults)
    out = [(p.arg, "POSITIONAL_ONLY" if p in a.posonlyargs else "POSITIONAL_OR_KEYWORD", d)
           for p, d in zip(positional, defaults)]
    if a.vararg:
        out.append((a.vararg.arg, "VAR_POSITIONAL", False))
    out += [(p.arg, "KEYWORD_ONLY", d is not None) for p, d in zip(a.kwonlyargs, a.kw_defaults)]
    if a.kwarg:
        out.append((a.kwarg.arg, "VAR_KEYWORD", False))
    return out


def _params(fn: object) -> list[tuple[str, str, bool]]:
    sig = inspect.signature(fn)  # type: ignore[arg-type]
    return [(p.name, p.kind.name, p.default is not inspect.Parameter.empty) for p in sig.parameters.values()]


def _cases() -> list[tuple[str, str, ast.AST, ModuleType]]:
    cases = []
    for namespace, (rel, module) in NAMESPACES.items():
        path = API / rel
        if path.is_file():
            cases += [(namespace, name, node, module) for name, node in _stub_names(ast.parse(path.read_text())).items()]
    return cases


@pytest.mark.parametrize("namespace,name,node,module", _cases(), ids=lambda v: v if isinstance(v, str) else "")
def test_name_and_signature_match_the_stub(namespace: str, name: str, node: ast.AST, module: ModuleType) -> None:
    assert hasattr(module, name), f"{namespace}.{name} is missing from the emulator"
    if isinstance(node, ast.FunctionDef):
        assert _params(getattr(module, name)) == _stub_params(node), f"{namespace}.{name} signature differs"
    if isinstance(node, ast.ClassDef):  # a class, or (nl.tile_size) an object of a class with its members
        obj = getattr(module, name)
        cls = obj if inspect.isclass(obj) else type(obj)
        for member in node.body:
            if isinstance(member, ast.Assign):
                for target in member.targets:
                    if isinstance(target, ast.Name):
                        assert hasattr(cls, target.id), f"{namespace}.{name}.{target.id} missing"


def test_every_namespace_has_a_stub() -> None:
    assert sorted(p.relative_to(API).as_posix() for p in API.rglob("__init__.py")) == sorted(
        rel for rel, _ in NAMESPACES.values())
