"""Every builtin NKI launcher takes the rank's logical-core count ``lnc`` and launches ``kernel[lnc]``
(neuronx-cc compiles a kernel only at its graph's LNC), with the same result on one program and
on two: grid-aware kernels split their work, one-core kernels leave it to program 0."""

from __future__ import annotations

import inspect

import pytest

from nkimoe.bench.trial import make_inputs
from nkimoe.nki.emulator import session
from nkimoe.ops import Problem, compare, get_op
from nkimoe.plugins import load_registry

REGISTRY = load_registry({})

#: Small shapes every builtin variant of the op supports (decode kernels included).
PROBLEMS = {
    "rmsnorm": Problem.of("rmsnorm", "bfloat16", T=5, H=256),
    "add_rmsnorm": Problem.of("add_rmsnorm", "bfloat16", T=5, H=256),
    "qk_norm": Problem.of("qk_norm", "bfloat16", T=3, Hq=4, Hkv=2, D=128),
    "rope": Problem.of("rope", "bfloat16", T=3, Hq=4, Hkv=2, D=128),
    "router": Problem.of("router", "bfloat16", T=3, E=128, K=8),
    "linear": Problem.of("linear", "bfloat16", T=3, K=256, N=384),
    "expert_mlp": Problem.of("expert_mlp", "bfloat16", T=3, H=256, I=128, E=8, K=2),
    "attention_prefill": Problem.of("attention_prefill", "bfloat16", S=100, Hq=4, Hkv=2, D=128),
    "attention_decode": Problem.of("attention_decode", "bfloat16", L=256, Hq=4, Hkv=2, D=128),
    "moe_block": Problem.of("moe_block", "bfloat16", T=1, H=256, E=16, K=4, I=128),
    "attention_block": Problem.of("attention_block", "bfloat16", H=256, Hq=4, Hkv=2, D=128, L=200),
}


def test_every_builtin_nki_launcher_takes_the_grid() -> None:
    builtin = [v for v in REGISTRY.variants.values() if v.nki]
    assert builtin and all("lnc" in inspect.signature(v.kernel).parameters for v in builtin), \
        [v.name for v in builtin if "lnc" not in inspect.signature(v.kernel).parameters]
    assert {v.op for v in builtin} <= set(PROBLEMS)


@pytest.mark.parametrize("name", sorted(v.name for v in REGISTRY.variants.values() if v.nki))
def test_one_and_two_programs_give_the_reference_result(name: str) -> None:
    variant = REGISTRY.variants[name]
    problem = PROBLEMS[variant.op]
    target = REGISTRY.targets[variant.targets[0]]
    ok, reason = variant.supports(problem.dim, problem.dtype, target)
    assert ok, reason
    args, kwargs = make_inputs(problem, 1)
    expected = get_op(problem.op).reference(*args, **kwargs)
    prepared = variant.prepare_args(args)
    for lnc in (1, 2):
        with session(target):
            actual = variant.kernel(*prepared, **kwargs, lnc=lnc)
        same, detail = compare(actual, expected, *variant.tolerance_for(problem.dtype))  # the variant's own tolerance
        assert same, f"lnc={lnc}: {detail}"
