"""Sweeps beyond one process: the points of a sweep as a Slurm job array, through submitit.

    effattn sweep tay --executor submitit --partition gpu --gpus-per-task 1 --slurm-time 120

The driver (the ``effattn sweep`` process, on a login node) expands the sweep, drops the points
already in the results store (resume), splits the rest into at most ``array_parallelism`` array
tasks of whole curves (all N of one backend and shape, so a smaller N that ran out of budget still
cuts the larger ones), submits them and waits. Each task measures its points exactly as a local
sweep does (effattn.sweep.runner.measure_points: a worker process per comparison group, in
interleaved rounds, one group per GPU at a time) and appends its rows to the same results.jsonl (a
file lock keeps lines whole, see effattn.harness.store). A task whose curves lack a group's
baselines (``full``, ``sdpa``: another task's curves) times them beside its own points, without
rows, so that every ratio is taken within rounds. Every row names its host, device and job id.

A task that dies (killed, pre-empted, over its Slurm time limit, node failure) is submitted again
for its points that have no row yet, ``retries`` times; after that each such point gets a
``crashed`` row naming the task and its state, so no point is silently lost. Running the same
command again resumes.

submitit is optional (``pip install effattn[cluster]``) and imported only here, when used.
"""

from __future__ import annotations

import dataclasses
import sys
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from effattn.harness.rows import Row
from effattn.harness.store import RESULTS, ResultsFile
from effattn.sweep.spec import BASELINES, MODES, Point, SweepSpec, expand

SUBMITIT_DIR = "submitit"  # under the run folder: submitit's pickles and the tasks' logs
CLUSTERS = ("slurm", "local", "debug")  # submitit's: local = processes on this machine


@dataclass(frozen=True)
class SlurmOptions:
    """How the job array is submitted (command line, or a ``[slurm]`` table in a TOML file)."""

    partition: str | None = None  # Slurm partition; None: the cluster's default
    gpus_per_task: int = 1  # GPUs per array task; a task measures one point per GPU at a time
    time_min: int = 60  # each task's time limit, minutes (a task cut off is retried, resuming)
    array_parallelism: int = 16  # array tasks at most (and at once); each gets whole curves
    cpus_per_task: int | None = None  # CPU cores per task; None: the cluster's default
    mem_gb: float | None = None  # host memory per task; None: the cluster's default
    retries: int = 1  # times a dead task is submitted again for its unmeasured points
    extra: tuple[tuple[str, Any], ...] = ()  # other submitit parameters: (slurm_account, "x"), ...

    def __post_init__(self) -> None:
        for name in ("gpus_per_task", "retries"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"slurm.{name}: expected an integer >= 0, got {value!r}")
        for name in ("time_min", "array_parallelism"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"slurm.{name}: expected a positive integer, got {value!r}")
        for key, _ in self.extra:
            if not key.startswith("slurm_"):
                raise ValueError(f"slurm: expected an option or a slurm_* parameter, got {key!r}")

    def parameters(self, name: str) -> dict[str, Any]:
        """submitit.AutoExecutor.update_parameters arguments."""
        params: dict[str, Any] = {
            "name": name,
            "timeout_min": self.time_min,
            "gpus_per_node": self.gpus_per_task,
            "tasks_per_node": 1,
            "nodes": 1,
            "slurm_array_parallelism": self.array_parallelism,
        }
        if self.partition is not None:
            params["slurm_partition"] = self.partition
        if self.cpus_per_task is not None:
            params["cpus_per_task"] = self.cpus_per_task
        if self.mem_gb is not None:
            params["mem_gb"] = self.mem_gb
        return params | dict(self.extra)


def load_slurm_options(path: Path | None, **overrides: Any) -> SlurmOptions:
    """Options from a TOML file's ``[slurm]`` table (known fields; ``slurm_*`` keys go to
    submitit as they are), then the command line's ``overrides`` (None: not given)::

        [slurm]
        partition = "gpu"
        gpus_per_task = 1
        time_min = 120
        array_parallelism = 8
        slurm_account = "my-project"
    """
    values: dict[str, Any] = {}
    extra: dict[str, Any] = {}
    if path is not None:
        table = tomllib.loads(Path(path).read_text()).get("slurm")
        if not isinstance(table, dict):
            raise ValueError(f"slurm config {path}: expected a [slurm] table, got none")
        known = {f.name for f in dataclasses.fields(SlurmOptions)} - {"extra"}
        for key, value in table.items():
            (values if key in known else extra)[key] = value
    values.update({k: v for k, v in overrides.items() if v is not None})
    return SlurmOptions(**values, extra=tuple(sorted(extra.items())))


def cluster_points(spec: SweepSpec, options: SlurmOptions, *, strict: bool) -> list[Point]:
    """The sweep's points as they will run on the cluster's nodes: device ``auto`` means cuda
    when tasks get GPUs (this login node may have none), cpu otherwise."""
    target = "cuda" if options.gpus_per_task > 0 else "cpu"
    points: list[Point] = []
    for grid in spec.grids:
        for device in dict.fromkeys(target if d == "auto" else d for d in grid.device):
            one = dataclasses.replace(spec, grids=(dataclasses.replace(grid, device=("cpu",)),))
            found, _ = expand(one, strict=strict)  # axes checked here, CUDA not needed
            points += [dataclasses.replace(p, device=device) for p in found]
    return sorted(dict.fromkeys(points), key=lambda p: (MODES.index(p.mode), p.n))  # as expand


