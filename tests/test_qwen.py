"""The root qwen.py: importable without the Neuron SDK, exporting what the contest main.py uses."""

from __future__ import annotations

import inspect
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_imports_without_the_neuron_sdk() -> None:
    code = ("import sys, qwen; assert 'neuronx_distributed_inference' not in sys.modules; "
            "print(qwen.NEURON_AVAILABLE, qwen.NeuronQwen3MoeForCausalLM.__name__)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "NeuronQwen3MoeForCausalLM"]


def test_harness_contract_names_and_signatures() -> None:
    sys.path.insert(0, str(ROOT))
    try:
        import qwen
    finally:
        sys.path.remove(str(ROOT))
    cls = qwen.NeuronQwen3MoeForCausalLM
    # main.py: model_cls.get_neuron_config_cls()(**kwargs); model_cls.get_config_cls()(neuron_config,
    # load_config=...); model_cls(model_path, config); model.compile(path); model.load(path).
    for name in ("get_neuron_config_cls", "get_config_cls", "compile", "load"):
        assert callable(getattr(cls, name))
    assert list(inspect.signature(cls.compile).parameters)[:2] == ["self", "compiled_model_path"]
    assert list(inspect.signature(cls.load).parameters)[:2] == ["self", "compiled_model_path"]
    assert callable(qwen.convert_qwen3_moe_hf_to_neuron_state_dict)
    with pytest.raises(qwen.NeuronUnavailable, match="needs neuronx-distributed-inference"):
        cls.get_neuron_config_cls()
    with pytest.raises(qwen.NeuronUnavailable, match="portable model"):
        cls("/model", None)


def test_demo_and_generate_cli(tmp_path: Path) -> None:
    run = [sys.executable, "-m", "nkimoe.cli"]
    env_out = subprocess.run([*run, "demo", "--layers", "1", "--new-tokens", "3", "--quiet"], capture_output=True,
                             text=True, timeout=300)
    assert env_out.returncode == 0, env_out.stderr
    assert "decode.experts" in env_out.stdout and "tok/s" in env_out.stdout
    bad = subprocess.run([*run, "generate", "--model", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "config.json" in bad.stderr
