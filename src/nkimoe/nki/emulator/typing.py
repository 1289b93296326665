"""Emulated ``nki.typing``: the types kernels annotate their arguments with."""

from __future__ import annotations

from nkimoe.nki.emulator.core import NkiTensor

#: An NKI tensor (``nl.ndarray`` result or kernel argument).
tensor = NkiTensor

#: An NKI dtype: the emulator names dtypes by strings (``nl.bfloat16 == "bfloat16"``).
dtype = str

__all__ = ["dtype", "tensor"]
