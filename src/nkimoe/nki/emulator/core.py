"""Emulator core: the session (target, trace, on-chip allocations), tensors and their views."""

from __future__ import annotations

import contextlib
import contextvars
import enum
import itertools
import math
import os
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from nkimoe.nki.emulator import dtypes as dt
from nkimoe.nki.emulator.memory import CapacityError, Memory, Tile, allocation_site
from nkimoe.targets import TRN2, TRN3, Target, TargetError


class EmulatorError(RuntimeError):
    """A kernel broke an NKI rule or a hardware limit of the emulated target."""


class NKIObject:
    """Base class for NKI kernel dataclasses and configuration objects (``nl.NKIObject``).

    A subclass's public class attributes are its fields, annotated or not: ``@dataclass`` then takes
    them all as keyword arguments (nki-library's attention_cte builds ``SectionParams(section_idx=...)``
    from attributes declared as ``section_idx = None``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        annotations = cls.__dict__.get("__annotations__")
        if annotations is None:
            annotations = cls.__annotations__ = {}
        for name, value in list(cls.__dict__.items()):
            if not name.startswith("_") and name not in annotations and not callable(value) \
                    and not isinstance(value, (property, classmethod, staticmethod)):
                annotations[name] = Any


def not_emulated(api: str, reason: str) -> EmulatorError:
    """The error an API raises where emulating it would not be meaningful."""
    return EmulatorError(f"{api} is not emulated: {reason}")


class MemoryRegion(enum.Enum):
    """Buffers (``nl.sbuf``, ``nl.psum``, ``nl.hbm``, ``nl.private_hbm``, ``nl.shared_hbm``)."""

    sbuf = "sbuf"
    psum = "psum"
    hbm = "hbm"
    private_hbm = "private_hbm"
    shared_hbm = "shared_hbm"

    @property
    def on_chip(self) -> bool:
        return self in (MemoryRegion.sbuf, MemoryRegion.psum)


def region(buffer: Any) -> MemoryRegion:
    """Accept ``nl.sbuf`` etc. or, as NKI 0.2.0 did, their string names."""
    if isinstance(buffer, MemoryRegion):
        return buffer
    if isinstance(buffer, str):
        current().refuse_removed(f"the string buffer name {buffer!r}", "use nl.sbuf, nl.psum, nl.hbm or nl.shared_hbm")
        try:
            return MemoryRegion(buffer)
        except ValueError:
            pass
    raise EmulatorError(f"unknown buffer {buffer!r}; valid: {', '.join(m.value for m in MemoryRegion)}")


@dataclass(frozen=True)
class Span:
    """The bytes of one allocation (``storage``) an operand covers: ``[lo, hi)`` of the flat HBM
    tensor, or of each of ``partitions`` partitions from ``partition`` on chip (``partition`` is -1
    in HBM). ``psum`` and ``unit_stride`` (innermost elements adjacent) decide engine rates."""

    storage: int
    lo: int
    hi: int
    partition: int = -1
    partitions: int = 1
    psum: bool = False
    unit_stride: bool = True

    def overlaps(self, other: Span) -> bool:
        rows = self.partition < 0 or (self.partition < other.partition + other.partitions
                                      and other.partition < self.partition + self.partitions)
        return rows and self.lo < other.hi and other.lo < self.hi

    def covers(self, other: Span) -> bool:
        rows = self.partition < 0 or (self.partition <= other.partition
                                      and other.partition + other.partitions <= self.partition + self.partitions)
        return rows and self.lo <= other.lo and other.hi <= self.hi


def span_of(t: NkiTensor) -> Span:
    """The bytes of its allocation that view ``t`` covers (a bounding interval per partition)."""
    root, data = t.root, t.data
    if not np.may_share_memory(data, root):  # a gathered copy: the whole allocation
        return Span(t.storage_id, 0, root.nbytes)
    offset = data.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    unit = data.ndim == 0 or data.shape[-1] == 1 or abs(data.strides[-1]) == data.itemsize
    psum = t.buffer is MemoryRegion.psum
    if t.buffer.on_chip and root.ndim > 1:
        row = root.strides[0]
        extent = sum((n - 1) * abs(st) for n, st in zip(data.shape[1:], data.strides[1:])) + data.itemsize
        lo = offset % row
        return Span(t.storage_id, lo, lo + extent, offset // row, data.shape[0], psum, unit)
    extent = sum((n - 1) * abs(st) for n, st in zip(data.shape, data.strides)) + data.itemsize
    return Span(t.storage_id, offset, offset + extent, unit_stride=unit)


@dataclass
class Instruction:
    """One executed instruction, as the cost model sees it."""

    name: str
    engine: str  #: "tensor", "vector", "scalar", "gpsimd" or "dma"
    reads: tuple[int, ...]  #: storage ids read
    writes: tuple[int, ...]  #: storage ids written
    partitions: int = 0
    free: int = 0  #: elements per partition processed
    inputs: int = 1  #: tensor inputs streamed (VectorE/ScalarE cost)
    sixteen_bit: bool = False
    macs: int = 0
    hbm_read: int = 0
    hbm_write: int = 0
    bytes: int = 0  #: bytes moved by a DMA
    contiguous: int = 0  #: contiguous bytes per descriptor row of a DMA
    detail: dict[str, Any] = field(default_factory=dict)
    # Where the instruction ran and which bytes it touched (the cost model's hazards and queues).
    program: int = 0  #: nl.program_id of the core that issued it (kernel[2] runs programs 0 and 1)
    read_spans: tuple[Span, ...] = ()
    write_spans: tuple[Span, ...] = ()


#: NKI release each round's SDK ships: SDK 2.27/2.28 (round 1, trn2) NKI 0.2.0 "Beta 2";
#: SDK 2.29 (round 2, trn3) NKI 0.3.0 (nki-facts.md section 2d).
NKI_VERSIONS = ("0.2.0", "0.3.0")


def default_nki_version(target: Target) -> str:
    """``NKIMOE_NKI_VERSION`` when set, else the NKI of the target's contest round."""
    chosen = os.environ.get("NKIMOE_NKI_VERSION", "").strip()
    if chosen:
        if chosen not in NKI_VERSIONS:
            raise EmulatorError(f"NKIMOE_NKI_VERSION={chosen!r} is not an emulated NKI; valid: {', '.join(NKI_VERSIONS)}")
        return chosen
    return "0.2.0" if target.nc_version < 4 else "0.3.0"


