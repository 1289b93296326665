"""Import-time stand-ins for the closed Neuron packages (``torch_neuronx``, ``neuronxcc``, ``nki``,
``nkilib``, ``libneuronxla``, ``torch.classes.neuron``), so that NxDI's and NxD's open sources
import and run on CPU.

Every stand-in module holds only the names that an upstream module reaches on the CPU path, each
with the upstream call that needs it. Reading any other name raises ``AttributeError`` (so an
``import`` of it fails), and every closed computation (a kernel, the compiler, tracing) raises
``StandInReached`` when called: nothing returns a silent stub.
"""

from __future__ import annotations

import dataclasses
import enum
import os
import sys
import types
from collections.abc import Callable
from typing import Any


class StandInReached(RuntimeError):
    """A closed Neuron SDK computation was reached off hardware."""


class Closed:
    """A closed-SDK object: importable; calling it, indexing it or reading an attribute raises."""

    def __init__(self, qualname: str, needed_by: str) -> None:
        self._qualname, self._needed_by = qualname, needed_by

    def _reached(self, how: str) -> StandInReached:
        return StandInReached(f"{self._qualname} ({how}) belongs to the closed Neuron SDK and does not run off "
                              f"hardware; its stand-in exists only because {self._needed_by}")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        raise self._reached("called")

    def __getitem__(self, key: Any) -> Any:
        raise self._reached("indexed")

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise self._reached(f"attribute {name!r} read")

    def __repr__(self) -> str:
        return f"<closed Neuron SDK stand-in {self._qualname}>"


class ClosedDecorator(Closed):
    """A closed decorator (``nki.jit``, ``nki_jit()``) applied at upstream import time: the decorated
    function becomes a ``Closed`` kernel that raises when launched."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if len(args) == 1 and callable(args[0]) and not kwargs:
            function = args[0]
            return Closed(f"{self._qualname}({getattr(function, '__qualname__', function)})", self._needed_by)
        return ClosedDecorator(self._qualname, self._needed_by)


class ClosedAnnotation(Closed):
    """A closed NKI type used in kernel signatures (``nt.tensor[...]``), subscripted at upstream
    import time: subscripting gives the annotation back; any other use raises."""

    def __getitem__(self, key: Any) -> Any:
        return self


class StandInModule(types.ModuleType):
    """A closed package's module holding only the declared names; any other raises."""

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        raise AttributeError(f"{self.__name__}.{name}: the off-hardware stand-in does not provide it (no upstream "
                             f"call on the CPU path needed it so far; add it to nkimoe.offhw.standins with the "
                             f"call that does)")


@dataclasses.dataclass(frozen=True)
class SkipMode:
    """``nkilib.core.moe.moe_cte.moe_cte_utils.SkipMode``: NxD's blockwise MoE module builds one as a
    dataclass default at import (neuronx_distributed/modules/moe/blockwise.py, ``BlockwiseMatmulArgs``)."""

    skip_token: bool = False
    skip_weight: bool = False


# Configuration enums NxD's MoE modules read at import and when they build their (torch) MoE on CPU;
# member names and values as in aws-neuron/nki-library src/nkilib_src/nkilib/core/utils/common_types.py
# and core/moe/moe_cte/moe_cte_utils.py.
ActFnType = enum.Enum("ActFnType", {"SiLU": 0, "GELU": 1, "GELU_Tanh_Approx": 2, "Swish": 3})
RouterActFnType = enum.Enum("RouterActFnType", {"SIGMOID": 0, "SOFTMAX": 1})
ExpertAffinityScaleMode = enum.Enum("ExpertAffinityScaleMode",
                                    {"NO_SCALE": 0, "POST_SCALE": 1, "PRE_SCALE": 2, "PRE_SCALE_DELAYED": 3})
BlockShardStrategy = enum.Enum("BlockShardStrategy", {"HI_LO": 0, "PING_PONG": 1})


