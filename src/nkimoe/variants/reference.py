"""Builtin plugin registering each op's torch reference as a ``cpu`` variant (the fallback everywhere)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from nkimoe.hookspecs import hookimpl
from nkimoe.ops import OP_NAMES
from nkimoe.registry import reference_variant


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    for op in OP_NAMES:
        register(reference_variant(op))