@dataclass
class Session:
    """The emulated NeuronCore of one kernel run (under LNC=2, of one of its two programs)."""

    target: Target
    trace: list[Instruction] = field(default_factory=list)
    program_id: int = 0
    num_programs: int = 1
    reduce_regs: dict[str, np.ndarray] = field(default_factory=dict)
    #: The NKI release whose rules apply ("0.2.0" or "0.3.0"); empty: the target's default.
    nki_version: str = ""
    memory: Memory | None = None
    #: Shared state of the programs of one ``kernel[2]`` call (barriers, pipes, shared HBM).
    lnc: Any = None
    rng: np.random.Generator = field(default_factory=lambda: np.random.default_rng(0))
    running: bool = False  #: inside a kernel call

    def __post_init__(self) -> None:
        if not self.nki_version:
            self.nki_version = default_nki_version(self.target)
        elif self.nki_version not in NKI_VERSIONS:
            raise EmulatorError(f"nki_version {self.nki_version!r} is not emulated; valid: {', '.join(NKI_VERSIONS)}")
        if self.memory is None:
            self.memory = self.fresh_memory()

    def fresh_memory(self) -> Memory:
        t = self.target
        return Memory(t.name, t.sbuf_usable_bytes_per_partition, t.psum_bytes_per_partition)

    @property
    def strict(self) -> bool:
        """True when NKI 0.3.0 rules apply (what 0.3.0 removed is refused)."""
        return self.nki_version == "0.3.0"

    def refuse_removed(self, idiom: str, instead: str) -> None:
        """Raise under NKI 0.3.0 for an idiom only NKI 0.2.0 accepted."""
        if self.strict:
            raise EmulatorError(f"{idiom} was removed in NKI 0.3.0 (SDK 2.29, emulated for {self.target.name}); "
                                f"{instead}. NKIMOE_NKI_VERSION=0.2.0 emulates the SDK 2.27/2.28 rules")

    def record(self, instr: Instruction) -> None:
        instr.program = self.program_id
        self.trace.append(instr)
        try:
            self.memory.use(instr.reads + instr.writes)
        except CapacityError as exc:
            raise EmulatorError(f"{instr.name}: {exc}") from None


