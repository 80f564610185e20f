"""``python -m otlabel`` and the ``otlabel`` console script: see :mod:`otlabel.cli`."""

import sys


def main(argv=None) -> int:
    """The command line, with Ctrl-C while the modules load answered like Ctrl-C later: a line and status 130."""
    try:
        from .cli import main as run
    except KeyboardInterrupt:
        print("otlabel: interrupted; no output written", file=sys.stderr)
        return 130  # cli.EXIT_SIGINT (not imported: the interrupt came while importing)
    return run(argv)


if __name__ == "__main__":
    sys.exit(main())
