"""Ctrl-C, SIGTERM and SIGHUP for the command line: held while its modules load, and an interrupt handled on the way
out not turned into a death by SIGINT (:mod:`otlabel.cli` documents status 130, 143 and 129 after cleanup)."""

from __future__ import annotations

import contextlib
import signal
import threading


@contextlib.contextmanager
def signals_held():
    """Ctrl-C, SIGTERM or SIGHUP while modules load (torch, numba, numpy: a second or two) is answered once they have
    loaded, by the handler in place, as it would have been. Raised inside their imports, the exception could abort
    the process from torch's C++ start-up (std::terminate: killed by SIGABRT), be lost in an import lock's weakref
    callback ('Exception ignored in ... _get_module_lock': the run went on), or come out of a dataclass's generated
    method (:func:`forget_handled_interrupt`). Signals whose handler is not Python's (SIG_IGN, SIG_DFL) are left."""
    held, previous = [], {}
    try:
        if threading.current_thread() is threading.main_thread():  # handlers are set in the main thread only
            for sig in (getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name)):
                if callable(signal.getsignal(sig)):
                    previous[sig] = signal.signal(sig, lambda signum, frame: held.append(signum))
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if held:
        previous[held[0]](held[0], None)  # KeyboardInterrupt, or cli's Terminated for SIGTERM and SIGHUP


def forget_handled_interrupt() -> None:
    """A KeyboardInterrupt that leaves code run from source text (``exec``/``eval`` of a string: how dataclasses and
    namedtuple make their methods, hundreds of times while torch loads) is marked unhandled by CPython even when a
    caller then handles it, and ``python -m`` kills itself with SIGINT at exit on that mark: returncode -2 after
    'interrupted; no output written' instead of status 130. Every ``exec`` of source text clears the mark before it
    runs: called once the command has handled whatever came."""
    exec("")
