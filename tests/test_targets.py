from __future__ import annotations

from pathlib import Path

import pytest

from nkimoe.targets import CPU, TRN2, TRN3, Target, TargetError, detect, resolve

KNOWN = {t.name: t for t in (TRN2, TRN3, CPU)}


def _fake_sys(root: Path, product: str | None = None, devices: int = 0) -> Path:
    if product is not None:
        dmi = root / "class/dmi/id"
        dmi.mkdir(parents=True)
        (dmi / "product_name").write_text(product + "\n")
    if devices:
        for i in range(devices):
            (root / f"class/neuron_device/neuron{i}").mkdir(parents=True)
    return root


def test_default_is_cpu_without_env_or_device(tmp_path: Path) -> None:
    found = detect({}, sys_root=tmp_path)
    assert found.target is CPU and found.source == "default"


@pytest.mark.parametrize("value,expected", [("trn2", "trn2"), ("trn3", "trn3"), ("cpu", "cpu"), (" TRN3 ", "trn3")])
def test_nkimoe_target_selects(value: str, expected: str, tmp_path: Path) -> None:
    found = detect({"NKIMOE_TARGET": value}, sys_root=tmp_path)
    assert found.target.name == expected
    assert found.source == "NKIMOE_TARGET"
    assert f"NKIMOE_TARGET={value.strip()}" in found.evidence


@pytest.mark.parametrize("value,expected", [("trn2", "trn2"), ("gen3", "trn2"), ("trn3", "trn3"), ("gen4", "trn3")])
def test_platform_override_aliases(value: str, expected: str, tmp_path: Path) -> None:
    found = detect({"NEURON_PLATFORM_TARGET_OVERRIDE": value}, sys_root=tmp_path)
    assert (found.target.name, found.source) == (expected, "NEURON_PLATFORM_TARGET_OVERRIDE")


def test_nkimoe_target_wins_over_platform_override(tmp_path: Path) -> None:
    found = detect({"NKIMOE_TARGET": "trn2", "NEURON_PLATFORM_TARGET_OVERRIDE": "trn3"}, sys_root=tmp_path)
    assert found.target is TRN2 and found.source == "NKIMOE_TARGET"


def test_probe_reads_dmi_product_name(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, product="trn3.3xlarge", devices=1)
    found = detect({}, sys_root=root)
    assert found.target is TRN3 and found.source == "probe"
    assert any("trn3.3xlarge" in e for e in found.evidence)
    assert any("1 Neuron device" in e for e in found.evidence)


def test_non_trainium_dmi_is_not_a_device(tmp_path: Path) -> None:
    found = detect({}, sys_root=_fake_sys(tmp_path, product="m7i.large"))
    assert found.target is CPU
    assert any("not a Trainium instance" in e for e in found.evidence)


def test_variable_disagreeing_with_probe_warns_with_both(tmp_path: Path) -> None:
    root = _fake_sys(tmp_path, product="trn2.48xlarge", devices=2)
    with pytest.warns(UserWarning, match=r"NKIMOE_TARGET=trn3 selects trn3, but the device probe found trn2"):
        found = detect({"NKIMOE_TARGET": "trn3"}, sys_root=root)
    assert found.target is TRN3
    assert "trn2.48xlarge" in found.warnings[0]


@pytest.mark.parametrize("var", ["NKIMOE_TARGET", "NEURON_PLATFORM_TARGET_OVERRIDE"])
def test_bad_value_names_value_variable_and_valid_names(var: str, tmp_path: Path) -> None:
    with pytest.raises(TargetError, match=rf"unknown target 'trn9' from {var}; valid targets: .*trn2, trn3"):
        detect({var: "trn9"}, sys_root=tmp_path)


def test_resolve_unknown_lists_valid() -> None:
    with pytest.raises(TargetError, match="valid targets: cpu, gen3, gen4, trn2, trn3"):
        resolve("inf2", KNOWN)


def test_target_rejects_unknown_feature() -> None:
    fields = {**TRN3.__dict__, "name": "x", "features": frozenset({"warp_drive"})}
    with pytest.raises(TargetError, match="unknown ISA features \\['warp_drive'\\]"):
        Target(**fields)


def test_trn3_differs_from_trn2_where_the_docs_say() -> None:
    assert TRN3.sbuf_bytes_per_partition > TRN2.sbuf_bytes_per_partition
    assert TRN3.psum_bytes_per_partition == TRN2.psum_bytes_per_partition == 16 * 1024
    assert TRN3.hbm_bytes_per_s > TRN2.hbm_bytes_per_s
    assert TRN3.has("exponential") and not TRN2.has("exponential")
    assert TRN3.has("nc_matmul_mx") and not TRN2.has("nc_matmul_mx")
    assert TRN2.psum_bank_bytes == 2048
