"""Emulated ``nki.jit`` and ``nki.simulate``: run a kernel eagerly on NumPy arrays or CPU torch tensors."""

from __future__ import annotations

import contextvars
import functools
import threading
from collections.abc import Callable
from typing import Any

import numpy as np

from nkimoe.nki.emulator import dtypes as dt
from nkimoe.nki.emulator.core import EmulatorError, MemoryRegion, NkiTensor, Session, _SESSION, default_target
from nkimoe.nki.emulator.lnc import Deadlock, LncGroup

_LAST: dict[str, Session] = {}


def last_session() -> Session | None:
    """The session of the most recent kernel call made outside an explicit ``session()``."""
    return _LAST.get("session")


def _to_numpy(value: Any) -> tuple[np.ndarray, bool]:
    try:
        import torch
    except ImportError:  # pragma: no cover - torch is a dependency
        torch = None  # type: ignore[assignment]
    if torch is not None and isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            import ml_dtypes

            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16), True
        if t.dtype == torch.int64:
            raise EmulatorError("torch.int64 has no NKI dtype; convert to int32 before the kernel call")
        return t.numpy(), True
    if isinstance(value, np.ndarray):  # a strided array becomes a contiguous copy (HBM tensors are dense)
        return np.ascontiguousarray(value), False
    raise EmulatorError(f"kernel arguments must be NumPy arrays or torch tensors, got {type(value).__name__}")


def _from_numpy(array: np.ndarray, as_torch: bool) -> Any:
    if not as_torch:
        return array
    import torch

    if array.dtype == dt.STORAGE[dt.bfloat16]:
        return torch.from_numpy(np.ascontiguousarray(array).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(array).copy())


class Kernel:
    """A kernel function wrapped by ``nki.jit``; ``kernel[lnc](...)`` sets the LNC degree."""

    def __init__(self, fn: Callable[..., Any], lnc: int = 1, **options: Any) -> None:
        self.fn, self.lnc, self.options = fn, lnc, options
        functools.update_wrapper(self, fn)

    def __getitem__(self, lnc: int) -> Kernel:
        if lnc not in (1, 2):
            raise EmulatorError(f"LNC must be 1 or 2, got {lnc}")
        return Kernel(self.fn, lnc, **self.options)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        torch_in = False

        def tensor(arg: Any) -> Any:
            nonlocal torch_in
            if isinstance(arg, np.ndarray) or type(arg).__module__.startswith("torch"):
                array, is_torch = _to_numpy(arg)
                torch_in |= is_torch
                return NkiTensor.wrap(array, MemoryRegion.hbm)  # kernel inputs are nl.hbm tensors
            return arg

        converted = [tensor(a) for a in args]
        named = {k: tensor(v) for k, v in kwargs.items()}
        active = _SESSION.get()
        if active is not None:
            return self._run(active, converted, named, torch_in)
        s = Session(default_target())
        token = _SESSION.set(s)
        try:
            return self._run(s, converted, named, torch_in)
        finally:
            _SESSION.reset(token)
            _LAST["session"] = s

    def _run(self, s: Session, args: list[Any], kwargs: dict[str, Any], torch_in: bool) -> Any:
        if "platform_target" in self.options:
            s.refuse_removed("@nki.jit(platform_target=...)", "set NEURON_PLATFORM_TARGET_OVERRIDE instead")
        if s.running:  # a kernel called from a kernel runs inline, in its caller's program
            return self.fn(*args, **kwargs)
        outer = s.memory
        s.running = True
        try:
            if self.lnc == 1:
                s.memory = s.fresh_memory()  # a kernel's tiles live within the kernel
                out = self.fn(*args, **kwargs)
            else:
                out = self._run_programs(s, args, kwargs)
            arguments = [a for a in (*args, *kwargs.values()) if isinstance(a, NkiTensor)]
            return _convert_outputs(s, out, torch_in, arguments)
        finally:
            s.memory, s.running = outer, False

    def _run_programs(self, s: Session, args: list[Any], kwargs: dict[str, Any]) -> Any:
        """LNC=2: each program is a thread with its own core (trace, SBUF/PSUM, registers);
        ``shared_hbm`` tensors are shared. The session's trace gets program 0's instructions,
        then program 1's."""
        group = LncGroup(self.lnc)
        programs = [Session(s.target, program_id=p, num_programs=self.lnc, nki_version=s.nki_version, lnc=group,
                            running=True) for p in range(self.lnc)]
        results: list[Any] = [None] * self.lnc
        errors: list[BaseException | None] = [None] * self.lnc

        def run(p: int) -> None:
            _SESSION.set(programs[p])
            try:
                results[p] = self.fn(*args, **kwargs)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the caller's thread
                errors[p] = exc
                group.abort()

        threads = [threading.Thread(target=contextvars.copy_context().run, args=(run, p), name=f"nki-program-{p}")
                   for p in range(self.lnc)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for p in programs:
            s.trace.extend(p.trace)
        failures = [e for e in errors if e is not None]
        if failures:  # the program that failed first, not the peer it left waiting
            raise next((e for e in failures if not isinstance(e, Deadlock)), failures[0])
        return results[0]


def _convert_outputs(s: Session, out: Any, as_torch: bool, arguments: list[NkiTensor]) -> Any:
    """A kernel's result as arrays; an argument the kernel wrote in place may be returned (an output
    the caller passes in, nki-library's ``must_alias_input``), a tensor it allocated only in ``shared_hbm``."""
    if isinstance(out, NkiTensor):
        if out.buffer.on_chip:
            raise EmulatorError(f"a kernel returns HBM tensors; {out!r} is on chip")
        if out.buffer is not MemoryRegion.shared_hbm and not any(out is a for a in arguments):
            s.refuse_removed(f"returning the {out.buffer.value} tensor {out.name or 'unnamed'} from a kernel",
                             "allocate kernel outputs with buffer=nl.shared_hbm")
        return _from_numpy(out.data, as_torch)
    if isinstance(out, (tuple, list)):
        return type(out)(_convert_outputs(s, o, as_torch, arguments) for o in out)
    return out


def jit(func: Callable[..., Any] | None = None, mode: str = "auto", **kwargs: Any) -> Any:
    """``@nki.jit`` / ``@nki.jit(...)``: ``mode`` and other options are accepted and ignored (the
    emulator has no framework to detect); ``platform_target`` (NKI 0.2.0 only) is refused under
    0.3.0 when the kernel runs. The emulated target comes from the session or the environment."""
    if func is None:
        return lambda f: Kernel(f, **kwargs)
    return Kernel(func, **kwargs)


def simulate(kernel: Any) -> Callable[..., Any]:
    """``nki.simulate(kernel)(*arrays)``: run on CPU and return outputs in the inputs' format."""
    return kernel if isinstance(kernel, Kernel) else Kernel(kernel)
