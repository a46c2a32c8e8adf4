"""``effattn compare RUN_A RUN_B``: what changed between two sweep runs, significant or noise, and
how well they agree. Exits 1 when ``--fail-on-regression`` finds a significant slowdown larger
than PCT percent.

    effattn compare RUN_A RUN_B [--fail-on-regression PCT] [--out FILE.md]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from effattn.argtypes import positive_float
from effattn.harness import stats

HELP = "what changed between two runs, significant or noise, and how well they agree"
DESCRIPTION = (
    "Compare RUN_B with RUN_A cell by cell: the change in time and in speed-up vs sdpa and vs "
    "full, each with its 95%% bootstrap interval; a summary line per metric; the share of cells "
    "that agree within --tolerance and that run A's repeat interval holds."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_a", type=Path, metavar="RUN_A", help="the baseline run (folder or id)")
    parser.add_argument("run_b", type=Path, metavar="RUN_B", help="the run compared with it")
    parser.add_argument(
        "--noise",
        type=float,
        default=stats.NOISE_PCT,
        metavar="PCT",
        help="changes smaller than PCT%% are noise (default %(default)g)",
    )
    parser.add_argument(
        "--tolerance",
        type=positive_float,
        default=stats.TOLERANCE_PCT,
        metavar="PCT",
        help="agreement: medians within PCT%% of each other (default %(default)g)",
    )
    parser.add_argument(
        "--fail-on-regression",
        type=float,
        metavar="PCT",
        help="exit 1 when a significant change for the worse exceeds PCT%%",
    )
    parser.add_argument(
        "--metric",
        choices=list(stats.METRICS),
        default="time",
        help="what --fail-on-regression looks at (default: time)",
    )
    parser.add_argument("--changed-only", action="store_true", help="list significant changes only")
    parser.add_argument(
        "--out", type=Path, metavar="FILE.md", help="also write the comparison here"
    )


def run(args: argparse.Namespace) -> int:
    from effattn.sweep import compare

    name_a, name_b, cells = compare.compare_runs(args.run_a, args.run_b, noise_pct=args.noise)
    text = compare.render(
        name_a,
        name_b,
        cells,
        noise_pct=args.noise,
        tolerance_pct=args.tolerance,
        changed_only=args.changed_only,
    )
    print(text, end="")
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        print(f"wrote {args.out}", file=sys.stderr)
    if args.fail_on_regression is not None:
        worse = compare.regressions(cells, args.metric, args.fail_on_regression)
        if worse:
            cell, change = max(worse, key=lambda x: abs(x[1].pct))
            print(
                f"effattn compare: {len(worse)} significant regression(s) of {args.metric} beyond "
                f"{args.fail_on_regression:g}% (worst: {cell.describe()} {change.pct:+.0f}%)",
                file=sys.stderr,
            )
            return 1
    return 0
