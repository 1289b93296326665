"""Per-target cost model: turns an emulator trace into an estimated kernel time.

Everything this module returns is an ESTIMATE from AWS's documents, never a measurement. Each
physical core (``nl.program_id``; ``kernel[2]`` runs two) has its own in-order compute engines,
DMA queues and 16 DMA engines; the two cores of a pair share one HBM stack's bandwidth.

Modelled effects and their sources (aws-neuron/aws-neuron-sdk):

- DMA engines (nki/get-started/about/nki-dma-overview.rst): every ``dma_copy`` is spread over the
  16 engines of its core, eight SBUF partitions per engine, so a transfer spanning few partitions
  uses few engines. Each engine spends ``bytes / rate + descriptors x DMA_DESCRIPTOR_NS`` on its
  share (a descriptor is one contiguous run, at least one per partition), and the engines a
  transfer does not span still write its completion semaphore (one descriptor each).
  ``Target.dma_fixed_ns`` (~1.3 us, nki/deep-dives/nki-dma-bandwidth-guide.rst) passes between
  the trigger and the start of the data (latency, overlapped between transfers).
- DMA queues (nki-dma-overview.rst): transfers of one queue run in order, and a queue starts at
  most one transfer every ``DMA_QUEUE_NS`` (the per-transfer cost that makes small DMAs slow);
  queues are tied to the trigger and descriptor generation, so loads into the chip, stores to HBM,
  on-chip copies and dynamic (DGE) transfers each have their own queue and a store waiting for its
  data does not hold up an independent load. A DMA whose address depends on a run-time offset is a
  DGE DMA: it reads the offset tensor and costs ``Target.dge_ns`` of descriptor generation before
  it starts (nki/deep-dives/nki-dge.rst: ~600 ns per hardware-DGE instruction on NeuronCore-v3).
- DMA transpose runs at 90 % (HBM source) or 50 % (SBUF source) of copy throughput
  (nki/guides/architecture/trainium2_arch.rst).
- TensorE: one MultiplyMoving of N moving columns takes max(N, 64) cycles for BF16/FP16/FP8 and
  4x that for FP32 (nki/guides/architecture/trainium_inferentia2_arch.rst); a new stationary
  costs max(M, 64)/4 cycles of LoadStationary ("up to 4x faster" than MultiplyMoving, same file).
  dI/dt throttling (tools/neuron-explorer/overview-summary-page.rst, Trn2 and Trn3): a burst
  starts at ``Target.tensor_throttled_rate`` (~50 %) of the full rate and ramps linearly to full
  over ``Target.tensor_ramp_ns`` (~3 us); once a ramp is done, an instruction that finds TensorE
  less than half busy over the preceding window starts a new one.
- VectorE (trainium2_arch.rst, "Vector Engine performance mode"): 4x the NeuronCore-v2 rate only
  for tensor_copy/tensor_scalar with BF16/FP16 operands all in SBUF and unit-stride; 2x for those
  with a PSUM operand or strided, and for tensor_tensor on SBUF BF16/FP16 inputs; 1x otherwise.
  Trn3 ScalarE's tensor_copy/tensor_scalar get the same 2x (trainium3_arch.rst). nisa.exponential
  runs at 4x ScalarE's exp rate (trainium3_arch.rst). Every instruction adds
  ``Target.engine_fixed_cycles`` (trainium_inferentia2_arch.rst: static overhead of 100 cycles).
- Hazards: an instruction waits for earlier writes of the bytes it reads (read-after-write), and a
  write waits for earlier reads and writes of the bytes it overwrites (write-after-read,
  write-after-write), at the granularity of the byte interval each operand covers.

Not modelled: the start-up and tear-down of a NEFF execution around the kernel
(nki/guides/tutorials/fused_mamba.rst names it; no AWS document gives its size per target).
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from nkimoe.nki.emulator.core import Instruction, Span
from nkimoe.targets import Target

ENGINES: tuple[str, ...] = ("tensor", "vector", "scalar", "gpsimd", "dma")

#: SBUF partitions one DMA engine serves (nki-dma-overview.rst: "each DMA engine corresponds to
#: 8 partition lanes").
PARTITIONS_PER_DMA_ENGINE = 8

#: Engine time per DMA descriptor beyond its bytes. Profiles in AWS's documents show engines
#: moving small descriptors in a few nanoseconds: a 4 B transfer takes 7 ns
#: (nki/deep-dives/nki_perf_guide.rst, fig29.png, "Example timeline with tiny DMA transfers"), and
#: nki-dma-overview.rst's Example 2 profile (nki-dma-intro-5.png, Trn2) shows each engine moving
#: its 2 KiB share of a [128, 128] bf16 load in 97 ns, i.e. 2 KiB / 23 B/ns + ~8 ns (the model,
#: counting a descriptor per partition, gives 89 + 8 x 7 = 145 ns there).
DMA_DESCRIPTOR_NS = 7.0

#: Least time between the starts of two transfers of one DMA queue. nki-dma-overview.rst's
#: throughput curve (nki-dma-intro-1.jpg, Trn2, p_dim=128) is flat in time up to ~1 KiB per
#: partition and reaches 1.4 / 2.6 / 5.0 / 10.3 / 20.9 / 42.4 % of its plateau at 32 ... 1024 B
#: per partition: each is (8 x bytes / 23 B/ns) / ~850 ns, and max(850 ns, engine time) gives its
#: 2 KiB and 4 KiB points (84 % and 96 %; read 81 % and 97 %). The engine time per descriptor is
#: a few ns (above), so this cost belongs to the transfer, not to its descriptors. No curve is
#: published for Trn1 or Trn3; the same time is assumed.
DMA_QUEUE_NS = 850.0

#: DMA transpose throughput relative to a copy (trainium2_arch.rst): HBM source / SBUF source.
DMA_TRANSPOSE_EFFICIENCY = {"hbm": 0.9, "sbuf": 0.5}


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
    hbm_roofline_fraction: float = 0.0  #: time HBM traffic needs at the cores' bandwidth / estimated time
    tensor_roofline_fraction: float = 0.0  #: time the MACs need at BF16 peak / estimated time
    programs: int = 1  #: physical cores the kernel ran on
    method: str = "estimate"

    def describe(self) -> str:
        return (f"{self.micros:.2f} us (estimate, {self.target}), bound by {self.bound_by}; "
                f"HBM roofline {self.hbm_roofline_fraction:.0%}, TensorE roofline {self.tensor_roofline_fraction:.0%}")


class _Timeline:
    """Busy intervals of one DMA engine; a transfer takes the earliest gap that fits (engines serve
    several queues, so a later transfer may run before a stalled earlier one)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.ends: list[float] = []

    def earliest(self, t: float, duration: float) -> float:
        i = bisect.bisect_right(self.ends, t)
        while i < len(self.starts):
            if self.starts[i] >= t + duration:
                return t
            t = max(t, self.ends[i])
            i += 1
        return t

    def reserve(self, start: float, duration: float) -> None:
        i = bisect.bisect_right(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, start + duration)


