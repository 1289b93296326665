from __future__ import annotations

from collections.abc import Callable

from nkimoe.ops import OP_NAMES
from nkimoe.plugins import load_registry
from nkimoe.registry import Registry

GOOD = """
from nkimoe.hookspecs import hookimpl
from nkimoe.registry import Variant
from nkimoe import ops

@hookimpl
def register_variants(register):
    register(Variant(op="linear", name="good_linear", targets=("trn3",), kernel=ops.linear,
                     nki=False, exactness="bitexact"))
"""

DUPLICATE = """
from nkimoe.hookspecs import hookimpl
from nkimoe.registry import Variant
from nkimoe import ops

@hookimpl
def register_variants(register):
    register(Variant(op="linear", name="good_linear", targets=("trn2",), kernel=ops.linear,
                     nki=False, exactness="bitexact"))
"""

UNKNOWN_OP = """
from types import SimpleNamespace
from nkimoe.hookspecs import hookimpl
from nkimoe.registry import Variant
from nkimoe import ops

@hookimpl
def register_variants(register):
    register(Variant(op="softmax", name="bad_softmax", targets=("trn2",), kernel=ops.linear,
                     nki=False, exactness="bitexact"))
"""

RAISES = """
from nkimoe.hookspecs import hookimpl

@hookimpl
def register_variants(register):
    raise RuntimeError("kernel library missing")
"""

SHADOWS_BUILTIN = """
from nkimoe.hookspecs import hookimpl
from nkimoe.registry import Variant
from nkimoe import ops

@hookimpl
def register_variants(register):
    register(Variant(op="rmsnorm", name="ref_rmsnorm", targets=("trn2",), kernel=ops.rmsnorm,
                     nki=False, exactness="bitexact"))
"""


def test_builtins_provide_a_reference_per_op() -> None:
    registry = load_registry({})
    assert not registry.problems
    assert {f"ref_{op}" for op in OP_NAMES} <= set(registry.variants)
    assert {"trn2", "trn3", "cpu"} <= set(registry.targets)
    assert all(info.status == "ok" for info in registry.plugins)


def test_duplicate_name_is_rejected_naming_both_plugins(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(first_plugin=GOOD, second_plugin=DUPLICATE)
    assert registry.variants["good_linear"].plugin == "first_plugin"
    assert len(registry.problems) == 1
    problem = registry.problems[0]
    assert "'second_plugin'" in problem and "'first_plugin'" in problem and "good_linear" in problem


def test_builtin_names_cannot_be_replaced(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(shadow=SHADOWS_BUILTIN)
    assert registry.variants["ref_rmsnorm"].plugin == "nkimoe.variants.reference"
    assert "nkimoe.variants.reference" in registry.problems[0] and "'shadow'" in registry.problems[0]


def test_variant_for_unknown_op_is_reported_and_skipped(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(bad_op=UNKNOWN_OP, fine=GOOD)
    assert "bad_softmax" not in registry.variants
    assert "good_linear" in registry.variants
    assert any("'bad_op'" in p and "unknown op 'softmax'" in p for p in registry.problems)


def test_hook_that_raises_is_isolated(registry_with: Callable[..., Registry]) -> None:
    registry = registry_with(raiser=RAISES, fine=GOOD)
    assert "good_linear" in registry.variants
    assert any("'raiser'" in p and "kernel library missing" in p for p in registry.problems)


def test_plugin_that_fails_to_import_is_reported() -> None:
    registry = load_registry({"NKIMOE_PLUGINS": "no_such_module_xyz"})
    assert any("no_such_module_xyz" in p and "ModuleNotFoundError" in p for p in registry.problems)
    assert len([v for v in registry.variants.values() if v.name.startswith("ref_")]) == len(OP_NAMES)


def test_disable_plugins(registry_with: Callable[..., Registry], monkeypatch) -> None:  # noqa: ANN001
    registry_with(fine=GOOD)  # writes the module
    for value in ("fine", "all"):
        registry = load_registry({"NKIMOE_PLUGINS": "fine", "NKIMOE_DISABLE_PLUGINS": value})
        assert "good_linear" not in registry.variants
        assert any(i.name == "fine" and i.status.startswith("disabled") for i in registry.plugins)
