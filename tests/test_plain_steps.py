"""Small CPU problems take their plain steps in one compiled call (``CachedKernelOperator.plain_steps``), and the
default acceleration's size rule: ``"auto"`` takes up to ``PLAIN_START`` of them before Anderson mixing starts there.

A 64 x 10 solve to 1e-4 took 1.5 ms in 7 mixed steps of ~58 torch operations each (~180 us a step), against 0.37 ms
for POT's ``ot.sinkhorn``; its 14 plain steps now take ~20 us in one call (benchmarks/RESULTS_CPU.md, 2026-11-25).
"""

import math

import pytest
import torch
from helpers import assert_close, cosine_scores, random_problem

from otlabel import sinkhorn_assign
from otlabel.backends import cpu_kernels, make_operator
from otlabel.backends.torch_backend import CachedKernelOperator
from otlabel.problem import validate
from otlabel.solver import PLAIN_START, ClusterMarginal, mixing_plain_steps

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="the compiled steps need Numba")


def step_by_step(monkeypatch):
    """The torch steps, one by one, as before the compiled ones."""
    monkeypatch.setattr(CachedKernelOperator, "takes_plain_steps", lambda self: False)


def counted_calls(monkeypatch, name: str) -> list:
    """Record each call of ``CachedKernelOperator.<name>`` (still made)."""
    calls, real = [], getattr(CachedKernelOperator, name)
    monkeypatch.setattr(CachedKernelOperator, name, lambda self, *a: (calls.append(a), real(self, *a))[1])
    return calls


def plain_problems():
    """name -> (scores, options): the cases the compiled steps tell apart."""
    g = torch.Generator().manual_seed(11)
    scores = cosine_scores(64, 10, seed=11)
    warm = sinkhorn_assign(scores + 0.01 * torch.randn(64, 10, generator=g), 0.05, acceleration="none")
    skewed = torch.rand(300, generator=g) + 0.1
    return {
        "64 x 10 to a tolerance": (scores, dict(acceleration="none")),
        "SwAV batch, 3 iterations": (scores, dict(max_iter=3, tol=None)),
        "warm start": (scores, dict(acceleration="none", init=warm)),
        "heads": (torch.randn(3, 200, 8, generator=g), dict(acceleration="none", tol=1e-6)),
        "sample weights": (torch.randn(300, 20, generator=g),
                           dict(acceleration="none", sample_weights=skewed / skewed.sum())),
        "not converged": (torch.randn(300, 20, generator=g),
                          dict(epsilon=0.01, acceleration="none", max_iter=20, warn=False)),
        # b moves more than the kernel's 30 nats: the compiled call stops, the loop rebuilds the kernel, calls again
        "drift past the threshold": (3 * torch.randn(400, 30, generator=g),
                                     dict(epsilon=0.01, acceleration="none", max_iter=300, warn=False)),
    }  # fmt: skip


@pytest.mark.parametrize("name", plain_problems())
def test_compiled_plain_steps_are_the_torch_steps(monkeypatch, name):
    """The same steps as the loop takes one by one in torch: the same count, errors and potentials to float64 rounding
    (measured up to 7e-15 apart: the centring's sum in another order, the exp and log of another library; the pass's
    column sums are bitwise the same), the same labels; the codes were bitwise equal in every case here."""
    scores, options = plain_problems()[name]
    options = {"epsilon": 0.05, **options}
    steps = counted_calls(monkeypatch, "plain_steps")
    compiled = sinkhorn_assign(scores, **options)
    assert steps and isinstance(compiled._operator, CachedKernelOperator)
    step_by_step(monkeypatch)
    torch_steps = sinkhorn_assign(scores, **options)
    assert (compiled.n_iter, compiled.converged) == (torch_steps.n_iter, torch_steps.converged), name
    errors, reference = torch.tensor(compiled.errors), torch.tensor(torch_steps.errors)
    assert torch.equal(errors.isinf(), reference.isinf())
    finite = reference.isfinite()
    assert_close(errors[finite], reference[finite], atol=1e-15, rtol=1e-9, what=f"{name}: errors")
    assert_close(compiled.cluster_potentials, torch_steps.cluster_potentials, atol=1e-12, what=f"{name}: potentials")
    assert torch.equal(compiled.labels, torch_steps.labels), name
    assert_close(compiled.codes, torch_steps.codes, atol=1e-6, what=f"{name}: codes")


