"""Builtin plugin contributing the trn2, trn3 and cpu targets."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nkimoe.hookspecs import hookimpl
from nkimoe.targets import BUILTIN_TARGETS


@hookimpl
def register_targets(register: Callable[[Any], None]) -> None:
    for target in BUILTIN_TARGETS:
        register(target)
