"""The README's Python examples and its sweep, report, plot and compare commands run as written
(so that the README stays true)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from effattn.bench.spec import TINY_ENV

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.DOTALL)


def test_readme_has_examples():
    assert len(BLOCKS) >= 3


@pytest.mark.parametrize("index", range(len(BLOCKS)))
def test_readme_example_runs(index, scratch_registry):
    exec(compile(BLOCKS[index], f"README.md[python block {index}]", "exec"), {})


# -- the README's commands -------------------------------------------------------------------
# Every `make sweep` and `effattn sweep|report|plot|compare|list ...` the README shows (in shell
# blocks, indented blocks or inline code) runs as written on a CPU-only machine, at toy sizes
# (EFFATTN_SWEEP_TINY, effattn.bench.spec.tiny), in a scratch folder. Placeholders: RUN... and
# RUN_A RUN_B are replaced by runs the README's own sweeps made (compare: one run twice),
# PCT, FILE.md, PREFIX, DIR by a value. Commands for a Slurm cluster or a GPU say so in their
# options and are skipped with that reason.
SUBCOMMANDS = ("sweep", "report", "plot", "compare", "list", "quality", "fidelity")
MAKE_TARGETS = ("make sweep", "make quality", "make fidelity")
NEEDS = {
    "--executor submitit": "a Slurm cluster",
    "--device cuda": "a GPU",
    # transformers 5 and the model wheel: tests/test_fidelity.py runs the command in make test-hf5
    "effattn fidelity": "the fidelity extra (make test-hf5 runs it)",
    "make fidelity": "the fidelity extra (make test-hf5 runs it)",
}
ROOT = README.parent
PLACEHOLDERS = {"PCT": "10", "FILE.md": "compare.md", "PREFIX": "table", "DIR": "plots"}


def readme_commands(text: str) -> list[str]:
    """The README's `make sweep` and effattn commands, in order, whitespace normalised."""
    found = []
    for block in re.findall(r"```(?:bash|sh|shell|console)?\n(.*?)```", text, flags=re.DOTALL):
        found += [line.split("#")[0] for line in block.splitlines()]
    found += re.findall(r"^    (effattn .*)$", text, flags=re.MULTILINE)  # indented blocks
    prose = re.sub(r"```.*?```", "", text, flags=re.DOTALL)
    found += re.findall(r"`(effattn [^`]+)`", prose)  # inline, possibly over two lines
    commands = []
    for command in (" ".join(c.split()) for c in found):
        words = command.split()
        if command in MAKE_TARGETS or (words[:1] == ["effattn"] and words[1:2] and
                                       words[1] in SUBCOMMANDS):  # fmt: skip
            commands.append(command)
    return list(dict.fromkeys(commands))


COMMANDS = readme_commands(README.read_text())


def test_readme_shows_the_sweep_commands():
    assert "make sweep" in COMMANDS and "make quality" in COMMANDS
    assert sum(c.startswith("effattn sweep") for c in COMMANDS) >= 2
    assert any(c.startswith("effattn report") for c in COMMANDS)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("readme")


def _argv(command: str, runs: list[str]) -> list[str]:
    if command == "make sweep":
        return ["make", "-s", "-f", str(ROOT / "Makefile"), "sweep", f"PY={sys.executable}",
                "STAMP=", "SWEEP_DEVICE=cpu"]  # fmt: skip
    if command == "make quality":  # the target's wiring, on the preset of seconds
        return ["make", "-s", "-f", str(ROOT / "Makefile"), "quality", f"PY={sys.executable}",
                "STAMP=", "QUALITY_PRESET=quality-smoke"]  # fmt: skip
    words = command.split()[1:]
    if words[0] == "compare":  # a run against itself: a gate it shows never trips on noise
        runs = [runs[0], runs[0]]
    out = [sys.executable, "-m", "effattn"]
    for word in words:
        if word in ("RUN...", "RUN_A..."):
            out += runs[:2] if words[0] == "report" else runs[:1]  # plots of one run: faster
        elif word in ("RUN", "RUN_A"):
            out.append(runs[0])
        elif word == "RUN_B":
            out.append(runs[1])
        else:
            out.append(PLACEHOLDERS.get(word, word))
    return out


def _sweep_runs(folder: Path) -> list[str]:
    """The sweep runs the README's commands made (the quality runs share the folder)."""
    runs = []
    for results in sorted(folder.glob("*/results.jsonl")):
        first = results.read_text().partition("\n")[0]
        if first and "mode" in json.loads(first):
            runs.append(str(results.parent))
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("command", sorted(COMMANDS, key=lambda c: "sweep" not in c))
def test_readme_command_runs_on_cpu(command: str, workdir: Path):
    """Sweeps first (sorted so), then the commands that read their runs."""
    for option, what in NEEDS.items():
        if option in command:
            pytest.skip(f"needs {what}: {command}")
    runs = _sweep_runs(workdir / "reports" / "runs")
    if any(w.startswith("RUN") for w in command.split()) and len(runs) < 2:
        pytest.skip("the README's sweeps made fewer than two runs to read")
    env = {**os.environ, TINY_ENV: "1"}
    done = subprocess.run(_argv(command, runs), cwd=workdir, env=env, capture_output=True,
                          text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, f"{command}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    assert "USDT:" not in done.stdout + done.stderr  # the profiler's notes stay off the screen
