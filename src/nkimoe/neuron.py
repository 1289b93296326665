"""The Neuron path: the contest's ``NeuronQwen3MoeForCausalLM`` built on neuronx-distributed-inference
(NxDI), with nkimoe's bound NKI variants at the model's RMSNorm boundaries.

The contest harness (aws-neuron/nki-moe ``main.py``) uses only ``NeuronQwen3MoeForCausalLM``:
``get_neuron_config_cls()(**kwargs)``, ``get_config_cls()(neuron_config, load_config=...)``, the
constructor ``(model_path, config)``, ``compile(dir)`` and ``load(dir)``. This module subclasses
NxDI's own Qwen3-MoE model (``neuronx_distributed_inference.models.qwen3_moe.modeling_qwen3_moe``,
the baseline the harness compares against), so the config classes and the HF -> Neuron state-dict
conversion are NxDI's, and replaces every RMSNorm module (input, post-attention, q/k and final
norms) with one that calls the variant bound for the detected target. Which variant runs is
decided at trace time from the token count (1 token: the decode binding; more: prefill).

Without NxDI (any machine but a Trainium host's Neuron venv) the names still import; using them
raises ``NeuronUnavailable`` saying what is missing. This path is verified only on a Trainium host.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

try:  # pragma: no cover - exercised only where the Neuron SDK is installed
    from neuronx_distributed_inference.models.qwen3_moe import modeling_qwen3_moe as _nxdi

    NEURON_AVAILABLE = True
except ImportError:  # the usual case off Trainium
    _nxdi = None
    NEURON_AVAILABLE = False


class NeuronUnavailable(ImportError):
    """The Neuron path was used where neuronx-distributed-inference cannot be imported."""


_MISSING = ("the Neuron path of qwen.py needs neuronx-distributed-inference and the Neuron SDK (a Trainium "
            "host's Neuron venv, e.g. /opt/aws_neuronx_venv_pytorch_2_9_nxd_inference); off Trainium use the "
            "portable model: nkimoe.model.Qwen3Moe")


def _bound_norms(hidden: int, head_dim: int, eps: float) -> dict[str, Callable[..., Any]]:
    """The rmsnorm variants bound for this target, for the model's prefill and decode shapes."""
    from nkimoe.autoselect import bind_model
    from nkimoe.ops import Problem

    sites = {}
    for phase, tokens in (("prefill", 1024), ("decode", 1)):
        sites[f"{phase}.hidden"] = Problem.of("rmsnorm", T=tokens, H=hidden)
        sites[f"{phase}.head"] = Problem.of("rmsnorm", T=tokens, H=head_dim)
    binding, _ = bind_model(sites)
    return {site: bound.fn for site, bound in binding.ops.items()}


class BoundRMSNorm(nn.Module):
    """RMSNorm whose computation is the bound ``rmsnorm`` variant (an NKI kernel on Trainium)."""

    def __init__(self, size: int, eps: float, kernels: dict[str, Callable[..., Any]], kind: str) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.variance_epsilon = eps
        self.kernels, self.kind = kernels, kind

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        rows = hidden_states.reshape(-1, shape[-1])
        phase = "decode" if rows.shape[0] == 1 else "prefill"
        return self.kernels[f"{phase}.{self.kind}"](rows, self.weight.to(rows.dtype), self.variance_epsilon).reshape(shape)


if NEURON_AVAILABLE:  # pragma: no cover - needs the Neuron SDK

    Qwen3MoeInferenceConfig = _nxdi.Qwen3MoeInferenceConfig
    convert_qwen3_moe_hf_to_neuron_state_dict = _nxdi.convert_qwen3_moe_hf_to_neuron_state_dict

    class NeuronQwen3MoeDecoderLayer(_nxdi.NeuronQwen3MoeDecoderLayer):
        """NxDI's decoder layer with bound norms."""

        def __init__(self, config: Any, layer_idx: int) -> None:
            super().__init__(config, layer_idx)
            kernels = _bound_norms(config.hidden_size, config.head_dim, config.rms_norm_eps)
            self.input_layernorm = BoundRMSNorm(config.hidden_size, config.rms_norm_eps, kernels, "hidden")
            self.post_attention_layernorm = BoundRMSNorm(config.hidden_size, config.rms_norm_eps, kernels, "hidden")
            self.self_attn.q_layernorm = BoundRMSNorm(config.head_dim, config.rms_norm_eps, kernels, "head")
            self.self_attn.k_layernorm = BoundRMSNorm(config.head_dim, config.rms_norm_eps, kernels, "head")

    class NeuronQwen3MoeModel(_nxdi.NeuronQwen3MoeModel):
        """NxDI's Qwen3-MoE model with nkimoe's decoder layers and final norm."""

        def init_model(self, config: Any) -> None:
            super().init_model(config)
            self.layers = nn.ModuleList(
                [NeuronQwen3MoeDecoderLayer(config, i) for i in range(config.num_hidden_layers)]
            )
            kernels = _bound_norms(config.hidden_size, config.head_dim, config.rms_norm_eps)
            self.norm = BoundRMSNorm(config.hidden_size, config.rms_norm_eps, kernels, "hidden")

    class NeuronQwen3MoeForCausalLM(_nxdi.NeuronQwen3MoeForCausalLM):
        """The class the contest harness loads: NxDI's causal LM over nkimoe's model."""

        _model_cls = NeuronQwen3MoeModel

else:

    class _Unavailable:
        """Stands in for an NxDI class where NxDI is absent: importable, unusable, says why."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            raise NeuronUnavailable(_MISSING)

    class Qwen3MoeInferenceConfig(_Unavailable):
        """NxDI's Qwen3-MoE inference config (Neuron path only)."""

        @classmethod
        def get_neuron_config_cls(cls) -> Any:
            raise NeuronUnavailable(_MISSING)

    class NeuronQwen3MoeModel(_Unavailable):
        """nkimoe's NxDI model (Neuron path only)."""

    class NeuronQwen3MoeForCausalLM(_Unavailable):
        """The class the contest harness loads (Neuron path only)."""

        _model_cls = NeuronQwen3MoeModel

        @classmethod
        def get_neuron_config_cls(cls) -> Any:
            raise NeuronUnavailable(_MISSING)

        @classmethod
        def get_config_cls(cls) -> Any:
            raise NeuronUnavailable(_MISSING)

        def compile(self, compiled_model_path: str, debug: bool = False) -> None:
            raise NeuronUnavailable(_MISSING)

        def load(self, compiled_model_path: str) -> None:
            raise NeuronUnavailable(_MISSING)

    def convert_qwen3_moe_hf_to_neuron_state_dict(neuron_state_dict: dict, config: Any) -> dict:
        raise NeuronUnavailable(_MISSING)
