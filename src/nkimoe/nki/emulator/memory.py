"""On-chip memory as the NKI compiler allocates it: a tile is live from its allocation to its
last use, so a loop iteration's tiles are free once the iteration no longer reads them.

Time is counted in allocations per buffer: ``usage[k]`` holds the bytes per partition live
right after the k-th allocation. A tile allocated at ``k`` covers ``usage[k]``; each later use
by an instruction extends its interval to the newest allocation and adds its bytes there. The
peak of ``usage`` is what the compiler's allocator needs, so a kernel is refused as soon as a
use proves that tiles live at the same time exceed the buffer. A tile pinned with ``address=``
takes its bytes when an instruction first touches it (declaring tiles over the same bytes up
front, as nki-library's modular allocator does, is how a kernel reuses them); it must not be
used after another pinned tile took bytes it overlaps.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import numpy as np

_PACKAGE = __name__.rsplit(".", 1)[0]  #: the emulator package, whose frames an allocation site skips


class CapacityError(RuntimeError):
    """Raised through ``EmulatorError`` by the caller; kept separate so this module stays leaf."""


@dataclass
class Tile:
    """One on-chip allocation and its live interval (in allocation ordinals of its buffer)."""

    name: str
    buffer: str
    size: int  #: bytes per partition
    site: str  #: file:line of the kernel code that allocated it
    start: int
    last: int
    partitions: tuple[int, int]  #: first partition, partition count
    address: int | None = None  #: pinned byte offset within the partition, if any

    def describe(self) -> str:
        where = f" at byte {self.address}" if self.address is not None else ""
        return f"{self.name or 'unnamed'} ({self.size} B{where}, allocated at {self.site})"

    def overlaps(self, other: Tile) -> bool:
        """Whether two pinned tiles share bytes of some partition."""
        if self.address is None or other.address is None:
            return False
        p0, pn = self.partitions
        q0, qn = other.partitions
        return (p0 < q0 + qn and q0 < p0 + pn and self.address < other.address + other.size
                and other.address < self.address + self.size)


def allocation_site() -> str:
    """``file:line`` of the innermost caller outside the emulator package."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_globals.get("__name__", "").startswith(_PACKAGE + "."):
        frame = frame.f_back
    if frame is None:
        return "?"
    return f"{os.path.basename(frame.f_code.co_filename)}:{frame.f_lineno}"


class Buffer:
    """Live-interval bookkeeping of one on-chip buffer (SBUF or PSUM) of one program."""

    def __init__(self, name: str, capacity: int, target: str) -> None:
        self.name, self.capacity, self.target = name, capacity, target
        self.usage = np.zeros(1024, dtype=np.int64)
        self.clock = 0  #: allocations so far
        self.tiles: list[Tile] = []
        self.pinned: list[Tile] = []

    def allocate(self, tile: Tile) -> None:
        if tile.address is not None:
            end = tile.address + tile.size
            if tile.address < 0 or end > self.capacity:
                raise CapacityError(f"nl.ndarray: {tile.describe()} ends at byte {end}, past {self.target}'s "
                                    f"{self.capacity} B of {self.name} per partition")
            tile.start = -1  # placed at its first use
            return
        self._place(tile)

    def _place(self, tile: Tile) -> None:
        """``tile`` takes its bytes now: the next point of the buffer's timeline."""
        if tile.address is not None:
            self.pinned.append(tile)
        if self.clock == len(self.usage):
            self.usage = np.concatenate([self.usage, np.zeros_like(self.usage)])
        tile.start = tile.last = self.clock
        self.usage[self.clock] = tile.size
        self.clock += 1
        self.tiles.append(tile)
        if tile.size > self.capacity:
            raise CapacityError(self._overflow(f"nl.ndarray: allocating {tile.describe()}", tile.start))

    def use(self, tile: Tile) -> None:
        """An instruction reads or writes ``tile`` now: it stays live across allocations since its last use."""
        if tile.start < 0:
            self._place(tile)
            return
        now = self.clock - 1
        if now <= tile.last:
            return
        span = self.usage[tile.last + 1:now + 1]
        span += tile.size
        if tile.address is not None:
            for other in self.pinned:
                if other is not tile and tile.last < other.start <= now and tile.overlaps(other):
                    raise CapacityError(f"{tile.describe()} is used after {other.describe()} took "
                                        f"its bytes in {self.name}; pinned tiles that are live together "
                                        "must not overlap")
        peak_at = int(np.argmax(span)) + tile.last + 1
        tile.last = now
        if self.usage[peak_at] > self.capacity:
            raise CapacityError(self._overflow(f"{tile.describe()} used again after later allocations",
                                               peak_at))

    def _overflow(self, what: str, at: int) -> str:
        live = [t for t in self.tiles if t.start <= at <= t.last]
        listing = "; ".join(t.describe() for t in sorted(live, key=lambda t: -t.size))
        return (f"{what} brings live {self.name} to {int(self.usage[at])} B per partition, over {self.target}'s "
                f"{self.capacity} B per partition; live tiles: {listing}")


class Memory:
    """The on-chip buffers of one program, keyed by the storage id instructions record."""

    def __init__(self, target: str, sbuf_capacity: int, psum_capacity: int) -> None:
        self.buffers = {"sbuf": Buffer("sbuf", sbuf_capacity, target), "psum": Buffer("psum", psum_capacity, target)}
        #: storage id (unique in the process) -> (buffer, tile)
        self.by_storage: dict[int, tuple[Buffer, Tile]] = {}

    def allocate(self, storage_id: int, buffer: str, tile: Tile) -> None:
        buf = self.buffers[buffer]
        buf.allocate(tile)
        self.by_storage[storage_id] = (buf, tile)

    def use(self, storage_ids: tuple[int, ...]) -> None:
        for sid in storage_ids:
            entry = self.by_storage.get(sid)
            if entry is not None:
                entry[0].use(entry[1])
