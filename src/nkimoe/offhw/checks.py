"""The contest path through the real NxDI / NxD sources on CPU (run inside the ``[nxdi]`` interpreter).

``python -m nkimoe.offhw.checks --sdk 2.29 --work DIR --qwen qwen.py [--qwen bundle.py] ...`` imports
the contest harness ``nki-moe/main.py``, builds each model the way its ``prepare_inference()`` does
(its own ``parse_args()`` defaults and config steps, plus ``--on-cpu`` and ``--skip-compile``; NxDI's
``to_cpu()`` stands in for ``load()``, which needs compiled artifacts), and prints one JSON line of
results: greedy tokens and logits of each model through NxDI's HF adapter, of HF transformers and
of NxDI's own ``modeling_qwen3_moe``.
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any


#: The prompt's token ids (any ids of the vocabulary above 2).
PROMPT_IDS = (5, 17, 33, 8, 21, 40, 3, 9)
#: The harness's ``--seq-len`` in these runs: the prompt and as many generated tokens (the KV cache length).
SEQ_LEN = 16


def harness_tol_map(main_source: str) -> dict[Any, tuple[float, float]]:
    """The ``tol_map`` literal that the harness's ``main()`` sets for its logit validation."""
    for node in ast.walk(ast.parse(main_source)):
        if (isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Attribute)
                and node.targets[0].attr == "tol_map" and isinstance(node.value, ast.Constant)):
            return ast.literal_eval(node.value.value)
    raise LookupError("main.py sets no args.tol_map literal")


