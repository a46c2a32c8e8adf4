"""The built wheel works on its own: installed into a clean virtual environment, with no source
tree on the path, ``effattn list``, ``effattn sweep smoke``, ``effattn report`` and
``effattn quality quality-smoke`` run at toy sizes in a scratch folder (issue #30).

The wheel is built from a copy of the checkout (so that the build writes nothing into it), and
the environment is built once for the module: torch from constraints.txt first (the local CPU
wheel; an unpinned torch would pull a multi-GB CUDA build), then the wheel with its
dependencies. EFFATTN_SKIP_WHEEL_TEST=1 skips the module.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

from effattn.sweep.spec import TINY_ENV

ROOT = Path(__file__).resolve().parents[1]
SKIP_ENV = "EFFATTN_SKIP_WHEEL_TEST"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.environ.get(SKIP_ENV, "") not in ("", "0"), reason=f"{SKIP_ENV} is set"),
]

# What a build from a checkout must not copy: environments, caches, outputs, version control.
NOT_COPIED = shutil.ignore_patterns(
    ".git", ".venv*", "build", "dist", "*.egg-info", "__pycache__", ".*_cache", "reports"
)
# A package directory (in the source tree) and its name in the installed package.
PACKAGE_DIRS = {"effattn": "effattn", "kernels": "effattn/kernels"}
PRESET_DIRS = ("effattn/sweep/presets", "effattn/quality/presets")


def run_command(
    command: list[str | Path], *, cwd: Path, env: dict[str, str] | None = None, timeout: int = 600
) -> subprocess.CompletedProcess:
    """Run ``command``; on a non-zero exit, fail with its command line and the tail of its
    output."""
    done = subprocess.run(
        [str(c) for c in command], cwd=cwd, env=env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    if done.returncode != 0:
        tail = "\n".join((done.stdout + "\n" + done.stderr).strip().splitlines()[-40:])
        pytest.fail(
            f"exit {done.returncode}: {' '.join(map(str, command))}\n(cwd {cwd})\n{tail}",
            pytrace=False,
        )
    return done


def clean_environment(venv_dir: Path) -> dict[str, str]:
    """This process's environment without anything that points into the source tree or its
    environment (PYTHONPATH, VIRTUAL_ENV, PWD, PATH entries) or sets an effattn option, with the
    clean environment's bin/ first on PATH."""
    dropped = {"PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "VIRTUAL_ENV", "PWD", "OLDPWD"}
    source = str(ROOT)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in dropped and not k.startswith("EFFATTN_") and source not in v
    }
    here = Path(sys.prefix).resolve()
    path = [
        p
        for p in os.environ.get("PATH", "").split(os.pathsep)
        if p and source not in p and not Path(p).resolve().is_relative_to(here)
    ]
    env["PATH"] = os.pathsep.join([str(venv_dir / "bin"), *path])
    env["PYTHONNOUSERSITE"] = "1"  # no ~/.local packages either
    return env


@dataclass(frozen=True)
class Installed:
    """A clean virtual environment with the wheel installed, and a scratch folder to work in."""

    venv: Path  # the environment's root
    env: dict[str, str]  # the environment variables its commands run with
    work: Path  # a folder outside the checkout: the working directory of every command

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"

    def effattn(self, *args: str, **extra_env: str) -> subprocess.CompletedProcess:
        return run_command(
            [self.venv / "bin" / "effattn", *args], cwd=self.work, env={**self.env, **extra_env}
        )


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The wheel, built from a copy of the checkout without build isolation when this
    environment has setuptools (no download), else with it."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "source"
    shutil.copytree(ROOT, source, ignore=NOT_COPIED)
    isolation = [] if importlib.util.find_spec("setuptools") is None else ["--no-build-isolation"]
    run_command(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *isolation, "-w", root / "dist",
         source],
        cwd=root,
    )  # fmt: skip
    (built,) = (root / "dist").glob("effattn-*.whl")
    return built


@pytest.fixture(scope="module")
def installed(wheel: Path, tmp_path_factory: pytest.TempPathFactory) -> Installed:
    """A fresh virtual environment: torch from constraints.txt, then the wheel and its
    dependencies."""
    root = tmp_path_factory.mktemp("clean")
    venv_dir = root / "venv"
    venv.EnvBuilder(with_pip=True, clear=True).create(venv_dir)
    env = clean_environment(venv_dir)
    pip = [venv_dir / "bin" / "python", "-m", "pip", "install", "-q"]
    run_command([*pip, "-c", ROOT / "constraints.txt", "torch"], cwd=root, env=env)
    run_command([*pip, "-c", ROOT / "constraints.txt", wheel], cwd=root, env=env)
    work = root / "work"
    work.mkdir()
    return Installed(venv_dir, env, work)


