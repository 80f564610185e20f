"""Properties of the exact solvers on tiny problems drawn by hypothesis, against oracles written here from the math:
every hard assignment enumerated, and the transport LP given to SciPy's HiGHS directly (not otlabel's unit costs).

Tiny problems (N <= 7, K <= 4) with ties, masks, zero weights and scores from 1e-8 to 1e8. Not drawn: differences
below 1e-12 of the largest score and huge scores competing for one cluster (README: not resolved, and refused).
"""

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import assume, event, given, settings
from hypothesis import strategies as st

from otlabel import ConvergenceWarning, exact_assign, exact_plan, sinkhorn_assign
from otlabel.exact import GAP_RESOLUTION, optimality_gap

linprog = pytest.importorskip("scipy.optimize").linprog

SCALES = ("normal", "ties", "mixed", "scaled", "offset")


@st.composite
def tiny_problems(draw, masks=True, sample_weights=True):
    """``(scores, cluster_weights, sample_weights, mixed)``: float64 scores (N, K), weights as given (None, float64
    or float32, zeros included) or None, and whether the scores' magnitudes differ from entry to entry."""
    n, k = draw(st.integers(1, 7)), draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    scale = draw(st.sampled_from(SCALES))
    s = {
        "normal": lambda: rng.standard_normal((n, k)),
        "ties": lambda: rng.integers(-2, 3, (n, k)).astype(np.float64),
        "mixed": lambda: rng.standard_normal((n, k)) * 10.0 ** rng.integers(-8, 9, (n, k)),  # per entry
        "scaled": lambda: rng.standard_normal((n, k)) * 10.0 ** rng.integers(-8, 9),  # one scale for all
        "offset": lambda: rng.standard_normal((n, k)) + 10.0 ** rng.integers(0, 9),  # a large shared constant
    }[scale]()
    if masks and draw(st.booleans()):
        s[rng.random((n, k)) < 0.3] = -np.inf
    r = draw(st.sampled_from(["uniform", "dirichlet", "zeros", "float32"]))
    r = {
        "uniform": lambda: None,
        "dirichlet": lambda: rng.dirichlet(np.ones(k)),
        "zeros": lambda: (lambda w: w / w.sum())(np.r_[1, rng.integers(0, 3, k - 1)][rng.permutation(k)] * 1.0),
        "float32": lambda: rng.dirichlet(np.ones(k)).astype(np.float32),
    }[r]()
    c = None
    if sample_weights and draw(st.booleans()):
        c = np.r_[1, rng.integers(0, 3, n - 1)][rng.permutation(n)] * 1.0
        c /= c.sum()
    return s, r, c, scale == "mixed"


def as_float64(weights, size):
    w = np.full(size, 1.0 / size) if weights is None else np.asarray(weights, dtype=np.float64)
    return w / w.sum()


def best_hard_assignment(s: np.ndarray, r: np.ndarray, whole: float) -> float:
    """The best sum of scores over every labelling in which cluster k gets N·r_k samples rounded down or up (a share
    within ``whole`` of an integer, relative, counts as that integer); -inf when the mask leaves none."""
    n, k = s.shape
    share = n * r
    share = np.where(np.abs(share - np.round(share)) <= whole * np.maximum(1.0, share), np.round(share), share)
    labels = np.array(list(itertools.product(range(k), repeat=n)))  # (K^N, N)
    sizes = (labels[:, :, None] == np.arange(k)).sum(axis=1)  # (K^N, K)
    fits = ((sizes >= np.floor(share)) & (sizes <= np.ceil(share))).all(axis=1)
    with np.errstate(invalid="ignore"):
        totals = s[np.arange(n), labels[fits]].sum(axis=1)
    return float(totals.max(initial=-np.inf))


def transport_lp(s: np.ndarray, c: np.ndarray, r: np.ndarray):
    """max <P, S> over P >= 0 with rows c and columns r, P = 0 on -inf pairs: the LP as written, to HiGHS directly.
    Returns (optimum, plan), or None when HiGHS finds it infeasible."""
    n, k = s.shape
    allowed = np.isfinite(s)
    top = np.abs(s[allowed]).max(initial=0.0) or 1.0  # HiGHS's tolerances are absolute: costs of order 1
    a_eq = np.vstack([np.kron(np.eye(n), np.ones(k)), np.kron(np.ones(n), np.eye(k))])  # rows, then columns
    res = linprog(-np.where(allowed, s / top, 0.0).ravel(), A_eq=a_eq, b_eq=np.r_[c, r], method="highs",
                  bounds=[(0, None) if a else (0, 0) for a in allowed.ravel()],
                  options={"primal_feasibility_tolerance": 1e-10, "dual_feasibility_tolerance": 1e-10})  # fmt: skip
    return None if res.status == 2 else (-res.fun * top, res.x.reshape(n, k))


