"""The worker: measures one point in a process of its own, so that a crash, an out-of-memory or a
hang costs one cell, never the sweep.

Workers are forked from a multiprocessing *forkserver* that has imported torch and effattn once
(a fresh interpreter costs ~3 s on the 2-core machine, i.e. minutes over a sweep; a fork from the
server costs ~0.1 s). Each worker:

1. loads the sweep's plugin files (extra backends), pins the CPU thread count;
2. builds its inputs, then caps its memory: on CPU the soft RLIMIT_AS is set to the address space
   it holds now plus ``settings.mem_limit_mib`` (Linux/macOS; an allocation beyond it fails with
   an out-of-memory error, which we report as ``oom``); on CUDA the allocator's per-process
   fraction is set to that many MiB;
3. times the point and measures its peak memory (effattn.bench.meters), lifts the cap, and for
   approximate backends measures the error against float64 ``full``;
4. sends one dict back over the pipe: {"status": "ok", ...measurement} or {"status": "oom" |
   "crashed", "reason": ...}.

The time limit is enforced by the parent (effattn.bench.runner), which kills the worker.

With several GPUs (``--workers N``) the parent gives each worker one GPU: the worker sets
``CUDA_VISIBLE_DEVICES`` first thing, before anything initialises CUDA (the forkserver never does),
so the point sees exactly one device, ``cuda:0``. Each answer names the device it ran on.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

import effattn
import effattn.backends  # noqa: F401
from effattn.bench import measure as measure_mod
from effattn.bench.meters import MIB
from effattn.bench.spec import Point, Settings

try:
    import resource
except ImportError:  # Windows: no address-space limit, the parent's timeout still applies
    resource = None  # type: ignore[assignment]

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


def _device_of(point: Point) -> dict[str, str]:
    """The name of the device the point ran on, and the GPU it was given (if any)."""
    from effattn.bench.store import _cpu_name

    gpu = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if point.device == "cuda":
        return {"device_name": torch.cuda.get_device_name(0), "gpu": gpu}
    return {"device_name": _cpu_name(), "gpu": ""}


def run_point(point: Point, settings: Settings, plugins: list[str]) -> dict[str, Any]:
    """Measure ``point`` in this process; never raises (a failure becomes a status)."""
    try:
        load_plugins(plugins)
        torch.set_num_threads(point.threads)
        torch.ones(64, 64) @ torch.ones(64, 64)  # start the thread pool before the cap
        torch.manual_seed(0)
        with MemoryCap(point.device, settings.mem_limit_mib):
            m = measure_mod.measure(point, settings)
        if measure_mod.wants_error(point, settings):
            m = dataclasses.replace(m, rel_error=measure_mod.relative_error(point))
        return {"status": "ok", "reason": "", **dataclasses.asdict(m), **_device_of(point)}
    except BaseException as err:  # report, never raise: the parent records a cell
        if is_oom(err):
            return {"status": "oom", "reason": _first_line(err)}
        tb = traceback.extract_tb(err.__traceback__)
        where = f" (at {Path(tb[-1].filename).name}:{tb[-1].lineno})" if tb else ""
        return {"status": "crashed", "reason": _first_line(err) + where}


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


def worker_main(
    conn: Connection,
    point: Point,
    settings: Settings,
    plugins: list[str],
    log: Path | None = None,
    gpu: str | None = None,
) -> None:
    """Process target: measure and send the result dict over ``conn``; stdout and stderr go to
    ``log`` (appended) when given; ``gpu`` (a CUDA_VISIBLE_DEVICES value) pins the one GPU the
    point may use."""
    if gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = gpu  # before CUDA is initialised in this process
    redirect_output(log, point.describe())
    result = run_point(point, settings, plugins)
    conn.send(result)
    conn.close()
