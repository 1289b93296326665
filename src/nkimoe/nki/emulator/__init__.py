"""A NumPy emulator of the NKI API (0.3.0 signatures; 0.2.0 "Beta 2" idioms accepted).

This package stands in for the ``nki`` module: ``nki.jit``, ``nki.simulate``, ``nki.language``
and ``nki.isa``. It runs kernels unchanged on CPU, enforces the emulated target's limits and
records an instruction trace for the per-target cost model (``nkimoe.bench.costmodel``).
"""

from __future__ import annotations

from nkimoe.nki.emulator import isa, language
from nkimoe.nki.emulator.core import EmulatorError, NkiTensor, Session, session
from nkimoe.nki.emulator.runtime import Kernel, jit, last_session, simulate

__all__ = ["EmulatorError", "Kernel", "NkiTensor", "Session", "isa", "jit", "language", "last_session", "session", "simulate"]
