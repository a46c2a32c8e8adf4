"""``effattn sweep [PRESET]``: measure backends over sequence lengths and the other axes of a
preset, each comparison group in interleaved rounds in a worker of its own; resumable.

    effattn sweep [PRESET] [--backends full sdpa local:window=256] [--seq-lens 1024 2048] ...
                  [--rounds R] [--passes P] [--bracket-every K] [--workers N]
                  [--executor submitit --partition P ...]

With the environment variable EFFATTN_SWEEP_TINY set, every sweep runs at toy sizes
(effattn.sweep.spec.tiny): the tests run the README's commands that way.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from effattn.argtypes import boolean, non_negative_int, positive_float, positive_int
from effattn.harness.store import RUNS_DIR

HELP = "measure backends over sequence lengths (and other axes)"
DESCRIPTION = (
    "Run a sweep: PRESET (default: tay) with any axis replaced from the command line. Results "
    "go to OUT/RUN_ID/results.jsonl; running the same command again resumes."
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The preset, then its axes, budgets, the run's place, and the Slurm options."""
    parser.add_argument("preset", nargs="?", default="tay", help="preset name or .toml path")
    _add_axes(parser.add_argument_group("axes (each replaces the preset's)"))
    _add_budgets(parser.add_argument_group("timing: budgets, rounds, memory"))
    _add_run(parser)
    _add_slurm(parser.add_argument_group("--executor submitit (Slurm through submitit)"))


def _add_axes(parser: argparse._ArgumentGroup) -> None:
    from effattn.sweep.spec import DEVICES, DTYPES, MODES

    parser.add_argument(
        "--backends", nargs="+", metavar="NAME[:OPT=V,...]", help="e.g. full local:window=256"
    )
    parser.add_argument(
        "--seq-lens", nargs="+", type=positive_int, metavar="N", help="sequence lengths"
    )
    parser.add_argument("--batch", nargs="+", type=positive_int, metavar="B", help="batch B")
    parser.add_argument("--heads", nargs="+", type=positive_int, metavar="H", help="heads H")
    parser.add_argument("--head-dim", nargs="+", type=positive_int, metavar="D", help="head dim")
    parser.add_argument(
        "--kv-heads",
        nargs="+",
        type=positive_int,
        metavar="HKV",
        help="key/value heads (grouped-query attention; each must divide H)",
    )
    parser.add_argument(
        "--kv-seq-lens",
        nargs="+",
        type=positive_int,
        metavar="NK",
        help="key lengths, N queries over NK keys (cross-attention)",
    )
    parser.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    parser.add_argument(
        "--device", nargs="+", choices=list(DEVICES), help="auto: cuda if available"
    )
    causal = parser.add_mutually_exclusive_group()  # of the group: shown among the axes
    causal.add_argument(
        "--causal", nargs="*", type=boolean, metavar="BOOL", help="alone: causal; or a list"
    )
    causal.add_argument("--no-causal", action="store_true", help="bidirectional only")
    parser.add_argument(
        "--mode",
        nargs="+",
        choices=list(MODES),
        help="attention fwd, fwd+bwd, model step, decode (one token at context N)",
    )
    parser.add_argument(
        "--threads", nargs="+", type=positive_int, metavar="T", help="CPU threads, pinned"
    )


def _add_budgets(parser: argparse._ArgumentGroup) -> None:
    parser.add_argument("--time-limit", type=positive_float, metavar="S", help="s per point")
    parser.add_argument("--mem-limit", type=positive_int, metavar="MIB", help="MiB per point")
    parser.add_argument(
        "--min-run-time", type=positive_float, metavar="S", help="timed s per point (all rounds)"
    )
    parser.add_argument(
        "--rounds",
        type=positive_int,
        metavar="R",
        help="interleaved rounds per comparison group (each times every backend once)",
    )
    parser.add_argument(
        "--passes",
        type=positive_int,
        metavar="P",
        help="passes through the sweep's groups that share out each group's rounds (at most R; "
        "more passes: a load lasting minutes touches fewer rounds of each group)",
    )
    parser.add_argument(
        "--bracket-every",
        type=non_negative_int,
        metavar="K",
        help="time the group's sdpa (else full) again after every K backends of a round, and "
        "take each ratio against the sdpa timings beside it (0: once a round, like the others)",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="time with the C library's malloc as it comes: large freed blocks go back to the "
        "OS and their page faults count in the times (default: CPU workers keep freed memory, "
        "as CUDA's caching allocator does; effattn.harness.allocator)",
    )


def _add_run(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--plugin", nargs="+", default=[], metavar="FILE.py",
                       help="Python files that register extra backends")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RUNS_DIR, help="folder of run folders")
    parser.add_argument("--run-id", help="default: PRESET-DEVICE, plus a spec hash if overridden")
    parser.add_argument(
        "--fresh", action="store_true", help="set earlier results of this run id aside first"
    )
    parser.add_argument("--quiet", action="store_true", help="no table at the end")
    parser.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="points measured at once, one GPU each (CUDA only; CPU sweeps refuse N > 1)",
    )
    parser.add_argument(
        "--executor",
        choices=["local", "submitit"],
        default="local",
        help="local: worker processes here; submitit: a Slurm job array",
    )


