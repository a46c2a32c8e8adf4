"""A fidelity run in the run store (effattn.harness.store): measured, resumed, and read back for
its report.

    reports/runs/<run-id>/      (default run id: fidelity-<device>)
        env.json        the environment (effattn.harness.machine.environment) with the spec: the
                        config and the settings asked for; once the corpus is loaded, ``corpus``
                        (modules, digest, python) and ``versions`` (torch, transformers, the
                        model package); each session's ``wall_s``, the seconds it spent measuring
        results.jsonl   one FidelityRow per setting, appended as soon as it is measured

:func:`run_fidelity` measures the points of a :class:`Plan` whose key has no row yet (a setting
whose backend is not registered here gets its ``unsupported`` row without a model); the corpus
and the models are loaded once, and only if a point is left. A point with a row is never
measured again, whatever its status (``--fresh`` sets the run aside and starts over). A resumed
run must measure what its rows measured: the same documents, N, batch size and device, and the
same corpus (another Python's standard library changes it); otherwise ValueError, before any row.

:func:`load_run` reads the run back as a FidelityRun, its rows in the plan's order: the report
of a run is rebuilt from it alone (``effattn fidelity --report-only``). The report's wall time is
the sum of the sessions' ``wall_s``, its threads and versions those of the first session.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TextIO

from effattn.fidelity.corpus import Corpus
from effattn.fidelity.grid import Setting, Skipped
from effattn.fidelity.measure import (
    FidelityConfig,
    FidelityPoint,
    FidelityRow,
    FidelityRun,
    measure,
    versions,
)
from effattn.harness.machine import busy_warning, environment
from effattn.harness.store import ENV, RESULTS, ResultsFile, archive_results, finish_env, write_env

MEASURED = ("documents", "seq_len", "batch_size", "device")  # config fields in every point's key


@dataclass(frozen=True)
class Plan:
    """What one command asks for: its config, its points in report order (the settings, then
    those of the grid this install cannot run), and why the latter cannot run."""

    config: FidelityConfig
    points: tuple[FidelityPoint, ...]
    not_registered: Mapping[str, str]  # point key -> reason, for backends not registered here

    @classmethod
    def of(cls, settings: list[Setting], skipped: list[Skipped], config: FidelityConfig) -> Plan:
        measured = [FidelityPoint.of(s, config) for s in settings]
        unknown = {FidelityPoint.of_skipped(s, config): s.reason for s in skipped}
        reasons = {point.key: reason for point, reason in unknown.items()}
        return cls(config, (*measured, *unknown), reasons)

    def spec(self) -> dict[str, Any]:
        """The spec of env.json: the config and the settings, as labels."""
        return {
            "config": _config_dict(self.config),
            "settings": [p.label for p in self.points if p.key not in self.not_registered],
            "not_registered": [p.label for p in self.points if p.key in self.not_registered],
        }


def prepare_run_dir(run_dir: Path, fresh: bool, stream: TextIO | None = None) -> None:
    """``--fresh``: set the run's earlier results aside (effattn.harness.store.archive_results)."""
    if fresh and (old := archive_results(run_dir)) is not None:
        (sys.stderr if stream is None else stream).write(f"earlier results set aside: {old}\n")


def run_fidelity(
    plan: Plan,
    run_dir: Path,
    progress: Callable[[str], None] | None = None,
) -> Path:
    """Measure every point of ``plan`` that ``run_dir`` has no row of; returns the results path.
    ``progress`` gets a line per step (the corpus, each exact pass, each row)."""
    say = progress or (lambda _line: None)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = ResultsFile(run_dir / RESULTS)
    done = {row["key"] for row in results.read()}
    if not done and (run_dir / ENV).exists():
        (run_dir / ENV).unlink()  # a session that wrote no row: the run starts anew
    elif done:
        _check_config(run_dir, plan.config)
    pending = [p for p in plan.points if p.key not in done]
    if len(pending) < len(plan.points):
        say(f"{run_dir.name}: {len(plan.points) - len(pending)} of {len(plan.points)} settings "
            f"already measured, {len(pending)} left")  # fmt: skip
    threads = plan.config.threads or _torch_threads()
    env = environment([threads], plan.spec())
    write_env(run_dir, env)
    wall = 0.0
    if pending:
        for point in pending:
            if point.key in plan.not_registered:
                row = FidelityRow.make(point, "unsupported", plan.not_registered[point.key])
                results.append(row)
                say(f"{row.label}: {row.status}: {row.reason}")
        started = time.perf_counter()
        measure(
            [p for p in pending if p.key not in plan.not_registered],
            plan.config,
            progress=say,
            on_row=results.append,
            on_corpus=lambda corpus: _record_corpus(run_dir, corpus),
        )
        wall = time.perf_counter() - started
    end = finish_env(run_dir)
    _record_session(run_dir, wall_s=wall)
    busy = busy_warning(env["load_average_start"], end, env.get("cpu_count") or 1, threads)
    if busy:
        say(f"warning: {busy}")
    return results.path