_SESSION: contextvars.ContextVar[Session | None] = contextvars.ContextVar("nkimoe_nki_session", default=None)


def default_target() -> Target:
    """The target a kernel run emulates when none is given: ``NKIMOE_TARGET``, then
    ``NEURON_PLATFORM_TARGET_OVERRIDE``; as in the SDK simulator, trn3 when neither is set."""
    from nkimoe.targets import detect

    try:
        found = detect()
    except TargetError as exc:
        raise EmulatorError(str(exc)) from None
    return found.target if found.target.is_neuron else TRN3


def current() -> Session:
    session = _SESSION.get()
    if session is None:
        session = Session(default_target())
        _SESSION.set(session)
    return session


@contextlib.contextmanager
def session(target: Target | str | None = None, nki_version: str | None = None) -> Iterator[Session]:
    """Run kernels inside one emulated core: ``with session("trn2") as s: k(x); s.trace``.

    ``nki_version`` ("0.2.0" or "0.3.0") overrides the NKI release whose rules apply (default:
    ``NKIMOE_NKI_VERSION``, else 0.2.0 on trn2 and 0.3.0 on trn3)."""
    if isinstance(target, str):
        target = {"trn2": TRN2, "trn3": TRN3}.get(target) or _named(target)
    s = Session(target or default_target(), nki_version=nki_version or "")
    if not s.target.is_neuron:
        raise EmulatorError(f"target {s.target.name!r} has no NeuronCore to emulate; use trn2 or trn3")
    token = _SESSION.set(s)
    try:
        yield s
    finally:
        _SESSION.reset(token)


def _named(name: str) -> Target:
    from nkimoe.plugins import get_registry

    return get_registry().target(name)


def require(feature: str, what: str) -> None:
    """Raise unless the emulated target has ISA ``feature``."""
    target = current().target
    if not target.has(feature):
        raise EmulatorError(
            f"{what} is not available on {target.name} (NeuronCore-v{target.nc_version}); "
            f"it needs a target with {feature!r} (trn3, NeuronCore-v4)"
        )


# --- tensors ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DynSlice:
    """``nl.ds(start, size)``: a slice of ``size`` elements from ``start``."""

    start: int
    size: int


def _track(s: Session, tensor: NkiTensor, shape: tuple[int, ...], address: Any) -> None:
    """Charge an on-chip tensor to its program's buffer, pinned at ``address`` when given."""
    per_partition = math.ceil(math.prod(shape[1:]) * dt.itemsize(tensor.dtype))
    first_partition, offset = 0, None
    if address is not None:
        try:
            first_partition, offset = (int(a) for a in address)
        except (TypeError, ValueError):
            raise EmulatorError(f"nl.ndarray: address {address!r} must be (partition_offset, free_offset)") from None
        if first_partition < 0 or first_partition + shape[0] > s.target.partitions:
            raise EmulatorError(f"nl.ndarray: address {address!r} puts {shape[0]} partitions past {s.target.partitions}")
    tile = Tile(tensor.name, tensor.buffer.value, per_partition, allocation_site(), 0, 0,
                (first_partition, shape[0]), offset)
    try:
        s.memory.allocate(tensor.storage_id, tensor.buffer.value, tile)
    except CapacityError as exc:
        raise EmulatorError(str(exc)) from None


#: Storage ids, never reused in a process: an id names one allocation for good, so a trace's
#: dependencies cannot attach a dead tile's pending accesses to a new one (as ``id()`` reuse would).
_STORAGE_IDS = itertools.count(1)


