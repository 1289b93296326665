"""The pluggy hook specifications of nkimoe (project name and entry-point group ``nkimoe``).

A plugin is a module or object with functions marked ``@hookimpl``; each hook receives a
``register`` callback and calls it once per contribution.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pluggy

PROJECT = "nkimoe"

hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def register_targets(register: Callable[[Any], None]) -> None:
    """Contribute hardware targets: call ``register(target)`` with a frozen ``nkimoe.targets.Target``.

    A target's ``name`` must be new; its ``family`` says which variants apply to it (a Trn3
    profile with another LNC setting keeps ``family="trn3"``).
    """


@hookspec
def register_variants(register: Callable[[Any], None]) -> None:
    """Contribute op variants: call ``register(variant)`` with a ``nkimoe.registry.Variant``.

    The variant's ``op`` must be one of ``nkimoe.ops.OP_NAMES``, its ``name`` unique across all
    plugins, its ``targets`` known target families, and its kernel must take the op's reference
    arguments and return what the reference returns.
    """