class CollectivesConfig:
    """``CollectivesConfig``: NxD's ``initialize_model_parallel`` builds one for the context-parallel
    groups and stores each rank's ring-attention source/target pair
    (neuronx_distributed/parallel_layers/parallel_state.py); only ring attention reads that pair,
    so it is a ``Closed`` that raises when used."""

    def __init__(self, replica_groups: Any) -> None:
        self.replica_groups = replica_groups
        ranks = sorted({rank for group in replica_groups for rank in group})
        self.rank_src_tgt_pairs = {rank: Closed("CollectivesConfig.rank_src_tgt_pairs", "ring attention (context "
                                                "parallelism) reads it; nkimoe's path does not use it")
                                   for rank in ranks}


_MARKERS = ("ModuleMarkerStart.forward_impl", "ModuleMarkerEnd.forward_impl")


def _xla_hlo_call(function: Callable[..., Any]) -> Any:
    """``torch_neuronx.xla_impl.base.xla_hlo_call``: NxDI's layer-boundary markers
    (models/layer_boundary_marker.py) emit a marker custom call that returns its operands unchanged,
    so off hardware they are the identity; any other HLO call is closed."""
    if function.__qualname__ in _MARKERS:
        return lambda *args: args[0] if len(args) == 1 else args
    return Closed(f"torch_neuronx.xla_impl.base.xla_hlo_call({function.__qualname__})",
                  "NxD / NxDI define HLO calls at import")


def _platform_target() -> str:
    """``torch_neuronx.utils.get_platform_target``: the harness sets ``NEURON_PLATFORM_TARGET_OVERRIDE``."""
    return os.environ.get("NEURON_PLATFORM_TARGET_OVERRIDE", "trn2")


Entry = tuple[Any, str]  #: (the value, the upstream use that needs it)

#: module -> {name: (value, why)}; a ``Closed`` value raises when used.
_TABLE: dict[str, dict[str, Entry]] = {}


def _declare(module: str, **names: Entry) -> None:
    _TABLE.setdefault(module, {}).update(names)


def _closed(module: str, why: str, *names: str, decorator: bool = False, annotation: bool = False) -> None:
    kind = ClosedDecorator if decorator else ClosedAnnotation if annotation else Closed
    _declare(module, **{name: (kind(f"{module}.{name}", why), why) for name in names})


def install() -> list[str]:
    """Put every stand-in module into ``sys.modules`` (with its parents) and return their names.
    Call after ``torch_xla`` has imported (``libneuronxla`` would otherwise shadow its plugin probe)."""
    for name, entries in sorted(_TABLE.items()):
        if name == "torch.classes.neuron":
            import torch

            module = StandInModule(name, "off-hardware stand-in for the Neuron runtime's TorchScript classes")
            torch.classes.neuron = module
            sys.modules[name] = module
            for attr, (value, _why) in entries.items():
                setattr(module, attr, value)
            continue
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):
            prefix = ".".join(parts[:depth])
            if prefix not in sys.modules:
                module = StandInModule(prefix, "off-hardware stand-in for a closed Neuron SDK module")
                module.__path__ = []
                sys.modules[prefix] = module
                if depth > 1:
                    setattr(sys.modules[".".join(parts[:depth - 1])], parts[depth - 1], module)
        module = sys.modules[name]
        for attr, (value, _why) in entries.items():
            setattr(module, attr, value)
    return sorted(_TABLE)


def reasons() -> dict[str, dict[str, str]]:
    """module -> {name: the upstream use that needs it}."""
    return {module: {name: why for name, (_v, why) in entries.items()} for module, entries in _TABLE.items()}


# --- the declarations: what each upstream module needs at import and on the CPU path ---------------

_declare("torch_neuronx.utils", get_platform_target=(
    _platform_target, "NxD's kernels and NxDI's configs pick code per target (neuronx_distributed/kernels/flash_attn.py)"))
_closed("torch_neuronx.xla_impl.ops", "NxD's kernel modules wrap their NKI kernels at import "
        "(neuronx_distributed/kernels/flash_attn.py: nki_jit()(...))", "nki_jit", decorator=True)
_closed("neuronxcc.nki", "NxD's and NxDI's kernel modules decorate NKI kernels at import (@nki.jit)", "jit",
        decorator=True)
