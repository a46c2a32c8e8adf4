"""Quality specs: preset files and command-line overrides -> a list of training points.

A preset is a TOML file (effattn/quality/presets/<name>.toml, package data), in the style of the
sweep's presets::

    [settings]                 # budgets of each point's worker
    time_limit_s = 600
    [model]                    # ModelConfig: the same model for every backend
    d_model = 64
    [train]                    # TrainConfig: optimizer, steps, batch, evaluation sets
    steps = 400
    [[grid]]                   # one task at some N; every backend x N x direction x seed
    task = "mqar"
    task_options = { num_kv_pairs = 16, vocab_size = 128 }
    seq_lens = [256]
    backends = ["full", "local:window=32"]
    causal = [false]
    seeds = [0, 1]
    train = { steps = 600 }    # optional: this grid's changes to [train]

Backend options are part of the row label, as in the sweep, and are written per grid: a
backend's options are chosen for the grid's N so that it computes a real fraction of the pairs.

Direction: a backend that cannot run a direction the grid asks for (``xl`` is causal only,
``bigbird``, ``linformer``, ``nystrom`` are bidirectional only) runs the direction it supports
instead; its rows say so (``causal``). The data of every task is the same in both directions.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import tomllib
from dataclasses import dataclass, field
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any

from effattn.harness.presets import find_preset, presets_in, tuple_of
from effattn.harness.store import point_key
from effattn.quality.model import ModelConfig
from effattn.quality.tasks import make_task, task_class
from effattn.registry import BackendSpec, backend_class, parse_backend_spec

DEFAULT_PRESET = "quality"


def _positive(section: str, name: str, value: Any, kind: type = int) -> None:
    ok = isinstance(value, (int, float) if kind is float else int) and not isinstance(value, bool)
    if not ok or value <= 0:
        what = "a positive integer" if kind is int else "a positive number"
        raise ValueError(f"{section}.{name}: expected {what}, got {value!r}")


@dataclass(frozen=True)
class Settings:
    """The budget of each point's worker (not part of a point's identity)."""

    time_limit_s: float = 900.0  # wall-clock limit of one training run, worker start included
    mem_limit_mib: int = 4096  # address space a CPU worker may add once its model is built

    def __post_init__(self) -> None:
        _positive("settings", "time_limit_s", self.time_limit_s, float)
        _positive("settings", "mem_limit_mib", self.mem_limit_mib)


@dataclass(frozen=True)
class TrainConfig:
    """How every model is trained: the same for every backend of a grid."""

    batch: int = 32  # sequences per step
    steps: int = 400  # the step budget; test accuracy is taken at its end
    lr: float = 1e-3  # AdamW peak learning rate
    warmup: float = 0.1  # fraction of the steps with a linear warm-up, then cosine to 0
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # gradient norm clipping
    val_size: int = 256  # validation sequences (stream "val"), evaluated `evals` times
    test_size: int = 512  # test sequences (stream "test"), evaluated once, at the end
    evals: int = 4  # validation evaluations over the run (the last at the end)
    threads: int = 2  # torch intra-op threads, pinned in the worker

    def __post_init__(self) -> None:
        for name in ("batch", "steps", "val_size", "test_size", "evals", "threads"):
            _positive("train", name, getattr(self, name))
        _positive("train", "lr", self.lr, float)
        _positive("train", "grad_clip", self.grad_clip, float)
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"train.warmup: expected a fraction in [0, 1), got {self.warmup!r}")
        if not isinstance(self.weight_decay, (int, float)) or self.weight_decay < 0:
            raise ValueError(
                f"train.weight_decay: expected a number >= 0, got {self.weight_decay!r}"
            )


@dataclass(frozen=True)
class Grid:
    """One task: every backend x N x direction x seed is a point."""

    task: str  # a task name (effattn.quality.tasks.TASKS)
    seq_lens: tuple[int, ...]  # N
    backends: tuple[str, ...]  # backend specs, ``name[:opt=value,...]``
    task_options: tuple[tuple[str, Any], ...] = ()  # the task's options (sorted pairs)
    causal: tuple[bool, ...] = (False,)  # directions asked for (see the module docstring)
    seeds: tuple[int, ...] = (0,)  # model initialisation and training-data seeds
    train: tuple[tuple[str, Any], ...] = ()  # this grid's changes to the preset's [train]


@dataclass(frozen=True)
class QualitySpec:
    """A named quality run: budgets, the model, training, and the grids."""

    name: str
    settings: Settings = field(default_factory=Settings)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    grids: tuple[Grid, ...] = ()

    def digest(self) -> str:
        """8 hex digits identifying the spec (for run ids)."""
        blob = json.dumps(dataclasses.asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:8]


@dataclass(frozen=True)
class QualityPoint:
    """One training run: a backend on a task at N, one direction, one seed."""

    task: str
    task_options: tuple[tuple[str, Any], ...]  # sorted pairs
    n: int  # sequence length N
    backend: str
    options: tuple[tuple[str, Any], ...]  # the backend's options (sorted pairs)
    causal: bool
    seed: int
    model: ModelConfig
    train: TrainConfig

    @property
    def label(self) -> str:
        return BackendSpec(self.backend, self.options).label

    @property
    def key(self) -> str:
        """A stable identity for resuming: every field, as canonical JSON."""
        return point_key(self)

    def describe(self) -> str:
        direction = "causal" if self.causal else "bidirectional"
        return f"{self.task} N={self.n} {self.label} {direction} seed={self.seed}"


# -- presets ---------------------------------------------------------------------------------
def preset_names() -> list[str]:
    return presets_in("effattn.quality")


def preset_path(name: str) -> Traversable:
    """A quality preset name (``quality``) or a path to a TOML file."""
    return find_preset(name, "effattn.quality")


def _table(path: Path, section: str, raw: Any, cls: type) -> Any:
    """The dataclass ``cls`` from a TOML table, unknown keys named."""
    if not isinstance(raw, dict):
        raise ValueError(f"preset {path}: [{section}] must be a table, got {raw!r}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(raw) - set(known))
    if unknown:
        raise ValueError(
            f"preset {path}: unknown {section} {', '.join(map(repr, unknown))} "
            f"(valid: {', '.join(known)})"
        )
    return cls(**raw)


def load_preset(name: str) -> QualitySpec:
    """Read a preset file into a QualitySpec (its grids are checked by :func:`expand`)."""
    path = preset_path(name)
    data = tomllib.loads(path.read_text())
    unknown = set(data) - {"description", "settings", "model", "train", "grid"}
    if unknown:
        raise ValueError(f"preset {path}: unknown tables {sorted(unknown)}")
    settings = _table(path, "settings", data.get("settings", {}), Settings)
    model = _table(path, "model", data.get("model", {}), ModelConfig)
    train = _table(path, "train", data.get("train", {}), TrainConfig)
    grids = []
    for i, raw in enumerate(data.get("grid", [])):
        section = f"grid[{i}]"
        known = {f.name for f in dataclasses.fields(Grid)}
        if set(raw) - known:
            raise ValueError(
                f"preset {path}: {section} has unknown keys {sorted(set(raw) - known)}"
            )
        for key in ("task", "seq_lens", "backends"):
            if key not in raw:
                raise ValueError(f"preset {path}: {section} needs {key!r}")
        overrides = raw.get("train", {})
        _table(path, f"{section}.train", overrides, TrainConfig)  # names checked here
        grids.append(
            Grid(
                task=raw["task"],
                seq_lens=tuple_of(section, "seq_lens", raw["seq_lens"], int),
                backends=tuple_of(section, "backends", raw["backends"], str),
                task_options=tuple(sorted(raw.get("task_options", {}).items())),
                causal=tuple_of(section, "causal", raw.get("causal", [False]), bool),
                seeds=tuple_of(section, "seeds", raw.get("seeds", [0]), int),
                train=tuple(sorted(overrides.items())),
            )
        )
    if not grids:
        raise ValueError(f"preset {path}: expected at least one [[grid]] table, got none")
    return QualitySpec(path.stem, settings, model, train, tuple(grids))


def with_overrides(
    spec: QualitySpec,
    *,
    tasks: tuple[str, ...] | None = None,
    backends: tuple[str, ...] | None = None,
    seq_lens: tuple[int, ...] | None = None,
    seeds: tuple[int, ...] | None = None,
    train: dict[str, Any] | None = None,
    settings: dict[str, Any] | None = None,
) -> QualitySpec:
    """The spec with command-line choices: only the grids of ``tasks``; ``backends`` and
    ``seeds`` replacing those of every grid; ``train`` and ``settings`` fields replacing the
    preset's (and every grid's own ``train`` changes). ``seq_lens``: where the preset has
    every one of them, only those N (a grid without any is dropped: its backend options were
    sized for its N); otherwise they replace every grid's N."""
    grids = spec.grids
    if tasks is not None:
        for task in tasks:
            task_class(task)  # an unknown task raises, naming it
        grids = tuple(g for g in grids if g.task in tasks)
        if not grids:
            have = ", ".join(dict.fromkeys(g.task for g in spec.grids))
            raise ValueError(
                f"tasks: the preset {spec.name!r} has no grid of {', '.join(tasks)} (it has: "
                f"{have})"
            )
    if seq_lens is not None:
        have = {n for g in grids for n in g.seq_lens}
        if set(seq_lens) <= have:  # a choice among the preset's N
            keep = set(seq_lens)
            grids = tuple(
                dataclasses.replace(g, seq_lens=tuple(n for n in g.seq_lens if n in keep))
                for g in grids
                if keep & set(g.seq_lens)
            )
            seq_lens = None
    axes = {
        k: v
        for k, v in (("backends", backends), ("seq_lens", seq_lens), ("seeds", seeds))
        if v is not None
    }
    train = dict(train or {})
    if train:
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        unknown = sorted(set(train) - known)
        if unknown:
            raise ValueError(f"train: unknown {', '.join(unknown)} (valid: {', '.join(known)})")
    grids = tuple(
        dataclasses.replace(g, **axes, train=tuple(sorted({**dict(g.train), **train}.items())))
        for g in grids
    )
    return dataclasses.replace(
        spec,
        settings=dataclasses.replace(spec.settings, **(settings or {})),
        train=dataclasses.replace(spec.train, **train),
        grids=grids,
    )


