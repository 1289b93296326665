"""The closed-package stand-ins of the off-hardware NxDI environment: explicit, and loud when reached."""

from __future__ import annotations

import pytest

from nkimoe.offhw import standins


def test_every_stand_in_names_the_upstream_use_that_needs_it() -> None:
    reasons = standins.reasons()
    assert {"torch_neuronx", "neuronxcc.nki", "nki.language", "nkilib.core.utils.common_types", "libneuronxla",
            "torch.classes.neuron"} <= set(reasons)
    for module, names in reasons.items():
        for name, why in names.items():
            assert ("neuronx_distributed" in why or "NxD" in why), (module, name, why)


def test_closed_objects_raise_when_used() -> None:
    closed = standins.Closed("neuronxcc.nki.kernels.attention.FlashConfig", "flash_attn.py imports it")
    with pytest.raises(standins.StandInReached, match="FlashConfig.*called.*flash_attn.py imports it"):
        closed()
    with pytest.raises(standins.StandInReached, match="attribute 'x' read"):
        closed.x
    kernel = standins.ClosedDecorator("nki.jit", "kernels decorate at import")(lambda a: a)
    with pytest.raises(standins.StandInReached, match=r"nki\.jit\(.*lambda.*\).*called"):
        kernel(1)


def test_a_name_no_upstream_call_needs_is_missing() -> None:
    module = standins.StandInModule("torch_neuronx.utils")
    with pytest.raises(AttributeError, match="does not provide it"):
        module.get_something_else


def test_layer_boundary_markers_are_the_identity_and_other_hlo_calls_closed() -> None:
    def forward_impl(*args):  # the name NxDI's markers give their HLO builder
        raise AssertionError("an HLO builder never runs off hardware")

    forward_impl.__qualname__ = "ModuleMarkerStart.forward_impl"
    marker = standins._xla_hlo_call(forward_impl)
    assert marker(3) == 3 and marker(1, 2) == (1, 2)
    forward_impl.__qualname__ = "SomethingElse.forward_impl"
    with pytest.raises(standins.StandInReached):
        standins._xla_hlo_call(forward_impl)(3)