def solve_or_error(solve, warns=False):
    """The result, or the ValueError raised. A ConvergenceWarning is an error unless ``warns`` (scores of mixed
    magnitudes, which the solvers resolve only relative to their span: README), where it is recorded as
    ``result.warned``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always" if warns else "error", ConvergenceWarning)
        try:
            res = solve()
        except ValueError as e:
            assume("cannot resolve" not in str(e))  # the documented refusal of unresolvable scores
            return e
    res.warned = any(issubclass(w.category, ConvergenceWarning) for w in caught)
    return res


def rounding_of(s: np.ndarray) -> float:
    """Float64 rounding of a sum of N products of scores and weights, in the scores' own size."""
    finite = np.abs(s[np.isfinite(s)])
    return 8 * s.shape[0] * np.finfo(np.float64).eps * float(finite.max(initial=0.0))


@settings(max_examples=150, deadline=None)
@given(tiny_problems(sample_weights=False))
def test_exact_assign_is_the_best_allowed_hard_assignment(problem):
    """Against every labelling exact_assign's contract allows: the same best total (to float64 rounding), sizes
    within the contract, and a ValueError exactly where the mask leaves no labelling."""
    s, r, _, _ = problem
    n, k = s.shape
    whole = 1e-6 if r is not None and r.dtype == np.float32 else 1e-9  # as cluster_slots reads shares
    best = best_hard_assignment(s, as_float64(r, k), whole)
    res = solve_or_error(lambda: exact_assign(s, cluster_weights=r))
    if best == -np.inf:
        assert isinstance(res, ValueError) and "infeasible mask" in str(res), res
        event("no assignment: refused")
        return
    assert not isinstance(res, ValueError), res
    total = float(s[np.arange(n), res.labels].sum())
    assert abs(total - best) <= rounding_of(s), (total, best)
    assert res.objective == pytest.approx(total / n, rel=1e-12, abs=rounding_of(s) / n)
    assert 0 <= res.optimality_gap <= rounding_of(s)


@settings(max_examples=100, deadline=None)
@given(tiny_problems())
def test_exact_plan_solves_the_transport_lp(problem):
    """POT and linprog reach the optimum HiGHS finds for the LP written here, meet the marginals, put no mass on a
    forbidden pair, certify their plans (gap ~0, no warning), and refuse exactly the masks that leave no plan, with
    sinkhorn_assign's error. A sample with every score -inf is refused even at weight 0 (it needs a label)."""
    s, r, c, mixed = problem
    n, k = s.shape
    rs, cs = as_float64(r, k), as_float64(c, n)
    lp = transport_lp(s, cs, rs)
    results = [solve_or_error(lambda m=m: exact_plan(s, cluster_weights=r, sample_weights=c, method=m), mixed)
               for m in ("pot", "linprog")]  # fmt: skip
    if lp is None or np.isneginf(s).all(axis=1).any():
        expected = solve_or_error(lambda: sinkhorn_assign(torch.from_numpy(s), 0.1, cluster_weights=r,
                                                          sample_weights=c))  # fmt: skip
        assert isinstance(expected, ValueError), "sinkhorn_assign solved what the exact solvers refuse"
        event("no plan: refused as sinkhorn_assign refuses it")
        for res in results:
            assert isinstance(res, ValueError) and str(res) == str(expected), (res, expected)
        return
    optimum, _ = lp
    slack = 1e-9 * np.abs(s[np.isfinite(s)]).max()  # HiGHS's own tolerances (1e-10 of the scaled costs)
    for res in results:
        if isinstance(res, ValueError):  # Hall's condition in float64 is stricter than HiGHS's 1e-10 feasibility
            assert "allowed only in clusters of weight 0" in str(res), res
            continue
        plan = np.asarray(res.plan)
        assert (plan >= 0).all() and (plan[np.isneginf(s)] == 0).all()
        np.testing.assert_allclose(plan.sum(axis=1), cs, atol=1e-12)
        np.testing.assert_allclose(plan.sum(axis=0), rs, rtol=1e-6 if r is not None and r.dtype == np.float32 else 0,
                                   atol=1e-12)  # fmt: skip
        assert res.objective + res.optimality_gap >= optimum - slack, (res.objective, res.optimality_gap, optimum)
        if res.warned:  # mixed magnitudes: a real shortfall, which the gap bounds and the warning names
            event("warned: scores of mixed magnitudes")
            continue
        assert abs(res.objective - optimum) <= slack + rounding_of(s), (res.objective, optimum)
        assert 0 <= res.optimality_gap <= GAP_RESOLUTION * np.abs(s[np.isfinite(s)]).max()
    if not any(isinstance(res, ValueError) or res.warned for res in results):
        assert abs(results[0].objective - results[1].objective) <= slack + rounding_of(s)


