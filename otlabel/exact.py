"""Exact (unregularised) solvers, for checking Sinkhorn as ``epsilon -> 0``. Not built for speed.

* :func:`exact_plan` — the optimal transport plan of ``max <P, S>`` subject to the marginals, by POT's
  network simplex (``ot.emd``) or SciPy's HiGHS linear program (``scipy.optimize.linprog``).
* :func:`exact_assign` — the best *hard* balanced assignment: each cluster ``k`` gets ``N·r_k`` samples rounded
  down or up (the scores decide which clusters take the spare samples), solved as a linear assignment of samples to
  cluster slots (``scipy.optimize.linear_sum_assignment``). O(N^3): keep N in the low thousands.

Both take the same ``(N, K)`` scores as :func:`otlabel.sinkhorn_assign` (``-inf`` = forbidden pair) and return an
:class:`ExactResult` in the input's kind: torch tensors (on the scores' device) for a torch tensor, NumPy arrays for
a NumPy array or a list — so that, for a tensor ``s``, ``exact_assign(s).labels == sinkhorn_assign(s).labels``
compares tensor with tensor (``sinkhorn_assign`` always returns tensors).
The solvers themselves run on the CPU in float64, on unit costs whose rounding is relative to the largest score:
scores whose best differences fall below 1e-12 of it are refused (:func:`_refuse_unresolved`; only each sample's best
are read, so a plan is optimal to about 1e-12 of the largest score), and a mask that leaves no plan is named as
:func:`otlabel.sinkhorn_assign` names it.
"""

from __future__ import annotations

import math
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .backends.torch_backend import available_memory_bytes
from .entry import entry_point, user_stacklevel
from .feasibility import shortfall_tolerance
from .problem import check_score_values, check_scores, check_weights, marginals_rounding
from .result import ConvergenceWarning

# POT imports every array library it finds as a backend. JAX, imported that way, takes 75% of the GPU's memory
# for itself at once (seen on an H100: a pytest worker that imported POT left the others out of memory). otlabel
# hands POT NumPy arrays only, so it turns those backends off, unless the program imported the library itself.
POT_OPTIONAL_BACKENDS = {"jax": "POT_BACKEND_DISABLE_JAX", "tensorflow": "POT_BACKEND_DISABLE_TENSORFLOW",
                         "cupy": "POT_BACKEND_DISABLE_CUPY"}  # fmt: skip


def import_pot():
    """``import ot`` without the JAX, TensorFlow and CuPy backends the program has not imported already. To keep
    one, import that library first, or set its switch (``POT_BACKEND_DISABLE_JAX`` etc.) to an empty string: POT
    treats any non-empty value, "0" included, as "disable". The switches are set in ``os.environ``, so processes
    started afterwards inherit them. Raises ImportError without POT, saying what to install."""
    if "ot" not in sys.modules:
        for module, switch in POT_OPTIONAL_BACKENDS.items():
            if module not in sys.modules:
                os.environ.setdefault(switch, "1")
    try:
        import ot
    except ImportError as e:
        raise ImportError(f"exact_plan(method='pot') needs POT ({e}): pip install 'otlabel[exact]', or pass "
                          "method='linprog' (SciPy).") from e  # fmt: skip
    return ot


def import_scipy_optimize(what: str):
    """``scipy.optimize``, or an ImportError that says which extra installs it."""
    try:
        from scipy import optimize
    except ImportError as e:
        raise ImportError(f"{what} needs SciPy ({e}): pip install 'otlabel[exact]'.") from e
    return optimize


@dataclass(repr=False)
class ExactResult:
    """What :func:`exact_plan` and :func:`exact_assign` return.

    Attributes:
        plan: (N, K) float64 — the optimal plan; rows sum to ``c``, columns to ``r`` (``exact_assign``: ``1/N`` in
            each sample's cluster, 0 elsewhere).
        labels: (N,) int64 — the argmax of each row of the plan, the first cluster among entries equal to within
            1e-9 of the row's mass (an even split is not decided by the solver's round-off). A sample of weight 0 (a
            row of zeros) is labelled as :func:`otlabel.sinkhorn_assign` labels it, ``argmax_k S_jk / eps + b_k``
            over its allowed clusters of positive weight, with the exact cluster duals in place of ``eps * b``:
            where those are unique (generic weights) the label is sinkhorn_assign's as ``eps -> 0``; where they are
            not (uniform weights, often), a dual inside the optimal ones is taken, so that a copy of weight 0 of a
            sample gets that sample's cluster, and sinkhorn_assign may pick another (12 of 195 samples of weight 0,
            16 x 5 scores with uniform weights, eps 2e-4).
        objective: ``<P, S>`` (a float).
        optimality_gap: a certified upper bound on how far ``objective`` falls short of the best plan with the same
            marginals (0 up to float64 rounding for an optimal plan; see :func:`optimality_gap`). The solvers'
            tolerances are relative to the span of the scores, so large finite numbers used as masks (-1e9 next to
            scores near 1) can leave a real gap; a ConvergenceWarning says so when this exceeds rounding.

    ``plan`` and ``labels`` are torch tensors on the scores' device when the scores were a torch tensor (as
    :func:`otlabel.sinkhorn_assign` returns), NumPy arrays when they were a NumPy array or a list.
    """

    plan: np.ndarray | torch.Tensor
    labels: np.ndarray | torch.Tensor
    objective: float
    optimality_gap: float

    def __repr__(self) -> str:
        # A summary: the plan is N x K numbers
        def describe(x):
            kind = "tensor" if isinstance(x, torch.Tensor) else "ndarray"
            return f"{tuple(x.shape)} {str(x.dtype).removeprefix('torch.')} {kind}"

        plan, labels = describe(self.plan), describe(self.labels)
        gap = f"optimality_gap={self.optimality_gap:.3g}"
        return f"ExactResult(objective={self.objective:.6g}, {gap}, plan={plan}, labels={labels})"


