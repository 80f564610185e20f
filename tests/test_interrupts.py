"""otlabel.interrupts: signals held while the command line's modules load, and the command run off the main thread.

The signals here are raised with ``signal.raise_signal``, which runs the Python handler before it returns, and answered
by a handler of the test's that raises an ``Exception`` (a KeyboardInterrupt leaking out of a failed test would stop
pytest's whole run); SIGINT as the suite found it is put back after each test.
"""

from __future__ import annotations

import signal
import threading

import numpy as np
import pytest

from otlabel.cli import EXIT_OK, main
from otlabel.interrupts import signals_held


class Interrupted(Exception):
    pass


@pytest.fixture
def sigint_raises():
    def interrupted(signum, frame):
        raise Interrupted(signum)

    previous = signal.signal(signal.SIGINT, interrupted)
    yield
    signal.signal(signal.SIGINT, previous)


def test_a_signal_held_while_the_block_fails_is_still_answered(sigint_raises):
    """Ctrl-C while the modules load, then an import failing (``otlabel demo`` without scikit-learn, a broken torch):
    the held interrupt was dropped with the block's exception, and the command ended with status 2 ('the demo needs
    scikit-learn') or 1 instead of 130. Unheld, the interrupt would have come first."""
    with pytest.raises(Interrupted) as caught:
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            raise ImportError("a broken install")
    assert isinstance(caught.value.__context__, ImportError)
    assert signal.getsignal(signal.SIGINT) is not signal.SIG_IGN and callable(signal.getsignal(signal.SIGINT))


def test_a_second_signal_while_one_is_held_is_answered_at_once(sigint_raises):
    """Every Ctrl-C was held until the modules had loaded: with torch slow to import (a cold disk, a network file
    system) or hung, pressing it again and again did nothing. The first is held, a second one is answered at once."""
    reached = []
    with pytest.raises(Interrupted):
        with signals_held():
            signal.raise_signal(signal.SIGINT)
            reached.append("after the first")
            signal.raise_signal(signal.SIGINT)
            reached.append("after the second")
    assert reached == ["after the first"]


def test_each_signal_reaches_a_handler_that_does_not_raise():
    """A caller's own SIGINT handler that only counts: the first signal is answered once the block ends, a second and
    third at once, none twice and none lost."""
    calls = []
    previous = signal.signal(signal.SIGINT, lambda signum, frame: calls.append(signum))
    try:
        with signals_held():
            for _ in range(3):
                signal.raise_signal(signal.SIGINT)
            assert calls == [signal.SIGINT] * 2
        assert calls == [signal.SIGINT] * 3
    finally:
        signal.signal(signal.SIGINT, previous)


def test_the_command_runs_off_the_main_thread(tmp_path):
    """cli.main set its SIGTERM and SIGHUP handlers wherever it ran, and Python sets handlers from the main thread
    only: called from any other thread (a job runner's worker) every command ended with 'otlabel: error: signal only
    works in main thread of the main interpreter', status 2. Off the main thread it now leaves signals alone."""
    np.save(tmp_path / "s.npy", np.random.default_rng(0).standard_normal((40, 3)).astype(np.float32))
    status = []
    worker = threading.Thread(
        target=lambda: status.append(main(["assign", str(tmp_path / "s.npy"), "--out", str(tmp_path / "y.npy"), "-q"]))
    )
    worker.start()
    worker.join()
    assert status == [EXIT_OK] and np.load(tmp_path / "y.npy").shape == (40,)
