"""``effattn list``: the registered backends, their options and declarations."""

from __future__ import annotations

import argparse

HELP = "the registered backends, their options and declarations"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``effattn list`` takes no options."""


def run(args: argparse.Namespace) -> int:
    import pandas as pd

    import effattn
    from effattn.harness.table import render

    rows = [effattn.backend_class(n).declaration() for n in effattn.list_backends()]
    table = pd.DataFrame(rows).drop(columns=["description"])
    print(render(table, "md"))
    print()
    for row in rows:
        print(f"- {row['backend']}: {row['description']}")
    return 0
