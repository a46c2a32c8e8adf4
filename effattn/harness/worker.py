"""Worker processes: a measurement in a process of its own, so that a crash, an out-of-memory or
a hang costs one cell, never the study.

Workers are forked from a multiprocessing *forkserver* that has imported torch and effattn once
(a fresh interpreter costs ~3 s on a 2-core machine; a fork from the server ~0.1 s).

- :class:`RunningWorker` starts ``target(conn, *args)`` and turns its answer, its death (a
  SIGKILL we did not send is the kernel's OOM killer: ``oom``) or its time limit (``timeout``)
  into a (status, reason, fields) triple;
- :class:`MemoryCap` caps the memory a step may grow by (RLIMIT_AS on CPU, the allocator's
  fraction on CUDA), so that an allocation beyond it fails as an out-of-memory error;
- :func:`failure` turns an exception into (status, reason): ``oom`` or ``crashed`` with where;
- :func:`redirect_output` sends a worker's stdout and stderr to a log file;
- :func:`load_plugins` imports user files that register extra backends.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import multiprocessing as mp
import os
import signal
import sys
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from effattn.harness.meters import MIB

try:
    import resource
except ImportError:  # Windows: no address-space limit, the parent's timeout still applies
    resource = None  # type: ignore[assignment]

_CONTEXT: mp.context.BaseContext | None = None


def _context(target_module: str) -> mp.context.BaseContext:
    """The forkserver context, or spawn where there is none. The server preloads torch and
    effattn (effattn.harness._preload) and the module of the first target it is asked for (a
    study's worker module), so that a forked worker starts warm."""
    global _CONTEXT
    if _CONTEXT is None:
        if "forkserver" in mp.get_all_start_methods():
            _CONTEXT = mp.get_context("forkserver")
            _CONTEXT.set_forkserver_preload(["effattn.harness._preload", target_module])
        else:
            _CONTEXT = mp.get_context("spawn")
    return _CONTEXT


def _signal_name(code: int) -> str:
    try:
        return signal.Signals(-code).name
    except ValueError:
        return f"signal {-code}"


@dataclasses.dataclass
class RunningWorker:
    """A worker process; :meth:`poll` gives its answer once there is one.

    :meth:`start_target` runs any ``target(conn, *args)`` that sends one dict ``{"status": ...,
    "reason": ..., **fields}`` over ``conn`` (the quality runs train one model per worker this
    way), with a time limit and crash/OOM statuses. A worker may also talk more (the sweep's
    group workers report round by round): its caller then reads ``conn`` itself and uses
    :meth:`dead` for a worker that died."""

    point: Any  # what the worker measures: any job of the caller's
    proc: mp.process.BaseProcess
    conn: Connection  # the parent's end of the pipe
    limit_s: float  # the job's time limit
    log: Path | None
    started: float = dataclasses.field(default_factory=time.monotonic)

    @classmethod
    def start_target(
        cls,
        job: Any,
        target: Callable[..., None],
        args: tuple,
        limit_s: float,
        log: Path | None = None,
    ) -> RunningWorker:
        """Fork a worker (from the forkserver) running ``target(conn, *args)`` for ``job``;
        ``target`` must be importable (a module-level function) and send one result dict."""
        ctx = _context(target.__module__)
        parent, child = ctx.Pipe(duplex=False)
        proc = ctx.Process(target=target, args=(child, *args), daemon=True)
        proc.start()
        child.close()
        return cls(job, proc, parent, limit_s, log)

    def waitables(self) -> list:
        return [self.conn, self.proc.sentinel]

    def deadline(self) -> float:
        return self.started + self.limit_s

    def poll(self) -> tuple[str, str, dict] | None:
        """(status, reason, measured fields) once the worker answered, died or ran out of time;
        None while it is still measuring."""
        if self.conn.poll(0):  # an answer, or EOF: the worker is gone
            try:
                result = self.conn.recv()
            except EOFError:
                result = None
            return self._finish(result)
        if not self.proc.is_alive():
            return self._finish(self.conn.recv() if self.conn.poll(0) else None)
        if time.monotonic() >= self.deadline():
            self.kill()
            return "timeout", f"over the time limit of {self.limit_s:g} s", {}
        return None

    def kill(self) -> None:
        """Kill the worker (SIGKILL) and wait for it."""
        self.proc.kill()
        self.proc.join()
        self.conn.close()

    def dead(self) -> tuple[str, str]:
        """(status, reason) of a worker that stopped without an answer: ``oom`` for a SIGKILL we
        did not send (the kernel's OOM killer), else ``crashed`` naming the signal or exit code."""
        status, reason, _ = self._finish(None)
        return status, reason

    def _finish(self, result: dict | None) -> tuple[str, str, dict]:
        self.conn.close()
        self.proc.join(timeout=30)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        if result is not None:
            return result.pop("status"), result.pop("reason"), result
        code = self.proc.exitcode
        if code == -signal.SIGKILL:
            return "oom", "killed by SIGKILL (likely the kernel's out-of-memory killer)", {}
        see = f" (see {self.log.name})" if self.log else ""
        if code is not None and code < 0:
            return "crashed", f"killed by {_signal_name(code)}{see}", {}
        return "crashed", f"worker exited with code {code} without a result{see}", {}


WORKER_LOG = "worker.log"  # the workers' stdout and stderr (profiler notes, crash messages)


_OOM_MARKERS = ("out of memory", "can't allocate memory", "cannot allocate memory")


def load_plugins(paths: tuple[str, ...] | list[str]) -> None:
    """Import each plugin file (it registers its backends as a side effect)."""
    for i, path in enumerate(paths):
        name = f"effattn_plugin_{i}_{Path(path).stem}"
        if name in sys.modules:
            continue
        spec = importlib.util.spec_from_file_location(name, path)
        if spec is None or spec.loader is None:
            raise ValueError(f"plugins: expected a Python file, got {path!r}")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)


