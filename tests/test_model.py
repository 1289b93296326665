"""The portable model against HF transformers on random full-width Qwen3-MoE checkpoints saved and
loaded through the real loading code."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

from nkimoe.bench.cache import entry_key, make_entry, write_entries
from nkimoe.model import CheckpointError, ModelConfig, Qwen3Moe
from nkimoe.ops import add_rmsnorm, linear, router
from nkimoe.plugins import load_registry
from nkimoe.registry import CHAIN
from nkimoe.shapes import call_sites

NEW_TOKENS = 16


def build_checkpoint(directory: Path, layers: int, seed: int, shard: bool = False) -> Path:
    """A random Qwen3-MoE at full hidden width (2048, 32/4 heads of 128, 128 experts, top-8), saved in
    bf16 with safetensors; moe_intermediate 128 keeps the 128 experts' weights small."""
    torch.manual_seed(seed)
    config = Qwen3MoeConfig(
        hidden_size=2048, num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128,
        num_experts_per_tok=8, moe_intermediate_size=128, intermediate_size=128, num_hidden_layers=layers,
        vocab_size=1024, norm_topk_prob=True, rms_norm_eps=1e-6, max_position_embeddings=4096,
        rope_parameters={"rope_type": "default", "rope_theta": 1_000_000.0}, tie_word_embeddings=False,
        initializer_range=0.02,
    )
    model = Qwen3MoeForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, max_shard_size="200MB" if shard else "50GB")
    return directory


def hf_reference(directory: Path, prompt: list[int]) -> tuple[list[int], list[torch.Tensor]]:
    """HF eager greedy tokens and the logits of every step (prefill's last position first)."""
    model = Qwen3MoeForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="eager")
    model.eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                             min_new_tokens=NEW_TOKENS, pad_token_id=0, eos_token_id=None, output_logits=True,
                             return_dict_in_generate=True)
    return out.sequences[0, len(prompt):].tolist(), [step[0] for step in out.logits]


@pytest.fixture(scope="session")
def two_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt2"), layers=2, seed=1, shard=True)


