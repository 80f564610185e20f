"""The torch backend (both of its operators) against the float64 reference."""

import math
import os
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close, centred, cosine_scores, random_problem, random_weights

from otlabel import ConvergenceWarning, sinkhorn_assign, sinkhorn_assign_sharded, sinkhorn_assign_stream
from otlabel.backends import cpu_kernels
from otlabel.backends.reference import ReferenceOperator
from otlabel.backends.torch_backend import (
    CachedKernelOperator,
    LogDomainOperator,
    make_torch_operator,
    split_rows,
    worker_pool,
)
from otlabel.problem import validate
from otlabel.solver import epsilon_stages
from otlabel.sources import DenseSource, column_max

README = Path(__file__).resolve().parents[1] / "README.md"

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
        # fp32 rounding of LSEs up to ~26: measured at most 2e-6 (atol 1e-4 let a 1e-4 error in exp through)
        assert_close(got, want, atol=1e-5, rtol=1e-6, what=f"{operator} cluster LSE")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("eps", [0.5, 0.05])
def test_solution_matches_reference(dtype, eps):
    s = random_problem(200, 12, seed=7, dtype=dtype)
    got = sinkhorn_assign(s, eps, backend="torch", tol=1e-6, max_iter=5000)
    want = sinkhorn_assign(s.double(), eps, backend="reference", tol=1e-10, max_iter=50_000)
    assert got.converged and want.converged
    assert got.codes.dtype == torch.float32 and got.labels.dtype == torch.int64
    # tol 1e-6 vs 1e-10: the gap is the solve's, and grows as 1 / eps. Worst over seeds 1-5 and 7, any dtype: codes
    # 9.4e-6 at eps 0.05, 1.1e-6 at 0.5; potentials 5.0e-5 and 3.9e-6 (atol 1e-3 on both let errors 100x through).
    scale = 0.05 / eps
    assert_close(got.codes, want.codes, atol=5e-5 * scale, what="codes")
    assert_close(centred(got.cluster_potentials), centred(want.cluster_potentials), atol=3e-4 * scale,
                 what="potentials")  # fmt: skip
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
    # measured 1.1e-6 apart; atol 2e-4 let a 4e-5 drift (exp2 with log2(e) rounded to 1.4427) through
    assert_close(centred(out.potentials), centred(ref.potentials), atol=1e-5, rtol=1e-6, what="potentials")
    assert_close(torch.tensor(out.errors[1:]), torch.tensor(ref.errors[1:]), atol=1e-5, rtol=1e-3, what="errors")


def test_tiny_epsilon_cosine_scores_stay_exact():
    """eps = 1e-3 on cosine scores: S / eps spans 2000 nats; the CPU path must absorb and rescue, not overflow."""
    s = cosine_scores(300, 12, seed=9)
    # tol 1e-6: Anderson's paths differ with the rounding, and at eps = 1e-3 two plans that both meet 1e-4 may
    # differ by 4e-3 in the codes; at 1e-6 both sit on the solution (measured 6e-5 apart)
    got = sinkhorn_assign(s, 1e-3, backend="torch", tol=1e-6, max_iter=20_000)
    want = sinkhorn_assign(s, 1e-3, backend="reference", tol=1e-6, max_iter=20_000)
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


def test_float32_error_floor_without_compiled_loops(monkeypatch):
    """Without Numba the cached kernel's column sums were one float32 mv per 1 MiB tile (262,144 / K rows), whose
    rounding grew with its rows: 400,000 x 2 scores never got below an error of 1.4e-4 (the default tol=1e-4 not
    reached in 50 iterations) and 3,000 x 40 cosine scores at eps 0.05 stalled at 2.3e-6. Long tiles are now summed
    64 rows a product into float64 (add_column_sums): 4 iterations, and ~4e-8."""
    monkeypatch.setattr(cpu_kernels, "available", lambda: False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranges, however many cores the machine has
    try:
        few = sinkhorn_assign(random_problem(400_000, 2, seed=3), 0.05, max_iter=50, warn=False)
        tight = sinkhorn_assign(cosine_scores(3000, 40), 0.05, tol=2e-7, max_iter=300, warn=False)
    finally:
        torch.set_num_threads(threads)
    assert few.converged and few.marginal_error < 1e-4, f"{few.marginal_error:.3g} after {few.n_iter} iterations"
    assert tight.converged and tight.marginal_error < 2e-7, f"{tight.marginal_error:.3g} after {tight.n_iter}"


def test_the_readme_float32_floor_bounds_measured_floors():
    """The README gave the CPU's float32 floor as "1.5e-8 to 1e-7 measured at 2 to 1,000 clusters", but random-normal
    scores at eps 0.02 floor higher: 3.1e-7 at 200,000 x 2 (the compiled loops' 128-row partials; 1e-8 with 16 rows)
    and 3.8e-7 at 2,000 x 1,000 (the same with 16-row partials; float64 reaches 1.5e-8). The largest floor the README
    names for the CPU must bound them."""
    text = " ".join(README.read_text().split())
    cpu = text[text.index("leave the measured error a floor: on the CPU") :].split("on a GPU")[0]
    bound = max(float(x) for x in re.findall(r"\d(?:\.\d+)?e-\d+", cpu))
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # two ranges, however many cores the machine has
    try:
        floors = [
            min(sinkhorn_assign(random_problem(n, k, seed=1), 0.02, tol=1e-10, max_iter=1500, warn=False).errors)
            for n, k in [(200_000, 2), (2000, 1000)]
        ]
    finally:
        torch.set_num_threads(threads)
    assert max(floors) <= bound, f"floors {floors} above the README's {bound:g}"


def test_batched_heads_equal_separate_solves():
    s = random_problem(50, 6, h=3, seed=12)
    batched = sinkhorn_assign(s, 0.1, tol=1e-6)
    assert batched.labels.shape == (3, 50) and batched.codes.shape == (3, 50, 6)
    assert batched.cluster_potentials.shape == (3, 6)
    for h in range(3):
        single = sinkhorn_assign(s[h], 0.1, tol=1e-6)
        assert torch.equal(single.labels, batched.labels[h])
        assert_close(batched.codes[h], single.codes, atol=1e-5, what=f"head {h} codes")


def test_batched_heads_are_judged_by_their_worst_head():
    """A batched solve reports, and stops on, its worst head's error: with a hard head (scores 5x larger) beside an
    easy one it runs until both meet tol, and each iteration's error is the larger of the two heads' solved alone
    (plain steps: the heads do not interact), to a tolerance and for a fixed number of iterations alike."""
    import itertools

    s = torch.stack([random_problem(60, 5, seed=1), 5 * random_problem(60, 5, seed=2)])
    for kw in (dict(tol=1e-5, max_iter=5000), dict(tol=None, max_iter=30)):
        both = sinkhorn_assign(s, 0.1, acceleration="none", **kw)
        alone = [sinkhorn_assign(head, 0.1, acceleration="none", **kw) for head in s]
        if kw["tol"] is not None:
            assert both.converged and alone[0].n_iter < alone[1].n_iter == both.n_iter, [a.n_iter for a in alone]
        worst = [max(e) for e in itertools.zip_longest(*(a.errors for a in alone), fillvalue=0.0)]
        assert_close(torch.tensor(both.errors[1:]), torch.tensor(worst[1:]), atol=1e-9, rtol=1e-3, what=str(kw))
    mixed = sinkhorn_assign(s, 0.1, tol=1e-5)  # the default, Anderson mixing: each head's plan meets tol
    column_errors = (mixed.plan.double().sum(1) - 0.2).abs().sum(-1)  # (H,) L1 errors of the cluster marginals
    assert mixed.converged and bool((column_errors < 2e-5).all()), column_errors


def test_deterministic_run_to_run():
    s = random_problem(3000, 40, seed=13)
    a = sinkhorn_assign(s, 0.05, max_iter=30, tol=None)
    b = sinkhorn_assign(s, 0.05, max_iter=30, tol=None)
    assert torch.equal(a.cluster_potentials, b.cluster_potentials)
    assert torch.equal(a.codes, b.codes)


@pytest.mark.parametrize("acceleration", ["anderson", "none"])
def test_warm_start_cuts_iterations(acceleration):
    """Measured: 81 vs 165 plain steps, 8 vs 20 mixed ones. (The default, "auto", takes up to 100 plain steps first
    on a problem this small, where they are compiled: 81 vs 105, 100 of them plain.)"""
    s = random_problem(400, 10, seed=14)
    cold = sinkhorn_assign(s, 0.05, tol=1e-5, acceleration=acceleration)
    drifted = s + 0.01 * random_problem(400, 10, seed=15)
    warm = sinkhorn_assign(drifted, 0.05, tol=1e-5, init=cold, acceleration=acceleration)
    again_cold = sinkhorn_assign(drifted, 0.05, tol=1e-5, acceleration=acceleration)
    assert warm.converged and again_cold.converged
    assert warm.n_iter < 0.6 * again_cold.n_iter
    assert torch.equal(warm.labels, again_cold.labels)


def test_init_saved_as_numpy_or_a_list_warm_starts_every_entry_point(tmp_path):
    """Potentials kept between epochs with numpy.save (or logged as a list) were refused: init took tensors only."""
    s = random_problem(400, 10, seed=14)
    cold = sinkhorn_assign(s, 0.05, tol=1e-5)
    np.save(tmp_path / "b.npy", cold.cluster_potentials.numpy())
    solves = (
        lambda init: sinkhorn_assign(s, 0.05, tol=1e-5, init=init),
        lambda init: sinkhorn_assign_stream(s.numpy(), 0.05, tol=1e-5, init=init),
        lambda init: sinkhorn_assign_sharded(s, 0.05, tol=1e-5, init=init),
    )
    for solve in solves:
        want = solve(cold)
        for init in (np.load(tmp_path / "b.npy"), cold.cluster_potentials.tolist()):
            got = solve(init)
            assert got.n_iter == want.n_iter and torch.equal(got.cluster_potentials, want.cluster_potentials)


def test_a_result_solved_at_another_epsilon_warm_starts_at_this_one():
    """A result carries its epsilon: its potentials are rescaled to the new one (``b * eps_old / eps_new``, the dual
    ``eps * b`` kept, as between epsilon_scaling's stages). Used as they were, a result at 0.01 warm-starting 0.005
    was a start twice too flat. Its bare potentials (no epsilon known) are taken as they are."""
    s = random_problem(2000, 30, seed=21)
    solves = (
        lambda eps, **kw: sinkhorn_assign(s, eps, tol=1e-5, **kw),
        lambda eps, **kw: sinkhorn_assign_stream(s.numpy(), eps, tol=1e-5, **kw),
        lambda eps, **kw: sinkhorn_assign_sharded(s, eps, tol=1e-5, **kw),
        lambda eps, **kw: sinkhorn_assign(features=z, prototypes=c, epsilon=eps * 10, tol=1e-5, **kw),
    )
    g = torch.Generator().manual_seed(3)
    z, c = torch.randn(2000, 8, generator=g), torch.randn(30, 8, generator=g)
    for solve in solves:
        coarse = solve(0.01)
        rescaled = coarse.cluster_potentials * (0.01 / 0.005)
        from_result, from_rescaled = solve(0.005, init=coarse), solve(0.005, init=rescaled)
        assert from_result.n_iter == from_rescaled.n_iter
        assert torch.equal(from_result.cluster_potentials, from_rescaled.cluster_potentials)
        unscaled = solve(0.005, init=coarse.cluster_potentials)
        assert from_result.converged and from_result.n_iter < unscaled.n_iter, (from_result.n_iter, unscaled.n_iter)


@pytest.mark.parametrize("spread", [1e20, 1e300])
def test_a_warm_start_spread_beyond_the_arithmetic_solves_like_a_cold_one(spread):
    """Potentials far apart (from another problem, or scaled) are a poor start but a valid one: only differences
    matter. One cluster 1e20 above the rest made float32 passes produce NaN, reported as an infeasible mask (dense,
    sharded), while the streamed path solved it, and 1e300 was refused as infinite there (cast to float32 first).
    Every entry point now pulls such a start in (relative to its top) and solves to the cold start's labels."""
    s = random_problem(400, 8, seed=18)
    g = torch.Generator().manual_seed(1)  # (the prototypes came from the global generator: labels then depended on
    z, c = torch.randn(400, 6, generator=g), torch.randn(8, 6, generator=g)  # the tests run before, with near-ties)
    init = torch.zeros(8, dtype=torch.float64)
    init[3] = spread
    solves = (
        lambda **kw: sinkhorn_assign(s, 0.05, **kw),
        lambda **kw: sinkhorn_assign(s.double(), 0.05, **kw),
        lambda **kw: sinkhorn_assign_stream(s.numpy(), 0.05, **kw),
        lambda **kw: sinkhorn_assign_sharded(s, 0.05, **kw),
        lambda **kw: sinkhorn_assign(features=z, prototypes=c, epsilon=0.5, **kw),
    )
    for solve in solves:
        cold, warm = solve(), solve(init=init)
        assert warm.converged and torch.equal(warm.labels, cold.labels)


def test_a_warm_start_is_floored_only_beyond_what_the_arithmetic_resolves():
    """check_init centres a start on its top and floors it at 1 / machine epsilon below (2^23 in float32): spreads a
    converged solve reaches pass unchanged (2.2e4 at eps 1e-5 on unit-range float32 scores, beyond an earlier floor
    of 1.6e4), wider ones are pulled in; zero-weight clusters stay -inf."""
    from otlabel.solver import check_init

    r = torch.tensor([0.25, 0.25, 0.5, 0.0], dtype=torch.float64)
    init = torch.tensor([3.0, 3.0 - 2.2e4, 1.0, 7.0], dtype=torch.float64)
    got = check_init(init, 1, r, torch.float64, torch.float32, epsilon=1.0)[0]
    assert got.tolist() == [0.0, -2.2e4, -2.0, -math.inf]
    wide = torch.tensor([0.0, -1e9, 5.0, 0.0], dtype=torch.float64)
    assert check_init(wide, 1, r, torch.float64, torch.float32, epsilon=1.0)[0].tolist() == [
        -5.0,
        -(2.0**23),
        0.0,
        -math.inf,
    ]
    assert check_init(wide, 1, r, torch.float64, torch.float64, epsilon=1.0)[0].tolist() == [
        -5.0,
        -1e9 - 5.0,
        0.0,
        -math.inf,
    ]


def test_a_pickled_cpu_result_leaves_out_the_kernel_and_reads_out_the_same():
    """A result saved with pickle (or torch.save) carried the CPU path's exp kernel beside the scores: twice the
    scores' size. The kernel stays behind; the loaded result rebuilds it and reads out the same codes and objective."""
    import pickle

    s = random_problem(2000, 50, seed=16)
    res = sinkhorn_assign(s, 0.05)
    assert isinstance(res._operator, CachedKernelOperator)
    saved = pickle.dumps(res)
    assert len(saved) < 1.2 * s.numel() * s.element_size()  # the scores, the labels, little else
    loaded = pickle.loads(saved)
    assert torch.equal(loaded.labels, res.labels) and torch.equal(loaded.codes, res.codes)
    assert loaded.objective == res.objective


def tensor_bytes_held(obj, skip_storage: int) -> int:
    """Bytes of the tensors reachable from ``obj`` through attributes, lists, tuples and dicts, leaving out those
    that share the storage at ``skip_storage`` (the caller's scores)."""
    seen, total, todo = set(), 0, [obj]
    while todo:
        x = todo.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, torch.Tensor):
            if x.untyped_storage().data_ptr() != skip_storage:
                total += x.numel() * x.element_size()
        elif isinstance(x, (list, tuple)):
            todo.extend(x)
        elif isinstance(x, dict):
            todo.extend(x.values())
        elif hasattr(x, "__dict__") and type(x).__module__.startswith("otlabel"):
            todo.extend(vars(x).values())
    return total


