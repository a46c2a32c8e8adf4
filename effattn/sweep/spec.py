"""Sweep specs: preset files and command-line axes -> a list of measurement points.

A preset is a TOML file (effattn/sweep/presets/<name>.toml, package data) with a ``[settings]``
table (budgets and repeats) and one or more ``[[grid]]`` tables; each grid is the product of its
axes, the sweep is the union of its grids::

    [settings]
    time_limit_s = 60          # per point, the whole worker process included
    [[grid]]
    backends = ["full", "sdpa", "local:window=256"]
    seq_lens = [1024, 2048]
    mode = ["fwd", "fwd_bwd"]

A backend is written ``name`` or ``name:opt=value,opt=value``; option values are typed from the
backend's dataclass fields (effattn.registry.parse_option_value).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import tomllib
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

import torch

from effattn._validate import FLOAT_DTYPES
from effattn.backend import dtype_name
from effattn.harness.presets import find_preset, presets_in, tuple_of
from effattn.harness.store import point_key
from effattn.registry import (
    BackendSpec,
    list_backends,
    parse_backend_spec,
)

MODES = ("fwd", "fwd_bwd", "step", "decode")
BASELINES = ("full", "sdpa")  # the labels every speed-up is taken against, within rounds
DTYPES = {dtype_name(d): d for d in FLOAT_DTYPES}  # float16, bfloat16, float32, float64
DEVICES = ("auto", "cpu", "cuda")


@dataclass(frozen=True)
class Settings:
    """How each point is measured and what budget it gets."""

    time_limit_s: float = 120.0  # wall-clock limit of one point: its set-up, rounds, memory
    mem_limit_mib: int = 8192  # address space a CPU worker may add after building its inputs
    min_run_time_s: float = 0.5  # timed seconds per point (CPU), split evenly over the rounds
    cuda_repeats: int = 20  # timed runs (blocks) per point on CUDA, split over the rounds
    rounds: int = 5  # interleaved rounds: each times every point of a comparison group once
    passes: int = 1  # the rounds of every group split over this many passes through the sweep
    bracket_every: int = 0  # > 0: the group's anchor (sdpa, else full) is timed again after
    # every this many points of a round, and each point's ratios use the anchor timings beside
    # it (effattn.sweep.runner); 0: the anchor is timed once a round, like every point
    error_max_n: int = 4096  # approximate backends: error vs float64 full up to this N
    step_layers: int = 2  # mode "step": encoder layers (d_model = heads * head_dim)
    step_ffn_mult: int = 2  # mode "step": feed-forward width = step_ffn_mult * d_model
    keep_freed_memory: bool = True  # CPU workers reuse freed memory (effattn.harness.allocator)

    def __post_init__(self) -> None:
        for name in ("time_limit_s", "mem_limit_mib", "min_run_time_s", "cuda_repeats"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"settings.{name}: expected a positive number, got {value!r}")
        if not isinstance(self.rounds, int) or isinstance(self.rounds, bool) or self.rounds < 1:
            raise ValueError(f"settings.rounds: expected a positive integer, got {self.rounds!r}")
        every = self.bracket_every
        if not isinstance(every, int) or isinstance(every, bool) or every < 0:
            raise ValueError(
                f"settings.bracket_every: expected an integer >= 0 (0: off), got {every!r}"
            )
        keep = self.keep_freed_memory
        if not isinstance(keep, bool):
            raise ValueError(f"settings.keep_freed_memory: expected true or false, got {keep!r}")
        passes = self.passes
        whole = isinstance(passes, int) and not isinstance(passes, bool)
        if not whole or not 1 <= passes <= self.rounds:
            raise ValueError(
                f"settings.passes: expected an integer from 1 to rounds ({self.rounds}), "
                f"got {passes!r}"
            )

    def pass_rounds(self) -> list[range]:
        """The rounds of each pass: ``rounds`` cut into ``passes`` contiguous runs, the longer
        first (10 rounds in 3 passes: 0-3, 4-6, 7-9)."""
        size, longer = divmod(self.rounds, self.passes)
        passes, start = [], 0
        for i in range(self.passes):
            stop = start + size + (i < longer)
            passes.append(range(start, stop))
            start = stop
        return passes


@dataclass(frozen=True)
class Grid:
    """One product of axes; every combination is a point."""

    backends: tuple[str, ...] = ("full", "sdpa")  # backend specs, ``name[:opt=value,...]``
    seq_lens: tuple[int, ...] = (1024,)  # N (queries = keys)
    batch: tuple[int, ...] = (1,)  # B
    heads: tuple[int, ...] = (8,)  # H
    head_dim: tuple[int, ...] = (64,)  # D
    dtype: tuple[str, ...] = ("float32",)  # names from DTYPES
    device: tuple[str, ...] = ("auto",)  # auto = cuda if available, else cpu
    causal: tuple[bool, ...] = (False,)
    threads: tuple[int, ...] = (2,)  # CPU intra-op threads, pinned while timing
    mode: tuple[str, ...] = ("fwd",)  # fwd, fwd_bwd, step, decode (one token at context N)
    kv_heads: tuple[int | None, ...] = (None,)  # Hkv, key/value heads (None: H); H % Hkv == 0
    kv_seq_lens: tuple[int | None, ...] = (None,)  # Nk, keys (None: N); cross-attention


@dataclass(frozen=True)
class Point:
    """One measurement: a backend with options at one shape, dtype, device and mode."""

    backend: str  # registered backend name
    options: tuple[tuple[str, Any], ...]  # its options (sorted pairs)
    n: int  # sequence length N (queries = keys)
    batch: int  # B
    heads: int  # H
    head_dim: int  # D
    dtype: str  # float16, bfloat16, float32, float64
    device: str  # cpu or cuda (resolved)
    causal: bool
    threads: int  # CPU intra-op threads
    mode: str  # fwd, fwd_bwd, step or decode
    kv_heads: int | None = None  # Hkv, key/value heads (None: H, no grouping)
    kv_n: int | None = None  # Nk, keys (None: N); the queries are N

    @property
    def label(self) -> str:
        return BackendSpec(self.backend, self.options).label

    @property
    def key(self) -> str:
        """A stable identity for resuming: the point's fields as canonical JSON (the key
        and value axes left out where they are None, so keys made before they existed hold)."""
        return point_key(self, unless_none=("kv_heads", "kv_n"))

    @property
    def keys(self) -> int:
        """Nk, the keys each query call attends over (decode: the context N)."""
        return self.n if self.kv_n is None else self.kv_n

    @property
    def key_heads(self) -> int:
        """Hkv, the key/value heads."""
        return self.heads if self.kv_heads is None else self.kv_heads

    @property
    def tokens(self) -> int:
        """Tokens one call processes: B * N, or B for a decoded token."""
        return self.batch if self.mode == "decode" else self.batch * self.n

    @property
    def group_key(self) -> str:
        """The comparison group: every axis but the backend (same N, B, H, D, dtype, device,
        causal, threads and mode). The points of a group are timed in interleaved rounds."""
        return dataclasses.replace(self, backend="", options=()).key

    def describe(self) -> str:
        causal = " causal" if self.causal else ""
        kv_heads = "" if self.kv_heads is None else f" Hkv={self.kv_heads}"
        kv_n = "" if self.kv_n is None else f" Nk={self.kv_n}"
        return (
            f"{self.mode} {self.label} N={self.n}{kv_n} B={self.batch} H={self.heads}"
            f"{kv_heads} D={self.head_dim} {self.dtype} {self.device}{causal}"
        )


@dataclass(frozen=True)
class SweepSpec:
    """A named sweep: settings, grids, and plugin files (extra backends, imported by workers)."""

    name: str  # preset name, used in the default run id
    settings: Settings = field(default_factory=Settings)
    grids: tuple[Grid, ...] = (Grid(),)
    plugins: tuple[str, ...] = ()  # paths of .py files that register extra backends

    def digest(self) -> str:
        """8 hex digits identifying the spec (for run ids)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


