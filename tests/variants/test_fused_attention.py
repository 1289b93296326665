"""The fused decode attention block against the composition of the op references, in the emulator,
on Trn2 and Trn3, on one core and on both cores of an LNC=2 rank: one TP 4 rank's heads (8 query
heads, 1 KV head) at the contest's context and a short one, and TP 1 (32 and 4 heads)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nkimoe import ops
from nkimoe.bench.costmodel import estimate
from nkimoe.bench.trial import run_trial
from nkimoe.nki.emulator import session
from nkimoe.ops import compare, rope_cos_sin
from nkimoe.plugins import load_registry
from nkimoe.shapes import ModelShapes, neuron_call_sites
from nkimoe.variants import fused_attention as fa

H, D = 2048, 128
TARGETS = load_registry({}).targets


def _inputs(hq: int, hkv: int, length: int, capacity: int, dtype: torch.dtype, seed: int) -> tuple:
    """Random block inputs as the model sees them: unit-scale activations, norm weights near 1,
    projection weights of std 1/sqrt(fan-in), the new position's cos/sin, a ``capacity``-long cache
    holding ``length`` positions."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, std: float = 1.0, mean: float = 0.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * std + mean).to(dtype)

    cos, sin = rope_cos_sin(torch.tensor([length]), D, 1_000_000.0, dtype)
    return (rand(1, H), rand(1, H), rand(H, std=0.1, mean=1.0), rand((hq + 2 * hkv) * D, H, std=H**-0.5),
            rand(D, std=0.1, mean=1.0), rand(D, std=0.1, mean=1.0), cos, sin, rand(hkv, D, capacity),
            rand(hkv, capacity, D), length, rand(H, hq * D, std=(hq * D) ** -0.5), D**-0.5)


def _prepared(args: tuple) -> tuple:
    """``args`` with both projection weights in the variants' load-time layout."""
    prepared = list(args)
    for index, name in ((3, "w_qkv"), (11, "w_o")):
        prepared[index] = fa.PREPARE[name](args[index])
    return tuple(prepared)


def _run(target: str, programs: int, args: tuple) -> tuple[torch.Tensor, ...]:
    with session(TARGETS[target]):
        return fa.launcher(target, programs)(*_prepared(args))


#: (Hq, Hkv, length, cache capacity): a TP 4 rank at the contest's context (L = length + 1 = 1024,
#: the cache exactly full) and at L = 100 in a 1001-position cache (keys on the partitions: 125 x 8
#: keys and a ragged last partition of one); TP 1 at L = 100, and at
#: L = 2001 in a 2560-position cache, which the SBUF budget for the cache (``CACHE_BYTES``) does not
#: hold: loaded per KV head; a TP 4 rank at L = 8500 in an 8704-position cache, past one PSUM bank
#: of keys-on-partitions scores: 512-key blocks.
CASES = [pytest.param(8, 1, 1023, 1024, id="tp4-L1024"), pytest.param(8, 1, 99, 1001, id="tp4-L100"),
         pytest.param(32, 4, 99, 128, id="tp1-L100"), pytest.param(32, 4, 2000, 2560, id="tp1-L2001"),
         pytest.param(8, 1, 8499, 8704, id="tp4-L8500")]


@pytest.mark.parametrize("programs", [1, 2])
@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("hq,hkv,length,capacity", CASES)
def test_block_matches_composed_reference(target: str, programs: int, hq: int, hkv: int, length: int,
                                          capacity: int) -> None:
    args = _inputs(hq, hkv, length, capacity, torch.bfloat16, seed=length + hq)
    caches = (args[8].clone(), args[9].clone())
    actual = _run(target, programs, args)
    assert torch.equal(args[8], caches[0]) and torch.equal(args[9], caches[1]), "the block must not write the caches"
    expected = ops.attention_block(*args)
    assert torch.equal(actual[0], expected[0]), "the residual sum is one bf16 add, as the reference's"
    ok, detail = compare(actual, expected, *fa.BLOCK_TOLERANCE["bfloat16"])
    assert ok, detail


def test_block_fp32_within_declared_tolerance() -> None:
    args = _inputs(8, 1, 99, 128, torch.float32, seed=5)
    ok, detail = compare(_run("trn2", 1, args), ops.attention_block(*args), *fa.BLOCK_TOLERANCE["float32"])
    assert ok, detail


@pytest.mark.parametrize("programs", [1, 2])
def test_cache_positions_from_length_on_do_not_leak(programs: int) -> None:
    """Cache entries at and past ``length`` (where the caller writes the new k/v afterwards) are masked."""
    args = list(_inputs(8, 1, 300, 512, torch.bfloat16, seed=3))
    clean = _run("trn3", programs, tuple(args))
    args[8], args[9] = args[8].clone(), args[9].clone()
    args[8][:, :, 300:] = 50.0
    args[9][:, 300:] = 1e4
    poisoned = _run("trn3", programs, tuple(args))
    assert all(torch.equal(a, b) for a, b in zip(clean, poisoned))


