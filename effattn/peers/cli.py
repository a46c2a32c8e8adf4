"""``effattn peers``: effattn's backends beside the public implementations of the same algorithms,
in one process on identical inputs; one ratio table (time, peak memory, output agreement).

    effattn peers                                   # N=4096, every comparison, reports/peers/
    effattn peers --n 2048 --repeats 5 --only local,lsh --out /tmp/peers

The comparisons and what ``--only`` takes are listed in :mod:`effattn.peers.cases`; how each
number is measured in :mod:`effattn.peers.measure`. The process keeps freed memory for the next
call, as the sweep's workers do (effattn.harness.allocator; on glibc), so no time includes the
OS mapping fresh pages; ``--system-malloc`` times with the C library's malloc as it comes.
Writes OUT/results.json and OUT/README.md, and prints each comparison's table as it is done.
The peers are the ``peers`` extra; one that is not installed is a skipped row with the reason.
"""

from __future__ import annotations

import argparse
import shlex
import time
from pathlib import Path

import torch

from effattn.argtypes import positive_float, positive_int
from effattn.harness import machine
from effattn.peers.cases import comparisons, selected
from effattn.peers.measure import Row, measure
from effattn.peers.report import environment, markdown, write_report

HELP = "each backend beside the public implementation of its algorithm (the peers extra)"
DESCRIPTION = (
    "Time, peak memory and output agreement of effattn's backends beside the public "
    "implementations of the same algorithms (flex_attention, local-attention, HF BigBird, "
    "Reformer and Transformer-XL, reformer-pytorch, performer-pytorch, "
    "linear-attention-transformer, linformer, nystrom-attention), in one process on the same "
    "inputs. Needs pip install -c constraints.txt 'effattn[peers]'; a peer that is not "
    "installed is a skipped row with the reason. Writes OUT/results.json and OUT/README.md."
)
KEYS = tuple(comparisons())  # what --only takes (besides the aliases full and sdpa)
DEFAULT_OUT = Path("reports") / "peers"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of `effattn peers`, added to ``parser``."""
    parser.add_argument("--n", type=positive_int, default=4096, metavar="N", help="sequence length")
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=2,
        metavar="T",
        help="torch intra-op threads (pinned)",
    )
    parser.add_argument(
        "--repeats", type=positive_int, default=3, metavar="R", help="interleaved repeats"
    )
    parser.add_argument(
        "--only", default="", metavar="KEYS", help="comma-separated: " + ",".join(KEYS)
    )
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, metavar="DIR", help="the report folder"
    )
    parser.add_argument(
        "--min-run-s", type=positive_float, default=0.5, metavar="S", help="per timing, seconds"
    )
    parser.add_argument(
        "--bucket-size", type=positive_int, default=64, help="lsh bucket (chunk) size"
    )
    parser.add_argument("--hashes", type=positive_int, default=4, help="lsh hash rounds")
    machine.add_system_malloc_flag(parser)


def command(args: argparse.Namespace) -> str:
    """The command line of this run: `effattn peers` with the options that differ from the
    defaults, quoted as a shell would take them back."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    defaults = vars(parser.parse_args([]))
    parts = ["effattn", "peers"]
    for name in ("n", "threads", "repeats", "only", "out", "min_run_s", "bucket_size", "hashes"):
        if getattr(args, name) != defaults[name]:
            parts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.system_malloc:
        parts.append("--system-malloc")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Measure the chosen comparisons, print each table, write the report; 0 when done. An
    unknown --only key raises ValueError before anything runs."""
    chosen = selected(args.only, comparisons(args.bucket_size, args.hashes))
    torch.manual_seed(0)
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
    meta = environment()
    meta.update(n=args.n, repeats=args.repeats, min_run_s=args.min_run_s, command=command(args))
    start = time.perf_counter()
    rows: list[Row] = []
    for comparison in chosen:
        found = measure(
            comparison, args.n, repeats=args.repeats, threads=args.threads, min_run_s=args.min_run_s
        )
        print(markdown(found), flush=True)
        rows += found
    meta.update(setup.record(), wall_s=time.perf_counter() - start)
    write_report(args.out, rows, meta)
    print(markdown(rows))
    return 0
