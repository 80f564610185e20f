"""otlabel: balanced pseudo-labels by optimal transport (log-domain Sinkhorn-Knopp).

>>> from otlabel import sinkhorn_assign
>>> res = sinkhorn_assign(logits, epsilon=0.05)   # logits: (N, K), higher is better  # doctest: +SKIP
>>> res.labels, res.codes                                                             # doctest: +SKIP
"""

from .baselines import sela_sinkhorn, swav_sinkhorn
from .distributed import sinkhorn_assign_sharded
from .exact import ExactResult, exact_assign, exact_plan
from .result import ConvergenceWarning, SinkhornResult
from .solver import sinkhorn_assign
from .streaming import sinkhorn_assign_stream

__version__ = "0.1.0"
__all__ = [
    "ConvergenceWarning",
    "ExactResult",
    "SinkhornResult",
    "exact_assign",
    "exact_plan",
    "sela_sinkhorn",
    "sinkhorn_assign",
    "sinkhorn_assign_sharded",
    "sinkhorn_assign_stream",
    "swav_sinkhorn",
]