@pytest.mark.parametrize("entry", ["dense", "epsilon scaling", "sharded, no group"])
def test_a_cpu_result_does_not_hold_the_exp_kernel(entry):
    """The CPU path's exp kernel (a second N x K matrix) serves the iterations and the labels; a result held it for
    as long as it lived, so the README's warm start, ``res = sinkhorn_assign(..., init=res)``, built a second kernel
    beside the first. The result keeps labels, potentials and what its read-outs need, which read the scores."""
    s = random_problem(2000, 50, seed=17)  # (N, K) float32: 400 KB
    solve = {"dense": lambda **kw: sinkhorn_assign(s, 0.05, **kw),
             "epsilon scaling": lambda **kw: sinkhorn_assign(s, 0.05, epsilon_scaling=0.5, **kw),
             "sharded, no group": lambda **kw: sinkhorn_assign_sharded(s, 0.05, **kw)}[entry]  # fmt: skip
    res = solve()
    assert res.converged
    held = tensor_bytes_held(res, s.untyped_storage().data_ptr())
    assert held < s.numel() * s.element_size() / 4, held  # labels, potentials, weights: well under the scores
    again = solve(init=res)  # a warm start from a released result
    assert torch.equal(again.labels, res.labels) or (again.labels != res.labels).float().mean() < 0.01
    fresh = sinkhorn_assign(s, 0.05, acceleration="none", tol=1e-6)
    # a solve to 1e-4 against one to 1e-6: codes measured 2.4e-3 apart (plain steps; 9.9e-4 mixed), objective 9e-7
    assert torch.allclose(res.codes, fresh.codes, atol=5e-3) and abs(res.objective - fresh.objective) < 1e-3


def test_numpy_input_and_float64():
    s = random_problem(30, 4, seed=16, dtype=torch.float64)
    a = sinkhorn_assign(s.numpy(), 0.1, tol=1e-9, max_iter=10_000)
    b = sinkhorn_assign(s, 0.1, backend="reference", tol=1e-9, max_iter=10_000)
    assert a.cluster_potentials.dtype == torch.float64
    assert_close(a.codes, b.codes, atol=1e-7, what="float64 torch vs reference")


@pytest.mark.parametrize("name", sorted(OPERATORS))
def test_float64_column_maxima_below_the_float32_range_stay_finite(name):
    # A per-cluster shift changes nothing; this one puts a column's scores near -4e38, finite in float64 but -inf
    # once rounded to float32 (the column maxima were): the cluster was taken for one no sample may reach.
    eps = 1e28  # |S| / eps = 4e10, inside float64's limit
    base = random_problem(20, 4, seed=31, dtype=torch.float64) * eps
    shifted = base + torch.tensor([0.0, -4e38, 0.0, 0.0], dtype=torch.float64)
    c = uniform(20)
    for operator in (OPERATORS[name](shifted[None], eps, c), ReferenceOperator(shifted[None], eps, c)):
        b = torch.zeros(1, 4, dtype=torch.float64)
        assert torch.isfinite(operator.cluster_lse(b)).all()
    res = sinkhorn_assign(shifted, eps, tol=1e-4)
    want = sinkhorn_assign(base, eps, backend="reference", tol=1e-4)
    assert res.converged
    assert_close(res.codes, want.codes, atol=1e-4, what="codes of the shifted scores")


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(over_relaxation=1.5),
        dict(),  # the default: Anderson mixing with a tolerance
        dict(acceleration="over-relaxation"),
        dict(over_relaxation=1.0, epsilon_scaling=0.5),
        dict(epsilon_scaling=0.25),
    ],
)
def test_accelerations_reach_the_plain_solution(kwargs):
    s = cosine_scores(500, 15, seed=17)
    plain = sinkhorn_assign(s, 0.01, tol=1e-6, max_iter=20_000, acceleration="none")
    fast = sinkhorn_assign(s, 0.01, tol=1e-6, max_iter=20_000, **kwargs)
    assert plain.converged and fast.converged and fast.epsilon == 0.01
    assert fast.n_iter < plain.n_iter
    assert len(fast.errors) == fast.n_iter
    assert_close(fast.codes, plain.codes, atol=1e-4, what=f"codes with {kwargs}")


@pytest.mark.parametrize("max_iter", [1, 3, 7])
def test_epsilon_scaling_keeps_to_max_iter(max_iter):
    """Every stage used to run at least once, so max_iter=3 ran 9 iterations; the last stage (the requested eps)
    keeps at least one iteration and the total never exceeds max_iter."""
    s = cosine_scores(200, 8, seed=23)
    res = sinkhorn_assign(s, 0.01, max_iter=max_iter, tol=None, epsilon_scaling=0.5)
    assert res.n_iter == max_iter == len(res.errors) and res.epsilon == 0.01
    assert torch.isfinite(res.cluster_potentials).all()


def test_epsilon_scaling_with_fixed_iterations_reaches_the_requested_epsilon():
    """With tol=None no stage stops early: the first (coarsest) stage used to take max_iter - 1 iterations and leave
    one for the requested epsilon, so the result was the same (marginal error 0.12 here) at any max_iter. The stages
    now share max_iter, and more iterations give a better plan."""
    s = cosine_scores(200, 8, seed=23)

    def measured(max_iter):
        res = sinkhorn_assign(s, 0.01, max_iter=max_iter, tol=None, epsilon_scaling=0.5)
        assert res.n_iter == max_iter == len(res.errors)
        return float((res.plan.double().sum(0) - 1 / 8).abs().sum())

    assert measured(300) < 1e-3 < measured(100) < measured(20)