def _prepare(scores, cluster_weights, sample_weights, solver: str, check_mask: bool = True):
    """The scores, sample and cluster weights as float64 NumPy arrays, checked, what rounding the weights to their
    dtype may have moved (:func:`~otlabel.problem.weight_rounding`), and the cluster weights the mask is judged by.
    ``check_mask``: a mask that leaves no plan with these weights (Hall's condition) is the ``ValueError``
    :func:`otlabel.sinkhorn_assign` gives, naming the samples and clusters; :func:`exact_assign` skips it (it calls
    :func:`_refuse_mask` when no assignment exists), as its rounded cluster sizes may fit where the weights' exact
    shares do not (and a cluster whose share rounds down to no sample may then be masked whole: its weight counts
    as 0 for the mask). Scores the solvers cannot resolve are refused (:func:`_refuse_unresolved`, ``solver`` names
    the call). Returns ``(s, solved, c, r, rounding, checked_r, slots)``: ``solved`` the scores the solvers and the
    certificate get, their offsets taken off (:func:`_without_offsets`), ``s`` as given (for the objective);
    ``slots`` :func:`cluster_slots` for :func:`exact_assign` (``None`` with ``check_mask``)."""
    s3, batched = check_scores(scores)
    if batched:
        raise ValueError("the exact solvers take one (N, K) problem; loop over heads yourself.")
    _, n, k = s3.shape
    # Before the first float64 copy: 2,000 x 2,000 scores took 470 MiB (exact_assign too, whose slot matrix is 61 MiB)
    pair_bytes = PAIR_BYTES[solver]
    advice = ASSIGN_ADVICE if solver == "exact_assign" else PLAN_ADVICE
    if "linprog" in solver:
        advice += " method='pot' takes about 1/7 of linprog's memory."
    what = f"{solver} needs about {pair_bytes} bytes per (sample, cluster) pair of the {n:,} x {k:,} scores"
    refuse_unless_it_fits(pair_bytes * n * k, what, advice)
    r = check_weights(cluster_weights, k, "cluster_weights", "number of clusters K", s3.device, (n, k))
    c = check_weights(sample_weights, n, "sample_weights", "number of samples N", s3.device, (n, k))
    rounding = marginals_rounding(cluster_weights, sample_weights, k, n)
    checked_r, sized, slots = r, None, None
    if not check_mask:  # the check below refuses a weighted cluster no sample may reach: such a one may stay empty
        slots = fixed, flexible, spare = cluster_slots(n, r.cpu().numpy(), rounding)
        sized = sized_clusters(k, flexible, spare)
        may_stay_empty = torch.from_numpy(np.bincount(fixed, minlength=k) == 0).to(r.device)
        checked_r = torch.where(may_stay_empty & (s3[0] == -math.inf).all(dim=0), 0.0, r)
        if not bool((checked_r > 0).any()):  # every cluster with a share masked whole: no sample can go anywhere,
            checked_r = r  # which the check below says of the first sample (it needs some weighted cluster)
    check_score_values(s3, checked_r, batched=False, sample_weights=c if check_mask else None, mass_rounding=rounding)
    s = s3[0].double().cpu().numpy()
    solved = _without_offsets(s, sized)
    _refuse_unresolved(s, solved, solver)
    return s, solved, c.cpu().numpy(), r.cpu().numpy(), rounding, checked_r, slots


def _refuse_mask(s: np.ndarray, r: torch.Tensor, rounding: float) -> None:
    """For :func:`exact_assign`, which found no assignment: the mask's violation of Hall's condition for the cluster
    weights ``r`` (as :func:`_prepare` judges them), in :func:`otlabel.sinkhorn_assign`'s words. There is one: a plan
    with the exact shares ``N r`` would make an assignment with them rounded down or up (the polytope of such plans has
    whole vertices). The message says so; where the check cannot tell (too many distinct mask rows), the generic one."""
    n = s.shape[0]
    try:
        check_score_values(torch.from_numpy(s)[None], r, batched=False, sample_weights=torch.full((n,), 1.0 / n,
                           dtype=torch.float64), mass_rounding=rounding)  # fmt: skip
    except ValueError as err:
        raise ValueError(f"{err} (exact_assign gives each cluster its share N·r_k rounded down or up to whole samples, "
                         "and no such rounding fits this mask either.)") from None  # fmt: skip
    raise ValueError("the masked problem has no feasible plan: relax the mask or the cluster weights.")


def _without_offsets(s: np.ndarray, sized: np.ndarray | None = None) -> np.ndarray:
    """The scores less a constant per cluster, then per sample, where every finite score of that cluster (sample) lies
    within a factor of 2 of the constant: ``1e15 + x`` for a cluster (a bias) with ``x`` near 1. Such a shift changes
    no plan with fixed marginals (it adds the same to every plan's objective) and is exact in float64 (the difference
    of two numbers within a factor of 2 of each other is), while the solvers resolve scores only relative to the
    largest: a cluster's 1e15 left its differences of 0.1 to chance (exact_plan returned a wrong plan, no warning),
    and a sample's had the other samples' scores refused as unresolved. The unit costs, the resolution check and the
    certificate use these scores (:func:`_prepare` takes them off once); the objective, the scores as given.
    ``sized``: the clusters whose number of samples is fixed (:func:`sized_clusters`; default all, as in
    :func:`exact_plan`): only theirs may go, as a cluster that may take a spare sample or not gains its constant with
    it."""
    allowed = np.isfinite(s)
    for axis in (0, 1):
        low = np.where(allowed, s, np.inf).min(axis=axis, keepdims=True)
        high = np.where(allowed, s, -np.inf).max(axis=axis, keepdims=True)
        with np.errstate(over="ignore"):  # 2 * 1e308 is inf, and the comparison stays right
            exact = ((low > 0) & (high <= 2 * low)) | ((high < 0) & (low >= 2 * high))
        exact &= np.isfinite(high)  # a cluster every sample is forbidden: nothing to shift
        if axis == 0 and sized is not None:
            exact &= sized
        s = np.where(exact & allowed, s - np.where(exact, high, 0.0), s)
    return s


