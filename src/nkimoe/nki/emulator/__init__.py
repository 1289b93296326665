"""A NumPy emulator of the NKI API (0.3.0 signatures; 0.2.0 "Beta 2" idioms accepted where
the session emulates NKI 0.2.0).

This package stands in for the ``nki`` module: ``nki.jit``, ``nki.simulate``, ``nki.dtype`` and
one module per namespace as the SDK has them: ``nki.language``, ``nki.isa``,
``nki.collectives`` and ``nki.typing``. It runs kernels unchanged on CPU, enforces the emulated
target's limits and the NKI release's rules, and records an instruction trace for the
per-target cost model (``nkimoe.bench.costmodel``).
"""

from __future__ import annotations

from nkimoe.nki.emulator import collectives, isa, language, typing
from nkimoe.nki.emulator.core import EmulatorError, NkiTensor, Session, session
from nkimoe.nki.emulator.runtime import Kernel, jit, last_session, simulate

#: ``nki.dtype``: the type of NKI dtypes (strings in the emulator), as kernels annotate them.
dtype = typing.dtype

__all__ = ["EmulatorError", "Kernel", "NkiTensor", "Session", "collectives", "dtype", "isa", "jit", "language",
           "last_session", "session", "simulate", "typing"]
