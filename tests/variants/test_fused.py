"""The fused ``moe_block`` decode kernels, verified in the emulator against the composed reference at
Qwen3-30B-A3B's full width (H=2048, E=128, K=8) for the whole intermediate axis (I=768) and a TP 4
rank's slice (I=192), and estimated against the chain of the kernels it fuses."""

from __future__ import annotations

import pytest

from nkimoe.bench.costmodel import _dma_engine_seconds, schedule
from nkimoe.bench.trial import make_inputs, run_trial
from nkimoe.nki.emulator import session
from nkimoe.ops import Problem
from nkimoe.plugins import load_registry

REGISTRY = load_registry({})


@pytest.mark.parametrize("dtype,inter", [("bfloat16", 768), ("bfloat16", 192), ("float32", 192)])
@pytest.mark.parametrize("cores", ["", "_lnc2"])
@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_fused_moe_block_matches_the_composed_reference(target: str, cores: str, dtype: str, inter: int) -> None:
    variant = REGISTRY.variants[f"moe_block_tkg_{target}{cores}"]
    problem = Problem.of("moe_block", dtype, T=1, H=2048, E=128, K=8, I=inter)
    trial = run_trial(variant, problem, REGISTRY.targets[target], seed=inter)
    assert trial.ok, trial.detail  # within MOE_BLOCK_TOLERANCE (see variants/fused.py for its derivation)
    assert trial.estimate is not None and trial.estimate.micros > 0


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_fused_moe_block_is_estimated_faster_than_its_chain(target: str) -> None:
    problem = Problem.of("moe_block", T=1, H=2048, E=128, K=8, I=192)
    tgt = REGISTRY.targets[target]
    parts, _, _ = REGISTRY.bind_chain("decode.moe_block", tgt, problem, "fastest", None)
    chain_us = 0.0
    for part in parts:
        trial = run_trial(part.variant, part.problem, tgt)
        assert trial.ok and trial.estimate is not None, trial.detail
        chain_us += trial.estimate.micros
    fused = [run_trial(REGISTRY.variants[f"moe_block_tkg_{target}{cores}"], problem, tgt) for cores in ("", "_lnc2")]
    assert all(f.ok and f.estimate is not None for f in fused)
    one_core, both = (f.estimate.micros for f in fused)
    # cost-model estimates: the chain binds the LNC=2 part kernels; one core's fused kernel reads the
    # same weights on half the DMA engines, both cores' beats the chain
    assert both < chain_us and both < one_core, (both, one_core, chain_us)


def test_fused_variants_take_one_decode_token_only() -> None:
    variant = REGISTRY.variants["moe_block_tkg_trn3"]
    ok, reason = variant.supports({"T": 2, "H": 2048, "E": 128, "K": 8, "I": 192}, "bfloat16", REGISTRY.targets["trn3"])
    assert not ok and "one token" in reason
    ok, _ = variant.supports({"T": 1, "H": 2048, "E": 128, "K": 8, "I": 768}, "bfloat16", REGISTRY.targets["trn3"])
    assert ok


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_fused_moe_block_loads_experts_as_soon_as_the_ids_are_known(target: str) -> None:
    """The expert weight loads wait for nothing but the ids (cost-model schedule): not for the routing
    weights' softmax, nor behind a store on the DMA engines."""
    problem = Problem.of("moe_block", T=1, H=2048, E=128, K=8, I=192)
    variant = REGISTRY.variants[f"moe_block_tkg_{target}_lnc2"]
    args, kwargs = make_inputs(problem, 0)
    tgt = REGISTRY.targets[target]
    with session(tgt) as s:
        variant.kernel(*variant.prepare_args(args), **kwargs)
    times = schedule(s.trace, tgt)
    for program in (0, 1):
        steps = [(i, t) for i, t in zip(s.trace, times) if i.program == program]
        ids_done = next(t[1] for i, t in steps if i.name == "nc_find_index8")
        first_load = next((i, t) for i, t in steps if i.detail.get("dynamic"))
        assert first_load[1][0] == ids_done
        # it starts after the DMA latency and descriptor generation, then takes its engines' time
        # (bytes at their rate plus the per-descriptor time)
        start = first_load[1][1] - max(_dma_engine_seconds(first_load[0], tgt))
        assert start == pytest.approx(ids_done + (tgt.dma_fixed_ns + tgt.dge_ns) * 1e-9)
