"""The Neuron path: the contest's ``NeuronQwen3MoeForCausalLM`` built on neuronx-distributed-inference
(NxDI), with every op of the model running through its bound variant.

The contest harness (aws-neuron/nki-moe ``main.py``) uses only ``NeuronQwen3MoeForCausalLM``:
``get_neuron_config_cls()(**kwargs)``, ``get_config_cls()(neuron_config, load_config=...)``, the
constructor ``(model_path, config)``, ``compile(dir)`` and ``load(dir)``. NxDI keeps what it is
good at (tensor-parallel sharding of the checkpoint, the KV-cache manager, bucketing, tracing,
sampling); nkimoe takes each op at NxDI's own seams (read from
``neuronx_distributed_inference/modules/attention/attention_base.py``,
``models/model_base.py``, ``modules/kvcache/kv_cache_manager.py`` and
``neuronx_distributed/parallel_layers/layers.py``):

==============================  ==============================================================
op                              seam
==============================  ==============================================================
rmsnorm (input, q/k, final)     the norm modules (``BoundRMSNorm``)
add_rmsnorm (post-attention)    the decoder layer (``NeuronQwen3MoeDecoderLayer.forward``)
linear (q/k/v, o, lm_head)      each parallel linear's local matmul (``_forward_impl``); the
                                weight is stored in the variant's layout (NxDI's
                                ``transpose_parallel_linear_layer`` for K-major kernels)
rope                            ``apply_rotary_embedding``
attention_prefill               ``perform_prefill``
attention_decode                ``compute_for_token_gen`` (K cache stored transposed)
linear (router gate), router,   nkimoe's sparse MoE block: every rank holds all experts' slice
expert_mlp                      of the intermediate axis (768 over TP 4: 192, unpadded), runs
                                the bound expert variant on it and all-reduces the partial sums
moe_block                       the decoder layer: the fused variant, or the chain above
attention_block (decode)        the decoder layer in a token-generation step
                                (``NeuronQwen3MoEAttention.decode_block``), where KV heads split
                                over the ranks and a fused variant is bound: the block's weights
                                are stored per rank beside NxDI's; otherwise NxDI's attention
==============================  ==============================================================

Each op is bound the first time a traced forward meets its shape (so the bucket sizes NxDI
traces decide the problems) and each binding is logged once. Kernels launch on the rank's
``logical_nc_config`` grid (``kernel[lnc]``) where their launcher takes ``lnc``, else as ``kernel[1]``. Weight layouts a variant asks for
(``Variant.prepare``) are applied in the checkpoint conversion, before NxD shards it, when the
layout is a permutation of axes; otherwise at call time.

The layout arithmetic and every per-rank computation are plain functions of tensors, tested on
CPU against HF transformers with the ranks simulated; the classes that subclass NxDI need the
Neuron SDK and are verified only on a Trainium host. Without NxDI the names still import; using
them raises ``NeuronUnavailable`` saying what is missing.
"""

from nkimoe.neuron.nxdi import (
    NEURON_AVAILABLE,
    NeuronQwen3MoeForCausalLM,
    NeuronQwen3MoeModel,
    NeuronUnavailable,
    Qwen3MoeInferenceConfig,
    convert_qwen3_moe_hf_to_neuron_state_dict,
)
from nkimoe.neuron.seams import (
    KERNELS,
    BoundRMSNorm,
    Kernels,
    Layout,
    LocalMatmul,
    NeuronWiringError,
    add_rms_norm,
    attention_block_binding,
    attention_block_step,
    attention_block_weights,
    axis_permutation,
    call_bound,
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
    variant_layout,
)

__all__ = [
    "KERNELS", "NEURON_AVAILABLE", "BoundRMSNorm", "Kernels", "Layout", "LocalMatmul", "NeuronQwen3MoeForCausalLM",
    "NeuronQwen3MoeModel", "NeuronUnavailable", "NeuronWiringError", "Qwen3MoeInferenceConfig", "add_rms_norm",
    "attention_block_binding", "attention_block_step", "attention_block_weights",
    "axis_permutation", "call_bound", "check_neuron_config", "convert_qwen3_moe_hf_to_neuron_state_dict",
    "decode_attention", "decode_layouts", "launch", "linear_rows", "moe_layer_partial", "moe_partial",
    "permuted_shape", "prefill_attention", "rms_norm", "rotary", "stack_experts", "takes_grid", "variant_layout",
]
