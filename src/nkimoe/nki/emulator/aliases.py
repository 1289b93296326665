"""Run code written against ``import nki`` unchanged on the emulator: register the emulator's
modules under the SDK's module names (``nki``, ``nki.language``, ``nki.isa``,
``nki.isa.constants``, ``nki.collectives``, ``nki.typing``)."""

from __future__ import annotations

import sys
from types import ModuleType

from nkimoe.nki.emulator import collectives, isa, language, typing


def _constants() -> ModuleType:
    """``nki.isa.constants``: the ISA enums, as the SDK also exposes them."""
    module = ModuleType("nki.isa.constants", "NKI ISA enums (emulated)")
    for name in ("dge_mode", "dma_engine", "engine", "matmul_perf_mode", "nc_version", "oob_mode", "reduce_cmd"):
        setattr(module, name, getattr(isa, name))
    return module


def install_as_nki() -> None:
    """Make ``import nki`` (and its submodules) resolve to the emulator in this process.

    Refused where the real Neuron SDK is already imported, so the two are never mixed."""
    from nkimoe.nki import emulator
    from nkimoe.nki.emulator.core import EmulatorError

    present = sys.modules.get("nki")
    if present is not None and present is not emulator:
        raise EmulatorError("the Neuron SDK's nki is already imported; the emulator cannot stand in for it")
    constants = _constants()
    isa.constants = constants  # type: ignore[attr-defined]
    sys.modules.update({"nki": emulator, "nki.language": language, "nki.isa": isa, "nki.isa.constants": constants,
                        "nki.collectives": collectives, "nki.typing": typing})
