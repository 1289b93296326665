"""Import shim: ``from nkimoe.nki import nki, nl, nisa``.

Gives the real Neuron SDK modules when ``import nki`` works (a Trainium host's Neuron venv),
unless ``NKIMOE_EMULATE=1``; otherwise nkimoe's NumPy emulator. ``BACKEND`` says which is active.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType


def _load() -> tuple[ModuleType, ModuleType, ModuleType, str]:
    if os.environ.get("NKIMOE_EMULATE", "").strip() not in ("1", "true", "yes"):
        try:
            real = importlib.import_module("nki")
            return real, importlib.import_module("nki.language"), importlib.import_module("nki.isa"), "nki"
        except ImportError:
            pass
    from nkimoe.nki import emulator

    return emulator, emulator.language, emulator.isa, "emulator"


nki, nl, nisa, BACKEND = _load()

#: True when kernels run in nkimoe's emulator (no real Neuron SDK, or NKIMOE_EMULATE=1).
EMULATED = BACKEND == "emulator"

__all__ = ["BACKEND", "EMULATED", "nki", "nl", "nisa"]
