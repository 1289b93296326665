"""Every bad input a user can give is one line naming the input and what is valid, exit status 2;
nothing is left behind by a command that fails."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest

from nkimoe import cli
from nkimoe.cli import main

QWEN_FIELDS = {"hidden_size": 2048, "num_attention_heads": 32, "num_key_value_heads": 4, "num_experts": 128,
               "num_experts_per_tok": 8, "moe_intermediate_size": 768, "vocab_size": 151936,
               "num_hidden_layers": 48, "max_position_embeddings": 40960}


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str], *expected: str) -> str:
    code = main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, (argv, err)
    assert err[0].startswith("nkimoe: error: ") and all(e in err[0] for e in expected), (err[0], expected)
    return err[0]


def _file(tmp_path: Path, name: str, content: str | bytes) -> str:
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return str(path)


CONFIGS = {
    "missing": (None, "not found; give the path of an HF config.json"),
    "not JSON": ("{hidden_size: 2048", "is not JSON (line 1"),
    "a JSON list": (json.dumps([QWEN_FIELDS]), "holds a JSON list, expected an object"),
    "missing a field": (json.dumps({k: v for k, v in QWEN_FIELDS.items() if k != "vocab_size"}),
                        "missing field 'vocab_size' (a Qwen3-MoE config.json has hidden_size"),
    "a zero dim": (json.dumps({**QWEN_FIELDS, "hidden_size": 0}), "hidden_size is 0, expected a positive integer"),
}
COMMANDS = {
    "select": ["bench", "select", "--target", "trn2"],
    "explain": ["registry", "explain", "rmsnorm", "--target", "trn2"],
    "coverage": ["coverage", "--target", "trn2"],
}


@pytest.mark.parametrize("command", sorted(COMMANDS))
@pytest.mark.parametrize("case", sorted(CONFIGS))
def test_bad_config(capsys, tmp_path: Path, command: str, case: str) -> None:  # noqa: ANN001
    content, message = CONFIGS[case]
    path = str(tmp_path / "config.json") if content is None else _file(tmp_path, "config.json", content)
    _one_line_error(capsys, [*COMMANDS[command], "--config", path], f"--config: config {path}", message)


RESULTS = {
    "missing": (None, "not found; expected CSV rows 'prompt,latency_ms,tok_s'"),
    "malformed": ("prompt,latency_ms,tok_s\n0,fast,50\n", "line 2: expected CSV rows"),
    "header only": ("prompt,latency_ms,tok_s\n", "has no result rows"),
    "binary": (b"\x89PNG\r\n\x1a\n\x00\x00\xff", "is not UTF-8 text"),
    "nan": ("0,nan,50\n", "must be positive finite numbers, got nan ms"),
}


@pytest.mark.parametrize("case", sorted(RESULTS))
def test_bad_results_file(capsys, tmp_path: Path, case: str) -> None:  # noqa: ANN001
    content, message = RESULTS[case]
    path = str(tmp_path / "r.csv") if content is None else _file(tmp_path, "r.csv", content)
    _one_line_error(capsys, ["score", "--target", "trn2", "--coverage", "0.5", "--results", path], message)


@pytest.mark.parametrize("latency, tok_s", [("nan", "50"), ("9000", "inf"), ("0", "50"), ("9000", "-1")])
def test_score_refuses_non_finite_or_non_positive_measurements(capsys, latency: str, tok_s: str) -> None:  # noqa: ANN001
    _one_line_error(capsys, ["score", "--target", "trn3", "--prompt", "1", "--coverage", "0.5", "--latency-ms",
                             latency, "--tok-s", tok_s], "latency and throughput must be positive finite numbers")


@pytest.mark.parametrize("argv, expected", [
    (["generate", "--random-tiny", "--new-tokens", "0"], "--new-tokens must be a positive integer, got 0"),
    (["demo", "--layers", "0"], "--layers must be a positive integer, got 0"),
    (["generate", "--random-tiny", "--prompt-ids", "1,-1"], "--prompt-ids needs integers >= 0, got '1,-1'"),
    (["registry", "explain", "attention_decode", "--target", "trn3", "--context", "10000000"],
     "--context 10000000: the model takes 1 to 40960 positions (max_position_embeddings)"),
    (["registry", "explain", "rmsnorm", "--target", "trn3", "--tokens", "0"], "--tokens 0: the model takes 1 to"),
    (["bench", "select", "--target", "trn2", "--seq-len", "-5"], "--seq-len -5: the model takes 1 to 40960"),
    (["bench", "select", "--target", "trn2", "--tokens", "50000"], "--tokens 50000: the model takes 1 to 40960"),
    (["bench", "select", "--target", "trn2", "--tp", "0"], "--tp must be a positive integer, got 0"),
    (["coverage", "--target", "trn2", "--seq-len", "0"], "--seq-len 0: the model takes 1 to 40960"),
    (["submit", "--targets", ""], "--targets needs at least one Neuron target (trn2, trn3), got ''"),
    (["submit", "--targets", " , "], "--targets needs at least one Neuron target"),
])
def test_bad_arguments(capsys, argv: list[str], expected: str) -> None:  # noqa: ANN001
    _one_line_error(capsys, argv, expected)


def test_contexts_up_to_the_configs_max_positions(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    config = _file(tmp_path, "config.json", json.dumps({**QWEN_FIELDS, "max_position_embeddings": 4096}))
    _one_line_error(capsys, ["registry", "explain", "attention_decode", "--target", "trn3", "--config", config,
                             "--context", "4097"], "--context 4097: the model takes 1 to 4096 positions")


def test_token_id_zero_is_a_valid_prompt(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    # The prompt is accepted; the error is about the checkpoint that does not exist.
    _one_line_error(capsys, ["generate", "--model", str(tmp_path / "none"), "--prompt-ids", "0,1"],
                    f"checkpoint directory {tmp_path / 'none'} does not exist")


def test_submit_to_a_directory_leaves_nothing(capsys, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    out = tmp_path / "dist"
    out.mkdir()
    _one_line_error(capsys, ["submit", "-o", str(out), "--no-verify"], f"-o {out} is a directory; give a file path")
    (tmp_path / "file").write_text("")
    _one_line_error(capsys, ["submit", "-o", str(tmp_path / "file" / "qwen.py"), "--no-verify"],
                    "qwen.py: cannot write there (")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["dist", "file"]


def test_a_failing_bundle_write_is_one_line_and_leaves_no_partial(capsys, tmp_path: Path,  # noqa: ANN001
                                                                  monkeypatch) -> None:
    def disk_full(src: object, dst: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", disk_full)
    out = tmp_path / "qwen.py"
    root = Path(__file__).resolve().parents[1]
    _one_line_error(capsys, ["submit", "-o", str(out), "--no-verify", "--root", str(root)],
                    f"-o {out}: cannot write the bundle (No space left on device)")
    assert list(tmp_path.iterdir()) == []


def test_status_cells_wrap_at_word_boundaries() -> None:
    reason = "ineligible: H=100000 needs 400000 bytes of SBUF per partition row, more than the 196608 available"
    lines = cli._wrap(reason, 30).splitlines()
    assert len(lines) > 1 and all(len(line) <= 30 for line in lines)
    assert " ".join(lines) == reason  # whole words only
    assert cli._wrap("a" * 40, 30) == "a" * 40  # a word longer than the cell stays whole


def test_random_tiny_checkpoint_is_removed_or_kept_where_asked(capsys, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    args = ["demo", "--layers", "1", "--new-tokens", "2", "--quiet"]
    monkeypatch.setenv("NKIMOE_TARGET", "cpu")
    assert main(args) == 0
    assert list((tmp_path / "tmp").iterdir()) == []
    keep = tmp_path / "kept"
    assert main([*args, "--keep", str(keep)]) == 0
    assert f"random checkpoint kept in {keep}" in capsys.readouterr().out
    assert sorted(p.name for p in keep.iterdir()) == ["config.json", "model.safetensors"]
    _one_line_error(capsys, [*args, "--keep", str(keep)], f"--keep {keep}: give a new or empty directory")


def test_a_checkpoint_config_that_is_a_json_list(capsys, tmp_path: Path) -> None:  # noqa: ANN001
    _file(tmp_path, "config.json", json.dumps([QWEN_FIELDS]))
    _one_line_error(capsys, ["generate", "--model", str(tmp_path)],
                    f"{tmp_path / 'config.json'} holds a JSON list, expected an object")
