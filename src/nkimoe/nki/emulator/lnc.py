"""LNC=2: the two programs of ``kernel[2]`` run as concurrent threads, one emulated NeuronCore
each, sharing ``nl.shared_hbm`` tensors and synchronising through barriers and send/receive pipes."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from nkimoe.nki.emulator.core import EmulatorError

#: Seconds a program waits at a barrier or pipe for its peer before the kernel is declared deadlocked.
WAIT_SECONDS = 120.0


class Deadlock(EmulatorError):
    """A program waited for a peer that never arrived (or failed)."""


class LncGroup:
    """State the programs of one ``kernel[N]`` call share."""

    def __init__(self, programs: int) -> None:
        self.programs = programs
        self._lock = threading.Lock()
        self._barrier = threading.Barrier(programs)
        self._shared: list[Any] = []  #: shared_hbm tensors in allocation order
        self._allocated = [0] * programs
        self._pipes: dict[tuple[int, int], queue.Queue[np.ndarray]] = {}
        self._failed = threading.Event()

    def shared_tensor(self, program: int, shape: tuple[int, ...], dtype: str, name: str,
                      create: Callable[[], Any]) -> Any:
        """The n-th ``shared_hbm`` allocation of every program is one tensor (program order is
        the same in all programs, as both run the same kernel code)."""
        with self._lock:
            n = self._allocated[program]
            self._allocated[program] += 1
            if n == len(self._shared):
                self._shared.append(create())
            tensor = self._shared[n]
        if tensor.shape != shape or tensor.dtype != dtype:
            raise EmulatorError(f"shared_hbm allocation #{n} is {shape} {dtype} ({name or 'unnamed'}) in program "
                           f"{program} but {tensor.shape} {tensor.dtype} ({tensor.name or 'unnamed'}) in its peer; "
                           "both programs must allocate the same shared tensors in the same order")
        return tensor

    def barrier(self, program: int, what: str) -> None:
        try:
            self._barrier.wait(timeout=WAIT_SECONDS)
        except threading.BrokenBarrierError:
            raise Deadlock(f"{what}: program {program} waited at the barrier but its peer failed or never "
                           f"arrived within {WAIT_SECONDS:.0f} s") from None

    def send(self, to_program: int, pipe: int, data: np.ndarray) -> None:
        self._pipe(to_program, pipe).put(data)

    def receive(self, program: int, pipe: int, what: str) -> np.ndarray:
        box = self._pipe(program, pipe)
        deadline = time.monotonic() + WAIT_SECONDS
        while time.monotonic() < deadline and not self._failed.is_set():
            try:
                return box.get(timeout=0.05)
            except queue.Empty:
                continue
        raise Deadlock(f"{what}: program {program} waited on pipe {pipe} but its peer failed or sent nothing")

    def abort(self) -> None:
        """A program failed: release every peer that waits for it."""
        self._failed.set()
        self._barrier.abort()

    def _pipe(self, program: int, pipe: int) -> queue.Queue[np.ndarray]:
        with self._lock:
            return self._pipes.setdefault((program, pipe), queue.Queue())
