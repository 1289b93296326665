"""Conformance: AWS's nki-library kernels run unchanged in the emulator.

The vendored nki-library (``../shared/vendor/nki-library``) is imported as it is, with ``import
nki`` resolving to the emulator (``aliases.install_as_nki``). Each case runs one kernel at small
shapes its own test file lists (its smallest or fast rows), with that test's LNC degree (nki-library's
``CompilerArgs`` default on trn2/trn3 is LNC=2), against the torch reference that test uses,
under the test's tolerances and nki-library's comparison (``comparators.maxAllClose``, mode
"max": ``|actual - expected| <= atol + rtol * max|expected|``), on trn2 and trn3 under NKI 0.3.0
rules. Inputs are drawn as the tests draw them (same distributions, seeds where the test fixes
one). nki-library's own harness needs the Neuron SDK (``neuron_dtypes``), so it is not run.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np
import pytest
import torch

from nkimoe.nki.emulator import session, simulate
from nkimoe.nki.emulator.aliases import install_as_nki

LIBRARY = Path(__file__).resolve().parents[2] / ".." / "shared" / "vendor" / "nki-library"
TESTS = "test/integration/nkilib/core"

pytestmark = pytest.mark.skipif(not (LIBRARY / "src").is_dir(), reason=f"vendored nki-library absent at {LIBRARY}")


@dataclass(frozen=True)
class Case:
    """One kernel call of nki-library's tests."""

    id: str
    #: The kernel ("module:attribute" under nkilib_src.nkilib), or a function of the resolver giving
    #: the ``@nki.jit`` wrapper the test file defines around a library function (restated here).
    kernel: str | Callable[[Callable[[str], Any]], Callable[..., Any]]
    #: The torch reference the test validates against ("module:attribute"), or a function of the
    #: resolver giving the golden the test file defines itself (restated here).
    reference: str | Callable[[Callable[[str], Any]], Callable[..., Any]]
    #: The kernel's arguments (NumPy tensors and options), given a resolver of "module:attribute" names.
    inputs: Callable[[Callable[[str], Any]], dict[str, Any]]
    source: str  #: the nki-library test file the shapes and tolerances come from
    lnc: int = 2
    rtol: float = 1e-5
    atol: float = 1e-8
    #: ``torch_ref_wrapper(preserve_lower_precision=True)``: bf16 inputs reach the reference as bf16
    #: and its outputs are rounded to the first low-precision input's dtype.
    lower_precision: bool = False
    #: The test's golden rounds the reference's outputs to the inputs' low-precision dtype
    #: (``dt.static_cast``), the reference itself having run in fp32.
    round_to_inputs: bool = False
    #: The nki-library module the case exercises, when ``kernel`` is a test file's wrapper.
    library: str = ""
    #: What the test's validator reads from the kernel's outputs (given them and the inputs), where
    #: it reinterprets them, e.g. fp8 values and an fp32 scale packed in each row.
    decode: Callable[[list[np.ndarray], dict[str, Any]], list[np.ndarray]] | None = None
    #: Relative tolerances per output, where the test gives each its own (else ``rtol``).
    rtols: tuple[float, ...] = ()

    @property
    def module(self) -> str:
        """The kernel's module under nkilib_src.nkilib (its row of README's conformance table)."""
        return self.library or str(self.kernel).split(":")[0]


def _randn(seed: int, name: str, shape: tuple[int, ...], dtype: Any) -> Callable[[Callable[[str], Any]], dict]:
    """``np.random.seed(seed); np.random.randn(*shape)``, as the cumsum and cascaded_max tests draw."""
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:
        np.random.seed(seed)
        return {name: np.random.randn(*shape).astype(dtype)}
    return make


def _gaussian(seed: int = 0, std: float = 1.0) -> Callable[..., np.ndarray]:
    """nki-library's ``gaussian_tensor_generator``: successive ``rng.normal`` draws of one generator
    (bf16 unless a dtype is given)."""
    rng = np.random.default_rng(seed)
    return lambda shape, dtype=ml_dtypes.bfloat16: (rng.normal(size=shape) * std).astype(dtype)


