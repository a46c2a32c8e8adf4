"""``effattn peers``: effattn's backends beside the public implementations of the same algorithms,
in one process on identical inputs; one ratio table (time, peak memory, output agreement).

    effattn peers                                   # N=4096, every comparison, reports/peers/
    effattn peers --n 2048 --repeats 5 --only local,lsh --out /tmp/peers

The comparisons and what ``--only`` takes are listed in :mod:`effattn.peers.cases`; how each
number is measured in :mod:`effattn.peers.measure`: every candidate is a case timed by
effattn.harness.cases, its row written to the run folder (``--run-dir``, default OUT/run) that
`effattn report` and `effattn compare` read. The process keeps freed memory for the next call,
as the sweep's workers do (effattn.harness.allocator; on glibc), so no time includes the OS
mapping fresh pages; ``--system-malloc`` times with the C library's malloc as it comes. Prints
each row as it is measured, writes OUT/results.json (the pairs, with output agreement) and
OUT/README.md (the table). The peers are the ``peers`` extra; one that is not installed is a
skipped row with the reason.
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
from effattn.peers.measure import measure
from effattn.peers.report import environment, markdown, write_report

HELP = "each backend beside the public implementation of its algorithm (the peers extra)"
DESCRIPTION = (
    "Time, peak memory and output agreement of effattn's backends beside the public "
    "implementations of the same algorithms (flex_attention, local-attention, HF BigBird, "
    "Reformer and Transformer-XL, reformer-pytorch, performer-pytorch, "
    "linear-attention-transformer, linformer, nystrom-attention), in one process on the same "
    "inputs. Needs pip install -c constraints.txt 'effattn[peers]'; a peer that is not "
    "installed is a skipped row with the reason. Writes the rows to a run folder (OUT/run), "
    "OUT/results.json and OUT/README.md."
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
        "--run-dir",
        type=Path,
        default=None,
        metavar="RUN_DIR",
        help="the run folder (results.jsonl + env.json, rewritten) that `effattn report` and "
        "`effattn compare` read; default OUT/run",
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
    names = ("n", "threads", "repeats", "only", "out", "run_dir", "min_run_s", "bucket_size")
    for name in (*names, "hashes"):
        if getattr(args, name) != defaults[name]:
            parts += ["--" + name.replace("_", "-"), str(getattr(args, name))]
    if args.system_malloc:
        parts.append("--system-malloc")
    return shlex.join(parts)


def run(args: argparse.Namespace) -> int:
    """Measure the chosen comparisons into the run folder, write the report, print its table;
    0 when done. An unknown --only key raises ValueError before anything runs."""
    chosen = selected(args.only, comparisons(args.bucket_size, args.hashes))
    torch.manual_seed(0)
    setup = machine.prepare_cpu(args.threads, system_malloc=args.system_malloc)
    run_dir = args.run_dir or args.out / "run"
    meta = environment()
    meta.update(n=args.n, repeats=args.repeats, min_run_s=args.min_run_s, command=command(args))
    meta.update(run_dir=str(run_dir))
    start = time.perf_counter()
    spec = {"command": meta["command"], "versions": meta["versions"], **setup.record()}
    pairs = measure(
        chosen,
        args.n,
        run_dir=run_dir,
        repeats=args.repeats,
        threads=args.threads,
        min_run_s=args.min_run_s,
        spec=spec,
    )
    meta.update(setup.record(), wall_s=time.perf_counter() - start)
    write_report(args.out, pairs, meta)
    print(markdown(pairs))
    return 0