@dataclass
class _Core:
    """The scheduling state of one physical core."""

    engine_free: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    queue_free: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    dma_engines: list[_Timeline] = field(default_factory=list)
    dma_busy: dict[int, float] = field(default_factory=lambda: defaultdict(float))
    queue_busy: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    busy: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    last_stationary: int | None = None
    tensor_ramp_start: float | None = None
    tensor_recent: deque[tuple[float, float]] = field(default_factory=deque)  #: TensorE intervals of the last window
    end: float = 0.0


class _SpanTable:
    """Accesses of one allocation, sorted by first byte, with their completion times."""

    def __init__(self) -> None:
        self.los: list[int] = []
        self.entries: list[tuple[Span, float]] = []
        self.longest = 0

    def _candidates(self, span: Span) -> range:
        """Indices of entries that may overlap ``span`` (first byte within reach of it)."""
        first = bisect.bisect_right(self.los, span.lo - self.longest)
        return range(first, bisect.bisect_left(self.los, span.hi))

    def latest(self, span: Span) -> float:
        return max((self.entries[i][1] for i in self._candidates(span) if self.entries[i][0].overlaps(span)),
                   default=0.0)

    def add(self, span: Span, done: float) -> None:
        i = bisect.bisect_right(self.los, span.lo)
        self.los.insert(i, span.lo)
        self.entries.insert(i, (span, done))
        self.longest = max(self.longest, span.hi - span.lo)

    def drop_covered(self, span: Span) -> None:
        for i in reversed(self._candidates(span)):
            if span.covers(self.entries[i][0]):
                del self.los[i], self.entries[i]


