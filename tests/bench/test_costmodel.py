"""The cost model's direction and order of magnitude per target (never exact numbers)."""

from __future__ import annotations

import numpy as np
import pytest

from nkimoe.bench.costmodel import estimate
from nkimoe.nki import nki, nisa, nl
from nkimoe.nki.emulator import session
from nkimoe.targets import TRN2, TRN3


@nki.jit
def copy_kernel(x):
    """HBM -> SBUF -> HBM in [128, 2048] chunks (4 KiB per partition row): DMA-bound."""
    rows, cols = x.shape
    out = nl.ndarray((rows, cols), dtype=x.dtype, buffer=nl.shared_hbm)
    for j in nl.affine_range(cols // 2048):
        t = nl.ndarray((128, 2048), dtype=x.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=t, src=x[:, j * 2048:(j + 1) * 2048])
        nisa.dma_copy(dst=out[:, j * 2048:(j + 1) * 2048], src=t)
    return out


@nki.jit
def matmul_heavy_kernel(a, b):
    """200 bf16 matmuls on operands loaded once: TensorE-bound."""
    out = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.shared_hbm)
    st = nl.ndarray((128, 128), dtype=a.dtype, buffer=nl.sbuf)
    mv = nl.ndarray((128, 512), dtype=b.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=st, src=a)
    nisa.dma_copy(dst=mv, src=b)
    acc = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
    for i in nl.affine_range(200):
        nisa.nc_matmul(dst=acc, stationary=st, moving=mv, accumulate=i > 0)
    res = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.sbuf)
    nisa.tensor_copy(dst=res, src=acc)
    nisa.dma_copy(dst=out, src=res)
    return out


def _run(kernel, target: str, *args: np.ndarray):  # noqa: ANN001, ANN202
    with session(target) as s:
        kernel(*args)
    return estimate(s.trace, TRN2 if target == "trn2" else TRN3)


def test_dma_bound_kernel_scales_with_hbm_bandwidth() -> None:
    x = np.zeros((128, 32768), dtype=np.float32).astype(np.float16)
    trn2, trn3 = _run(copy_kernel, "trn2", x), _run(copy_kernel, "trn3", x)
    assert trn2.bound_by == trn3.bound_by == "dma"
    ratio = trn2.micros / trn3.micros
    bandwidth_ratio = TRN3.hbm_bytes_per_s_per_core / TRN2.hbm_bytes_per_s_per_core
    assert trn3.micros < trn2.micros
    assert 0.8 * bandwidth_ratio < ratio < 1.2 * bandwidth_ratio
    # 16 MiB moved at a few hundred GB/s per core: tens of microseconds, not nano or milli.
    assert 10 < trn2.micros < 1000
    assert trn2.hbm_bytes == 2 * x.nbytes and trn2.hbm_roofline_fraction > 0.5


def test_tensor_bound_bf16_kernel_is_about_equal_on_both() -> None:
    a = np.ones((128, 128), dtype=np.float16)
    b = np.ones((128, 512), dtype=np.float16)
    trn2, trn3 = _run(matmul_heavy_kernel, "trn2", a, b), _run(matmul_heavy_kernel, "trn3", a, b)
    assert trn2.bound_by == trn3.bound_by == "tensor"
    assert trn2.micros == pytest.approx(trn3.micros, rel=0.15)
    assert trn2.macs == 200 * 128 * 128 * 512
    assert trn2.tensor_roofline_fraction > 0.5


def test_estimates_are_labelled() -> None:
    est = _run(copy_kernel, "trn3", np.zeros((128, 2048), dtype=np.float16))
    assert est.method == "estimate" and "estimate" in est.describe()
    with pytest.raises(ValueError, match="has no cost model"):
        from nkimoe.targets import CPU

        estimate([], CPU)
