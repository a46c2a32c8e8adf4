"""The run store, one format for every study: a run folder with an append-only JSON-lines file
of rows and the environment it ran in.

reports/runs/<run-id>/
    env.json        python, torch and triton versions, device and CPU names, threads, git commit,
                    the command line, the spec, the load average at the start and the end
                    (effattn.harness.machine.environment)
    results.jsonl   one row per line, appended, flushed and fsync'd one at a time

A row is a frozen dataclass (the timing row effattn.harness.rows.Row of the sweep and the
benchmark scripts, a study's own: effattn.quality.runner.QualityRow) made by :func:`make_row`:
the point's fields, a status and its reason, and what was measured.

Several processes may append to one results file at once (``--workers``, the array tasks of
``--executor submitit``): each append holds an exclusive ``fcntl.flock`` on the file while it cuts
a torn tail and writes its line with one ``write()`` on an O_APPEND descriptor, so lines never
interleave (a line may exceed PIPE_BUF, the lock is what makes this safe; on NFS, Linux maps flock
to POSIX byte-range locks). A run killed at any moment leaves at worst a half-written last
line: it is ignored on read and cut off before the next append, so the point is measured again.

Every row says where it ran (``host``, ``job_id``; the sweep's also ``device_name``, ``gpu``), so
rows of several jobs or machines can be merged (:func:`merge_rows`: one row per point key, the
latest wins).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import socket
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import pandas as pd

from effattn.harness.machine import load_average

try:
    import fcntl
except ImportError:  # Windows: no flock; one writer per results file there
    fcntl = None  # type: ignore[assignment]

RESULTS = "results.jsonl"
ENV = "env.json"
RUNS_DIR = Path("reports") / "runs"  # where run ids live, relative to the working directory
RowT = TypeVar("RowT")


def make_row(
    cls: type[RowT],
    statuses: Sequence[str],
    point: Any,
    status: str,
    reason: str,
    measured: Mapping[str, Any],
) -> RowT:
    """A result row of dataclass ``cls`` (effattn.harness.rows.Row, QualityRow, ...): the fields
    of ``point`` that ``cls`` has (``point``: a dataclass with ``key`` and ``label``; its option
    pairs as dicts, a nested dataclass as a dict), the status and its reason, the time and place
    it was written (:func:`where`), and those of ``measured`` that ``cls`` has (the rest of
    both is dropped: a benchmark case's ``build`` callable, say)."""
    if status not in statuses:
        raise ValueError(f"status: expected one of {', '.join(statuses)}, got {status!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    own = {"key", "label", "status", "reason", "finished_at"}
    fields = {}
    for f in dataclasses.fields(point):
        if f.name not in known or f.name in own:
            continue
        value = getattr(point, f.name)
        if f.name == "options" or f.name.endswith("_options"):  # (key, value) pairs -> a dict
            value = dict(value)
        elif dataclasses.is_dataclass(value):
            value = dataclasses.asdict(value)
        fields[f.name] = value
    measured = {**where(), **measured}
    return cls(
        key=point.key,
        label=point.label,
        status=status,
        reason=reason,
        finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        **fields,
        **{k: v for k, v in measured.items() if k in known and k not in fields},
    )


def point_key(point: Any, *, unless_none: Sequence[str] = ()) -> str:
    """A point's identity for resuming: its fields (a dataclass) as canonical JSON, leaving out
    the fields of ``unless_none`` that are None (axes added later, so older keys still hold)."""
    fields = dataclasses.asdict(point)
    for name in unless_none:
        if fields[name] is None:
            del fields[name]
    return json.dumps(fields, sort_keys=True, default=list)


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

    def append(self, row: Any) -> None:
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


def archive_results(run_dir: Path) -> Path | None:
    """Move an earlier results file aside (``--fresh``); returns its new path."""
    path = Path(run_dir) / RESULTS
    if not path.exists():
        return None
    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    target = path.with_name(f"results-{stamp}.jsonl.old")
    path.rename(target)
    env = Path(run_dir) / ENV
    if env.exists():
        env.rename(env.with_name(f"env-{stamp}.json.old"))
    return target


def resolve_run(path: Path | str) -> Path:
    """A run folder, its results.jsonl, or a run id under reports/runs/."""
    path = Path(path)
    for candidate in (path, RUNS_DIR / path):
        if candidate.is_file() and candidate.name.endswith(".jsonl"):
            return candidate
        if (candidate / RESULTS).is_file():
            return candidate / RESULTS
    raise FileNotFoundError(f"run: expected a run folder with {RESULTS} or a run id, got {path}")


def read_runs(paths: Iterable[Path | str]) -> pd.DataFrame:
    """The rows of the runs (run folders, results files or run ids under reports/runs/) as
    they are, one per key (the last row of a key wins), with ``run`` and ``run_dir`` first."""
    frames = []
    for path in paths:
        results = resolve_run(path)
        rows = ResultsFile(results).read()
        if not rows:
            raise ValueError(f"run: {results} holds no rows yet")
        frame = pd.DataFrame(rows).drop_duplicates("key", keep="last")
        frame.insert(0, "run", results.parent.name)
        frame.insert(1, "run_dir", str(results.parent))
        frames.append(frame)
    return pd.concat(frames, ignore_index=True)
