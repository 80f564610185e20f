"""The float64 reference against POT's log-domain Sinkhorn: the executable spec checked by an outside solver."""

import numpy as np
import ot
import pytest
import torch
from helpers import assert_close, random_problem, random_weights

from otlabel import sinkhorn_assign


def pot_plan(scores, eps, c, r):
    return ot.bregman.sinkhorn_log(
        c.numpy(), r.numpy(), -scores.double().numpy(), eps, numItermax=100_000, stopThr=1e-13
    )


@pytest.mark.parametrize(
    "n, k, eps, seed, weighted",
    [
        (60, 5, 0.1, 0, False),  # uniform marginals
        (47, 13, 0.05, 1, True),  # non-uniform marginals, N and K coprime
        (9, 30, 0.2, 2, True),  # K > N
        (80, 1, 0.1, 3, False),  # a single cluster: the plan is c
    ],
)
def test_reference_matches_pot_sinkhorn_log(n, k, eps, seed, weighted):
    s = random_problem(n, k, seed=seed, dtype=torch.float64)
    c = random_weights(n, seed) if weighted else torch.full((n,), 1 / n, dtype=torch.float64)
    r = random_weights(k, seed + 1) if weighted else torch.full((k,), 1 / k, dtype=torch.float64)
    res = sinkhorn_assign(s, eps, sample_weights=c, cluster_weights=r, backend="reference", tol=1e-12, max_iter=100_000)
    assert res.converged
    # Both solve to 1e-12 in float64: measured at most 1.5e-13 apart (atol 1e-6 let float32 codes through).
    assert_close(res.plan, pot_plan(s, eps, c, r), atol=1e-10, what="plan vs POT sinkhorn_log")


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # POT takes log(0) of the zero weight
def test_reference_matches_pot_with_mask_and_zero_weight_cluster():
    n, k, eps = 40, 6, 0.1
    s = random_problem(n, k, seed=4, dtype=torch.float64)
    s[:10, 0] = float("-inf")  # forbidden pairs
    s[::3, 4] = float("-inf")
    r = random_weights(k, 5, zeros=1)  # cluster 0 gets nothing
    c = torch.full((n,), 1 / n, dtype=torch.float64)
    res = sinkhorn_assign(s, eps, cluster_weights=r, backend="reference", tol=1e-12, max_iter=100_000)
    assert res.converged
    # POT has no -inf costs: a large finite cost is the same problem up to e^-(1e4/eps) of mass.
    finite = torch.where(torch.isfinite(s), s, -1e4)
    assert_close(res.plan, pot_plan(finite, eps, c, r), atol=1e-10, what="masked plan vs POT")
    assert float(res.plan[:10, 0].abs().max()) == 0.0
    assert torch.isneginf(res.cluster_potentials[0])
    assert int((res.labels == 0).sum()) == 0


def test_plan_marginals_and_codes_rows():
    s = random_problem(50, 7, seed=6, dtype=torch.float64)
    res = sinkhorn_assign(s, 0.1, backend="reference", tol=1e-10, max_iter=10_000)
    assert_close(res.plan.sum(1), torch.full((50,), 1 / 50, dtype=torch.float64), atol=1e-12, what="row sums")
    assert_close(res.plan.sum(0), torch.full((7,), 1 / 7, dtype=torch.float64), atol=1e-10, what="column sums")
    assert_close(res.codes.sum(1), torch.ones(50), atol=1e-6, what="codes rows")
    np.testing.assert_array_equal(res.labels.numpy(), res.codes.argmax(1).numpy())


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_judges_the_span_in_its_own_float64(dtype):
    """The reference computes in float64 whatever the scores' dtype, but judged float32 scores by float32's span
    limit: |S| / eps of 1.8e4 (eps 2e-4) was refused ("float32 arithmetic cannot resolve ..."), as the float32
    backends rightly refuse it. It now solves them as the same values given in float64."""
    s = random_problem(300, 6, seed=3).to(dtype)
    assert float(s.abs().max()) / 2e-4 > 1e4
    as_float64 = sinkhorn_assign(s.double(), 2e-4, backend="reference", max_iter=5000)
    res = sinkhorn_assign(s, 2e-4, backend="reference", max_iter=5000)
    assert res.converged and torch.equal(res.labels, as_float64.labels) and torch.equal(res.codes, as_float64.codes)
    with pytest.raises(ValueError, match="float32 arithmetic cannot resolve"):
        sinkhorn_assign(s, 2e-4, backend="torch")
