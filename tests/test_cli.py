"""The ``effattn`` command: --help everywhere, `list`, and bad input refused before anything
runs (a message on stderr, a non-zero exit, no run folder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from effattn.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("command", [[], ["list"], ["sweep"], ["report"], ["plot"]])
def test_help_everywhere(command: list[str], capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    assert "usage: effattn" in capsys.readouterr().out


def test_list_shows_backends_and_declarations(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    for word in ("full", "sdpa", "complexity", "class", "exact"):
        assert word in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backends", "nosuch"], "unknown backend 'nosuch'"),
        (["--backends", "full:nosuch=3"], "unknown option 'nosuch'"),
        (["--backends", "full:=3"], "unknown option"),
        (["nosuchpreset"], "unknown preset 'nosuchpreset'"),
    ],
)
def test_bad_sweep_input_exits_before_running(args: list[str], message: str, tmp_path, capsys):
    preset = [] if args[0] == "nosuchpreset" else ["smoke"]
    code = main(["sweep", *preset, *args, "--out", str(tmp_path)])
    assert code == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # nothing ran


@pytest.mark.parametrize("value", ["0", "-5", "abc", "1.5"])
def test_non_positive_or_non_integer_length_is_refused(value: str, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["sweep", "smoke", "--seq-lens", "64", value, "--out", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "expected a positive integer" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_report_of_a_missing_run_fails_clearly(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "expected a run folder" in capsys.readouterr().err


def test_python_dash_m_runs_the_same_command():
    done = subprocess.run(
        [sys.executable, "-m", "effattn", "sweep", "--backends", "nosuch"],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown backend 'nosuch'" in done.stderr
