"""The results store: one run folder per sweep, an append-only JSON-lines file, the environment.

reports/runs/<run-id>/
    env.json        python, torch and triton versions, device and CPU names, threads, git commit,
                    the command line, the spec, the load average at the start and the end
    results.jsonl   one Row per line, appended, flushed and fsync'd one at a time

Several processes may append to one results file at once (``--workers``, the array tasks of
``--executor submitit``): each append holds an exclusive ``fcntl.flock`` on the file while it cuts
a torn tail and writes its line with one ``write()`` on an O_APPEND descriptor, so lines never
interleave (a line may exceed PIPE_BUF, the lock is what makes this safe; on NFS, Linux maps flock
to POSIX byte-range locks). A sweep killed at any moment leaves at worst a half-written last
line: it is ignored on read and cut off before the next append, so the point is measured again.

Every row says where it ran (``host``, ``device_name``, ``gpu``, ``job_id``), so rows of several
jobs or machines can be merged (:func:`merge_rows`: one row per point key, the latest wins).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

import torch

from effattn.bench import stats
from effattn.bench.allocator import meminfo_kib
from effattn.bench.spec import Point

try:
    import fcntl
except ImportError:  # Windows: no flock; one writer per results file there
    fcntl = None  # type: ignore[assignment]

RESULTS = "results.jsonl"
ENV = "env.json"
STATUSES = ("ok", "unsupported", "oom", "timeout", "crashed", "skipped")
RowT = TypeVar("RowT")
INTERVALS = {  # the stem of a row's interval columns (<stem>_lo, <stem>_hi) -> its median column
    "time_ms": "time_ms_median",
    "speedup_vs_full": "speedup_vs_full",
    "speedup_vs_sdpa": "speedup_vs_sdpa",
}


@dataclass(frozen=True)
class Row:
    """One result line: the point, what happened, and (status ok) what was measured."""

    key: str  # Point.key: identity for resuming
    backend: str  # registered name
    label: str  # name with options, ``local:window=256``
    options: dict[str, Any]  # the backend's options
    n: int  # sequence length N
    batch: int  # B
    heads: int  # H
    head_dim: int  # D
    dtype: str
    device: str
    causal: bool
    threads: int  # CPU intra-op threads while timing
    mode: str  # fwd, fwd_bwd, step
    status: str  # one of STATUSES
    reason: str = ""  # why, for every status but ok
    time_ms_median: float | None = None  # median of the timed runs of all rounds, ms per call
    time_ms_lo: float | None = None  # its 95% interval (effattn.bench.stats.median_interval)
    time_ms_hi: float | None = None
    time_ms_iqr: float | None = None  # interquartile range of the timed runs
    runs: int | None = None  # timed runs (blocks of calls), all rounds
    rounds: int | None = None  # interleaved rounds that timed this point
    times_ms: list[list[float]] | None = None  # per round, ms per call of each timed run
    speedup_vs_full: float | None = None  # full's time / this time: median over rounds
    speedup_vs_full_lo: float | None = None  # its 95% interval (bootstrap over rounds)
    speedup_vs_full_hi: float | None = None
    speedup_vs_full_rounds: list[float] | None = None  # the ratio of each round
    speedup_vs_sdpa: float | None = None  # sdpa's time / this time, likewise
    speedup_vs_sdpa_lo: float | None = None
    speedup_vs_sdpa_hi: float | None = None
    speedup_vs_sdpa_rounds: list[float] | None = None
    peak_mem_mib: float | None = None  # peak memory above the inputs, MiB = 2**20 bytes
    flops: int | None = None  # FLOPs of one call (effattn.bench.measure)
    gflop_per_s: float | None = None  # flops / median time
    tokens_per_s: float | None = None  # B * N / median time
    steps_per_s: float | None = None  # 1 / median time (calls per second)
    rel_error: float | None = None  # approximate backends: ||out - ref|| / ||ref||
    wall_s: float | None = None  # wall-clock seconds the worker took
    finished_at: str = ""  # UTC ISO time the row was written
    host: str = ""  # hostname of the machine that wrote the row
    device_name: str = ""  # the worker's CPU or GPU name ("" when no worker ran)
    gpu: str = ""  # CUDA_VISIBLE_DEVICES the worker ran with ("" when not set)
    job_id: str = ""  # Slurm (array) job id, or submitit's local job id; "" for a local sweep

    @classmethod
    def make(cls, point: Point, status: str, reason: str = "", **measured: Any) -> Row:
        time_ms = measured.get("time_ms_median")
        if status == "ok" and time_ms:
            seconds = time_ms / 1e3
            measured.setdefault("steps_per_s", 1 / seconds)
            measured.setdefault("tokens_per_s", point.batch * point.n / seconds)
            if measured.get("flops"):
                measured.setdefault("gflop_per_s", measured["flops"] / seconds / 1e9)
        return make_row(cls, STATUSES, point, status, reason, measured)


def make_row(
    cls: type[RowT],
    statuses: Sequence[str],
    point: Any,
    status: str,
    reason: str,
    measured: Mapping[str, Any],
) -> RowT:
    """A result row of dataclass ``cls`` (Row, effattn.quality.runner.QualityRow): the fields of
    ``point`` (a dataclass with ``key`` and ``label``; its option pairs as dicts), the status and
    its reason, the time and place it was written (:func:`where`), and those of ``measured``
    that ``cls`` has (the rest is dropped)."""
    if status not in statuses:
        raise ValueError(f"status: expected one of {', '.join(statuses)}, got {status!r}")
    fields = dataclasses.asdict(point)
    for name in fields:
        if name == "options" or name.endswith("_options"):  # (key, value) pairs -> a dict
            fields[name] = dict(getattr(point, name))
    known = {f.name for f in dataclasses.fields(cls)}
    measured = {**where(), **measured}
    return cls(
        key=point.key,
        label=point.label,
        status=status,
        reason=reason,
        finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **fields,
        **{k: v for k, v in measured.items() if k in known},
    )


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, float) and value != value)  # NaN


def repeat_intervals(row: Mapping[str, Any]) -> dict[str, stats.Interval]:
    """The 95% repeat interval (effattn.bench.stats.repeat_interval) of each median a row
    holds, by stem (INTERVALS): where a second run's median of that cell lands. Taken over the
    row's rounds: each round's median time (``times_ms``), or a ratio's per-round values (for a
    ratio, the rounds both sides measured); rounds without a timed run are left out. A row as a
    dict, or a pandas row (NaN for a missing value). A row without per-round values (a run
    older than rounds) or with a value that is not positive and finite has none: one odd row
    must not stop a report."""
    found = {}
    for stem, median in INTERVALS.items():
        value = row.get(median)
        if stem == "time_ms":
            rounds = row.get("times_ms")
            timed = [r for r in rounds if r] if isinstance(rounds, list) else []
            per_round = stats.round_medians(timed) if timed else None
        else:
            per_round = row.get(f"{stem}_rounds")
        if not _present(value) or not isinstance(per_round, list):
            continue
        try:
            interval = stats.repeat_interval(per_round, float(value))
        except ValueError:
            continue
        if interval is not None:
            found[stem] = interval
    return found


class ResultsFile:
    """Append-only JSON lines; reading tolerates (and appending removes) a torn last line."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def read(self) -> list[dict[str, Any]]:
        if not self.path.exists():
            return []
        rows = []
        for line in self.path.read_bytes().split(b"\n"):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line torn by a kill: the point is measured again
        return rows

    def _cut_torn_tail(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as f:
                f.truncate(data.rfind(b"\n") + 1)

    def append(self, row: Row) -> None:
        """Append one line, holding the file's lock (safe with concurrent writers)."""
        line = (json.dumps(dataclasses.asdict(row), sort_keys=True) + "\n").encode()
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX)
            self._cut_torn_tail()  # under the lock: a torn tail is a dead writer's
            os.write(fd, line)
            os.fsync(fd)
        finally:
            os.close(fd)  # releases the lock