# The finest difference between two scores the unit costs keep, relative to the largest score: below it the solvers
# take them as equal (and the certificate cannot vouch for a plan, see GAP_RESOLUTION)
SCORE_RESOLUTION = 1e-12
NEAR_TIE = 1e-6  # scores that differ by less than this, relative to their own size, are ties whatever the solver


def _refuse_unresolved(given: np.ndarray, s: np.ndarray, solver: str) -> None:
    """A ``ValueError`` where a sample's best scores differ by less than the solvers resolve: the unit costs are
    ``(max S - S) / span``, whose float64 rounding is relative to the largest score, so one score far above the rest
    (1e30 among scores of about 1) turns every other difference into a tie, and the assignment among them into an
    arbitrary one (a wrong one, with an optimality gap of 0: the certificate's rounding is relative to that score
    too). Scores that are near ties of their own (float32 values cast, within ``NEAR_TIE``) are not counted. Masks
    written as large negative numbers are not concerned: they leave the largest score as it was (the certificate
    warns where they hide differences). Judged on the scores the solvers get, ``s`` (:func:`_without_offsets`); the
    message quotes them as ``given``."""
    allowed = np.isfinite(s)
    top = float(np.where(allowed, s, -np.inf).max())
    row_max = np.where(allowed, s, -np.inf).max(axis=1, keepdims=True)  # (N, 1)
    with np.errstate(invalid="ignore", over="ignore"):  # -inf - -inf on masked pairs, 1e308 - -1e308: never tied
        below = row_max - s  # (N, K)
    tied = allowed & (below > 0) & (below <= SCORE_RESOLUTION * abs(top))
    tied &= below > NEAR_TIE * np.maximum(np.abs(row_max), np.abs(s))
    if not tied.any():
        return
    j, k = (int(x) for x in np.argwhere(tied)[0])
    best = int(np.flatnonzero(allowed[j] & (s[j] == row_max[j, 0]))[0])
    at = np.unravel_index(int(np.argmax(np.where(allowed, s, -np.inf))), s.shape)
    shifted = (
        "."
        if solver == "exact_assign"
        else (
            f": that leaves sample {at[0]}'s other scores far below the rest, which exact_assign resolves, and which "
            "exact_plan resolves only relative to their span (a ConvergenceWarning then says how far its plan may fall "
            "short)."
        )
    )
    raise ValueError(
        f"{solver} cannot resolve these scores: its unit costs keep differences down to about {SCORE_RESOLUTION:g} "
        f"of the largest score, {given[at]:.3g} (sample {at[0]}, cluster {at[1]}), and sample {j}'s scores "
        f"{given[j, best]:.6g} (cluster {best}) and {given[j, k]:.6g} (cluster {k}) differ by {below[j, k]:.3g}: "
        "it would "
        "take them as equal and return an arbitrary plan among them as optimal. If the large score is meant to force "
        f"its pair, write that as a mask: -inf for sample {at[0]}'s other clusters, an ordinary score for it. "
        "Otherwise subtract each sample's largest score first, scores - scores.max(axis=1, keepdims=True) "
        f"(.amax(1, keepdim=True) for a tensor; a per-sample shift changes no plan){shifted}"
    )


FORBIDDEN = 1e6  # the unit cost of a forbidden pair: more than any N x N assignment of unit costs can save


def _unit_cost(s: np.ndarray) -> np.ndarray:
    """The cost ``-S`` rescaled to [0, 1] (the optimal plan does not change under a positive affine map of all
    scores), with forbidden pairs at 1e6, a cost no feasible optimum pays. Rescaling first keeps that penalty
    finite for scores of any size (1e300 scores made it inf, and the solvers returned an empty plan); dividing by the
    largest |score| first keeps the spread finite too (1e308 - -1e308 is inf). ``s``: the scores without their
    offsets (:func:`_prepare`)."""
    allowed = np.isfinite(s)
    top = np.abs(s[allowed]).max()
    s = s / top if top > 0 else s  # the finite scores in [-1, 1]
    finite = s[allowed]
    spread = finite.max() - finite.min()
    unit = (finite.max() - s) / spread if spread > 0 else np.zeros_like(s)
    return np.where(allowed, unit, FORBIDDEN)


def _result(plan: np.ndarray, s: np.ndarray, solved: np.ndarray, solver: str, c: np.ndarray | None = None,
            r: np.ndarray | None = None, mass_rounding: float = 0.0,
            pot_warning: str | None = None) -> ExactResult:  # fmt: skip
    """The plan, its labels, objective and certified optimality gap, checked: no mass on a forbidden pair beyond what
    the mask check lets through (:func:`~otlabel.feasibility.shortfall_tolerance`: 1e-9 of the mass, or what rounding
    the weights may have moved, ``mass_rounding``; that much is dropped, and the plan misses the marginals by it; the
    check's int32 flow, in units of 2^-30 of the mass rounded in feasibility's favour, may let up to one unit per mask
    pattern and cluster more through: 3e-7 with 1,500 distinct mask rows over 60 clusters; named here), marginals met
    (:func:`_refuse_missed_marginals`), and a warning where the gap is wider than float64 arithmetic explains
    (``solver`` names the call in it). The objective is of the scores as given, ``s``; the certificate of the scores
    the solver got, ``solved`` (the same gap: a constant per cluster or sample adds the same to every plan with these
    marginals). ``pot_warning``: for POT, what its log said of the solve (None: optimal), quoted if the plan is
    refused."""
    allowed = np.isfinite(s)
    forbidden, tolerance = np.where(allowed, 0.0, plan), shortfall_tolerance(mass_rounding)  # the mask check's rule
    if forbidden.sum() > tolerance:  # a mask the check could not resolve (or skipped: too many distinct rows)
        stuck = np.flatnonzero(forbidden.sum(axis=1) > 0).tolist()
        samples = ", ".join(map(str, stuck[:8])) + (f", ... ({len(stuck)} samples)" if len(stuck) > 8 else "")
        raise ValueError(
            f"the masked problem has no feasible plan: {solver} had to put {forbidden.sum():.3g} of the mass on "
            f"forbidden (-inf) pairs (of samples [{samples}]), more than the {tolerance:.3g} allowed for rounding. "
            "Relax the mask or the cluster weights."
        )
    # The marginals are the solver's before the forbidden pairs' mass goes: bfloat16 weights [0.3, 0.7] are short by
    # 7.8e-4 of a mask's capacity (accepted as their rounding), which is 2.6e-3 of cluster 0's weight
    _refuse_missed_marginals(plan, c, r, solver, pot_warning)
    plan = np.where(allowed, np.maximum(plan, 0.0), 0.0)  # HiGHS's round-off below 0: -1.2e-14 at 2,268 x 2
    objective = float((plan[allowed] * s[allowed]).sum())
    gap, magnitude, pi = _certificate(plan, solved)
    _warn_if_inexact(gap, magnitude, s, solver)
    return ExactResult(plan=plan, labels=_labels(plan, solved, pi, c, r), objective=objective, optimality_gap=gap)