@settings(max_examples=60, deadline=None)
@given(tiny_problems(), st.floats(0.0, 1.0))
def test_optimality_gap_bounds_the_shortfall_of_any_plan(problem, mix):
    """A plan between two vertices of the transport polytope (random costs, through HiGHS): the certified gap is at
    least its shortfall from the optimum with its own marginals, computed by the LP written here."""
    s, r, c, _ = problem
    n, k = s.shape
    rs, cs = as_float64(r, k), as_float64(c, n)
    rng = np.random.default_rng(n * 10 + k)
    vertices = [transport_lp(np.where(np.isfinite(s), rng.standard_normal(s.shape), -np.inf), cs, rs) for _ in "ab"]
    assume(vertices[0] is not None)
    plan = np.clip(mix * vertices[0][1] + (1 - mix) * vertices[1][1], 0.0, None)
    optimum, _ = transport_lp(s, plan.sum(axis=1), plan.sum(axis=0))
    allowed = np.isfinite(s)
    shortfall = optimum - float((plan[allowed] * s[allowed]).sum())
    slack = 1e-9 * np.abs(s[allowed]).max()
    assert optimality_gap(plan, s) >= shortfall - slack, (optimality_gap(plan, s), shortfall)
    assert optimality_gap(torch.from_numpy(plan), torch.from_numpy(s)) == optimality_gap(plan, s)


@settings(max_examples=40, deadline=None)
@given(tiny_problems(sample_weights=False))
def test_results_follow_the_inputs_kind_and_float32_is_its_float64_value(problem):
    """A list, a NumPy array and a tensor of the same scores give the same plan, in their own kind; float32 scores
    give exactly the plan of their float64 values."""
    s, r, _, _ = problem
    s32 = s.astype(np.float32)
    assume(np.isfinite(s32[np.isfinite(s)]).all())
    for solve in (lambda x: exact_plan(x, cluster_weights=r), lambda x: exact_plan(x, method="linprog"),
                  lambda x: exact_assign(x, cluster_weights=r)):  # fmt: skip
        kinds = {"list": s.tolist(), "numpy": s, "torch": torch.from_numpy(s), "float32": s32,
                 "float32 torch": torch.from_numpy(s32), "float32 as float64": s32.astype(np.float64)}  # fmt: skip
        out = {name: solve_or_error(lambda x=x, f=solve: f(x), warns=True) for name, x in kinds.items()}
        for same in (("list", "numpy", "torch"), ("float32", "float32 torch", "float32 as float64")):
            first = out[same[0]]
            if isinstance(first, ValueError):
                assert all(str(out[name]) == str(first) for name in same)
                continue
            for name in same:
                res = out[name]
                kind = torch.Tensor if "torch" in name else np.ndarray
                assert isinstance(res.plan, kind) and isinstance(res.labels, kind), name
                assert res.plan.dtype in (torch.float64, np.float64) and res.labels.dtype in (torch.int64, np.int64)
                assert np.array_equal(np.asarray(res.plan), np.asarray(first.plan)), name
                assert res.objective == first.objective and res.optimality_gap == first.optimality_gap, name


@st.composite
def problems_with_a_margin(draw):
    """Scores (N, K), N a multiple of K, whose LP optimum is a unique permutation-like plan, and its margin: how much
    the best plan that leaves any of its pairs falls short (the LP with that pair forbidden)."""
    k, per = draw(st.integers(2, 4)), draw(st.integers(1, 2))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    s = rng.uniform(-1, 1, (k * per, k)) * 10.0 ** draw(st.integers(-3, 3))
    if draw(st.booleans()):
        s[rng.random(s.shape) < 0.2] = -np.inf
        s[np.arange(len(s)), rng.permutation(np.arange(len(s)) % k)] = 0.0  # a plan remains
    best = exact_plan(s)
    labels = np.asarray(best.labels)
    plan = np.asarray(best.plan)
    assume(np.allclose(plan[np.arange(len(s)), labels], 1 / len(s)))  # a vertex of whole samples
    margin = math.inf
    for i, j in enumerate(labels):
        t = s.copy()
        t[i, j] = -np.inf
        try:
            margin = min(margin, best.objective - exact_plan(t).objective)
        except ValueError:  # nowhere else for it: no plan leaves that pair
            pass
    top = np.abs(s[np.isfinite(s)]).max()
    assume(math.isfinite(margin) and margin > 1e-3 * top)
    return s, labels, best.objective, margin


