"""How otlabel's public calls run, whatever the caller's surroundings: :func:`entry_point` and :func:`user_stacklevel`.

* **Eagerly under** ``torch.compile``: a compiled training step reaches a solve as one graph break, and the solve
  runs as it does uncompiled. Traced, it was not: Dynamo followed the solver into its host loop and data-dependent
  branches, took 32 s to compile one 256 x 30 call (2 CPU threads) and ran each later call 13x slower than eager
  (153 against 12 ms) through its many graph breaks, warning about builtins on the way.
* **Without the caller's default device** (``torch.set_default_device("cuda")`` in a training script), so with the
  CPU's: otlabel places every tensor that must be on the scores' device explicitly and lets the host-side ones (the
  CPU kernel, streamed labels and codes, NumPy inputs as tensors) take the default, which put them on the GPU beside
  CPU scores that torch then refused to copy.
* **Warnings at the caller's line**, however many wrappers and helpers lie between (Dynamo's among them).
"""

from __future__ import annotations

import functools
import sys
import types

import torch

try:  # torch's mode stack, where torch.set_default_device keeps the caller's default device (private, stable since 2.0)
    from torch._C import _len_torch_function_stack
    from torch.overrides import _get_current_function_mode, _pop_mode_temporarily
    from torch.utils._device import DeviceContext
except ImportError:  # pragma: no cover - a torch without them takes the general path below
    _len_torch_function_stack = None

# sys.modules seen through a read-only view: torch 2.1's Dynamo (later ones not checked) could not trace a look-up in
# sys.modules itself (it wrapped every entry of the dict, which changed under it: "dictionary changed size during
# iteration", an InternalTorchDynamoError in every compiled caller). The view is as live, and as cheap to ask.
_MODULES = types.MappingProxyType(sys.modules)


def entry_point(fn):
    """``fn`` (a public call) run eagerly when ``torch.compile`` traces it, and without the caller's default device."""

    @functools.wraps(fn)
    def on_host_default(*args, **kwargs):
        if _len_torch_function_stack is not None:
            if not _len_torch_function_stack():  # no mode at all, so no default device of the caller's: 0.03 us
                return fn(*args, **kwargs)
            if isinstance(_get_current_function_mode(), DeviceContext):
                # The caller's default device, set aside for the call: a CPU device context pushed over it instead
                # would send every torch call of the solve through two Python modes (a reviewer's measurement, 64 x 8
                # at 20 iterations: 6.4 against 3.5 ms).
                with _pop_mode_temporarily():
                    return on_host_default(*args, **kwargs)
        if default_device().type == "cpu":  # ~2.5 us: it walks the mode stack
            return fn(*args, **kwargs)
        with torch.device("cpu"):
            return fn(*args, **kwargs)

    # torch's own lazy torch.compiler.disable, which Dynamo skips (a graph break, then a native call). The public
    # one, made here, would import Dynamo (~1 s) in every program; made on the first traced call, it would be state
    # read while tracing: the caller's whole graph compiled again on its next call (a 256 x 30 solve in a compiled
    # step: 65 against 11 ms, once).
    eager = getattr(torch, "_disable_dynamo", lambda f: f)(on_host_default)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        # Traced, or run natively between two of Dynamo's graphs (after a graph break, or in a frame Dynamo chose to
        # skip: its callback still catches every frame called from there): both need the disabled function, and
        # both have Dynamo imported. Without it nothing can be compiling: a dictionary look-up is all it costs.
        if "torch._dynamo" in _MODULES:
            return eager(*args, **kwargs)
        return on_host_default(*args, **kwargs)

    return call


def default_device() -> torch.device:
    """torch's default device for new tensors (``torch.get_default_device`` from torch 2.3)."""
    get = getattr(torch, "get_default_device", None)
    return get() if get is not None else torch.empty(0).device


def user_stacklevel() -> int:
    """The ``stacklevel`` for a ``warnings.warn`` in the calling function that names the first frame outside otlabel
    and torch: the line of the user's call."""
    frame, level = sys._getframe(1), 1
    while frame.f_back is not None and frame.f_globals.get("__name__", "").partition(".")[0] in ("otlabel", "torch"):
        frame, level = frame.f_back, level + 1
    return level