# Plan entries of a row within this share of the row's mass of its largest are equal: the label is the first of them
LABEL_TIE = 1e-9


def _labels(plan: np.ndarray, s: np.ndarray, pi: np.ndarray, c: np.ndarray | None = None,
            r: np.ndarray | None = None) -> np.ndarray:  # fmt: skip
    """(N,) int64: each sample's label. A row with mass: its largest entry, entries within ``LABEL_TIE`` of the row's
    mass of it counting as equal, and the first cluster among equals (an even split is no longer decided by round-off:
    a 1 x 3 problem's plan of thirds gave label 0 with POT and 1 with HiGHS, one ulp apart).

    A row without mass, or of sample weight 0 in ``c`` (whatever round-off a solver left in it), is labelled as
    :func:`otlabel.sinkhorn_assign` labels it, ``argmax_k S_jk / eps + b_k`` over its allowed clusters of positive
    weight (in ``r`` and in the plan, which leaves a weight of 1e-20 out: a sample with no other gets its best score
    among those; ``b = -inf`` at weight 0), with the exact problem's cluster duals in place of
    ``eps * b``: the certificate's ``pi`` (:func:`_certificate`, on the scores ``s`` divided by their largest
    ``|S|``) moved into the relative interior of the optimal duals (:func:`_interior_duals`), the first cluster among
    values equal to a few units of rounding. Its plan row of zeros gave it label 0, a forbidden pair or a cluster of
    weight 0 as it might be."""
    mass = plan.sum(axis=1)  # (N,)
    labels = np.argmax(plan >= plan.max(axis=1, keepdims=True) - LABEL_TIE * mass[:, None], axis=1)
    empty = mass == 0 if c is None else (mass == 0) | (c == 0)
    if not empty.any():
        return labels
    top = float(np.abs(s[np.isfinite(s)]).max(initial=0.0)) or 1.0  # the certificate's scale of the scores
    weighted = plan.sum(axis=0) > 0 if r is None else (plan.sum(axis=0) > 0) & (r > 0)  # (K,)
    rounding = 8 * s.shape[1] * np.finfo(np.float64).eps * max(1.0, float(np.abs(pi[weighted]).max(initial=0.0)))
    pi = _interior_duals(plan, s, top, pi, weighted, rounding)
    values = _prices(s[empty], top, pi, weighted)  # (E, K)
    labels[empty] = np.argmax(values >= values.max(axis=1, keepdims=True) - rounding, axis=1)
    if r is not None:  # a weight the solvers leave out of the plan (1e-20), and so out of the duals, may be a sample's
        lost = np.flatnonzero(empty)[np.isneginf(values).all(axis=1)]  # only one: its best score there (not label 0)
        labels[lost] = np.argmax(np.where(np.isfinite(s[lost]) & (r > 0), s[lost], -np.inf), axis=1)
    return labels


def _prices(s: np.ndarray, top: float, pi: np.ndarray, weighted: np.ndarray) -> np.ndarray:
    """``s / top + pi`` (R, K) for rows ``s`` of the scores, ``-inf`` where the pair is forbidden or the cluster not
    ``weighted``."""
    with np.errstate(invalid="ignore"):  # (-inf scores: closed either way)
        return np.where(np.isfinite(s) & weighted, s / top + pi, -np.inf)


def _interior_duals(plan: np.ndarray, s: np.ndarray, top: float, pi: np.ndarray, weighted: np.ndarray,
                    rounding: float) -> np.ndarray:  # fmt: skip
    """Optimal cluster duals (K,) in the relative interior of the optimal ones, from ``pi``, an optimal one.

    The certificate's ``pi`` (shortest distances) is an extreme point where the optimal duals are not unique (uniform
    weights, whose shares add up alike, make that common): there a sample's best cluster at the prices ``s + pi`` ties
    with clusters it could move to at no loss in this optimum but not in every one, and a sample of weight 0 that
    copies a sample of weight went to another cluster than its twin in 70 of 1,289 cases (12 x 4 scores, 20% -inf,
    uniform weights; POT and HiGHS), in none with these duals. They spread the prices as far as optimality lets them.
    A move goes from a cluster where a sample carries mass to one as good for that sample (within ``rounding``):
    clusters that reach one another by such moves (strongly connected) must keep their differences; the others are
    ranked along the moves (``level``, the longest path in the acyclic graph of those components), and each such move
    is made to lose ``delta`` per level it descends, where ``delta`` is half the smallest loss of any other move
    divided by the levels: every move that lost still loses, and the duals stay optimal. Then only a genuine tie (a
    home as good in every optimum) ties, and a twin gets its sample's cluster. ``weighted``: the clusters of positive
    weight (the others are closed); ``s / top``: the scores scaled as ``pi`` is."""
    from scipy.sparse import csr_array
    from scipy.sparse.csgraph import connected_components

    carries = _carrying(plan)
    rows = carries.any(axis=1)
    gaps = _prices(s[rows], top, pi, weighted)  # (R, K)
    gaps = np.subtract(gaps.max(axis=1, keepdims=True), gaps, out=gaps)  # >= 0: what each move loses (inf: closed)
    tight = gaps <= rounding
    loose = gaps[~tight & np.isfinite(gaps)]
    del gaps
    if not loose.size:
        return pi
    n_rows, k = tight.shape
    owner, home = np.nonzero(carries[rows])
    row, better = np.nonzero(tight)
    carried = csr_array((np.ones(len(owner), np.int32), (home, owner)), shape=(k, n_rows))
    tied = csr_array((np.ones(len(row), np.int32), (row, better)), shape=(n_rows, k))
    moves = carried @ tied  # (K, K): the tight moves
    n_components, component = connected_components(moves, directed=True, connection="strong")
    a, b = moves.nonzero()
    across = component[a] != component[b]
    ahead, behind = component[a[across]], component[b[across]]
    level = np.zeros(n_components)
    for _ in range(n_components):  # longest paths in an acyclic graph: settled within its number of nodes
        deeper = level.copy()
        np.maximum.at(deeper, ahead, level[behind] + 1)
        if np.array_equal(deeper, level):
            break
        level = deeper
    delta = float(loose.min()) / (2 * (level.max() + 1))
    return pi + delta * level[component]


