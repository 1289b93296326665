"""Per-target cost model: turns an emulator trace into an estimated kernel time.

Engines (TensorE, VectorE, ScalarE, GpSimd, DMA) are parallel in-order queues; an instruction
starts when its queue is free and every tensor it reads has been written. Everything this module
returns is an ESTIMATE from documented throughputs, never a measurement.

Rates and overheads (aws-neuron-sdk):
- TensorE: one MultiplyMoving of N moving columns takes max(N, 64) cycles for BF16/FP16/FP8 and
  4x that for FP32 (nki/guides/architecture/trainium_inferentia2_arch.rst); double_row FP8
  contracts 256 rows and MX matmul 512 in the same time (trainium2_arch.rst, trainium3_arch.rst).
  A new stationary costs max(M, 64)/4 cycles of LoadStationary (up to 4x faster than MM).
- VectorE / ScalarE / GpSimd: 128 partitions x free elements x inputs / elements-per-cycle of the
  target (Target.*_elems_per_cycle_*), plus a fixed Target.engine_fixed_cycles per instruction
  (trainium_inferentia2_arch.rst: ~60-cycle access plus dependency overhead). nisa.exponential
  runs at 4x ScalarE's exp rate (trainium3_arch.rst).
- DMA: Target.dma_fixed_ns of latency per transfer and bytes / per-core bandwidth of queue
  occupancy; rows shorter than 2 KiB lose efficiency (nki/deep-dives/nki-dma-bandwidth-guide.rst:
  >= 2 KiB per partition approaches peak).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field

from nkimoe.nki.emulator.core import Instruction
from nkimoe.targets import Target

ENGINES: tuple[str, ...] = ("tensor", "vector", "scalar", "gpsimd", "dma")

#: Contiguous bytes per DMA row from which a transfer runs at full rate.
DMA_FULL_RATE_ROW_BYTES = 2048


@dataclass(frozen=True)
class Estimate:
    """A cost-model estimate of one kernel run on one target (label: ``estimate``)."""

    target: str
    micros: float
    busy_us: dict[str, float] = field(default_factory=dict)
    bound_by: str = ""
    macs: int = 0
    hbm_bytes: int = 0
    instructions: int = 0
    hbm_roofline_fraction: float = 0.0  #: time HBM traffic needs at full bandwidth / estimated time
    tensor_roofline_fraction: float = 0.0  #: time the MACs need at BF16 peak / estimated time
    method: str = "estimate"

    def describe(self) -> str:
        return (f"{self.micros:.2f} us (estimate, {self.target}), bound by {self.bound_by}; "
                f"HBM roofline {self.hbm_roofline_fraction:.0%}, TensorE roofline {self.tensor_roofline_fraction:.0%}")


def _tensor_cycles(instr: Instruction, target: Target, last_stationary: int | None) -> float:
    d = instr.detail
    cycles = max(d.get("n", instr.free), target.matmul_min_cycles) * (4 if d.get("fp32") else 1)
    if d.get("stationary") != last_stationary:
        cycles += max(d.get("m", 128), target.matmul_min_cycles) / 4
    return cycles


def _elementwise_seconds(instr: Instruction, target: Target) -> float:
    elements = target.partitions * max(instr.free, 1) * max(instr.inputs, 1)
    if instr.engine == "vector":
        rate = target.vector_elems_per_cycle_16bit if instr.sixteen_bit else target.vector_elems_per_cycle_other
        if instr.detail.get("rate") == "fast_exp":
            rate = 4 * (target.scalar_elems_per_cycle_16bit if instr.sixteen_bit else target.scalar_elems_per_cycle_other)
        elif instr.detail.get("rate") == 4:
            rate = 4 * target.partitions
        clock = target.vector_hz
    elif instr.engine == "scalar":
        rate = target.scalar_elems_per_cycle_16bit if instr.sixteen_bit else target.scalar_elems_per_cycle_other
        clock = target.scalar_hz
    else:
        rate, clock = target.gpsimd_elems_per_cycle, target.gpsimd_hz
    return (elements / rate + target.engine_fixed_cycles) / clock


def _dma_seconds(instr: Instruction, target: Target) -> tuple[float, float]:
    """(queue occupancy, latency until the data is usable)."""
    bandwidth = target.hbm_bytes_per_s_per_core
    row = instr.contiguous or DMA_FULL_RATE_ROW_BYTES
    efficiency = min(1.0, math.sqrt(max(row, 32) / DMA_FULL_RATE_ROW_BYTES))
    transfer = instr.bytes / (bandwidth * efficiency)
    return transfer, transfer + target.dma_fixed_ns * 1e-9


def estimate(trace: Sequence[Instruction], target: Target) -> Estimate:
    """Estimate the time of ``trace`` on ``target`` (must be a NeuronCore target)."""
    if not target.is_neuron:
        raise ValueError(f"target {target.name!r} has no cost model; use trn2 or trn3")
    free_at: dict[str, float] = defaultdict(float)
    busy: dict[str, float] = defaultdict(float)
    ready: dict[int, float] = defaultdict(float)
    last_stationary: int | None = None
    macs = hbm = 0
    for instr in trace:
        start = max([free_at[instr.engine]] + [ready[s] for s in instr.reads])
        if instr.engine == "tensor":
            duration = _tensor_cycles(instr, target, last_stationary) / target.tensor_hz
            last_stationary = instr.detail.get("stationary")
            done = start + duration
        elif instr.engine == "dma":
            duration, latency = _dma_seconds(instr, target)
            done = start + latency
        else:
            duration = _elementwise_seconds(instr, target)
            done = start + duration
        free_at[instr.engine] = start + duration
        busy[instr.engine] += duration
        for s in instr.writes:
            ready[s] = max(ready[s], done)
        macs += instr.macs
        hbm += instr.hbm_read + instr.hbm_write
    total = max(list(ready.values()) + list(free_at.values()) + [0.0])
    busy_us = {e: busy[e] * 1e6 for e in ENGINES if busy[e] > 0}
    bound = max(busy_us, key=busy_us.get) if busy_us else "none"
    peak_macs_per_s = target.tensor_peak_tflops.get("bf16", 0.0) * 1e12 / 2
    return Estimate(
        target=target.name,
        micros=total * 1e6,
        busy_us=busy_us,
        bound_by=bound,
        macs=macs,
        hbm_bytes=hbm,
        instructions=len(trace),
        hbm_roofline_fraction=(hbm / target.hbm_bytes_per_s_per_core) / total if total else 0.0,
        tensor_roofline_fraction=(macs / peak_macs_per_s) / total if total and peak_macs_per_s else 0.0,
    )