_closed("torch.classes.neuron", "NxD's model builder annotates its runtime wrappers with them at import "
        "(neuronx_distributed/trace/spmd.py, nxd_model/nxd_model.py)", "SPMDModel", "LayoutTransformation")
_closed("torch_neuronx.xla_impl.structure", "NxD's SPMD wrappers annotate with it at import "
        "(neuronx_distributed/trace/spmd.py)", "Packer")
_BLOCKWISE = "NxD's blockwise MoE module reads it at import (neuronx_distributed/modules/moe/blockwise.py)"
_declare("nkilib.core.moe.moe_cte.moe_cte_utils", SkipMode=(SkipMode, _BLOCKWISE),
         BlockShardStrategy=(BlockShardStrategy, _BLOCKWISE))
_declare("nkilib.core.utils.common_types", ExpertAffinityScaleMode=(ExpertAffinityScaleMode, _BLOCKWISE),
         ActFnType=(ActFnType, _BLOCKWISE), RouterActFnType=(RouterActFnType, _BLOCKWISE))
_closed("nkilib.core.moe_block.moe_block_tkg", "NxD's fused-MoE decode module looks the kernel up at import "
        "(neuronx_distributed/modules/moe/moe_fused_tkg.py)", "moe_block_tkg")
_declare("nki.language")
_closed("nkilib.core.utils.tensor_view", "NxD's MX fused-MoE decode module looks it up at import "
        "(neuronx_distributed/modules/moe/moe_fused_tkg_mx.py)", "TensorView")
_closed("nki.language", "NxD's MX fused-MoE decode module reads the dtype at import "
        "(neuronx_distributed/modules/moe/moe_fused_tkg_mx.py)", "float4_e2m1fn_x4")
_BLOCKWISE_OLD = ("NxD's blockwise MoE module reads it at import, SDK 2.27 / 2.28 "
                  "(neuronx_distributed/modules/moe/blockwise.py via nki_import.py)")
_declare("neuronxcc.nki._pre_prod_kernels.blockwise_mm", SkipMode=(SkipMode, _BLOCKWISE_OLD),
         BlockShardStrategy=(BlockShardStrategy, _BLOCKWISE_OLD))
_declare("neuronxcc.nki._pre_prod_kernels", ExpertAffinityScaleMode=(ExpertAffinityScaleMode, _BLOCKWISE_OLD),
         ActFnType=(ActFnType, _BLOCKWISE_OLD), RouterActFnType=(RouterActFnType, _BLOCKWISE_OLD))