@settings(max_examples=20, deadline=None)
@given(problems_with_a_margin())
def test_sinkhorn_approaches_the_exact_plan_as_epsilon_shrinks(problem):
    """In float64 and float32: below the optimum by at most eps·log(K) plus the marginal tolerance's worth, by less as
    eps shrinks, and with the exact labels once eps is well under the margin."""
    s, labels, optimum, margin = problem
    top = np.abs(s[np.isfinite(s)]).max()
    for dtype, tol, limit in ((torch.float64, 1e-7, 1e9), (torch.float32, 1e-5, 2e3)):  # |S| / eps: 3e3 in float32
        gaps = []
        for eps in (margin, margin / 10, margin / 30):
            if top / eps > limit:
                continue
            res = sinkhorn_assign(torch.from_numpy(s).to(dtype), eps, tol=tol, max_iter=20_000)
            assert res.converged
            gap = optimum - res.objective
            assert -2 * tol * top <= gap <= eps * math.log(s.shape[1]) + 2 * tol * top, (dtype, eps, gap)
            gaps.append(gap)
            if eps < margin / 5:
                np.testing.assert_array_equal(res.labels.numpy(), labels)
        event(f"{dtype}: {len(gaps)} epsilons under |S| / eps's limit")
        assert all(b <= a + 2 * tol * top for a, b in zip(gaps[:-1], gaps[1:], strict=True)), gaps


def test_a_weightless_cluster_with_large_scores_leaves_the_certificate_at_rounding():
    """Cluster 2 has weight 0: no plan with these marginals uses it, yet its 7e7 entered the certificate's duals,
    whose rounding (1e-16 of 7e7) became a gap of 7.8e-10 and a ConvergenceWarning on the optimal plan, from all
    three solvers (78 of 300 such random problems warned)."""
    s = np.array([[0.79, 0.24, 7e7], [0.06, 0.34, 0.15]])
    solves = [lambda: exact_plan(s, cluster_weights=[0.5, 0.5, 0.0]),
              lambda: exact_plan(s, cluster_weights=[0.5, 0.5, 0.0], method="linprog"),
              lambda: exact_assign(s, cluster_weights=[0.5, 0.5, 0.0])]  # fmt: skip
    for solve in solves:
        with warnings.catch_warnings():
            warnings.simplefilter("error", ConvergenceWarning)
            res = solve()
        assert res.labels.tolist() == [0, 1] and res.optimality_gap < 1e-15
    plan = np.array([[0.5, 0.0, 0.0], [0.0, 0.5, 0.0]])
    assert optimality_gap(plan, s) < 1e-15
    assert optimality_gap(plan[:, ::-1], s[:, ::-1]) < 1e-15  # wherever the cluster is
    assert optimality_gap(plan[:, [1, 0, 2]], s) == pytest.approx(0.5 * (0.79 + 0.34 - 0.24 - 0.06))  # still a bound


@pytest.mark.parametrize("weight", [1e-8, 1e-9])
def test_linprog_keeps_tiny_weights(weight):
    """HiGHS's feasibility tolerance is absolute (1e-7 by default): a sample and a cluster of weight 1e-8 got no mass
    ('the exact solver returned a plan that misses the marginals'), and of 1e-9 none either, silently."""
    s = np.random.default_rng(0).standard_normal((5, 3))
    r = np.array([weight, 0.5, 0.5 - weight])
    c = np.array([weight, 0.25, 0.25, 0.25, 0.25 - weight])
    res, pot = exact_plan(s, r, c, method="linprog"), exact_plan(s, r, c)
    np.testing.assert_allclose(res.plan.sum(axis=0), r, rtol=1e-6, atol=0)
    np.testing.assert_allclose(res.plan.sum(axis=1), c, rtol=1e-6, atol=0)
    assert abs(res.objective - pot.objective) < 1e-15


def test_linprog_solves_problems_with_small_weights_that_presolve_called_infeasible():
    """Unmasked, so feasible whatever the weights: HiGHS's presolve answered 'The problem is infeasible' for these
    20 x 4 scores with sample weights down to 7e-8 (and for 11 of 12 random problems of 50-800 x 2-40 with
    Dirichlet(0.3) weights), where POT solved them."""
    rng = np.random.default_rng(177)
    s = np.round(rng.standard_normal((20, 4)), 1)
    c = np.round(rng.dirichlet(np.full(20, 0.3)), 8)
    r = np.round(rng.dirichlet(np.ones(4)), 3)
    assert c.min() < 1e-7
    res, pot = exact_plan(s, r / r.sum(), c / c.sum(), method="linprog"), exact_plan(s, r / r.sum(), c / c.sum())
    assert abs(res.objective - pot.objective) < 1e-12 and res.optimality_gap < 1e-15