@pytest.fixture(scope="module")
def sweep_run(installed: Installed) -> Path:
    """``effattn sweep smoke`` at toy sizes, in the scratch folder; its run folder."""
    installed.effattn("sweep", "smoke", "--run-id", "wheel-smoke", "--quiet", **{TINY_ENV: "1"})
    return installed.work / "reports" / "runs" / "wheel-smoke"


def read_rows(run: Path) -> list[dict]:
    results = run / "results.jsonl"
    assert results.is_file(), f"no {results}; the run folder holds {sorted(run.parent.rglob('*'))}"
    return [json.loads(line) for line in results.read_text().splitlines() if line.strip()]


def assert_all_ok(rows: list[dict]) -> None:
    assert rows, "the run wrote no row"
    failed = [(r.get("backend"), r["status"], r.get("reason")) for r in rows if r["status"] != "ok"]
    assert not failed, f"rows that are not ok: {failed}"


def test_wheel_ships_every_module_and_preset(wheel: Path):
    names = set(zipfile.ZipFile(wheel).namelist())
    expected = {
        f"{installed_as}/{path.relative_to(ROOT / directory).as_posix()}"
        for directory, installed_as in PACKAGE_DIRS.items()
        for path in (ROOT / directory).rglob("*.py")
        if "__pycache__" not in path.parts
    }
    expected |= {
        path.relative_to(ROOT).as_posix()
        for folder in PRESET_DIRS
        for path in (ROOT / folder).glob("*.toml")
    }
    assert expected - names == set(), f"missing from {wheel.name}: {sorted(expected - names)}"
    assert not any(n.startswith(("kernels/", "benchmarks/", "tests/")) for n in names)


def test_import_resolves_to_the_installed_package(installed: Installed):
    done = run_command(
        [installed.python, "-c",
         "import importlib.util, json, effattn, effattn.kernels\n"
         "from effattn.harness.presets import presets_in\n"
         "print(json.dumps({'effattn': effattn.__file__, 'kernels': effattn.kernels.__file__,\n"
         "  'stray': [m for m in ('kernels', 'benchmarks') if importlib.util.find_spec(m)],\n"
         "  'sweep': presets_in('effattn.sweep'), 'quality': presets_in('effattn.quality')}))"],
        cwd=installed.work, env=installed.env,
    )  # fmt: skip
    found = json.loads(done.stdout.splitlines()[-1])
    site = next((installed.venv / "lib").glob("python3*/site-packages")).resolve()
    for module in ("effattn", "kernels"):
        where = Path(found[module]).resolve()
        assert where.is_relative_to(site), f"{module} imported from {where}, not {site}"
        assert not where.is_relative_to(ROOT), f"{module} imported from the source tree: {where}"
    assert found["stray"] == [], "top-level modules that only a source tree has"
    for study, folder in zip(("sweep", "quality"), PRESET_DIRS, strict=True):
        shipped = sorted(p.stem for p in (ROOT / folder).glob("*.toml"))
        assert found[study] == shipped, f"{study} presets installed: {found[study]}"


def test_list_shows_the_backends(installed: Installed):
    out = installed.effattn("list").stdout
    for backend in ("full", "sdpa", "local"):
        assert f"| {backend} " in out, out[:2000]


def test_sweep_smoke_writes_ok_rows(sweep_run: Path):
    rows = read_rows(sweep_run)
    assert_all_ok(rows)
    assert {r["backend"] for r in rows} == {"full", "sdpa"}
    assert (sweep_run / "env.json").is_file()


def test_report_of_the_sweep(installed: Installed, sweep_run: Path):
    prefix = installed.work / "reports" / "wheel-smoke"
    installed.effattn("report", str(sweep_run), "--format", "md", "csv", "--out", str(prefix))
    for suffix in (".md", ".csv"):
        written = prefix.with_suffix(suffix)
        assert written.is_file() and "sdpa" in written.read_text(), written


def test_quality_smoke_writes_ok_rows(installed: Installed):
    installed.effattn("quality", "quality-smoke", "--run-id", "wheel-quality", "--quiet")
    rows = read_rows(installed.work / "reports" / "runs" / "wheel-quality")
    assert_all_ok(rows)
    assert {r["task"] for r in rows} == {"mqar", "listops", "nearest_recall"}
