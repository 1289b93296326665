"""Small building blocks shared by the NKI kernels."""

from __future__ import annotations

from nkimoe.nki import nisa, nl


def pe_transpose(dst, src) -> None:  # noqa: ANN001
    """``dst [c, r] (SBUF) = src [r, c] (SBUF)^T`` for r, c <= 128, on TensorE through PSUM
    (bit-exact on NeuronCore-v3 and later)."""
    rows, cols = src.shape
    staged = nl.ndarray((cols, rows), dtype=src.dtype, buffer=nl.psum)
    nisa.nc_transpose(dst=staged, data=src, engine=nisa.engine.tensor)
    nisa.tensor_copy(dst=dst, src=staged)