def load_run(plan: Plan, run_dir: Path) -> tuple[FidelityRun, list[str]]:
    """The run's rows of ``plan``'s points (the last row of a key), in the plan's order, with
    what env.json says they were measured on; and the labels of the points it has no row of.
    Raises ValueError when it has no row of any."""
    run_dir = Path(run_dir)
    if not (run_dir / RESULTS).is_file() or not (run_dir / ENV).is_file():
        raise ValueError(
            f"run: expected a run folder with {RESULTS} and {ENV}, got {run_dir} "
            "(measure it first: effattn fidelity without --report-only)"
        )
    stored = {row["key"]: row for row in ResultsFile(run_dir / RESULTS).read()}
    rows = [FidelityRow.from_record(stored[p.key]) for p in plan.points if p.key in stored]
    missing = [p.label for p in plan.points if p.key not in stored]
    if not rows:
        raise ValueError(
            f"run {run_dir}: expected rows of the settings asked for, got none of "
            f"{len(plan.points)} (a row's key holds the setting, documents, N, batch size and "
            "device: pass the options the run was made with)"
        )
    env = json.loads((run_dir / ENV).read_text())
    corpus = env.get("corpus") or {}
    sessions = [env, *env.get("resumed", [])]
    run = FidelityRun(
        rows=tuple(rows),
        corpus_modules=tuple(corpus.get("modules", ())),
        corpus_digest=corpus.get("digest", ""),
        python=corpus.get("python", env.get("python", "")),
        config=_config_of(env["spec"]["config"]),
        versions=env.get("versions") or {},
        wall_s=sum(session.get("wall_s") or 0.0 for session in sessions),
    )
    return run, missing


def _check_config(run_dir: Path, config: FidelityConfig) -> None:
    """The run's rows were measured with ``config``'s MEASURED fields (env.json says), or
    ValueError."""
    path = run_dir / ENV
    if not path.exists():
        return
    old = json.loads(path.read_text())["spec"]["config"]
    for name in MEASURED:
        if old.get(name) != getattr(config, name):
            raise ValueError(
                f"run {run_dir.name}: expected {name}={old.get(name)!r} (its rows were measured "
                f"so), got {name}={getattr(config, name)!r}; pass another --run-id, or --fresh "
                "to start it over"
            )


def _record_corpus(run_dir: Path, corpus: Corpus) -> None:
    """The corpus and the versions in env.json (the first session's); a resumed run whose
    corpus differs from its rows' raises ValueError."""
    env = json.loads((run_dir / ENV).read_text())
    old = env.get("corpus")
    if old is not None and old["digest"] != corpus.digest:
        raise ValueError(
            f"corpus: expected the run's (digest {old['digest'][:16]}, Python {old['python']}), "
            f"got digest {corpus.digest[:16]} (Python {corpus.python}); pass another --run-id, "
            "or --fresh to start it over"
        )
    facts = {"modules": list(corpus.modules), "digest": corpus.digest, "python": corpus.python}
    env.setdefault("corpus", facts)
    env.setdefault("versions", versions())
    _write_env(run_dir, env)


def _record_session(run_dir: Path, **fields: Any) -> None:
    """``fields`` on this session's entry of env.json (its latest ``resumed``, if any)."""
    env = json.loads((run_dir / ENV).read_text())
    session = env["resumed"][-1] if env.get("resumed") else env
    session.update(fields)
    _write_env(run_dir, env)


def _write_env(run_dir: Path, env: dict[str, Any]) -> None:
    path = run_dir / ENV
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(env, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def _config_dict(config: FidelityConfig) -> dict[str, Any]:
    fields = dataclasses.asdict(config)
    fields["model_root"] = None if config.model_root is None else str(config.model_root)
    return fields


def _config_of(fields: Mapping[str, Any]) -> FidelityConfig:
    known = {f.name for f in dataclasses.fields(FidelityConfig)}
    config = {k: v for k, v in fields.items() if k in known}
    if config.get("model_root") is not None:
        config["model_root"] = Path(config["model_root"])
    return FidelityConfig(**config)


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()