@pytest.fixture(scope="session")
def one_layer(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_checkpoint(tmp_path_factory.mktemp("ckpt1"), layers=1, seed=2)


PROMPT = [int(i) for i in torch.randint(0, 1024, (37,), generator=torch.Generator().manual_seed(5))]


def test_cpu_path_matches_hf(two_layer: Path) -> None:
    assert (two_layer / "model.safetensors.index.json").exists()  # the sharded loader is exercised
    expected_tokens, expected_logits = hf_reference(two_layer, PROMPT)
    model = Qwen3Moe.from_pretrained(two_layer, env={"NKIMOE_TARGET": "cpu", "NKIMOE_CACHE": "/nonexistent"})
    assert model.detection.target.name == "cpu"
    assert all(not b.variant.nki for b in model.binding.ops.values())
    result = model.generate(PROMPT, NEW_TOKENS)
    assert result.tokens == expected_tokens
    # The references repeat HF eager's operations; only the fused q|k|v matmul may block its sums
    # differently from three separate ones: a bf16 ulp of logits of magnitude ~1-4 (2^-6 relative).
    torch.testing.assert_close(result.prefill_logits.float(), expected_logits[0].float(), atol=2e-2, rtol=2**-6)


#: Emulated NKI path: the variants keep fp32 where the eager reference rounds to bf16 (attention
#: scores and probabilities, expert outputs and their sum), each within its declared tolerance;
#: through one layer and lm_head that moves logits of magnitude ~1-4 by up to ~2 bf16 ulps.
NKI_LOGIT_ATOL = 4 * 2**-6
#: Router probabilities closer than this (relative) at the top-8 boundary are a tie at bf16
#: resolution: a 1-ulp difference upstream may pick either expert, and the step's logits follow.
ROUTING_TIE = 2**-6


def hf_routing(directory: Path, sequence: list[int]) -> torch.Tensor:
    """HF's router probabilities for every position of ``sequence`` (layer 0): [T, E] fp32."""
    model = Qwen3MoeForCausalLM.from_pretrained(directory, dtype=torch.bfloat16, attn_implementation="eager")
    with torch.no_grad():
        logits = model(torch.tensor([sequence]), output_router_logits=True).router_logits[0]
    return torch.softmax(logits.float(), dim=-1)


def chain_cache(path: Path, target: str, directory: Path) -> Path:
    """A benchmark cache in which the chain won decode's moe_block on ``target`` (an entry as
    ``bench select`` writes it), so that the model binds the chain there."""
    shapes = ModelConfig.from_json(directory / "config.json").shapes
    problem = call_sites(shapes, "decode", 1024)["decode.moe_block"]
    tgt = load_registry({}).target(target)
    entry = make_entry(tgt, problem, "fastest", CHAIN, "", "estimate", [])
    write_entries(path, {entry_key(tgt, problem, "fastest"): entry})
    return path


def block_routing(args: tuple) -> torch.Tensor | None:  # noqa: ANN001
    """The experts a fused moe_block call routes to, recomputed by the references from its inputs
    (the gate arrives K-major); the kernel's agree unless the logits tie at bf16 resolution, so
    None where the 8th and 9th router logits tie exactly there (either choice is the router's)."""
    x, residual, norm_weight, w_gate_t, *_ = args
    _, normed = add_rmsnorm(x, residual, norm_weight)
    logits = linear(normed, w_gate_t.t())
    top9 = torch.topk(logits[0].float(), 9).values
    return None if top9[7] == top9[8] else router(logits)[1][0]


@pytest.mark.parametrize("moe", ["fused", "chain"])
@pytest.mark.parametrize("target", ["trn2", "trn3"])
def test_emulated_nki_path_matches_hf(one_layer: Path, target: str, moe: str, tmp_path: Path) -> None:
    expected_tokens, expected_logits = hf_reference(one_layer, PROMPT)
    routes: list[torch.Tensor | None] = []

    def record_routing(site: str, args: tuple, result: tuple) -> None:  # noqa: ANN001
        if site == "decode.router":
            routes.append(result[1][0])
        elif site == "decode.moe_block":
            routes.append(block_routing(args))

    cache = chain_cache(tmp_path / "bench.yaml", target, one_layer) if moe == "chain" else "/nonexistent"
    model = Qwen3Moe.from_pretrained(one_layer, max_context=1024, observer=record_routing,
                                     env={"NKIMOE_TARGET": target, "NKIMOE_CACHE": str(cache)})
    # every op runs an NKI variant: decode's MoE half as one fused kernel, or as the chain of its parts
    assert model.binding.fused("decode.moe_block") == (moe == "fused")
    assert all(b.variant.nki for b in model.binding.ops.values() if not b.is_chain)
    assert all(p.variant.nki for b in model.binding.ops.values() for p in b.parts)
    # Teacher-forced on HF's tokens, as logit validation does.
    forced = model.generate(PROMPT, NEW_TOKENS, forced=expected_tokens)
    steps = [forced.prefill_logits, *forced.step_logits]
    torch.testing.assert_close(steps[0].float(), expected_logits[0].float(), atol=NKI_LOGIT_ATOL, rtol=0)
    probs = hf_routing(one_layer, PROMPT + expected_tokens)
    within = 0
    for i in range(1, NEW_TOKENS):
        deviation = float((steps[i].float() - expected_logits[i].float()).abs().max())
        if deviation <= NKI_LOGIT_ATOL:
            within += 1
            continue
        # A larger deviation must come from a routing tie: the step's expert set differs from HF's
        # (or a fused block's own router logits tie exactly at the 8th expert, either set being the
        # router's) and HF's 8th and 9th router probabilities are within ROUTING_TIE of each other.
        p = probs[len(PROMPT) + i - 1]
        top9 = torch.topk(p, 9)
        if routes[i - 1] is not None:  # else the block's own router logits tie at the 8th expert
            ours, theirs = set(routes[i - 1].tolist()), set(top9.indices[:8].tolist())
            assert ours != theirs, f"step {i}: logits off by {deviation:.3f} with the same experts as HF"
        gap = float(top9.values[7] - top9.values[8]) / float(top9.values[7])
        assert gap < ROUTING_TIE, f"step {i}: experts differ although HF's routing margin is {gap:.3g}"
    assert within >= NEW_TOKENS // 2
    # Where HF's choice is decisive and no routing tie intervened, the tokens agree.
    for i in range(NEW_TOKENS):
        top2 = torch.topk(expected_logits[i].float(), 2).values
        deviation = float((steps[i].float() - expected_logits[i].float()).abs().max())
        if float(top2[0] - top2[1]) > 2 * deviation + 1e-6:
            assert forced.tokens[i] == expected_tokens[i], f"step {i}"


def _broken(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_bad_checkpoints_name_the_problem(one_layer: Path, tmp_path: Path) -> None:
    env = {"NKIMOE_TARGET": "cpu"}
    missing = _broken(one_layer, tmp_path / "missing")
    from safetensors.torch import load_file, save_file

    sd = load_file(missing / "model.safetensors")
    del sd["model.layers.0.self_attn.k_norm.weight"]
    save_file(sd, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match="missing tensor 'model.layers.0.self_attn.k_norm.weight'"):
        Qwen3Moe.from_pretrained(missing, env=env)

    sd["model.layers.0.self_attn.k_norm.weight"] = torch.ones(64, dtype=torch.bfloat16)
    save_file(sd, missing / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"'model.layers.0.self_attn.k_norm.weight' has shape \(64,\), expected \(128,\)"):
        Qwen3Moe.from_pretrained(missing, env=env)

    wrong_type = _broken(one_layer, tmp_path / "wrong_type")
    config = json.loads((wrong_type / "config.json").read_text())
    config["model_type"] = "llama"
    (wrong_type / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="model_type 'llama' is not 'qwen3_moe'"):
        Qwen3Moe.from_pretrained(wrong_type, env=env)

    unreadable = _broken(one_layer, tmp_path / "unreadable")
    (unreadable / "model.safetensors").write_bytes(b"\x00garbage")
    with pytest.raises(CheckpointError, match="cannot read checkpoint shard .*model.safetensors"):
        Qwen3Moe.from_pretrained(unreadable, env=env)

    with pytest.raises(CheckpointError, match="does not exist"):
        Qwen3Moe.from_pretrained(tmp_path / "nowhere", env=env)


#: A plugin's fused attention_block for cpu: the composed reference, declared bit-exact.
ATTENTION_BLOCK_PLUGIN = """
from nkimoe.hookspecs import hookimpl
from nkimoe.registry import Variant
from nkimoe import ops

@hookimpl
def register_variants(register):
    register(Variant(op="attention_block", name="test_attention_block_cpu", targets=("cpu",),
                     kernel=ops.attention_block, nki=False, priority=10, exactness="bitexact"))
"""


def test_a_fused_attention_block_runs_every_decode_layer(two_layer: Path, tmp_path: Path,
                                                         plugin_dir: Callable[[str, str], str]) -> None:
    """Decode through a (plugin's, verified) fused attention_block gives the chain's logits bit for
    bit: layer 0 adds a zero residual (x + 0 == x), and the block's new k/v land in the cache."""
    env = {"NKIMOE_TARGET": "cpu", "NKIMOE_PLUGINS": plugin_dir("attention_block_plugin", ATTENTION_BLOCK_PLUGIN),
           "NKIMOE_CACHE": str(tmp_path / "bench.yaml")}
    variant = load_registry(env).variants["test_attention_block_cpu"]
    shapes = ModelConfig.from_json(two_layer / "config.json").shapes
    problem = call_sites(shapes, "decode", 1024)["decode.attention_block"]
    cpu = load_registry(env).target("cpu")
    record = {"variant": variant.name, "status": "ok", "time_us": None, "method": "unmeasured",
              "source_hash": variant.source_hash}
    entry = make_entry(cpu, problem, "fastest", variant.name, variant.source_hash, "unmeasured", [record])
    write_entries(tmp_path / "bench.yaml", {entry_key(cpu, problem, "fastest"): entry})
    calls: list[str] = []
    fused = Qwen3Moe.from_pretrained(two_layer, max_context=1024, env=env, observer=lambda site, *_: calls.append(site))
    assert fused.binding.ops["decode.attention_block"].variant.name == variant.name
    chain = Qwen3Moe.from_pretrained(two_layer, max_context=1024, env={"NKIMOE_TARGET": "cpu",
                                                                       "NKIMOE_CACHE": "/nonexistent"})
    assert chain.binding.ops["decode.attention_block"].is_chain
    a, b = fused.generate(PROMPT, 4), chain.generate(PROMPT, 4)
    assert a.tokens == b.tokens and all(torch.equal(x, y) for x, y in zip(a.step_logits, b.step_logits))
    assert calls.count("decode.attention_block") == 3 * 2  # 3 decode steps x 2 layers
    assert "decode.attention" not in calls and "decode.first_norm" not in calls
