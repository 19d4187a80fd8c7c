"""Summarise a sweep: ``python scripts/report.py multirun/NAME`` -> report.md, report.csv, plots.

Runs with downstream tasks (``eval.tasks``) add a column per task metric and ``acc_vs_bits.png``;
runs without tasks (or written before tasks existed) stay rows with those cells empty. Sweeps
launched with ``scripts/run.py -m`` call the same code when they end.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from quantkit.report import write_report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("sweep_dir", type=Path, help="a Hydra multirun folder")
    parser.add_argument("--out", type=Path, default=None, help="where to write (default: the sweep folder)")
    args = parser.parse_args()
    if not args.sweep_dir.is_dir():
        parser.error(f"sweep_dir {args.sweep_dir} is not a folder")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(write_report(args.sweep_dir, args.out).read_text())


if __name__ == "__main__":
    main()