# Names NxD / NxDI import at module level on the CPU path of SDK 2.27-2.29 and never compute with there:
# (module, the upstream files importing it, the names, what kind of closed object).
_IMPORTED_AT_MODULE_LEVEL: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
    ('libneuronxla',
     'neuronx_distributed/trace/model_builder.py',
     ('neuron_xla_compile',), 'closed'),
    ('neuronxcc.nki._pre_prod_kernels',
     'neuronx_distributed_inference/models/llama/modeling_llama.py',
     ('NormType',), 'closed'),
    ('neuronxcc.nki._pre_prod_kernels.topk.topk',
     'neuronx_distributed/operators/topk.py',
     ('topk',), 'closed'),
    ('neuronxcc.nki._pre_prod_kernels.util.kernel_helpers',
     'neuronx_distributed_inference/modules/kvcache/utils.py',
     ('get_program_sharding_info',), 'closed'),
    ('neuronxcc.nki._pre_prod_kernels.util.kernel_helpers',
     'neuronx_distributed_inference/utils/distributed.py',
     ('get_verified_program_sharding_info',), 'closed'),
    ('neuronxcc.nki._private.private_api',
     'neuronx_distributed/kernels/find_nonzero_indices.py',
     ('inline_asm_bytes',), 'closed'),
    ('neuronxcc.nki._private.private_api',
     'neuronx_distributed/kernels/indexed_flatten.py',
     ('sendrecv',), 'closed'),
    ('neuronxcc.nki._private_kernels.cumsum',
     'neuronx_distributed_inference/modules/generation/sampling.py',
     ('cumsum',), 'closed'),
    ('neuronxcc.nki._private_kernels.mlp',
     'neuronx_distributed_inference/models/llama/modeling_llama.py',
     ('mlp_fused_add_isa_kernel', 'mlp_isa_kernel', 'quant_mlp_fused_add_isa_kernel', 'quant_mlp_isa_kernel'), 'closed'),
    ('neuronxcc.nki._private_kernels.prefix_caching_attention',
     'neuronx_distributed_inference/modules/attention/attention_base.py',
     ('prefix_caching_attention_fwd_isa_kernel',), 'closed'),
    ('neuronxcc.nki._private_kernels.qkv',
     'neuronx_distributed_inference/modules/attention/gqa.py',
     ('rmsnorm_qkv_isa_fused_add_kernel', 'rmsnorm_qkv_isa_kernel'), 'closed'),
    ('neuronxcc.nki._private_kernels.rmsnorm',
     'neuronx_distributed_inference/models/llama/modeling_llama.py',
     ('rmsnorm_quant_isa_kernel',), 'closed'),
    ('neuronxcc.nki.compiler',
     'neuronx_distributed_inference/modules/attention/attention_base.py',
     ('enable_stack_allocator',), 'closed'),
    ('neuronxcc.nki.compiler',
     'neuronx_distributed/modules/moe/moe_fused_tkg_mx.py',
     ('skip_middle_end_transformations',), 'decorator'),
    ('neuronxcc.nki.compiler.backends.neuron.dimensions',
     'neuronx_distributed/parallel_layers/mappings.py',
     ('CCPipeline',), 'closed'),
    ('neuronxcc.nki.compiler.backends.neuron.dimensions',
     'neuronx_distributed/modules/moe/blockwise.py',
     ('VNC',), 'closed'),
    ('neuronxcc.nki.isa.constants',
     'neuronx_distributed_inference/modules/chunked_prefill/paged_cache.py',
     ('oob_mode',), 'closed'),
    ('neuronxcc.nki.kernels.attention',
     'neuronx_distributed/kernels/flash_attn.py',
     ('FlashConfig',), 'closed'),
    ('neuronxcc.nki.kernels.attention',
     'neuronx_distributed_inference/models/qwen3_moe/modeling_qwen3_moe.py',
     ('attention_isa_kernel',), 'closed'),
    ('neuronxcc.nki.kernels.cumsum',
     'neuronx_distributed_inference/modules/custom_calls.py',
     ('cumsum',), 'closed'),
    ('neuronxcc.nki.language',
     'neuronx_distributed/modules/moe/moe_fused_tkg_mx.py',
     ('bfloat16',), 'closed'),
    ('neuronxcc.nki.language',
     'neuronx_distributed/kernels/find_nonzero_indices.py',
     ('int32',), 'closed'),
    ('neuronxcc.nki.language',
     'neuronx_distributed/modules/moe/moe_fused_tkg.py',
     ('nc', 'ndarray'), 'closed'),
    ('neuronxcc.nki.language',
     'neuronx_distributed_inference/modules/chunked_prefill/flash_pa_with_schedule.py, neuronx_distributed_inference/modules/sliding_window/attention.py',
     ('par_dim',), 'closed'),
    ('neuronxcc.nki.language.tile_size',
     'neuronx_distributed_inference/modules/sliding_window/attention.py',
     ('gemm_moving_fmax',), 'closed'),
    ('neuronxcc.nki.language.tile_size',
     'neuronx_distributed_inference/models/gpt_oss/mx_layout_transform.py, neuronx_distributed_inference/modules/chunked_prefill/utils.py',
     ('pmax',), 'closed'),
    ('neuronxcc.nki.language.tile_size',
     'neuronx_distributed_inference/modules/chunked_prefill/utils.py',
     ('psum_fmax',), 'closed'),
    ('neuronxcc.nki.typing',
     'neuronx_distributed_inference/modules/kvcache/utils.py',
     ('mutable',), 'closed'),
    ('neuronxcc.nki.typing',
     'neuronx_distributed/kernels/find_nonzero_indices.py, neuronx_distributed_inference/modules/kvcache/utils.py',
     ('tensor',), 'annotation'),
    ('nki',
     'neuronx_distributed/modules/moe/moe_fused_tkg_mx.py',
     ('jit',), 'decorator'),
    ('nki.language',
     'neuronx_distributed/modules/moe/moe_fused_tkg_mx.py',
     ('bfloat16', 'ndarray'), 'closed'),
    ('nkilib.core.cumsum.cumsum',
     'neuronx_distributed_inference/modules/custom_calls.py',
     ('cumsum',), 'closed'),
    ('nkilib.core.max.cascaded_max',
     'neuronx_distributed/operators/argmax.py',
     ('cascaded_max',), 'closed'),
    ('nkilib.core.mlp.mlp',
     'neuronx_distributed_inference/models/llama/modeling_llama.py',
     ('mlp',), 'closed'),
    ('nkilib.core.output_projection.output_projection_cte',
     'neuronx_distributed_inference/modules/attention/gqa.py',
     ('output_projection_cte',), 'closed'),
    ('nkilib.core.qkv.qkv',
     'neuronx_distributed_inference/modules/attention/gqa.py',
     ('qkv',), 'closed'),
    ('nkilib.core.rmsnorm.rmsnorm_quant',
     'neuronx_distributed_inference/models/llama/modeling_llama.py',
     ('RmsNormQuantKernelArgs', 'rmsnorm_quant_kernel'), 'closed'),
    ('nkilib.core.subkernels.find_nonzero_indices',
     'neuronx_distributed/modules/moe/expert_mlps_v2.py',
     ('find_nonzero_indices',), 'closed'),
    ('nkilib.core.subkernels.indexed_flatten',
     'neuronx_distributed/modules/moe/expert_mlps_v2.py',
     ('indexed_flatten',), 'closed'),
    ('nkilib.core.topk',
     'neuronx_distributed/operators/topk.py',
     ('topk',), 'closed'),
    ('nkilib.core.utils.common_types',
     'neuronx_distributed_inference/modules/attention/gqa.py',
     ('NormType', 'QKVOutputLayout'), 'closed'),
    ('nkilib.core.utils.common_types',
     'neuronx_distributed_inference/modules/attention/attention_base.py',
     ('QuantizationType',), 'closed'),
    ('nkilib.core.utils.kernel_helpers',
     'neuronx_distributed_inference/modules/kvcache/utils.py',
     ('get_verified_program_sharding_info',), 'closed'),
    ('nkilib.core.utils.kernel_helpers',
     'neuronx_distributed_inference/utils/distributed.py',
     ('kernel_assert',), 'closed'),
    ('nkilib.experimental.transformer.attention_block_tkg',
     'neuronx_distributed_inference/modules/attention/attention_base.py',
     ('attention_block_tkg',), 'closed'),
    ('torch_neuronx',
     'neuronx_distributed/trace/model_builder.py',
     ('BucketModelConfig',), 'closed'),
    ('torch_neuronx.experimental.profiler.v2_x.custom_op_name',
     'neuronx_distributed/trace/model_builder.py',
     ('hlo_debug',), 'closed'),
    ('torch_neuronx.proto.metaneff_pb2',
     'neuronx_distributed/trace/functions.py',
     ('MetaNeff',), 'closed'),
    ('torch_neuronx.pyhlo',
     'neuronx_distributed/trace/hlo_utils.py',
     ('xla_data_pb2',), 'closed'),
    ('torch_neuronx.pyhlo.hlo_pb2',
     'neuronx_distributed/trace/hlo_utils.py',
     ('HloComputationProto', 'HloInstructionProto'), 'closed'),
    ('torch_neuronx.pyhlo.hlo_pb2',
     'neuronx_distributed/trace/model_builder_utils.py',
     ('HloModuleProto',), 'closed'),
    ('torch_neuronx.testing.validation',
     'neuronx_distributed_inference/utils/accuracy.py',
     ('AllCloseSummary', 'custom_allclose', 'logit_validation', 'neuron_allclose'), 'closed'),
    ('torch_neuronx.utils.utils',
     'neuronx_distributed/trace/model_builder.py',
     ('SUPPORTED_TYPES', 'get_platform_target'), 'closed'),
    ('torch_neuronx.xla_impl.base',
     'neuronx_distributed/modules/moe/blockwise.py',
     ('xla_call',), 'closed'),
    ('torch_neuronx.xla_impl.bucket_trace',
     'neuronx_distributed/trace/trace.py',
     ('create_bucket_model',), 'closed'),
    ('torch_neuronx.xla_impl.custom_call_targets',
     'neuronx_distributed_inference/models/layer_boundary_marker.py',
     ('AwsNeuronModuleMarkerEndForward', 'AwsNeuronModuleMarkerStartForward'), 'closed'),
    ('torch_neuronx.xla_impl.ops',
     'neuronx_distributed/operators/argmax.py',
     ('Argmax',), 'closed'),
    ('torch_neuronx.xla_impl.ops',
     'neuronx_distributed_inference/modules/kvcache/kv_cache_manager.py',
     ('ConcatenateOp',), 'closed'),
    ('torch_neuronx.xla_impl.ops',
     'neuronx_distributed_inference/modules/custom_calls.py',
     ('RmsNorm',), 'closed'),
    ('torch_neuronx.xla_impl.ops',
     'neuronx_distributed/operators/topk.py',
     ('TopK',), 'closed'),
    ('torch_neuronx.xla_impl.ops',
     'neuronx_distributed_inference/modules/generation/sampling.py, neuronx_distributed_inference/modules/kvcache/utils.py',
     ('xla_hlo_call',), 'decorator'),
    ('torch_neuronx.xla_impl.torchscript',
     'neuronx_distributed/trace/trace.py',
     ('replace_weights',), 'closed'),
    ('torch_neuronx.xla_impl.trace',
     'neuronx_distributed/trace/model_builder.py',
     ('HloArtifacts', 'NeffArtifacts', 'generate_neff', 'get_torch_dtype'), 'closed'),
    ('torch_neuronx.xla_impl.trace',
     'neuronx_distributed/trace/hlo_utils.py',
     ('XLA_DTYPE_TO_METANEFF_DTYPE', 'get_hlo_computation_by_id', 'get_hlo_root_instruction', 'hlo_entry_computation'), 'closed'),
)
for _module, _where, _names, _kind in _IMPORTED_AT_MODULE_LEVEL:
    _closed(_module, f"imported at module level by {_where}", *_names, decorator=_kind == "decorator",
            annotation=_kind == "annotation")
