"""The results store: one run folder per sweep, an append-only JSON-lines file, the environment.

reports/runs/<run-id>/
    env.json        python, torch and triton versions, device and CPU names, threads, git commit,
                    the command line, the spec
    results.jsonl   one Row per line, appended, flushed and fsync'd one at a time

A sweep killed at any moment leaves at worst a half-written last line: it is ignored on read and
cut off before the next append, so the point is measured again.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch

from effattn.bench.spec import Point

RESULTS = "results.jsonl"
ENV = "env.json"
STATUSES = ("ok", "unsupported", "oom", "timeout", "crashed", "skipped")


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
    time_ms_median: float | None = None  # median of warm runs
    time_ms_iqr: float | None = None  # interquartile range of warm runs
    runs: int | None = None  # timed runs
    peak_mem_mib: float | None = None  # peak memory above the inputs, MiB = 2**20 bytes
    flops: int | None = None  # FLOPs of one call (effattn.bench.measure)
    gflop_per_s: float | None = None  # flops / median time
    tokens_per_s: float | None = None  # B * N / median time
    steps_per_s: float | None = None  # 1 / median time (calls per second)
    rel_error: float | None = None  # approximate backends: ||out - ref|| / ||ref||
    wall_s: float | None = None  # wall-clock seconds the worker took
    finished_at: str = ""  # UTC ISO time the row was written

    @classmethod
    def make(cls, point: Point, status: str, reason: str = "", **measured: Any) -> Row:
        if status not in STATUSES:
            raise ValueError(f"status: expected one of {', '.join(STATUSES)}, got {status!r}")
        fields = dataclasses.asdict(point)
        fields["options"] = dict(point.options)
        time_ms = measured.get("time_ms_median")
        if status == "ok" and time_ms:
            seconds = time_ms / 1e3
            measured.setdefault("steps_per_s", 1 / seconds)
            measured.setdefault("tokens_per_s", point.batch * point.n / seconds)
            if measured.get("flops"):
                measured.setdefault("gflop_per_s", measured["flops"] / seconds / 1e9)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(
            key=point.key,
            label=point.label,
            status=status,
            reason=reason,
            finished_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            **fields,
            **{k: v for k, v in measured.items() if k in known},
        )


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
        self._cut_torn_tail()
        line = json.dumps(dataclasses.asdict(row), sort_keys=True) + "\n"
        with open(self.path, "ab") as f:
            f.write(line.encode())
            f.flush()
            os.fsync(f.fileno())


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


def environment(threads: Iterable[int], spec: dict[str, Any]) -> dict[str, Any]:
    """What a reader needs to trust (or distrust) the numbers."""
    cuda = torch.cuda.is_available()
    status = _git("status", "--porcelain")
    return {
        "started_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
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
        old.setdefault("resumed", []).append(
            {k: env[k] for k in ("started_at", "command", "git_commit")}
        )
        env = old
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(env, indent=2, default=str) + "\n")
    os.replace(tmp, path)
