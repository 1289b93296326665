"""One SDK release's vendored NxD and NxDI sources on ``sys.path``, with the closed packages' stand-ins."""

from __future__ import annotations

import os
import sys
from pathlib import Path

#: The SDK releases whose NxD / NxDI sources are vendored.
SDK_VERSIONS = ("2.27", "2.28", "2.29")


def vendor_root(project: Path | None = None) -> Path:
    """``NKIMOE_VENDOR`` if set, else ``../shared/vendor`` next to the project root."""
    if os.environ.get("NKIMOE_VENDOR"):
        return Path(os.environ["NKIMOE_VENDOR"])
    project = project or Path(__file__).resolve().parents[3]
    return project.parent / "shared" / "vendor"


def source_dirs(sdk: str, vendor: Path) -> list[Path]:
    """The NxDI and NxD source roots of SDK release ``sdk``."""
    if sdk not in SDK_VERSIONS:
        raise ValueError(f"unknown SDK release {sdk!r}; valid: {', '.join(SDK_VERSIONS)}")
    return [vendor / "neuronx-distributed-inference" / f"sdk-{sdk}" / "src",
            vendor / "neuronx-distributed" / f"sdk-{sdk}" / "src"]


def enter(sdk: str, vendor: Path | None = None) -> None:
    """Make ``import neuronx_distributed_inference`` give SDK ``sdk``'s sources running on CPU."""
    os.environ.setdefault("PJRT_DEVICE", "CPU")
    os.environ["NKIMOE_EMULATE"] = "1"  # nkimoe's kernels run in its emulator, never in the stand-in ``nki``
    import nkimoe.nki  # noqa: F401  (binds the emulator before the stand-in ``nki`` exists)
    import torch_xla  # noqa: F401  (before the libneuronxla stand-in, which its plugin probe would find)

    from nkimoe.offhw import standins

    for path in reversed(source_dirs(sdk, vendor or vendor_root())):
        if not path.is_dir():
            raise FileNotFoundError(f"vendored sources missing: {path}")
        sys.path.insert(0, str(path))
    standins.install()
