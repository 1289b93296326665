"""Example nkimoe plugin: one Trn3 RMSNorm variant and one Trn3 target profile."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch

from nkimoe.hookspecs import hookimpl
from nkimoe.nki import nisa, nki, nl
from nkimoe.registry import Variant
from nkimoe.targets import TRN3, Target

P = 128
#: 128-token tiles moved per DMA.
TILES_PER_DMA = 4


@nki.jit
def rmsnorm_multitile_kernel(x, weight, eps: float = 1e-6):
    """RMSNorm moving up to four 128-token tiles per DMA.

    Dimensions: T tokens, H hidden. Args: x [T, H], weight [H] HBM. Returns [T, H] HBM, x.dtype.
    Rounds where the reference does: fp32 statistics, the normalised value, then the weight product.
    """
    t, h = x.shape
    out = nl.ndarray((t, h), dtype=x.dtype, buffer=nl.shared_hbm)
    w = nl.ndarray((P, h), dtype=weight.dtype, buffer=nl.sbuf)
    rows0 = min(P, t)
    nisa.dma_copy(dst=w[0:rows0], src=weight.reshape((1, h)).ap([[0, rows0], [1, h]]))
    group = P * TILES_PER_DMA
    for g in nl.affine_range((t + group - 1) // group):
        start = g * group
        full = min(TILES_PER_DMA, (t - start) // P)
        if full > 0:  # whole tiles: one DMA in, one DMA out, token start + i*128 + p on partition p
            xt = nl.ndarray((P, TILES_PER_DMA, h), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=xt[:, 0:full, :],
                          src=x[start:start + full * P, :].reshape((full, P, h)).permute((1, 0, 2)))
            yt = nl.ndarray((P, TILES_PER_DMA, h), dtype=x.dtype, buffer=nl.sbuf)
            for i in nl.affine_range(full):
                _normalize(yt[:, i, :], xt[:, i, :], w, P, h, eps)
            nisa.dma_copy(dst=out[start:start + full * P, :].reshape((full, P, h)).permute((1, 0, 2)),
                          src=yt[:, 0:full, :])
        rest = min(group, t - start) - full * P
        if rest > 0:  # the ragged last tile
            r0 = start + full * P
            xr = nl.ndarray((P, h), dtype=x.dtype, buffer=nl.sbuf)
            nisa.dma_copy(dst=xr[0:rest], src=x[r0:r0 + rest, :])
            yr = nl.ndarray((P, h), dtype=x.dtype, buffer=nl.sbuf)
            _normalize(yr, xr, w, rest, h, eps)
            nisa.dma_copy(dst=out[r0:r0 + rest, :], src=yr[0:rest])
    return out


def _normalize(y, x, w, rows: int, h: int, eps: float) -> None:  # noqa: ANN001
    sq = nl.ndarray((P, h), dtype=nl.float32, buffer=nl.sbuf)
    ss = nl.ndarray((P, 1), dtype=nl.float32, buffer=nl.sbuf)
    nisa.activation(dst=sq[0:rows], op=nl.square, data=x[0:rows], reduce_op=nl.add, reduce_res=ss[0:rows],
                    reduce_cmd=nisa.reduce_cmd.reset_reduce)
    nisa.tensor_scalar(dst=ss[0:rows], data=ss[0:rows], op0=nl.multiply, operand0=1.0 / h, op1=nl.add, operand1=eps)
    nisa.activation(dst=ss[0:rows], op=nl.rsqrt, data=ss[0:rows])
    normed = nl.ndarray((P, h), dtype=x.dtype, buffer=nl.sbuf)
    nisa.tensor_scalar(dst=normed[0:rows], data=x[0:rows], op0=nl.multiply, operand0=ss[0:rows])
    nisa.tensor_tensor(dst=y[0:rows], data1=normed[0:rows], data2=w[0:rows], op=nl.multiply)


def rmsnorm_multitile(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    return rmsnorm_multitile_kernel(x, weight, eps=eps)


def _supports(dims: Mapping[str, int], dtype: str, target: Target) -> tuple[bool, str]:
    item = 2 if dtype == "bfloat16" else 4
    need = dims["H"] * (2 * TILES_PER_DMA * item * 2 + 4 * 4)
    if need > target.sbuf_usable_bytes_per_partition:
        return False, f"H={dims['H']} needs {need} B per partition, {target.name} has {target.sbuf_usable_bytes_per_partition}"
    return True, f"{TILES_PER_DMA} tiles per DMA fit ({need} B per partition)"


#: A Trainium3 profile with one physical core per logical core (LNC=1).
TRN3_LNC1 = dataclasses.replace(TRN3, name="trn3-lnc1", description="AWS Trainium3, LNC=1 (8 logical cores)", lnc=1)


@hookimpl
def register_variants(register: Callable[[Any], None]) -> None:
    register(Variant(
        op="rmsnorm", name="rmsnorm_multitile_trn3", targets=("trn3",), kernel=rmsnorm_multitile, nki=True,
        priority=5, supports=_supports, tolerance={"bfloat16": (1e-3, 2.0**-6), "float32": (1e-6, 1e-5)},
        description="example plugin: four 128-token tiles per DMA",
    ))


@hookimpl
def register_targets(register: Callable[[Any], None]) -> None:
    register(TRN3_LNC1)