def test_a_drift_rebuilds_the_kernel_and_resumes_the_compiled_steps(monkeypatch):
    """The case above that stops the compiled call: it is resumed after the loop's own step rebuilt the kernel."""
    scores, options = plain_problems()["drift past the threshold"]
    steps, builds = counted_calls(monkeypatch, "plain_steps"), counted_calls(monkeypatch, "_absorb")
    sinkhorn_assign(scores, **options)
    assert len(builds) > 1 and len(steps) >= len(builds), (len(steps), len(builds))


@pytest.mark.parametrize("size", [(64, 10), (256, 100)])
def test_the_default_on_small_problems_meets_tol_and_agrees_with_the_reference(size):
    """The measured error is the plan's own (column sums against the weights), at most tol, and the labels are those
    of the float64 reference solved to 1e-9."""
    scores = cosine_scores(*size, d=64, seed=2)
    res = sinkhorn_assign(scores, 0.05)
    reference = sinkhorn_assign(scores.double(), 0.05, backend="reference", tol=1e-9)
    column_error = float((res.plan.double().sum(dim=0) - 1 / size[1]).abs().sum())
    assert res.converged and res.marginal_error <= 1e-4 and column_error <= 1e-4, (res.marginal_error, column_error)
    assert abs(column_error - res.marginal_error) < 1e-6
    assert torch.equal(res.labels, reference.labels)


def test_auto_takes_plain_steps_first_on_a_small_problem():
    """The size rule: where they are compiled, "auto" takes plain steps (here all 14, where mixing took 7 steps of
    ~180 us each), bitwise those of acceleration="none"."""
    scores = cosine_scores(64, 10, d=64, seed=0)
    auto, plain = sinkhorn_assign(scores, 0.05), sinkhorn_assign(scores, 0.05, acceleration="none")
    mixed = sinkhorn_assign(scores, 0.05, acceleration="anderson")
    assert auto.n_iter == plain.n_iter == 14 and mixed.n_iter < auto.n_iter, (auto.n_iter, mixed.n_iter)
    assert torch.equal(auto.cluster_potentials, plain.cluster_potentials) and auto.errors == plain.errors


def test_auto_gives_up_a_plain_start_that_falls_short_and_mixes_from_the_start():
    """At a small epsilon plain steps need many steps (145 here, where mixing takes 24). "auto"'s plain start took
    PLAIN_START of them, then started again with mixing (100 + 24 - 1 steps); it now stops once their rate of fall puts
    tol beyond its budget (after 24 here) and mixes from the start, bitwise acceleration="anderson", whose first 3
    steps (plain ones: the mixing needs two errors) are the plain start's first, counted once."""
    scores = cosine_scores(64, 10, d=64, seed=0)
    auto = sinkhorn_assign(scores, 0.005)
    plain = sinkhorn_assign(scores, 0.005, acceleration="none")
    mixed = sinkhorn_assign(scores, 0.005, acceleration="anderson")
    shared = mixing_plain_steps(cold=True)
    taken = auto.n_iter - mixed.n_iter + shared  # the plain start's steps
    assert auto.converged and plain.n_iter > PLAIN_START and shared < taken < PLAIN_START, taken
    assert auto.errors == plain.errors[:taken] + mixed.errors[shared:]
    assert torch.equal(auto.cluster_potentials, mixed.cluster_potentials) and torch.equal(auto.labels, mixed.labels)
    assert auto.marginal_error == mixed.marginal_error


# (seed, epsilon, tol, max_iter, warm): "anderson" converges in max_iter - 7 to max_iter steps
CONVERGED_BY_ANDERSON = [
    (0, 0.02, 1e-4, 42, False),  # 40 mixed steps; 4 + 40 - 1 = 43 in all before
    (1, 0.01, 1e-6, 91, False),  # 84 mixed steps; 9 + 84 - 1 = 92 in all before
    (0, 0.05, 1e-6, 37, False),  # 36 mixed steps; 3 + 36 - 1 = 38 before
    (1, 0.02, 1e-4, 34, True),  # from a warm start (no step shared): 33 mixed steps; 3 + 33 = 36 before
]


