"""The contest path through the real NxDI and NxD sources on CPU, for SDK 2.27, 2.28 and 2.29.

Each SDK release runs in one subprocess of the NxDI interpreter (torch 2.9, torch-xla 2.9,
transformers 4.57: the ``[nxdi]`` extra, ``.venv-nxdi`` or ``NKIMOE_NXDI_PYTHON``), which imports
the vendored contest harness ``nki-moe/main.py`` and builds every model through its
``parse_args()`` defaults and ``prepare_inference()`` (plus ``--on-cpu``, TP 1, fp32; ``to_cpu()``
for ``load()``): NxDI's own Qwen3-MoE, the root ``qwen.py`` and the file ``nkimoe submit`` writes,
each on cpu references and on emulated trn2 and trn3 kernels. Greedy tokens must equal HF
transformers' and logits must lie within the harness's ``tol_map`` of NxDI's own model. Per
release also: one full-width layer, bf16 at TP 1, TP 2 over torchrun, and ``shard_checkpoint()``
at the harness defaults.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

from nkimoe.bench.cache import BenchCache
from nkimoe.neuron import Kernels, attention_block_binding
from nkimoe.offhw import runner
from nkimoe.offhw.checks import SEQ_LEN
from nkimoe.offhw.environment import SDK_VERSIONS, vendor_root
from nkimoe.plugins import load_registry
from nkimoe.registry import CHAIN
from nkimoe.submit import build_bundle, verify_through_nxdi

ROOT = Path(__file__).resolve().parents[1]
TARGETS = ("cpu", "trn2", "trn3")


@pytest.fixture(scope="session")
def nxdi_python() -> Path:
    vendor = vendor_root(ROOT)
    if not (vendor / "nki-moe" / "main.py").exists():
        pytest.skip(f"the vendored upstream sources are absent ({vendor})")
    python = runner.nxdi_python(ROOT)
    if python is None:
        message = ("no NxDI environment: create .venv-nxdi with `pip install -e .[nxdi]` (see README) or set "
                   "NKIMOE_NXDI_PYTHON")
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    return python


@pytest.fixture(scope="session")
def checkpoints(nxdi_python: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return runner.write_checkpoints(nxdi_python, tmp_path_factory.mktemp("nxdi-checkpoints"))


@pytest.fixture(scope="session")
def bundle_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The file ``nkimoe submit`` writes (its verification is tests/test_submit.py's subject)."""
    targets = ["trn2", "trn3"]
    text = build_bundle(load_registry({}), BenchCache.load(targets=targets), targets, (ROOT / "qwen.py").read_text())
    path = tmp_path_factory.mktemp("dist") / "qwen_with_nki.py"
    path.write_text(text)
    return path


