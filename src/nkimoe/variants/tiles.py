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


def matmul_accumulate(dst, stationary, moving, last_rows: int | None = None) -> None:  # noqa: ANN001
    """``dst (PSUM) = sum over k of stationary[:, k, :].T @ moving[:, k, :]``: the contraction runs over
    the partitions and the middle axis of ``stationary [K, KT, M]`` and ``moving [K, KT, N]``, the
    first matmul overwriting the PSUM tile and the rest accumulating into it in fp32. Only the first
    ``last_rows`` partitions of the last k-tile take part when given (a contraction axis that is not
    a multiple of the partition count: 192 = 128 + 64)."""
    tiles = stationary.shape[1]
    rows = stationary.shape[0] if last_rows is None else last_rows
    if tiles > 1:
        for k in nl.affine_range(tiles - 1):
            nisa.nc_matmul(dst=dst, stationary=stationary[:, k, :], moving=moving[:, k, :], accumulate=(k > 0))
    nisa.nc_matmul(dst=dst, stationary=stationary[0:rows, tiles - 1, :], moving=moving[0:rows, tiles - 1, :],
                   accumulate=(tiles > 1))