class NkiTensor:
    """A tensor in HBM, SBUF or PSUM. Views (slicing, ``reshape``, ``permute``, ``ap``) share storage.

    Axis 0 of an on-chip tensor is the partition axis (at most 128).
    """

    __slots__ = ("data", "dtype", "buffer", "name", "storage_id", "mm_written", "mm_root", "root", "shape",
                 "partitions", "free_size", "__weakref__")

    def __init__(self, data: np.ndarray, dtype: str, buffer: MemoryRegion, name: str = "",
                 storage_id: int | None = None, mm_written: np.ndarray | None = None,
                 root: np.ndarray | None = None) -> None:
        self.data = data
        #: The tensor's shape (x4 packed dtypes hide their trailing axis of 4), fixed for the view's life.
        self.shape: tuple[int, ...] = data.shape[:-1] if dtype in dt.PACKED_X4 else data.shape
        self.partitions: int = self.shape[0] if self.shape else 1
        self.free_size: int = math.prod(self.shape[1:])
        self.dtype = dtype
        self.buffer = buffer
        self.name = name
        self.storage_id = next(_STORAGE_IDS) if storage_id is None else storage_id
        #: The whole allocation this view belongs to.
        self.root = data if root is None else root
        #: PSUM only: which elements a matmul has written since allocation (accumulate=None).
        self.mm_written = mm_written
        #: PSUM only: ``mm_written`` of the whole allocation, laid out as ``root`` (for ``ap`` views).
        self.mm_root: np.ndarray | None = None

    # --- construction --------------------------------------------------------------------------
    @classmethod
    def allocate(cls, shape: Sequence[int], dtype: Any, buffer: Any, name: str = "", fill: Any = None,
                 address: Any = None) -> NkiTensor:
        dtype = dt.normalize(dtype)
        buf = region(buffer)
        shape = tuple(int(s) for s in shape)
        if not shape or any(s < 1 for s in shape):
            raise EmulatorError(f"nl.ndarray: shape {shape} must have positive sizes")
        s = current()
        target = s.target
        if buf.on_chip and shape[0] > target.partitions:
            raise EmulatorError(
                f"nl.ndarray: partition dimension {shape[0]} exceeds maximum {target.partitions} "
                f"on {target.name} ({buf.value} tensor {name or 'unnamed'})"
            )
        storage_shape = shape + ((4,) if dtype in dt.PACKED_X4 else ())
        if fill is None:  # uninitialised memory shows as NaN (floats) or 4 (integers), as in the SDK simulator
            fill = 4 if dtype in dt.INTEGER else np.nan
        if dtype in dt.EXACT_FILL:
            data = np.full(storage_shape, fill, dtype=dt.STORAGE[dtype])
        else:
            data = np.full(storage_shape, fill, dtype=np.float32 if dtype not in dt.INTEGER else np.int64)
            data = dt.cast(data, dtype) if dtype not in dt.INTEGER else data.astype(dt.STORAGE[dtype])
        if buf is MemoryRegion.shared_hbm and s.lnc is not None:
            return s.lnc.shared_tensor(s.program_id, shape, dtype, name, lambda: cls(data, dtype, buf, name))
        tensor = cls(data, dtype, buf, name)
        if buf.on_chip:
            _track(s, tensor, shape, address)
        elif address is not None:
            raise EmulatorError(f"nl.ndarray: address= places on-chip tensors; {buf.value} tensor {name or 'unnamed'}")
        if buf is MemoryRegion.psum:
            tensor.mm_written = tensor.mm_root = np.zeros(shape, dtype=bool)
        return tensor

    @classmethod
    def wrap(cls, array: np.ndarray, buffer: MemoryRegion = MemoryRegion.shared_hbm, name: str = "") -> NkiTensor:
        return cls(array, dt.from_numpy(array.dtype), buffer, name)

    # --- shape ---------------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        return len(self.shape)

    def partition_offset_bytes(self) -> int:
        """Byte offset of this view's first element within its partition of the allocation."""
        start = self.data.__array_interface__["data"][0] - self.root.__array_interface__["data"][0]
        return int(start % self.root.strides[0]) if self.root.ndim > 1 else int(start)

    @property
    def nbytes(self) -> int:
        return int(math.prod(self.shape) * dt.itemsize(self.dtype))

    def __repr__(self) -> str:
        return f"NkiTensor({self.name or 'unnamed'}, {self.shape}, {self.dtype}, {self.buffer.value})"

    # --- views ---------------------------------------------------------------------------------
    def _view(self, data: np.ndarray, mm: np.ndarray | None = None) -> NkiTensor:
        view = NkiTensor(data, self.dtype, self.buffer, self.name, self.storage_id, mm, self.root)
        view.mm_root = self.mm_root
        return view

    def _key(self, key: Any) -> tuple[Any, ...]:
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            at = next(i for i, k in enumerate(key) if k is Ellipsis)
            fill = (slice(None),) * (self.ndim - len(key) + 1)
            key = key[:at] + fill + key[at + 1:]
        if len(key) > self.ndim:
            raise EmulatorError(f"index {key} has more axes than {self!r}")
        out = []
        for axis, k in enumerate(key):
            if isinstance(k, DynSlice):
                k = slice(k.start, k.start + k.size)
            if isinstance(k, slice):
                start, stop, step = k.indices(self.shape[axis])
                requested = k.stop if k.stop is not None else stop
                if k.start is not None and not 0 <= k.start <= self.shape[axis] or requested > self.shape[axis]:
                    raise EmulatorError(
                        f"slice {k.start}:{k.stop} is out of bounds for axis {axis} of size {self.shape[axis]} in {self!r}"
                    )
                k = slice(start, max(start, stop), step)  # an empty view is legal to build, not to access
            elif isinstance(k, (int, np.integer)):
                if not -self.shape[axis] <= int(k) < self.shape[axis]:
                    raise EmulatorError(f"index {k} is out of bounds for axis {axis} of size {self.shape[axis]} in {self!r}")
                k = int(k) % self.shape[axis]
                if axis == 0 and self.buffer.on_chip:  # selects one partition; the partition axis stays
                    k = slice(k, k + 1)
            else:
                raise EmulatorError(f"unsupported index {k!r} on {self!r}; use ints, slices or nl.ds")
            out.append(k)
        return tuple(out)

    def __getitem__(self, key: Any) -> NkiTensor:
        k = self._key(key)
        mm = self.mm_written[k] if self.mm_written is not None else None
        return self._view(self.data[k], mm)

    def __setitem__(self, key: Any, value: Any) -> None:
        raise EmulatorError(
            f"item assignment on {self!r}: NKI tensors are written only by instructions "
            "(nisa.tensor_copy, nisa.dma_copy, ...) into a dst"
        )

    def reshape(self, shape: Sequence[int]) -> NkiTensor:
        shape = tuple(int(s) for s in shape)
        if self.buffer.on_chip and shape[0] != self.shape[0]:
            raise EmulatorError(f"reshape of {self!r} to {shape} changes the partition dimension")
        extra = (4,) if self.dtype in dt.PACKED_X4 else ()
        if math.prod(shape) != math.prod(self.shape):
            raise EmulatorError(f"reshape of {self!r} to {shape}: element count differs")
        data = self.data.reshape(shape + extra)
        if not np.shares_memory(data, self.data):
            raise EmulatorError(f"reshape of {self!r} to {shape} needs a copy (the view is not contiguous)")
        mm = self.mm_written.reshape(shape) if self.mm_written is not None else None
        return self._view(data, mm)

    def permute(self, dims: Sequence[int]) -> NkiTensor:
        dims = tuple(dims)
        if sorted(dims) != list(range(self.ndim)):
            raise EmulatorError(f"permute{dims} is not a permutation of the {self.ndim} axes of {self!r}")
        if self.buffer.on_chip and dims[0] != 0:
            raise EmulatorError(f"permute{dims} of {self!r} moves the partition axis")
        extra = (self.ndim,) if self.dtype in dt.PACKED_X4 else ()
        mm = self.mm_written.transpose(dims) if self.mm_written is not None else None
        return self._view(self.data.transpose(dims + extra), mm)

    def ap(self, pattern: Sequence[Sequence[int]], offset: int | None = None, scalar_offset: Any = None,
           vector_offset: Any = None, indirect_dim: int = 0, dtype: Any = None) -> NkiTensor:
        """An explicit access pattern ``[[stride, count], ...]`` over the storage, like ``torch.as_strided``.

        ``offset`` (elements) composes with this view's own storage offset. ``scalar_offset`` (a
        [1, 1] SBUF tensor) adds ``value * stride of self.shape[indirect_dim]`` at run time;
        ``vector_offset`` (an SBUF [P, 1] tensor) does so per row of the pattern's first axis
        (DMA gather/scatter). ``dtype`` reinterprets the storage's bytes as that dtype: the pattern
        and ``offset`` then count elements of it (e.g. bf16 pairs read as fp32 words).
        """
        if dtype is not None and dt.normalize(dtype) != self.dtype:
            return _reinterpret(self, dt.normalize(dtype)).ap(pattern, offset, scalar_offset, vector_offset,
                                                              indirect_dim)
        if scalar_offset is not None and vector_offset is not None:
            raise EmulatorError("ap(): scalar_offset and vector_offset are mutually exclusive")
        if self.dtype in dt.PACKED_X4 or not self.root.flags.c_contiguous:
            raise EmulatorError(f"ap() on {self!r} is not emulated (x4 dtype or non-contiguous storage)")
        flat = self.root.reshape(-1)
        item = flat.itemsize
        base = (self.data.__array_interface__["data"][0] - self.root.__array_interface__["data"][0]) // item
        start = base + (offset or 0)
        counts = [int(c) for _, c in pattern]
        strides = [int(s) for s, _ in pattern]
        dim_stride = self.data.strides[indirect_dim] // item if self.ndim else 0
        if scalar_offset is not None:
            start += _scalar(scalar_offset) * dim_stride
        span = sum((c - 1) * s for s, c in zip(strides, counts))
        if vector_offset is not None:
            rows = _vector(vector_offset)
            if len(rows) != counts[0]:
                raise EmulatorError(f"ap(vector_offset=...) has {len(rows)} rows, the pattern's first axis {counts[0]}")
            lows = start + rows * dim_stride
            inner = span - (counts[0] - 1) * strides[0]
            inside = (lows >= 0) & (lows + inner < flat.size)
            gathered = np.zeros([counts[0], *counts[1:]], dtype=flat.dtype)
            for i in np.flatnonzero(inside):
                gathered[i] = np.lib.stride_tricks.as_strided(flat[int(lows[i]):], counts[1:],
                                                              [s * item for s in strides[1:]])
            return _with_offset(_Gather(gathered, self, [int(lo) for lo in lows], strides[1:], counts[1:],
                                        [int(i) for i in np.flatnonzero(~inside)]), vector_offset)
        if start < 0 or start + span >= flat.size:  # legal to build (kernels guard its use), illegal to access
            return _with_offset(OutOfBounds(self, f"ap() pattern {pattern} at element {start} reaches past the end "
                                                  f"of {self!r}", counts, dynamic=scalar_offset is not None),
                                scalar_offset)
        view = np.lib.stride_tricks.as_strided(flat[start:], counts, [s * item for s in strides])
        mm = None
        if self.mm_root is not None:  # a PSUM pattern keeps track of what matmuls wrote
            mm = np.lib.stride_tricks.as_strided(self.mm_root.reshape(-1)[start:], counts, strides)
        return _with_offset(self._view(view, mm), scalar_offset)


