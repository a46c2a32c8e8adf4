"""The ``effattn`` command: --help everywhere, `list`, and bad input refused before anything
runs (a message on stderr, a non-zero exit, no run folder)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from effattn.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command", [[], ["list"], ["sweep"], ["report"], ["plot"], ["compare"], ["peers"]]
)
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


def test_unknown_options_are_refused_except_for_peers(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--nosuch"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --nosuch" in capsys.readouterr().err


def test_peers_passes_its_options_to_benchmarks_peers(monkeypatch):
    from effattn import cli

    seen = []

    class FakePeers:
        @staticmethod
        def main(argv):
            seen.append(argv)

    monkeypatch.setattr(cli, "_peers_module", lambda: FakePeers)
    assert main(["peers", "--n", "2048", "--only", "local,lsh"]) == 0
    assert main(["peers", "--peers-help"]) == 0
    assert seen == [["--n", "2048", "--only", "local,lsh"], ["--help"]]


def test_peers_is_the_real_benchmarks_peers_from_the_checkout(capsys):
    with pytest.raises(SystemExit) as exit_info:  # its own argparse help
        main(["peers", "--peers-help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_peers_outside_a_source_checkout_fails_clearly(monkeypatch, tmp_path, capsys):
    from effattn import cli

    monkeypatch.setattr(cli, "_source_root", lambda: tmp_path)  # an installed wheel: no benchmarks/
    assert main(["peers"]) == 2
    err = capsys.readouterr().err
    assert "effattn peers: error:" in err and "not installed with the package" in err
    assert "pip install -c constraints.txt -e '.[peers]'" in err


def test_the_readme_sweep_example_runs_on_cpu_without_the_cuda_grid(tmp_path, capsys):
    """The preset's triton grid (device cuda) takes --backends too; on a machine without CUDA
    it is left out with a message, while --device cuda asked for by name is still an error."""
    from effattn.bench.spec import expand
    from effattn.cli import _sweep_spec, build_parser

    args = build_parser().parse_args(
        ["sweep", "--backends", "full", "local:window=128", "--seq-lens", "1024", "2048",
         "--mode", "fwd_bwd"]
    )  # fmt: skip
    spec, overridden = _sweep_spec(args)
    assert overridden
    if not __import__("torch").cuda.is_available():
        points, messages = expand(spec, strict=True, strict_device=False)
        assert {p.label for p in points} == {"full", "local:window=128"}
        assert {p.device for p in points} == {"cpu"} and {p.mode for p in points} == {"fwd_bwd"}
        assert any("cuda was asked for" in m for m in messages)
        code = main(["sweep", "smoke", "--device", "cuda", "--out", str(tmp_path)])
        assert code == 2 and "cuda was asked for" in capsys.readouterr().err


def test_system_malloc_turns_the_kept_heap_off():
    from effattn.cli import _sweep_spec, build_parser

    spec, overridden = _sweep_spec(build_parser().parse_args(["sweep"]))
    assert spec.settings.keep_freed_memory and not overridden  # the default
    spec, overridden = _sweep_spec(build_parser().parse_args(["sweep", "--system-malloc"]))
    assert not spec.settings.keep_freed_memory and overridden  # a run id of its own


def test_bracket_every_comes_from_the_command_line(capsys):
    from effattn.cli import _sweep_spec, build_parser

    spec, _ = _sweep_spec(build_parser().parse_args(["sweep"]))
    assert spec.settings.bracket_every == 0  # the tay preset does not bracket
    spec, overridden = _sweep_spec(build_parser().parse_args(["sweep", "--bracket-every", "3"]))
    assert spec.settings.bracket_every == 3 and overridden
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--bracket-every", "-1"])
    assert "--bracket-every" in capsys.readouterr().err