# A plan meets a weight when it is off by at most this much of it, plus MARGINAL_ATOL (of the total mass, 1)
MARGINAL_RTOL, MARGINAL_ATOL = 1e-6, 1e-12
# HiGHS's primal feasibility tolerance (exact_plan's linprog): it takes an entry down to -1e-10 for 0
NEGATIVE_ROUNDOFF = 1e-10


def _refuse_missed_marginals(plan: np.ndarray, c: np.ndarray | None, r: np.ndarray | None, solver: str,
                             pot_warning: str | None = None) -> None:  # fmt: skip
    """A ``ValueError`` naming the first weight the plan misses (by more than ``MARGINAL_RTOL`` of it plus
    ``MARGINAL_ATOL``) or its most negative entry (below ``-NEGATIVE_ROUNDOFF``). HiGHS meets the marginals only to its
    feasibility tolerance, absolute, 1e-10 at the finest: a weight of 1e-11 got a row summing to -1e-11 and a column
    of 0, and in 10 of 12 random problems of 250-760 x 7-39 with Dirichlet(0.3) weights some weight (8e-11 to 2e-13)
    got none of its mass, or twice it; the former check (1e-9 absolute) let all of them pass. For POT the message
    quotes what POT's log said of this solve (``pot_warning``, the text of the warning it issues, or None: optimal):
    it said "see the solver's warnings above" whether or not there were any (and Python shows a warning once per
    place by default: a second failing solve showed none)."""
    for name, sums, want in (("sample", plan.sum(axis=1), c), ("cluster", plan.sum(axis=0), r)):
        if want is None:
            continue
        missed = np.abs(sums - want) > MARGINAL_RTOL * want + MARGINAL_ATOL
        if missed.any():
            at = int(np.flatnonzero(missed)[0])
            what = f"{name} {at}'s weight {want[at]:.3g} got {sums[at]:.3g}"
            break
    else:
        if c is None or plan.min(initial=0.0) >= -NEGATIVE_ROUNDOFF:
            return
        i, j = np.unravel_index(np.argmin(plan), plan.shape)
        what = f"sample {i} has mass {plan[i, j]:.3g} in cluster {j}"
    if solver == "exact_plan(method='linprog')":
        hint = (" SciPy's HiGHS meets the weights only to about 1e-10 (its feasibility tolerance, absolute): use "
                "method='pot' (POT's network simplex), or set weights below about 1e-10 to 0.")  # fmt: skip
    elif pot_warning:
        hint = f" POT warned: {pot_warning.rstrip('.')}. Or try method='linprog' (SciPy's HiGHS)."
    else:
        hint = " POT reported the solve optimal (no warning). Try method='linprog' (SciPy's HiGHS)."
    raise ValueError(f"{solver} returned a plan that misses the marginals: {what}.{hint}")


# A gap this small relative to the largest score the plan uses is float64 rounding, not a solver's tolerance
GAP_RESOLUTION = 1e-12


# A pair carries mass when it holds more than this share of its row's or its column's mass, whichever is smaller
CARRYING_SHARE = 1e-9


def _carrying(plan: np.ndarray) -> np.ndarray:
    """The pairs that carry mass, leaving out the solvers' round-off (4e-17 on a pair of a 1/30 row): a cycle through
    such a pair may gain, and would hold the duals away from the optimal ones, for a gain of nothing. Judged against
    the smaller of the pair's row and column sums (no entry exceeds either, nor does its round-off, in proportion): a
    cluster of weight 1e-11 whose whole mass sat on one pair of a 1/2 row was taken for round-off against the row
    alone, the duals were not fitted to that pair, and an optimal plan got a gap of 1.2e-11 and a ConvergenceWarning."""
    smaller = np.minimum(plan.sum(axis=1, keepdims=True), plan.sum(axis=0, keepdims=True))  # (N, K)
    return plan > CARRYING_SHARE * smaller


