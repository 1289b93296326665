"""Qwen3-30B-A3B for both rounds of the AWS Trainium2/3 MoE Kernel Challenge, every op bound by nkimoe.

At load the target is detected (``NKIMOE_TARGET``, then ``NEURON_PLATFORM_TARGET_OVERRIDE`` as the
contest's ``main.py --platform-target`` sets it, then device probes), each op is bound once through
the variant registry and the benchmark cache, and the binding is logged.

- Neuron path (neuronx-distributed-inference importable, i.e. on a Trainium host): the names the
  contest ``main.py`` imports from its baseline ``qwen.py``, above all ``NeuronQwen3MoeForCausalLM``.
- Portable path (anywhere): ``Qwen3Moe``, a complete torch model over the same bound variants;
  NKI variants run in the emulator when ``NKIMOE_TARGET`` is trn2 or trn3.

``nkimoe submit`` bundles this module and what it uses into one self-contained file.
"""

from __future__ import annotations

from nkimoe.model import CheckpointError, Generation, ModelConfig, Qwen3Moe, load_state_dict
from nkimoe.neuron import (
    NEURON_AVAILABLE,
    NeuronQwen3MoeForCausalLM,
    NeuronQwen3MoeModel,
    NeuronUnavailable,
    Qwen3MoeInferenceConfig,
    convert_qwen3_moe_hf_to_neuron_state_dict,
)

__all__ = [
    "NEURON_AVAILABLE",
    "CheckpointError",
    "Generation",
    "ModelConfig",
    "NeuronQwen3MoeForCausalLM",
    "NeuronQwen3MoeModel",
    "NeuronUnavailable",
    "Qwen3Moe",
    "Qwen3MoeInferenceConfig",
    "convert_qwen3_moe_hf_to_neuron_state_dict",
    "load_state_dict",
]
