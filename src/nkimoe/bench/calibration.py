"""The cost model against published hardware measurements (``data/calibration.yaml``).

Each measurement names a kernel below (written here after the published description of the
measured kernel), its inputs, the hardware generation and what was measured: ``kernel_us`` (a
kernel's device latency), ``dma_engine_us`` (one DMA engine's busy time in a profile) or
``interval_us`` (the time between the starts of consecutive compute instructions in a profile). The model
runs the kernel in the emulator on that generation's :class:`~nkimoe.targets.Target` and reports
its ESTIMATE over the measurement. Nothing here adjusts the model.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from typing import Any

import numpy as np
import yaml

from nkimoe.bench.costmodel import Estimate, estimate, schedule
from nkimoe.nki import nisa, nki, nl
from nkimoe.nki.emulator import session
from nkimoe.targets import TRN1, TRN2, TRN3, Target

TARGETS = {t.name: t for t in (TRN1, TRN2, TRN3)}


@nki.jit
def single_load(x):
    """One HBM -> SBUF DMA of all of ``x`` (rows on partitions)."""
    tile = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=x)
    return nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)


@nki.jit
def scalar_chain(x, count):
    """``count`` ScalarE activations (identity with a scale) of one element per partition, each
    reading the previous one's output."""
    tile = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
    nisa.dma_copy(dst=tile, src=x)
    for _ in range(count):
        result = nl.ndarray(x.shape, dtype=x.dtype, buffer=nl.sbuf)
        nisa.activation(dst=result, op=nl.copy, data=tile, scale=1.0)
        tile = result
    return nl.ndarray((1, 1), dtype=x.dtype, buffer=nl.shared_hbm)


