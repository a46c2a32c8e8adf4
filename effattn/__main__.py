"""``python -m effattn``: the same command as the installed ``effattn`` script."""

import sys

from effattn.cli import main

if __name__ == "__main__":
    sys.exit(main())
