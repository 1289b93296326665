"""Conformance: AWS's nki-library kernels run unchanged in the emulator.

The vendored nki-library (``../shared/vendor/nki-library``) is imported as it is, with ``import
nki`` resolving to the emulator (``aliases.install_as_nki``). Each case runs one kernel at the
smallest shapes its own test file lists, with that test's LNC degree (nki-library's
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

from nkimoe.nki.emulator import session
from nkimoe.nki.emulator.aliases import install_as_nki

LIBRARY = Path(__file__).resolve().parents[2] / ".." / "shared" / "vendor" / "nki-library"
TESTS = "test/integration/nkilib/core"

pytestmark = pytest.mark.skipif(not (LIBRARY / "src").is_dir(), reason=f"vendored nki-library absent at {LIBRARY}")


@dataclass(frozen=True)
class Case:
    """One kernel call of nki-library's tests."""

    id: str
    kernel: str  #: "module:attribute" under nkilib_src.nkilib
    #: The torch reference the test validates against ("module:attribute"), or a function of the
    #: resolver giving the golden the test file defines itself (restated here).
    reference: str | Callable[[Callable[[str], Any]], Callable[..., Any]]
    #: The kernel's arguments (NumPy tensors and options), given a resolver of "module:attribute" names.
    inputs: Callable[[Callable[[str], Any]], dict[str, Any]]
    source: str  #: the nki-library test file the shapes and tolerances come from
    lnc: int = 2
    rtol: float = 1e-5
    atol: float = 1e-8


def _randn(seed: int, name: str, shape: tuple[int, ...], dtype: Any) -> Callable[[Callable[[str], Any]], dict]:
    """``np.random.seed(seed); np.random.randn(*shape)``, as the cumsum and cascaded_max tests draw."""
    def make(resolve: Callable[[str], Any]) -> dict[str, Any]:
        np.random.seed(seed)
        return {name: np.random.randn(*shape).astype(dtype)}
    return make


def _gaussian(seed: int = 0, std: float = 1.0) -> Callable[[tuple[int, ...]], np.ndarray]:
    """nki-library's ``gaussian_tensor_generator``: successive ``rng.normal`` draws of one generator, bf16."""
    rng = np.random.default_rng(seed)
    return lambda shape: (rng.normal(size=shape) * std).astype(ml_dtypes.bfloat16)


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


CUMSUM = ("core.cumsum:cumsum", "core.cumsum.cumsum_torch:cumsum_torch_ref")
CASCADED_MAX = ("core.max.cascaded_max:cascaded_max", "core.max.cascaded_max_torch:cascaded_max_torch_ref")
ROPE = ("core.embeddings.rope:RoPE", "core.embeddings.rope_torch:rope_torch_ref")
NONZERO = ("core.subkernels.find_nonzero_indices:find_nonzero_indices",
           "core.subkernels.find_nonzero_indices_torch:find_nonzero_indices_torch_ref")
NONZERO_WITH_COUNT = "experimental.benchmark.find_nonzero_indices_with_count:find_nonzero_indices_with_count"
OUT_PROJ = ("core.output_projection.output_projection_tkg:output_projection_tkg",
            "core.output_projection.output_projection_tkg_torch:output_projection_tkg_torch_ref")

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
]


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


def _as_torch(value: Any) -> Any:
    """As nki-library's ``torch_ref_wrapper``: low-precision floats reach the reference as fp32."""
    if not isinstance(value, np.ndarray):
        return value
    if value.dtype == ml_dtypes.bfloat16 or value.dtype == np.float16:
        value = value.astype(np.float32)
    return torch.from_numpy(value)


@pytest.mark.parametrize("target", ["trn2", "trn3"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_nkilib_kernel_matches_its_reference(nkilib: str, case: Case, target: str) -> None:
    kernel = _resolve(nkilib, case.kernel)
    resolve = lambda spec: _resolve(nkilib, spec)  # noqa: E731
    reference = case.reference(resolve) if callable(case.reference) else resolve(case.reference)
    inputs = case.inputs(resolve)
    with session(target, nki_version="0.3.0"):
        actual = (kernel[case.lnc] if case.lnc > 1 else kernel)(**inputs)
    expected = reference(**{k: _as_torch(v) for k, v in inputs.items()})
    expected = list(expected.values()) if isinstance(expected, dict) else [expected]
    actual = list(actual) if isinstance(actual, (tuple, list)) else [actual]
    assert len(actual) == len(expected), f"{case.id}: {len(actual)} outputs, reference has {len(expected)}"
    for a, e in zip(actual, expected):
        a = np.asarray(a).astype(np.float32)
        e = e.float().numpy() if isinstance(e, torch.Tensor) else np.asarray(e, dtype=np.float32)
        a = a.reshape(e.shape)
        bound = case.atol + case.rtol * float(np.abs(e).max(initial=0.0))
        worst = float(np.abs(a - e).max(initial=0.0))
        assert worst <= bound, f"{case.id} on {target}: max |diff| {worst} over {bound} ({case.source})"
