"""Every published measurement in ``src/nkimoe/data/calibration.yaml`` against the cost model's
ESTIMATE of the same kernel on the same hardware generation, as a Markdown table (README's).

    python bench/calibration.py [--light]   # --light: only what the test suite runs
"""

from __future__ import annotations

import argparse

from nkimoe.bench.calibration import load_measurements, model_estimate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--light", action="store_true", help="skip the measurements that take minutes to emulate")
    args = parser.parse_args()
    print("| measurement | hardware | measured (us) | estimate (us) | estimate / measured | source |")
    print("|---|---|---|---|---|---|")
    for m in load_measurements():
        if args.light and m.heavy:
            continue
        modelled, est = model_estimate(m)
        print(f"| {m.name} | {m.target} | {m.measured_us:g} | {modelled:.2f} | {modelled / m.measured_us:.2f} "
              f"| [{m.source}]({m.url}) |", flush=True)


if __name__ == "__main__":
    main()
