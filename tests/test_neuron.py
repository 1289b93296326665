"""The Neuron path's per-rank computations on CPU, with tensor-parallel ranks simulated.

NxD shards the converted checkpoint per rank (``create_local_weight`` in
neuronx_distributed/trace/trace.py: split the partition axis into ``tp * stride`` chunks, rank r
takes chunks ``r::tp``) and all-reduces row-parallel partial sums; ``shard`` below does the same
slicing and the tests sum the partials, so that what each rank computes through its bound
variants (emulated NKI kernels on trn2/trn3, references on cpu) is checked against HF
transformers' modules on the whole model width. The NxDI subclasses themselves need the SDK.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache, Qwen3MoeConfig
from transformers.models.qwen3_moe import modeling_qwen3_moe as hf

from nkimoe.neuron import (
    Kernels,
    NeuronWiringError,
    attention_block_binding,
    attention_block_step,
    attention_block_weights,
    axis_permutation,
    check_neuron_config,
    decode_attention,
    decode_layouts,
    launch,
    linear_rows,
    moe_layer_partial,
    moe_partial,
    permuted_shape,
    prefill_attention,
    rms_norm,
    rotary,
    stack_experts,
    takes_grid,
)
from nkimoe.ops import (
    _expert_bank,
    attention_decode,
    attention_prefill,
    compare,
    rmsnorm,
    rope_cos_sin,
    untied_logits,
)
from nkimoe.neuron.nxdi import router_dtype
from nkimoe.ops import router as ops_router
from nkimoe.shapes import ModelShapes, intermediate_per_rank, neuron_call_sites
from nkimoe.variants.attention import ATTENTION_TOLERANCE
from nkimoe.variants.experts import EXPERT_TOLERANCE
from nkimoe.variants.fused import MOE_BLOCK_TOLERANCE
from nkimoe.variants.fused_attention import BLOCK_TOLERANCE
from nkimoe.variants.linear import LINEAR_TOLERANCE

H, I, E, K = 2048, 768, 128, 8  # Qwen3-30B-A3B
HEADS, KV_HEADS, D = 32, 4, 128
TP = 4  # the contest harness's default tp_degree
TARGETS = ("cpu", "trn2", "trn3")


def shard(full: torch.Tensor, axis: int, stride: int, rank: int, tp: int = TP) -> torch.Tensor:
    """Rank ``rank``'s slice of ``full`` as NxD's create_local_weight cuts it."""
    chunks = torch.chunk(full, tp * stride, dim=axis)
    return torch.cat(chunks[rank::tp], dim=axis)


@pytest.fixture
def kernels(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Kernels:
    monkeypatch.setenv("NKIMOE_TARGET", request.param)
    return Kernels()


def test_axis_permutation_reads_prepare_functions() -> None:
    assert axis_permutation(lambda w: w.T.contiguous(), 2) == (1, 0)
    assert axis_permutation(lambda w: w.transpose(1, 2).contiguous(), 3) == (0, 2, 1)
    assert axis_permutation(lambda w: w, 3) == (0, 1, 2)
    assert axis_permutation(lambda w: w * 2, 2) is None
    assert axis_permutation(lambda w: w.reshape(w.shape[1], w.shape[0]), 2) is None


@pytest.mark.parametrize("kernels,gate,experts", [
    ("cpu", (0, 1), (0, 1, 2)),
    ("trn2", (1, 0), (0, 2, 1)),
    ("trn3", (1, 0), (0, 2, 1)),
], indirect=["kernels"])
def test_storage_layouts_follow_the_decode_bound_variants(kernels: Kernels, gate: tuple, experts: tuple) -> None:
    gate_layout, expert_layouts = decode_layouts(kernels, torch.bfloat16, 1, H, intermediate_per_rank(I, TP), E, K)
    assert gate_layout == gate
    assert expert_layouts == {"w_gate_up": experts, "w_down": experts}


def test_intermediate_slices() -> None:
    assert intermediate_per_rank(768, 4) == 192 and intermediate_per_rank(768, 8) == 96
    with pytest.raises(ValueError, match="moe_intermediate_size=770 does not split over tp_degree=4"):
        intermediate_per_rank(770, 4)


def test_stacked_experts_shard_into_each_ranks_gate_and_up_slices() -> None:
    g = torch.Generator().manual_seed(3)
    experts, inter, hidden = 3, 12, 5
    sd = {f"mlp.experts.{e}.{n}.weight": torch.randn(*shape, generator=g) for e in range(experts)
          for n, shape in (("gate_proj", (inter, hidden)), ("up_proj", (inter, hidden)), ("down_proj", (hidden, inter)))}
    gate_up, down = stack_experts(sd, "mlp.", experts, TP)
    assert gate_up.shape == (experts, 2 * inter, hidden) and down.shape == (experts, hidden, inter)
    piece = inter // TP
    for rank in range(TP):
        gu, dn = shard(gate_up, 1, 2, rank), shard(down, 2, 1, rank)
        assert gu.shape == (experts, 2 * piece, hidden) and dn.shape == (experts, hidden, piece)
        rows = slice(rank * piece, (rank + 1) * piece)
        for e in range(experts):
            assert torch.equal(gu[e, :piece], sd[f"mlp.experts.{e}.gate_proj.weight"][rows])
            assert torch.equal(gu[e, piece:], sd[f"mlp.experts.{e}.up_proj.weight"][rows])
            assert torch.equal(dn[e], sd[f"mlp.experts.{e}.down_proj.weight"][:, rows])
    with pytest.raises(ValueError, match="moe_intermediate_size=12 does not split over tp_degree=5"):
        stack_experts(sd, "mlp.", experts, 5)


class MoeLayer:
    """One full-width MoE block in HF's per-expert checkpoint form and as HF's module."""

    def __init__(self) -> None:
        g = torch.Generator().manual_seed(5)
        bf = torch.bfloat16
        self.x = torch.randn(1, 5, H, generator=g).to(bf)
        # A gate whose logits for these tokens are permuted ladders (ops.untied_logits): no routing ties.
        rows = self.x[0].float()
        self.sd = {"mlp.gate.weight": (torch.linalg.pinv(rows) @ untied_logits(5, E, torch.float32, g)).T.to(bf)}
        gate_up, down = _expert_bank(E, (2 * I, H), bf, g), _expert_bank(E, (H, I), bf, g)
        for e in range(E):
            self.sd[f"mlp.experts.{e}.gate_proj.weight"] = gate_up[e, :I]
            self.sd[f"mlp.experts.{e}.up_proj.weight"] = gate_up[e, I:]
            self.sd[f"mlp.experts.{e}.down_proj.weight"] = down[e]
        config = Qwen3MoeConfig(hidden_size=H, num_experts=E, num_experts_per_tok=K, moe_intermediate_size=I,
                                norm_topk_prob=True, num_hidden_layers=1, vocab_size=128)
        with torch.device("meta"):
            self.block = hf.Qwen3MoeSparseMoeBlock(config)
        self.block.experts.gate_up_proj = torch.nn.Parameter(gate_up, requires_grad=False)
        self.block.experts.down_proj = torch.nn.Parameter(down, requires_grad=False)
        self.block.gate.weight = torch.nn.Parameter(self.sd["mlp.gate.weight"], requires_grad=False)
        self.full = stack_experts(self.sd, "mlp.", E, TP)


@pytest.fixture(scope="module")
def moe() -> MoeLayer:
    return MoeLayer()


@pytest.mark.parametrize("tokens", [1, 5])
@pytest.mark.parametrize("kernels", TARGETS, indirect=True)
def test_moe_ranks_sum_to_hf_sparse_moe_block(kernels: Kernels, moe: MoeLayer, tokens: int) -> None:
    x = moe.x[:, :tokens]
    logits = torch.nn.functional.linear(x[0], moe.block.gate.weight).float()
    top = torch.softmax(logits, -1).topk(K + 1).values
    # The data has no routing tie: HF's 8th and 9th probabilities differ by far more than the
    # bf16 rounding of the logits can move them (2^-8 relative), so both sides pick the same experts.
    assert float(((top[:, K - 1] - top[:, K]) / top[:, K - 1]).min()) > 2**-5
    gate_layout, expert_layouts = decode_layouts(kernels, torch.bfloat16, 1, H, intermediate_per_rank(I, TP), E, K)
    gate = moe.sd["mlp.gate.weight"].permute(gate_layout).contiguous()
    gate_up, down = (w.permute(expert_layouts[a]).contiguous() for w, a in zip(moe.full, ("w_gate_up", "w_down")))
    partials = [moe_partial(kernels, x, gate, gate_layout,
                            shard(gate_up, expert_layouts["w_gate_up"].index(1), 2, r),
                            shard(down, expert_layouts["w_down"].index(2), 1, r), expert_layouts, K, True)
                for r in range(TP)]
    # NxD's all-reduce of the bf16 partials, summed here in fp32 and rounded once.
    total = torch.stack(partials).float().sum(0).to(torch.bfloat16)
    with torch.no_grad():
        expected = moe.block(x)
    # The expert variants' tolerance plus the rounding of each rank's partial to bf16 (half an
    # ulp of each of the 4 partials, at most 2^-9 of the largest partial each).
    atol, rtol = EXPERT_TOLERANCE["bfloat16"]
    biggest = float(torch.stack(partials).float().abs().max())
    ok, detail = compare(total, expected, atol + TP * 2**-9 * biggest, rtol)
    assert ok, detail
    # What the adapters bound is what `bench select --tp 4` measures (layouts come from the decode binding).
    sites = {**neuron_call_sites(ModelShapes(), TP, "prefill", tokens), **neuron_call_sites(ModelShapes(), TP, "decode", 1024)}
    assert set(kernels.problems()) <= set(sites.values())


@pytest.mark.parametrize("kernels", TARGETS, indirect=True)
def test_moe_layer_ranks_sum_to_hf_norm_and_sparse_moe_block(kernels: Kernels, moe: MoeLayer) -> None:
    """The MoE half of a decode layer through the bound moe_block: one fused kernel per rank on
    trn2/trn3, the chain of references on cpu."""
    attn, residual = moe.x[0, :1], torch.zeros(1, H, dtype=torch.bfloat16)  # x + 0 == x: HF's gate sees x's norm
    norm_weight = torch.ones(H, dtype=torch.bfloat16)
    gate_layout, expert_layouts = decode_layouts(kernels, torch.bfloat16, 1, H, intermediate_per_rank(I, TP), E, K)
    gate = moe.sd["mlp.gate.weight"].permute(gate_layout).contiguous()
    gate_up, down = (w.permute(expert_layouts[a]).contiguous() for w, a in zip(moe.full, ("w_gate_up", "w_down")))
    results = [moe_layer_partial(kernels, attn, residual, norm_weight, 1e-6, gate, gate_layout,
                                 shard(gate_up, expert_layouts["w_gate_up"].index(1), 2, r),
                                 shard(down, expert_layouts["w_down"].index(2), 1, r), expert_layouts, K, True)
               for r in range(TP)]
    block = kernels.bound("moe_block", torch.bfloat16, T=1, H=H, E=E, K=K, I=intermediate_per_rank(I, TP))
    assert block.is_chain == (os.environ["NKIMOE_TARGET"] == "cpu")  # fused wherever NKI variants run
    partials = torch.stack([out for _, out in results])
    assert all(torch.equal(summed, attn) for summed, _ in results)
    total = partials.float().sum(0).to(torch.bfloat16)
    with torch.no_grad():
        expected = moe.block(rmsnorm(attn, norm_weight)[None])[0]
    # The fused block's tolerance (fused.py: the experts' plus what the norm and router pass on) and
    # the rounding of each rank's bf16 partial (half an ulp of each of the 4, at most 2^-9 of the largest).
    atol, rtol = MOE_BLOCK_TOLERANCE["bfloat16"]
    ok, detail = compare(total, expected, atol + TP * 2**-9 * float(partials.float().abs().max()), rtol)
    assert ok, detail


def _heads(seed: int, *shape: int) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)).to(torch.bfloat16)


@pytest.mark.parametrize("kernels", TARGETS, indirect=True)
def test_prefill_attention_on_a_ranks_heads(kernels: Kernels) -> None:
    seq, hq, hkv = 100, HEADS // TP, KV_HEADS // TP
    q, k, v = _heads(1, 1, hq, seq, D), _heads(2, 1, hkv, seq, D), _heads(3, 1, hkv, seq, D)
    out = prefill_attention(kernels, q, k, v, D**-0.5)
    assert out.shape == (1, hq, seq, D)
    expected = attention_prefill(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), D**-0.5).transpose(0, 1)
    ok, detail = compare(out[0], expected, *ATTENTION_TOLERANCE["bfloat16"])
    assert ok, detail


@pytest.mark.parametrize("k_transposed", [True, False])
@pytest.mark.parametrize("kernels", TARGETS, indirect=True)
def test_decode_attention_reads_the_cache_with_the_new_token(kernels: Kernels, k_transposed: bool) -> None:
    lmax, pos, hq, hkv = 640, 300, HEADS // TP, KV_HEADS // TP
    q, k_new, v_new = _heads(4, 1, hq, 1, D), _heads(5, 1, hkv, 1, D), _heads(6, 1, hkv, 1, D)
    k_cache, v_cache = _heads(7, 1, hkv, D, lmax), _heads(8, 1, hkv, lmax, D)  # positions >= pos hold junk
    prior_k = k_cache if k_transposed else k_cache.transpose(2, 3).contiguous()
    out = decode_attention(kernels, q, k_new, v_new, prior_k, v_cache, torch.tensor([[pos]]), D**-0.5, k_transposed)
    written_k, written_v = k_cache[0].clone(), v_cache[0].clone()
    written_k[:, :, pos] = k_new[0, :, 0]
    written_v[:, pos] = v_new[0, :, 0]
    expected = attention_decode(q[0].transpose(0, 1), written_k, written_v, pos + 1, D**-0.5).transpose(0, 1)
    if kernels.bound("attention_decode", torch.bfloat16, L=lmax, Hq=hq, Hkv=hkv, D=D).variant.nki:
        ok, detail = compare(out[0], expected, *ATTENTION_TOLERANCE["bfloat16"])
        assert ok, detail
    else:  # the masked reference adds exact zeros for the masked positions: bit for bit
        assert torch.equal(out[0], expected)


@pytest.fixture(scope="module")
def hf_attention() -> hf.Qwen3MoeAttention:
    """HF's Qwen3-MoE attention at full width, bf16, with random q/k norm weights."""
    config = Qwen3MoeConfig(hidden_size=H, num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, head_dim=D,
                            rms_norm_eps=1e-6, attn_implementation="eager")
    torch.manual_seed(13)
    attn = hf.Qwen3MoeAttention(config, layer_idx=0)
    with torch.no_grad():
        for norm in (attn.q_norm, attn.k_norm):
            norm.weight.uniform_(0.5, 1.5)
    return attn.to(torch.bfloat16).eval()