def optimality_gap(plan: np.ndarray | torch.Tensor, s: np.ndarray | torch.Tensor) -> float:
    """An upper bound on how far ``<P, S>`` falls short of the best plan with ``P``'s own marginals, certified by a
    dual solution: for any ``u, v`` with ``u_i + v_j >= S_ij`` on every allowed pair, no plan with those marginals
    scores more than ``sum_i a_i u_i + sum_j b_j v_j`` (weak duality; ``a``, ``b`` the row and column sums of P).
    ``P`` is nonnegative and carries no mass on a forbidden (-inf) pair.

    The duals come from ``P`` itself. Moving mass from a pair ``(i, j)`` that carries some to ``(i, j')`` changes the
    score by ``S_ij' - S_ij``; ``P`` is optimal exactly when no cycle of such moves gains, and then the shortest
    "loss" distances ``pi_j`` to each cluster (Bellman-Ford from all clusters at once, see
    :func:`_bellman_ford_round`) make ``v = -pi`` and ``u_i = max_j S_ij - v_j`` optimal duals: the bound is 0 up
    to rounding. A plan that some cycle improves gets a positive bound, at least its true shortfall. Computed on the
    scores divided by the largest ``|S|`` (no overflow for scores near the float64 limit), in the scores' units."""
    # as ExactResult holds them: tensors for tensor scores
    plan, s = (np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64) for x in (plan, s))
    return _certificate(plan, s)[0]


def _certificate(plan: np.ndarray, s: np.ndarray) -> tuple[float, float, np.ndarray]:
    """:func:`optimality_gap`, the largest magnitude its sums add (the scores the plan uses and the duals of the
    samples and clusters with mass, in the scores' units): the scale of its own rounding, and the cluster duals of its
    bound, ``pi`` (K,) (``v = -pi``), in units of the largest ``|S|`` (zeros where there is nothing to certify)."""
    allowed = np.isfinite(s)
    if plan[~allowed].any():
        raise ValueError("the plan carries mass on a forbidden (-inf) pair; it has no score to certify.")
    carries = _carrying(plan)
    top = float(np.abs(s[allowed]).max(initial=0.0))
    if top == 0 or not carries.any():
        return 0.0, 0.0, np.zeros(s.shape[1])
    s = s / top
    rows, cols, objective = plan.sum(axis=1), plan.sum(axis=0), float((plan[allowed] * s[allowed]).sum())
    # A sample of no mass adds nothing to the bound, and its u may be -inf (every pair forbidden): left out. So is a
    # cluster of no mass (v = +inf: no plan with these marginals uses it), whose scores would otherwise enter u, and
    # their rounding the bound: a weight-0 cluster's 7e7 next to used scores near 1 gave optimal plans a gap of 8e-10
    used = slice(None) if (rows > 0).all() else rows > 0
    s_used, allowed_used, rows_used = s[used], allowed[used] & (cols > 0), rows[used]

    def bound(pi: np.ndarray) -> tuple[float, float]:  # the dual objective of v = -pi and its best u, less the
        u = np.where(allowed_used, s_used + pi, -np.inf).max(axis=1)  # plan's score; and the duals' magnitude
        size = max(float(np.abs(u).max()), float(np.abs(pi[cols > 0]).max(initial=0.0)))
        return float(rows_used @ u - cols @ pi) - objective, size

    # A move's loss gets a few units of rounding added, so that cycles which gain only by rounding end the search
    scale = float(np.abs(s[carries]).max())
    slack = 4 * np.finfo(np.float64).eps * scale
    step = _bellman_ford_round(s, carries, slack)
    # The moves form a graph over the K clusters: without a gaining cycle its distances settle within K rounds
    pi, best, rounds = np.zeros(s.shape[1]), (math.inf, 0.0, None), s.shape[1] + 1
    for round_ in range(rounds + 1):
        # rounds 0, 1, 2, 4, ... and the last: while a gaining cycle drives the distances down without end, the bound
        # is taken where it was tightest
        last = round_ == rounds or np.array_equal(reached := step(pi), pi)
        if last or round_ & (round_ - 1) == 0:
            gap, size = bound(pi)
            if (gap, size) < best[:2] or best[2] is None:  # (the smaller gap, then the smaller magnitude)
                best = (gap, size, pi)
        if last:
            break
        pi = reached
    gap, size, pi = best
    return max(0.0, gap) * top, max(scale, size) * top, pi


