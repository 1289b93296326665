"""Emulator overhead: time of an emulated kernel over a plain NumPy implementation of the same
work, measured side by side in one run (goal: within 30x). Both sides run on one thread (one
BLAS thread), so each is timed by this process's CPU time: equal to wall time on an idle
machine, and unaffected by other jobs on a shared one.

    python bench/emulator_speed.py [--repeats 15]
"""

from __future__ import annotations

import os

# Both sides run on one BLAS thread: set before NumPy (and its BLAS) is first imported.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "BLIS_NUM_THREADS",
             "VECLIB_MAXIMUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ[_var] = "1"

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import ml_dtypes  # noqa: E402
import numpy as np  # noqa: E402

from nkimoe.nki.emulator import session  # noqa: E402
from nkimoe.nki.examples import gemv_kernel, rmsnorm_kernel  # noqa: E402

BF16 = ml_dtypes.bfloat16


def median_seconds(fn: Callable[[], object], repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.process_time()
        fn()
        times.append(time.process_time() - start)
    return statistics.median(times)


def numpy_gemv(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    return x.astype(np.float32) @ w.astype(np.float32)


def numpy_rmsnorm(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    xf = x.astype(np.float32)
    normed = (xf / np.sqrt((xf * xf).mean(axis=1, keepdims=True) + 1e-6)).astype(BF16)
    return (normed.astype(np.float32) * weight.astype(np.float32)).astype(BF16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    r = np.random.default_rng(0)
    x1 = r.standard_normal((1, 2048)).astype(BF16)
    w = r.standard_normal((2048, 768)).astype(BF16)
    x = r.standard_normal((1024, 2048)).astype(BF16)
    g = (r.standard_normal(2048) * 0.1 + 1).astype(BF16)
    cases = [
        ("expert GEMV 1x2048 @ 2048x768 (bf16)", lambda: gemv_kernel(x1, w), lambda: numpy_gemv(x1, w)),
        ("RMSNorm 1024x2048 (bf16)", lambda: rmsnorm_kernel(x, g), lambda: numpy_rmsnorm(x, g)),
    ]
    print(f"{'case':<40} {'emulated ms':>12} {'numpy ms':>10} {'ratio':>8}")
    with session("trn3", nki_version="0.2.0"):  # the RMSNorm example is written in NKI 0.2.0 idioms
        for name, emulated, plain in cases:
            e = median_seconds(emulated, args.repeats)
            p = median_seconds(plain, args.repeats)
            print(f"{name:<40} {e * 1e3:>12.2f} {p * 1e3:>10.2f} {e / p:>7.1f}x")


if __name__ == "__main__":
    main()
