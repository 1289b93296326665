"""Decode expert MLP against the HBM roofline, per target (cost-model ESTIMATES, not measurements).

For one decoded token the 8 selected experts' gate, up and down weights must be read:
8 x 3 x 2048 x 768 x 2 bytes per layer. The roofline time is those bytes over the per-core HBM
bandwidth of the target; the fraction is roofline time / the kernel's estimated time.

    python bench/expert_roofline.py
"""

from __future__ import annotations

from nkimoe.bench.trial import run_trial
from nkimoe.ops import Problem
from nkimoe.plugins import load_registry

H, I, E, K = 2048, 768, 128, 8


def main() -> None:
    registry = load_registry()
    problem = Problem.of("expert_mlp", "bfloat16", T=1, H=H, I=I, E=E, K=K)
    must_read = K * 3 * H * I * 2
    print(f"{'target':<7} {'variant':<22} {'estimate us':>12} {'roofline us':>12} {'fraction':>9}  (all estimates)")
    for target_name in ("trn2", "trn3"):
        target = registry.targets[target_name]
        bound = registry.bind(target, {"decode.experts": problem}).ops["decode.experts"].variant
        trial = run_trial(bound, problem, target)
        if not trial.ok or trial.estimate is None:
            raise SystemExit(f"{bound.name} on {target_name} failed verification: {trial.detail}")
        roofline_us = must_read / target.hbm_bytes_per_s_per_core * 1e6
        print(f"{target_name:<7} {bound.name:<22} {trial.estimate.micros:>12.1f} {roofline_us:>12.1f} "
              f"{roofline_us / trial.estimate.micros:>9.2f}")


if __name__ == "__main__":
    main()