def _bellman_ford_round(s: np.ndarray, carries: np.ndarray, slack: float):
    """One round of Bellman-Ford over the moves of mass: ``pi -> min(pi, min_j pi_j + W[j, :])``, where ``W[j, j']``
    is the least loss of moving mass from cluster ``j`` to ``j'`` through one sample, ``min_i S_ij - S_ij'`` over the
    samples ``i`` whose pair ``(i, j)`` carries mass (plus ``slack``). With no more clusters than samples ``W`` is
    built once (K x K, within the N x K of the scores) and a round costs K^2: at 2,000 x 1,000 a certificate took
    3.3-3.9 s in rounds over the rows (N x K each), as long as POT's solve. With more clusters than samples the
    rounds go over the rows, through the least loss of reaching each sample (``pi_j + S_ij``)."""
    n, k = s.shape
    if k > n:

        def over_rows(pi: np.ndarray) -> np.ndarray:
            rho = np.where(carries, pi + s, np.inf).min(axis=1)
            return np.minimum(pi, (rho[:, None] - s + slack).min(axis=0))

        return over_rows
    samples, clusters = np.nonzero(carries)
    order = np.argsort(clusters, kind="stable")
    samples, clusters = samples[order], clusters[order]
    w = np.full((k, k), np.inf)
    chunk = max(1, 2**22 // k)  # pairs at a time: 32 MiB of losses
    for start in range(0, len(samples), chunk):
        i, j = samples[start : start + chunk], clusters[start : start + chunk]
        losses = s[i, j][:, None] - s[i] + slack  # a forbidden (i, j') is a loss of +inf
        first = np.flatnonzero(np.r_[True, j[1:] != j[:-1]])  # j is sorted: each cluster's run of pairs
        w[j[first]] = np.minimum(w[j[first]], np.minimum.reduceat(losses, first, axis=0))
    return lambda pi: np.minimum(pi, (pi[:, None] + w).min(axis=0))


def _warn_if_inexact(gap: float, magnitude: float, s: np.ndarray, solver: str) -> None:
    """A ConvergenceWarning where the plan may be further from the optimum than float64 rounding explains (rounding of
    the certificate's own sums, relative to ``magnitude``): the solver's tolerance is relative to the whole span of
    the scores, so large finite numbers standing in for forbidden pairs (-1e9) hide the differences that matter."""
    if gap <= GAP_RESOLUTION * max(magnitude, np.finfo(np.float64).tiny):
        return
    finite = s[np.isfinite(s)]
    finer = " or method='pot' (finer)," if solver == "exact_plan(method='linprog')" else ""
    warnings.warn(
        f"{solver} returned a plan that may be up to {gap:.3g} below the optimum (optimality_gap): the scores span "
        f"{finite.min():.3g} to {finite.max():.3g}, and the solver resolves differences only relative to that span. "
        f"Use -inf rather than a large finite number for forbidden pairs,{finer} or subtract each row's largest "
        "score (which leaves the optimal plan as it is).",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


def _like(result: ExactResult, scores) -> ExactResult:
    """The result in the kind of the input: torch tensors on its device for a tensor, else NumPy arrays."""
    if isinstance(scores, torch.Tensor):
        result.plan = torch.from_numpy(result.plan).to(scores.device)
        result.labels = torch.from_numpy(result.labels).to(scores.device)
    return result


@entry_point
def exact_plan(scores, cluster_weights=None, sample_weights=None, method: str = "pot") -> ExactResult:
    """Optimal plan of ``max_P <P, S>`` with rows summing to ``c`` and columns to ``r`` (no entropy).

    Args:
        scores: one ``(N, K)`` problem, higher is better (``-inf`` forbids a pair), as in
            :func:`otlabel.sinkhorn_assign`: a tensor, NumPy array or list of numbers.
        cluster_weights: ``r`` (K,), as in :func:`otlabel.sinkhorn_assign` (default uniform).
        sample_weights: ``c`` (N,), as in :func:`otlabel.sinkhorn_assign` (default uniform).
        method: ``"pot"`` uses ``ot.emd`` (needs ``pip install pot``); ``"linprog"`` uses SciPy's HiGHS.

    Returns:
        An :class:`ExactResult` (tensors for tensor scores, NumPy arrays otherwise). A sample of weight 0 gets no mass
        and a label all the same (see :attr:`ExactResult.labels`); one allowed only in clusters of weight 0 is refused,
        as by :func:`otlabel.sinkhorn_assign`.
    """
    if not isinstance(method, str) or method not in ("pot", "linprog"):  # an array: "truth value ... is ambiguous"
        raise ValueError(f"method must be 'pot' or 'linprog', got {method!r}.")
    s, solved, c, r, rounding, *_ = _prepare(scores, cluster_weights, sample_weights, f"exact_plan(method='{method}')")
    pot_warning = None
    if method == "pot":
        ot = import_pot()
        cost = np.ascontiguousarray(_unit_cost(solved))
        # POT's log holds the text of the warning it issues (numItermax reached...): quoted should the plan be refused.
        # Its warnings go through the caller's filters untouched: recording them swapped the process's warnings state
        # for the whole solve (not thread-safe), and their re-issue lost the module that filters match
        plan, log = ot.emd(c, r, cost, numItermax=10_000_000, log=True)
        pot_warning = log.get("warning")
    else:
        plan = _linprog_plan(solved, c, r)
    plan = np.asarray(plan, dtype=np.float64)
    return _like(_result(plan, s, solved, f"exact_plan(method='{method}')", c, r, rounding, pot_warning), scores)


def _linprog_plan(s, c, r) -> np.ndarray:
    linprog = import_scipy_optimize("exact_plan(method='linprog')").linprog
    from scipy.sparse import coo_matrix, vstack

    n, k = s.shape
    idx = np.arange(n * k).reshape(n, k)
    rows = coo_matrix((np.ones(n * k), (np.repeat(np.arange(n), k), idx.ravel())), shape=(n, n * k))
    cols = coo_matrix((np.ones(n * k), (np.tile(np.arange(k), n), idx.ravel())), shape=(k, n * k))
    res = linprog(
        _unit_cost(s).ravel(),  # forbidden pairs at a cost no feasible optimum pays, as for POT (not fixed at 0)
        A_eq=vstack([rows, cols]).tocsr(),
        b_eq=np.concatenate([c, r]),
        bounds=(0.0, None),
        method="highs",
        # HiGHS's default optimality tolerance, 1e-7, is relative to the unit costs: scores of 0.01 next to a -1e6
        # stood for 1e-8 and were not told apart (a plan 0.009 below the optimum). 1e-10 is the finest it takes.
        # Its feasibility tolerance is absolute, on the weights: at the default 1e-7 a weight of 1e-8 got no mass
        # (the plan missed the marginals) and one of 1e-9 none either, silently; 1e-10 is the finest too. Weights
        # rounded in float32 may miss a mask's capacity by 1e-8: the forbidden pairs' cost takes that, and _result
        # drops it. Presolve off: it called feasible problems with weights below ~1e-6 infeasible (11 of 12 random
        # ones, 50-800 x 2-40, Dirichlet(0.3) weights, no mask), and without it HiGHS is faster here (0.3 s instead
        # of 0.9 s at 2,000 x 50).
        options={"dual_feasibility_tolerance": 1e-10, "primal_feasibility_tolerance": 1e-10, "presolve": False},
    )
    if res.status != 0:
        raise ValueError(f"linprog found no optimal plan ({res.message}); the masked problem may be infeasible.")
    return res.x.reshape(n, k)


def cluster_slots(
    n_samples: int, cluster_weights: np.ndarray, rounding: float = 0.0
) -> tuple[np.ndarray, np.ndarray, int]:
    """The clusters' shares of N samples in whole samples: ``(fixed, flexible, spare)``.

    Cluster ``k`` gets ``floor(N·r_k)`` samples for sure (``fixed``: the cluster of each such slot), and may take one
    more where ``N·r_k`` is not whole (``flexible``: those clusters, one slot each); ``spare`` of the flexible slots
    are filled, which makes N. A share within 1e-9 of a whole number (relative) counts as whole: weights such as
    1/K, rounded, give 2.0000000000000004 or 1.9999999999999998 samples where 2 are meant. ``rounding``
    (:func:`~otlabel.problem.weight_rounding`) widens that for weights given in a coarser dtype: float32 [0.3, 0.7]
    make 3.0000001 and 6.9999999 of 10 samples. The tolerances add up to half a sample at most, so the spare
    samples always fit the flexible slots."""
    ideal = np.asarray(cluster_weights, dtype=np.float64) * n_samples
    whole = np.round(ideal)
    tolerance = np.minimum(max(1e-9, rounding) * np.maximum(1.0, ideal), 0.5 / max(1, len(ideal)))
    ideal = np.where(np.abs(ideal - whole) <= tolerance, whole, ideal)
    floor = np.floor(ideal).astype(np.int64)
    flexible = np.flatnonzero(ideal > floor)
    spare = n_samples - int(floor.sum())
    if not 0 <= spare <= len(flexible):  # the shares sum to N (validated weights): rounding cannot get here
        raise RuntimeError(f"otlabel: internal error: {spare} spare samples for {len(flexible)} flexible clusters.")
    return np.repeat(np.arange(len(floor)), floor), flexible, spare


def sized_clusters(k: int, flexible: np.ndarray, spare: int) -> np.ndarray:
    """(K,) bool: the clusters whose number of samples :func:`cluster_slots` fixes (all but the flexible ones, unless
    every flexible slot or none is filled)."""
    sized = np.ones(k, dtype=bool)
    if 0 < spare < len(flexible):
        sized[flexible] = False
    return sized


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 2**30:.1f} GiB" if n_bytes >= 2**30 else f"{n_bytes / 2**20:.1f} MiB"


ASSIGN_ADVICE = ("The exact assignment is for checking small problems (N in the thousands; its time grows as N^3): "
                 "use exact_plan (N x K) or sinkhorn_assign with a small epsilon for large N.")  # fmt: skip
PLAN_ADVICE = ("The exact solvers are for checking small problems: sinkhorn_assign with a small epsilon approaches the "
               "same plan, in memory of the order of the scores'.")  # fmt: skip
# The peak memory of a solve per (sample, cluster) pair of the scores, measured on float32 scores of 2,000 x 2,000 to
# 16,000 x 250: the checks, the unit costs and the certificate take up to ~120 bytes (every solver: POT's network
# simplex stays within it, as does exact_assign's N x K part); SciPy's HiGHS 825-840 (linprog's matrices and copies)
PAIR_BYTES = {"exact_plan(method='pot')": 128, "exact_plan(method='linprog')": 864, "exact_assign": 128}


def refuse_unless_it_fits(needed: int, what: str, advice: str = ASSIGN_ADVICE) -> None:
    """A MemoryError from NumPy names an array shape, not the cause (and the kernel may end the process first): say
    which input is too large, and what to do. Checked against the memory available (page cache counted), so that it
    refuses only what cannot fit."""
    free = available_memory_bytes()
    if free is not None and needed > free:
        raise ValueError(f"{what}: {_size(needed)}, more than the {_size(free)} available. {advice}")


@entry_point
def exact_assign(scores, cluster_weights=None) -> ExactResult:
    """Best hard assignment in which cluster ``k`` gets ``floor(N·r_k)`` or ``ceil(N·r_k)`` samples (N/K rounded down
    or up for the default weights): which clusters take the spare samples is decided by the scores too.
    Samples weigh ``1/N`` each.

    A linear assignment of samples to cluster slots: ``floor(N·r_k)`` fixed slots per cluster, and one flexible slot
    per cluster whose share is not whole, of which placeholder rows (allowed only there, at no cost) take those left
    empty (when there are fixed slots to fill: without, the N samples take N of the flexible slots).

    Args:
        scores: one ``(N, K)`` problem, higher is better (``-inf`` forbids a pair), as in
            :func:`otlabel.sinkhorn_assign`: a tensor, NumPy array or list of numbers.
        cluster_weights: ``r`` (K,), as in :func:`otlabel.sinkhorn_assign` (default uniform).

    Returns:
        An :class:`ExactResult` (tensors for tensor scores, NumPy arrays otherwise).
    """
    s, solved, _, _, rounding, checked_r, slots = _prepare(scores, cluster_weights, None, "exact_assign",
                                                           check_mask=False)  # fmt: skip
    linear_sum_assignment = import_scipy_optimize("exact_assign").linear_sum_assignment

    n, k = s.shape
    fixed, flexible, spare = slots
    # Samples and placeholders by fixed and flexible slots; with no fixed slot (N < K, say) no placeholder is needed:
    # N samples to distinct flexible slots (N x K, not K x K for 10 samples and 100,000 clusters)
    n_rows = n + (len(flexible) - spare if len(fixed) else 0)
    n_slots = len(fixed) + len(flexible)
    refuse_unless_it_fits(2 * n_rows * n_slots * 8, f"exact_assign builds a {n_rows:,} x {n_slots:,} slot matrix "
                          f"(N = {n:,}) twice in float64")  # fmt: skip
    slot_cluster = np.concatenate([fixed, flexible])
    cost = np.zeros((n_rows, n_slots))
    cost[:n] = _unit_cost(solved)[:, slot_cluster]
    cost[n:, : len(fixed)] = FORBIDDEN  # a placeholder in a fixed slot would leave its cluster short
    rows, slots = linear_sum_assignment(cost)
    if cost[rows, slots].max() >= FORBIDDEN:  # no assignment: which clusters or samples the mask leaves short
        _refuse_mask(s, checked_r, rounding)
    labels = np.empty(n, dtype=np.int64)
    real = rows < n
    labels[rows[real]] = slot_cluster[slots[real]]
    plan = np.zeros((n, k))
    plan[np.arange(n), labels] = 1.0 / n
    # The certificate reads the plan's own marginals, so every cluster's constant may go, the flexible ones' too
    return _like(_result(plan, s, _without_offsets(s), "exact_assign"), scores)
