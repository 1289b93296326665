"""Per-call-site decode time of the bound model against each site's HBM roofline, as a PNG.

Every bar is a cost-model ESTIMATE for one TP rank (``nkimoe estimate``), never a measurement;
the roofline bar is the bytes the site must read per token at the rank's HBM bandwidth.
Needs the ``bench`` extra (matplotlib).

    python bench/estimate_breakdown.py --target trn3 [--tp 4] [--out decode_breakdown.png]
"""

from __future__ import annotations

import argparse

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from nkimoe.bench.estimate import estimate_model  # noqa: E402
from nkimoe.plugins import load_registry  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="trn3", choices=("trn2", "trn3"))
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--out", default="decode_breakdown.png")
    args = parser.parse_args()
    registry = load_registry()
    report = estimate_model(registry, registry.targets[args.target], tp=args.tp, seq_len=args.seq_len)
    sites = sorted(report["decode_sites"], key=lambda s: s["total_ms"])
    names = [s["site"] for s in sites] + ["collectives"]
    estimated = [s["total_ms"] for s in sites] + [report["collectives_ms_per_token"]]
    roofline = [s["roofline_ms"] for s in sites] + [0.0]
    fig, ax = plt.subplots(figsize=(9, 0.45 * len(names) + 1.8))
    rows = range(len(names))
    ax.barh([r + 0.2 for r in rows], estimated, height=0.4, label="estimated time (cost model)")
    ax.barh([r - 0.2 for r in rows], roofline, height=0.4, label="HBM roofline (must-read bytes / bandwidth)")
    ax.set_yticks(list(rows), names)
    ax.set_xlabel("ms per decoded token (all layers), ESTIMATE")
    ax.set_title(f"{args.target}, TP {args.tp}, cache {args.seq_len}: decode "
                 f"{report['decode_ms_per_token']:.2f} ms/token vs roofline {report['roofline_ms_per_token']:.2f} "
                 f"(estimates)", fontsize=10)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print(f"wrote {args.out}: decode {report['decode_ms_per_token']:.3f} ms/token, roofline "
          f"{report['roofline_ms_per_token']:.3f} ms/token (estimates)")


if __name__ == "__main__":
    main()
