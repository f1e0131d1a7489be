"""``python -m saiproxy``: the command line of :mod:`saiproxy.cli.main`."""

import sys

from .cli.main import main

__all__ = ["main"]

if __name__ == "__main__":
    sys.exit(main())
