"""``python -m effattn.peers``: the same as ``effattn peers``."""

import sys

from effattn.cli import main as effattn_main


def main(argv: list[str] | None = None) -> int:
    return effattn_main(["peers", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