def _address_space_bytes() -> int:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[0])
    return pages * resource.getpagesize()


class MemoryCap:
    """Context manager: cap further memory growth at ``mib`` MiB (see the module docstring)."""

    def __init__(self, device: str, mib: int) -> None:
        self.device, self.mib, self.saved = device, mib, None

    def __enter__(self) -> MemoryCap:
        budget = self.mib * MIB
        if self.device == "cuda":
            total = torch.cuda.get_device_properties(0).total_memory
            used = torch.cuda.memory_allocated()
            torch.cuda.set_per_process_memory_fraction(min(1.0, (used + budget) / total))
        elif resource is not None and Path("/proc/self/statm").exists():
            self.saved = resource.getrlimit(resource.RLIMIT_AS)
            hard = self.saved[1]
            soft = _address_space_bytes() + budget
            if hard != resource.RLIM_INFINITY:
                soft = min(soft, hard)
            resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)
        elif self.saved is not None:
            resource.setrlimit(resource.RLIMIT_AS, self.saved)


def is_oom(err: BaseException) -> bool:
    if isinstance(err, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(err).lower()
    return isinstance(err, RuntimeError) and any(m in text for m in _OOM_MARKERS)


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


def failure(err: BaseException) -> tuple[str, str]:
    """(status, reason) of a point that raised ``err``: oom or crashed, with where it raised."""
    if is_oom(err):
        return "oom", _first_line(err)
    tb = traceback.extract_tb(err.__traceback__)
    where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
    return "crashed", _first_line(err) + where


def redirect_output(log: Path | None, title: str) -> None:
    """Send this process's stdout and stderr (file descriptors 1 and 2, so C++ and library
    output too) to ``log``, appended, under a ``--- title (pid N)`` line; None: leave them."""
    if log is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    print(f"--- {title} (pid {os.getpid()})", flush=True)
