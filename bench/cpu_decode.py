"""Portable path vs HF transformers on the same checkpoint, measured side by side in one run on this
CPU: prefill and decode tokens/s of each and their ratio (nkimoe / HF; above 1.0 is faster).

    python bench/cpu_decode.py [--layers 2] [--intermediate 768] [--prompt 64] [--new-tokens 32] [--repeats 3]

All run on ``cpu`` (torch references for nkimoe), greedy, bf16, on a random checkpoint of
Qwen3-30B-A3B's width (hidden 2048, 128 experts, top-8, expert width ``--intermediate``, 768 by
default as in the real model; vocab 1024). HF runs twice: with eager attention, and with its
default configuration (``attn_implementation`` and ``experts_implementation`` left unset: sdpa
attention, grouped-mm experts).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import Qwen3MoeForCausalLM

from nkimoe.demo import write_random_checkpoint
from nkimoe.model import Qwen3Moe


def time_nkimoe(model: Qwen3Moe, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    stamps: list[float] = []
    start = time.perf_counter()
    model.generate(prompt, new_tokens, on_token=lambda _: stamps.append(time.perf_counter()))
    return len(prompt) / (stamps[0] - start), (new_tokens - 1) / (stamps[-1] - stamps[0])


def time_hf(model: Qwen3MoeForCausalLM, prompt: list[int], new_tokens: int) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        start = time.perf_counter()
        model(ids)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                       eos_token_id=None)
        total = time.perf_counter() - start
    return len(prompt) / prefill, (new_tokens - 1) / max(total - prefill, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--intermediate", type=int, default=768, help="expert width (moe_intermediate_size)")
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nkimoe-bench-") as tmp:
        directory = write_random_checkpoint(Path(tmp), layers=args.layers, moe_intermediate=args.intermediate)
        ours = Qwen3Moe.from_pretrained(directory, env={"NKIMOE_TARGET": "cpu", "NKIMOE_CACHE": "/nonexistent"})
        hf = Qwen3MoeForCausalLM.from_pretrained(directory, dtype=torch.bfloat16).eval()  # HF's defaults
    # One HF model (memory for one copy of the weights), its attention switched between runs.
    attention = {"hf-eager": "eager", "hf-default": hf.config._attn_implementation}
    prompt = torch.randint(0, 1024, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    runs: dict[str, list[tuple[float, float]]] = {"nkimoe": [], **{name: [] for name in attention}}
    for _ in range(args.repeats):  # interleaved, so all see the same machine state
        runs["nkimoe"].append(time_nkimoe(ours, prompt, args.new_tokens))
        for name, implementation in attention.items():
            hf.set_attn_implementation(implementation)
            runs[name].append(time_hf(hf, prompt, args.new_tokens))
    med = {k: (statistics.median(r[0] for r in v), statistics.median(r[1] for r in v)) for k, v in runs.items()}
    print(f"{args.layers} layers, expert width {args.intermediate}, prompt {args.prompt}, {args.new_tokens} new "
          f"tokens, median of {args.repeats} runs; hf-default: attention {attention['hf-default']}, experts "
          f"{hf.config._experts_implementation} (both hf rows)")
    print(f"{'':<20} {'prefill tok/s':>14} {'decode tok/s':>13}")
    for name, (pre, dec) in med.items():
        print(f"{name:<20} {pre:>14.1f} {dec:>13.1f}")
    for name in attention:
        print(f"{'nkimoe / ' + name:<20} {med['nkimoe'][0] / med[name][0]:>14.2f} "
              f"{med['nkimoe'][1] / med[name][1]:>13.2f}")


if __name__ == "__main__":
    main()
