"""The torch backend (both of its operators) against the float64 reference."""

import pytest
import torch
from helpers import TOLERANCES, assert_close, centred, cosine_scores, random_problem, random_weights

from otlabel import sinkhorn_assign
from otlabel.backends.reference import ReferenceOperator
from otlabel.backends.torch_backend import CachedKernelOperator, LogDomainOperator, make_torch_operator
from otlabel.sources import DenseSource

OPERATORS = {
    # chunks of 7 rows, so chunk boundaries fall mid-matrix
    "log-domain": lambda s, eps, c: LogDomainOperator(DenseSource(s), eps, c, chunk_elements=7 * s[:, 0].numel()),
    "cached-kernel": lambda s, eps, c: CachedKernelOperator(DenseSource(s), eps, c, tile_bytes=256),
}


def uniform(n):
    return torch.full((n,), 1.0 / n, dtype=torch.float64)


@pytest.mark.parametrize("operator", OPERATORS)
@pytest.mark.parametrize(
    "shape",
    [
        (1, 37, 5),  # chunk boundary mid-matrix (chunks of ~7 rows)
        (3, 20, 9),  # batched heads
        (1, 1, 4),  # a single sample
        (1, 25, 1),  # a single cluster
        (2, 6, 40),  # K > N
    ],
)
def test_cluster_lse_matches_reference(operator, shape):
    s = random_problem(*shape[1:], h=shape[0], seed=sum(shape))
    if shape[2] > 1:
        s[0, 0, -1] = float("-inf")  # a forbidden pair; with N = 1 it also leaves the last cluster unreachable
    c = random_weights(shape[1], 3)
    op, ref = OPERATORS[operator](s, 0.1, c), ReferenceOperator(s, 0.1, c)
    b = torch.randn(shape[0], shape[2], dtype=torch.float64)
    for potentials in (None, b, b + 3.0):
        got = op.cluster_lse(None if potentials is None else potentials.float())
        want = ref.cluster_lse(potentials)
        assert_close(got, want, atol=1e-4, rtol=1e-5, what=f"{operator} cluster LSE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_solution_matches_reference(dtype, eps):
    s = random_problem(200, 12, seed=7, dtype=dtype)
    tol = TOLERANCES[dtype]
    got = sinkhorn_assign(s, eps, backend="torch", tol=1e-6, max_iter=5000)
    want = sinkhorn_assign(s.double(), eps, backend="reference", tol=1e-10, max_iter=50_000)
    assert got.converged and want.converged
    assert got.codes.dtype == torch.float32 and got.labels.dtype == torch.int64
    assert_close(got.codes, want.codes, atol=tol["codes"] * 100, what="codes")  # tol 1e-6 vs 1e-10: 1e-4 slack
    assert_close(centred(got.cluster_potentials), centred(want.cluster_potentials), atol=1e-3, what="potentials")
    assert torch.equal(got.labels, want.labels)


@pytest.mark.parametrize("operator", OPERATORS)
def test_fixed_iterations_match_reference_tightly(operator):
    """Same iterations, same start: fp32 and float64 trajectories agree to fp32 rounding."""
    s = random_problem(64, 10, seed=8)
    c = uniform(64)
    r = uniform(10)
    from otlabel.solver import run_sinkhorn

    out = run_sinkhorn(OPERATORS[operator](s[None], 0.05, c), r, None, max_iter=25, tol=None)
    ref = run_sinkhorn(ReferenceOperator(s[None], 0.05, c), r, None, max_iter=25, tol=None)
    assert_close(centred(out.potentials), centred(ref.potentials), atol=2e-4, rtol=1e-5, what="potentials")
    assert_close(torch.tensor(out.errors[1:]), torch.tensor(ref.errors[1:]), atol=1e-5, rtol=1e-3, what="errors")


def test_tiny_epsilon_cosine_scores_stay_exact():
    """eps = 1e-3 on cosine scores: S / eps spans 2000 nats; the CPU path must absorb and rescue, not overflow."""
    s = cosine_scores(300, 12, seed=9)
    got = sinkhorn_assign(s, 1e-3, backend="torch", tol=1e-4, max_iter=20_000)
    want = sinkhorn_assign(s, 1e-3, backend="reference", tol=1e-4, max_iter=20_000)
    assert got.converged and want.converged
    assert torch.isfinite(got.cluster_potentials).all()
    assert torch.equal(got.labels, want.labels)
    assert_close(got.codes, want.codes, atol=2e-3, what="codes at eps=1e-3")
    true_error = (got.plan.double().sum(0) - 1 / 12).abs().sum()
    assert float(true_error) < 2e-4


def test_half_precision_extremes():
    """fp16 scores near +-60000 (close to fp16's max): finite, balanced, equal to the float64 answer."""
    s = (random_problem(120, 6, seed=10) * 20000).clamp(-60000, 60000).half()
    got = sinkhorn_assign(s, 500.0, backend="torch", tol=1e-6, max_iter=10_000)
    want = sinkhorn_assign(s.double(), 500.0, backend="reference", tol=1e-8, max_iter=100_000)
    assert got.converged and torch.isfinite(got.codes).all()
    assert torch.equal(got.labels, want.labels)
    assert_close(got.codes, want.codes, atol=1e-4, what="fp16 extreme codes")


def test_cpu_picks_cached_kernel_and_gpu_style_fallback_agrees():
    s = random_problem(90, 8, seed=11)
    c = uniform(90)
    assert isinstance(make_torch_operator(DenseSource(s[None]), 0.1, c), CachedKernelOperator)
    from otlabel.solver import run_sinkhorn

    a = run_sinkhorn(CachedKernelOperator(DenseSource(s[None]), 0.1, c), uniform(8), None, 200, 1e-6)
    b = run_sinkhorn(LogDomainOperator(DenseSource(s[None]), 0.1, c), uniform(8), None, 200, 1e-6)
    assert_close(centred(a.potentials), centred(b.potentials), atol=1e-4, what="cached vs log-domain")


def test_batched_heads_equal_separate_solves():
    s = random_problem(50, 6, h=3, seed=12)
    batched = sinkhorn_assign(s, 0.1, tol=1e-6)
    assert batched.labels.shape == (3, 50) and batched.codes.shape == (3, 50, 6)
    assert batched.cluster_potentials.shape == (3, 6)
    for h in range(3):
        single = sinkhorn_assign(s[h], 0.1, tol=1e-6)
        assert torch.equal(single.labels, batched.labels[h])
        assert_close(batched.codes[h], single.codes, atol=1e-5, what=f"head {h} codes")


def test_deterministic_run_to_run():
    s = random_problem(3000, 40, seed=13)
    a = sinkhorn_assign(s, 0.05, max_iter=30, tol=None)
    b = sinkhorn_assign(s, 0.05, max_iter=30, tol=None)
    assert torch.equal(a.cluster_potentials, b.cluster_potentials)
    assert torch.equal(a.codes, b.codes)


def test_warm_start_cuts_iterations():
    s = random_problem(400, 10, seed=14)
    cold = sinkhorn_assign(s, 0.05, tol=1e-5)
    drifted = s + 0.01 * random_problem(400, 10, seed=15)
    warm = sinkhorn_assign(drifted, 0.05, tol=1e-5, init=cold)
    again_cold = sinkhorn_assign(drifted, 0.05, tol=1e-5)
    assert warm.converged and again_cold.converged
    assert warm.n_iter < 0.6 * again_cold.n_iter  # measured: 54 vs 105 (adaptive), 81 vs 164 (plain steps)
    assert torch.equal(warm.labels, again_cold.labels)


def test_numpy_input_and_float64():
    s = random_problem(30, 4, seed=16, dtype=torch.float64)
    a = sinkhorn_assign(s.numpy(), 0.1, tol=1e-9, max_iter=10_000)
    b = sinkhorn_assign(s, 0.1, backend="reference", tol=1e-9, max_iter=10_000)
    assert a.cluster_potentials.dtype == torch.float64
    assert_close(a.codes, b.codes, atol=1e-7, what="float64 torch vs reference")


@pytest.mark.parametrize(
    "kwargs",
    [dict(over_relaxation=1.5), dict(), dict(over_relaxation=1.0, epsilon_scaling=0.5), dict(epsilon_scaling=0.25)],
)
def test_accelerations_reach_the_plain_solution(kwargs):  # dict(): the default, over-relaxed with a tolerance
    s = cosine_scores(500, 15, seed=17)
    plain = sinkhorn_assign(s, 0.01, tol=1e-6, max_iter=20_000, over_relaxation=1.0)
    fast = sinkhorn_assign(s, 0.01, tol=1e-6, max_iter=20_000, **kwargs)
    assert plain.converged and fast.converged and fast.epsilon == 0.01
    assert fast.n_iter < plain.n_iter
    assert len(fast.errors) == fast.n_iter
    assert_close(fast.codes, plain.codes, atol=1e-4, what=f"codes with {kwargs}")


@pytest.mark.parametrize("eps", [0.5, 0.05, 0.01])
def test_default_over_relaxation_adapts_and_never_loses_to_plain(eps):
    s = cosine_scores(400, 12, seed=18)
    fixed = sinkhorn_assign(s, eps, max_iter=5, tol=None)
    classic = sinkhorn_assign(s, eps, max_iter=5, tol=None, over_relaxation=1.0)
    assert torch.equal(fixed.cluster_potentials, classic.cluster_potentials)  # tol=None: classic iterates
    adaptive = sinkhorn_assign(s, eps, tol=1e-6, max_iter=5000)
    plain = sinkhorn_assign(s, eps, tol=1e-6, max_iter=5000, over_relaxation=1.0)
    assert adaptive.converged and adaptive.n_iter <= plain.n_iter
    if eps <= 0.05:  # slow problems: the measured rate asks for a real over-relaxation, and it pays
        assert adaptive.n_iter < 0.85 * plain.n_iter


def test_over_relaxation_safeguard_falls_back_to_plain_steps():
    s = random_problem(300, 8, seed=3)  # at eps = 0.01 the error is not monotone: omega = 1.99 overshoots
    wild = sinkhorn_assign(s, 0.01, tol=1e-6, max_iter=5000, over_relaxation=1.99)
    assert wild.converged
    assert any(later > 1.01 * earlier for earlier, later in zip(wild.errors[1:], wild.errors[2:], strict=False))


def test_omega_for_rate():
    from otlabel.solver import MAX_ADAPTIVE_OMEGA, omega_for_rate

    assert omega_for_rate([1e-1, 1e-4, 1e-7]) < 1.01  # fast contraction: plain steps are best
    assert 1.16 < omega_for_rate([1e-1, 5e-2, 2.5e-2]) < 1.18  # kappa = 1/2: 2 / (1 + sqrt(1/2)) = 1.1716
    assert omega_for_rate([0.0776, 0.0776, 0.07762]) == MAX_ADAPTIVE_OMEGA  # a plateau: slowest contraction
    assert omega_for_rate([0.05, 0.08, 0.1]) == 1.0  # clearly rising: no rate to read
    assert omega_for_rate([float("inf"), 0.1, 0.05]) == 1.0
