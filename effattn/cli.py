"""The ``effattn`` command: list backends, run sweeps, make tables and plots, compare runs.

    effattn list
    effattn sweep [PRESET] [--backends full sdpa local:window=256] [--seq-lens 1024 2048] ...
                  [--rounds R] [--passes P] [--bracket-every K] [--workers N]
                  [--executor submitit --partition P ...]
    effattn report RUN... [--merge] [--format md csv tex html] [--out PREFIX] [--fidelity CSV]
    effattn plot RUN... [--out DIR]
    effattn compare RUN_A RUN_B [--fail-on-regression PCT] [--out FILE.md]
    effattn quality [PRESET] [--tasks mqar] [--backends ...] [--report PREFIX] [--plots DIR]
    effattn fidelity [--documents N] [--backends ...] [--out PREFIX]
    effattn peers [OPTIONS of benchmarks.peers]

Bad input (unknown backend, option or preset, a length that is not a positive integer) is
reported as one line on stderr with exit code 2, before anything runs. ``compare`` exits 1 when
``--fail-on-regression`` finds a significant slowdown larger than PCT percent.

With the environment variable EFFATTN_SWEEP_TINY set, every sweep runs at toy sizes
(effattn.bench.spec.tiny): the tests run the README's commands that way.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from effattn.argtypes import boolean, non_negative_int, positive_float, positive_int

DEFAULT_OUT = Path("reports") / "runs"


def build_parser() -> argparse.ArgumentParser:
    from effattn.bench.executors import CLUSTERS
    from effattn.bench.spec import DEVICES, DTYPES, MODES

    parser = argparse.ArgumentParser(
        prog="effattn", description="Efficient-attention backends and the suite that measures them."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    sub.add_parser("list", help="the registered backends, their options and declarations")

    sweep = sub.add_parser(
        "sweep",
        help="measure backends over sequence lengths (and other axes)",
        description="Run a sweep: PRESET (default: tay) with any axis replaced from the command "
        "line. Results go to OUT/RUN_ID/results.jsonl; running the same command again resumes.",
    )
    sweep.add_argument("preset", nargs="?", default="tay", help="preset name or .toml path")
    sweep.add_argument(
        "--backends", nargs="+", metavar="NAME[:OPT=V,...]", help="e.g. full local:window=256"
    )
    sweep.add_argument(
        "--seq-lens", nargs="+", type=positive_int, metavar="N", help="sequence lengths"
    )
    sweep.add_argument("--batch", nargs="+", type=positive_int, metavar="B", help="batch B")
    sweep.add_argument("--heads", nargs="+", type=positive_int, metavar="H", help="heads H")
    sweep.add_argument("--head-dim", nargs="+", type=positive_int, metavar="D", help="head dim")
    sweep.add_argument("--dtype", nargs="+", choices=list(DTYPES))
    sweep.add_argument("--device", nargs="+", choices=list(DEVICES), help="auto: cuda if available")
    causal = sweep.add_mutually_exclusive_group()
    causal.add_argument(
        "--causal", nargs="*", type=boolean, metavar="BOOL", help="alone: causal; or a list"
    )
    causal.add_argument("--no-causal", action="store_true", help="bidirectional only")
    sweep.add_argument(
        "--mode", nargs="+", choices=list(MODES), help="attention fwd, fwd+bwd, model step"
    )
    sweep.add_argument(
        "--threads", nargs="+", type=positive_int, metavar="T", help="CPU threads, pinned"
    )
    sweep.add_argument("--time-limit", type=positive_float, metavar="S", help="s per point")
    sweep.add_argument("--mem-limit", type=positive_int, metavar="MIB", help="MiB per point")
    sweep.add_argument(
        "--min-run-time", type=positive_float, metavar="S", help="timed s per point (all rounds)"
    )
    sweep.add_argument(
        "--rounds",
        type=positive_int,
        metavar="R",
        help="interleaved rounds per comparison group (each times every backend once)",
    )
    sweep.add_argument(
        "--passes",
        type=positive_int,
        metavar="P",
        help="passes through the sweep's groups that share out each group's rounds (at most R; "
        "more passes: a load lasting minutes touches fewer rounds of each group)",
    )
    sweep.add_argument(
        "--bracket-every",
        type=non_negative_int,
        metavar="K",
        help="time the group's sdpa (else full) again after every K backends of a round, and "
        "take each ratio against the sdpa timings beside it (0: once a round, like the others)",
    )
    sweep.add_argument(
        "--system-malloc",
        action="store_true",
        help="time with the C library's malloc as it comes: large freed blocks go back to the "
        "OS and their page faults count in the times (default: CPU workers keep freed memory, "
        "as CUDA's caching allocator does; effattn.bench.allocator)",
    )
    sweep.add_argument("--plugin", nargs="+", default=[], metavar="FILE.py",
                       help="Python files that register extra backends")  # fmt: skip
    sweep.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder of run folders")
    sweep.add_argument("--run-id", help="default: PRESET-DEVICE, plus a spec hash if overridden")
    sweep.add_argument(
        "--fresh", action="store_true", help="set earlier results of this run id aside first"
    )
    sweep.add_argument("--quiet", action="store_true", help="no table at the end")
    sweep.add_argument(
        "--workers",
        type=positive_int,
        default=1,
        metavar="N",
        help="points measured at once, one GPU each (CUDA only; CPU sweeps refuse N > 1)",
    )
    sweep.add_argument(
        "--executor",
        choices=["local", "submitit"],
        default="local",
        help="local: worker processes here; submitit: a Slurm job array",
    )
    slurm = sweep.add_argument_group("--executor submitit (Slurm through submitit)")
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

    report = sub.add_parser("report", help="Tay-style tables from one or several runs")
    report.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders or ids")
    report.add_argument("--format", nargs="+", choices=["md", "csv", "tex", "html"], default=["md"])
    report.add_argument("--out", type=Path, help="file prefix: writes PREFIX.md, PREFIX.csv, ...")
    report.add_argument(
        "--fidelity",
        type=Path,
        metavar="CSV",
        help="add the real-model cosine column from `effattn fidelity`'s CSV "
        "(e.g. reports/fidelity-cpu.csv)",
    )
    report.add_argument(
        "--merge",
        action="store_true",
        help="the runs as one (jobs or machines of one sweep): a row per point",
    )

    plot = sub.add_parser("plot", help="time, memory, speed-up, error and pattern plots")
    plot.add_argument("runs", nargs="+", type=Path, metavar="RUN", help="run folders or ids")
    plot.add_argument("--out", type=Path, default=Path("reports") / "plots", help="folder")
    plot.add_argument("--prefix", default=None, help="file name prefix (default: the run ids)")

    from effattn.bench import stats

    comp = sub.add_parser(
        "compare",
        help="what changed between two runs, significant or noise, and how well they agree",
        description="Compare RUN_B with RUN_A cell by cell: the change in time and in speed-up "
        "vs sdpa and vs full, each with its 95%% bootstrap interval; a summary line per metric; "
        "the share of cells that agree within --tolerance and that run A's repeat interval holds.",
    )
    comp.add_argument("run_a", type=Path, metavar="RUN_A", help="the baseline run (folder or id)")
    comp.add_argument("run_b", type=Path, metavar="RUN_B", help="the run compared with it")
    comp.add_argument(
        "--noise",
        type=float,
        default=stats.NOISE_PCT,
        metavar="PCT",
        help="changes smaller than PCT%% are noise (default %(default)g)",
    )
    comp.add_argument(
        "--tolerance",
        type=positive_float,
        default=stats.TOLERANCE_PCT,
        metavar="PCT",
        help="agreement: medians within PCT%% of each other (default %(default)g)",
    )
    comp.add_argument(
        "--fail-on-regression",
        type=float,
        metavar="PCT",
        help="exit 1 when a significant change for the worse exceeds PCT%%",
    )
    comp.add_argument(
        "--metric",
        choices=list(stats.METRICS),
        default="time",
        help="what --fail-on-regression looks at (default: time)",
    )
    comp.add_argument("--changed-only", action="store_true", help="list significant changes only")
    comp.add_argument("--out", type=Path, metavar="FILE.md", help="also write the comparison here")

    from effattn.fidelity import cli as fidelity_cli
    from effattn.quality import cli as quality_cli

    quality = sub.add_parser("quality", help="each backend's accuracy on trained tasks, and speed")
    quality_cli.add_arguments(quality)
    fidelity_cli.add_arguments(
        sub.add_parser("fidelity", help=fidelity_cli.HELP, description=fidelity_cli.DESCRIPTION)
    )

    peers = sub.add_parser(
        "peers",
        help="each backend beside the public implementation of its algorithm (benchmarks.peers)",
        description="Runs benchmarks.peers (from a source checkout, with the peers extra: "
        "pip install -c constraints.txt -e '.[peers]'); every other option is passed to it: "
        "--n, --threads, --repeats, --only, --out, ... (`effattn peers --peers-help` lists them).",
    )
    peers.add_argument(
        "--peers-help", action="store_true", help="show benchmarks.peers' own options and exit"
    )
    return parser


# -- commands --------------------------------------------------------------------------------
def cmd_list(args: argparse.Namespace) -> int:
    import pandas as pd

    import effattn

    rows = [effattn.backend_class(n).declaration() for n in effattn.list_backends()]
    table = pd.DataFrame(rows).drop(columns=["description"])
    print(table.to_markdown(index=False))
    print()
    for row in rows:
        print(f"- {row['backend']}: {row['description']}")
    return 0


def _sweep_spec(args: argparse.Namespace) -> tuple[Any, bool]:
    """The spec from the preset and the command line, and whether any axis was overridden."""
    import dataclasses

    from effattn.bench.spec import TINY_ENV, Grid, load_preset, tiny, with_overrides

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
        print(f"{TINY_ENV} is set: toy sizes (effattn.bench.spec.tiny)", file=sys.stderr)
        spec = tiny(spec)
    return spec, overridden


def cmd_sweep(args: argparse.Namespace) -> int:
    import dataclasses

    from effattn.bench import report, runner
    from effattn.bench.spec import expand
    from effattn.bench.worker import load_plugins

    spec, overridden = _sweep_spec(args)
    load_plugins(spec.plugins)
    strict = args.backends is not None  # a backend named on the command line must exist
    strict_device = args.device is not None  # and so must a device (a preset's may be absent)
    options = None
    if args.executor == "submitit":
        from effattn.bench import executors

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
    if args.fresh and (old := runner.archive_results(run_dir)) is not None:
        print(f"earlier results set aside: {old}", file=sys.stderr)
    if options is None:
        results = runner.run_sweep(
            spec, run_dir, strict=strict, strict_device=strict_device, workers=args.workers
        )
    else:
        from effattn.bench.store import environment, write_env

        run_dir.mkdir(parents=True, exist_ok=True)
        write_env(run_dir, environment((p.threads for p in points), dataclasses.asdict(spec)))
        results = executors.submit_sweep(spec, points, run_dir, options, cluster=args.cluster)
    if not args.quiet:
        print(report.render_markdown(report.load_runs([results.parent])))
    return 0


def _merged_run(runs: list[Path], folder: Path) -> Path:
    """The rows of ``runs`` as one run folder under ``folder`` (a row per point key, the latest
    wins), named RUN_A+RUN_B."""
    import json

    from effattn.bench import report
    from effattn.bench.store import RESULTS, merge_rows

    paths = [report.resolve_run(run) for run in runs]
    merged = folder / "+".join(p.parent.name for p in paths)
    merged.mkdir(parents=True)
    lines = [json.dumps(row, sort_keys=True) + "\n" for row in merge_rows(paths)]
    (merged / RESULTS).write_text("".join(lines))
    return merged


def cmd_report(args: argparse.Namespace) -> int:
    import tempfile

    from effattn.bench import report

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


def cmd_plot(args: argparse.Namespace) -> int:
    from effattn.bench import plots, report

    frame = report.load_runs(args.runs)
    prefix = args.prefix or "+".join(sorted(frame["run"].unique()))
    for path in plots.write_plots(frame, args.out, prefix):
        print(f"wrote {path}", file=sys.stderr)
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from effattn.bench import compare

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


def _source_root() -> Path:
    """The folder above the effattn package: a source checkout's root for an editable install."""
    return Path(__file__).resolve().parents[1]


