"""Hardware targets (Trainium2, Trainium3, CPU) and device detection.

A :class:`Target` carries the per-NeuronCore numbers that the emulator enforces and the
cost model uses. Every constant names the aws-neuron/aws-neuron-sdk file it comes from.

Detection order (:func:`detect`): ``NKIMOE_TARGET``, then ``NEURON_PLATFORM_TARGET_OVERRIDE``
(set by the contest harness ``main.py --platform-target``), then local device probes, else ``cpu``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

#: Every target-only ISA feature the registry and emulator know about.
ISA_FEATURES = frozenset(
    {
        "double_row_fp8",  # nisa.matmul_perf_mode.double_row (NC-v3 and NC-v4)
        "nc_matmul_mx",  # MXFP8/MXFP4 matmul (NC-v4)
        "quantize_mx",  # VectorE BF16 -> MXFP8 (NC-v4)
        "exponential",  # VectorE fast exp with max-subtract and sum (NC-v4)
        "bf16_psum",  # nc_matmul writing/accumulating BF16 in PSUM (NC-v4)
        "float8_e4m3fn",  # OCP FP8 in matmul (NC-v4)
        "wide_moving",  # nc_matmul moving free size up to 4096 fp32 / 8192 bf16 (NC-v4)
    }
)


class TargetError(ValueError):
    """A target name, alias or environment value that nkimoe does not know."""


@dataclass(frozen=True)
class Target:
    """Per-NeuronCore hardware numbers of one target.

    ``family`` is what variants declare in their ``targets``: a plugin may add a profile
    (e.g. another LNC setting) whose family is ``trn3`` so that every Trn3 variant applies.
    Rates are per physical NeuronCore; ``lnc`` says how many physical cores one logical core
    spans.
    """

    name: str
    family: str
    description: str
    nc_version: int  #: 3 for NeuronCore-v3 (Trn2), 4 for NeuronCore-v4 (Trn3), 0 for CPU
    lnc: int
    cores_per_chip: int
    partitions: int
    sbuf_bytes_per_partition: int
    sbuf_usable_bytes_per_partition: int
    psum_bytes_per_partition: int
    psum_banks: int
    hbm_bytes: int  #: per chip
    hbm_bytes_per_s: float  #: per chip
    dma_engines_per_core: int
    dma_bytes_per_ns_per_engine: float
    dma_fixed_ns: float
    tensor_hz: float
    vector_hz: float
    scalar_hz: float
    gpsimd_hz: float
    vector_elems_per_cycle_16bit: int
    vector_elems_per_cycle_other: int
    scalar_elems_per_cycle_16bit: int
    scalar_elems_per_cycle_other: int
    gpsimd_elems_per_cycle: int
    matmul_moving_fmax_fp32: int
    matmul_moving_fmax_bf16: int
    matmul_min_cycles: int
    engine_fixed_cycles: int
    dge_ns: float = 0.0  #: descriptor generation per dynamic (DGE) DMA
    tensor_throttled_rate: float = 1.0  #: TensorE's fraction of its full rate when a burst starts
    tensor_ramp_ns: float = 0.0  #: TensorE's ramp to full rate, and the utilisation window that re-throttles it
    neuronlink_bytes_per_s: float = 0.0  #: chip-to-chip interconnect per chip (collectives)
    collective_hop_ns: float = 0.0  #: latency of one step of a collective algorithm
    tensor_peak_tflops: Mapping[str, float] = field(default_factory=dict)
    features: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        unknown = set(self.features) - ISA_FEATURES
        if unknown:
            raise TargetError(
                f"target {self.name!r} declares unknown ISA features {sorted(unknown)}; "
                f"known: {sorted(ISA_FEATURES)}"
            )
        if not self.name or not self.family:
            raise TargetError("a target needs a non-empty name and family")

    @property
    def is_neuron(self) -> bool:
        return self.nc_version > 0

    @property
    def psum_bank_bytes(self) -> int:
        return self.psum_bytes_per_partition // self.psum_banks if self.psum_banks else 0

    @property
    def hbm_bytes_per_s_per_core(self) -> float:
        """HBM bandwidth one physical core can draw: its share of the chip, capped by its DMA engines."""
        if not self.cores_per_chip:
            return 0.0
        share = self.hbm_bytes_per_s / self.cores_per_chip
        dma = self.dma_engines_per_core * self.dma_bytes_per_ns_per_engine * 1e9
        return min(share, dma)

    def has(self, feature: str) -> bool:
        return feature in self.features


# --- Trainium2: NeuronCore-v3 ---------------------------------------------------------------
TRN2 = Target(
    name="trn2",
    family="trn2",
    description="AWS Trainium2 (NeuronCore-v3)",
    nc_version=3,
    # about-neuron/arch/neuron-features/logical-neuroncore-config.rst: Trn2 default LNC=2.
    lnc=2,
    # about-neuron/arch/neuron-hardware/trainium2.rst: 8 NeuronCore-v3 per chip.
    cores_per_chip=8,
    # nki/guides/architecture/trainium2_arch.rst: SBUF 24 MiB -> 28 MiB = 128 partitions x 224 KiB.
    partitions=128,
    sbuf_bytes_per_partition=224 * KiB,
    # nki-library src/nkilib_src/nkilib/core/mlp/mlp_cte/mlp_cte_constants.py
    # (MAX_AVAILABLE_SBUF_SIZE): 224 KiB less 16 KiB + 264 B reserved by compiler and runtime.
    sbuf_usable_bytes_per_partition=224 * KiB - 16384 - 8 - 256,
    # nki/guides/architecture/trainium2_arch.rst: PSUM 2 MiB per core = 16 KiB per partition;
    # nki/guides/architecture/trainium_inferentia2_arch.rst: 8 banks of 2 KiB per partition.
    psum_bytes_per_partition=16 * KiB,
    psum_banks=8,
    # about-neuron/arch/neuron-hardware/trainium2.rst: 96 GiB HBM at 2.9 TB/s per chip.
    hbm_bytes=96 * GiB,
    hbm_bytes_per_s=2.9e12,
    # nki/deep-dives/nki-dma-bandwidth-guide.rst: 16 DMA engines per core, 23 B/ns each on Trn2,
    # about 1.3 us fixed cost per DMA (descriptor setup, semaphore to start).
    dma_engines_per_core=16,
    dma_bytes_per_ns_per_engine=23.0,
    dma_fixed_ns=1300.0,
    # nki/guides/architecture/trainium2_arch.rst (engine table): Tensor 2.4 GHz, Vector 0.96 GHz,
    # Scalar 1.2 GHz, GpSimd 1.2 GHz; Vector 512 elem/cycle for BF16/FP16 else 256; Scalar 128.
    tensor_hz=2.4e9,
    vector_hz=0.96e9,
    scalar_hz=1.2e9,
    gpsimd_hz=1.2e9,
    vector_elems_per_cycle_16bit=512,
    vector_elems_per_cycle_other=256,
    scalar_elems_per_cycle_16bit=128,
    scalar_elems_per_cycle_other=128,
    gpsimd_elems_per_cycle=128,
    # nki/api/nki/isa/__init__.py (nc_matmul): moving free size <= 512 on NC-v2/v3 (one PSUM bank).
    matmul_moving_fmax_fp32=512,
    matmul_moving_fmax_bf16=512,
    # nki/guides/architecture/trainium_inferentia2_arch.rst: MultiplyMoving initiation interval
    # ~max(N, 64) cycles; ~100 cycles static overhead for small dependent Vector/Scalar instrs.
    matmul_min_cycles=64,
    engine_fixed_cycles=100,
    # nki/deep-dives/nki-dge.rst, trainium2_arch.rst: ~600 ns per hardware-DGE DMA instruction.
    dge_ns=600.0,
    # tools/neuron-explorer/overview-summary-page.rst and glossary.rst (SDK 2.32), dI/dt throttling:
    # "On Trn2 and Trn3 the Tensor Engine starts at roughly 50% utilization of maximum utilization
    # and ramps to full over about the first ~3 microseconds after work begins. If utilization
    # drops below 50% over any ~3 microsecond window ... the limit re-engages."
    tensor_throttled_rate=0.5,
    tensor_ramp_ns=3000.0,
    # about-neuron/arch/neuron-hardware/trainium2.rst: NeuronLink-v3 1280 GB/s per chip;
    # neuron-runtime/explore/intranode-collective-comm.rst: per-hop latency "about 1-2 us" (1.5 used).
    neuronlink_bytes_per_s=1280e9,
    collective_hop_ns=1500.0,
    # about-neuron/arch/neuron-hardware/neuron-core-v3.rst: TensorE 79 BF16/FP16/TF32,
    # 158 cFP8 (double_row), 20 FP32 dense TFLOPS per core.
    tensor_peak_tflops={"bf16": 79.0, "fp16": 79.0, "tf32": 79.0, "fp8": 158.0, "fp32": 20.0},
    features=frozenset({"double_row_fp8"}),
)

# --- Trainium3: NeuronCore-v4 ---------------------------------------------------------------
TRN3 = Target(
    name="trn3",
    family="trn3",
    description="AWS Trainium3 (NeuronCore-v4)",
    nc_version=4,
    # The contest README (aws-neuron/nki-moe): trn3.3xlarge exposes 4 logical NeuronCores.
    lnc=2,
    # about-neuron/arch/neuron-hardware/trainium3.rst: 8 NeuronCore-v4 per chip.
    cores_per_chip=8,
    # nki/guides/architecture/trainium3_arch.rst: SBUF 32 MiB = 128 partitions x 256 KiB.
    partitions=128,
    sbuf_bytes_per_partition=256 * KiB,
    # No published reservation for NC-v4; the Trn2 reservation (16 KiB + 264 B) is assumed.
    sbuf_usable_bytes_per_partition=256 * KiB - 16384 - 8 - 256,
    # nki/guides/architecture/trainium3_arch.rst: PSUM 2 MiB per core (unchanged), 8 x 2 KiB banks.
    psum_bytes_per_partition=16 * KiB,
    psum_banks=8,
    # about-neuron/arch/neuron-hardware/trainium3.rst: 144 GiB at 4.9 TB/s
    # (nki/guides/architecture/trainium3_arch.rst says 4.7 TB/s; the lower figure is used).
    hbm_bytes=144 * GiB,
    hbm_bytes_per_s=4.7e12,
    # nki/deep-dives/nki-dma-bandwidth-guide.rst: 16 engines per core, 33 B/ns each on Trn3.
    dma_engines_per_core=16,
    dma_bytes_per_ns_per_engine=33.0,
    dma_fixed_ns=1300.0,
    # nki/guides/architecture/trainium3_arch.rst (engine table): Tensor 2.4 GHz, Vector 1.2 GHz
    # (512 elem/cycle BF16/FP16/FP8, 256 other), Scalar 1.2 GHz (256 elem/cycle BF16/FP16/FP8,
    # 128 other), GpSimd 1.2 GHz (128 elem/cycle).
    tensor_hz=2.4e9,
    vector_hz=1.2e9,
    scalar_hz=1.2e9,
    gpsimd_hz=1.2e9,
    vector_elems_per_cycle_16bit=512,
    vector_elems_per_cycle_other=256,
    scalar_elems_per_cycle_16bit=256,
    scalar_elems_per_cycle_other=128,
    gpsimd_elems_per_cycle=128,
    # nki/api/nki/isa/__init__.py (nc_matmul): on NC-v4 moving free size up to 4096 (fp32 dst)
    # or 8192 (bf16 dst).
    matmul_moving_fmax_fp32=4096,
    matmul_moving_fmax_bf16=8192,
    matmul_min_cycles=64,
    engine_fixed_cycles=100,
    # nki/deep-dives/nki-dge.rst gives ~600 ns per hardware-DGE DMA for NeuronCore-v3; assumed for v4.
    dge_ns=600.0,
    # tools/neuron-explorer/overview-summary-page.rst and glossary.rst (SDK 2.32), dI/dt throttling:
    # "On Trn2 and Trn3 the Tensor Engine starts at roughly 50% utilization of maximum utilization
    # and ramps to full over about the first ~3 microseconds after work begins. If utilization
    # drops below 50% over any ~3 microsecond window ... the limit re-engages."
    tensor_throttled_rate=0.5,
    tensor_ramp_ns=3000.0,
    # about-neuron/arch/neuron-hardware/trainium3.rst: NeuronLink-v4 2560 GB/s per chip;
    # neuron-runtime/explore/intranode-collective-comm.rst: per-hop latency "about 1-2 us" (1.5 used).
    neuronlink_bytes_per_s=2560e9,
    collective_hop_ns=1500.0,
    # about-neuron/arch/neuron-hardware/neuron-core-v4.rst: 79 BF16/FP16/TF32, 315 MXFP8/MXFP4,
    # 20 FP32 dense TFLOPS per core.
    tensor_peak_tflops={"bf16": 79.0, "fp16": 79.0, "tf32": 79.0, "fp8": 158.0, "mxfp8": 315.0, "fp32": 20.0},
    features=frozenset(
        {"double_row_fp8", "nc_matmul_mx", "quantize_mx", "exponential", "bf16_psum", "float8_e4m3fn", "wide_moving"}
    ),
)

# --- Trainium1: NeuronCore-v2 (only for calibrating the cost model against published measurements) ---
TRN1 = Target(
    name="trn1",
    family="trn1",
    description="AWS Trainium1 (NeuronCore-v2), for cost-model calibration only",
    nc_version=2,
    lnc=1,
    # about-neuron/arch/neuron-hardware/trainium.rst: two NeuronCore-v2 per chip, 32 GiB at 820 GiB/s.
    cores_per_chip=2,
    # nki/guides/architecture/trainium_inferentia2_arch.rst: SBUF 24 MiB = 128 x 192 KiB, PSUM 2 MiB.
    partitions=128,
    sbuf_bytes_per_partition=192 * KiB,
    sbuf_usable_bytes_per_partition=192 * KiB,
    psum_bytes_per_partition=16 * KiB,
    psum_banks=8,
    hbm_bytes=32 * GiB,
    hbm_bytes_per_s=820 * GiB,
    # nki/deep-dives/nki-dma-bandwidth-guide.rst: 16 engines at 17 B/ns on TRN1; ~1.3 us per DMA.
    dma_engines_per_core=16,
    dma_bytes_per_ns_per_engine=17.0,
    dma_fixed_ns=1300.0,
    # trainium_inferentia2_arch.rst (engine table): Tensor 2.8 GHz, Vector 1.12, Scalar and GpSimd
    # 1.4 GHz; 128 elements per cycle (no VectorE performance mode before NeuronCore-v3).
    tensor_hz=2.8e9,
    vector_hz=1.12e9,
    scalar_hz=1.4e9,
    gpsimd_hz=1.4e9,
    vector_elems_per_cycle_16bit=128,
    vector_elems_per_cycle_other=128,
    scalar_elems_per_cycle_16bit=128,
    scalar_elems_per_cycle_other=128,
    gpsimd_elems_per_cycle=128,
    matmul_moving_fmax_fp32=512,
    matmul_moving_fmax_bf16=512,
    matmul_min_cycles=64,
    engine_fixed_cycles=100,
    # trainium_inferentia2_arch.rst: TensorE 92 BF16/FP16 TFLOPS, 23 FP32 per core.
    tensor_peak_tflops={"bf16": 92.0, "fp16": 92.0, "fp32": 23.0},
)

CPU = Target(
    name="cpu",
    family="cpu",
    description="No Neuron device: torch references (NKI variants run only in the emulator)",
    nc_version=0,
    lnc=1,
    cores_per_chip=0,
    partitions=0,
    sbuf_bytes_per_partition=0,
    sbuf_usable_bytes_per_partition=0,
    psum_bytes_per_partition=0,
    psum_banks=0,
    hbm_bytes=0,
    hbm_bytes_per_s=0.0,
    dma_engines_per_core=0,
    dma_bytes_per_ns_per_engine=0.0,
    dma_fixed_ns=0.0,
    tensor_hz=0.0,
    vector_hz=0.0,
    scalar_hz=0.0,
    gpsimd_hz=0.0,
    vector_elems_per_cycle_16bit=0,
    vector_elems_per_cycle_other=0,
    scalar_elems_per_cycle_16bit=0,
    scalar_elems_per_cycle_other=0,
    gpsimd_elems_per_cycle=0,
    matmul_moving_fmax_fp32=0,
    matmul_moving_fmax_bf16=0,
    matmul_min_cycles=0,
    engine_fixed_cycles=0,
)

BUILTIN_TARGETS: tuple[Target, ...] = (TRN2, TRN3, CPU)

#: Spellings of NEURON_PLATFORM_TARGET_OVERRIDE (nki/api/nki/__init__.py, nki.jit docstring)
#: that map onto nkimoe targets.
PLATFORM_ALIASES: Mapping[str, str] = {"trn2": "trn2", "gen3": "trn2", "trn3": "trn3", "gen4": "trn3"}

#: nc_version of each SDK generation name.
NC_VERSION_NAMES: Mapping[str, int] = {"gen3": 3, "gen4": 4}


@dataclass(frozen=True)
class Detection:
    """The detected target, where the decision came from, and the evidence seen."""

    target: Target
    source: str  #: "NKIMOE_TARGET", "NEURON_PLATFORM_TARGET_OVERRIDE", "probe" or "default"
    evidence: tuple[str, ...]
    warnings: tuple[str, ...] = ()


def resolve(name: str, known: Mapping[str, Target], *, origin: str = "target name") -> Target:
    """Return the target called ``name`` (aliases ``gen3``/``gen4`` accepted) or raise naming the valid ones."""
    key = name.strip().lower()
    key = PLATFORM_ALIASES.get(key, key) if key not in known else key
    if key in known:
        return known[key]
    valid = sorted(set(known) | set(PLATFORM_ALIASES))
    raise TargetError(f"unknown target {name!r} from {origin}; valid targets: {', '.join(valid)}")


def _probe_dmi(sys_root: Path) -> tuple[str | None, str | None]:
    path = sys_root / "class/dmi/id/product_name"
    try:
        product = path.read_text(errors="replace").strip()
    except OSError:
        return None, None
    lowered = product.lower()
    for prefix, family in (("trn3", "trn3"), ("trn2", "trn2")):
        if lowered.startswith(prefix):
            return family, f"DMI product name {product!r} ({path})"
    return None, f"DMI product name {product!r} is not a Trainium instance"


def _probe_sysfs(sys_root: Path) -> str | None:
    path = sys_root / "class/neuron_device"
    try:
        devices = sorted(p.name for p in path.iterdir())
    except OSError:
        return None
    return f"{len(devices)} Neuron device(s) under {path}" if devices else None


def _probe_neuron_ls(timeout_s: float) -> tuple[str | None, str | None]:
    exe = shutil.which("neuron-ls")
    if exe is None:
        return None, None
    try:
        out = subprocess.run(
            [exe, "--json-output"], capture_output=True, text=True, timeout=timeout_s, check=False
        ).stdout
        text = json.dumps(json.loads(out)).lower() if out.strip().startswith(("[", "{")) else out.lower()
    except (OSError, subprocess.TimeoutExpired, ValueError) as exc:
        return None, f"neuron-ls failed: {exc}"
    for marker, family in (("trainium3", "trn3"), ("trn3", "trn3"), ("v4", "trn3"),
                           ("trainium2", "trn2"), ("trn2", "trn2"), ("v3", "trn2")):
        if marker in text:
            return family, f"neuron-ls reports {marker!r}"
    return None, "neuron-ls ran but named no known NeuronCore generation"


def probe(*, sys_root: Path | str = "/", neuron_ls_timeout_s: float = 2.0) -> tuple[str | None, list[str]]:
    """Look for a local Neuron device without root, network or any risk of hanging.

    Returns the target family found (or ``None``) and every piece of evidence seen.
    """
    root = Path(sys_root)
    evidence: list[str] = []
    found: str | None = None
    sysfs = _probe_sysfs(root)
    if sysfs:
        evidence.append(sysfs)
    for family, note in (_probe_dmi(root), _probe_neuron_ls(neuron_ls_timeout_s) if sysfs else (None, None)):
        if note:
            evidence.append(note)
        if family and found is None:
            found = family
    if sysfs and found is None:
        evidence.append("a Neuron device is present but its generation is unknown")
    return found, evidence


def detect(
    env: Mapping[str, str] | None = None,
    *,
    known: Mapping[str, Target] | None = None,
    sys_root: Path | str = "/",
) -> Detection:
    """Decide the target: ``NKIMOE_TARGET``, ``NEURON_PLATFORM_TARGET_OVERRIDE``, device probes, ``cpu``.

    A variable always wins over a probe; when they disagree a warning names both pieces of
    evidence. A bad variable value raises :class:`TargetError` naming the value, the variable
    and the valid names.
    """
    env = os.environ if env is None else env
    known = {t.name: t for t in BUILTIN_TARGETS} if known is None else known
    found, probe_evidence = probe(sys_root=sys_root)
    for var in ("NKIMOE_TARGET", "NEURON_PLATFORM_TARGET_OVERRIDE"):
        value = env.get(var, "").strip()
        if not value:
            continue
        target = resolve(value, known, origin=var)
        evidence = (f"{var}={value}", *probe_evidence)
        notes: tuple[str, ...] = ()
        if found and found != target.family:
            notes = (
                f"{var}={value} selects {target.name}, but the device probe found {found} "
                f"({'; '.join(probe_evidence)}); using {target.name}",
            )
            for note in notes:
                warnings.warn(note, stacklevel=2)
        return Detection(target, var, evidence, notes)
    if found:
        return Detection(known[found], "probe", tuple(probe_evidence))
    return Detection(known["cpu"], "default", (*probe_evidence, "no Neuron device found"))