def write_tokenizer(directory: Path, vocab: int) -> None:
    """A word-level tokenizer (``<unk> <eos> <bos> w0003 w0004 ...``, one id per word) and a generation
    config, which the harness loads from the model directory."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GenerationConfig, PreTrainedTokenizerFast

    words = {"<unk>": 0, "<eos>": 1, "<bos>": 2, **{f"w{i:04d}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", bos_token="<bos>")
    fast.save_pretrained(directory)
    GenerationConfig(bos_token_id=2, eos_token_id=1, do_sample=False).save_pretrained(directory)


def write_tiny_checkpoint(directory: Path, seed: int = 0) -> Path:
    """A tiny random Qwen3-MoE (2 layers, hidden 128, 4/2 heads of 32, 8 experts, top-2, vocab 256),
    fp32 weights with std 1/sqrt(fan-in) so that the logits are far from uniform, with a tokenizer."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(hidden_size=128, intermediate_size=64, moe_intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8,
                            num_experts_per_tok=2, vocab_size=256, max_position_embeddings=256, norm_topk_prob=True,
                            tie_word_embeddings=False)
    model = Qwen3MoeForCausalLM(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() == 1:
                param.copy_(1 + 0.1 * torch.randn_like(param))
            else:
                param.normal_(0, (32 if "embed" in name else 1) / param.shape[-1] ** 0.5)
    model.save_pretrained(directory)
    write_tokenizer(directory, config.vocab_size)
    return directory


def write_full_width_checkpoint(directory: Path) -> Path:
    """nkimoe's random full-width checkpoint (hidden 2048, 32/4 heads, 128 experts, top-8), one layer."""
    from nkimoe.demo import write_random_checkpoint

    write_random_checkpoint(directory, layers=1)
    write_tokenizer(directory, 1024)
    return directory


def load_module(name: str, path: Path) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def harness_args(main: Any, model: Path, work: Path, prompt: str, seq_len: int, extra: list[str]) -> argparse.Namespace:
    """``main.parse_args()`` on the harness defaults plus the CPU flags, then ``main()``'s own steps."""
    argv = ["main.py", "--mode", "validate", "--on-cpu", "--skip-compile", "--model-path", str(model),
            "--compiled-model-path", str(work / "compiled"), "--prompt", prompt, "--seq-len", str(seq_len), *extra]
    saved, sys.argv = sys.argv, argv
    try:
        args = main.parse_args()
    finally:
        sys.argv = saved
    args.batch_size = len(args.prompts)
    args.max_length = args.seq_len
    os.environ["NEURON_PLATFORM_TARGET_OVERRIDE"] = args.platform_target
    return args


def on_cpu(model_cls: type) -> type:
    """``model_cls`` whose ``load()`` is NxDI's ``to_cpu()`` (compiled artifacts need a Trainium host)."""

    def load(self: Any, compiled_model_path: str, *args: Any, **kwargs: Any) -> None:
        self.to_cpu()

    return type(model_cls.__name__, (model_cls,), {"load": load})


def complete_release(main: Any) -> list[str]:
    """Complete two pieces that the SDK 2.27 and 2.28 release commits of NxDI leave out, so that their
    CPU generation runs at all (NxDI's own Qwen3-MoE fails without them): the HF adapter
    (utils/hf_adapter.py) passes an undefined ``tensor_capture_hook`` to a ``forward`` that does
    not take it, and ``_copy_past_key_values`` (models/model_base.py, always called on CPU) calls an
    undefined ``_get_captured_tensors_offset``. Each is found by inspecting the code, not by version;
    the fill-ins do what 2.29 does without tensor capture (no hook, offset 0). Returns what was filled."""
    import inspect

    filled = []
    adapter = main.HuggingFaceGenerationAdapter
    module = inspect.getmodule(adapter)
    reads_global = "tensor_capture_hook" in adapter.prepare_inputs_for_generation.__code__.co_names
    if reads_global and not hasattr(module, "tensor_capture_hook"):
        module.tensor_capture_hook = None
        original = adapter.prepare_inputs_for_generation

        def prepare_inputs_for_generation(self: Any, *args: Any, **kwargs: Any) -> dict:
            inputs = original(self, *args, **kwargs)
            del inputs["tensor_capture_hook"]
            return inputs

        adapter.prepare_inputs_for_generation = prepare_inputs_for_generation
        filled.append("HuggingFaceGenerationAdapter: undefined tensor_capture_hook dropped")
    base = inspect.getmodule(main.baseline_qwen.NeuronQwen3MoeForCausalLM.__mro__[1]).NeuronBaseForCausalLM
    if not hasattr(base, "_get_captured_tensors_offset"):
        base._get_captured_tensors_offset = lambda self: 0
        filled.append("NeuronBaseForCausalLM._get_captured_tensors_offset: 0 (no tensor capture)")
    return filled


def release_parallel_state() -> None:
    """Tear down NxD's parallel groups and the process group ``to_cpu()`` set up, so the next model
    starts afresh."""
    import torch.distributed as dist
    from neuronx_distributed.parallel_layers import parallel_state

    parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def greedy(main: Any, model: Any, tokenizer: Any, generation_config: Any, prompt: str) -> dict[str, Any]:
    """Greedy generation through NxDI's HF adapter, as the harness's ``check_accuracy_logits`` runs it."""
    import torch

    inputs = tokenizer([prompt], padding=True, return_tensors="pt")
    new = model.config.neuron_config.seq_len - inputs.input_ids.shape[1]
    with torch.inference_mode():
        out = main.HuggingFaceGenerationAdapter(model).generate(
            input_ids=inputs.input_ids, attention_mask=inputs.attention_mask, max_new_tokens=new,
            min_new_tokens=new, do_sample=False, return_dict_in_generate=True, output_scores=True,
            generation_config=generation_config)
    logits = torch.stack(out.scores)[:, 0, :].float()
    return {"tokens": logits.argmax(-1).tolist(), "logits": logits.tolist()}


def hf_greedy(model_dir: Path, prompt_ids: list[int], new: int, dtype: str) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(model_dir, torch_dtype=getattr(torch, dtype))
    with torch.inference_mode():
        out = hf.generate(torch.tensor([prompt_ids]), attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                          max_new_tokens=new, min_new_tokens=new, do_sample=False, return_dict_in_generate=True,
                          output_scores=True)
    logits = torch.stack(out.scores)[:, 0, :].float()
    return {"tokens": logits.argmax(-1).tolist(), "logits": logits.tolist()}


def run(sdk: str, vendor: Path, work: Path, model_dir: Path, qwen_files: list[Path], targets: list[str],
        seq_len: int, extra: list[str], references: bool = True) -> dict[str, Any]:
    """The checkpoint ``model_dir`` through NxDI's own Qwen3-MoE, through each ``qwen_files`` module on each
    target, and (with ``references``) through HF transformers; greedy tokens and per-step logits of
    each. Without ``references`` the run is one build (under ``torchrun`` a process group serves one)."""
    import inspect

    from nkimoe.offhw import environment

    environment.enter(sdk, vendor)
    harness = vendor / "nki-moe"
    sys.path.insert(0, str(harness))
    main = load_module("main", harness / "main.py")
    results: dict[str, Any] = {"sdk": sdk, "model": model_dir.name, "filled_in": complete_release(main)}
    results["tol_map"] = [[k, list(v)] for k, v in harness_tol_map((harness / "main.py").read_text()).items()]
    prompt = " ".join(f"w{i:04d}" for i in PROMPT_IDS)
    modules = [load_module(f"qwen_{path.stem}", path) for path in qwen_files]
    runs: dict[str, Any] = {}

    def build(cls: type, label: str) -> None:
        args = harness_args(main, model_dir, work, prompt, seq_len, extra)
        model, tokenizer, generation_config = main.prepare_inference(on_cpu(cls), args)
        try:
            runs[label] = greedy(main, model, tokenizer, generation_config, prompt)
        except Exception as error:  # reported to the caller, which decides what is expected
            runs[label] = {"error": f"{type(error).__name__}: {error}"}
        kernels = getattr(inspect.getmodule(cls), "KERNELS", None)  # nkimoe's models: the grid their kernels got
        if kernels is not None:
            runs[label]["lnc"] = kernels.lnc
            runs[label]["bound"] = kernels.bound_names()
        runs["dtype"] = str(model.config.neuron_config.torch_dtype).removeprefix("torch.")
        release_parallel_state()

    if references:
        build(main.baseline_qwen.NeuronQwen3MoeForCausalLM, "nxdi")
    for path, module in zip(qwen_files, modules):
        for target in targets:
            os.environ["NKIMOE_TARGET"] = target
            inspect.getmodule(module.NeuronQwen3MoeForCausalLM).KERNELS.clear()
            build(module.NeuronQwen3MoeForCausalLM, f"{path.name}:{target}")
    dtype = runs.pop("dtype")
    if references:
        runs["hf"] = hf_greedy(model_dir, list(PROMPT_IDS), seq_len - len(PROMPT_IDS), dtype)
    results["runs"] = runs
    return results


def shard(sdk: str, vendor: Path, work: Path, model_dir: Path, qwen_file: Path, targets: list[str]) -> dict[str, Any]:
    """``shard_checkpoint()`` at the harness defaults (TP 4, bf16, ``save_sharded_checkpoint`` off: what
    ``load()`` does, building the model on the meta device first) for ``qwen_file`` on each target.
    Reports every rank's expert and router-gate shards, and its fused attention-block weights where
    the model stores them: shape, and whether the shard equals the slice of the HF weights in the
    layout the bound variants want."""
    import inspect

    import torch
    from safetensors.torch import load_file

    from nkimoe.offhw import environment

    environment.enter(sdk, vendor)
    harness = vendor / "nki-moe"
    sys.path.insert(0, str(harness))
    main = load_module("main", harness / "main.py")
    module = load_module(f"qwen_{qwen_file.stem}", qwen_file)
    neuron = inspect.getmodule(module.NeuronQwen3MoeForCausalLM)
    hf = load_file(str(model_dir / "model.safetensors"))
    results: dict[str, Any] = {"sdk": sdk, "targets": {}}
    for target in targets:
        os.environ["NKIMOE_TARGET"] = target
        neuron.KERNELS.clear()
        args = harness_args(main, model_dir, work, "w0005", SEQ_LEN, [])
        neuron_config = module.NeuronQwen3MoeForCausalLM.get_neuron_config_cls()(
            **{k: v for k, v in vars(args).items() if v is not None}, blockwise_matmul_config={"use_torch_block_wise": True})
        config = module.NeuronQwen3MoeForCausalLM.get_config_cls()(
            neuron_config, load_config=main.load_pretrained_config(str(model_dir)))
        model = module.NeuronQwen3MoeForCausalLM(str(model_dir), config)
        ranks = model.get_builder().shard_checkpoint()
        tp = config.neuron_config.tp_degree
        gate_up, down = neuron.stack_experts({k.removeprefix("model."): v for k, v in hf.items()}, "layers.0.mlp.",
                                             config.num_experts, tp)
        report = []
        for rank, shards in enumerate(ranks):
            ip = gate_up.shape[1] // 2 // tp
            want = {
                "layers.0.mlp.experts.gate_up_proj": torch.cat([gate_up[:, rank * ip:(rank + 1) * ip],
                                                               gate_up[:, gate_up.shape[1] // 2 + rank * ip:][:, :ip]], 1),
                "layers.0.mlp.experts.down_proj": down[:, :, rank * ip:(rank + 1) * ip],
                "layers.0.mlp.gate.weight": hf["model.layers.0.mlp.gate.weight"],
            }
            entry = {}
            for name, reference in want.items():
                layout = model_layouts(neuron, config)[name]
                got = shards[name]
                entry[name] = {"shape": list(got.shape), "layout": list(layout), "dtype": str(got.dtype),
                               "equal": bool(torch.equal(got, reference.to(got.dtype).permute(layout).contiguous()))}
            entry.update(block_shards(neuron, config, hf, shards, rank))
            report.append(entry)
        results["targets"][target] = {"tp": tp, "dtype": str(config.neuron_config.torch_dtype), "ranks": report}
    return results


def block_shards(neuron: Any, config: Any, hf: dict[str, Any], shards: dict[str, Any], rank: int) -> dict[str, Any]:
    """Rank ``rank``'s fused attention-block weights of layer 0 where the model stores them (see
    ``shard``): its query heads' q rows, its KV heads' k and v rows and its W_o columns, sliced
    from the HF checkpoint here and put in the bound variant's layout by its ``prepare``."""
    import torch

    block = neuron.attention_block_variant(config)
    if block is None:
        return {}
    tp = config.neuron_config.tp_degree
    q, k, v, o = (hf[f"model.layers.0.self_attn.{n}_proj.weight"] for n in "qkvo")
    rows = [w[rank * w.shape[0] // tp:(rank + 1) * w.shape[0] // tp] for w in (q, k, v)]
    columns = o[:, rank * o.shape[1] // tp:(rank + 1) * o.shape[1] // tp]
    entry = {}
    for name, arg, weight in (("qkv", "w_qkv", torch.cat(rows)), ("o", "w_o", columns.contiguous())):
        got = shards[f"layers.0.self_attn.block.{name}"]
        want = block.variant.prepare_arg(arg, weight.to(got.dtype))
        entry[f"layers.0.self_attn.block.{name}"] = {"shape": list(got.shape), "layout": block.variant.name,
                                                     "dtype": str(got.dtype), "equal": bool(torch.equal(got, want))}
    return entry


def model_layouts(neuron: Any, config: Any) -> dict[str, tuple[int, ...]]:
    """Storage layout of each checked weight, as the bound decode variants want it."""
    gate_layout, expert_layouts = neuron.model_layouts(config)
    return {"layers.0.mlp.experts.gate_up_proj": expert_layouts["w_gate_up"],
            "layers.0.mlp.experts.down_proj": expert_layouts["w_down"], "layers.0.mlp.gate.weight": gate_layout}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nkimoe.offhw.checks")
    parser.add_argument("--write-checkpoints", type=Path, help="write the tiny and full-width checkpoints and exit")
    parser.add_argument("--sdk")
    parser.add_argument("--shard", action="store_true", help="check shard_checkpoint() at the harness defaults")
    parser.add_argument("--vendor", type=Path)
    parser.add_argument("--work", type=Path)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--qwen", type=Path, action="append", default=[])
    parser.add_argument("--targets", default="cpu")
    parser.add_argument("--seq-len", type=int, default=SEQ_LEN)
    parser.add_argument("--harness-arg", action="append", default=[])
    parser.add_argument("--no-references", action="store_true", help="neither NxDI's own model nor HF transformers")
    ns = parser.parse_args(argv)
    if ns.write_checkpoints:
        write_tiny_checkpoint(ns.write_checkpoints / "tiny")
        write_full_width_checkpoint(ns.write_checkpoints / "full")
        return 0
    if ns.shard:
        print("NKIMOE-RESULT " + json.dumps(shard(ns.sdk, ns.vendor, ns.work, ns.model, ns.qwen[0], ns.targets.split(","))))
        return 0
    results = run(ns.sdk, ns.vendor, ns.work, ns.model, ns.qwen, ns.targets.split(","), ns.seq_len, ns.harness_arg,
                  not ns.no_references)
    if os.environ.get("RANK", "0") == "0":  # under torchrun one result line, rank 0's (ranks share stdout)
        print("NKIMOE-RESULT " + json.dumps(results), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