class _Hazards:
    """Completion times of earlier reads and writes of the bytes of each allocation."""

    def __init__(self) -> None:
        self.writes: dict[int, _SpanTable] = defaultdict(_SpanTable)
        self.reads: dict[int, _SpanTable] = defaultdict(_SpanTable)

    def ready(self, instr: Instruction) -> float:
        """When every hazard of ``instr`` is resolved."""
        times = [self.writes[s.storage].latest(s) for s in instr.read_spans]
        for s in instr.write_spans:
            times += [self.writes[s.storage].latest(s), self.reads[s.storage].latest(s)]
        return max(times, default=0.0)

    def record(self, instr: Instruction, done: float) -> None:
        for s in instr.read_spans:
            self.reads[s.storage].add(s, done)
        for s in instr.write_spans:
            # Later accesses wait for this write, which waited for every access it covers.
            self.reads[s.storage].drop_covered(s)
            self.writes[s.storage].drop_covered(s)
            self.writes[s.storage].add(s, done)


def _tensor_cycles(instr: Instruction, target: Target, core: _Core) -> float:
    d = instr.detail
    cycles = max(d.get("n", instr.free), target.matmul_min_cycles) * (4 if d.get("fp32") else 1)
    if d.get("stationary") != core.last_stationary:
        cycles += max(d.get("m", 128), target.matmul_min_cycles) / 4
    core.last_stationary = d.get("stationary")
    return cycles


def _throttled_seconds(work: float, start: float, target: Target, core: _Core) -> float:
    """Time TensorE needs for ``work`` seconds at full rate from ``start``, under dI/dt throttling:
    the rate ramps linearly from ``tensor_throttled_rate`` to 1 over ``tensor_ramp_ns``."""
    window, low = target.tensor_ramp_ns * 1e-9, target.tensor_throttled_rate
    if window <= 0 or low >= 1:
        return work
    recent = core.tensor_recent
    while recent and recent[0][1] <= start - window:
        recent.popleft()
    busy = sum(min(end, start) - max(begin, start - window) for begin, end in recent)
    if core.tensor_ramp_start is None or (start - core.tensor_ramp_start >= window and busy < window / 2):
        core.tensor_ramp_start = start
    elapsed = start - core.tensor_ramp_start
    if elapsed >= window:
        duration = work
    else:
        slope = (1 - low) / window
        rate = low + slope * elapsed
        ramp_work = (window - elapsed) * (rate + 1) / 2  # work done by the end of the ramp
        if work >= ramp_work:
            duration = window - elapsed + work - ramp_work
        else:  # rate * d + slope * d^2 / 2 = work
            duration = (math.sqrt(rate * rate + 2 * slope * work) - rate) / slope
    recent.append((start, start + duration))
    return duration