def _rope(d_head: int, batch: int, heads: int, seq: int, contiguous: bool, relayout: bool) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # generate_kernel_inputs of test_rope.py
        draw = _gaussian()
        return {"x_in": draw((d_head, batch, heads, seq)), "cos": draw((d_head // 2, batch, seq)),
                "sin": draw((d_head // 2, batch, seq)), "lnc_shard": True, "contiguous_layout": contiguous,
                "relayout_in_sbuf": relayout}
    return make


def _sparse_routing(tokens: int, experts: int, top_k: int, dtype: Any) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # generate_sparse_input of test_find_nonzero_indices.py
        np.random.seed(0)
        k = tokens * top_k // experts
        flat = np.random.permutation(np.concatenate([np.ones(k * experts), np.zeros((tokens - k) * experts)]))
        x = flat.reshape(experts, tokens).T.astype(dtype)
        if dtype == np.float32:
            x[x > 0] = 0.1
        return {"input_tensor": x, "chunk_size": tokens}
    return make


def _output_projection(batch: int, heads: int, seq: int, d_head: int, hidden: int, bias: bool,
                       transpose_out: bool) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # build_output_proj_tkg_input, no quantization
        draw = _gaussian()
        return {"attention": draw((d_head, batch, heads, seq)), "weight": draw((d_head * heads, hidden)),
                "bias": _gaussian(std=100)((1, hidden)) if bias else None,
                "quantization_type": resolve("core.utils.common_types:QuantizationType").NONE,
                "weight_scale": None, "input_scale": None, "TRANSPOSE_OUT": transpose_out, "OUT_IN_SB": False}
    return make


def _tkg_norm(batch: int, seq: int, hidden: int, options: dict[str, Any], beta: bool = False) -> Callable[..., dict]:
    # generate_inputs of test_rmsnorm_tkg / test_layernorm_tkg
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:
        np.random.seed(42)
        inputs = {"input": np.random.randn(batch, seq, hidden).astype(np.float16),
                  "gamma": np.random.randn(1, hidden).astype(np.float16),
                  "output": np.zeros((128, batch * seq, hidden // 128), dtype=np.float16)}
        if beta:
            inputs["beta"] = np.random.randn(1, hidden).astype(np.float16)
        return {**inputs, **options}
    return make


def _indexed_flatten(tokens: int, rows: int, f_len: int, offsets: int | None = None,
                     start: int | None = None) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # input_generator of test_indexed_flatten.py
        n = rows if offsets is None else offsets
        return {"input_tensor": np.arange(rows * tokens, dtype=np.int32).reshape(rows, tokens), "f_len": f_len,
                "output_len": (n * tokens + 1024 + 127) // 128 * 128,
                "row_offsets": np.array([tokens // f_len * i for i in range(n)], dtype=np.int32),
                "row_offsets_start": None if start is None else np.array([start], dtype=np.int32), "padding_val": -1}
    return make


def _cross_partition_copy_kernel(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``kernel_cross_partition_copy`` of test_cross_partition_copy.py."""
    import nki
    import nki.isa as nisa
    import nki.language as nl

    cross_partition_copy = resolve("core.utils.cross_partition_copy:cross_partition_copy")

    @nki.jit
    def kernel(input_data, output, src_start_partition, dst_start_partition,  # noqa: ANN001, ANN202
               num_partitions_to_copy, free_dim_size, total_partitions):
        src = nl.ndarray((total_partitions, free_dim_size), dtype=input_data.dtype, buffer=nl.sbuf)
        nisa.dma_copy(dst=src, src=input_data)
        dst = nl.ndarray((total_partitions, free_dim_size), dtype=input_data.dtype, buffer=nl.sbuf)
        nisa.memset(dst=dst, value=0.0)
        cross_partition_copy(src=src, dst=dst, src_start_partition=src_start_partition,
                             dst_start_partition=dst_start_partition, num_partitions_to_copy=num_partitions_to_copy,
                             free_dim_size=free_dim_size)
        nisa.dma_copy(dst=output, src=dst)
        return output
    return kernel


def _cross_partition_copy_reference(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``cross_partition_copy_torch_ref`` of test_cross_partition_copy.py."""
    def reference(input_data: torch.Tensor, src_start_partition: int, dst_start_partition: int,
                  num_partitions_to_copy: int, free_dim_size: int, **_: Any) -> torch.Tensor:
        result = torch.zeros_like(input_data)
        src = slice(src_start_partition, src_start_partition + num_partitions_to_copy)
        result[dst_start_partition:dst_start_partition + num_partitions_to_copy, :free_dim_size] = \
            input_data[src, :free_dim_size]
        return result
    return reference


def _cross_partition_copy(src: int, dst: int, count: int, free: int, total: int) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:
        np.random.seed(42)
        data = np.random.randn(total, free).astype(np.float32)
        return {"input_data": data, "output": np.zeros_like(data), "src_start_partition": src,
                "dst_start_partition": dst, "num_partitions_to_copy": count, "free_dim_size": free,
                "total_partitions": total}
    return make


def _tp_broadcast_kernel(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``tp_broadcast_hbm`` of test_tp_broadcast.py."""
    import nki
    import nki.isa as nisa
    import nki.language as nl

    tensor_view = resolve("core.utils.tensor_view:TensorView")
    tp_broadcast = resolve("core.utils.tp_broadcast:tp_broadcast")

    @nki.jit
    def kernel(src_hbm, src_offset, broadcast_count, src_select_index):  # noqa: ANN001, ANN202
        dst_shape = (broadcast_count, src_hbm.shape[0])
        src_sbuf = nl.ndarray(src_hbm.shape, src_hbm.dtype, nl.sbuf)
        dst_hbm = nl.ndarray(dst_shape, src_hbm.dtype, nl.shared_hbm)
        dst_sbuf = nl.ndarray(dst_shape, src_hbm.dtype, nl.sbuf)
        nisa.dma_copy(src_sbuf, src_hbm)
        src_in = tensor_view(src_sbuf).select(1, src_select_index) if src_select_index is not None else src_sbuf
        tp_broadcast(src_in, dst_sbuf, src_offset)
        nisa.dma_copy(dst_hbm, dst_sbuf)
        return dst_hbm
    return kernel


def _tp_broadcast_reference(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``tp_broadcast_torch`` of test_tp_broadcast.py."""
    def reference(src_hbm: torch.Tensor, src_offset: int, broadcast_count: int,
                  src_select_index: int | None) -> torch.Tensor:
        if src_select_index is not None:
            src_hbm = src_hbm.select(1, src_select_index)
        return src_hbm.reshape(src_hbm.shape[0], -1)[:, src_offset].unsqueeze(0).repeat(broadcast_count, 1)
    return reference


def _tp_broadcast(shape: tuple[int, ...], offset: int, count: int, select: int | None) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # np_random_sample(): seed 0, [0, 1)
        np.random.seed(0)
        return {"src_hbm": np.random.random_sample(shape).astype(np.float32), "src_offset": offset,
                "broadcast_count": count, "src_select_index": select}
    return make


def _rope_hf(batch: int, q_heads: int, kv_heads: int, seq: int, d_head: int, dtype: Any,
             backward: bool) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # _generate_inputs of test_rope_hf.py, cos/sin format
        np.random.seed(42)
        q = np.random.randn(batch, q_heads, seq, d_head).astype(dtype)
        k = np.random.randn(batch, kv_heads, seq, d_head).astype(dtype)
        return {"q": q, "k": k, "q_out": np.zeros_like(q), "k_out": np.zeros_like(k), "backward": backward,
                "cos": np.random.randn(batch, seq, d_head).astype(dtype),
                "sin": np.random.randn(batch, seq, d_head).astype(dtype)}
    return make


def _topk_reduce(tokens: int, top_k: int, hidden: int, ranks: int) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # generate_topk_reduce_inputs of test_topk_reduce.py
        np.random.seed(42)
        rows = ranks * tokens
        buffer = np.full((rows, hidden + 2), -1, dtype=ml_dtypes.bfloat16)
        values = np.random.randn(tokens * top_k, hidden).astype(ml_dtypes.bfloat16)
        ids = np.arange(tokens, dtype=np.int32).repeat(top_k).reshape(tokens * top_k, 1).view(ml_dtypes.bfloat16)
        buffer[np.random.permutation(rows)[:tokens * top_k]] = np.concatenate([values, ids], axis=1)
        return {"input": buffer, "T": tokens, "K": top_k}
    return make


def _conv1d(batch: int, c_in: int, c_out: int, length: int, size: int, stride: int, pad: tuple[int, int],
            dilation: int, bias: bool, act: str | None, shard: bool, dtype: Any) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # generate_conv1d_inputs of test_conv1d.py
        draw = _gaussian()
        act_fn = None if act is None else getattr(resolve("core.utils.common_types:ActFnType"), act)
        return {"x_in": draw((batch, c_in, length), dtype), "filters": draw((size, c_in, c_out), dtype),
                "bias": draw((c_out,), dtype) if bias else None, "stride": stride, "padding": pad,
                "dilation": dilation, "activation_fn": act_fn, "lnc_shard": shard}
    return make


def _depthwise_conv1d(channels: int, width: int, size: int, stride: int, pad: int) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # generate_kernel_inputs of test_depthwise_conv1d.py
        draw = _gaussian()
        return {"img_ref": draw((1, channels, 1, width)), "filter_ref": draw((channels, 1, 1, size)),
                "padding": ((0, 0), (pad, pad)), "stride": (1, stride), "rhs_dilation": (1, 1),
                "lhs_dilation": (1, 1), "feature_group_count": channels, "batch_group_count": 1}
    return make


def _depthwise_conv1d_reference(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``golden_depthwise_conv1d``: torch's grouped conv2d (rounded to the inputs' bf16 by the case)."""
    def reference(img_ref: torch.Tensor, filter_ref: torch.Tensor, padding: Any, stride: Any, **_: Any) -> torch.Tensor:
        return torch.nn.functional.conv2d(img_ref, filter_ref, stride=stride, padding=(0, padding[1][0]),
                                          groups=img_ref.shape[1])
    return reference


def _cross_entropy(positions: int, vocab: int, per_batch: int, chunk: int, backward: bool) -> Callable[..., dict]:
    # generate_kernel_inputs of the cross-entropy tests, bf16
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:
        np.random.seed(42)
        logits = np.random.randn(positions, vocab).astype(ml_dtypes.bfloat16)
        targets = np.random.randint(0, vocab, size=(positions,), dtype=np.int32)
        inputs: dict[str, Any] = {"logits_hbm": logits, "targets_hbm": targets}
        if backward:  # the forward reference's log-sum-exp, in bf16
            forward = resolve("experimental.loss.cross_entropy_torch:cross_entropy_forward_torch_ref")
            _, lse = forward(torch.from_numpy(logits.astype(np.float32)).to(torch.bfloat16),
                             torch.from_numpy(targets).long())
            inputs.update(lse_state_hbm=lse.float().numpy().astype(ml_dtypes.bfloat16), reduction="mean")
        return {**inputs, "positions_per_batch": per_batch, "chunk_size": chunk, "dtype": "bfloat16"}
    return make


def _cross_entropy_reference(name: str) -> Callable[[Callable[[str], Any]], Callable[..., Any]]:
    """``golden_cross_entropy_ref`` / ``golden_cross_entropy_backward_ref``: the torch reference in
    bf16, its outputs rounded to bf16."""
    def bind(resolve: Callable[[str], Any]) -> Callable[..., Any]:
        torch_ref = resolve(f"experimental.loss.cross_entropy_torch:{name}")

        def reference(logits_hbm: torch.Tensor, targets_hbm: torch.Tensor, reduction: str | None = None,
                      **_: Any) -> list[torch.Tensor]:
            args = (logits_hbm.to(torch.bfloat16), targets_hbm.long(), *((reduction,) if reduction else ()))
            out = torch_ref(*args)
            return [o.to(torch.bfloat16) for o in (out if isinstance(out, tuple) else (out,))]
        return reference
    return bind


def _gen_mask(batch: int, heads: int, s_ctx: int, s_active: int) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # TestGenMaskTkgHbm.run_test, flat KV cache
        np.random.seed(42)
        cache_lens = np.random.randint(1, s_ctx, size=(batch,)).astype(np.int32)
        return {"pos_ids_hbm": np.repeat(cache_lens, s_active).astype(np.float32)[np.newaxis, :], "bs": batch,
                "q_head": heads, "s_active": s_active, "s_prior": s_ctx, "block_len": 0}
    return make


def _gen_mask_reference(lnc: int) -> Callable[[Callable[[str], Any]], Callable[..., Any]]:
    """``gen_mask_tkg_hbm_torch_ref[lnc]``."""
    return lambda resolve: resolve("core.attention.gen_mask_tkg_torch:gen_mask_tkg_hbm_torch_ref")[lnc]


def _attention_cte(batch: int, s_kv: int, s_q: int, d: int, dtype: Any, causal: bool) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # build_attention_cte_input, no CP/prefix/sink
        np.random.seed(0)  # np_random_sample()

        def draw(shape: tuple[int, ...]) -> np.ndarray:
            return np.random.random_sample(shape).astype(dtype)
        q, k, v = draw((batch, d, s_q)), draw((batch, d, s_kv)), draw((batch, s_kv, d))
        return {"q": q, "k": k, "v": v, "scale": 1.0, "causal_mask": causal, "k_prior": None, "v_prior": None,
                "prior_used_len": None, "sink": None, "sliding_window": 0, "tp_q": False, "tp_k": False,
                "tp_out": True, "cp_offset": None, "global_cp_deg": None, "cp_strided_q_slicing": False,
                "cache_softmax": False, "softmax_dtype": "float32", "mm_out_dtype": "float32",
                "bound_min": None, "bound_max": None}
    return make


def _attention_cte_reference(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``attention_cte_forward_golden``: the torch reference in fp32, rounded to the inputs' dtype."""
    torch_ref = resolve("core.attention.attention_cte_torch:attention_cte_torch_ref")

    def reference(q: torch.Tensor, softmax_dtype: str, mm_out_dtype: str, **kwargs: Any) -> torch.Tensor:
        return torch_ref(q=q, softmax_dtype=torch.float32, **kwargs)
    return reference


def _attention_bwd(seqlens: list[int], window: int) -> Callable[..., dict]:
    """generate_inputs of test_attention_bwd.py for one packed sequence set, one head, d 128, bf16, causal:
    the forward output and log-sum-exp come from the library's ``compute_o_lse``."""
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:
        compute_o_lse = resolve("core.attention.attention_bwd_torch:compute_o_lse")
        draw = _gaussian()
        total = sum(seqlens)
        cuts = np.concatenate([[0], np.cumsum(seqlens)])
        bound_min, bound_max = np.zeros(total, np.float32), np.zeros(total, np.float32)
        for lo, hi in zip(cuts[:-1], cuts[1:]):
            bound_min[lo:hi], bound_max[lo:hi] = lo, hi
        q, k, v, dy = (draw((1, 1, 128, total)) for _ in range(4))
        as_bf16 = lambda a: torch.from_numpy(a.astype(np.float32)).to(torch.bfloat16)  # noqa: E731 - convert_to_torch
        out, lse, _ = compute_o_lse(as_bf16(q), as_bf16(k), as_bf16(v), True, True, softmax_scale=None,
                                    sliding_window=window, sinks=None, bound_min=torch.from_numpy(bound_min),
                                    bound_max=torch.from_numpy(bound_max))
        return {"q_ref": q, "k_ref": k, "v_ref": v, "o_ref": out.float().numpy().astype(ml_dtypes.bfloat16),
                "dy_ref": dy, "lse_ref": lse.float().numpy(), "sinks_ref": None, "use_causal_mask": True,
                "mixed_precision": True, "softmax_scale": None, "sliding_window": window,
                "bound_min": bound_min, "bound_max": bound_max}
    return make


def _rmsnorm_quant(seq: int, quant_only: bool, row: bool, lower_bound: float) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # build_rmsnorm_quant_kernel_input, B 1, H 16384, bf16
        types = "core.utils.common_types"
        quant = getattr(resolve(f"{types}:QuantizationType"), "ROW" if row else "STATIC")
        norm = getattr(resolve(f"{types}:NormType"), "NO_NORM" if quant_only else "RMS_NORM")
        kargs = resolve("core.rmsnorm.rmsnorm_quant:RmsNormQuantKernelArgs")(
            quantization_type=quant, lower_bound=lower_bound, norm_type=norm, eps=1e-6)
        draw = _gaussian()
        hidden, gamma = draw((1, seq, 16384)), draw((1, 16384))
        return {"hidden": hidden, "ln_w": gamma, "kargs": kargs,
                "input_dequant_scale": None if row else draw((128, 1), np.float32)}
    return make


def _rmsnorm_quant_decode(outputs: list[np.ndarray], inputs: dict[str, Any]) -> list[np.ndarray]:
    """As the test's validator: fp8 values, then (row quantization) the fp32 dequantization scale
    stored in the 4 bytes after each row's H values."""
    out = outputs[0]
    h = inputs["hidden"].shape[-1]
    values = out[..., :h].astype(np.float32)
    if out.shape[-1] == h:
        return [values]
    return [values, np.ascontiguousarray(out[..., h:h + 4]).view(np.uint8).view(np.float32)]


def _rmsnorm_quant_reference(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``rmsnorm_quant_ref`` of test_rmsnorm_quant.py (NumPy, FP8 range 240, values cast to nl.float8_e4m3)."""
    import nki.language as nl

    def reference(hidden: torch.Tensor, ln_w: torch.Tensor, kargs: Any,
                  input_dequant_scale: torch.Tensor | None) -> list[np.ndarray]:
        x, gamma = hidden.numpy(), ln_w.numpy()
        if kargs.norm_type.name == "NO_NORM":
            norm = x
        else:
            norm = x * np.reciprocal(np.sqrt(np.mean(np.square(x), axis=-1, keepdims=True)) + kargs.eps) * gamma
        if input_dequant_scale is not None:  # static quantization
            quant = np.clip(norm / input_dequant_scale.numpy()[0, 0], -240.0, 240.0)
            return [quant.astype(nl.float8_e4m3).astype(np.float32)]
        abs_max = np.abs(norm).max(axis=-1, keepdims=True)
        if kargs.lower_bound > 0:
            abs_max = np.minimum(abs_max, kargs.lower_bound)
            norm = np.clip(norm, -kargs.lower_bound, kargs.lower_bound)
        dequant = abs_max / 240.0
        return [(norm * np.reciprocal(dequant)).astype(nl.float8_e4m3).astype(np.float32), dequant]
    return reference


def _attention_tkg_kernel(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``attn_tkg_wrapper`` of test_attention_tkg.py for outputs in HBM and no debug tensors."""
    import nki
    import nki.language as nl

    tkg = "core.attention.attention_tkg"
    attention_tkg, tile_constants, tile_params = (resolve(f"{tkg}:{name}") for name in
                                                  ("attention_tkg", "TileConstants", "_compute_tile_params"))
    sbuf_manager, logger = resolve("core.utils.allocator:SbufManager"), resolve("core.utils.logging:Logger")

    @nki.jit
    def kernel(q, k_active, v_active, k_prior, v_prior, mask, inv_freqs, rope_pos_ids,  # noqa: ANN001, ANN202
               start_pos_ids, sink, active_blocks_table, attn_out_shape, k_out_shape, cfg, dtype):
        tile_params(cfg, tile_constants.get_tile_constants(), q, k_prior, v_prior, k_active, v_active,
                    active_blocks_table)  # the wrapper's early check of the configuration
        sbm = sbuf_manager(0, nl.tile_size.total_available_sbuf_size - 16 * 1024, logger("SBM"))
        sbm.open_scope()
        out = nl.ndarray(attn_out_shape, dtype=dtype, buffer=nl.shared_hbm)
        k_out = nl.ndarray(k_out_shape, dtype=dtype, buffer=nl.shared_hbm) if cfg.fuse_rope else None
        out, k_out = attention_tkg(q, k_active, v_active, k_prior, v_prior, mask, out, cfg, sbm, inv_freqs,
                                   rope_pos_ids, start_pos_ids, sink, active_blocks_table, k_out, DBG_TENSORS=None)
        sbm.close_scope()
        return (out, k_out) if cfg.fuse_rope else (out,)
    return kernel


def _attention_tkg(config: tuple[int, ...]) -> Callable[..., dict]:
    """run_attention_tkg_test's inputs for a flat-KV config (bs, q heads, S_active, S_prior, full S_prior,
    d_head) with K prior transposed, position ids and fused RoPE, bf16."""
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:
        cfg = resolve("core.attention.attention_tkg:AttnTKGConfig")(*config, 0, tp_k_prior=True, use_pos_id=True,
                                                                     fuse_rope=True)
        np.random.seed(0)  # np_random_sample()

        def draw(*shape: int) -> np.ndarray:
            return np.random.random_sample(shape).astype(ml_dtypes.bfloat16)
        b, heads, active, d = cfg.bs, cfg.q_head, cfg.s_active, cfg.d_head
        q, k_active, v_active = draw(b, heads, active, d), draw(b, 1, active, d), draw(b, 1, active, d)
        k_prior, v_prior = draw(b, 1, cfg.full_sprior, d), draw(b, 1, cfg.full_sprior, d)
        causal = np.tril(np.ones((active, active), np.uint8))  # build_active_attention_mask(transposed=True)
        mask = np.ascontiguousarray(np.broadcast_to(causal, (b, heads, active, active)).transpose(3, 0, 1, 2))
        inv_freqs = np.random.random(size=(d // 2, 1)).astype(np.float32)
        pos_id = ((np.arange(b) * 3 + cfg.curr_sprior // 4 * 3) % (cfg.curr_sprior - active))[:, np.newaxis]
        return {"q": q, "k_active": k_active, "v_active": v_active, "k_prior": k_prior, "v_prior": v_prior,
                "mask": mask, "inv_freqs": inv_freqs,
                "rope_pos_ids": np.broadcast_to(pos_id, (b, active)).astype(np.float32), "start_pos_ids": None,
                "sink": None, "active_blocks_table": None, "attn_out_shape": (b, heads, d, active),
                "k_out_shape": (b, 1, d, active), "cfg": cfg, "dtype": "bfloat16"}
    return make


def _attention_tkg_reference(lnc: int) -> Callable[[Callable[[str], Any]], Callable[..., Any]]:
    """``attn_tkg_torch_wrapper``: ``attention_tkg_torch_ref[lnc]`` into fp32 outputs."""
    def bind(resolve: Callable[[str], Any]) -> Callable[..., Any]:
        torch_ref = resolve("core.attention.attention_tkg_torch:attention_tkg_torch_ref")[lnc]

        def reference(attn_out_shape: tuple[int, ...], k_out_shape: tuple[int, ...], dtype: str,
                      **inputs: Any) -> list[torch.Tensor]:
            out, k_out = torch.zeros(attn_out_shape), torch.zeros(k_out_shape)
            return list(torch_ref(out=out, sbm=None, k_out=k_out, DBG_TENSORS=None, **inputs))
        return reference
    return bind


def _qkv_cte(seq: int, hidden: int, fused_dim: int) -> Callable[..., dict]:
    """build_qkv_input for qkv_cte_kernel_accuracy_test_perms' rows: B 1, bf16, fused residual add,
    RMSNorm, no bias or quantization, BSD output."""
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:
        types = "core.utils.common_types"
        draw = _gaussian()
        x, weights = draw((1, seq, hidden)), draw((hidden, fused_dim))
        mlp_prev, attention_prev, gamma = draw((1, seq, hidden)), draw((1, seq, hidden)), draw((1, hidden))
        return {"input": x, "fused_qkv_weights": weights, "output_layout": resolve(f"{types}:QKVOutputLayout").BSD,
                "bias": None, "quantization_type": resolve(f"{types}:QuantizationType").NONE, "qkv_w_scale": None,
                "qkv_in_scale": None, "fused_residual_add": True, "mlp_prev": mlp_prev,
                "attention_prev": attention_prev, "fused_norm_type": resolve(f"{types}:NormType").RMS_NORM,
                "gamma_norm_weights": gamma, "layer_norm_bias": None, "norm_eps": 1e-6, "hidden_actual": None,
                "fused_rope": False, "cos_cache": None, "sin_cache": None, "d_head": None, "num_q_heads": None,
                "num_kv_heads": None, "store_output_in_sbuf": False, "sbm": None, "use_auto_allocation": False,
                "load_input_with_DMA_transpose": True,
                "weight_layout": resolve(f"{types}:QKVWeightLayout").CONTIGUOUS, "is_h_dim_4h_transposed": False}
    return make


def _qkv_cte_reference(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """golden_func_fused_add_qkv / norm_qkv_ref of the QKV tests for that configuration: in fp32, the
    residual sum, RMSNorm (test_kernel_common.rms_norm), the projection (rounded to bf16 by the case)."""
    def reference(input: torch.Tensor, fused_qkv_weights: torch.Tensor, mlp_prev: torch.Tensor,  # noqa: A002
                  attention_prev: torch.Tensor, gamma_norm_weights: torch.Tensor, norm_eps: float,
                  **_: Any) -> np.ndarray:
        hidden = (input + mlp_prev + attention_prev).numpy()
        rms = np.sqrt(np.mean(np.square(hidden), axis=-1, keepdims=True) + norm_eps)
        return hidden * np.reciprocal(rms) * gamma_norm_weights.numpy() @ fused_qkv_weights.numpy()
    return reference


CUMSUM = ("core.cumsum:cumsum", "core.cumsum.cumsum_torch:cumsum_torch_ref")
CASCADED_MAX = ("core.max.cascaded_max:cascaded_max", "core.max.cascaded_max_torch:cascaded_max_torch_ref")
ROPE = ("core.embeddings.rope:RoPE", "core.embeddings.rope_torch:rope_torch_ref")
NONZERO = ("core.subkernels.find_nonzero_indices:find_nonzero_indices",
           "core.subkernels.find_nonzero_indices_torch:find_nonzero_indices_torch_ref")
NONZERO_WITH_COUNT = "experimental.benchmark.find_nonzero_indices_with_count:find_nonzero_indices_with_count"
OUT_PROJ = ("core.output_projection.output_projection_tkg:output_projection_tkg",
            "core.output_projection.output_projection_tkg_torch:output_projection_tkg_torch_ref")
RMSNORM_TKG = ("core.subkernels.rmsnorm_tkg:rmsnorm_tkg", "core.subkernels.rmsnorm_torch:rmsnorm_tkg_torch_ref")
RMSNORM_TKG_LNC1 = (RMSNORM_TKG[0], "core.subkernels.rmsnorm_torch:rmsnorm_tkg_torch_ref_lnc1")
LAYERNORM_TKG = ("core.subkernels.layernorm_tkg:layernorm_tkg",
                 "core.subkernels.layernorm_torch:layernorm_tkg_torch_ref")
LAYERNORM_TKG_LNC1 = (LAYERNORM_TKG[0], "core.subkernels.layernorm_torch:layernorm_tkg_torch_ref_lnc1")
INDEXED_FLATTEN = ("core.subkernels.indexed_flatten:indexed_flatten",
                   "core.subkernels.indexed_flatten_torch:indexed_flatten_torch_ref")
ROPE_HF = ("core.embeddings.rope_hf:rope_hf", "core.embeddings.rope_hf_torch:rope_hf_torch_ref")
TOPK_REDUCE = ("experimental.collectives.topk_reduce:topk_reduce",
               "experimental.collectives.topk_reduce_torch:topk_reduce_torch_ref")
CONV1D = ("experimental.conv.conv1d:conv1d", "experimental.conv.conv1d_torch:conv1d_torch_ref")


def _elementwise_add(rows: int, cols: int) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # generate_kernel_inputs of test_dynamic_elementwise_add.py
        draw = _gaussian()
        return {"input_a": draw((rows, cols)), "input_b": draw((rows, cols)),
                "num_m_tiles": np.array([[rows // 128]], dtype=np.int32)}
    return make


def _elementwise_add_reference(resolve: Callable[[str], Any]) -> Callable[..., Any]:
    """``golden_elementwise_add``: the torch reference of the two inputs (``num_m_tiles`` is the
    kernel's run-time tile count, not an operand)."""
    ref = resolve("experimental.dynamic_shapes.dynamic_elementwise_add_torch:dynamic_elementwise_add_torch_ref")
    return lambda input_a, input_b, num_m_tiles: ref(input_a, input_b)


def _nonzero_with_count_golden(input_tensor: torch.Tensor) -> np.ndarray:
    """``golden_output_validator`` of test_find_nonzero_indices_with_count.py: the nonzero indices,
    padding (-1, the kernel module's PADDING_VALUE) and the count in the last slot."""
    row = input_tensor.numpy()[0]
    found = np.nonzero(row)[0]
    out = np.full((1, row.size + 1), -1, dtype=np.int32)
    out[0, :found.size] = found
    out[0, -1] = found.size
    return out


def _sparse_row(tokens: int, fraction: float) -> Callable[..., dict]:
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:  # sparse_nonzero_tensor_generator(seed=0), [0, 1)
        rng = np.random.default_rng(0)
        row = np.zeros(tokens, np.float32)
        count = int(tokens * fraction)
        if count:
            row[rng.choice(tokens, size=count, replace=False)] = rng.uniform(0.0, 1.0, size=count).astype(np.float32)
        return {"input_tensor": row.reshape(1, tokens)}
    return make


CASES = [
    # cumsum: FAST_TEST_PARAMS; atol 1e-3 (hidden <= 5000), rtol 1e-2 for bf16 else 1e-3.
    Case("cumsum-1x256-f32", *CUMSUM, _randn(42, "x", (1, 256), np.float32), "cumsum/test_cumsum.py",
         rtol=1e-3, atol=1e-3),
    Case("cumsum-64x4x1024-bf16", *CUMSUM, _randn(42, "x", (64, 4, 1024), ml_dtypes.bfloat16),
         "cumsum/test_cumsum.py", rtol=1e-2, atol=1e-3),
    Case("cumsum-128x2048-f32", *CUMSUM, _randn(42, "x", (128, 2048), np.float32), "cumsum/test_cumsum.py",
         rtol=1e-3, atol=1e-3),
    # cascaded_max: cascaded_max_unit_perms (lnc, batch, seqlen, vocab); rtol = atol = 1e-5.
    Case("cascaded_max-lnc1-1x1x3168", *CASCADED_MAX, _randn(42, "input_tensor", (1, 1, 3168), np.float32),
         "max/test_cascaded_max.py", lnc=1, rtol=1e-5, atol=1e-5),
    Case("cascaded_max-lnc2-1x1x256", *CASCADED_MAX, _randn(42, "input_tensor", (1, 1, 256), np.float32),
         "max/test_cascaded_max.py", rtol=1e-5, atol=1e-5),
    Case("cascaded_max-lnc2-5x5x4058", *CASCADED_MAX, _randn(42, "input_tensor", (5, 5, 4058), np.float32),
         "max/test_cascaded_max.py", rtol=1e-5, atol=1e-5),
    # RoPE: the smallest test_rope_fast shapes; rtol = bf16 eps (2^-7), atol 1e-3.
    Case("rope-d64-b1-h1-s16", *ROPE, _rope(64, 1, 1, 16, True, False), "embeddings/test_rope.py",
         rtol=2**-7, atol=1e-3),
    Case("rope-d128-b8-h8-s128", *ROPE, _rope(128, 8, 8, 128, False, True), "embeddings/test_rope.py",
         rtol=2**-7, atol=1e-3),
    # find_nonzero_indices: FULL_TEST_PARAMS' smallest rows, LNC=2, exact (atol = rtol = 0).
    Case("find_nonzero_indices-4096x128-int32", *NONZERO, _sparse_routing(4096, 128, 8, np.int32),
         "subkernels/test_find_nonzero_indices.py", rtol=0.0, atol=0.0),
    Case("find_nonzero_indices-4096x128-f32", *NONZERO, _sparse_routing(4096, 128, 8, np.float32),
         "subkernels/test_find_nonzero_indices.py", rtol=0.0, atol=0.0),
    # output_projection_tkg: OUTPUT_PROJ_TKG_TEST_CASES (B, heads, S, d_head, H, bias, transpose_out), no
    # quantization: rtol 2e-2, atol 1e-5.
    Case("output_projection_tkg-4x8x4x32-3072-T", *OUT_PROJ, _output_projection(4, 8, 4, 32, 3072, True, True),
         "output_projection/test_output_proj_tkg.py", rtol=2e-2, atol=1e-5),
    Case("output_projection_tkg-4x8x4x64-3072", *OUT_PROJ, _output_projection(4, 8, 4, 64, 3072, False, False),
         "output_projection/test_output_proj_tkg.py", rtol=2e-2, atol=1e-5),
    # find_nonzero_indices_with_count (experimental): find_nonzero_indices_perms (T, fraction nonzero), exact.
    Case("find_nonzero_indices_with_count-32-5/32", NONZERO_WITH_COUNT, lambda resolve: _nonzero_with_count_golden,
         _sparse_row(32, 5 / 32), "../experimental/benchmark/test_find_nonzero_indices_with_count.py",
         rtol=0.0, atol=0.0),
    Case("find_nonzero_indices_with_count-2048-1/32", NONZERO_WITH_COUNT, lambda resolve: _nonzero_with_count_golden,
         _sparse_row(2048, 1 / 32), "../experimental/benchmark/test_find_nonzero_indices_with_count.py",
         rtol=0.0, atol=0.0),
    # dynamic_elementwise_add (experimental, dynamic_range over a register): fast shapes; atol 1e-3, rtol 1e-2.
    Case("dynamic_elementwise_add-128x512", "experimental.dynamic_shapes:dynamic_elementwise_add",
         _elementwise_add_reference, _elementwise_add(128, 512),
         "../experimental/dynamic_shapes/test_dynamic_elementwise_add.py", rtol=1e-2, atol=1e-3),
    Case("dynamic_elementwise_add-1024x2048", "experimental.dynamic_shapes:dynamic_elementwise_add",
         _elementwise_add_reference, _elementwise_add(1024, 2048),
         "../experimental/dynamic_shapes/test_dynamic_elementwise_add.py", rtol=1e-2, atol=1e-3),
    # rmsnorm_tkg: RMSNORM_TKG_TEST_CASES (lnc, B, S, H, hidden_actual, hidden_dim_tp, shard_on_h), fp16; the
    # LNC=1-layout reference for LNC=1 or hidden_dim_tp; rtol 2e-2, atol 1e-5.
    Case("rmsnorm_tkg-lnc1-1x4x2048-1920", *RMSNORM_TKG_LNC1,
         _tkg_norm(1, 4, 2048, {"hidden_actual": 1920, "hidden_dim_tp": False, "shard_on_h": False}),
         "subkernels/test_rmsnorm_tkg.py", lnc=1, rtol=2e-2, atol=1e-5),
    Case("rmsnorm_tkg-lnc1-1x1x4096-3072-tp", *RMSNORM_TKG_LNC1,
         _tkg_norm(1, 1, 4096, {"hidden_actual": 3072, "hidden_dim_tp": True, "shard_on_h": False}),
         "subkernels/test_rmsnorm_tkg.py", lnc=1, rtol=2e-2, atol=1e-5),
    Case("rmsnorm_tkg-lnc2-2x8x3072-2880", *RMSNORM_TKG,
         _tkg_norm(2, 8, 3072, {"hidden_actual": 2880, "hidden_dim_tp": False, "shard_on_h": False}),
         "subkernels/test_rmsnorm_tkg.py", rtol=2e-2, atol=1e-5),
    Case("rmsnorm_tkg-lnc2-4x1x3072-shard_on_h", *RMSNORM_TKG,
         _tkg_norm(4, 1, 3072, {"hidden_actual": None, "hidden_dim_tp": False, "shard_on_h": True}),
         "subkernels/test_rmsnorm_tkg.py", rtol=2e-2, atol=1e-5),
    # layernorm_tkg: LAYERNORM_TKG_TEST_CASES (lnc, B, S, H, shard_on_h), fp16; rtol 2e-2, atol 1e-5.
    Case("layernorm_tkg-lnc1-1x1x8192", *LAYERNORM_TKG_LNC1, _tkg_norm(1, 1, 8192, {"shard_on_h": False}, beta=True),
         "subkernels/test_layernorm_tkg.py", lnc=1, rtol=2e-2, atol=1e-5),
    Case("layernorm_tkg-lnc2-1x1x5120", *LAYERNORM_TKG, _tkg_norm(1, 1, 5120, {"shard_on_h": False}, beta=True),
         "subkernels/test_layernorm_tkg.py", rtol=2e-2, atol=1e-5),
    Case("layernorm_tkg-lnc2-4x1x3072-shard_on_h", *LAYERNORM_TKG,
         _tkg_norm(4, 1, 3072, {"shard_on_h": True}, beta=True), "subkernels/test_layernorm_tkg.py",
         rtol=2e-2, atol=1e-5),
    # indexed_flatten: FAST_TEST_PARAMS (T, E, f_len) and ROW_OFFSET_TEST_PARAMS, LNC=2, exact.
    Case("indexed_flatten-4096x1-128", *INDEXED_FLATTEN, _indexed_flatten(4096, 1, 128),
         "subkernels/test_indexed_flatten.py", rtol=0.0, atol=0.0),
    Case("indexed_flatten-4096x3-128", *INDEXED_FLATTEN, _indexed_flatten(4096, 3, 128),
         "subkernels/test_indexed_flatten.py", rtol=0.0, atol=0.0),
    Case("indexed_flatten-4096x2-128-row_offsets_start", *INDEXED_FLATTEN, _indexed_flatten(4096, 2, 128, 4, 2),
         "subkernels/test_indexed_flatten.py", rtol=0.0, atol=0.0),
    # cross_partition_copy: the test's kernel around it, one case per code path (aligned, within a
    # quadrant, across quadrants, unaligned source over two quadrants), LNC=1, default tolerances.
    *[Case(f"cross_partition_copy-{src}-{dst}-{count}-{total}", _cross_partition_copy_kernel,
           _cross_partition_copy_reference, _cross_partition_copy(src, dst, count, 8, total),
           "utils/test_cross_partition_copy.py", lnc=1, library="core.utils.cross_partition_copy")
      for src, dst, count, total in ((0, 0, 32, 128), (0, 5, 10, 128), (0, 28, 20, 128), (25, 5, 20, 64),
                                     (10, 55, 30, 96))],
    # tp_broadcast: the test's kernel around it, LNC=1, exact.
    *[Case(f"tp_broadcast-{'x'.join(map(str, shape))}-{offset}-{count}", _tp_broadcast_kernel,
           _tp_broadcast_reference, _tp_broadcast(shape, offset, count, select), "utils/test_tp_broadcast.py",
           lnc=1, rtol=0.0, atol=0.0, library="core.utils.tp_broadcast")
      for shape, offset, count, select in (((5, 7), 0, 1, None), ((3, 8, 11), 1, 2, 4), ((13, 3, 13), 9, 12, 2))],
    # rope_hf: ROPE_HF_TEST_CASES' first rows (B, q heads, kv heads, S, d_head), cos/sin format, LNC 1 and 2;
    # rtol = atol = 1e-6 against the reference in the inputs' precision.
    Case("rope_hf-f32-lnc1-1x32x8x256x128", *ROPE_HF, _rope_hf(1, 32, 8, 256, 128, np.float32, False),
         "embeddings/test_rope_hf.py", lnc=1, rtol=1e-6, atol=1e-6, lower_precision=True),
    Case("rope_hf-f32-lnc2-backward", *ROPE_HF, _rope_hf(1, 32, 8, 256, 128, np.float32, True),
         "embeddings/test_rope_hf.py", rtol=1e-6, atol=1e-6, lower_precision=True),
    Case("rope_hf-bf16-lnc2-1x32x8x256x128", *ROPE_HF, _rope_hf(1, 32, 8, 256, 128, ml_dtypes.bfloat16, False),
         "embeddings/test_rope_hf.py", rtol=1e-6, atol=1e-6, lower_precision=True),
    # topk_reduce (experimental): TOPK_REDUCE_PARAMS' 8-rank rows (lnc, ranks, T, K, H); rtol = atol = 5e-2.
    Case("topk_reduce-lnc1-8r-4x4x2880", *TOPK_REDUCE, _topk_reduce(4, 4, 2880, 8),
         "../experimental/subkernels/test_topk_reduce.py", lnc=1, rtol=5e-2, atol=5e-2),
    Case("topk_reduce-lnc2-8r-4x4x2880", *TOPK_REDUCE, _topk_reduce(4, 4, 2880, 8),
         "../experimental/subkernels/test_topk_reduce.py", rtol=5e-2, atol=5e-2),
    # conv1d (experimental): CONV1D_BASIC_PARAMS' small rows; fp32 rtol = atol = 1e-5, bf16 5e-2.
    Case("conv1d-1x16x32x20-k3", *CONV1D, _conv1d(1, 16, 32, 20, 3, 1, (0, 0), 1, False, None, False, np.float32),
         "../experimental/conv/test_conv1d.py", rtol=1e-5, atol=1e-5),
    Case("conv1d-2x64x128x40-k5-s2-d2-gelu", *CONV1D,
         _conv1d(2, 64, 128, 40, 5, 2, (2, 2), 2, True, "GELU", False, np.float32),
         "../experimental/conv/test_conv1d.py", rtol=1e-5, atol=1e-5),
    Case("conv1d-1x16x32x20-k3-lnc_shard", *CONV1D,
         _conv1d(1, 16, 32, 20, 3, 1, (0, 0), 1, False, None, True, np.float32),
         "../experimental/conv/test_conv1d.py", rtol=1e-5, atol=1e-5),
    Case("conv1d-bf16-1x16x32x20-k3-silu", *CONV1D,
         _conv1d(1, 16, 32, 20, 3, 1, (0, 0), 1, True, "SiLU", False, ml_dtypes.bfloat16),
         "../experimental/conv/test_conv1d.py", rtol=5e-2, atol=5e-2),
    # depthwise_conv1d (experimental): fast_test_cases' small rows (C, W, K, stride, pad), bf16, LNC=2;
    # absolute and relative accuracy 1e-2.
    Case("depthwise_conv1d-16x512-k64", "experimental.conv.depthwise_conv1d:depthwise_conv1d_implicit_gemm",
         _depthwise_conv1d_reference, _depthwise_conv1d(16, 512, 64, 1, 0),
         "../experimental/conv/test_depthwise_conv1d.py",
         rtol=1e-2, atol=1e-2, round_to_inputs=True),
    Case("depthwise_conv1d-256x512-k64-s2-p5", "experimental.conv.depthwise_conv1d:depthwise_conv1d_implicit_gemm",
         _depthwise_conv1d_reference, _depthwise_conv1d(256, 512, 64, 2, 5),
         "../experimental/conv/test_depthwise_conv1d.py", rtol=1e-2, atol=1e-2, round_to_inputs=True),
    # cross entropy (experimental): the "minimal size" fast rows [B, T, V, PB, CS], bf16, LNC=2 (one
    # program has no positions); absolute and relative accuracy 1e-2.
    Case("cross_entropy_forward-1x1x32128", "experimental.loss:cross_entropy_forward",
         _cross_entropy_reference("cross_entropy_forward_torch_ref"), _cross_entropy(1, 32128, 1, 32128, False),
         "../experimental/loss/test_cross_entropy_forward.py", rtol=1e-2, atol=1e-2),
    Case("cross_entropy_backward-1x1x32128", "experimental.loss:cross_entropy_backward",
         _cross_entropy_reference("cross_entropy_backward_torch_ref"), _cross_entropy(1, 32128, 1, 16384, True),
         "../experimental/loss/test_cross_entropy_backward.py", rtol=1e-2, atol=1e-2),
    # gen_mask_tkg_hbm: flat_kv_test_perms (B, heads, S_ctx, S_active, lnc), exact.
    *[Case(f"gen_mask_tkg_hbm-lnc{lnc}-{batch}x{heads}x{s_ctx}x{s_active}",
           "core.attention.gen_mask_tkg:gen_mask_tkg_hbm",
           _gen_mask_reference(lnc), _gen_mask(batch, heads, s_ctx, s_active), "attention/test_gen_mask_tkg.py",
           lnc=lnc, rtol=0.0, atol=0.0)
      for batch, heads, s_ctx, s_active, lnc in ((4, 1, 256, 1, 1), (4, 1, 4096, 5, 2), (8, 8, 4096, 5, 2))],
    # attention_cte: attention_cte_no_cp_unit_perms' small rows (B, S_kv, S_q, d, dtype, causal), Q not
    # transposed, output transposed, LNC=2; relative accuracy 2e-2, absolute 1e-5.
    Case("attention_cte-bf16-1x128x128x128-causal", "core.attention.attention_cte:attention_cte",
         _attention_cte_reference, _attention_cte(1, 128, 128, 128, ml_dtypes.bfloat16, True),
         "attention/test_attention_cte.py", rtol=2e-2, atol=1e-5, round_to_inputs=True),
    Case("attention_cte-f16-3x1024x512x128", "core.attention.attention_cte:attention_cte",
         _attention_cte_reference, _attention_cte(3, 1024, 512, 128, np.float16, False),
         "attention/test_attention_cte.py", rtol=2e-2, atol=1e-5, round_to_inputs=True),
    # attention_bwd: sequence_packing_test_cases' fast sliding-window row (1 head, d 128, bf16, causal,
    # sequences [256, 256], window 128), LNC=1 (one KV head); rtol 2e-2, atol 1e-5.
    Case("attention_bwd-packed-256+256-window128", "core.attention.attention_bwd:attention_bwd",
         "core.attention.attention_bwd_torch:attention_bwd_torch_ref", _attention_bwd([256, 256], 128),
         "attention/test_attention_bwd.py", lnc=1, rtol=2e-2, atol=1e-5),
    # rmsnorm_quant: rmsnorm_quant_lnc_perms' short rows (S 2, quantize only or RMSNorm, row or static
    # quantization, lower bound), B 1, H 16384, bf16, LNC=2; values rtol 0.072, row scales 0.007 (maxAllClose).
    *[Case(f"rmsnorm_quant-{'quant_only' if only else 'rmsnorm'}-{'row' if row else 'static'}-bound{bound}",
           "core.rmsnorm.rmsnorm_quant:rmsnorm_quant_kernel", _rmsnorm_quant_reference,
           _rmsnorm_quant(2, only, row, bound), "rmsnorm/test_rmsnorm_quant.py", rtol=0.072,
           decode=_rmsnorm_quant_decode, rtols=(0.072, 0.007))
      for only, row, bound in ((True, True, 0.0), (False, True, 0.0), (False, True, 0.5), (False, False, 0.0))],
    # attention_tkg: the smallest attention_tkg_fast_configs row (bs 4, 2 q heads, 7 active, S_prior 256
    # of 16384, d_head 128, K prior transposed, position ids, fused RoPE), bf16, LNC 1 and 2;
    # rtol 1e-2, atol 1e-5 against the reference rounded to bf16.
    *[Case(f"attention_tkg-lnc{lnc}-4x2x7x256", _attention_tkg_kernel, _attention_tkg_reference(lnc),
           _attention_tkg((4, 2, 7, 256, 16384, 128)), "attention/test_attention_tkg.py", lnc=lnc, rtol=1e-2,
           atol=1e-5, round_to_inputs=True, library="core.attention.attention_tkg") for lnc in (1, 2)],
    # qkv (CTE): qkv_cte_kernel_accuracy_test_perms' rows (LNC 1, B 1, S, H, fused QKV dim), bf16, fused
    # residual add and RMSNorm; relative accuracy 2e-2, absolute 1e-5.
    *[Case(f"qkv_cte-{seq}x{hidden}x{fused}", "core.qkv.qkv:qkv", _qkv_cte_reference, _qkv_cte(seq, hidden, fused),
           "qkv/test_qkv_cte.py", lnc=1, rtol=2e-2, atol=1e-5, round_to_inputs=True)
      for seq, hidden, fused in ((128, 512, 512), (127, 512, 512))],
]


#: nki-library's kernels that are not in the suite: module under nkilib_src.nkilib -> (whether its
#: API is NKI 0.3.0, why it does not run here). With the suite's modules these cover every module
#: of the library that defines an ``@nki.jit`` kernel (``test_every_library_kernel_is_accounted_for``).
_NEURON_DTYPES = "imports `neuron_dtypes` (Neuron SDK)"
_SEVERAL_RANKS = (True, "a collective across several ranks; the emulator runs one")
NOT_RUN: dict[str, tuple[bool, str]] = {
    "core.router_topk": (False, "imports `neuronxcc.nki.typing` (the NKI 0.1.0 namespace)"),
    "core.moe_block.moe_block_tkg": (False, "imports `neuronxcc` (the compiler's private modules)"),
    "core.utils.mx_torch_common": (False, "its test (test_quantize_to_mx.py) imports `neuronxcc.nki.typing`; "
                                          f"the module {_NEURON_DTYPES}"),
    "core.mlp": (True, "the vendored `core/mlp/mlp.py`, through which the MLP CTE/TKG tests call it, does not "
                       "parse (IndentationError, line 203); the MX projections' torch reference imports "
                       "`neuron_dtypes`"),
    "experimental.transformer.transformer_tkg": (True, "imports `core/mlp/mlp.py`, which does not parse"),
    "core.topk.rotational_topk": (True, "imports SciPy, not a dependency of nkimoe"),
    "core.moe.moe_cte": (True, f"its torch reference (`moe_cte_torch`) {_NEURON_DTYPES}"),
    "core.moe.moe_tkg": (True, f"its torch reference (`moe_tkg_torch`) {_NEURON_DTYPES}"),
    "core.output_projection.output_projection_cte": (True, f"its torch reference {_NEURON_DTYPES}"),
    "core.qkv.qkv_tkg": (True, "its TKG test's torch reference (`qkv_tkg_torch`) imports nki-library's test "
                               "harness (the CTE path of `core.qkv.qkv` is in the suite)"),
    "experimental.transformer.attention_block_tkg": (True, "its torch reference imports nki-library's test "
                                                           "harness"),
    "experimental.collectives.fg_allgather": _SEVERAL_RANKS,
    "experimental.collectives.fgcc": _SEVERAL_RANKS,
    "experimental.collectives.sb2sb_allgather": _SEVERAL_RANKS,
    "experimental.moe.bwd": (True, "its golden (`test_bwmm_bwd_common`) imports SciPy"),
    "core.subkernels.rmsnorm_mx_quantize_tkg": (True, "not yet in the suite: its golden is the harness's "
                                                      "`quantize_mx_golden` (test/utils/mx_utils.py), not "
                                                      "restated yet"),
    "experimental.mxfp_subkernels": (True, "not yet in the suite: a Trn3 test whose golden is the harness's "
                                           "`quantize_mx_golden`, not restated yet"),
    "experimental.moe.forward.bwmm_shard_on_H": (True, "not yet in the suite: its golden (the test file's "
                                                       "`generate_numpy_golden`) is not restated yet"),
}

PASSES = "passes on trn2 and trn3"


def conformance_table() -> str:
    """README's conformance table: each nki-library kernel module, its cases and its status."""
    counts: dict[str, int] = {}
    for case in CASES:
        counts[case.module] = counts.get(case.module, 0) + 1
    rows = [(module, str(n), PASSES) for module, n in sorted(counts.items())]
    rows += [(module, "0", reason if api else f"not NKI 0.3.0: {reason}")
             for module, (api, reason) in sorted(NOT_RUN.items())]
    older = sum(not api for api, _ in NOT_RUN.values())
    lines = [f"{len(counts)} of {len(counts) + len(NOT_RUN) - older} nki-library kernel modules whose API is "
             f"NKI 0.3.0 pass ({len(CASES)} cases, each on trn2 and trn3); {older} more use an older NKI.", "",
             "| nki-library kernel module | cases | status |", "|---|---|---|"]
    lines += [f"| `{module}` | {n} | {status} |" for module, n, status in rows]
    return "\n".join(lines)


@pytest.fixture(scope="module")
def nkilib() -> Iterator[str]:
    """nki-library importable, with ``import nki`` resolving to the emulator (undone afterwards)."""
    before = {name: module for name, module in sys.modules.items() if name == "nki" or name.startswith("nki.")}
    sys.path.insert(0, str(LIBRARY / "src"))
    install_as_nki()
    try:
        yield "nkilib_src.nkilib"
    finally:
        sys.path.remove(str(LIBRARY / "src"))
        for name in [n for n in sys.modules if n == "nki" or n.startswith("nki.") or n.startswith("nkilib_src")]:
            del sys.modules[name]
        sys.modules.update(before)


def _resolve(package: str, spec: str) -> Any:
    module, attribute = spec.split(":")
    return getattr(importlib.import_module(f"{package}.{module}"), attribute)


def _as_torch(value: Any, lower_precision: bool) -> Any:
    """As nki-library's ``torch_ref_wrapper``: low-precision floats reach the reference as fp32
    (bf16 stays bf16 under ``lower_precision``), uint32 as int32."""
    if not isinstance(value, np.ndarray):
        return value
    if lower_precision and value.dtype == ml_dtypes.bfloat16:
        return torch.from_numpy(value.astype(np.float32)).to(torch.bfloat16)
    if str(value.dtype).startswith(("bfloat16", "float8", "float16")):
        value = value.astype(np.float32)
    if value.dtype == np.uint32:
        value = value.astype(np.int32)
    return torch.from_numpy(value)


def _golden(case: Case, reference: Callable[..., Any], inputs: dict[str, Any]) -> list[np.ndarray]:
    """The reference's outputs as fp32 arrays, as nki-library's ``torch_ref_wrapper`` returns them."""
    expected = reference(**{k: _as_torch(v, case.lower_precision) for k, v in inputs.items()})
    expected = list(expected.values()) if isinstance(expected, dict) else list(expected) \
        if isinstance(expected, (tuple, list)) else [expected]
    expected = [e.float().numpy() if isinstance(e, torch.Tensor) else np.asarray(e, dtype=np.float32)
                for e in expected]
    low = [v.dtype for v in inputs.values() if isinstance(v, np.ndarray)
           and str(v.dtype).startswith(("bfloat16", "float8", "float16"))]
    if (case.lower_precision or case.round_to_inputs) and low:
        expected = [e.astype(low[0]).astype(np.float32) for e in expected]
    return expected


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nkilib_kernel_matches_its_reference(nkilib: str, case: Case, target: str) -> None:
    resolve = lambda spec: _resolve(nkilib, spec)  # noqa: E731
    kernel = case.kernel(resolve) if callable(case.kernel) else resolve(case.kernel)
    reference = case.reference(resolve) if callable(case.reference) else resolve(case.reference)
    inputs = case.inputs(resolve)
    # The reference first: a kernel writes the output it is passed (``must_alias_input``) in place.
    expected = _golden(case, reference, inputs)
    with session(target, nki_version="0.3.0"):
        actual = simulate(kernel)[case.lnc](**inputs)  # as the harness's nki.cpu_simulate(kernel)[lnc]
    actual = list(actual) if isinstance(actual, (tuple, list)) else [actual]
    if case.decode is not None:
        actual = case.decode([np.asarray(a) for a in actual], inputs)
    assert len(actual) == len(expected), f"{case.id}: {len(actual)} outputs, reference has {len(expected)}"
    for a, e, rtol in zip(actual, expected, case.rtols or [case.rtol] * len(expected)):
        a = np.asarray(a).astype(np.float32).reshape(e.shape)
        bound = case.atol + rtol * float(np.abs(e).max(initial=0.0))
        worst = float(np.abs(a - e).max(initial=0.0))
        assert worst <= bound, f"{case.id} on {target}: max |diff| {worst} over {bound} ({case.source})"


README = Path(__file__).resolve().parents[2] / "README.md"
TABLE_START, TABLE_END = "<!-- nkilib-conformance-table -->", "<!-- /nkilib-conformance-table -->"


def test_readme_shows_the_suites_table() -> None:
    """README's table is generated from CASES and NOT_RUN (``python -m tests.nki.test_nkilib_conformance``)."""
    text = README.read_text()
    assert TABLE_START in text and TABLE_END in text, "README lacks the nki-library conformance table markers"
    shown = text.split(TABLE_START, 1)[1].split(TABLE_END, 1)[0].strip()
    assert shown == conformance_table(), "README's nki-library table is stale: regenerate it with " \
                                         "python -m tests.nki.test_nkilib_conformance"


def test_every_library_kernel_is_accounted_for() -> None:
    """Each module of the vendored library that defines an ``@nki.jit`` kernel is in the suite or in
    NOT_RUN, and each case names a test file of the library."""
    root = LIBRARY / "src" / "nkilib_src" / "nkilib"
    jitted = {".".join(path.relative_to(root).with_suffix("").parts) for path in root.rglob("*.py")
              if "\n@nki.jit" in path.read_text()}
    rows = {case.module for case in CASES} | set(NOT_RUN)
    missing = {m for m in jitted if not any(m == r or m.startswith(r + ".") for r in rows)}
    assert not missing, f"nki-library kernels neither in the suite nor in NOT_RUN: {sorted(missing)}"
    assert not {case.module for case in CASES} & set(NOT_RUN)
    for case in CASES:
        assert (LIBRARY / TESTS / case.source).is_file(), f"{case.id}: no test file {case.source}"


if __name__ == "__main__":
    print(conformance_table())
