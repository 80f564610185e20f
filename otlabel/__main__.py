"""``python -m otlabel`` and the ``otlabel`` console script: see :mod:`otlabel.cli`."""

import sys

from .interrupts import forget_handled_interrupt, signals_held


def main(argv=None) -> int:
    """The command line, with Ctrl-C while the modules load answered like Ctrl-C later: a line and status 130."""
    try:
        with signals_held():
            from .cli import main as run
    except KeyboardInterrupt:
        print("otlabel: interrupted; no output written", file=sys.stderr)
        status = 130  # cli.EXIT_SIGINT (not imported: the interrupt came while importing)
    else:
        status = run(argv)
    forget_handled_interrupt()
    return status


if __name__ == "__main__":
    sys.exit(main())