#: Views whose address depends on a run-time offset, with the tensor holding it (read by the DMA).
DYNAMIC_OFFSETS: weakref.WeakKeyDictionary[NkiTensor, NkiTensor | None] = weakref.WeakKeyDictionary()


def _with_offset(view: NkiTensor, offset: Any) -> NkiTensor:
    if offset is not None:
        DYNAMIC_OFFSETS[view] = offset if isinstance(offset, NkiTensor) else None
    return view


def _reinterpret(tensor: NkiTensor, dtype: str) -> NkiTensor:
    """``tensor``'s storage from its first element on, read as ``dtype`` (a flat view for ``ap``)."""
    storage = dt.STORAGE[dtype]
    root = tensor.root
    if dtype in dt.PACKED_X4 or tensor.dtype in dt.PACKED_X4 or not root.flags.c_contiguous:
        raise EmulatorError(f"ap(dtype={dtype}) on {tensor!r}: reinterpretation needs dense storage of unpacked dtypes")
    start = tensor.data.__array_interface__["data"][0] - root.__array_interface__["data"][0]
    if root.nbytes % storage.itemsize or start % storage.itemsize:
        raise EmulatorError(f"ap(dtype={dtype}) on {tensor!r}: its bytes do not split into {dtype} elements")
    flat = root.reshape(-1).view(np.uint8).view(storage)
    return NkiTensor(flat[start // storage.itemsize:], dtype, tensor.buffer, tensor.name, tensor.storage_id,
                     root=flat)


class _Gather(NkiTensor):
    """A vector-indexed access pattern: reads gather rows; writes scatter them back."""

    __slots__ = ("origin", "starts", "strides", "counts", "out_of_bounds")

    def __init__(self, data: np.ndarray, origin: NkiTensor, starts: list[int], strides: list[int],
                 counts: list[int], out_of_bounds: list[int]) -> None:
        super().__init__(data, origin.dtype, origin.buffer, origin.name, origin.storage_id, root=origin.root)
        self.origin, self.starts, self.strides, self.counts = origin, starts, strides, counts
        #: Rows whose index reaches outside the tensor: an error, or skipped by a DMA with oob_mode=skip.
        self.out_of_bounds = out_of_bounds

    def scatter(self, values: np.ndarray) -> None:
        """Write each in-bounds row back to its place (out-of-bounds rows are skipped)."""
        flat = self.root.reshape(-1)
        skipped = set(self.out_of_bounds)
        for i, lo in enumerate(self.starts):
            if i in skipped:
                continue
            dst = np.lib.stride_tricks.as_strided(flat[lo:], self.counts, [s * flat.itemsize for s in self.strides],
                                                  writeable=True)
            dst[...] = values[i]


class OutOfBounds(NkiTensor):
    """An access pattern that reaches outside its tensor: building one is legal (kernels often
    build it before a guard that skips its use); any instruction that accesses it is refused,
    except a DMA with ``oob_mode=skip`` when the address is dynamic (a ``scalar_offset``): that
    DMA skips the transfer, as ``nisa.dma_copy`` documents."""

    __slots__ = ("reason", "dynamic")

    def __init__(self, origin: NkiTensor, reason: str, counts: list[int], dynamic: bool = False) -> None:
        super().__init__(np.zeros(counts, dtype=origin.data.dtype), origin.dtype, origin.buffer, origin.name,
                         origin.storage_id, root=origin.root)
        self.reason, self.dynamic = reason, dynamic


class VirtualRegister:
    """An engine register (``nisa.register_alloc``): holds an integer known only at run time on
    hardware; the emulator knows it eagerly."""

    __slots__ = ("value",)

    def __init__(self, value: int = 0) -> None:
        self.value = int(value)

    def __index__(self) -> int:
        raise EmulatorError("a register's value is not known while a kernel is traced; use it as a "
                            "dynamic_range bound or an ap() scalar_offset")

    def __repr__(self) -> str:
        return f"VirtualRegister({self.value})"


def _scalar(t: Any) -> int:
    if isinstance(t, VirtualRegister):
        return t.value
    if isinstance(t, NkiTensor):
        if t.buffer is not MemoryRegion.sbuf or t.data.size != 1:
            raise EmulatorError(f"a dynamic scalar offset must be a [1, 1] SBUF tensor, got {t!r}")
        return int(np.asarray(t.data, dtype=np.float64).reshape(-1)[0])
    return int(t)


def _vector(t: Any) -> np.ndarray:
    if not isinstance(t, NkiTensor) or t.buffer is not MemoryRegion.sbuf or t.free_size != 1:
        raise EmulatorError(f"vector_offset must be an SBUF [P, 1] tensor of row indices, got {t!r}")
    return np.asarray(t.data, dtype=np.int64).reshape(-1)