def _perf_mode(instr: Instruction) -> int:
    """VectorE performance-mode multiple over the NeuronCore-v2 rate (trainium2_arch.rst)."""
    if not instr.sixteen_bit:
        return 1
    spans = (*instr.read_spans, *instr.write_spans)
    psum = any(s.psum for s in spans)
    unit = all(s.unit_stride for s in spans)
    if instr.name in ("tensor_copy", "tensor_scalar"):
        return 4 if unit and not psum else 2 if unit or not psum else 1
    if instr.name == "tensor_tensor":
        return 2 if not any(s.psum for s in instr.read_spans) else 1
    return 1


def _elementwise_seconds(instr: Instruction, target: Target) -> float:
    lanes = target.partitions
    if instr.engine == "vector":
        # NeuronCore-v3 and later: the 16-bit rate is the 4x performance mode over NeuronCore-v2's.
        base = target.vector_elems_per_cycle_16bit // 4 if target.nc_version >= 3 else target.vector_elems_per_cycle_other
        if instr.detail.get("rate") == "fast_exp":
            rate = 4 * target.scalar_elems_per_cycle_other
        elif instr.detail.get("rate") == 4:
            rate = 4 * lanes
        else:
            rate = base * (_perf_mode(instr) if target.nc_version >= 3 else 1)
        clock = target.vector_hz
    elif instr.engine == "scalar":
        rate = target.scalar_elems_per_cycle_other
        if instr.name in ("tensor_copy", "tensor_scalar") and instr.sixteen_bit:
            rate = target.scalar_elems_per_cycle_16bit  # Trn3 ScalarE 2x (trainium3_arch.rst)
        clock = target.scalar_hz
    else:
        rate, clock = target.gpsimd_elems_per_cycle, target.gpsimd_hz
    elements = lanes * max(instr.free, 1) * max(instr.inputs, 1)
    return (elements / rate + target.engine_fixed_cycles) / clock


def _dma_queue(instr: Instruction) -> str:
    if instr.detail.get("dynamic"):
        return "dge"
    src_hbm = any(s.partition < 0 for s in instr.read_spans[:1])
    dst_hbm = any(s.partition < 0 for s in instr.write_spans[:1])
    return {(True, False): "load", (False, True): "store", (False, False): "on_chip"}.get((src_hbm, dst_hbm), "hbm")