def _direction(spec: BackendSpec, causal: bool) -> bool:
    """The direction ``spec`` runs when ``causal`` is asked: the other one where it has only
    that (see the module docstring)."""
    cls = backend_class(spec.name)
    if causal and not cls.supports_causal:
        return False
    if not causal and not cls.supports_bidirectional:
        return True
    return causal


def expand(spec: QualitySpec) -> list[QualityPoint]:
    """Every point of the spec, checked (unknown task, task option, backend or backend option
    raise ValueError naming it), in the order task (as in the preset), N, seed, backend, so
    that the points of one seed of a table come together and the table fills evenly."""
    points: list[QualityPoint] = []
    for i, grid in enumerate(spec.grids):
        task_options = dict(grid.task_options)
        for n in grid.seq_lens:
            if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
                raise ValueError(f"grid[{i}].seq_lens: expected positive integers, got {n!r}")
            make_task(grid.task, n, task_options)  # the task's own checks
        backends = [parse_backend_spec(text) for text in grid.backends]
        train = dataclasses.replace(spec.train, **dict(grid.train))
        for n in sorted(grid.seq_lens):
            for seed in grid.seeds:
                for b in backends:
                    for causal in grid.causal:
                        points.append(
                            QualityPoint(
                                task=grid.task,
                                task_options=grid.task_options,
                                n=n,
                                backend=b.name,
                                options=b.options,
                                causal=_direction(b, causal),
                                seed=seed,
                                model=spec.model,
                                train=train,
                            )
                        )
    return list(dict.fromkeys(points))