def test_epsilon_scaling_with_init_solves_at_epsilon_from_it():
    """init holds potentials at the requested epsilon. It used to start the first (coarsest) stage, rescaled, and the
    annealing then undid it: from a converged init 18-74 iterations (against 1 without epsilon_scaling), no fewer
    than from a cold start, on the problems of the sweep (randn, cosine 2,000-4,000 x 30-50, eps 0.003-0.05). A warm
    start is the better start: the solve takes it at epsilon, as without epsilon_scaling."""
    s = cosine_scores(2000, 40, seed=3)
    converged = sinkhorn_assign(s, 0.01, tol=1e-6)
    warm = sinkhorn_assign(s, 0.01, tol=1e-6, epsilon_scaling=0.5, init=converged)
    assert warm.converged and warm.n_iter == 1 and len(warm.errors) == 1
    assert torch.equal(warm.labels, converged.labels)
    drifted = s + 0.01 * random_problem(2000, 40, seed=4)
    assert_close(
        sinkhorn_assign(drifted, 0.01, tol=1e-6, epsilon_scaling=0.5, init=converged).codes,
        sinkhorn_assign(drifted, 0.01, tol=1e-6, init=converged).codes,
        atol=1e-5,
        what="a drifted warm start with and without epsilon_scaling",
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("fill", [-1e4, -1e9, "finfo.min"])
def test_epsilon_scaling_is_not_stretched_by_a_finite_mask_fill(dtype, fill):
    """Masks written as a large finite score (scores.masked_fill(mask, -1e9), torch.finfo(dtype).min) counted in the
    spread the first stage starts from: float32's -3.4e38 started it near 1e37, 64 stages, 141 iterations where the
    same mask as -inf took 23 (bfloat16's finfo.min 202 against 18). Scores that far below their row's maximum weigh
    nothing at any stage: the stages and the iterations are now those of the -inf mask."""
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(200, 8, generator=gen, dtype=torch.float64).to(dtype)
    mask = torch.rand(200, 8, generator=gen) < 0.3
    mask[:, 0] = False  # every sample keeps a cluster
    fill = torch.finfo(dtype).min if fill == "finfo.min" else max(fill, torch.finfo(dtype).min)  # float16: -65504
    runs = [sinkhorn_assign(s.masked_fill(mask, value), 0.05, epsilon_scaling=0.5) for value in (-math.inf, fill)]
    stages = [epsilon_stages(validate(s.masked_fill(mask, value), 0.05), 0.5) for value in (-math.inf, fill)]
    assert stages[1] == stages[0] and len(stages[0]) < 8, stages
    assert runs[1].n_iter == runs[0].n_iter and runs[1].converged
    assert torch.equal(runs[1].labels, runs[0].labels)


@pytest.mark.parametrize("shape", [(4096, 8), (2, 3000, 16)])
def test_epsilon_scaling_keeps_its_stages_when_each_sample_maximum_is_subtracted(shape):
    """Subtracting each sample's maximum (the span error's own fix) changes nothing, stages included. Every row
    maximum of such scores is 0 and every column's nearly so: the spread was grown from the smallest gap between
    scores and stopped at once, the row maxima outweighing the few scores taken in (4096 x 8: 2.7e-7 for 1.06, one
    stage where the raw scores have five, 6 iterations for 12)."""
    s = torch.randn(*shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shifted = s - s.amax(-1, keepdim=True)
    stages = [epsilon_stages(validate(x, 0.05), 0.5) for x in (s, shifted)]
    assert stages[1] == stages[0] and len(stages[0]) > 3, stages
    runs = [sinkhorn_assign(x, 0.05, epsilon_scaling=0.5) for x in (s, shifted)]
    assert abs(runs[1].n_iter - runs[0].n_iter) <= 1 and runs[1].converged  # the shift rounds: 13 against 12
    assert torch.equal(runs[1].labels, runs[0].labels)


@pytest.mark.parametrize(("fill", "eps", "factor"), [(-1e9, 0.1, 0.5), (-1e12, 1.0, 0.25)])
def test_epsilon_scaling_carries_no_potentials_wider_than_float32_takes(fill, eps, factor):
    """Three of four samples may reach cluster 1 only through a -1e9 fill, yet it needs half the mass: the balanced
    plan moves a quarter through the fill, and its potentials lie 1e9 / eps apart. The stages start near that spread
    and hand their potentials on rescaled; where max_iter ran out before the last, the skipped stages' ratios (2^30
    here) carried them to +-5e9, whose float32 rounding (up to 256 nats) overflowed exp(b - round(b)): "Sinkhorn
    potentials became non-finite ... a bug in otlabel" at 41 of max_iter 1-60 (6, 9, 10, 12, ...; 20 and 50 rounded
    luckily) and, with -1e12, at 59. A carried start is now pulled in as an init is (8.4e6 nats at most below the
    largest): every max_iter gives finite potentials, the labels the plan gives, and the usual ConvergenceWarning."""
    s = torch.zeros(4, 2)
    s[:3, 1] = fill
    for max_iter in range(1, 61):
        with pytest.warns(ConvergenceWarning):
            res = sinkhorn_assign(s, eps, max_iter=max_iter, epsilon_scaling=factor)
        assert torch.isfinite(res.cluster_potentials).all(), max_iter
        assert res.labels.tolist() == [0, 0, 0, 1], max_iter


@pytest.mark.parametrize("eps", [0.5, 0.05, 0.01])
def test_adaptive_over_relaxation_never_loses_to_plain(eps):
    s = cosine_scores(400, 12, seed=18)
    fixed = sinkhorn_assign(s, eps, max_iter=5, tol=None)
    classic = sinkhorn_assign(s, eps, max_iter=5, tol=None, acceleration="none")
    assert torch.equal(fixed.cluster_potentials, classic.cluster_potentials)  # tol=None: classic iterates
    adaptive = sinkhorn_assign(s, eps, tol=1e-6, max_iter=5000, acceleration="over-relaxation")
    plain = sinkhorn_assign(s, eps, tol=1e-6, max_iter=5000, acceleration="none")
    assert adaptive.converged and adaptive.n_iter <= plain.n_iter
    if eps <= 0.05:  # slow problems: the measured rate asks for a real over-relaxation, and it pays
        assert adaptive.n_iter < 0.85 * plain.n_iter


@pytest.mark.parametrize("eps", [0.5, 0.05, 0.01, 0.003])
def test_anderson_beats_plain_and_reaches_its_solution(eps):
    """Anderson mixing from the first step (acceleration="anderson"; the default takes up to 100 plain steps first on a
    problem this small, where they are compiled: see test_plain_steps.py)."""
    s = cosine_scores(2000, 40, seed=19)
    mixed = sinkhorn_assign(s, eps, tol=1e-6, max_iter=20_000, acceleration="anderson")
    plain = sinkhorn_assign(s, eps, tol=1e-6, max_iter=20_000, acceleration="none")
    assert mixed.converged and plain.converged
    assert mixed.n_iter <= plain.n_iter
    if eps <= 0.05:  # the slow regime, where mixing pays most
        assert mixed.n_iter < 0.5 * plain.n_iter, (mixed.n_iter, plain.n_iter)
    assert_close(mixed.codes, plain.codes, atol=2e-4, what=f"Anderson vs plain codes at eps={eps}")


def test_anderson_restarts_and_caps_wild_proposals():
    """A residual that hardly changes (here by 1%) makes the least-squares weights large: the mixer must cap
    the move and, when the error still rises, resume plain steps from the best point seen."""
    from otlabel.anderson import ANDERSON_MAX_EXTRAPOLATION, AndersonMixer

    mixer = AndersonMixer(memory=3, cluster_weights=torch.full((4,), 0.25, dtype=torch.float64))
    empty = torch.zeros(1, 4, dtype=torch.bool)
    b0 = torch.zeros(1, 4, dtype=torch.float64)
    step = torch.tensor([[1.0, -1.0, 0.5, -0.5]], dtype=torch.float64)
    first = mixer.step(b0, b0 + step, 0.2, empty)
    assert torch.equal(first, b0 + step)  # one iterate: nothing to mix yet
    nudged = step * (1 - 1e-2)  # residual 1% smaller: weights ~100, the fixed point ~100 nats ahead
    second = mixer.step(first, first + nudged, 0.19, empty)  # the best point so far: first, error 0.19
    beyond = (second - (first + nudged)).abs().max()
    assert torch.isfinite(second).all() and beyond == pytest.approx(ANDERSON_MAX_EXTRAPOLATION)
    resumed = mixer.step(second, second + step, 0.9, empty)  # error rose 4.7x: restart from the best point
    assert torch.equal(resumed, first + nudged) and mixer.last is None and mixer.falls is None  # history dropped
    assert mixer.reach == ANDERSON_MAX_EXTRAPOLATION / 4  # and trust the mixing less
    again = mixer.step(resumed, resumed + step, 0.9, empty)  # still high: no second restart in a row
    assert torch.equal(again, resumed + step)
    mixer.step(again, again + step, 0.1, empty)  # a new best error: the trust region grows back by 1.5x
    assert mixer.reach == pytest.approx(1.5 * ANDERSON_MAX_EXTRAPOLATION / 4)


def test_anderson_takes_turns_with_plain_steps_after_a_long_stall():
    """ANDERSON_PATIENCE steps without a 1% fall of the error below the lowest seen: the mixer takes plain steps (F(b)
    itself) for as many steps, then mixes afresh, and so on; a 1% fall brings the mixing back at once."""
    from otlabel.anderson import ANDERSON_PATIENCE, AndersonMixer

    mixer = AndersonMixer(memory=3, cluster_weights=torch.full((4,), 0.25, dtype=torch.float64))
    g = torch.Generator().manual_seed(0)

    def step(error):
        b = torch.randn(1, 4, generator=g, dtype=torch.float64)
        plain = b + 0.1 * torch.randn(1, 4, generator=g, dtype=torch.float64)
        return mixer.step(b, plain, error, None), plain

    step(1.0)
    for i in range(1, 3 * ANDERSON_PATIENCE + 10):
        out, plain = step(1.2 if i % 2 else 0.995)  # never 1% below the lowest (0.995); never 1.5x above: no restart
        plain_turn = (i // ANDERSON_PATIENCE) % 2 == 1
        assert mixer.active != plain_turn and (torch.equal(out, plain) or not plain_turn), i
    assert not mixer.active
    step(0.98)  # 1% below 0.995
    assert mixer.active


def test_anderson_never_moves_back_against_the_plain_step():
    """A residual that grows along the step (the linearised cluster step cannot do that: its Jacobian's eigenvalues
    lie in [0, 1]) makes the least squares place the fixed point ~100 nats behind: the mixer takes the plain step."""
    from otlabel.anderson import AndersonMixer

    mixer = AndersonMixer(memory=3, cluster_weights=torch.full((4,), 0.25, dtype=torch.float64))
    empty = torch.zeros(1, 4, dtype=torch.bool)
    b0 = torch.zeros(1, 4, dtype=torch.float64)
    step = torch.tensor([[1.0, -1.0, 0.5, -0.5]], dtype=torch.float64)
    first = mixer.step(b0, b0 + step, 0.2, empty)
    grown = step * (1 + 1e-2)
    assert torch.equal(mixer.step(first, first + grown, 0.19, empty), first + grown)


def test_anderson_forward_test_ignores_constants():
    """A constant added to every potential changes nothing, so it must not sway the forward-only test: a move back
    against the plain step stays refused however large a constant rides on it or on the step, and a move forward
    stays taken."""
    from otlabel.anderson import AndersonMixer

    mixer = AndersonMixer(memory=3, cluster_weights=torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64))
    step = torch.tensor([[1.0, -1.0, 0.5, -0.5]], dtype=torch.float64)
    for shift in (0.0, 3.0, -3.0):
        for lift in (0.0, 5.0, -5.0):
            back, ahead = -0.1 * step + lift, 0.1 * step + lift
            assert mixer.points_forward(back, step + shift).tolist() == [[False]], (shift, lift)
            assert mixer.points_forward(ahead, step + shift).tolist() == [[True]], (shift, lift)


def test_anderson_crosses_a_flat_plateau_in_doubling_strides():
    """A residual that does not change at all (a hard plan: the cluster step is a translation) leaves the least squares
    nothing to fit: the mixer moves along the plain step, twice as far each time, up to its trust region."""
    from otlabel.anderson import ANDERSON_MAX_EXTRAPOLATION, AndersonMixer

    mixer = AndersonMixer(memory=3, cluster_weights=torch.full((2,), 0.5, dtype=torch.float64))
    empty = torch.zeros(1, 2, dtype=torch.bool)
    step = torch.tensor([[0.06, -0.06]], dtype=torch.float64)
    b, strides = torch.zeros(1, 2, dtype=torch.float64), []
    for _ in range(10):
        proposal = mixer.step(b, b + step, 1 / 17, empty)  # the error stays put, as on the plateau
        strides.append(float((proposal - b)[0, 0] / step[0, 0]))
        b = proposal
    capped = 1 + ANDERSON_MAX_EXTRAPOLATION / 0.06
    assert strides == pytest.approx([1, 2, 4, 8, 16, 32, 64, 128, capped, capped])


# 17 x 2 scores with forbidden pairs, |S| / eps <= 1e3 at eps = 1e-3: for ~1,800 plain steps the plan is hard and the
# error sits at exactly 1/17 while b drifts 0.06 nats per step towards the solution, 200 nats away.
PLATEAU = [
    [0.88916015625, 0.67822265625], [-0.447265625, 0.206787109375], [0.47802734375, 0.6103515625],
    [-0.78515625, -0.77783203125], [-0.40380859375, -0.273193359375], [0.9921875, -0.199462890625],
    [float("-inf"), 0.32080078125], [0.356689453125, 0.47705078125], [-0.75927734375, 0.765625],
    [0.85693359375, 0.75244140625], [-0.82958984375, 0.7275390625], [-0.994140625, -0.55419921875],
    [float("-inf"), 0.56787109375], [float("-inf"), -0.83935546875], [-0.43359375, float("-inf")],
    [float("-inf"), -0.326416015625], [-0.1871337890625, 0.17578125],
]  # fmt: skip


@pytest.mark.parametrize("path", ["torch", "reference", "stream"])
def test_default_mixing_crosses_a_flat_plateau_no_slower_than_plain_steps(path):
    """On the plateau the mixing's least squares see only rounding noise. Its proposals used to send b back and forth
    by the whole trust region: 2,758 iterations on the reference (plain: 2,366), no convergence in 4,000 streamed."""
    s = torch.tensor(PLATEAU)
    solve = {
        "torch": lambda **kw: sinkhorn_assign(s, 1e-3, backend="torch", **kw),
        "reference": lambda **kw: sinkhorn_assign(s, 1e-3, backend="reference", **kw),
        "stream": lambda **kw: sinkhorn_assign_stream(s, 1e-3, **kw),
    }[path]
    mixed, plain = solve(max_iter=4000), solve(max_iter=4000, acceleration="none")
    assert plain.converged and mixed.converged, (mixed.n_iter, mixed.marginal_error)
    assert mixed.n_iter <= plain.n_iter, (mixed.n_iter, plain.n_iter)


def test_anderson_answers_a_degenerate_solve_with_the_plain_step_on_the_device():
    """A least-squares solve that yields non-finite weights (here: residuals of 1e200, whose Gram matrix overflows)
    is answered by the plain step without a host read; the loop reads the verdict with the next error, and the
    mixer then starts its history again."""
    from otlabel.anderson import AndersonMixer

    mixer = AndersonMixer(memory=3, cluster_weights=torch.full((3,), 1 / 3, dtype=torch.float64))
    empty = torch.zeros(1, 3, dtype=torch.bool)
    b0 = torch.zeros(1, 3, dtype=torch.float64)
    mixer.step(b0, b0 + 1e200, 0.5, empty)
    plain = b0 + torch.tensor([[1e200, -1e200, 3e200]], dtype=torch.float64)
    proposal = mixer.step(b0 + 1e200, plain, 0.4, empty)
    assert torch.equal(proposal, plain) and mixer.falls.shape[-1] == 1  # two iterates: one difference
    assert mixer.last_step_sound().tolist() == [False]
    mixer.review_last_step(False)
    assert mixer.last is None and mixer.falls is None and mixer.last_step_sound() is None  # none to judge
    # Two heads, only head 1 degenerate: the verdict covers every head, and both take the plain step.
    mixer = AndersonMixer(memory=3, cluster_weights=torch.full((3,), 1 / 3, dtype=torch.float64))
    b0 = torch.zeros(2, 3, dtype=torch.float64)
    b1 = mixer.step(b0, torch.tensor([[0.1, -0.1, 0.2], [1e200, 1e200, 1e200]], dtype=torch.float64), 0.5, None)
    plain = b1 + torch.tensor([[0.05, -0.02, 0.1], [1e200, -1e200, 3e200]], dtype=torch.float64)
    proposal = mixer.step(b1, plain, 0.4, None)
    assert torch.equal(proposal, plain) and mixer.last_step_sound().tolist() == [False]


def test_an_unconverged_mixed_solve_returns_no_worse_than_the_error_it_reports():
    """The last mixed step of a solve that runs out of iterations is never measured; here (200 x 10 cosines, skewed
    weights, eps 0.002, 40 iterations) it had twice the error read before it, and the result reported the smaller
    one. The solver returns the plain step from the best iterate read instead, and reports that iterate's error."""
    g = torch.Generator().manual_seed(63)
    z = torch.nn.functional.normalize(torch.randn(200, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    r = torch.rand(10, generator=g, dtype=torch.float64) + 0.2
    r = r / r.sum()
    with pytest.warns(ConvergenceWarning):
        res = sinkhorn_assign((z @ c.T).double(), 0.002, tol=1e-9, max_iter=40, cluster_weights=r)
    returned = float((res.codes.sum(0) / 200 - r).abs().sum())  # the returned plan's own marginal error
    assert returned <= res.marginal_error, (returned, res.marginal_error)
    assert res.marginal_error == min(res.errors)


def test_acceleration_argument_is_checked():
    s = cosine_scores(50, 4, seed=20)
    with pytest.raises(ValueError, match="acceleration must be one of"):
        sinkhorn_assign(s, 0.1, acceleration="nesterov")
    with pytest.raises(ValueError, match="cannot be combined"):
        sinkhorn_assign(s, 0.1, acceleration="anderson", over_relaxation=1.5)


def test_over_relaxation_safeguard_falls_back_to_plain_steps(monkeypatch):
    """At eps = 0.01 the error is not monotone: omega = 1.99 overshoots. From the first rise of the error by over 1%
    on, the steps are plain: no over-relaxed step is taken after it (before it, every step is one)."""
    from otlabel import solver

    iteration, relaxed = [0], []
    relax = solver.relax

    def recorded(*args):
        relaxed.append(iteration[0])
        return relax(*args)

    monkeypatch.setattr(solver, "relax", recorded)
    s = random_problem(300, 8, seed=3)
    wild = sinkhorn_assign(s, 0.01, tol=1e-6, max_iter=5000, over_relaxation=1.99,
                           callback=lambda it, err: iteration.__setitem__(0, it))  # fmt: skip
    assert wild.converged
    errors = wild.errors
    first_rise = next(i + 1 for i in range(2, len(errors)) if errors[i] > 1.01 * errors[i - 1])  # 1-based
    assert relaxed == list(range(2, first_rise)), (first_rise, relaxed[-3:])  # the cold start is a plain step


def test_omega_for_rate():
    from otlabel.solver import MAX_ADAPTIVE_OMEGA, omega_for_rate

    assert omega_for_rate([1e-1, 1e-4, 1e-7]) < 1.01  # fast contraction: plain steps are best
    assert 1.16 < omega_for_rate([1e-1, 5e-2, 2.5e-2]) < 1.18  # kappa = 1/2: 2 / (1 + sqrt(1/2)) = 1.1716
    assert omega_for_rate([0.0776, 0.0776, 0.07762]) == MAX_ADAPTIVE_OMEGA  # a plateau: slowest contraction
    assert omega_for_rate([0.05, 0.08, 0.1]) == 1.0  # clearly rising: no rate to read
    assert omega_for_rate([float("inf"), 0.1, 0.05]) == 1.0


def test_argument_errors_come_before_reading_the_scores():
    bad = torch.full((50, 4), float("nan"))  # would fail validation, which reads every score
    with pytest.raises(ValueError, match="acceleration must be one of"):
        sinkhorn_assign(bad, 0.1, acceleration="fast")
    with pytest.raises(ValueError, match="max_iter"):
        sinkhorn_assign(bad, 0.1, max_iter=0)


def test_streaming_takes_the_acceleration_argument():
    from otlabel import sinkhorn_assign_stream

    s = cosine_scores(600, 12, seed=21)
    mixed = sinkhorn_assign_stream(s, 0.02, tol=1e-6, max_iter=5000)
    plain = sinkhorn_assign_stream(s, 0.02, tol=1e-6, max_iter=5000, acceleration="none")
    assert mixed.converged and plain.converged and mixed.n_iter < plain.n_iter
    assert torch.equal(mixed.labels, plain.labels)
    with pytest.raises(ValueError, match="acceleration must be one of"):
        sinkhorn_assign_stream(s, 0.02, acceleration="fast")


def test_callback_sees_every_iteration_of_every_entry_route():
    """sinkhorn_assign takes the progress hook the streamed and sharded entry points take: every iteration, the
    worst head's error (inf at the cold start), counted across epsilon-scaling stages."""
    s = cosine_scores(200, 6, seed=21)
    for kwargs in (dict(), dict(epsilon_scaling=0.5), dict(tol=None, max_iter=7)):
        seen = []
        res = sinkhorn_assign(s, 0.02, callback=lambda i, e, seen=seen: seen.append((i, e)), **kwargs)
        assert [i for i, _ in seen] == list(range(1, res.n_iter + 1)), kwargs
        assert seen[0][1] == float("inf") and seen[-1][1] == pytest.approx(res.marginal_error, rel=1e-6), kwargs
    z, c = torch.randn(100, 8), torch.randn(5, 8)
    seen = []
    res = sinkhorn_assign(features=z, prototypes=c, epsilon=0.5, callback=lambda i, e: seen.append(i))
    assert seen == list(range(1, res.n_iter + 1))


def test_cached_kernel_is_not_rebuilt_for_a_cluster_with_no_sample_here(monkeypatch):
    """A sharded rank may hold no sample of a cluster that others reach: the loop hands it finite potentials for a
    column that is all zeros here. That column never counts as drift: one exp pass, the cold start's."""
    s = random_problem(200, 5, h=1, seed=3)
    s[:, :, 0] = float("-inf")  # cluster 0: nothing on this "rank"
    operator = CachedKernelOperator(DenseSource(s), 0.1, uniform(200))
    passes = []
    absorb = operator._absorb
    monkeypatch.setattr(operator, "_absorb", lambda b: (passes.append(b), absorb(b))[1])
    lse = operator.cluster_lse(None)
    log_r = torch.full((1, 5), 0.2, dtype=torch.float64).log()
    for _ in range(10):
        b = log_r - torch.where(torch.isfinite(lse), lse, -3.0)  # finite for cluster 0, as a global b would be
        lse = operator.cluster_lse(b)
    assert len(passes) == 1, f"{len(passes)} exp passes over 11 iterations"
    assert torch.isneginf(lse[0, 0]) and torch.isfinite(lse[0, 1:]).all()


@pytest.mark.parametrize("eps", [0.05, 0.01])
def test_cached_kernel_is_built_once_for_scores_far_above_their_temperature(monkeypatch, eps):
    """Normal logits at eps 0.05 (column maxima / eps averaging ~50): the kernel was built around b0 = -max_j S / eps
    as it stood, while the loop centres its potentials, so the first warm iteration found every cluster drifted by
    the mean of b0 and built the kernel again, a second exp pass in every such solve. b0 is centred too now: one."""
    s = torch.randn(64, 10, generator=torch.Generator().manual_seed(0))
    passes = []
    absorb = CachedKernelOperator._absorb
    monkeypatch.setattr(CachedKernelOperator, "_absorb", lambda self, b: (passes.append(b), absorb(self, b))[1])
    res = sinkhorn_assign(s, eps, max_iter=3, tol=None, backend="torch")
    assert len(passes) == 1, f"{len(passes)} exp passes"
    ref = sinkhorn_assign(s.double(), eps, max_iter=3, tol=None, backend="reference")
    assert torch.equal(res.labels, ref.labels)
    assert_close(res.codes.double(), ref.codes, atol=1e-5, rtol=1e-5, what="codes")


def fast_step_problems():
    """name -> (scores, options): every case the cached kernel's steps tell apart (see the test below)."""
    g = torch.Generator().manual_seed(6)
    zero = torch.tensor([0.3, 0.0, 0.2, 0.5])
    unreachable = torch.randn(300, 4, generator=g)
    unreachable[:, 1] = -math.inf  # cluster 1: no sample may go there, and it has weight 0
    return {
        "SwAV batch, 3 iterations": (cosine_scores(64, 10, seed=6), dict(max_iter=3, tol=None)),
        "to a tolerance (Anderson mixing)": (torch.randn(300, 20, generator=g), {}),
        "plain steps": (torch.randn(300, 20, generator=g), dict(acceleration="none", max_iter=50, warn=False)),
        "heads": (torch.randn(3, 200, 8, generator=g), dict(tol=1e-6)),
        "drift past the threshold (7 kernels)": (3 * torch.randn(400, 30, generator=g), dict(epsilon=0.01)),
        "a cluster of weight 0": (torch.randn(300, 4, generator=g), dict(cluster_weights=zero)),
        "an unreachable cluster": (unreachable, dict(cluster_weights=zero)),
        "float64": (torch.randn(300, 20, generator=g, dtype=torch.float64), dict(tol=1e-8)),
        "over 2 threads": (cosine_scores(2000, 100, seed=7), dict(max_iter=5, tol=None)),
    }


@pytest.mark.parametrize("name", fast_step_problems())
def test_cached_kernel_steps_without_masks_are_bitwise_the_general_ones(monkeypatch, name):
    """The cached kernel's passes masked the clusters no sample may reach and the non-finite potentials at every
    iteration (15 of its 36 torch operations, each ~3 us on a small solve), though every cluster is reachable but
    where a sharded rank holds no sample of one. Knowing that on the host, and the potentials within the threshold
    of the kernel's (one read), it now skips them: labels, codes, potentials and errors are bitwise those of the
    general steps, which every other case still takes (a cluster of weight 0, a drift, an unreachable cluster)."""
    scores, options = fast_step_problems()[name]
    options = {"epsilon": 0.05, **options}
    monkeypatch.setattr(CachedKernelOperator, "takes_plain_steps", lambda self: False)  # the torch steps, step by step
    results = []
    for general in (False, True):
        if general:  # the steps as before: every cluster treated as possibly unreachable
            monkeypatch.setattr(CachedKernelOperator, "_every_cluster_reachable", lambda self: False)
        res = sinkhorn_assign(scores, backend="torch", **options)
        assert isinstance(res._operator, CachedKernelOperator)
        results.append((res.labels, res.codes, res.cluster_potentials, res.errors))
    (labels, codes, potentials, errors), general = results
    assert torch.equal(labels, general[0]) and torch.equal(codes, general[1]), name
    assert torch.equal(potentials, general[2]) and errors == general[3], (errors, general[3])


def test_a_cold_start_that_underflows_a_reachable_cluster_asks_the_exact_pass():
    """Cluster 1's best sample has weight 0, and the others score it 200 nats (10 / 0.05) below their best: the cold
    start's float32 weights on those rows underflow and its column sum is 0. Every cluster is reachable, so the
    branch that skips the masking takes the cold start; without its underflow test there, the solve raised 'Sinkhorn
    potentials became non-finite' (checked by removing it: no other test failed). It asks the exact pass instead."""
    scores = torch.tensor([[0.0, 10.0], [10.0, 0.0], [9.0, -1.0]])
    weights = torch.tensor([0.0, 0.5, 0.5])
    res = sinkhorn_assign(scores, 0.05, sample_weights=weights, backend="torch", max_iter=50)
    ref = sinkhorn_assign(scores, 0.05, sample_weights=weights, backend="reference", max_iter=50)
    assert isinstance(res._operator, CachedKernelOperator) and res._operator.all_reachable and res.converged
    assert_close(res.cluster_potentials, ref.cluster_potentials, atol=1e-5, rtol=1e-7, what="potentials")


def test_one_set_of_options_serves_every_entry_point():
    """The same keyword arguments go to sinkhorn_assign, sinkhorn_assign_stream and sinkhorn_assign_sharded (one
    process, no group): no TypeError for an option one of them lacks, and the same answer from all three."""
    from otlabel import sinkhorn_assign_sharded, sinkhorn_assign_stream

    s = cosine_scores(300, 7, seed=4)
    r = random_weights(7, seed=5)
    options = dict(cluster_weights=r, tol=1e-6, max_iter=2000, init=None, backend="torch", acceleration="auto",
                   over_relaxation=None, epsilon_scaling=None, callback=None, warn=True)  # fmt: skip
    results = [f(s, 0.05, **options) for f in (sinkhorn_assign, sinkhorn_assign_stream, sinkhorn_assign_sharded)]
    for res in results:
        assert res.converged
        assert torch.equal(res.labels, results[0].labels)
        assert_close(centred(res.cluster_potentials), centred(results[0].cluster_potentials), atol=1e-4)


def test_entry_points_say_what_they_do_not_offer():
    from otlabel import sinkhorn_assign_sharded, sinkhorn_assign_stream

    s = cosine_scores(50, 4, seed=4)
    with pytest.raises(ValueError, match="epsilon_scaling is not available when streaming"):
        sinkhorn_assign_stream(s, 0.05, epsilon_scaling=0.5)
    with pytest.raises(ValueError, match="epsilon_scaling is not available in a sharded solve"):
        sinkhorn_assign_sharded(s, 0.05, epsilon_scaling=0.5)
    with pytest.raises(ValueError, match="epsilon_scaling is not available with features="):
        sinkhorn_assign(features=s, prototypes=torch.eye(4), epsilon=0.05, epsilon_scaling=0.5)
    with pytest.raises(ValueError, match="pass CUDA tensors to sinkhorn_assign"):
        sinkhorn_assign_stream(s, 0.05, backend="triton")
    with pytest.raises(ValueError, match="small enough to load"):
        sinkhorn_assign_stream(s, 0.05, backend="reference")
    with pytest.raises(ValueError, match="'auto' or 'torch' when streaming"):
        sinkhorn_assign_stream(s, 0.05, backend="numpy")


def test_sharded_scores_keep_their_former_name_for_now():
    from otlabel import sinkhorn_assign_sharded

    s = cosine_scores(50, 4, seed=4)
    with pytest.warns(DeprecationWarning, match="now scores="):
        old = sinkhorn_assign_sharded(local_scores=s, epsilon=0.05)
    assert torch.equal(old.labels, sinkhorn_assign_sharded(s, 0.05).labels)
    with pytest.raises(ValueError, match="give scores= only"):
        sinkhorn_assign_sharded(s, 0.05, local_scores=s)


def test_a_zero_weight_cluster_keeps_the_log_domain_pass_on_its_fast_path(monkeypatch):
    """Found in review: a reachable cluster of weight 0 (b = -inf, so no mass on purpose) counted as underflowed and
    sent every log-domain pass to the exact one (two exps per entry, float32 potentials): 477 iterations to 1e-6
    where the reference took 43. Streamed and in memory (the log-domain operator forced), as many as the reference."""
    import numpy as np

    from otlabel import sinkhorn_assign_stream
    from otlabel.backends import torch_backend

    scores = torch.randn(2000, 20, generator=torch.Generator().manual_seed(0))
    r = torch.tensor(np.r_[np.full(19, 1 / 19), 0.0])
    kwargs = dict(cluster_weights=r, tol=1e-6, max_iter=1500)
    ref = sinkhorn_assign(scores, 0.01, backend="reference", **kwargs)
    streamed = sinkhorn_assign_stream(scores.numpy(), 0.01, **kwargs)
    monkeypatch.setattr(torch_backend, "available_memory_bytes", lambda: 0)  # no room for the cached kernel
    monkeypatch.setattr(torch_backend, "KERNEL_ALWAYS_FITS_BYTES", 0)  # and asked even for a small one
    log_domain = sinkhorn_assign(scores, 0.01, backend="torch", **kwargs)
    for res in (streamed, log_domain):
        assert res.converged and res.n_iter <= 1.5 * ref.n_iter, (res.n_iter, ref.n_iter)


def _solve_in_child(queue, scores):
    from otlabel import sinkhorn_assign_stream

    res = sinkhorn_assign(scores, 0.05)
    queue.put((res.labels.tolist(), res.codes.tolist(), sinkhorn_assign_stream(scores, 0.05).labels.tolist()))


def _solve_on_one_thread_in_child(queue, scores):
    from otlabel.backends.torch_backend import solve_threads

    torch.set_num_threads(1)  # README's way around torch's own hang in a forked child
    queue.put(solve_threads())
    sinkhorn_assign(scores, 0.05)
    queue.put(torch.get_num_threads())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_while_another_thread_solves_keeps_its_own_thread_count():
    """Found probing a training loop: a child forked while another thread of the parent was inside a solve inherited
    that solve's count of running solves, which never ended there. Every solve of the child then planned for the
    parent's thread count and restored it on exit, over the child's ``torch.set_num_threads(1)``: the child hung in
    the solve's last float64 operations (torch's OpenMP after fork), or ran on with the parent's count."""
    import multiprocessing
    import queue as queues
    import threading

    scores = cosine_scores(400, 6, seed=8)
    entered, release = threading.Event(), threading.Event()

    def hold(it, err):
        entered.set()
        release.wait(60)

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    solver = threading.Thread(target=lambda: sinkhorn_assign(scores, 0.05, max_iter=2, tol=None, callback=hold))
    solver.start()
    try:
        assert entered.wait(60)
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_solve_on_one_thread_in_child, args=(queue, scores))
        child.start()
        try:
            planned = queue.get(timeout=60)
            try:
                after = queue.get(timeout=60)
            except queues.Empty:
                after = "the child's solve hung"
        finally:
            child.join(5)
            if child.is_alive():
                child.kill()
    finally:
        release.set()
        solver.join()
        torch.set_num_threads(threads)
    assert (planned, after) == (1, 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_process_forked_inside_a_solve_keeps_one_thread_after_it():
    """A child forked from a solve's callback goes on with that solve: on exit it restored the parent's thread count
    over the child's torch.set_num_threads(1), and the child's next OpenMP operation could hang."""
    scores = cosine_scores(400, 6, seed=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    read, write = os.pipe()
    forked = []

    def fork_once(it, err):
        if not forked:
            forked.append(os.fork())
            if forked[0] == 0:
                torch.set_num_threads(1)

    try:
        try:
            sinkhorn_assign(scores, 0.05, max_iter=3, tol=None, callback=fork_once)
            if forked[0] == 0:  # the child: its thread count after the solve
                os.write(write, bytes([torch.get_num_threads()]))
        finally:
            if forked and forked[0] == 0:  # the child leaves here, whatever happened, not through pytest
                os._exit(0)
        os.close(write)
        after = os.read(read, 1)
        os.waitpid(forked[0], 0)
        parent_after = torch.get_num_threads()
    finally:
        torch.set_num_threads(threads)
    assert after == bytes([1])
    assert parent_after == 2  # the parent's solve restored its own


def test_the_worker_pool_has_one_thread_per_torch_thread():
    """One worker per intra-op thread, also after torch's thread count changes (a new pool then)."""
    threads = torch.get_num_threads()
    try:
        for n in (1, 3, 1):
            torch.set_num_threads(n)
            assert worker_pool()._max_workers == n
            assert worker_pool() is worker_pool()  # kept while the count stays
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("n, parts", [(1, 4), (7, 1), (8, 2), (9, 2), (10, 4), (5, 4), (1000, 16)])
def test_split_rows_covers_every_row_once_in_order(n, parts):
    """At most ``parts`` contiguous ranges covering ``range(n)`` in order; none longer than ceil(n / parts) (the
    slowest thread has no more rows than in an even split), all that long but the last, none empty."""
    ranges = split_rows(n, parts)
    assert 1 <= len(ranges) <= parts
    assert [row for lo, hi in ranges for row in range(lo, hi)] == list(range(n)), ranges
    lengths = [hi - lo for lo, hi in ranges]
    longest = -(-n // parts)
    assert all(x == longest for x in lengths[:-1]) and 0 < lengths[-1] <= longest, ranges


def test_small_in_memory_passes_run_on_the_callers_thread(monkeypatch):
    """Found hunting CPU cliffs: every pass of a CPU solve was handed to the worker threads, however small. Under a
    training loop of small solves (N in the hundreds, K in the tens) the hand-off cost more than the pass: a 64 x 10
    solve of 3 iterations took about twice as long as with its passes run on the caller's thread. Scores up to
    ``SERIAL_PASS_ELEMENTS`` now run there, one range; larger ones are still split over the threads, with the same
    labels. Timing-free: the threads that ran each range are recorded."""
    import threading

    from otlabel.backends import torch_backend

    ranges, real = [], CachedKernelOperator._matvec_range

    def matvec_range(self, v, weights, lo, hi):
        ranges.append((threading.get_ident(), lo, hi))
        return real(self, v, weights, lo, hi)

    monkeypatch.setattr(CachedKernelOperator, "_matvec_range", matvec_range)
    monkeypatch.setattr(CachedKernelOperator, "takes_plain_steps", lambda self: False)  # passes by torch, not compiled
    scores = cosine_scores(64, 10, seed=5)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        small = sinkhorn_assign(scores, 0.05, max_iter=3, tol=None)
        assert ranges and all(r == (threading.get_ident(), 0, 64) for r in ranges), ranges
        ranges.clear()
        monkeypatch.setattr(torch_backend, "SERIAL_PASS_ELEMENTS", 64 * 10 - 1)  # now one score too many
        split = sinkhorn_assign(scores, 0.05, max_iter=3, tol=None)
    finally:
        torch.set_num_threads(saved)
    assert sorted({(lo, hi) for _, lo, hi in ranges}) == [(0, 32), (32, 64)], ranges
    assert threading.get_ident() not in {thread for thread, _, _ in ranges}
    assert torch.equal(small.labels, split.labels)
    assert_close(small.codes, split.codes, atol=1e-6, what="codes")


@pytest.mark.parametrize("scoped", [True, False], ids=["own thread", "process-wide"])
def test_the_loop_runs_torch_on_one_thread_on_the_callers_thread(scoped, monkeypatch):
    """Found hunting CPU cliffs: on a busy machine each small op that opens an OpenMP region (float64 exp/log on a
    K-vector, the Anderson products) waited ~5 ms for its threads; a 256 x 100 solve took 85 ms (median, 2 busy
    processes on 2 cores) against 25 ms. The loop now runs torch on one thread (the callback sees it) and restores
    the caller's setting after, also when the callback raises; the passes keep their two workers (see above). Both
    ways of setting it: for the caller's thread alone, and torch's process-wide count where the former is not found."""
    from otlabel.backends import torch_backend

    if not scoped:
        monkeypatch.setattr(torch_backend, "_thread_counts", lambda: None)
    elif torch_backend._thread_counts() is None:
        pytest.skip("this torch build's OpenMP runtime is not reachable: solves set torch's count process-wide")

    class Stop(Exception):
        pass

    seen = []

    def stop(it, err):
        raise Stop

    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        sinkhorn_assign(
            cosine_scores(64, 10, seed=5), 0.05, callback=lambda it, err: seen.append(torch.get_num_threads())
        )
        assert seen and set(seen) == {1}, seen
        assert torch.get_num_threads() == 2
        with pytest.raises(Stop):
            sinkhorn_assign(cosine_scores(64, 10, seed=5), 0.05, callback=stop)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


def test_a_thread_started_during_a_solve_keeps_the_processs_thread_count():
    """Found reviewing the solve's thread handling: it set torch's count with ``torch.set_num_threads(1)``, which is
    process-wide (a thread takes, at its first torch call, the count last set anywhere), so a thread started during a
    solve (a data loader's, a prefetcher) took 1 and kept it after the solve: 1 instead of 2, its own ops on one thread
    for good. The solve now sets the count for its own thread alone; such a thread takes the caller's count."""
    import threading

    from otlabel.backends import torch_backend

    if torch_backend._thread_counts() is None:
        pytest.skip("this torch build's OpenMP runtime is not reachable: solves set torch's count process-wide")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    solved, seen = threading.Event(), {}

    def user_thread():
        seen["during"] = torch.get_num_threads()  # its first torch call, inside the solve
        started.set()
        solved.wait(timeout=20)
        seen["after"] = torch.get_num_threads()

    started = threading.Event()
    other = threading.Thread(target=user_thread)

    def start_it(it, err):
        if it == 1:
            other.start()
            assert started.wait(timeout=20)
            seen["solve"] = torch.get_num_threads()

    try:
        sinkhorn_assign(cosine_scores(64, 10, seed=5), 0.05, max_iter=2, tol=None, callback=start_it)
        solved.set()
        other.join(timeout=20)
        assert seen == {"solve": 1, "during": 2, "after": 2}, seen
        assert torch.get_num_threads() == 2
    finally:
        solved.set()
        torch.set_num_threads(saved)


def test_the_pool_workers_run_torch_on_one_thread(monkeypatch):
    """Each worker runs its range beside the others: torch on one thread there. It was the process-wide 1 the solve
    set; the solve now sets only its own thread's, and each worker of a new pool sets its own when it starts."""
    import threading

    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_POOL", None)  # new workers
    saved, seen = torch.get_num_threads(), set()
    torch.set_num_threads(2)

    def ranged(lo, hi):
        seen.add((threading.current_thread().name.startswith("otlabel"), torch.get_num_threads()))
        threading.Event().wait(0.05)  # each range on its own worker

    try:
        with torch_backend.caller_on_one_thread(torch.device("cpu")):
            pool = torch_backend.worker_pool()
            torch_backend.map_pool_ranges(pool, ranged, 1000)
    finally:
        torch.set_num_threads(saved)
    assert pool._max_workers == 2 and seen == {(True, 1)}, seen


def test_the_own_thread_count_is_reached_on_a_linux_openmp_build():
    """The tests of the solve's own-thread count skip where ``_thread_counts()`` is None (builds whose OpenMP runtime
    cannot be reached, which fall back to the process-wide count). On a Linux build with torch's CPU library in its
    folder and OpenMP as its parallel backend (the wheels) it must be reached, or those tests pass by skipping."""
    import sys

    from otlabel.backends import torch_backend

    if not sys.platform.startswith("linux") or "parallel backend: OpenMP" not in torch.__config__.parallel_info():
        pytest.skip("not a Linux build with OpenMP as torch's parallel backend")
    if not (Path(torch.__file__).parent / "lib" / "libtorch_cpu.so").is_file():
        pytest.skip("torch's CPU library is not in torch's folder")
    counts = torch_backend._thread_counts()
    assert counts is not None
    assert (counts[1] is not None) == torch.backends.mkl.is_available()


@pytest.mark.skipif(not Path("/proc/self/maps").is_file(), reason="reads the process's mapped files")
def test_a_torch_cpu_library_that_torch_did_not_load_is_not_loaded(tmp_path, monkeypatch):
    """Found reviewing the own-thread count: torch's CPU library was found by its file name in torch's folder and
    opened with ctypes.CDLL, which loads a file there that is not the one torch loaded (a stale copy, a build that
    loads it from elsewhere) beside it. A second libtorch_cpu aborted the process ('Tried to register multiple backend
    fallbacks for the same dispatch key Conjugate', a copy of this torch's). Only the library already loaded is taken
    now; else None (the solve's process-wide fallback). A small library stands in for the copy here: it was loaded."""
    from otlabel.backends import torch_backend

    small = Path(torch.__file__).parent / "lib" / "libgomp.so.1"  # torch's wheels carry it
    if not small.is_file():
        pytest.skip("no small library to stand in for the copy")
    lib = tmp_path / "torch" / "lib"
    lib.mkdir(parents=True)
    stand_in = lib / "libtorch_cpu.so"
    stand_in.write_bytes(small.read_bytes())
    monkeypatch.setattr(torch, "__file__", str(tmp_path / "torch" / "__init__.py"))
    torch_backend._torch_cpu_library.cache_clear()
    try:
        found = torch_backend._torch_cpu_library()
        with open("/proc/self/maps") as maps:
            mapped = str(stand_in) in maps.read()
    finally:
        monkeypatch.undo()
        torch_backend._torch_cpu_library.cache_clear()
    assert found is None and not mapped, (found, mapped)


@pytest.mark.parametrize("before", [0, 3], ids=["MKL's global count", "its own count"])
def test_the_solving_thread_gets_its_mkl_thread_count_back(before):
    """The solve sets MKL's thread-local count of its thread to 1 besides the OpenMP one, and gives back what was
    there: 0 (the thread follows MKL's global count, as a thread that never called ``torch.set_num_threads``) or its
    own count. Kept at 1, the caller's own matmuls would run on one thread for good; nothing else checks it (torch's
    count reads the OpenMP one only)."""
    from otlabel.backends import torch_backend

    counts = torch_backend._thread_counts()
    if counts is None or counts[1] is None:
        pytest.skip("this torch build's MKL thread-local count is not reachable")
    set_mkl, seen = counts[1], []

    def mkl_local():  # the setter returns the thread's previous setting
        own = set_mkl(1)
        set_mkl(own)
        return own

    own = set_mkl(before)
    try:
        sinkhorn_assign(
            cosine_scores(64, 10, seed=5), 0.05, max_iter=3, tol=None, callback=lambda *_: seen.append(mkl_local())
        )
        assert set(seen) == {1} and mkl_local() == before, (seen, mkl_local())
    finally:
        set_mkl(own)


def test_a_ctrl_c_while_the_solve_probes_its_thread_count_does_not_leave_it_counted_as_running(monkeypatch):
    """Found reviewing the own-thread count: the first solve of a process probes the OpenMP runtime, and that ran
    after the solve was counted as running but before the ``try`` that uncounts it. A Ctrl-C there left
    ``_ACTIVE_SOLVES`` at 1 for good (every later solve then took the count this one read, and none gave MKL its
    dynamic-threads flag back). The probe now runs inside it; nothing set, nothing is given back."""
    from otlabel.backends import torch_backend

    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr(torch_backend, "_thread_counts", interrupted)
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with pytest.raises(KeyboardInterrupt):
            sinkhorn_assign(cosine_scores(64, 10, seed=5), 0.05, max_iter=2, tol=None)
        assert torch_backend._ACTIVE_SOLVES == 0
        assert getattr(torch_backend._SOLVE, "workers", None) is None
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
def test_a_forked_process_solves_after_its_parent(monkeypatch):
    """Found porting: a process forked after a solve (multiprocessing workers, Linux's default start method) inherited
    the CPU worker pool without its threads, and its first solve waited forever. Torch on one thread here: a child
    forked after *any* multi-threaded torch operation in its parent hangs in torch's OpenMP, whatever otlabel does.
    (Scores this small are passed over on the caller's thread unless ``SERIAL_PASS_ELEMENTS`` says otherwise.)"""
    import multiprocessing

    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend, "SERIAL_PASS_ELEMENTS", 0)  # the passes go through the pool, as before
    scores = cosine_scores(400, 6, seed=8)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        want = sinkhorn_assign(scores, 0.05)  # the parent's pool now has a thread
        context = multiprocessing.get_context("fork")
        queue = context.Queue()
        child = context.Process(target=_solve_in_child, args=(queue, scores))
        child.start()
        try:
            labels, codes, streamed = queue.get(timeout=60)
        finally:
            child.join(5)
            if child.is_alive():
                child.kill()
    finally:
        torch.set_num_threads(threads)
    assert labels == streamed == want.labels.tolist() and codes == want.codes.tolist()


@pytest.mark.parametrize("dtype, itemsize", [(torch.float32, 4), (torch.float64, 8)])
def test_the_cached_kernel_is_used_when_it_fits_in_half_the_free_memory(monkeypatch, dtype, itemsize):
    """The CPU cached-kernel operator needs H x N x K scores' worth of memory (4 or 8 bytes each): chosen when that
    is at most half the free memory, the log-domain one otherwise. The tests ran with plenty of memory, so the
    bound, its byte count and its comparison were unchecked. Kernels up to ``KERNEL_ALWAYS_FITS_BYTES`` are cached
    without asking (the read of the free memory cost a tenth of a tiny solve)."""
    import otlabel.backends.torch_backend as torch_backend

    source = DenseSource(random_problem(30, 5, h=2, seed=12).to(dtype))
    kernel_bytes = 2 * 30 * 5 * itemsize
    weights = torch.full((30,), 1 / 30, dtype=dtype)
    for free, chosen in ((2 * kernel_bytes, CachedKernelOperator), (2 * kernel_bytes - 1, LogDomainOperator)):
        monkeypatch.setattr(torch_backend, "available_memory_bytes", lambda free=free: free)
        with monkeypatch.context() as patch:
            patch.setattr(torch_backend, "KERNEL_ALWAYS_FITS_BYTES", kernel_bytes - 1)  # just too large not to ask
            assert type(make_torch_operator(source, 0.1, weights)) is chosen, free
        monkeypatch.setattr(torch_backend, "KERNEL_ALWAYS_FITS_BYTES", kernel_bytes)  # small enough not to ask
        assert type(make_torch_operator(source, 0.1, weights)) is CachedKernelOperator, free


def _cached_and_reference(rows, eps=1.0):
    """A CachedKernelOperator and the float64 reference on the same (1, N, K) scores, uniform sample weights."""
    s = torch.tensor(rows, dtype=torch.float32)[None]
    c = uniform(s.shape[1])
    return CachedKernelOperator(DenseSource(s), eps, c), ReferenceOperator(s, eps, c)


def test_cached_kernel_cold_start_with_a_row_far_below_the_column_maxima():
    """The cold start factors the largest row weight out of exp(log c + m): a row whose best score sits 100 nats
    below every column maximum (m = -100) adds a vanishing weight instead of making the others overflow."""
    op, ref = _cached_and_reference([[0.0, 0.0], [-100.0, -100.0]])
    assert_close(op.cluster_lse(None), ref.cluster_lse(None), atol=1e-5, rtol=1e-6, what="cold-start LSE")


def test_cached_kernel_is_rebuilt_around_potentials_that_drifted_past_the_threshold():
    """b moved 30 and 80 nats from the kernel's b0: the kernel is rebuilt around b. Read from the old kernel, the
    entry that now leads row 0 (e^-100 there: a float32 subnormal, read as 0) drops out of the row's normaliser,
    and both cluster LSEs come out 10 nats off."""
    op, ref = _cached_and_reference([[0.0, -100.0], [-200.0, 0.0]])
    op.cluster_lse(None)  # the kernel around b0 = (0, 0)
    b = torch.tensor([[-30.0, 80.0]], dtype=torch.float64)
    assert_close(op.cluster_lse(b), ref.cluster_lse(b), atol=1e-5, rtol=1e-6, what="LSE after drift")


def test_cached_kernel_labels_take_the_exact_pass_for_drifted_or_closed_clusters():
    """The argmax read of the kernel is right only while b stays near the kernel's b0. Row 0 leads in cluster 1 at
    b = (0, -110, 0), but its entry there is e^-120 in the kernel (0 in float32): every G v entry of the row is 0.
    A closed cluster (b = -inf) counts as drift too: row 2's only non-zero kernel entry sits in it."""
    rows = [[-120.0, 0.0, -130.0], [0.0, -5.0, -5.0], [-115.0, -110.0, 0.0], [-5.0, -5.0, 0.0]]
    op, ref = _cached_and_reference(rows)
    op.cluster_lse(None)  # the kernel around b0 = (0, 0, 0)
    for b in ([0.0, -110.0, 0.0], [0.0, 0.0, float("-inf")]):
        b = torch.tensor([b], dtype=torch.float64)
        assert torch.equal(op.assign(b, want_codes=False)[0], ref.assign(b, want_codes=False)[0]), b


@pytest.mark.skipif(not cpu_kernels.available(), reason="the labels' fast read from the kernel is a compiled loop")
def test_cached_kernel_labels_read_the_kernel_only_while_it_stands_and_no_codes_are_asked(monkeypatch):
    """Near b0 the labels are the kernel's argmax (no exact pass); codes, and a released kernel, take the exact
    pass (the fast read has no codes, and no kernel to read)."""
    op, ref = _cached_and_reference([[0.0, -1.0, -3.0], [-2.0, 0.0, -1.0], [-1.0, -2.0, 0.0], [0.0, -0.5, -0.2]])
    op.cluster_lse(None)
    b = torch.tensor([[0.0, -1.0, 0.5]], dtype=torch.float64)
    want_labels, want_codes = ref.assign(b, want_codes=True)
    exact_assign, exact_calls = op.exact.assign, []
    monkeypatch.setattr(op.exact, "assign", lambda *args: (exact_calls.append(args), exact_assign(*args))[1])
    labels, codes = op.assign(b, want_codes=False)
    assert torch.equal(labels, want_labels) and codes is None and not exact_calls
    labels, codes = op.assign(b, want_codes=True)
    assert torch.equal(labels, want_labels) and codes is not None
    assert_close(codes, want_codes, atol=1e-6, rtol=1e-5, what="codes")
    op.release()
    assert torch.equal(op.assign(b, want_codes=False)[0], want_labels)


class SequentialSource(DenseSource):
    """A source that must be read in order from one thread (as a staged CUDA stream): its reads are logged."""

    random_access = False

    def __init__(self, scores):
        super().__init__(scores)
        self.reads = []  # (thread, first row, end row) per chunk handed out

    def chunk(self, rows):
        import threading

        self.reads.append((threading.get_ident(), rows.start, rows.stop))
        return super().chunk(rows)


@pytest.mark.filterwarnings("error")  # a chunk that did not fit its buffer: torch warns as it resizes the output
def test_a_sequential_source_is_read_in_order_on_the_callers_thread():
    """The log-domain passes over a source without random access (on a GPU: the staged stream) run as one range from
    row 0, on the caller's thread, in chunks of at most ``chunk_elements``: any other thread, order or start would
    break such a source. On a CPU every test source was random-access, so nothing read one."""
    import threading

    s = random_problem(30, 5, h=2, seed=3)
    s[1, 9, 2] = float("-inf")  # a forbidden pair: it takes no mass and adds nothing to the transport score
    c = random_weights(30, 4)
    source = SequentialSource(s)
    op, ref = LogDomainOperator(source, 0.1, c, chunk_elements=7 * 2 * 5), ReferenceOperator(s, 0.1, c)
    b = torch.randn(2, 5, dtype=torch.float64)
    assert_close(op.cluster_lse(b), ref.cluster_lse(b), atol=1e-5, rtol=1e-6, what="cluster LSE")
    labels, codes = op.assign(b, want_codes=True)
    want_labels, want_codes = ref.assign(b, want_codes=True)
    assert torch.equal(labels, want_labels)
    assert_close(codes, want_codes, atol=1e-6, what="codes")
    assert_close(op.transport_score(b), ref.transport_score(b), atol=1e-7, rtol=1e-6, what="transport score")
    passes = [source.reads[i : i + 5] for i in range(0, len(source.reads), 5)]
    assert len(source.reads) == 3 * 5 and all(len(p) == 5 for p in passes), source.reads  # 3 passes of 5 chunks
    for reads in passes:
        assert [(lo, hi) for _, lo, hi in reads] == [(0, 7), (7, 14), (14, 21), (21, 28), (28, 30)], reads
        assert {thread for thread, _, _ in reads} == {threading.get_ident()}


def test_log_domain_pass_rescues_a_cluster_that_underflowed_entirely():
    """Far from convergence at a small epsilon a whole cluster can lie > 87 nats below every row's maximum: its
    column of exp(S / eps + b - m) underflows to 0 and the pass is redone exactly, in log-sum-exps. A pass that kept
    the zeros would answer LSE = -inf (an empty cluster) for one holding mass e^-150 of every row."""
    s = torch.zeros(1, 12, 3)
    s[0, :, 0] = 1.5  # at eps = 0.01, 150 nats above the other two clusters in every row
    s[0, :4, 2] = 1.0  # cluster 2 within 87 nats for some rows: only cluster 1 underflows
    c = uniform(12)
    op, ref = OPERATORS["log-domain"](s, 0.01, c), ReferenceOperator(s, 0.01, c)
    b = torch.zeros(1, 3, dtype=torch.float64)
    got, want = op.cluster_lse(b), ref.cluster_lse(b)
    assert torch.isfinite(got).all(), got
    assert_close(got, want, atol=1e-4, rtol=1e-6, what="cluster LSE with an underflowed cluster")


def test_log_domain_pass_stays_exact_when_the_potentials_jump_past_the_reference():
    """The pass forms exp(S / eps + b_ref - m) * exp(b - b_ref) around a reference that is reset per cluster once b
    leaves it by more than REFERENCE_DRIFT nats; b jumping by 120 (exp(120) overflows float32) must reset it, in either
    direction, whatever the sign of b."""
    s = random_problem(20, 4, h=1, seed=5)
    c = uniform(20)
    op, ref = OPERATORS["log-domain"](s, 0.5, c), ReferenceOperator(s, 0.5, c)
    b = torch.tensor([[60.0, -60.0, 60.0, -60.0]], dtype=torch.float64)
    for potentials in (b, -b, b):
        got, want = op.cluster_lse(potentials), ref.cluster_lse(potentials)
        assert_close(got, want, atol=1e-4, rtol=1e-6, what=f"cluster LSE at b = {potentials.tolist()}")


def test_a_cluster_no_sample_here_may_reach_keeps_the_fast_pass(monkeypatch):
    """In a sharded solve a rank may hold no sample allowed in some cluster that other ranks fill: its local column
    is empty (LSE -inf) while b is finite. That is no underflow, and must not send every pass to the exact one."""
    s = random_problem(16, 4, h=1, seed=6)
    s[0, :, 1] = float("-inf")
    c = uniform(16)
    op, ref = OPERATORS["log-domain"](s, 0.1, c), ReferenceOperator(s, 0.1, c)
    b = torch.randn(1, 4, dtype=torch.float64)
    monkeypatch.setattr(op, "_cluster_lse_exact", lambda b: pytest.fail("took the exact pass"))
    got = op.cluster_lse(b)
    assert got[0, 1] == float("-inf")
    assert_close(got, ref.cluster_lse(b), atol=1e-5, rtol=1e-6, what="cluster LSE")


def test_a_ranges_work_buffer_holds_one_chunk():
    """Each range of rows gets one buffer, the size of its first (largest) chunk, whatever row the range starts at:
    extra memory stays one chunk per thread. Results cannot show an oversized buffer."""
    s = random_problem(30, 5, h=2, seed=3)
    op = LogDomainOperator(DenseSource(s), 0.1, uniform(30), chunk_elements=7 * 2 * 5)
    for lo, hi in ((0, 30), (15, 30), (28, 30)):
        buffer = op.work_buffer(lo, hi)
        for rows in op.chunks(lo, hi):
            view = buffer(rows)
            assert view.shape == (2, rows.stop - rows.start, 5)
            assert view.untyped_storage().nbytes() == 2 * min(7, hi - lo) * 5 * 4, (lo, hi)


@pytest.mark.parametrize(
    "h, n, k", [(1, 50_000, 3), (2, 40_099, 7), (1, 1000, 2048), (3, 10, 5), (1, 1, 1), (2000, 10, 7)]
)
def test_column_max_is_amax_over_the_samples(h, n, k):
    """Rows of few clusters are reduced in blocks (a row count no block size divides included; fewer rows than a block
    under many heads): the same maxima as ``amax(dim=1)``, -inf of a masked column and NaN propagated as there, on
    contiguous and strided scores."""
    s = torch.randn(h, n, k, generator=torch.Generator().manual_seed(n))
    s[:, :, 0] = float("-inf")  # a column no sample may reach
    if n > 1:
        s[0, n - 1, -1] = 50.0  # the largest entry in the last (unblocked) rows
    assert torch.equal(column_max(s), s.amax(dim=1))
    strided = torch.randn(h, k, n).transpose(1, 2)  # not contiguous: torch's own reduction
    assert torch.equal(column_max(strided), strided.amax(dim=1))
    s[-1, n // 2, k // 2] = float("nan")
    assert torch.equal(torch.isnan(column_max(s)), torch.isnan(s.amax(dim=1)))
    assert bool(torch.isnan(column_max(s)[-1, k // 2]))


def test_concurrent_cpu_solves_keep_the_processs_thread_count():
    """torch's thread count is partly process-wide (a thread's first torch call takes the last count set anywhere):
    a solve that began while another held the count at 1 read 1, split its passes into one range instead of one per
    thread (other rounding: codes 1.9e-5 off a serial solve of the same scores) and, ending last, restored 1 for good.
    Here B enters while A is inside, A leaves first."""
    import threading

    from otlabel.backends import torch_backend

    cpu, saved = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(2)
    inside, a_left = threading.Barrier(2), threading.Event()
    seen = {}

    def solve(name):
        with torch_backend.caller_on_one_thread(cpu):
            seen[name] = torch_backend._SOLVE.workers
            inside.wait(timeout=10)
            if name == "a":
                a_left.set()
                return
            a_left.wait(timeout=10)
        seen["b after"] = torch.get_num_threads()

    try:
        threads = [threading.Thread(target=solve, args=(name,)) for name in ("a", "b")]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=20)
        fresh = {}
        checker = threading.Thread(target=lambda: fresh.setdefault("threads", torch.get_num_threads()))
        checker.start()
        checker.join()
        assert seen == {"a": 2, "b": 2, "b after": 2}, seen
        assert torch.get_num_threads() == 2 and fresh["threads"] == 2
    finally:
        torch.set_num_threads(saved)


def test_a_cpu_solve_gives_mkl_its_dynamic_threads_flag_back():
    """torch.set_num_threads turns MKL's dynamic threads off for good, so restoring the caller's thread count left MKL
    running every later call on all threads: after one solve, the caller's float32 exp of 64 x 10 (MKL VML) opened an
    OpenMP region, 6.5 ms (median) instead of 4 us on a busy 2-core machine (benchmarks/threads_after_solve.py). The
    flag is now what the solve found, on or off; the thread count too."""
    from otlabel.backends import torch_backend

    found = torch_backend.mkl_dynamic()
    if found is None:
        pytest.skip("MKL's dynamic-threads flag cannot be read in this torch build")
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for flag in (True, False):
            torch_backend.set_mkl_dynamic(flag)
            sinkhorn_assign(cosine_scores(64, 10, seed=5), 0.05)
            assert torch_backend.mkl_dynamic() is flag
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(saved)
        torch_backend.set_mkl_dynamic(found)


def test_concurrent_cpu_solves_give_mkl_its_dynamic_threads_flag_back_when_the_last_ends():
    """MKL's flag is process-wide, and a thread's first torch call sets torch's count again (the count last set
    anywhere), which turns the flag off: read after the solve's own first call, a solve begun on a new thread found the
    flag off and gave back off. Solves on two new threads, B entering while A is inside, A leaving first: the flag is
    given back as it was before them."""
    import threading

    from otlabel.backends import torch_backend

    found = torch_backend.mkl_dynamic()
    if found is None:
        pytest.skip("MKL's dynamic-threads flag cannot be read in this torch build")
    cpu, saved = torch.device("cpu"), torch.get_num_threads()
    torch.set_num_threads(2)
    torch_backend.set_mkl_dynamic(True)
    inside, a_left = threading.Barrier(2), threading.Event()

    def solve(name):
        with torch_backend.caller_on_one_thread(cpu):
            inside.wait(timeout=10)
            if name == "a":
                return
            a_left.wait(timeout=10)

    try:
        a, b = (threading.Thread(target=solve, args=(name,)) for name in ("a", "b"))
        a.start()
        b.start()
        a.join(timeout=20)
        a_left.set()
        b.join(timeout=20)
        assert not a.is_alive() and not b.is_alive()
        assert torch_backend.mkl_dynamic() is True
    finally:
        torch.set_num_threads(saved)
        torch_backend.set_mkl_dynamic(found)


def test_the_column_maxima_are_computed_once_per_solve(monkeypatch):
    """Validation computes the scores' column maxima; the CPU cached-kernel operator starts from the same (H, K)
    values rather than a second pass over the scores (18 ms at 100,000 x 1,000), with epsilon scaling too."""
    import otlabel.problem as problem
    import otlabel.sources as sources

    original, calls = sources.column_max, []

    def counted(scores):
        calls.append(tuple(scores.shape))
        return original(scores)

    monkeypatch.setattr(problem, "column_max", counted)
    monkeypatch.setattr(sources, "column_max", counted)
    s = cosine_scores(500, 12, seed=4)
    want = sinkhorn_assign(s, 0.05, backend="reference")
    calls.clear()
    for kwargs in ({}, {"epsilon_scaling": 0.5}):
        res = sinkhorn_assign(s, 0.05, **kwargs)
        assert torch.equal(res.labels, want.labels)
    assert calls == [(1, 500, 12), (1, 500, 12)], calls  # one pass per solve


INTERRUPTED_START = """
import sys, threading
import numpy as np
mode, path = sys.argv[1], sys.argv[2]
original = threading.Thread.start
def start(self):  # Ctrl-C arriving while a worker thread starts: the main thread waits in Thread.start
    original(self)
    if self.name.startswith("otlabel"):
        threading.Thread.start = original
        raise KeyboardInterrupt
threading.Thread.start = start
if mode == "cli":
    from otlabel.cli import main
    sys.exit(main(["assign", path, "--out", path + ".labels.npy", "-q"]))
import torch
from otlabel import sinkhorn_assign, sinkhorn_assign_stream
solve = sinkhorn_assign if mode == "api" else sinkhorn_assign_stream
scores = torch.from_numpy(np.load(path))
try:
    solve(scores, 0.05)
except KeyboardInterrupt:
    sys.exit(130)  # no further solve: its submits would wake the stray thread and hide the hang
sys.exit(1)
"""


@pytest.mark.parametrize("mode", ["cli", "api", "stream"])
def test_an_interrupt_while_a_worker_thread_starts_lets_the_process_exit(tmp_path, mode):
    """otlabel assign given one SIGINT ~1.4 s in printed 'interrupted; no output written' and then hung for good: the
    interrupt had come while ThreadPoolExecutor.submit waited for a new worker thread to start, the pool had not
    recorded that thread, so nothing ever told it to stop, and the interpreter joins such threads at exit. The same
    in Python (sinkhorn_assign, sinkhorn_assign_stream). Here the interrupt is raised at that point every time."""
    import subprocess
    import sys

    path = tmp_path / "s.npy"
    np.save(path, np.random.default_rng(0).standard_normal((20_000, 50)).astype(np.float32))
    script = tmp_path / "interrupted.py"
    script.write_text(INTERRUPTED_START)
    # two threads, so that the passes go through the worker pool on a machine of any size
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="2")
    try:
        done = subprocess.run([sys.executable, str(script), mode, str(path)], env=env, capture_output=True, text=True,
                              timeout=120)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after the interrupt (a worker thread left waiting)")
    assert done.returncode == 130, done.stderr
    assert not (tmp_path / "s.npy.labels.npy").exists()


def interrupt_the_next_thread_start(monkeypatch) -> None:
    """A Ctrl-C arriving while a pool starts its next thread: that thread runs, then ``Thread.start`` raises."""
    import threading

    original = threading.Thread.start

    def interrupted_start(thread):
        original(thread)
        monkeypatch.setattr(threading.Thread, "start", original)
        raise KeyboardInterrupt

    monkeypatch.setattr(threading.Thread, "start", interrupted_start)


def test_a_solve_after_an_interrupted_pool_start_runs_on_a_new_pool(monkeypatch):
    """After the interrupt above, the pool is shut down and forgotten: the next solve makes a new one and converges."""
    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_POOL", None)
    monkeypatch.setattr(torch_backend, "solve_threads", lambda: 2)
    interrupt_the_next_thread_start(monkeypatch)
    pool = torch_backend.worker_pool()
    with pytest.raises(KeyboardInterrupt):
        torch_backend.map_pool_ranges(pool, lambda lo, hi: hi - lo, 10)
    assert pool._shutdown and torch_backend._POOL is None
    assert torch_backend.map_pool_ranges(torch_backend.worker_pool(), lambda lo, hi: hi - lo, 10) == [5, 5]


def test_a_pass_holding_the_pool_an_interrupt_shut_down_runs_on_a_new_one(monkeypatch):
    """Solves on two threads share the pool. The interrupt above shut it down from the main thread while another
    thread's pass had taken it and not yet submitted all its ranges: that pass raised "cannot schedule new futures
    after shutdown" (a solve that had nothing to do with the interrupt failed). Its ranges now go to the new pool."""
    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend, "_POOL", None)
    monkeypatch.setattr(torch_backend, "solve_threads", lambda: 2)
    held = torch_backend.worker_pool()  # the other thread's pass has the pool in hand
    interrupt_the_next_thread_start(monkeypatch)
    with pytest.raises(KeyboardInterrupt):  # the main thread's solve, interrupted while the pool starts a thread
        torch_backend.submit(held, lambda: None)
    assert held._shutdown
    assert torch_backend.map_pool_ranges(held, lambda lo, hi: hi - lo, 10) == [5, 5]
    assert torch_backend._POOL is not held and not torch_backend._POOL._shutdown


INTERRUPTED_H2D_START = """
import sys, threading
from concurrent.futures import ThreadPoolExecutor
from otlabel.host_sources import HostStream
original = threading.Thread.start
def start(self):  # Ctrl-C arriving while the staging thread starts
    original(self)
    if self.name.startswith("otlabel-h2d"):
        threading.Thread.start = original
        raise KeyboardInterrupt
threading.Thread.start = start
# only what _submit uses: a staged HostStream needs CUDA (pinned buffers, a side stream)
stream = HostStream.__new__(HostStream)
stream.worker = old = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otlabel-h2d")
stream.next_slot, stream.released, stream.pending = 0, [None, None], None
stream._stage = lambda rows, slot, released: (rows, slot)
try:
    stream._submit(slice(0, 10))
except KeyboardInterrupt:
    if sys.argv[1] == "again":  # the stream can stage again, on a new worker
        stream._submit(slice(10, 20))
        assert stream.pending[2].result() == (slice(10, 20), 1), stream.pending
        assert old._shutdown and stream.worker is not old
    sys.exit(130)
sys.exit(1)
"""


@pytest.mark.parametrize("mode", ["exit", "again"])
def test_an_interrupt_while_the_staging_thread_starts_lets_the_process_exit(tmp_path, mode):
    """HostStream's otlabel-h2d worker (streamed scores or features copied to a GPU) had the race of the pool's
    threads above: an interrupt while its thread started left that thread waiting for good, and the process hung at
    exit. Its _submit goes through torch_backend.submit now, and the stream replaces the worker shut down there."""
    import subprocess
    import sys

    script = tmp_path / "interrupted_h2d.py"
    script.write_text(INTERRUPTED_H2D_START)
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    try:
        done = subprocess.run([sys.executable, str(script), mode], env=env, capture_output=True, text=True,
                              timeout=60)  # fmt: skip
    except subprocess.TimeoutExpired:
        pytest.fail("the process did not exit after the interrupt (the staging thread left waiting)")
    assert done.returncode == 130, done.stderr