def test_attention_block_is_not_bound_where_the_chain_runs() -> None:
    """cpu binds the composite's chain, and KV heads replicated over more ranks than there are keep
    NxDI's attention: no block weights are stored in either case."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NKIMOE_TARGET", "cpu")
        assert attention_block_binding(Kernels(), torch.bfloat16, H, HEADS, KV_HEADS, D, 1024, TP) is None
        mp.setenv("NKIMOE_TARGET", "trn3")
        assert attention_block_binding(Kernels(), torch.bfloat16, H, HEADS, KV_HEADS, D, 1024, 8) is None
        assert attention_block_binding(Kernels(), torch.bfloat16, H, HEADS, KV_HEADS, D, 1024, TP) is not None


@pytest.mark.parametrize("kernels", ["trn2", "trn3"], indirect=True)
def test_attention_block_ranks_sum_to_hf_attention(kernels: Kernels, hf_attention: hf.Qwen3MoeAttention) -> None:
    """A decode step's attention half through the fused block on each simulated TP 4 rank: weights
    converted from HF's projections and split as NxD splits them, each rank's KV head of one cache.
    The ranks' o_proj partials sum to HF's attention on the normed token over that cache, and each
    rank's new k and v are the ones HF appends to the cache for that head."""
    lmax, pos = 640, 300
    bound = attention_block_binding(kernels, torch.bfloat16, H, HEADS, KV_HEADS, D, lmax, TP)
    assert bound is not None and bound.variant.nki
    x, norm_weight = _heads(20, 1, 1, H), (_heads(21, H).float() * 0.1 + 1).to(torch.bfloat16)
    k_prior, v_prior = _heads(22, 1, KV_HEADS, pos, D), _heads(23, 1, KV_HEADS, pos, D)
    junk = _heads(24, 1, KV_HEADS, lmax - pos, D)  # cache positions from pos on are never read
    k_cache_t = torch.cat([k_prior, junk], 2).transpose(2, 3).contiguous()
    v_cache = torch.cat([v_prior, junk], 2)
    cos, sin = rope_cos_sin(torch.tensor([pos]), D, 1_000_000.0, torch.bfloat16)
    a = hf_attention
    weights = attention_block_weights(bound, a.q_proj.weight.data, a.k_proj.weight.data, a.v_proj.weight.data,
                                      a.o_proj.weight.data, TP)
    partials, ks, vs = [], [], []
    for r in range(TP):
        heads = slice(r * KV_HEADS // TP, (r + 1) * KV_HEADS // TP)
        out, k, v = attention_block_step(kernels, bound, x, norm_weight, 1e-6, shard(weights["w_qkv"], 0, 1, r),
                                         a.q_norm.weight.data, a.k_norm.weight.data, cos[None], sin[None],
                                         k_cache_t[:, heads], v_cache[:, heads], torch.tensor([[pos]]),
                                         shard(weights["w_o"], 0, 1, r), D**-0.5)
        assert out.shape == (1, 1, H) and k.shape == v.shape == (1, KV_HEADS // TP, 1, D)
        partials.append(out[0])
        ks.append(k)
        vs.append(v)
    cache = DynamicCache()
    cache.update(k_prior, v_prior, 0)
    with torch.no_grad():
        expected, _ = a(rmsnorm(x, norm_weight), (cos[None], sin[None]), None, cache)
    keys, values = cache.layers[0].keys, cache.layers[0].values
    atol, rtol = BLOCK_TOLERANCE["bfloat16"]
    stacked = torch.stack(partials).float()
    total = stacked.sum(0).to(torch.bfloat16)
    # The block's tolerance plus the rounding of each rank's bf16 partial (half an ulp each, at most
    # 2^-9 of the largest), as for the MoE partials.
    ok, detail = compare(total, expected[0], atol + TP * 2**-9 * float(stacked.abs().max()), rtol)
    assert ok, detail
    for got, want in ((torch.cat(ks, 1), keys[:, :, pos:]), (torch.cat(vs, 1), values[:, :, pos:])):
        ok, detail = compare(got, want, atol, rtol)
        assert ok, detail


@pytest.mark.parametrize("kernels", TARGETS, indirect=True)
def test_rotary_matches_hf_on_nxdi_layouts(kernels: Kernels) -> None:
    seq, hq, hkv = 7, HEADS // TP, KV_HEADS // TP
    q, k = _heads(9, 1, hq, seq, D), _heads(10, 1, hkv, seq, D)
    cos, sin = rope_cos_sin(torch.arange(40, 40 + seq), D, 1_000_000.0, torch.bfloat16)
    out_q, out_k = rotary(kernels, q, k, cos[None], sin[None])
    exp_q, exp_k = hf.apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert torch.equal(out_q, exp_q) and torch.equal(out_k, exp_k)  # the RoPE variants are bit-exact


@pytest.mark.parametrize("kernels", TARGETS, indirect=True)
def test_row_and_column_parallel_matmuls_rebuild_the_full_projection(kernels: Kernels) -> None:
    tokens = 3
    x = _heads(11, 1, tokens, HEADS * D)
    w_o = (_heads(12, H, HEADS * D).float() * (HEADS * D) ** -0.5).to(torch.bfloat16)
    layout = decode_layouts(kernels, torch.bfloat16, 1, H, intermediate_per_rank(I, TP), E, K)[0]
    stored = w_o.permute(layout).contiguous()  # as transpose_parallel_linear_layer stores K-major weights
    assert stored.shape == permuted_shape(w_o.shape, layout)
    atol, rtol = LINEAR_TOLERANCE["bfloat16"]
    # o_proj is row-parallel: each rank holds a slice of the contraction and the partials are summed.
    row_axis = layout.index(1)
    partials = [linear_rows(kernels, shard(x, 2, 1, r), shard(stored, row_axis, 1, r), layout) for r in range(TP)]
    full = torch.nn.functional.linear(x, w_o)
    biggest = float(torch.stack(partials).float().abs().max())
    ok, detail = compare(torch.stack(partials).float().sum(0).to(torch.bfloat16), full, atol + TP * 2**-9 * biggest, rtol)
    assert ok, detail
    # lm_head and q/k/v are column-parallel: each rank computes a slice of the outputs.
    h = _heads(13, 1, tokens, H)
    w_col = (_heads(14, 1000, H).float() * H**-0.5).to(torch.bfloat16)
    col_stored = w_col.permute(layout).contiguous()
    pieces = [linear_rows(kernels, h, shard(col_stored, layout.index(0), 1, r), layout) for r in range(TP)]
    ok, detail = compare(torch.cat(pieces, dim=-1), torch.nn.functional.linear(h, w_col), atol, rtol)
    assert ok, detail


def test_unsupported_nxdi_settings_are_named() -> None:
    check_neuron_config(SimpleNamespace(tp_degree=4, moe_tp_degree=1, moe_ep_degree=1))
    bad = SimpleNamespace(flash_decoding_enabled=True, moe_ep_degree=2, sequence_parallel_enabled=False)
    with pytest.raises(NeuronWiringError) as err:
        check_neuron_config(bad)
    assert "flash_decoding_enabled=True" in str(err.value) and "moe_ep_degree=2" in str(err.value)
    assert "sequence_parallel" not in str(err.value)


def test_each_problem_is_bound_and_logged_once(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NKIMOE_TARGET", "trn2")
    kernels = Kernels()
    with caplog.at_level(logging.INFO, logger="nkimoe.neuron"):
        first = kernels.bound("rmsnorm", torch.bfloat16, T=1, H=H)
        again = kernels.bound("rmsnorm", torch.bfloat16, T=1, H=H)
    assert first is again and first.variant.nki
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "trn2" in lines[0] and first.variant.name in lines[0]
    with pytest.raises(NeuronWiringError, match="dtype torch.float16 has no variants"):
        kernels.bound("rmsnorm", torch.float16, T=1, H=H)


def test_kernels_launch_on_the_ranks_logical_cores(monkeypatch: pytest.MonkeyPatch,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    """On an LNC=2 rank a launcher that takes the grid gets ``lnc=2`` (the router runs
    ``router_kernel[2]``); one that does not (a plugin's) runs its kernel as ``kernel[1]`` and is
    named in the log once. Both give the reference's result."""
    monkeypatch.setenv("NKIMOE_TARGET", "trn3")
    kernels = Kernels(lnc=2)
    logits = untied_logits(130, E, torch.bfloat16, torch.Generator().manual_seed(2), margin=0.02)
    router = kernels.bound("router", torch.bfloat16, T=130, E=E, K=K)
    assert router.variant.nki and takes_grid(router.fn)
    seen: list[int] = []
    real = router.fn

    def spy(*args: object, lnc: int = 1) -> object:
        seen.append(lnc)
        return real(*args, lnc=lnc)

    weights, ids = launch(dataclasses.replace(router, variant=dataclasses.replace(router.variant, kernel=spy)),
                          logits, K, True, lnc=kernels.lnc)
    expected_w, expected_ids = ops_router(logits, K)
    assert seen == [2] and torch.equal(ids, expected_ids)
    torch.testing.assert_close(weights.float(), expected_w.float(), atol=1e-3, rtol=2**-7)
    x = torch.randn(3, H, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16)
    weight = torch.ones(H, dtype=torch.bfloat16)
    norm = kernels.bound("rmsnorm", torch.bfloat16, T=3, H=H)
    assert norm.variant.nki and takes_grid(norm.fn)  # every builtin launcher takes the grid
    gridded = norm.fn

    def ungridded(x: torch.Tensor, w: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
        return gridded(x, w, eps)

    plugin = dataclasses.replace(norm, variant=dataclasses.replace(norm.variant, name="plugin_rmsnorm", kernel=ungridded))
    with caplog.at_level(logging.WARNING, logger="nkimoe.neuron"):
        outs = [launch(plugin, x, weight, 1e-6, lnc=kernels.lnc) for _ in range(2)]
    named = [r.getMessage() for r in caplog.records if "plugin_rmsnorm" in r.getMessage()]
    assert len(named) == 1 and "LNC=2" in named[0]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], rms_norm(kernels, x, weight, 1e-6))


def test_kernels_get_plain_tensors_as_nxdi_hands_them(monkeypatch: pytest.MonkeyPatch) -> None:
    """A Parameter arrives as its ``.data`` and a tensor subclass (a tracing placeholder) as a plain
    ``torch.Tensor`` (NxDI 2.29 ``attention_base.perform_prefill``), sharing storage."""
    monkeypatch.setenv("NKIMOE_TARGET", "cpu")

    class Placeholder(torch.Tensor):
        pass

    norm = Kernels().bound("rmsnorm", torch.float32, T=2, H=8)
    got: list[type] = []

    def spy(*args: object) -> torch.Tensor:
        got.extend(type(a) for a in args)
        return norm.fn(*args)

    x = torch.randn(2, 8).as_subclass(Placeholder)
    weight = torch.nn.Parameter(torch.ones(8))
    out = launch(dataclasses.replace(norm, variant=dataclasses.replace(norm.variant, kernel=spy)), x, weight, 1e-6)
    assert got == [torch.Tensor, torch.Tensor, float]
    assert torch.equal(out, norm.fn(x.as_subclass(torch.Tensor), weight.data, 1e-6))


def test_router_dtype_is_that_of_nxdis_own_router_gate() -> None:
    """fp32 (Qwen3-MoE's router_config) only where NxDI keeps declared dtypes; under the default
    cast every parameter, the router gate included, takes torch_dtype."""
    fp32 = SimpleNamespace(dtype=torch.float32)
    assert router_dtype(SimpleNamespace(torch_dtype=torch.bfloat16, cast_type="config", router_config=fp32)) == torch.bfloat16
    assert router_dtype(SimpleNamespace(torch_dtype=torch.bfloat16, cast_type="as-declared", router_config=fp32)) == torch.float32
    assert router_dtype(SimpleNamespace(torch_dtype=torch.bfloat16, router_config=fp32)) == torch.bfloat16
    assert router_dtype(SimpleNamespace(torch_dtype=torch.float32, cast_type="as-declared")) == torch.float32


@pytest.mark.parametrize("kernels", ["trn3"], indirect=True)
def test_moe_router_runs_in_the_gate_weights_dtype(kernels: Kernels, moe: MoeLayer) -> None:
    """An fp32 gate (NxDI's ``as-declared`` cast) binds the fp32 gate linear and router; the routing
    weights come back in the hidden states' dtype, and the block still sums to HF's."""
    x = moe.x[:, :1]
    gate_layout, expert_layouts = decode_layouts(kernels, torch.bfloat16, 1, H, intermediate_per_rank(I, TP), E, K,
                                                 gate_dtype=torch.float32)
    gate = moe.sd["mlp.gate.weight"].float().permute(gate_layout).contiguous()
    gate_up, down = (w.permute(expert_layouts[a]).contiguous() for w, a in zip(moe.full, ("w_gate_up", "w_down")))
    partials = [moe_partial(kernels, x, gate, gate_layout, shard(gate_up, expert_layouts["w_gate_up"].index(1), 2, r),
                            shard(down, expert_layouts["w_down"].index(2), 1, r), expert_layouts, K, True)
                for r in range(TP)]
    bound = {(p.op, p.dtype) for p in kernels.problems()}
    assert {("linear", "float32"), ("router", "float32"), ("expert_mlp", "bfloat16")} <= bound
    assert all(p.dtype == torch.bfloat16 for p in partials)
    total = torch.stack(partials).float().sum(0).to(torch.bfloat16)
    with torch.no_grad():
        expected = moe.block(x)
    atol, rtol = EXPERT_TOLERANCE["bfloat16"]  # as the bf16 block test: the experts' tolerance plus 4 roundings
    ok, detail = compare(total, expected, atol + TP * 2**-9 * float(torch.stack(partials).float().abs().max()), rtol)
    assert ok, detail
