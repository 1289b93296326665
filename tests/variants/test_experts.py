"""The expert MLP variants at full width (hidden 2048, intermediate 768, 128 experts, top-8) in the
emulator, against the reference and against HF transformers' Qwen3-MoE sparse MoE block."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from nkimoe.nki.emulator import session
from nkimoe.ops import _expert_bank, compare, expert_mlp, linear, router
from nkimoe.plugins import load_registry
from nkimoe.bench.trial import run_trial
from nkimoe.ops import Problem
from nkimoe.variants.experts import EXPERT_TOLERANCE, down_i_major, expert_blocks, expert_slots, gate_up_h_major

H, I, E, K = 2048, 768, 128, 8
REGISTRY = load_registry({})
TOKENS = (1, 17, 128, 300)
CASES = [
    (name, target, tokens)
    for name in ("expert_mlp_tkg_nki", "expert_mlp_cte_trn2", "expert_mlp_cte_trn3")
    for target in REGISTRY.variants[name].targets
    for tokens in TOKENS
    if REGISTRY.variants[name].supports({"T": tokens, "H": H, "I": I, "E": E, "K": K}, "bfloat16",
                                        REGISTRY.targets[target])[0]
] + [(f"expert_mlp_tkg_tokens_{target}", target, 1) for target in ("trn2", "trn3")]


class Model:
    """One full-width MoE block's weights, their load-time layouts, and HF's block on the same weights."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(11)
        self.gate_up = _expert_bank(E, (2 * I, H), torch.bfloat16, g)
        self.down = _expert_bank(E, (H, I), torch.bfloat16, g)
        self.gate = (torch.randn(E, H, generator=g) * 0.05).to(torch.bfloat16)
        self.prepared = (gate_up_h_major(self.gate_up), down_i_major(self.down))
        self.x = torch.randn(max(TOKENS), H, generator=g).to(torch.bfloat16)
        config = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I,
                                norm_topk_prob=True, num_hidden_layers=1, vocab_size=128)
        with torch.device("meta"):
            self.hf_block = hf.Qwen3MoeSparseMoeBlock(config)
        self.hf_block.experts.gate_up_proj = torch.nn.Parameter(self.gate_up, requires_grad=False)
        self.hf_block.experts.down_proj = torch.nn.Parameter(self.down, requires_grad=False)
        self.hf_block.gate.weight = torch.nn.Parameter(self.gate, requires_grad=False)

    def routed(self, tokens: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.x[:tokens]
        weights, ids = router(linear(x, self.gate), K)
        return x, weights, ids


@pytest.fixture(scope="module")
def model() -> Model:
    return Model()


@pytest.mark.parametrize("name,target,tokens", CASES)
def test_expert_variant_matches_reference_and_hf(model: Model, name: str, target: str, tokens: int) -> None:
    x, weights, ids = model.routed(tokens)
    with session(target):
        actual = REGISTRY.variants[name].kernel(x, weights, ids, *model.prepared)
    atol, rtol = EXPERT_TOLERANCE["bfloat16"]
    ok, detail = compare(actual, expert_mlp(x, weights, ids, model.gate_up, model.down), atol, rtol)
    assert ok, detail
    with torch.no_grad():
        expected_hf = model.hf_block(x[None])[0]
    ok, detail = compare(actual, expected_hf, atol, rtol)
    assert ok, f"vs HF sparse MoE block: {detail}"


def test_cases_cover_decode_and_prefill_on_both_targets() -> None:
    for target in ("trn2", "trn3"):
        assert {t for _, tg, t in CASES if tg == target} == set(TOKENS)


def _expert_loads(trace: list) -> int:  # noqa: ANN001
    per_expert = H * 2 * I * 2  # one expert's gate|up block, bf16
    return sum(1 for i in trace if i.name == "dma_copy" and i.hbm_read == per_expert)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_only_selected_experts_are_read(model: Model, target: str) -> None:
    x, weights, ids = model.routed(17)
    used = len(torch.unique(ids))
    assert used < E  # 17 tokens x 8 slots leave experts without tokens
    name = "expert_mlp_cte_trn2" if target == "trn2" else "expert_mlp_cte_trn3"
    with session(target) as s:
        REGISTRY.variants[name].kernel(x, weights, ids, *model.prepared)
    assert _expert_loads(s.trace) == used  # one block per used expert (each has <= 17 tokens)
    weight_bytes = sum(i.hbm_read for i in s.trace if i.name == "dma_copy" and i.hbm_read >= H * I * 2)
    assert weight_bytes == used * 3 * H * I * 2
    x1, w1, ids1 = model.routed(1)
    with session(target) as s:
        REGISTRY.variants["expert_mlp_tkg_nki"].kernel(x1, w1, ids1, *model.prepared)
    assert _expert_loads(s.trace) == K


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_tokens_stationary_reads_each_selected_expert_once(model: Model, target: str) -> None:
    """Four tokens routed to the same eight experts: the tokens-stationary kernel reads eight
    experts, the weights-stationary one an expert per token and slot (32)."""
    x = model.x[:1].repeat(4, 1)
    weights, ids = router(linear(x, model.gate), K)
    with session(target) as s:
        actual = REGISTRY.variants[f"expert_mlp_tkg_tokens_{target}"].kernel(x, weights, ids, *model.prepared)
    assert _expert_loads(s.trace) == K
    ok, detail = compare(actual, expert_mlp(x, weights, ids, model.gate_up, model.down), *EXPERT_TOLERANCE["bfloat16"])
    assert ok, detail
    with session(target) as s:
        REGISTRY.variants["expert_mlp_tkg_nki"].kernel(x, weights, ids, *model.prepared)
    assert _expert_loads(s.trace) == 4 * K


#: A rank's slice of the intermediate axis under tensor parallelism: 768 over TP 4 and TP 8 (one
#: full partition tile and a ragged one of 64 rows; a single ragged tile of 96 rows).
RAGGED = [(name, target, tokens, inter) for inter in (192, 96)
          for name, target, tokens in (("expert_mlp_tkg_nki", "trn2", 1), ("expert_mlp_tkg_nki", "trn3", 1),
                                       ("expert_mlp_cte_trn2", "trn2", 128), ("expert_mlp_cte_trn3", "trn3", 17),
                                       ("expert_mlp_tkg_tokens_trn2", "trn2", 4),
                                       ("expert_mlp_tkg_tokens_trn3", "trn3", 17))]


@pytest.fixture(scope="module")
def ragged_banks() -> dict[int, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(12)
    return {inter: (_expert_bank(E, (2 * inter, H), torch.bfloat16, g), _expert_bank(E, (H, inter), torch.bfloat16, g))
            for inter in (192, 96)}


def _traced(target: str, kernel, *args: torch.Tensor) -> tuple[torch.Tensor, list]:  # noqa: ANN001
    with session(target) as s:
        out = kernel(*args)
    return out, s.trace


@pytest.mark.parametrize("name,target,tokens,inter", RAGGED)
def test_expert_variant_with_a_ragged_intermediate(model: Model, ragged_banks: dict, name: str, target: str,
                                                   tokens: int, inter: int) -> None:
    """An intermediate size that is not a multiple of 128 runs unpadded: the result of the same
    weights zero-padded to 256 / 128 (zero rows add exactly zero), with exactly the padding's
    bytes fewer read per expert load."""
    gate_up, down = ragged_banks[inter]
    x, weights, ids = model.routed(tokens)
    kernel = REGISTRY.variants[name].kernel
    actual, trace = _traced(target, kernel, x, weights, ids, gate_up_h_major(gate_up), down_i_major(down))
    ok, detail = compare(actual, expert_mlp(x, weights, ids, gate_up, down), *EXPERT_TOLERANCE["bfloat16"])
    assert ok, detail
    padded = -(-inter // 128) * 128
    pad = padded - inter
    gate_up_padded = torch.zeros(E, 2 * padded, H, dtype=gate_up.dtype)
    gate_up_padded[:, :inter], gate_up_padded[:, padded:padded + inter] = gate_up[:, :inter], gate_up[:, inter:]
    down_padded = torch.nn.functional.pad(down, (0, pad))
    expected, trace_padded = _traced(target, kernel, x, weights, ids, gate_up_h_major(gate_up_padded),
                                     down_i_major(down_padded))
    assert torch.equal(actual, expected)
    read, read_padded = (sum(i.hbm_read for i in t) for t in (trace, trace_padded))
    if name.endswith("_tkg_nki"):  # an expert load per (token, slot); the others read each used expert once
        loads = tokens * K
    else:
        assert int(torch.bincount(ids.flatten()).max()) <= 128  # one block per used expert
        loads = len(torch.unique(ids))
    assert read_padded - read == loads * 3 * H * pad * 2
    # Both kernels are HBM-bound on weights: every large DMA moves runs of at least 2 KiB per
    # partition (the full-rate size) although one gate|up row of the slice is only 2I x 2 bytes.
    large = [i for i in trace if i.name == "dma_copy" and i.hbm_read >= H * 64 * 2]
    assert len(large) >= 2 * loads and min(i.contiguous for i in large) >= 2048


@pytest.mark.parametrize("name,target,tokens", [("expert_mlp_tkg_nki", "trn3", 1), ("expert_mlp_tkg_lnc2_trn2", "trn2", 3)])
def test_tp4_decode_weight_dmas_span_every_partition(model: Model, ragged_banks: dict, name: str, target: str,
                                                     tokens: int) -> None:
    """At a TP 4 slice (I = 192) the 64 ragged down rows of two experts share one gather DMA, so no
    weight DMA leaves half of a core's DMA engines idle, and each selected expert is read exactly once."""
    gate_up, down = ragged_banks[192]
    x, weights, ids = model.routed(tokens)
    actual, trace = _traced(target, REGISTRY.variants[name].kernel, x, weights, ids, gate_up_h_major(gate_up),
                            down_i_major(down))
    ok, detail = compare(actual, expert_mlp(x, weights, ids, gate_up, down), *EXPERT_TOLERANCE["bfloat16"])
    assert ok, detail
    large = [i for i in trace if i.name == "dma_copy" and i.hbm_read >= H * 64 * 2]
    assert {i.partitions for i in large} == {128}
    assert sum(i.hbm_read for i in large) == tokens * K * 3 * H * 192 * 2


# --- LNC=2 decode: the selected experts dealt out to the two physical cores ----------------------


@pytest.mark.parametrize("name,target,tokens", [("expert_mlp_tkg_lnc2_trn2", "trn2", 1),
                                                ("expert_mlp_tkg_lnc2_trn3", "trn3", 2)])
def test_lnc2_expert_decode_matches_reference_and_hf(model: Model, name: str, target: str, tokens: int) -> None:
    x, weights, ids = model.routed(tokens)
    with session(target) as s:
        actual = REGISTRY.variants[name].kernel(x, weights, ids, *model.prepared)
    atol, rtol = EXPERT_TOLERANCE["bfloat16"]
    ok, detail = compare(actual, expert_mlp(x, weights, ids, model.gate_up, model.down), atol, rtol)
    assert ok, detail
    with torch.no_grad():
        ok, detail = compare(actual, model.hf_block(x[None])[0], atol, rtol)
    assert ok, f"vs HF sparse MoE block: {detail}"
    for program in (0, 1):  # each core reads half of the (token, slot) pairs' experts
        assert _expert_loads([i for i in s.trace if i.program == program]) == tokens * K // 2


@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_lnc2_expert_decode_at_tp4_is_estimated_faster_than_one_core(target: str) -> None:
    # One TP-4 rank's slice (I = 768 / 4 = 192: a full and a ragged partition tile), one token.
    problem = Problem.of("expert_mlp", "bfloat16", T=1, H=H, I=I // 4, E=E, K=K)
    tgt = REGISTRY.targets[target]
    lnc2 = run_trial(REGISTRY.variants[f"expert_mlp_tkg_lnc2_{target}"], problem, tgt, seed=4)
    assert lnc2.ok, lnc2.detail
    one_core = run_trial(REGISTRY.variants["expert_mlp_tkg_nki"], problem, tgt, seed=4)
    assert lnc2.estimate.programs == 2 and one_core.estimate.programs == 1
    # Two cores halve the expert bytes per core; launch and swap costs keep it above half (estimates).
    assert lnc2.estimate.micros < 0.75 * one_core.estimate.micros, (lnc2.estimate.describe(), one_core.estimate.describe())


def test_lnc2_expert_decode_needs_lnc2() -> None:
    lnc1 = dataclasses.replace(REGISTRY.targets["trn3"], name="trn3-lnc1", lnc=1)
    ok, reason = REGISTRY.variants["expert_mlp_tkg_lnc2_trn3"].supports({"T": 1, "H": H, "I": I, "E": E, "K": K},
                                                                        "bfloat16", lnc1)
    assert not ok and "LNC=1" in reason


def test_blocks_group_tokens_by_expert() -> None:
    ids = torch.tensor([[3, 1], [3, 2], [1, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    n, block_expert, block_tokens, block_weights = expert_blocks(ids, weights, 8)
    assert int(n) == 3
    assert block_expert[:3, 0].tolist() == [1, 2, 3]
    assert block_tokens[0, :2].tolist() == [0, 2] and block_tokens[0, 2] == 3  # padding -> zero row T=3
    assert block_tokens[2, :3].tolist() == [0, 1, 2]
    assert block_weights[2, :3].tolist() == pytest.approx([0.6, 0.7, 0.5])
    assert float(block_weights[0, 2:].abs().sum()) == 0.0


def test_slots_list_each_used_expert_once_with_dense_weights() -> None:
    ids = torch.tensor([[3, 1], [3, 2], [1, 3]])
    weights = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])
    n, slot_expert, slot_weights = expert_slots(ids, weights, 8)
    assert int(n) == 3 and slot_expert.shape == (6, 1) and slot_weights.shape == (6, 3)
    assert slot_expert[:3, 0].tolist() == [1, 2, 3]
    assert torch.allclose(slot_weights[:3], torch.tensor([[0.4, 0.0, 0.5], [0.0, 0.3, 0.0], [0.6, 0.7, 0.5]]))
    assert set(slot_expert[3:, 0].tolist()).isdisjoint({1, 2, 3}) and float(slot_weights[3:].abs().sum()) == 0.0


def test_layout_conversion_round_trips(model: Model) -> None:
    gu, dn = model.prepared
    assert gu.shape == (E, H, 2 * I) and dn.shape == (E, I, H)
    assert torch.equal(gu[5].T, model.gate_up[5]) and torch.equal(dn[7].T, model.down[7])


class _Blocks(torch.nn.Module):
    def forward(self, ids: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return expert_blocks(ids, weights, 16) + expert_slots(ids, weights, 16)


def test_blocks_are_computed_in_the_graph_not_at_trace_time() -> None:
    """An exported graph (torch.export refuses value-dependent Python control flow, as a torch-xla
    trace on a Neuron device would silently bake it in) recomputes the blocks and the slots from the run-time ids."""
    g = torch.Generator().manual_seed(2)
    first, second = (torch.randint(0, 16, (40, 8), generator=g) for _ in range(2))
    weights = torch.rand(40, 8, generator=g)
    graph = torch.export.export(_Blocks(), (first, weights)).module()
    for ids in (first, second, torch.zeros_like(first)):
        for got, want in zip(graph(ids, weights), expert_blocks(ids, weights, 16) + expert_slots(ids, weights, 16)):
            assert torch.equal(got, want)
    n, block_expert, block_tokens, _ = expert_blocks(torch.zeros_like(first), weights, 16)
    assert int(n) == 3 and block_expert[:3].flatten().tolist() == [0, 0, 0]  # 320 pairs: blocks of 128, 128, 64
    assert int((block_tokens[:3] < 40).sum()) == 320
