"""Emulated ``nki.jit`` and ``nki.simulate``: run a kernel eagerly on NumPy arrays or CPU torch tensors."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from nkimoe.nki.emulator import dtypes as dt
from nkimoe.nki.emulator.core import EmulatorError, MemoryRegion, NkiTensor, Session, _SESSION, default_target

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
    if isinstance(value, np.ndarray):
        if not value.flags.c_contiguous:
            raise EmulatorError("NumPy kernel arguments must be C-contiguous (np.ascontiguousarray)")
        return value, False
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
        converted: list[Any] = []
        torch_in = False
        for arg in args:
            if isinstance(arg, (np.ndarray,)) or type(arg).__module__.startswith("torch"):
                array, is_torch = _to_numpy(arg)
                torch_in |= is_torch
                converted.append(NkiTensor.wrap(array))
            else:
                converted.append(arg)
        active = _SESSION.get()
        if active is not None:
            return self._run(active, converted, kwargs, torch_in)
        s = Session(default_target())
        token = _SESSION.set(s)
        try:
            return self._run(s, converted, kwargs, torch_in)
        finally:
            _SESSION.reset(token)
            _LAST["session"] = s

    def _run(self, s: Session, args: list[Any], kwargs: dict[str, Any], torch_in: bool) -> Any:
        results = []
        s.num_programs = self.lnc
        for program in range(self.lnc):  # LNC=2: the two cores run one after the other
            s.program_id = program
            results.append(self.fn(*args, **kwargs))
        return _convert_outputs(results[-1], torch_in)


def _convert_outputs(out: Any, as_torch: bool) -> Any:
    if isinstance(out, NkiTensor):
        if out.buffer.on_chip:
            raise EmulatorError(f"a kernel returns HBM tensors; {out!r} is on chip")
        if out.buffer is MemoryRegion.hbm:
            pass  # NKI 0.2.0 allowed nl.hbm outputs; 0.3.0 wants nl.shared_hbm. Both are accepted.
        return _from_numpy(out.data, as_torch)
    if isinstance(out, (tuple, list)):
        return type(out)(_convert_outputs(o, as_torch) for o in out)
    return out


def jit(fn: Callable[..., Any] | None = None, **kwargs: Any) -> Any:
    """``@nki.jit`` / ``@nki.jit(...)``: options are accepted and ignored (``platform_target`` was a
    0.2.0 option; the emulated target comes from the session or the environment)."""
    if fn is None:
        return lambda f: Kernel(f, **kwargs)
    return Kernel(fn, **kwargs)


def simulate(kernel: Any) -> Callable[..., Any]:
    """``nki.simulate(kernel)(*arrays)``: run on CPU and return outputs in the inputs' format."""
    return kernel if isinstance(kernel, Kernel) else Kernel(kernel)