@pytest.mark.parametrize("seed, epsilon, tol, max_iter, warm", CONVERGED_BY_ANDERSON)
def test_auto_converges_where_anderson_does_within_a_small_max_iter(seed, epsilon, tol, max_iter, warm):
    """With a small max_iter "auto" missed tol where acceleration="anderson" met it: its plain start (a tenth of
    max_iter) fell short, and the mixing after it had max_iter less those steps (less the cold step). 145 of 7,560 such
    solves on random and cosine scores (64 x 10 to 4,096 x 32, eps 0.005-0.1, max_iter 20-100, tol 1e-4 to 1e-6), 150
    of 7,560 from warm starts. The plain start now goes beyond the mixing's own first plain steps only while its rate
    of fall keeps tol within its budget: here it stops there, and "auto" is "anderson", bitwise (the errors of the
    shared steps: the plain start's, to rounding the same)."""
    scores, init = random_problem(64, 10, seed=seed), None
    if warm:
        init = sinkhorn_assign(scores + 0.05 * random_problem(64, 10, seed=seed + 10), epsilon).cluster_potentials
    mixed = sinkhorn_assign(scores, epsilon, tol=tol, max_iter=max_iter, acceleration="anderson", init=init)
    auto = sinkhorn_assign(scores, epsilon, tol=tol, max_iter=max_iter, init=init, warn=False)
    assert mixed.converged and mixed.n_iter >= max_iter - 7, mixed.n_iter
    shared = mixing_plain_steps(cold=not warm)
    assert auto.converged and auto.n_iter == mixed.n_iter and auto.errors[shared:] == mixed.errors[shared:]
    assert_close(torch.tensor(auto.errors[1:shared]), torch.tensor(mixed.errors[1:shared]), rtol=1e-12, atol=0)
    assert torch.equal(auto.cluster_potentials, mixed.cluster_potentials)


def test_the_plain_start_takes_at_most_a_tenth_of_max_iter(monkeypatch):
    """With a small max_iter the plain start leaves the mixing the rest: max_iter=50 gave all 50 to plain steps, which
    did not converge where mixing did. Here plain steps need 14 and mixed ones 7: with max_iter=100 the plain start
    stops within 10 (its budget) and the mixing converges."""
    scores = cosine_scores(64, 10, d=64, seed=0)
    taken, real = [], CachedKernelOperator.plain_steps

    def plain_steps(self, *args):
        out = real(self, *args)
        taken.append(len(out[1]))
        return out

    monkeypatch.setattr(CachedKernelOperator, "plain_steps", plain_steps)
    auto = sinkhorn_assign(scores, 0.05, max_iter=100)
    mixed = sinkhorn_assign(scores, 0.05, max_iter=100, acceleration="anderson")
    assert auto.converged and 0 < sum(taken) <= 10, taken
    assert auto.n_iter == sum(taken) + mixed.n_iter - mixing_plain_steps(cold=True), auto.n_iter


@pytest.mark.parametrize("epsilon", [0.05, 0.005])  # plain steps need 14 and 145
def test_a_judged_plain_start_stops_only_where_tol_is_out_of_reach(epsilon):
    """The compiled steps with a budget (auto's plain start): a solve that plain steps finish within it is not
    stopped, even at a budget of exactly its steps; one they do not finish stops (status 3) after the same steps,
    bitwise, as the call without a budget takes."""
    scores = cosine_scores(64, 10, d=64, seed=0)
    problem = validate(scores, epsilon, None, None)
    clusters = ClusterMarginal.of(problem.cluster_weights, has_zero_weights=False)
    needed = sinkhorn_assign(scores, epsilon, acceleration="none", warn=False).n_iter

    def steps(budget):
        operator = make_operator(problem, "torch")
        return operator.plain_steps(None, clusters.log_r, clusters.r, PLAIN_START, 1e-4, [], budget)

    _, errors, status = steps(min(needed, PLAIN_START))
    _, free, free_status = steps(0)
    if needed <= PLAIN_START:
        assert status == 0 and len(errors) == needed and errors == free, (status, len(errors))
    else:
        assert status == 3 and mixing_plain_steps(cold=True) <= len(errors) < PLAIN_START, (status, len(errors))
        assert errors == free[: len(errors)] and free_status == 2


