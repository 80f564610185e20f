"""otlabel: balanced pseudo-labels by optimal transport (log-domain Sinkhorn-Knopp).

>>> from otlabel import sinkhorn_assign
>>> res = sinkhorn_assign(logits, epsilon=0.05)   # logits: (N, K), higher is better  # doctest: +SKIP
>>> res.labels, res.codes                                                             # doctest: +SKIP

The public names are imported on first use (PEP 562): ``import otlabel`` alone does not import torch, so the
``otlabel`` command answers ``--help`` at once and an interrupt while torch loads exits quietly.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"
__all__ = [
    "ConvergenceWarning",
    "ExactResult",
    "InputWarning",
    "ScoreSpanError",
    "SinkhornResult",
    "SmallChunksWarning",
    "exact_assign",
    "exact_plan",
    "sela_sinkhorn",
    "sinkhorn_assign",
    "sinkhorn_assign_sharded",
    "sinkhorn_assign_stream",
    "swav_sinkhorn",
]
_HOME = {  # public name -> the module that defines it
    "ConvergenceWarning": ".result",
    "ExactResult": ".exact",
    "InputWarning": ".advice",
    "ScoreSpanError": ".problem",
    "SinkhornResult": ".result",
    "SmallChunksWarning": ".streaming",
    "exact_assign": ".exact",
    "exact_plan": ".exact",
    "sela_sinkhorn": ".baselines",
    "sinkhorn_assign": ".solver",
    "sinkhorn_assign_sharded": ".distributed",
    "sinkhorn_assign_stream": ".streaming",
    "swav_sinkhorn": ".baselines",
}

if TYPE_CHECKING:  # for type checkers and IDEs: the names as if imported eagerly
    from .advice import InputWarning
    from .baselines import sela_sinkhorn, swav_sinkhorn
    from .distributed import sinkhorn_assign_sharded
    from .exact import ExactResult, exact_assign, exact_plan
    from .problem import ScoreSpanError
    from .result import ConvergenceWarning, SinkhornResult
    from .solver import sinkhorn_assign
    from .streaming import SmallChunksWarning, sinkhorn_assign_stream


SUBMODULES = ("advice", "anderson", "backends", "baselines", "cached", "cli", "distributed", "entry", "exact",
              "feasibility", "features", "graphs", "host_sources", "inputs", "interrupts", "kernels", "outputs",
              "problem", "result", "sizes", "solver", "sources", "streaming")  # fmt: skip


def __getattr__(name: str):
    if name in SUBMODULES:  # otlabel.streaming without importing it first, as with an eager package
        return importlib.import_module(f".{name}", __name__)
    if name not in _HOME:
        raise AttributeError(f"module 'otlabel' has no attribute {name!r}")
    value = getattr(importlib.import_module(_HOME[name], __name__), name)
    globals()[name] = value  # later look-ups are plain module attributes
    return value


def __dir__() -> list[str]:
    """What plain ``dir()`` lists (the module's globals: ``__name__``, ``__file__``, ``__version__``...) and the names
    imported on first use."""
    return sorted({*globals(), *__all__, *SUBMODULES})