@pytest.fixture(scope="module", params=SDK_VERSIONS)
def tiny(request: pytest.FixtureRequest, nxdi_python: Path, checkpoints: dict[str, Path], bundle_file: Path,
         tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One subprocess per SDK release: the tiny checkpoint through every model and target."""
    return runner.run_checks(nxdi_python, request.param, checkpoints["tiny"], [ROOT / "qwen.py", bundle_file],
                             TARGETS, tmp_path_factory.mktemp("work"), vendor_root(ROOT))


@pytest.fixture(scope="module", params=SDK_VERSIONS)
def full_width(request: pytest.FixtureRequest, nxdi_python: Path, checkpoints: dict[str, Path],
               tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full-width layer (hidden 2048, 128 experts, top-8) through qwen.py, per SDK release."""
    return runner.run_checks(nxdi_python, request.param, checkpoints["full"], [ROOT / "qwen.py"], TARGETS,
                             tmp_path_factory.mktemp("work"), vendor_root(ROOT))


@pytest.fixture(scope="module", params=SDK_VERSIONS)
def tiny_bf16(request: pytest.FixtureRequest, nxdi_python: Path, checkpoints: dict[str, Path],
              tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The tiny checkpoint at the harness's own dtype, bf16, at TP 1 (NxDI's ``to_cpu()`` refuses bf16
    over more than one rank: the gloo backend has no bf16), per SDK release."""
    return runner.run_checks(nxdi_python, request.param, checkpoints["tiny"], [ROOT / "qwen.py"], ("cpu", "trn3"),
                             tmp_path_factory.mktemp("work"), vendor_root(ROOT), harness_args=("--torch-dtype=bfloat16",))


@pytest.fixture(scope="module", params=SDK_VERSIONS)
def sharded(request: pytest.FixtureRequest, nxdi_python: Path, checkpoints: dict[str, Path],
            tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """shard_checkpoint() of the full-width layer at the harness defaults, per SDK release."""
    return runner.run_shard_check(nxdi_python, request.param, checkpoints["full"], ROOT / "qwen.py", ("cpu", "trn3"),
                                  tmp_path_factory.mktemp("work"), vendor_root(ROOT))


def test_shard_checkpoint_at_harness_defaults(sharded: dict[str, Any]) -> None:
    """TP 4, bf16, the model built on the meta device first (as load() does): every rank holds its
    slice of every expert (intermediate 128 / 4 = 32 columns) and the whole router gate, in the
    layouts of the variants bound on each target (identity for the references on cpu), and on trn3
    its heads' q|k|v rows and W_o columns in the fused attention block's layout."""
    assert set(sharded["targets"]) == {"cpu", "trn3"}
    for target, entry in sharded["targets"].items():
        assert (entry["tp"], entry["dtype"], len(entry["ranks"])) == (4, "torch.bfloat16", 4)
        for shards in entry["ranks"]:
            layout = shards["layers.0.mlp.experts.down_proj"]["layout"]
            reference_shape = (128, 2048, 32)
            assert shards["layers.0.mlp.experts.down_proj"]["shape"] == [reference_shape[a] for a in layout]
            if target == "cpu":
                assert layout == [0, 1, 2]
            # trn3 stores the fused attention block's q|k|v and W_o per rank; cpu keeps NxDI's attention only
            blocks = {name for name in shards if ".self_attn.block." in name}
            assert blocks == (set() if target == "cpu" else {"layers.0.self_attn.block.qkv", "layers.0.self_attn.block.o"})
    assert runner.shard_differences(sharded) == []


def test_every_model_generates_hf_tokens_and_nxdi_logits(tiny: dict[str, Any]) -> None:
    expected = {"nxdi", "hf"} | {f"{name}:{t}" for name in ("qwen.py", "qwen_with_nki.py") for t in TARGETS}
    assert set(tiny["runs"]) == expected
    assert runner.differences(tiny) == []


def test_kernels_launch_on_the_configs_logical_cores(tiny: dict[str, Any]) -> None:
    """The harness's platform (trn2) gives NxDI's ``logical_nc_config`` 2 (``get_platform_lnc``), and
    every kernel of nkimoe's models is launched with that grid."""
    grids = {label: run["lnc"] for label, run in tiny["runs"].items() if label.startswith("qwen")}
    assert len(grids) == 6 and set(grids.values()) == {2}


def test_bf16_at_tp_1(tiny_bf16: dict[str, Any]) -> None:
    """bf16: every model gives HF transformers' (bf16) tokens, and nkimoe's logits lie within the
    harness's tol_map of NxDI's own bf16 model, errors taken relative to each step's largest logit.
    (Per logit, bf16 rounding alone puts NxDI's own model off HF's by more than atol 1e-5 +
    rtol |logit| on logits near zero, so that reading of the closed ``logit_validation`` cannot hold here.)"""
    assert set(tiny_bf16["runs"]) == {"nxdi", "hf", "qwen.py:cpu", "qwen.py:trn3"}
    assert runner.differences(tiny_bf16, relative_to="step") == []


def test_tokens_are_not_degenerate(tiny: dict[str, Any]) -> None:
    """The comparison means something: the random model does not repeat one token."""
    assert len(set(tiny["runs"]["hf"]["tokens"])) > 2


def test_release_gaps_found_by_feature(tiny: dict[str, Any]) -> None:
    """2.27 and 2.28 lack two pieces of their own CPU generation path (NxDI's model fails without
    them too); 2.29 has both, so nothing is filled in there."""
    if tiny["sdk"] == "2.29":
        assert tiny["filled_in"] == []
    else:
        assert len(tiny["filled_in"]) == 2


def _attention_ops(run: dict[str, Any]) -> set[str]:
    """The attention ops a run bound to a variant (problems are named ``op[dims] dtype``; a composite
    bound to its chain runs its parts instead)."""
    return {problem.partition("[")[0] for problem, name in run["bound"].items()
            if problem.startswith("attention") and not name.startswith(CHAIN)}


def test_full_width_layer(full_width: dict[str, Any]) -> None:
    assert runner.differences(full_width) == []
    # Decode ran the fused attention block on trn3 (NxDI's own attention, whose token-generation
    # seam binds attention_decode, never ran a decode step), and on trn2 wherever the binder puts it:
    # in fp32 at TP 1 the block's SBUF working set fits Trn3's SBUF, not Trn2's.
    runs = full_width["runs"]
    assert _attention_ops(runs["qwen.py:trn3"]) == {"attention_block", "attention_prefill"}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NKIMOE_TARGET", "trn2")
        block = attention_block_binding(Kernels(), torch.float32, 2048, 32, 4, 128, SEQ_LEN, 1)
    assert _attention_ops(runs["qwen.py:trn2"]) == {"attention_block" if block else "attention_decode", "attention_prefill"}
    assert _attention_ops(runs["qwen.py:cpu"]) == {"attention_decode", "attention_prefill"}


def test_full_width_tensor_parallel_2_runs_the_attention_block(nxdi_python: Path, checkpoints: dict[str, Path],
                                                               full_width: dict[str, Any],
                                                               tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two ranks at full width, each running its half of the heads through the fused attention block
    on weights NxD sharded (fp32): the tokens and logits are those of TP 1 on trn3, within the
    harness's tolerances (only the order of the partial sums differs)."""
    tp2 = runner.run_tensor_parallel(nxdi_python, full_width["sdk"], checkpoints["full"], ROOT / "qwen.py", "trn3",
                                     tmp_path_factory.mktemp("work"), vendor=vendor_root(ROOT))
    one, two = full_width["runs"]["qwen.py:trn3"], tp2["runs"]["qwen.py:trn3"]
    assert any(problem.startswith("attention_block[H=2048,Hq=16,Hkv=2") for problem in two["bound"])
    assert _attention_ops(two) == {"attention_block", "attention_prefill"}
    assert two["tokens"] == one["tokens"]
    assert runner.within_tol_map(two["logits"], one["logits"], full_width["tol_map"]) == []


def test_tol_map_is_the_harness_one(tiny: dict[str, Any]) -> None:
    assert [k for k, _ in tiny["tol_map"]] == [None, 1000, 50, 5]


def test_within_tol_map_catches_a_deviation() -> None:
    expected = [[1.0, 2.0, 3.0, float("-inf")]]
    assert runner.within_tol_map([[1.0, 2.0, 3.0, float("-inf")]], expected, [(None, (1e-5, 0.05))]) == []
    assert runner.within_tol_map([[1.0, 2.0, 3.5, float("-inf")]], expected, [(None, (1e-5, 0.05))]) != []
    assert runner.within_tol_map([[1.5, 2.0, 3.0, float("-inf")]], expected, [(1, (1e-5, 0.05))]) == []
    assert runner.within_tol_map([[1.0, 2.0, 3.0, 0.0]], expected, [(None, (1e-5, 0.05))]) == []  # -inf: left out
    assert runner.within_tol_map([[1.0, 2.0, 3.0, 0.0]], [[1.0, 2.0, 3.0, 0.1]], [(None, (1e-5, 0.05))]) != []
    # Relative to the step's largest |logit| (3): 1.1 is within 0.05 * 3 of 1, 1.2 is not.
    assert runner.within_tol_map([[1.1, 2.0, 3.0, float("-inf")]], expected, [(None, (1e-5, 0.05))], "step") == []
    assert runner.within_tol_map([[1.2, 2.0, 3.0, float("-inf")]], expected, [(None, (1e-5, 0.05))], "step") != []
    assert runner.within_tol_map([[1.1, 2.0, 3.0, float("-inf")]], expected, [(None, (1e-5, 0.05))]) != []


def test_tensor_parallel_2_over_torchrun_matches_tp_1(nxdi_python: Path, checkpoints: dict[str, Path],
                                                     tiny: dict[str, Any],
                                                     tmp_path_factory: pytest.TempPathFactory) -> None:
    """Two ranks (gloo) split heads and the expert intermediate axis and all-reduce their partial sums:
    the tokens are TP 1's, the logits within the harness's tolerances of TP 1's (fp32; only the
    order of the partial sums differs). Per SDK release, against its TP 1 run of qwen.py on trn3."""
    tp2 = runner.run_tensor_parallel(nxdi_python, tiny["sdk"], checkpoints["tiny"], ROOT / "qwen.py", "trn3",
                                     tmp_path_factory.mktemp("work"), vendor=vendor_root(ROOT))
    one, two = tiny["runs"]["qwen.py:trn3"], tp2["runs"]["qwen.py:trn3"]
    assert two["tokens"] == one["tokens"]
    assert runner.within_tol_map(two["logits"], one["logits"], tiny["tol_map"]) == []


def test_submit_check_through_nxdi(nxdi_python: Path, bundle_file: Path) -> None:
    """The check ``nkimoe submit`` runs before writing where the NxDI environment exists."""
    messages: list[str] = []
    verify_through_nxdi(bundle_file, ["trn3"], ROOT, ("2.29",), messages.append)
    assert messages == ["checking the bundle through NxDI 2.29 on CPU ..."]
