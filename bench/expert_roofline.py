"""Decode expert MLP against the HBM roofline, per target (cost-model ESTIMATES, not measurements).

For one decoded token the 8 selected experts' gate, up and down weights must be read:
8 x 3 x 2048 x I x 2 bytes per layer, I = 768 / tp (one rank's slice under tensor parallelism).
The roofline time is those bytes over the HBM bandwidth of the physical cores the bound variant
runs on (two for an LNC=2 kernel); the fraction is roofline time / the kernel's estimated time.

    python bench/expert_roofline.py [--tp 4]
"""

from __future__ import annotations

import argparse

from nkimoe.bench.trial import run_trial
from nkimoe.ops import Problem
from nkimoe.plugins import load_registry
from nkimoe.shapes import intermediate_per_rank

H, I, E, K = 2048, 768, 128, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tp", type=int, default=1, help="tensor parallelism: one rank's intermediate slice")
    args = parser.parse_args()
    try:
        inter = intermediate_per_rank(I, args.tp)
    except ValueError as err:
        parser.error(str(err))
    registry = load_registry()
    problem = Problem.of("expert_mlp", "bfloat16", T=1, H=H, I=inter, E=E, K=K)
    must_read = K * 3 * H * inter * 2
    print(f"I = {inter} (tp {args.tp})")
    print(f"{'target':<7} {'variant':<26} {'cores':>5} {'estimate us':>12} {'roofline us':>12} {'fraction':>9}"
          "  (all estimates)")
    for target_name in ("trn2", "trn3"):
        target = registry.targets[target_name]
        bound = registry.bind(target, {"decode.experts": problem}).ops["decode.experts"].variant
        trial = run_trial(bound, problem, target)
        if not trial.ok or trial.estimate is None:
            raise SystemExit(f"{bound.name} on {target_name} failed verification: {trial.detail}")
        cores = trial.estimate.programs
        roofline_us = must_read / (target.hbm_bytes_per_s_per_core * cores) * 1e6
        print(f"{target_name:<7} {bound.name:<26} {cores:>5} {trial.estimate.micros:>12.1f} {roofline_us:>12.1f} "
              f"{roofline_us / trial.estimate.micros:>9.2f}")


if __name__ == "__main__":
    main()
