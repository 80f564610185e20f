"""``python -m otlabel`` and the ``otlabel`` console script: see :mod:`otlabel.cli`."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
