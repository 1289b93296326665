"""Shared fixtures: isolated registries, plugin modules written on the fly, HF configs."""

from __future__ import annotations

import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

from nkimoe.plugins import load_registry
from nkimoe.registry import Registry


@pytest.fixture
def plugin_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Callable[[str, str], str]:
    """Write a plugin module into a temporary import path; returns its module name."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(name: str, source: str) -> str:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        return name

    return write


@pytest.fixture
def registry_with(plugin_dir: Callable[[str, str], str]) -> Callable[..., Registry]:
    """Load a fresh registry with the given plugin modules (name -> source) via NKIMOE_PLUGINS."""

    def load(**modules: str) -> Registry:
        names = [plugin_dir(name, source) for name, source in modules.items()]
        return load_registry({"NKIMOE_PLUGINS": ",".join(names)})

    return load
