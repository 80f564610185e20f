"""Exact (unregularised) solvers, for checking Sinkhorn as ``epsilon -> 0``. Not built for speed.

* :func:`exact_plan` — the optimal transport plan of ``max <P, S>`` subject to the marginals, by POT's
  network simplex (``ot.emd``) or SciPy's HiGHS linear program (``scipy.optimize.linprog``).
* :func:`exact_assign` — the best *hard* balanced assignment: each cluster ``k`` gets exactly ``N·r_k``
  samples (rounded by largest remainder), solved as a linear assignment of samples to cluster slots
  (``scipy.optimize.linear_sum_assignment``). O(N^3): keep N in the low thousands.

Both take the same ``(N, K)`` scores as :func:`otlabel.sinkhorn_assign` (``-inf`` = forbidden pair).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .problem import check_score_values, check_scores, check_weights


@dataclass
class ExactResult:
    plan: np.ndarray  # (N, K) float64, rows sum to c, columns to r
    labels: np.ndarray  # (N,) int64, argmax of each row of the plan
    objective: float  # <P, S>


def _prepare(scores, cluster_weights, sample_weights):
    s3, batched = check_scores(scores)
    if batched:
        raise ValueError("the exact solvers take one (N, K) problem; loop over heads yourself.")
    _, n, k = s3.shape
    r = check_weights(cluster_weights, k, "cluster_weights", "number of clusters K", s3.device)
    c = check_weights(sample_weights, n, "sample_weights", "number of samples N", s3.device)
    check_score_values(s3, r, batched=False)
    return s3[0].double().cpu().numpy(), c.cpu().numpy(), r.cpu().numpy()


def _unit_cost(s: np.ndarray) -> np.ndarray:
    """The cost ``-S`` rescaled to [0, 1] (the optimal plan does not change under a positive affine map of all
    scores), with forbidden pairs at 1e6, a cost no feasible optimum pays. Rescaling first keeps that penalty
    finite for scores of any size (1e300 scores made it inf, and the solvers returned an empty plan)."""
    allowed = np.isfinite(s)
    finite = s[allowed]
    spread = finite.max() - finite.min()
    unit = (finite.max() - s) / spread if spread > 0 else np.zeros_like(s)
    return np.where(allowed, unit, 1e6)


def _result(plan: np.ndarray, s: np.ndarray, c: np.ndarray | None = None, r: np.ndarray | None = None) -> ExactResult:
    allowed = np.isfinite(s)
    if (plan[~allowed] > 1e-12).any():
        raise ValueError("the masked problem has no feasible plan: relax the mask or the cluster weights.")
    for sums, want in ((plan.sum(axis=1), c), (plan.sum(axis=0), r)):
        if want is not None and not np.allclose(sums, want, rtol=1e-6, atol=1e-9):
            raise ValueError("the exact solver returned a plan that misses the marginals; see its warnings above.")
    objective = float((plan[allowed] * s[allowed]).sum())
    return ExactResult(plan=plan, labels=plan.argmax(axis=1), objective=objective)


def exact_plan(scores, cluster_weights=None, sample_weights=None, method: str = "pot") -> ExactResult:
    """Optimal plan of ``max_P <P, S>`` with rows summing to ``c`` and columns to ``r`` (no entropy).

    ``method="pot"`` uses ``ot.emd`` (needs ``pip install pot``); ``method="linprog"`` uses SciPy's HiGHS.
    """
    s, c, r = _prepare(scores, cluster_weights, sample_weights)
    allowed = np.isfinite(s)
    if method == "pot":
        import ot

        plan = ot.emd(c, r, np.ascontiguousarray(_unit_cost(s)), numItermax=10_000_000)
    elif method == "linprog":
        plan = _linprog_plan(s, c, r, allowed)
    else:
        raise ValueError(f"method must be 'pot' or 'linprog', got {method!r}.")
    return _result(np.asarray(plan, dtype=np.float64), s, c, r)


def _linprog_plan(s, c, r, allowed) -> np.ndarray:
    from scipy.optimize import linprog
    from scipy.sparse import coo_matrix, vstack

    n, k = s.shape
    idx = np.arange(n * k).reshape(n, k)
    rows = coo_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n * k))
    cols = coo_matrix((np.ones(n * k), (np.tile(np.arange(k), n), idx.ravel())), shape=(k, n * k))
    bounds = np.where(allowed.ravel()[:, None], [0.0, None], [0.0, 0.0])
    res = linprog(
        np.where(allowed, _unit_cost(s), 0.0).ravel(),
        A_eq=vstack([rows, cols]).tocsr(),
        b_eq=np.concatenate([c, r]),
        bounds=[tuple(b) for b in bounds],
        method="highs",
    )
    if res.status != 0:
        raise ValueError(f"linprog found no optimal plan ({res.message}); the masked problem may be infeasible.")
    return res.x.reshape(n, k)


def cluster_sizes(n_samples: int, cluster_weights: np.ndarray) -> np.ndarray:
    """Integer cluster sizes summing to N, proportional to the weights (largest-remainder rounding)."""
    ideal = cluster_weights * n_samples
    sizes = np.floor(ideal).astype(np.int64)
    short = n_samples - int(sizes.sum())
    sizes[np.argsort(-(ideal - sizes), kind="stable")[:short]] += 1
    return sizes


def exact_assign(scores, cluster_weights=None) -> ExactResult:
    """Best hard assignment with exactly ``cluster_sizes(N, r)[k]`` samples in cluster ``k``.

    Builds one column per cluster slot (N columns in all) and solves the N×N linear assignment.
    """
    s, _, r = _prepare(scores, cluster_weights, None)
    from scipy.optimize import linear_sum_assignment

    n, k = s.shape
    slot_cluster = np.repeat(np.arange(k), cluster_sizes(n, r))  # (N,)
    slot_scores = s[:, slot_cluster]  # (N, N)
    rows, slots = linear_sum_assignment(_unit_cost(slot_scores))
    labels = np.empty(n, dtype=np.int64)
    labels[rows] = slot_cluster[slots]
    plan = np.zeros((n, k))
    plan[np.arange(n), labels] = 1.0 / n
    return _result(plan, s)
