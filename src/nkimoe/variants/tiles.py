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


def matmul_accumulate(dst, stationary, moving) -> None:  # noqa: ANN001
    """``dst (PSUM) = sum over k of stationary[:, k, :].T @ moving[:, k, :]``: the contraction runs over
    the partitions and the middle axis of ``stationary [K, KT, M]`` and ``moving [K, KT, N]``, the
    first matmul overwriting the PSUM tile and the rest accumulating into it in fp32."""
    for k in nl.affine_range(stationary.shape[1]):
        nisa.nc_matmul(dst=dst, stationary=stationary[:, k, :], moving=moving[:, k, :], accumulate=(k > 0))
