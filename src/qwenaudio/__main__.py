"""`python -m qwenaudio`: the same command as the `qwenaudio` script."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