def _dma_engine_seconds(instr: Instruction, target: Target) -> list[float]:
    """Time each of the core's DMA engines spends on ``instr``."""
    engines = target.dma_engines_per_core
    on_chip = [s for s in (*instr.write_spans[:1], *instr.read_spans[:1]) if s.partition >= 0]
    partitions = max(instr.partitions, 1)
    if on_chip:
        first = on_chip[0].partition // PARTITIONS_PER_DMA_ENGINE
        last = (on_chip[0].partition + partitions - 1) // PARTITIONS_PER_DMA_ENGINE
        used = range(min(first, engines - 1), min(last, engines - 1) + 1)
        row = min(instr.contiguous or instr.bytes, max(instr.bytes // partitions, 1))
    else:
        used, row = range(engines), instr.contiguous or instr.bytes
    rate = target.dma_bytes_per_ns_per_engine * 1e9
    if instr.name == "dma_transpose":
        rate *= DMA_TRANSPOSE_EFFICIENCY["sbuf" if instr.read_spans and instr.read_spans[0].partition >= 0 else "hbm"]
        row = max(instr.bytes // partitions, 1)
    share = instr.bytes / max(len(used), 1)
    descriptors = math.ceil(share / max(row, 1))
    busy = descriptors * DMA_DESCRIPTOR_NS * 1e-9 + share / rate
    semaphore = DMA_DESCRIPTOR_NS * 1e-9
    return [busy if e in used else semaphore for e in range(engines)]


def _schedule_dma(instr: Instruction, target: Target, core: _Core, ready: float) -> tuple[float, float]:
    """(start of data, completion) of one DMA on ``core``; ``core.dma_busy`` sums each engine's time
    and ``core.queue_busy`` each queue's."""
    queue = _dma_queue(instr)
    issue = ready + target.dma_fixed_ns * 1e-9
    if instr.detail.get("dynamic"):
        issue += target.dge_ns * 1e-9
    durations = _dma_engine_seconds(instr, target)
    if not core.dma_engines:
        core.dma_engines = [_Timeline() for _ in durations]
    start = max(issue, core.queue_free[queue])
    while True:  # the earliest time every engine has room for its share
        moved = max(tl.earliest(start, d) for tl, d in zip(core.dma_engines, durations))
        if moved <= start:
            break
        start = moved
    for e, (tl, d) in enumerate(zip(core.dma_engines, durations)):
        tl.reserve(start, d)
        core.dma_busy[e] += d
    done = start + max(durations)
    occupied = max(max(durations), DMA_QUEUE_NS * 1e-9)
    core.queue_free[queue] = max(done, start + occupied)
    core.queue_busy[queue] += occupied
    return start, done


def schedule(trace: Sequence[Instruction], target: Target) -> list[tuple[float, float]]:
    """(ready, done) in seconds of every instruction of ``trace``: when its hazards were resolved
    and when its result is usable (an estimate)."""
    return _simulate(trace, target)[1]


def _simulate(trace: Sequence[Instruction], target: Target) -> tuple[dict[int, _Core], list[tuple[float, float]]]:
    if not target.is_neuron:
        raise ValueError(f"target {target.name!r} has no cost model; use trn2 or trn3")
    cores: dict[int, _Core] = defaultdict(_Core)
    hazards: dict[int, _Hazards] = defaultdict(_Hazards)
    times = []
    for instr in trace:
        core, deps = cores[instr.program], hazards[instr.program]
        ready = deps.ready(instr)
        if instr.engine == "dma":
            _, done = _schedule_dma(instr, target, core, ready)
            core.busy["dma"] = max(*core.dma_busy.values(), *core.queue_busy.values())
        else:
            start = max(core.engine_free[instr.engine], ready)
            if instr.engine == "tensor":
                work = _tensor_cycles(instr, target, core) / target.tensor_hz
                duration = _throttled_seconds(work, start, target, core)
            else:
                duration = _elementwise_seconds(instr, target)
            done = start + duration
            core.engine_free[instr.engine] = done
            core.busy[instr.engine] += duration
        deps.record(instr, done)
        core.end = max(core.end, done)
        times.append((ready, done))
    return cores, times


def estimate(trace: Sequence[Instruction], target: Target) -> Estimate:
    """Estimate the time of ``trace`` on ``target`` (must be a NeuronCore target)."""
    cores = _simulate(trace, target)[0]
    macs = sum(i.macs for i in trace)
    hbm = sum(i.hbm_read + i.hbm_write for i in trace)
    programs = max(len(cores), 1)
    # The cores of a pair share one HBM stack (about-neuron/arch/neuron-hardware/trainium2.rst:
    # 4 stacks for 8 cores), so together they move at most the pair's share of the chip's bandwidth.
    pair_bandwidth = target.hbm_bytes_per_s * 2 / target.cores_per_chip
    total = max([c.end for c in cores.values()] + [hbm / pair_bandwidth, 0.0])
    busy_us = {e: max(c.busy[e] for c in cores.values()) * 1e6 for e in ENGINES
               if any(c.busy[e] for c in cores.values())}
    bound = max(busy_us, key=busy_us.get) if busy_us else "none"
    peak_macs_per_s = target.tensor_peak_tflops.get("bf16", 0.0) * 1e12 / 2 * programs
    core_bandwidth = target.hbm_bytes_per_s_per_core * programs
    return Estimate(
        target=target.name,
        micros=total * 1e6,
        busy_us=busy_us,
        bound_by=bound,
        macs=macs,
        hbm_bytes=hbm,
        instructions=len(trace),
        hbm_roofline_fraction=(hbm / core_bandwidth) / total if total else 0.0,
        tensor_roofline_fraction=(macs / peak_macs_per_s) / total if total and peak_macs_per_s else 0.0,
        programs=programs,
    )
