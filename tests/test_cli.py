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


def test_unknown_options_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["list", "--nosuch"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --nosuch" in capsys.readouterr().err


def test_peers_options_are_its_own_argparse_options(capsys):
    from effattn.cli import build_parser

    args = build_parser().parse_args(["peers", "--n", "2048", "--only", "local,lsh"])
    assert (args.n, args.only, args.threads, args.repeats) == (2048, "local,lsh", 2, 3)
    assert not args.system_malloc and str(args.out) == "reports/peers"
    with pytest.raises(SystemExit) as exit_info:  # nothing is passed through any more
        main(["peers", "--nosuch"])
    assert exit_info.value.code == 2
    assert "unrecognized arguments: --nosuch" in capsys.readouterr().err


def test_peers_is_a_study_in_the_package_and_needs_no_checkout(tmp_path):
    """The command module lives in the installed package (no benchmarks/ folder needed), and its
    help works from anywhere, without importing the checkout's benchmarks."""
    import effattn
    from effattn.cli import command_module

    module = command_module("peers")
    assert module.__name__ == "effattn.peers.cli"
    package = Path(effattn.__file__).resolve().parent
    assert Path(module.__file__).resolve().is_relative_to(package)
    done = subprocess.run(
        [sys.executable, "-c",
         "import sys\nfrom effattn.cli import main\ntry:\n    main(['peers', '--help'])\n"
         "except SystemExit as e:\n    print('exit', e.code, 'benchmarks' in sys.modules)"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "usage: effattn peers" in done.stdout and "--only" in done.stdout
    assert done.stdout.strip().endswith("exit 0 False")


def test_the_readme_sweep_example_runs_on_cpu_without_the_cuda_grid(tmp_path, capsys):
    """The preset's triton grid (device cuda) takes --backends too; on a machine without CUDA
    it is left out with a message, while --device cuda asked for by name is still an error."""
    from effattn.cli import build_parser
    from effattn.sweep.commands.sweep import sweep_spec
    from effattn.sweep.spec import expand

    args = build_parser().parse_args(
        ["sweep", "--backends", "full", "local:window=128", "--seq-lens", "1024", "2048",
         "--mode", "fwd_bwd"]
    )  # fmt: skip
    spec, overridden = sweep_spec(args)
    assert overridden
    if not __import__("torch").cuda.is_available():
        points, messages = expand(spec, strict=True, strict_device=False)
        assert {p.label for p in points} == {"full", "local:window=128"}
        assert {p.device for p in points} == {"cpu"} and {p.mode for p in points} == {"fwd_bwd"}
        assert any("cuda was asked for" in m for m in messages)
        code = main(["sweep", "smoke", "--device", "cuda", "--out", str(tmp_path)])
        assert code == 2 and "cuda was asked for" in capsys.readouterr().err


def test_system_malloc_turns_the_kept_heap_off():
    from effattn.cli import build_parser
    from effattn.sweep.commands.sweep import sweep_spec

    spec, overridden = sweep_spec(build_parser().parse_args(["sweep"]))
    assert spec.settings.keep_freed_memory and not overridden  # the default
    spec, overridden = sweep_spec(build_parser().parse_args(["sweep", "--system-malloc"]))
    assert not spec.settings.keep_freed_memory and overridden  # a run id of its own


def test_bracket_every_comes_from_the_command_line(capsys):
    from effattn.cli import build_parser
    from effattn.sweep.commands.sweep import sweep_spec

    spec, _ = sweep_spec(build_parser().parse_args(["sweep"]))
    assert spec.settings.bracket_every == 0  # the tay preset does not bracket
    spec, overridden = sweep_spec(build_parser().parse_args(["sweep", "--bracket-every", "3"]))
    assert spec.settings.bracket_every == 3 and overridden
    with pytest.raises(SystemExit):
        build_parser().parse_args(["sweep", "--bracket-every", "-1"])
    assert "--bracket-every" in capsys.readouterr().err
