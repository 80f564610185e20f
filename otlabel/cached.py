"""Small constant tensors made once per size and device, not on every call: the uniform weights (the default
marginals), their float32 copies and logarithms, and cluster counts.

A small solve (a SwAV batch on the CPU, 64 x 10 at 3 iterations: ~0.6 ms) is bound by its count of torch operations,
~3 us each; these were 6 of them a call. Entries are never written to (every user reads them, or copies them first);
they are made outside inference mode, so that a call inside ``torch.inference_mode()`` does not leave an inference
tensor that a later call outside it could not use. Only sizes up to ``MAX_CACHED_SIZE`` are kept (a larger size's
operation is nothing beside its solve), and at most ``MAX_ENTRIES`` of them (the oldest go first).
"""

from __future__ import annotations

import threading

import torch

MAX_CACHED_SIZE = 1 << 16
MAX_ENTRIES = 64

_LOCK = threading.Lock()
_ENTRIES: dict[tuple, torch.Tensor] = {}


def _cached(key: tuple, size: int, make) -> torch.Tensor:
    tensor = _ENTRIES.get(key)
    if tensor is not None:
        return tensor
    with torch.inference_mode(False), torch.no_grad():
        tensor = make()
    if size <= MAX_CACHED_SIZE:
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

    return _cached(("uniform", size, device, dtype, log), size, make)


def is_uniform_weights(weights: torch.Tensor) -> bool:
    """Whether ``weights`` is the float64 tensor :func:`uniform_weights` hands out for its size and device."""
    return weights is _ENTRIES.get(("uniform", weights.shape[-1], weights.device, torch.float64, False))


def count(k: int, device: torch.device) -> torch.Tensor:
    """A 0-d int64 tensor holding ``k`` on ``device``: what ``nanmean`` divides by where nothing is NaN, and the loop's
    centring where no cluster weight is 0. Not to be written to."""
    device = torch.device(device)
    return _cached(("count", k, device), 1, lambda: torch.full((), k, dtype=torch.int64, device=device))
