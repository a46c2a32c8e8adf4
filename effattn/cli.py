"""The ``effattn`` command: one subcommand per command module, each with ``HELP`` (and perhaps
``DESCRIPTION``), ``add_arguments(parser)`` and ``run(args) -> exit code``.

    effattn list
    effattn sweep [PRESET] [--backends ...] [--seq-lens ...] ...   (effattn.sweep.commands.sweep)
    effattn report RUN... [--format md csv tex html] [--out PREFIX]
    effattn plot RUN... [--out DIR]
    effattn compare RUN_A RUN_B [--fail-on-regression PCT] [--out FILE.md]
    effattn quality [PRESET] [--tasks mqar] [--backends ...] [--report PREFIX] [--plots DIR]
    effattn fidelity [--documents N] [--backends ...] [--out PREFIX]
    effattn peers [--n N] [--only KEYS] [--out DIR] ...              (effattn.peers.cli)

Bad input (unknown backend, option or preset, a length that is not a positive integer) is
reported as one line on stderr with exit code 2, before anything runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from types import ModuleType

COMMANDS = {
    "list": "effattn.commands.list_backends",
    "sweep": "effattn.sweep.commands.sweep",
    "report": "effattn.sweep.commands.report",
    "plot": "effattn.sweep.commands.plot",
    "compare": "effattn.sweep.commands.compare",
    "quality": "effattn.quality.cli",
    "fidelity": "effattn.fidelity.cli",
    "peers": "effattn.peers.cli",
}


def command_module(name: str) -> ModuleType:
    return importlib.import_module(COMMANDS[name])


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="effattn", description="Efficient-attention backends and the suite that measures them."
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in COMMANDS:
        module = command_module(name)
        command = sub.add_parser(
            name, help=module.HELP, description=getattr(module, "DESCRIPTION", None)
        )
        module.add_arguments(command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    module = command_module(args.command)
    try:
        return module.run(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"effattn {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"effattn {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
