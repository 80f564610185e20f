"""Small constant tensors made once per size and device, not on every call: the uniform weights (the default
marginals), their float32 copies and logarithms, and cluster counts.

A small solve (a SwAV batch on the CPU, 64 x 10 at 3 iterations: ~0.6 ms) is bound by its count of torch operations,
~3 us each; these were 6 of them a call. Entries are never written to (every user reads them, or copies them first);
they are made outside inference mode, so that a call inside ``torch.inference_mode()`` does not leave an inference
tensor that a later call outside it could not use. Only sizes up to ``MAX_CACHED_SIZE`` are kept (a larger size's
operation is nothing beside its solve), and at most ``MAX_ENTRIES`` of them (the oldest go first).

Not kept: constants for a device named without an index (``"cuda"``: which device that is depends on the current one
when the call runs), and any made inside :func:`not_kept`, which a CUDA graph's capture uses: the graph reads its
tensors by address on every replay, and a kept one evicted later would be freed under it.
"""

from __future__ import annotations

import contextlib
import os
import threading

import torch

MAX_CACHED_SIZE = 1 << 16
MAX_ENTRIES = 64

_LOCK = threading.Lock()
_ENTRIES: dict[tuple, torch.Tensor] = {}
_LOCAL = threading.local()  # .not_kept: inside not_kept() on this thread


def _new_lock_in_child() -> None:  # a fork while another thread held the lock would leave the child's held for good
    global _LOCK
    _LOCK = threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_new_lock_in_child)


@contextlib.contextmanager
def not_kept():
    """Context: on this thread, every constant is made anew, neither read from the cache nor put in it."""
    outer = getattr(_LOCAL, "not_kept", False)
    _LOCAL.not_kept = True
    try:
        yield
    finally:
        _LOCAL.not_kept = outer


def _cached(key: tuple, size: int, device: torch.device, make) -> torch.Tensor:
    keep = (device.type == "cpu" or device.index is not None) and not getattr(_LOCAL, "not_kept", False)
    tensor = _ENTRIES.get(key) if keep else None
    if tensor is not None:
        return tensor
    with torch.inference_mode(False), torch.no_grad():
        tensor = make()
    if keep and size <= MAX_CACHED_SIZE:
        with _LOCK:
            if len(_ENTRIES) >= MAX_ENTRIES:
                del _ENTRIES[next(iter(_ENTRIES))]
            tensor = _ENTRIES.setdefault(key, tensor)
    return tensor


def uniform_weights(size: int, device: torch.device, dtype: torch.dtype = torch.float64, log: bool = False):
    """``(size,)`` weights ``1 / size`` made in float64, then converted to ``dtype`` (as a ``.to`` of the float64 ones
    is), or their logarithm with ``log``; the same tensor on every call (for small sizes). Not to be written to."""
    device = torch.device(device)

    def make():
        if log:
            return uniform_weights(size, device, dtype).log()
        weights = torch.full((size,), 1.0 / size, dtype=torch.float64, device=device)
        return weights if dtype == torch.float64 else weights.to(dtype)

    return _cached(("uniform", size, device, dtype, log), size, device, make)


def is_uniform_weights(weights: torch.Tensor) -> bool:
    """Whether ``weights`` is the float64 tensor :func:`uniform_weights` hands out for its size and device."""
    return weights is _ENTRIES.get(("uniform", weights.shape[-1], weights.device, torch.float64, False))


def count(k: int, device: torch.device) -> torch.Tensor:
    """A 0-d int64 tensor holding ``k`` on ``device``: what ``nanmean`` divides by where nothing is NaN, and the loop's
    centring where no cluster weight is 0. Not to be written to."""
    device = torch.device(device)
    return _cached(("count", k, device), 1, device, lambda: torch.full((), k, dtype=torch.int64, device=device))