def _add_slurm(slurm: argparse._ArgumentGroup) -> None:
    from effattn.sweep.executors import CLUSTERS

    slurm.add_argument(
        "--slurm-config",
        type=Path,
        metavar="FILE.toml",
        help="a [slurm] table: the options below, plus slurm_* parameters",
    )
    slurm.add_argument("--partition", help="Slurm partition (default: the cluster's)")
    slurm.add_argument(
        "--gpus-per-task",
        type=non_negative_int,
        metavar="G",
        help="GPUs per array task (default 1; 0: CPU points)",
    )
    slurm.add_argument(
        "--slurm-time",
        type=positive_int,
        metavar="MIN",
        help="time limit of each array task, minutes (default 60)",
    )
    slurm.add_argument(
        "--array-parallelism",
        type=positive_int,
        metavar="K",
        help="array tasks at most, each with whole curves (default 16)",
    )
    slurm.add_argument(
        "--retries",
        type=non_negative_int,
        metavar="R",
        help="resubmissions of a dead task's unmeasured points (default 1)",
    )
    slurm.add_argument(
        "--cluster",
        choices=list(CLUSTERS),
        help="submitit's cluster (default: slurm where sbatch exists, else local)",
    )


def sweep_spec(args: argparse.Namespace) -> tuple[Any, bool]:
    """The spec from the preset and the command line, and whether any axis was overridden."""
    import dataclasses

    from effattn.sweep.spec import TINY_ENV, Grid, load_preset, tiny, with_overrides

    spec = load_preset(args.preset)
    axes: dict[str, tuple] = {}
    for axis in (f.name for f in dataclasses.fields(Grid) if f.name != "causal"):
        value = getattr(args, axis)  # each Grid axis has an option of its name (causal: below)
        if value is not None:
            axes[axis] = tuple(value)
    if args.no_causal:
        axes["causal"] = (False,)
    elif args.causal is not None:
        axes["causal"] = tuple(args.causal) or (True,)
    settings = {
        key: value
        for key, value in (
            ("time_limit_s", args.time_limit),
            ("mem_limit_mib", args.mem_limit),
            ("min_run_time_s", args.min_run_time),
            ("rounds", args.rounds),
            ("passes", args.passes),
            ("bracket_every", args.bracket_every),
            ("keep_freed_memory", False if args.system_malloc else None),
        )
        if value is not None
    }
    if args.rounds is not None and args.passes is None:  # the preset's passes, at most R
        settings["passes"] = min(spec.settings.passes, args.rounds)
    overridden = bool(axes or settings or args.plugin)
    spec = with_overrides(spec, axes, settings, tuple(args.plugin))
    if os.environ.get(TINY_ENV, "") not in ("", "0"):
        print(f"{TINY_ENV} is set: toy sizes (effattn.sweep.spec.tiny)", file=sys.stderr)
        spec = tiny(spec)
    return spec, overridden


def run(args: argparse.Namespace) -> int:
    import dataclasses

    from effattn.harness.store import archive_results
    from effattn.harness.worker import load_plugins
    from effattn.sweep import report, runner
    from effattn.sweep.spec import expand

    spec, overridden = sweep_spec(args)
    load_plugins(spec.plugins)
    strict = args.backends is not None  # a backend named on the command line must exist
    strict_device = args.device is not None  # and so must a device (a preset's may be absent)
    options = None
    if args.executor == "submitit":
        from effattn.sweep import executors

        if args.workers != 1:
            raise ValueError(
                f"workers: expected 1 with --executor submitit, got {args.workers} "
                "(each array task uses all its --gpus-per-task GPUs, one point per GPU)"
            )
        options = executors.load_slurm_options(
            args.slurm_config,
            partition=args.partition,
            gpus_per_task=args.gpus_per_task,
            time_min=args.slurm_time,
            array_parallelism=args.array_parallelism,
            retries=args.retries,
        )
        points, messages = executors.cluster_points(spec, options, strict=strict), []
    else:
        # checks every axis before anything runs
        points, messages = expand(spec, strict=strict, strict_device=strict_device)
        runner.gpu_slots(args.workers, points)  # refuses --workers > 1 for CPU points
    if not points:
        raise ValueError("sweep: no point to measure: " + "; ".join(messages or ["empty spec"]))
    devices = "-".join(sorted({p.device for p in points}))
    run_id = args.run_id or f"{spec.name}-{devices}" + (f"-{spec.digest()}" if overridden else "")
    run_dir = args.out / run_id
    if args.fresh and (old := archive_results(run_dir)) is not None:
        print(f"earlier results set aside: {old}", file=sys.stderr)
    if options is None:
        results = runner.run_sweep(
            spec, run_dir, strict=strict, strict_device=strict_device, workers=args.workers
        )
    else:
        from effattn.harness.machine import environment
        from effattn.harness.store import write_env

        run_dir.mkdir(parents=True, exist_ok=True)
        write_env(run_dir, environment((p.threads for p in points), dataclasses.asdict(spec)))
        results = executors.submit_sweep(spec, points, run_dir, options, cluster=args.cluster)
    if not args.quiet:
        print(report.render_markdown(report.load_runs([results.parent])))
    return 0