# -- presets ---------------------------------------------------------------------------------


def preset_names() -> list[str]:
    return presets_in("effattn.sweep")


def preset_path(name: str) -> Traversable:
    """A sweep preset name (``tay``) or a path to a TOML file."""
    return find_preset(name, "effattn.sweep")


def load_preset(name: str) -> SweepSpec:
    """Read a preset file into a SweepSpec (its axes are checked by :func:`expand`)."""
    path = preset_path(name)
    data = tomllib.loads(path.read_text())
    unknown = set(data) - {"description", "settings", "grid", "plugins"}
    if unknown:
        raise ValueError(f"preset {path}: unknown tables {sorted(unknown)}")
    settings_fields = {f.name for f in dataclasses.fields(Settings)}
    raw_settings = data.get("settings", {})
    if set(raw_settings) - settings_fields:
        raise ValueError(
            f"preset {path}: unknown settings {sorted(set(raw_settings) - settings_fields)} "
            f"(valid: {', '.join(sorted(settings_fields))})"
        )
    grid_types = {f.name: f.default for f in dataclasses.fields(Grid)}
    grids = []
    for i, raw in enumerate(data.get("grid", [])):
        section = f"grid[{i}]"
        if set(raw) - set(grid_types):
            raise ValueError(
                f"preset {path}: {section} has unknown axes {sorted(set(raw) - set(grid_types))}"
            )
        axes = {
            key: tuple_of(section, key, value, _axis_type(grid_types[key][0]))
            for key, value in raw.items()
        }
        grids.append(Grid(**axes))
    if not grids:
        raise ValueError(f"preset {path}: expected at least one [[grid]] table, got none")
    plugins = tuple(str((path.parent / p).resolve()) for p in data.get("plugins", []))
    return SweepSpec(path.stem, Settings(**raw_settings), tuple(grids), plugins)