def split_curves(points: list[Point], tasks: int) -> list[list[Point]]:
    """At most ``tasks`` lists of whole curves (all N of one backend and shape), round robin,
    each in the sweep's order."""
    curves: dict[str, list[Point]] = {}
    for p in points:
        curves.setdefault(dataclasses.replace(p, n=0).key, []).append(p)
    chunks: list[list[Point]] = [[] for _ in range(min(tasks, len(curves)))]
    for i, curve in enumerate(curves.values()):
        chunks[i % len(chunks)].extend(curve)
    rank = {p.key: i for i, p in enumerate(points)}
    return [sorted(chunk, key=lambda p: rank[p.key]) for chunk in chunks]


@dataclass(frozen=True)
class MeasureTask:
    """One array task: measure ``points`` into ``run_dir`` (pickled by submitit, run on a node)."""

    spec: SweepSpec  # the sweep (settings and plugins)
    points: tuple[Point, ...]  # this task's points, whole curves
    run_dir: str  # the shared run folder
    references: tuple[Point, ...] = ()  # the sweep's baseline points (timed beside, no rows)

    def __call__(self) -> int:
        import torch

        from effattn.harness.worker import load_plugins
        from effattn.sweep.runner import gpu_slots, measure_points

        load_plugins(self.spec.plugins)
        points = list(self.points)
        on_gpu = all(p.device == "cuda" for p in points) and torch.cuda.is_available()
        slots = gpu_slots(torch.cuda.device_count() if on_gpu else 1, points)
        measure_points(
            points,
            self.spec,
            Path(self.run_dir),
            slots=slots,
            stream=sys.stdout,
            references=self.references,
        )
        return len(points)


def _executor(folder: Path, cluster: str | None, options: SlurmOptions, name: str) -> Any:
    try:
        import submitit
    except ImportError:
        raise ValueError(
            "executor: submitit is not installed (pip install 'effattn[cluster]' or submitit)"
        ) from None
    if cluster is not None and cluster not in CLUSTERS:
        raise ValueError(f"cluster: expected one of {', '.join(CLUSTERS)}, got {cluster!r}")
    executor = submitit.AutoExecutor(folder=folder, cluster=cluster)
    executor.update_parameters(**options.parameters(name))
    return executor


def submit_sweep(
    spec: SweepSpec,
    points: list[Point],
    run_dir: Path,
    options: SlurmOptions,
    *,
    cluster: str | None = None,
    stream: TextIO | None = None,  # None: sys.stderr at call time
) -> Path:
    """Measure ``points`` as a job array, wait for it, retry dead tasks, mark what is left.
    ``cluster``: submitit's (None: Slurm where sbatch exists, else local processes)."""
    stream = sys.stderr if stream is None else stream
    run_dir = Path(run_dir)
    results = ResultsFile(run_dir / RESULTS)
    executor = _executor(run_dir / SUBMITIT_DIR, cluster, options, f"effattn-{run_dir.name}")
    stream.write(f"executor: submitit ({executor.cluster}), logs in {run_dir / SUBMITIT_DIR}\n")
    failures: dict[str, str] = {}  # point key -> the last dead task that held it
    for attempt in range(options.retries + 1):
        done = {row["key"] for row in results.read()}
        todo = [p for p in points if p.key not in done]
        if not todo:
            break
        chunks = split_curves(todo, options.array_parallelism)
        baselines = tuple(p for p in points if p.label in BASELINES)
        tasks = [MeasureTask(spec, tuple(chunk), str(run_dir), baselines) for chunk in chunks]
        if executor.cluster != "slurm" and len(chunks) > 1 and any(p.device == "cpu" for p in todo):
            stream.write(
                "warning: several tasks time CPU points at once on this machine's shared cores; "
                "their timings measure each other (use --array-parallelism 1)\n"
            )
        with executor.batch():
            jobs = [executor.submit(task) for task in tasks]
        ids = ", ".join(job.job_id for job in jobs)
        stream.write(f"attempt {attempt + 1}: {len(todo)} points in {len(jobs)} tasks ({ids})\n")
        for job, chunk in zip(jobs, chunks, strict=True):
            try:
                job.result()
            except Exception as err:  # a dead task: its unmeasured points are retried or marked
                first = str(err).strip().splitlines()
                why = f"{job.state}: {first[0] if first else type(err).__name__}"[:200]
                stream.write(f"task {job.job_id} died ({why})\n")
                failures.update({p.key: f"task {job.job_id} {why}" for p in chunk})
    done = {row["key"] for row in results.read()}
    tries = options.retries + 1
    for point in points:
        if point.key not in done:
            reason = f"array task died before measuring it, {tries} attempt(s); last: "
            results.append(Row.make(point, "crashed", reason + failures.get(point.key, "?")))
    return results.path