def test_a_callback_sees_the_same_steps_one_by_one():
    """With a callback the plain start is the loop's own steps (each reported as it is taken), the same steps."""
    scores = cosine_scores(64, 10, d=64, seed=0)
    seen = []
    watched = sinkhorn_assign(scores, 0.05, callback=lambda i, err: seen.append((i, err)))
    alone = sinkhorn_assign(scores, 0.05)
    assert [i for i, _ in seen] == list(range(1, alone.n_iter + 1)) and watched.n_iter == alone.n_iter
    assert math.isinf(seen[0][1]) and all(
        abs(a - b) <= 1e-6 * b for (_, a), b in zip(seen[1:], alone.errors[1:], strict=True)
    )


def test_a_callback_sees_each_step_once_across_the_restart():
    """Where the plain start falls short, the mixing takes its first steps again (the shared ones): the callback sees
    those once, and every step of the result in order, the same solve as without it."""
    scores = cosine_scores(64, 10, d=64, seed=0)
    seen = []
    watched = sinkhorn_assign(scores, 0.005, callback=lambda i, err: seen.append((i, err)))
    alone = sinkhorn_assign(scores, 0.005)
    mixed = sinkhorn_assign(scores, 0.005, acceleration="anderson")
    assert alone.n_iter > mixed.n_iter  # (plain steps beyond the shared ones before the mixing)
    assert seen == list(enumerate(alone.errors, start=1)) and watched.errors == alone.errors
    assert torch.equal(watched.cluster_potentials, alone.cluster_potentials)


@pytest.mark.parametrize("epsilon, warm", [(0.005, False), (0.02, True)])
def test_a_callback_sees_the_errors_returned_where_the_plain_start_stops_at_the_shared_steps(epsilon, warm):
    """Where the plain start stops at the steps the mixing shares with it, the mixing's solve is returned (bitwise
    "anderson"'s potentials), and its errors were: the callback had seen the plain start's for those steps, which the
    compiled sums round differently (0.46477885641552663 shown, 0.4647788564155263 returned at step 3 here)."""
    scores, init = random_problem(64, 10, seed=0), None
    if warm:
        init = sinkhorn_assign(scores + 0.05 * random_problem(64, 10, seed=9), epsilon).cluster_potentials
    options = dict(max_iter=4, init=init, warn=False)
    seen = []
    watched = sinkhorn_assign(scores, epsilon, callback=lambda i, err: seen.append((i, err)), **options)
    alone = sinkhorn_assign(scores, epsilon, **options)
    mixed = sinkhorn_assign(scores, epsilon, acceleration="anderson", **options)
    shared = mixing_plain_steps(cold=not warm)
    assert alone.n_iter == mixed.n_iter == 4 and not alone.converged
    assert seen == list(enumerate(watched.errors, start=1)) and watched.errors == alone.errors
    assert alone.errors[shared:] == mixed.errors[shared:]
    assert_close(torch.tensor(alone.errors[1:shared]), torch.tensor(mixed.errors[1:shared]), rtol=1e-12, atol=0)
    assert torch.equal(alone.cluster_potentials, mixed.cluster_potentials) and torch.equal(alone.labels, mixed.labels)