def test_reference_is_the_chain_of_op_references() -> None:
    """The new key and value go into the caches at ``length`` and the attention covers ``length + 1``
    positions: the same output as attending over caches already holding them."""
    x, res, nw, w_qkv, qw, kw, cos, sin, k_t, v, length, w_o, scale = _inputs(8, 1, 40, 64, torch.bfloat16, seed=9)
    summed, out, k, v_new = ops.attention_block(x, res, nw, w_qkv, qw, kw, cos, sin, k_t, v, length, w_o,
                                                         scale)
    assert not torch.equal(k_t[:, :, length], k[0])  # the inputs are not mutated
    full_k, full_v = k_t.clone(), v.clone()
    full_k[:, :, length], full_v[:, length] = k[0], v_new[0]
    normed = ops.add_rmsnorm(x, res, nw)[1]
    q = ops.linear(normed, w_qkv)[:, :8 * D].reshape(1, 8, D)
    q = ops.rope(ops.rmsnorm(q, qw), k, cos, sin)[0]
    attn = ops.attention_decode(q, full_k, full_v, length + 1, scale)
    assert torch.equal(summed, x + res)
    assert torch.equal(out, ops.linear(attn.reshape(1, 8 * D), w_o))


def test_weight_layouts() -> None:
    w = torch.arange(256 * 512, dtype=torch.float32).reshape(256, 512)  # [N, K]
    blocks, stationary = fa.head_blocks(w), fa.output_on_partitions(w)
    kt, nt = 512 // 128, 256 // 128
    for c, p, j, i in ((0, 0, 0, 0), (1, 5, 3, 7), (1, 127, 3, 127)):
        assert blocks[c, p, j, i] == w[c * 128 + i, p * kt + j]
        assert stationary[p, c, j, i] == w[i * nt + c, j * 128 + p]  # [d, c, h, p] = W[p*N/128 + c, h*128 + d]
    assert blocks.is_contiguous() and stationary.is_contiguous()


def test_variants_declare_targets_and_lnc() -> None:
    variants = {v.name: v for v in fa.variants()}
    assert sorted(variants) == ["attention_block_trn2", "attention_block_trn2_lnc2", "attention_block_trn3",
                                "attention_block_trn3_lnc2"]
    tp4 = {"H": H, "Hq": 8, "Hkv": 1, "D": D, "L": 1024}
    lnc1 = dataclasses.replace(TARGETS["trn3"], name="trn3-lnc1", lnc=1)
    for name, variant in variants.items():
        target = TARGETS[variant.targets[0]]
        assert variant.supports(tp4, "bfloat16", target)[0], name
        assert variant.supports({**tp4, "Hq": 32, "Hkv": 4}, "bfloat16", target)[0], name
        assert not variant.supports({**tp4, "D": 64}, "bfloat16", target)[0], name
    ok, reason = variants["attention_block_trn3_lnc2"].supports(tp4, "bfloat16", lnc1)
    assert not ok and "LNC=1" in reason
    assert variants["attention_block_trn3"].supports(tp4, "bfloat16", lnc1)[0]
    assert set(variants["attention_block_trn3"].prepare) == {"w_qkv", "w_o"}


#: The chain the block replaces, as the Neuron path binds it per layer.
CHAIN = ("add_norm", "q_proj", "kv_proj", "q_norm", "k_norm", "rope", "attention", "o_proj")


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_fused_estimate_beats_the_chain_at_a_tp4_rank(target: str) -> None:
    """Cost-model estimates at the contest's setting (TP 4, L = 1024): the one-core kernel below the
    sum of the chain's kernels (each bound by priority), and the LNC=2 kernel below the one-core one."""
    binding = load_registry({}).bind(TARGETS[target], neuron_call_sites(ModelShapes(), 4, "decode", 1024))
    chain = 0.0
    for site in CHAIN:
        bound = binding.ops[f"decode.{site}"]
        trial = run_trial(bound.variant, bound.problem, TARGETS[target])
        assert trial.ok, trial.detail
        chain += trial.estimate.micros
    fused = []
    args = _inputs(8, 1, 1023, 1024, torch.bfloat16, seed=1)
    for programs in (1, 2):
        with session(TARGETS[target]) as s:
            fa.launcher(target, programs)(*_prepared(args))
        fused.append(estimate(s.trace, TARGETS[target]).micros)
    assert fused[0] < chain and fused[1] < fused[0], f"chain {chain:.1f} us, fused {fused} us (estimates)"