def with_overrides(
    spec: SweepSpec, axes: dict[str, tuple], settings: dict[str, Any], plugins: tuple[str, ...]
) -> SweepSpec:
    """The spec with command-line axes replacing the same axes of every grid."""
    grids = tuple(dataclasses.replace(g, **axes) for g in spec.grids)
    return SweepSpec(
        spec.name,
        dataclasses.replace(spec.settings, **settings),
        grids,
        spec.plugins + tuple(str(Path(p).resolve()) for p in plugins),
    )


TINY_ENV = "EFFATTN_SWEEP_TINY"  # set (to anything but "" or "0"): every sweep runs tiny()


def tiny(spec: SweepSpec) -> SweepSpec:
    """The same sweep at toy sizes, for the tests that run every command the README shows:
    each grid's two smallest N divided by 16 (at least 16; Nk too), B=1, H=2 (Hkv=1 where
    grouped), D=16, one thread (two threads on shared, busy cores wait on each other for whole
    time slices), 2 rounds of 5 ms."""
    grids = tuple(
        dataclasses.replace(
            g,
            seq_lens=tuple(sorted({max(16, n // 16) for n in sorted(g.seq_lens)[:2]})),
            batch=(1,),
            heads=(2,),
            head_dim=(16,),
            threads=(1,),
            kv_heads=tuple(dict.fromkeys(None if h is None else 1 for h in g.kv_heads)),
            kv_seq_lens=tuple(
                dict.fromkeys(None if n is None else max(16, n // 16) for n in g.kv_seq_lens)
            ),
        )
        for g in spec.grids
    )
    settings = dataclasses.replace(
        spec.settings,
        min_run_time_s=0.01,
        rounds=2,
        passes=min(spec.settings.passes, 2),
        cuda_repeats=2,
    )
    return dataclasses.replace(spec, settings=settings, grids=grids)


# -- expansion -------------------------------------------------------------------------------
def resolve_device(device: str) -> str:
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {', '.join(DEVICES)}, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device: cuda was asked for, but torch.cuda.is_available() is False")
    return device


def _axis_type(default: Any) -> type:
    """The type of a preset axis' values, from its default (None: an optional int axis)."""
    return int if default is None else type(default)


def _check_key_axes(grid: Grid) -> None:
    """kv_heads divide every H; kv_seq_lens are positive; neither in modes that cannot take
    them (decode: the context is N; step: the encoder's own heads)."""
    for name, values in (("kv_heads", grid.kv_heads), ("kv_seq_lens", grid.kv_seq_lens)):
        given = tuple(v for v in values if v is not None)
        _check_positive(name, given)
        if given and name == "kv_seq_lens" and "decode" in grid.mode:
            raise ValueError("kv_seq_lens: mode decode attends over its context N; got Nk values")
        if given and "step" in grid.mode:
            raise ValueError(f"{name}: mode step runs an encoder of its own; got {list(given)}")
    if "decode" in grid.mode and False in grid.causal:
        raise ValueError("causal: mode decode decodes causally; expected causal = [true]")
    for heads in grid.heads:
        for kv_heads in grid.kv_heads:
            if kv_heads is not None and heads % kv_heads:
                raise ValueError(
                    f"kv_heads: expected divisors of every H {list(grid.heads)}, got {kv_heads}"
                )


def _check_positive(name: str, values: tuple) -> None:
    for v in values:
        if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
            raise ValueError(f"{name}: expected positive integers, got {v!r}")


def expand(
    spec: SweepSpec, *, strict: bool, strict_device: bool | None = None
) -> tuple[list[Point], list[str]]:
    """All points of the spec, ordered mode, then N ascending, then backend (so backends are
    interleaved and a smaller N of a curve is measured before a larger one).

    strict: an unknown backend raises (command line); otherwise it is left out with a message
    (presets list backends that may not be installed yet). strict_device (default: strict): a
    device this machine lacks raises (asked for on the command line); otherwise its grid is
    left out with a message (a preset's cuda grid on a CPU machine, even when the command line
    replaced its backends). Returns (points, messages).
    """
    strict_device = strict if strict_device is None else strict_device
    points: list[Point] = []
    messages: list[str] = []
    installed = set(list_backends())
    for grid in spec.grids:
        for name in ("seq_lens", "batch", "heads", "head_dim", "threads"):
            _check_positive(name, getattr(grid, name))
        _check_key_axes(grid)
        for m in grid.mode:
            if m not in MODES:
                raise ValueError(f"mode: expected one of {', '.join(MODES)}, got {m!r}")
        for d in grid.dtype:
            if d not in DTYPES:
                raise ValueError(f"dtype: expected one of {', '.join(DTYPES)}, got {d!r}")
        devices = []
        for d in grid.device:
            try:
                devices.append(resolve_device(d))
            except ValueError as err:
                if strict_device or d not in DEVICES:
                    raise
                messages.append(f"skipping a grid of {', '.join(grid.backends)}: {err}")
        if not devices:
            continue
        backends = []
        for text in grid.backends:
            name = text.partition(":")[0].strip()
            if name not in installed and not strict:
                messages.append(f"skipping backend {text!r}: not installed")
                continue
            backends.append(parse_backend_spec(text))
        names = ("mode", "n", "batch", "heads", "head_dim", "dtype", "device", "causal")
        names += ("kv_heads", "kv_n")
        axes = (grid.mode, sorted(grid.seq_lens), grid.batch, grid.heads, grid.head_dim)
        axes += (grid.dtype, devices, grid.causal, grid.kv_heads, grid.kv_seq_lens)
        for b in backends:
            for combo in itertools.product(*axes, grid.threads):
                fields = dict(zip((*names, "threads"), combo, strict=True))
                points.append(Point(backend=b.name, options=b.options, **fields))
    unique = list(dict.fromkeys(points))
    order = {m: i for i, m in enumerate(MODES)}
    unique.sort(key=lambda p: (order[p.mode], p.n))  # stable: keeps the backend order
    return unique, list(dict.fromkeys(messages))