_declare("neuronxcc.nki._private_kernels.collectives", CollectivesConfig=(
    CollectivesConfig, "NxD's initialize_model_parallel (neuronx_distributed/parallel_layers/parallel_state.py)"))
_declare("torch_neuronx.xla_impl.base", xla_hlo_call=(
    _xla_hlo_call, "NxDI's layer-boundary markers (models/layer_boundary_marker.py), which nkimoe's decoder layer uses"))
_declare("neuronxcc.nki._private_kernels.blockwise_mm", BlockShardStrategy=(
    BlockShardStrategy, "NxD's MoE configs default to BlockShardStrategy.HI_LO, SDK 2.27 / 2.28 "
    "(neuronx_distributed/modules/moe/moe_configs.py)"))
# Modules imported whole at module level (``import nki.isa as nisa``), no name read on the CPU path.
_declare('neuronxcc.nki._pre_prod_kernels.attn_fwd')
_declare('neuronxcc.nki._pre_prod_kernels.mlp_tkg')
_declare('neuronxcc.nki._pre_prod_kernels.mlp_tkg.mlp_tkg_isa')
_declare('neuronxcc.nki.nccl')
_declare('nki.isa')
_declare('nkilib.core.attention')
_declare('nkilib.core.attention.attention_cte')
_declare("torch_neuronx", __version__=(
    "2.9.0", "NxD's ModelBuilder checks the major version (neuronx_distributed/trace/model_builder.py); the contest "
    "SDK's torch-neuronx follows torch 2.9"))
