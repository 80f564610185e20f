"""Ctrl-C, SIGTERM and SIGHUP for the command line: held while its modules load, and an interrupt handled on the way
out not turned into a death by SIGINT (:mod:`otlabel.cli` documents status 130, 143 and 129 after cleanup)."""

from __future__ import annotations

import contextlib
import signal
import threading


def sets_handlers() -> bool:
    """Whether this thread may set signal handlers: Python's main thread only (``signal.signal`` raises ValueError
    elsewhere, and signals are answered there anyway)."""
    return threading.current_thread() is threading.main_thread()


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM or SIGHUP while modules load (torch, numba, numpy: a second or two) is answered once they have
    loaded, by the handler in place, as it would have been; also when the block fails (the signal came first). Raised
    inside their imports, the exception could abort the process from torch's C++ start-up (std::terminate: killed by
    SIGABRT), be lost in an import lock's weakref callback ('Exception ignored in ... _get_module_lock': the run went
    on), or come out of a dataclass's generated method (:func:`forget_handled_interrupt`). Only the first is held: one
    more while it waits (Ctrl-C pressed again, the imports slow on a cold disk or hung) is answered at once, at those
    risks. Signals whose handler is not Python's (SIG_IGN, SIG_DFL) are left, and so is every signal off the main
    thread."""
    held, previous = [], {}

    def hold(signum, frame):
        if held:
            previous[signum](signum, frame)
        else:
            held.append(signum)

    try:
        if sets_handlers():
            for sig in (getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)):
                if callable(signal.getsignal(sig)):
                    previous[sig] = signal.signal(sig, hold)
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if held:  # KeyboardInterrupt, or cli's Terminated for SIGTERM and SIGHUP; in place of the block's exception
            previous[held[0]](held[0], None)


def forget_handled_interrupt() -> None:
    """A KeyboardInterrupt that leaves code run from source text (``exec``/``eval`` of a string: how dataclasses and
    namedtuple make their methods, hundreds of times while torch loads) is marked unhandled by CPython even when a
    caller then handles it, and ``python -m`` kills itself with SIGINT at exit on that mark: returncode -2 after
    'interrupted; no output written' instead of status 130. Through Python 3.13 every ``exec`` of source text clears
    the mark before it runs (``run_eval_code_obj`` in CPython's Python/pythonrun.c: internals, checked on 3.11), so
    one is made once the command has handled whatever came. CPython since python/cpython#128130 (3.14) neither sets
    nor clears the mark in ``exec``, only for an interrupt printed as unhandled: there this changes nothing."""
    exec("")