@pytest.mark.parametrize("where", ["above the size", "a cluster of weight 0", "without Numba"])
def test_auto_mixes_from_the_start_elsewhere(monkeypatch, where):
    """Larger problems (the bound lowered to one score short of 64 x 10), zero-weight clusters and no compiled loops:
    "auto" is Anderson mixing from the first step, bitwise acceleration="anderson", as before the size rule."""
    scores, options = cosine_scores(64, 10, d=64, seed=0), {}
    if where == "above the size":
        monkeypatch.setattr(cpu_kernels, "PLAIN_STEPS_MAX_ELEMENTS", 64 * 10 - 1)
    elif where == "a cluster of weight 0":
        options["cluster_weights"] = torch.tensor([0.0] + [1 / 9] * 9)
    else:
        monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    steps = counted_calls(monkeypatch, "plain_steps")
    auto = sinkhorn_assign(scores, 0.05, **options)
    mixed = sinkhorn_assign(scores, 0.05, acceleration="anderson", **options)
    assert not steps and auto.n_iter == mixed.n_iter < 14, auto.n_iter
    assert torch.equal(auto.cluster_potentials, mixed.cluster_potentials) and auto.errors == mixed.errors


def test_a_plain_start_from_cold_is_not_taken_twice():
    """A cold start's first step (no error: inf) is the same plain step with or without mixing, so the restart with
    mixing starts after it. It started again from the cold start, taking that step twice: with max_iter=10 the plain
    start was that one step (nothing it could measure) and the mixing was left 9 of the 10 steps it needed, where
    acceleration="anderson" converges (cosines 64 x 10, eps 0.1, tol 1e-6: a ConvergenceWarning). Now the same steps,
    bitwise: the restart takes the cold step again as "anderson" takes it, counted once (the errors of the steps both
    take: the plain start's, to rounding the same)."""
    scores = cosine_scores(64, 10, seed=1)
    mixed = sinkhorn_assign(scores, 0.1, max_iter=10, tol=1e-6, acceleration="anderson")
    auto = sinkhorn_assign(scores, 0.1, max_iter=10, tol=1e-6)
    shared = mixing_plain_steps(cold=True)
    assert mixed.converged and mixed.n_iter == 10
    assert auto.converged and auto.n_iter == mixed.n_iter and auto.errors[shared:] == mixed.errors[shared:]
    assert_close(torch.tensor(auto.errors[1:shared]), torch.tensor(mixed.errors[1:shared]), rtol=1e-12, atol=0)
    assert torch.equal(auto.cluster_potentials, mixed.cluster_potentials)


def test_a_callback_does_not_change_the_solve():
    """A callback (a progress bar) made the plain steps the loop's torch steps, equal to the compiled ones to float64
    rounding only: where the kernel was rebuilt around those potentials (rounded to float32) and mixing followed, the
    difference grew: 204 steps with a callback, 203 without, potentials 0.011 apart (2 x 300 x 40, eps 0.01, annealed).
    The compiled steps now take one step a call with a callback: the same steps, bitwise."""
    g = torch.Generator().manual_seed(5)
    torch.randn(64, 10, generator=g)
    scores = torch.randn(2, 300, 40, generator=g)
    seen = []
    alone = sinkhorn_assign(scores, 0.01, epsilon_scaling=0.5)
    watched = sinkhorn_assign(scores, 0.01, epsilon_scaling=0.5, callback=lambda i, err: seen.append((i, err)))
    assert watched.n_iter == alone.n_iter and watched.errors == alone.errors, (watched.n_iter, alone.n_iter)
    assert torch.equal(watched.cluster_potentials, alone.cluster_potentials)
    assert seen == list(enumerate(alone.errors, start=1))


def test_a_sharded_solve_in_one_process_stops_at_a_callback_failure(monkeypatch):
    """The compiled steps never exchange, where a sharded solve raises what its callback raised (held until then): in
    one process the plain steps went on to max_iter (50 compiled steps after a callback that raised at the 2nd) and
    raised at the end. Now the loop's own step after the failure raises it, as the torch steps did."""
    from otlabel import sinkhorn_assign_sharded

    class Stop(Exception):
        pass

    def stop_at_2(iteration, error):
        if iteration == 2:
            raise Stop

    steps = counted_calls(monkeypatch, "plain_steps")
    with pytest.raises(Stop):
        sinkhorn_assign_sharded(cosine_scores(64, 10, seed=0), 0.05, max_iter=50, tol=None, callback=stop_at_2)
    assert len(steps) == 2, len(steps)
