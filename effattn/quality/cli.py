"""``effattn quality [PRESET]``: train the same small model with each backend on the tasks of
a preset; report accuracy beside training speed and memory.

    effattn quality [PRESET] [--tasks mqar listops] [--backends full local:window=32]
                    [--seq-lens 256] [--seeds 0 1] [--steps S] [--batch B] [--lr LR]
                    [--threads T] [--time-limit S] [--mem-limit MIB]
                    [--out DIR] [--run-id ID] [--fresh] [--retry-failed] [--quiet]
                    [--report PREFIX] [--plots DIR] [--notes FILE.md] [--report-only]

Results go to OUT/RUN_ID/results.jsonl (one row per task, N, backend, direction and seed);
running the same command again resumes (``--retry-failed``: and trains the points whose last
row is oom, timeout or crashed again, say after a crash the machine caused).
``--report reports/quality-cpu`` writes the report (.md and .csv) and ``--plots reports/plots``
its charts, from every row of the run.
Bad input (unknown task, preset, backend or backend option) raises ValueError naming it; the
``effattn`` command prints it as one line and exits 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from effattn.argtypes import non_negative_int, positive_float, positive_int
from effattn.harness.store import RUNS_DIR

HELP = "each backend's accuracy on trained tasks, and speed"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``effattn quality`` (in the spirit of ``effattn sweep``)."""
    parser.description = (
        "Train one small model per backend on locally generated tasks (MQAR, ListOps, nearest "
        "recall); PRESET (default: quality) with any choice replaced from the command line. "
        "Results go to OUT/RUN_ID/results.jsonl; running the same command again resumes."
    )
    parser.add_argument("preset", nargs="?", default=None,
                        help="preset name or .toml path (quality, quality-smoke)")  # fmt: skip
    parser.add_argument("--tasks", nargs="+", metavar="TASK", help="only these tasks' grids")
    parser.add_argument(
        "--backends", nargs="+", metavar="NAME[:OPT=V,...]", help="e.g. full local:window=32"
    )
    parser.add_argument(
        "--seq-lens",
        nargs="+",
        type=positive_int,
        metavar="N",
        help="only these of the preset's N (or, if it lacks one, these N for every grid)",
    )
    parser.add_argument("--seeds", nargs="+", type=non_negative_int, metavar="S")
    parser.add_argument("--steps", type=positive_int, metavar="S", help="training steps")
    parser.add_argument("--batch", type=positive_int, metavar="B", help="sequences per step")
    parser.add_argument("--lr", type=positive_float, metavar="LR", help="peak learning rate")
    parser.add_argument("--threads", type=positive_int, metavar="T", help="CPU threads, pinned")
    parser.add_argument("--time-limit", type=positive_float, metavar="S", help="s per point")
    parser.add_argument("--mem-limit", type=positive_int, metavar="MIB", help="MiB per point")
    parser.add_argument("--out", type=Path, default=RUNS_DIR, help="folder of run folders")
    parser.add_argument("--run-id", help="default: PRESET-cpu, plus a spec hash if overridden")
    parser.add_argument(
        "--fresh", action="store_true", help="set earlier results of this run id aside first"
    )
    parser.add_argument(
        "--retry-failed",
        action="store_true",
        help="on resume, train the points whose last row is oom, timeout or crashed again",
    )
    parser.add_argument("--quiet", action="store_true", help="no table at the end")
    parser.add_argument(
        "--report", type=Path, metavar="PREFIX", help="write PREFIX.md and PREFIX.csv"
    )
    parser.add_argument("--plots", type=Path, metavar="DIR", help="write the charts into DIR")
    parser.add_argument(
        "--notes",
        type=Path,
        metavar="FILE.md",
        help="a hand-written section for the report (the order of the backends, and why)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="no training: report the run's rows as they are"
    )


def _spec(args: argparse.Namespace) -> tuple[Any, bool]:
    """The spec from the preset and the command line, and whether anything was overridden."""
    from effattn.quality.spec import DEFAULT_PRESET, load_preset, with_overrides

    spec = load_preset(args.preset or DEFAULT_PRESET)
    train = {
        k: v
        for k, v in (
            ("steps", args.steps),
            ("batch", args.batch),
            ("lr", args.lr),
            ("threads", args.threads),
        )
        if v is not None
    }
    settings = {
        k: v
        for k, v in (("time_limit_s", args.time_limit), ("mem_limit_mib", args.mem_limit))
        if v is not None
    }
    axes = {
        "tasks": tuple(args.tasks) if args.tasks else None,
        "backends": tuple(args.backends) if args.backends else None,
        "seq_lens": tuple(args.seq_lens) if args.seq_lens else None,
        "seeds": tuple(args.seeds) if args.seeds is not None else None,
    }
    overridden = bool(train or any(v is not None for v in axes.values()))
    return with_overrides(spec, **axes, train=train, settings=settings), overridden


def run(args: argparse.Namespace) -> int:
    """Run (or resume) the quality spec; then the summary table, report and plots asked for."""
    from effattn.harness.store import read_runs
    from effattn.harness.table import render
    from effattn.quality import report, runner
    from effattn.quality.spec import expand

    spec, overridden = _spec(args)
    points = expand(spec)  # every task, option and backend checked before anything runs
    if not points:
        raise ValueError("quality: no point to train: the spec's grids are empty")
    if args.notes is not None and not args.notes.is_file():
        raise ValueError(f"notes: expected a Markdown file, got {str(args.notes)!r}")
    run_id = args.run_id or f"{spec.name}-cpu" + (f"-{spec.digest()}" if overridden else "")
    run_dir = args.out / run_id
    if not args.report_only:
        runner.prepare_run_dir(run_dir, args.fresh)
        runner.run_quality(spec, run_dir, retry_failed=args.retry_failed)
    frame = read_runs([run_dir])
    notes = args.notes.read_text() if args.notes is not None else None
    if args.report is not None:
        for path in report.write_report(frame, args.report, notes):
            print(f"wrote {path}", file=sys.stderr)
    if args.plots is not None:
        from effattn.quality import plots

        prefix = args.report.name if args.report is not None else run_id
        for path in plots.write_plots(frame, args.plots, prefix):
            print(f"wrote {path}", file=sys.stderr)
    if not args.quiet:
        print(render(report.summary_table(report.summarize(frame)), "md"))
    return 0
