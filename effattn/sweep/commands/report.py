"""``effattn report RUN...``: the Tay-style tables of one or several sweep runs, on the screen or
written as Markdown, CSV, LaTeX and HTML.

    effattn report RUN... [--merge] [--format md csv tex html] [--out PREFIX] [--fidelity CSV]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

HELP = "Tay-style tables from one or several runs"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders or ids")
    parser.add_argument("--format", nargs="+", choices=["md", "csv", "tex", "html"], default=["md"])
    parser.add_argument("--out", type=Path, help="file prefix: writes PREFIX.md, PREFIX.csv, ...")
    parser.add_argument(
        "--fidelity",
        type=Path,
        metavar="CSV",
        help="add the real-model cosine column from `effattn fidelity`'s CSV "
        "(e.g. reports/fidelity-cpu.csv)",
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="the runs as one (jobs or machines of one sweep): a row per point",
    )


def _merged_run(runs: list[Path], folder: Path) -> Path:
    """The rows of ``runs`` as one run folder under ``folder`` (a row per point key, the latest
    wins), named RUN_A+RUN_B."""
    import json

    from effattn.harness.store import RESULTS, merge_rows, resolve_run

    paths = [resolve_run(run) for run in runs]
    merged = folder / "+".join(p.parent.name for p in paths)
    merged.mkdir(parents=True)
    lines = [json.dumps(row, sort_keys=True) + "\n" for row in merge_rows(paths)]
    (merged / RESULTS).write_text("".join(lines))
    return merged


def run(args: argparse.Namespace) -> int:
    import tempfile

    from effattn.sweep import report

    with tempfile.TemporaryDirectory() as tmp:
        runs = [_merged_run(args.runs, Path(tmp))] if args.merge else args.runs
        frame = report.load_runs(runs)
    cosines = None if args.fidelity is None else report.load_fidelity(args.fidelity)
    if args.out is None:
        if args.format != ["md"]:
            raise ValueError("report: --format other than md needs --out PREFIX")
        print(report.render_markdown(frame, cosines))
        return 0
    written = report.write_report(frame, args.out, args.format, cosines)
    for path in written:
        print(f"wrote {path}", file=sys.stderr)
    if "md" in args.format:  # the tables just written, not rendered a second time
        print(written[args.format.index("md")].read_text(), end="")
    return 0