def where() -> dict[str, str]:
    """Where this process runs: host and job id (Slurm array task, or submitit's local job)."""
    env = os.environ
    if env.get("SLURM_ARRAY_JOB_ID"):
        job = f"{env['SLURM_ARRAY_JOB_ID']}_{env.get('SLURM_ARRAY_TASK_ID', '')}"
    else:
        job = env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID") or ""
    return {"host": socket.gethostname(), "job_id": job}


def merge_rows(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """The rows of several results files as one: one row per point key, the one finished last
    (ties: the later file) wins. For runs of one sweep split over jobs or machines."""
    latest: dict[str, dict[str, Any]] = {}
    for path in paths:
        for row in ResultsFile(path).read():
            old = latest.get(row["key"])
            if old is None or row.get("finished_at", "") >= old.get("finished_at", ""):
                latest[row["key"]] = row
    return list(latest.values())


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args: str) -> str | None:
    root = Path(__file__).resolve().parents[2]
    try:
        out = subprocess.run(
            ["git", *args], cwd=root, capture_output=True, text=True, timeout=10, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip()


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (None where the OS has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except (AttributeError, OSError):
        return None


def flush_writes() -> float | None:
    """Write the file data the OS still holds in memory to disk (``os.sync``), before timing
    starts; returns how much there was, MiB (Dirty + Writeback of /proc/meminfo; None off
    Linux). A fresh install (a venv of torch) leaves hundreds of MiB to write back for minutes,
    and while it does, page faults slow down: ``full``, which allocates an (N, N) matrix a
    call, ran up to 2x slower in the first minutes of sweeps started right after one."""
    fields = meminfo_kib()
    pending = None
    if "Dirty" in fields and "Writeback" in fields:
        pending = round((fields["Dirty"] + fields["Writeback"]) / 1024, 1)
    if hasattr(os, "sync"):
        os.sync()
    return pending


def cpu_jiffies(stat: str | None = None) -> tuple[int, int] | None:
    """(busy, total) CPU time of the whole machine since boot, in clock ticks, from the ``cpu``
    line of /proc/stat (``stat``: its text; None reads it). Busy is all but idle and iowait.
    None where there is no /proc/stat."""
    if stat is None:
        try:
            with open("/proc/stat") as f:
                stat = f.read()
        except OSError:
            return None
    fields = stat.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 5:
        return None
    ticks = [int(x) for x in fields[1:9]]  # user nice system idle iowait irq softirq steal
    total = sum(ticks)
    return total - ticks[3] - (ticks[4] if len(ticks) > 4 else 0), total


def busy_cores(window_s: float = 0.25) -> float | None:
    """How many cores other work keeps busy right now: the machine's busy share of CPU time over
    the next ``window_s`` seconds, times the cores (None without /proc/stat). Unlike the load
    average, which still counts a job that ended a minute ago (the first of two back-to-back
    sweeps), it is what a sweep starting now would share the machine with."""
    first = cpu_jiffies()
    time.sleep(window_s)
    second = cpu_jiffies()
    if first is None or second is None or second[1] <= first[1]:
        return None
    share = (second[0] - first[0]) / (second[1] - first[1])
    return round(share * (os.cpu_count() or 1), 2)


def busy_warning(
    start: Sequence[float] | None,
    end: Sequence[float] | None,
    cpus: int,
    threads: int,
    busy_at_start: float | None = None,
) -> str | None:
    """A sentence when the machine was busy with other work, else None. Busy: more than what
    the sweep leaves free plus half a core busy at the start (``> cpus - threads + 0.5``; cores
    busy just before the sweep, :func:`busy_cores`, where known, else the 1-minute load
    average), or a 1-minute load average above every core plus half a core at the end, when
    the sweep's own threads count in it (``> cpus + 0.5``)."""
    free = max(cpus - threads, 0) + 0.5
    at_start = busy_at_start if busy_at_start is not None else (start[0] if start else None)
    over_start = at_start is not None and at_start > free
    over_end = end is not None and end[0] > cpus + 0.5
    if not (over_start or over_end):
        return None
    busy = "" if busy_at_start is None else f"{busy_at_start:g} cores busy at the start, "
    return (
        f"the machine was busy: {busy}load average (1, 5, 15 min) {start} at the start, {end} "
        f"at the end, on {cpus} CPUs with {threads} threads timing: other processes shared the "
        "cores, so times (less so the ratios taken within rounds) are slower and noisier"
    )


def environment(threads: Iterable[int], spec: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to trust (or distrust) the numbers."""
    cuda = torch.cuda.is_available()
    status = _git("status", "--porcelain")
    return {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "load_average_start": load_average(),
        "command": sys.argv,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "triton": _version("triton"),
        "effattn": _version("effattn"),
        "platform": platform.platform(),
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "threads": sorted(set(threads)),
        "cuda_device": torch.cuda.get_device_name(0) if cuda else None,
        "cuda_version": torch.version.cuda if cuda else None,
        "git_commit": _git("rev-parse", "HEAD"),
        "git_dirty": bool(status) if status is not None else None,
        "spec": spec,
    }


def write_env(run_dir: Path, env: dict[str, Any]) -> None:
    """env.json of the run; a resumed run appends its own start to ``resumed``."""
    path = Path(run_dir) / ENV
    if path.exists():
        old = json.loads(path.read_text())
        keys = ("started_at", "command", "git_commit", "load_average_start", "busy_cores_at_start")
        old.setdefault("resumed", []).append({k: env.get(k) for k in keys})
        env = old
    _write_json(path, env)


def finish_env(run_dir: Path) -> list[float] | None:
    """Record the end of this session of the run in env.json (``finished_at`` and
    ``load_average_end``, on its latest ``resumed`` entry when it resumed); returns the load."""
    path = Path(run_dir) / ENV
    env = json.loads(path.read_text())
    end = load_average()
    session = env["resumed"][-1] if env.get("resumed") else env
    session["finished_at"] = dt.datetime.now(dt.UTC).isoformat(timespec="seconds")
    session["load_average_end"] = end
    _write_json(path, env)
    return end


def _write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)