@nki.jit
def vector_add_rows(a, b, rows_per_tile):
    """``a + b`` of 1-D vectors, ``rows_per_tile`` elements per tile, one element per partition."""
    n = a.shape[0]
    out = nl.ndarray((n,), dtype=a.dtype, buffer=nl.shared_hbm)
    for m in nl.affine_range(n // rows_per_tile):
        window = slice(m * rows_per_tile, (m + 1) * rows_per_tile)
        a_tile = nl.ndarray((rows_per_tile, 1), dtype=a.dtype, buffer=nl.sbuf)
        b_tile = nl.ndarray((rows_per_tile, 1), dtype=b.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=a_tile, src=a[window])
        nisa.dma_copy(dst=b_tile, src=b[window])
        total = nl.ndarray((rows_per_tile, 1), dtype=a.dtype, buffer=nl.sbuf)
        nisa.tensor_scalar(dst=total, data=a_tile, op0=nl.add, operand0=b_tile)
        nisa.dma_copy(dst=out[window], src=total)
    return out


@nki.jit
def vector_add_streamed(a, b, free):
    """``a + b`` of 1-D vectors viewed as [128, n / 128], ``free`` columns per tile."""
    n = a.shape[0]
    a2, b2 = a.reshape((128, n // 128)), b.reshape((128, n // 128))
    out = nl.ndarray((128, n // 128), dtype=a.dtype, buffer=nl.shared_hbm)
    for m in nl.affine_range(n // (128 * free)):
        cols = slice(m * free, (m + 1) * free)
        a_tile = nl.ndarray((128, free), dtype=a.dtype, buffer=nl.sbuf)
        b_tile = nl.ndarray((128, free), dtype=b.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=a_tile, src=a2[:, cols])
        nisa.dma_copy(dst=b_tile, src=b2[:, cols])
        total = nl.ndarray((128, free), dtype=a.dtype, buffer=nl.sbuf)
        nisa.tensor_tensor(dst=total, data1=a_tile, data2=b_tile, op=nl.add)
        nisa.dma_copy(dst=out[:, cols], src=total)
    return out


@nki.jit
def matmul_tiled(lhs_t, rhs, hoist, hoist_moving=False):
    """``lhs_t.T @ rhs`` in [128, 128] x [128, 512] tiles; ``hoist`` loads each M tile's column of
    ``lhs_t`` once per M tile instead of once per output tile, and ``hoist_moving`` each output
    tile's column of ``rhs`` in one loop before its matmuls instead of one tile per matmul."""
    k, m = lhs_t.shape
    n = rhs.shape[1]
    out = nl.ndarray((m, n), dtype=lhs_t.dtype, buffer=nl.shared_hbm)
    for i in nl.affine_range(m // 128):
        if hoist:
            column = nl.ndarray((128, k // 128, 128), dtype=lhs_t.dtype, buffer=nl.sbuf)
            for kk in nl.affine_range(k // 128):
                nisa.dma_copy(dst=column[:, kk, :], src=lhs_t[kk * 128:(kk + 1) * 128, i * 128:(i + 1) * 128])
        for j in nl.affine_range(n // 512):
            if hoist_moving:
                moving_column = nl.ndarray((128, k // 128, 512), dtype=rhs.dtype, buffer=nl.sbuf)
                for kk in nl.affine_range(k // 128):
                    nisa.dma_copy(dst=moving_column[:, kk, :], src=rhs[kk * 128:(kk + 1) * 128, j * 512:(j + 1) * 512])
            acc = nl.ndarray((128, 512), dtype=nl.float32, buffer=nl.psum)
            for kk in nl.affine_range(k // 128):
                if hoist:
                    stationary = column[:, kk, :]
                else:
                    stationary = nl.ndarray((128, 128), dtype=lhs_t.dtype, buffer=nl.sbuf)
                    nisa.dma_copy(dst=stationary, src=lhs_t[kk * 128:(kk + 1) * 128, i * 128:(i + 1) * 128])
                if hoist_moving:
                    moving = moving_column[:, kk, :]
                else:
                    moving = nl.ndarray((128, 512), dtype=rhs.dtype, buffer=nl.sbuf)
                    nisa.dma_copy(dst=moving, src=rhs[kk * 128:(kk + 1) * 128, j * 512:(j + 1) * 512])
                nisa.nc_matmul(dst=acc, stationary=stationary, moving=moving, accumulate=kk > 0)
            result = nl.ndarray((128, 512), dtype=lhs_t.dtype, buffer=nl.sbuf)
            nisa.tensor_copy(dst=result, src=acc)
            nisa.dma_copy(dst=out[i * 128:(i + 1) * 128, j * 512:(j + 1) * 512], src=result)
    return out


KERNELS: dict[str, Callable[..., Any]] = {
    "single_load": single_load,
    "scalar_chain": scalar_chain,
    "vector_add_rows": vector_add_rows,
    "vector_add_streamed": vector_add_streamed,
    "matmul_tiled": matmul_tiled,
}


@dataclass(frozen=True)
class Measurement:
    """One published hardware measurement of a kernel the emulator runs."""

    name: str
    kernel: str
    inputs: list[list[Any]]  #: [shape, dtype] per array argument
    options: dict[str, Any]
    target: str
    quantity: str  #: "kernel_us", "dma_engine_us" or "interval_us"
    measured_us: float
    source: str
    url: str
    note: str = ""
    heavy: bool = False  #: minutes in the emulator: run by bench/calibration.py, not by the test suite


def load_measurements() -> list[Measurement]:
    data = yaml.safe_load(resources.files("nkimoe.data").joinpath("calibration.yaml").read_text())
    return [Measurement(**m) for m in data["measurements"]]


def _inputs(m: Measurement) -> list[np.ndarray]:
    return [np.ones(shape, dtype=dtype) for shape, dtype in m.inputs]


def model_estimate(m: Measurement) -> tuple[float, Estimate]:
    """The model's figure for the quantity ``m`` measured (microseconds, an estimate)."""
    target = TARGETS[m.target]
    with session(target) as s:
        KERNELS[m.kernel](*_inputs(m), **m.options)
    est = estimate(s.trace, target)
    if m.quantity == "dma_engine_us":
        return est.busy_us.get("dma", 0.0), est
    if m.quantity == "interval_us":  # a chain on one engine: starts are as far apart as completions
        done = [t for (_, t), instr in zip(schedule(s.trace, target), s.trace) if instr.engine != "dma"]
        return (done[-1] - done[0]) / (len(done) - 1) * 1e6, est
    return est.micros, est
