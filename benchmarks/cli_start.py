"""How fast the `delia` command answers `--help` and a mistyped option: wall time of fresh interpreters, medians.

    python benchmarks/cli_start.py                      # this checkout, every command, 5 runs each
    python benchmarks/cli_start.py --against ../old     # side by side with another checkout, and the ratio

Each run is `python -m delia.cli COMMAND ...` in a new process started in the checkout, so the figures
include the interpreter's start. On a shared machine the absolute times move with the load: compare columns measured
in the same call, not across calls.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CASES = {
    "demo --help": ["demo", "--help"],
    "demo --ratoi 2": ["demo", "--ratoi", "2"],
    "eval --help": ["eval", "--help"],
    "probe --help": ["probe", "--help"],
    "build-cache --help": ["build-cache", "--help"],
    "plot --help": ["plot", "--help"],
    "train --help": ["train", "--help"],
}


def wall_time(checkout: Path, argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": str(checkout)}
    started = time.perf_counter()
    # run from the checkout: `-m` puts the working folder first on sys.path
    subprocess.run([sys.executable, "-m", "delia.cli", *argv], env=env, cwd=checkout, capture_output=True, check=False)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--against", type=Path, default=None, help="another checkout, measured alternately")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    options = parser.parse_args()
    checkouts = [ROOT] + ([options.against.resolve()] if options.against else [])
    header = f"{'command':22}" + "".join(f"{'this' if c == ROOT else 'other':>10}" for c in checkouts)
    print(header + ("   other/this" if options.against else ""))
    for case in options.cases:
        times: dict[Path, list[float]] = {checkout: [] for checkout in checkouts}
        for _ in range(options.runs):  # alternate, so that a load spike hits both columns alike
            for checkout in checkouts:
                times[checkout].append(wall_time(checkout, CASES[case]))
        medians = [statistics.median(times[checkout]) for checkout in checkouts]
        ratio = f"{medians[1] / medians[0]:>12.1f}x" if options.against else ""
        print(f"{case:22}" + "".join(f"{median:>9.2f}s" for median in medians) + ratio)


if __name__ == "__main__":
    main()
