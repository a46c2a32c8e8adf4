"""``python -m effattn.fidelity``: the same as ``effattn fidelity``."""

import sys

from effattn.cli import main as effattn_main


def main(argv: list[str] | None = None) -> int:
    return effattn_main(["fidelity", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