def _peers_module():
    """benchmarks.peers, from the source checkout this effattn is installed from (an editable
    install: the repository root holds benchmarks/); a ValueError says so when there is none."""
    root = _source_root()
    if not (root / "benchmarks" / "peers.py").is_file():
        raise ValueError(
            f"the peer comparison lives in the source checkout's benchmarks/peers.py, which is "
            f"not installed with the package (none beside {Path(__file__).parent}): run it from "
            "a clone of effattn installed with pip install -c constraints.txt -e '.[peers]'"
        )
    found = importlib.util.find_spec("benchmarks")
    if found is None or Path(found.origin or "").resolve().parent != root / "benchmarks":
        sys.path.insert(0, str(root))  # the checkout's benchmarks, not another of that name
        sys.modules.pop("benchmarks", None)
        importlib.invalidate_caches()
    try:
        return importlib.import_module("benchmarks.peers")
    except ImportError as err:
        raise ValueError(
            f"benchmarks.peers could not be imported ({err}); the peers are the extra: "
            "pip install -c constraints.txt -e '.[peers]'"
        ) from err


def cmd_peers(args: argparse.Namespace, extra: list[str]) -> int:
    peers = _peers_module()
    peers.main(["--help"] if args.peers_help else extra)
    return 0


def cmd_quality(args: argparse.Namespace) -> int:
    from effattn.quality import cli as quality_cli

    return quality_cli.run(args)


def cmd_fidelity(args: argparse.Namespace) -> int:
    from effattn.fidelity import cli as fidelity_cli

    return fidelity_cli.run(args)


COMMANDS = {
    "list": cmd_list,
    "sweep": cmd_sweep,
    "report": cmd_report,
    "plot": cmd_plot,
    "compare": cmd_compare,
    "quality": cmd_quality,
    "fidelity": cmd_fidelity,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.command != "peers":
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.command == "peers":
            return cmd_peers(args, extra)
        return COMMANDS[args.command](args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"effattn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"effattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
