"""``effattn plot RUN...``: time, memory, speed-up, error and pattern plots of sweep runs.

effattn plot RUN... [--out DIR] [--prefix PREFIX]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "time, memory, speed-up, error and pattern plots"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders or ids")
    parser.add_argument("--out", type=Path, default=Path("reports") / "plots", help="folder")
    parser.add_argument("--prefix", default=None, help="file name prefix (default: the run ids)")


def run(args: argparse.Namespace) -> int:
    from effattn.sweep import plots, report

    frame = report.load_runs(args.runs)
    prefix = args.prefix or "+".join(sorted(frame["run"].unique()))
    for path in plots.write_plots(frame, args.out, prefix):
        print(f"wrote {path}", file=sys.stderr)
    return 0
