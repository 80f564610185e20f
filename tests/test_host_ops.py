"""How many torch operations the solver loop issues around the passes over the scores.

A small solve on a GPU (a SwAV batch: 3 iterations, ``tol=None``) is bound by host time, and every torch operation
costs ~10-25 us of it (benchmarks/op_count.py counts a whole call). Here the loop alone is counted, over an operator
whose pass issues no operation of its own, with a dispatch mode that sees each operation that reaches torch's
dispatcher (views included; a no-op ``.to()`` and a ``.tolist()`` are not seen). The budgets are today's counts:
a change that adds an operation to every iteration shows here. Also the arithmetic the counts rest on: the
marginal error from the pass's log-sum-exp, and the finiteness check read from the potentials' sums.
"""

import collections
import math
import multiprocessing
import os

import pytest
import torch
from helpers import cosine_scores
from torch.utils._python_dispatch import TorchDispatchMode

from otlabel import cached, sinkhorn_assign
from otlabel.backends import cpu_kernels
from otlabel.backends.base import ScoreOperator
from otlabel.backends.torch_backend import CachedKernelOperator
from otlabel.problem import dense_tensor
from otlabel.solver import (
    ANDERSON,
    ClusterMarginal,
    centred,
    marginal_error,
    read_back,
    run_sinkhorn,
    worst_per_iteration,
)


class FixedPass(ScoreOperator):
    """An operator whose every pass returns the same (H, K) log-sum-exp, computed beforehand: no operation."""

    takes_float64_potentials = True

    def __init__(self, lse: torch.Tensor):
        self.lse = lse
        self.n_heads, self.n_clusters = lse.shape
        self.n_samples, self.device, self.dtype = 1, lse.device, torch.float64

    def cluster_lse(self, b):
        return self.lse

    def assign(self, b, want_codes):
        raise NotImplementedError

    def transport_score(self, b):
        raise NotImplementedError


class CountOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def loop_ops(max_iter: int, tol=None, heads: int = 1, k: int = 30, acceleration=1.0, zero_weight=False) -> list[str]:
    lse = torch.randn(heads, k, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    operator, r = FixedPass(lse), torch.full((k,), 1 / k, dtype=torch.float64)
    if zero_weight:
        r[0], r[1:] = 0.0, 1 / (k - 1)
    run = (operator, r, None, max_iter, tol, acceleration)
    run_sinkhorn(*run, has_zero_weights=zero_weight)  # constants made once, not counted
    with CountOps() as counter:
        run_sinkhorn(*run, has_zero_weights=zero_weight)
    return counter.ops


@pytest.mark.parametrize("heads", [1, 3])
def test_a_fixed_iteration_loop_issues_at_most_seven_operations_an_iteration(heads):
    """Per iteration after the cold start: b_new = log r - lse (1), the marginal error ||exp(b + lse) - r||_1 (4),
    the centring (2: the sum, then addcdiv). Per solve: log r (1; the clusters' count is made once per size and
    device), the cold start's step and centring (3), the final read-back (b's sums and the concatenation, 2). Before:
    10 an iteration (the error took 6, the centring 3) and 34 for 3 iterations (the cold start's inf error made on the
    device, the history's maxima and the finiteness check on it), then 21 (the count made every solve)."""
    per_iteration = (len(loop_ops(13, heads=heads)) - len(loop_ops(3, heads=heads))) / 10
    # At most: a torch that dispatches an operation in fewer calls passes; one more operation in the loop fails
    assert per_iteration <= 7, loop_ops(4, heads=heads)
    assert len(loop_ops(3, heads=heads)) <= 1 + 3 + 2 * 7 + 2, loop_ops(3, heads=heads)


def test_a_loop_to_a_tolerance_issues_at_most_nine_operations_an_iteration():
    """With a tol, each iteration also reads its error back with b_new's sums (sum, concatenation): 9, where the
    worst head's maximum, the finiteness check (4 operations) and the old error made it 16."""
    per_iteration = (len(loop_ops(13, tol=1e-300)) - len(loop_ops(3, tol=1e-300))) / 10
    assert per_iteration <= 9, loop_ops(4, tol=1e-300)


@pytest.mark.parametrize("heads, zero_weight, budget", [(1, False, 67), (3, False, 67), (1, True, 81)])
def test_a_mixed_loop_issues_at_most_67_operations_an_iteration(heads, zero_weight, budget):
    """Anderson mixing (the default with a tol) with a full history: the loop's 9 and the mixer's 58 (17 and 64 with a
    zero-weight cluster: the masking). Before: 79 and 95: the history kept as lists besides the stacked differences,
    a negation of the least squares' move, the forward test's weights by hand (a minimum, an exp, a sum, a division,
    and a masking with zero weights; one softmax now), a where with 0 (two operations where a product with the bool
    is one), the plateau's stride from a run count (a where, exp2 of it less 1; now doubled in one addcmul), a
    transpose taken twice and the verdict reshaped for the read-back."""
    mixed = {"acceleration": ANDERSON, "tol": 1e-300, "heads": heads, "zero_weight": zero_weight}
    per_iteration = (len(loop_ops(23, **mixed)) - len(loop_ops(13, **mixed))) / 10  # after 13, the history is full
    assert per_iteration <= budget, collections.Counter(loop_ops(23, **mixed)) - collections.Counter(
        loop_ops(13, **mixed)
    )


def cpu_call_ops(max_iter: int, heads: int = 1) -> list[str]:
    """The torch operations of a small CPU call as a trainer makes it: ``sinkhorn_assign`` on 64 x 10 cosine scores
    (``heads`` copies), ``tol=None``, then ``labels`` and ``codes``; counted on a second call (the first makes the
    constants kept per size: the default weights, their logarithms, the clusters' count)."""
    scores = cosine_scores(64, 10, seed=3)
    scores = scores if heads == 1 else torch.stack([scores] * heads)

    def call():
        res = sinkhorn_assign(scores, 0.05, max_iter=max_iter, tol=None)
        res.labels, res.codes  # noqa: B018 (read as a trainer reads them)

    call()
    with CountOps() as counter:
        call()
    return counter.ops


@pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="counts the compiled passes (Numba); the PyTorch fallback's take their products per head and tile (135 "
    "operations here, 184 with 3 heads)",
)
@pytest.mark.parametrize("heads", [1, 3])
def test_a_small_cpu_call_issues_at_most_105_operations(heads):
    """A SwAV batch on the CPU (3 iterations, labels and codes) is bound by its torch operations, ~3 us each: 64 x 10
    took ~0.6 ms against ~0.12 ms for the SwAV loop, in 158 operations (153 with 3 heads). The cached kernel's passes
    tested on the host whether every cluster is reachable (they all are, but where a rank of a sharded solve holds no
    sample of one) and masked the others, every iteration; the default weights, their float32 copy and logarithms and
    the clusters' count were made anew every call; the kernel and the weights were converted to NumPy every pass. Now
    105 (100 with 3 heads), the same labels and codes bitwise."""
    assert len(cpu_call_ops(3, heads)) <= 105, collections.Counter(cpu_call_ops(3, heads))


@pytest.mark.skipif(not cpu_kernels.available(), reason="the compiled steps need Numba")
@pytest.mark.parametrize("heads", [1, 3])
def test_a_small_cpu_call_takes_its_steps_without_a_torch_operation(heads):
    """With Numba, a small solve's plain steps run in one compiled call (CachedKernelOperator.plain_steps): no torch
    operation an iteration where there were 21 (below), and 59 for the whole 3-iteration call where there were 105
    (54 with 3 heads, 100 before)."""
    assert len(cpu_call_ops(13, heads)) == len(cpu_call_ops(3, heads)), collections.Counter(cpu_call_ops(4, heads))
    assert len(cpu_call_ops(3, heads)) <= 59, collections.Counter(cpu_call_ops(3, heads))


@pytest.mark.skipif(
    not cpu_kernels.available(),
    reason="counts the compiled pass (Numba); the PyTorch fallback's takes its products per tile (31 an iteration)",
)
def test_a_cached_kernel_iteration_issues_at_most_21_operations(monkeypatch):
    """Per iteration after the cold start, on the CPU's cached kernel (the loop's 7 included): 36 before (the masking
    of unreachable clusters and of non-finite potentials, and two NumPy conversions), now 21. (The torch steps: with
    Numba a small solve takes its steps compiled, above.)"""
    monkeypatch.setattr(CachedKernelOperator, "takes_plain_steps", lambda self: False)
    per_iteration = (len(cpu_call_ops(13)) - len(cpu_call_ops(3))) / 10
    assert per_iteration <= 21, collections.Counter(cpu_call_ops(4))


def test_constants_kept_per_size_are_made_outside_inference_mode():
    """The default weights, their float32 copy and logarithms and the clusters' count, kept per size and device (they
    were 6 of a small call's operations), are made outside inference mode even when the first call of a size runs
    inside it: an inference tensor kept for later calls could not be saved for backward outside it. They hold what a
    call made before; sizes above MAX_CACHED_SIZE are made anew every call."""
    n, cpu = 4099, torch.device("cpu")  # a size no other test uses
    with torch.inference_mode():
        res = sinkhorn_assign(torch.randn(n, 3), 0.5, max_iter=3, tol=None)
    kept = cached.uniform_weights(n, cpu)
    assert kept is res._sample_weights and torch.equal(kept, torch.full((n,), 1 / n, dtype=torch.float64))
    as_float32 = cached.uniform_weights(n, cpu, torch.float32, log=True)
    assert torch.equal(as_float32, kept.float().log())
    assert not any(t.is_inference() for t in (kept, as_float32, cached.count(3, cpu)))
    big = cached.MAX_CACHED_SIZE + 1
    assert cached.uniform_weights(big, cpu) is not cached.uniform_weights(big, cpu)


def test_constants_for_a_device_without_an_index_are_not_kept():
    """'cuda' means the current device, which may differ from one call to the next (torch.cuda.set_device, a thread
    per GPU): a tensor kept under 'cuda' was made on cuda:0 and handed to a later call meant for cuda:1
    (sinkhorn_assign_stream(..., device='cuda') passes the device as named). Such devices are not kept; shown with
    the meta device, which has no index either. The CPU's are kept."""
    meta, cpu = torch.device("meta"), torch.device("cpu")
    assert cached.uniform_weights(7, meta) is not cached.uniform_weights(7, meta)
    assert cached.uniform_weights(7, meta, torch.float32, log=True) is not cached.uniform_weights(7, meta, log=True)
    assert cached.count(7, meta) is not cached.count(7, meta)
    assert cached.uniform_weights(7, cpu) is cached.uniform_weights(7, cpu)
    assert cached.count(7, cpu) is cached.count(7, cpu)


def test_constants_made_inside_not_kept_are_the_callers_own():
    """Inside cached.not_kept() (a CUDA graph's capture) every constant is new and the cache is left as it was."""
    cpu = torch.device("cpu")
    kept = cached.uniform_weights(9, cpu)
    with cached.not_kept():
        own = cached.uniform_weights(9, cpu)
        assert own is not kept and cached.count(9, cpu) is not cached.count(9, cpu)
        assert cached.uniform_weights(4111, cpu) is not cached.uniform_weights(4111, cpu)
    assert torch.equal(own, kept) and cached.uniform_weights(9, cpu) is kept
    assert ("uniform", 4111, cpu, torch.float64, False) not in cached._ENTRIES


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_child_forked_while_the_cache_is_locked_can_still_make_constants():
    """A fork (a DataLoader's workers) while another thread held the cache's lock left the child's copy held for good:
    its first solve of a size not kept yet hung. The child gets a lock of its own."""
    child = multiprocessing.get_context("fork").Process(target=cached.uniform_weights, args=(4103, torch.device("cpu")))
    with cached._LOCK:  # as another thread would hold it
        child.start()
    child.join(timeout=30)
    hung = child.is_alive()
    if hung:
        child.kill()
        child.join()
    assert not hung and child.exitcode == 0, "the forked child hung on the cache's lock" if hung else child.exitcode


def test_the_marginal_error_from_the_log_sum_exp_is_the_definition():
    """sum_k r_k |exp(b - b_new) - 1| with b_new = log r - lse, per head; zero-weight clusters (b = -inf) count 0."""
    g = torch.Generator().manual_seed(1)
    r = torch.rand(7, dtype=torch.float64, generator=g)
    r[[2, 5]] = 0.0
    r /= r.sum()
    clusters = ClusterMarginal.of(r)
    lse = torch.randn(3, 7, dtype=torch.float64, generator=g)
    b_new = torch.where(clusters.empty, -math.inf, clusters.log_r - lse)
    b = torch.where(clusters.empty, -math.inf, b_new + 0.3 * torch.randn(3, 7, dtype=torch.float64, generator=g))
    ratio = torch.where(clusters.empty, 1.0, torch.exp(b - b_new))
    want = (r * (ratio - 1).abs()).sum(dim=-1)
    got = marginal_error(b, lse.float(), clusters)  # a float32 pass's result, as the kernels return it
    assert got.dtype == torch.float64 and torch.allclose(got, want, rtol=1e-6, atol=0), (got, want)
    assert torch.allclose(marginal_error(b, lse, clusters), want, rtol=1e-13, atol=0)


def test_the_read_back_refuses_non_finite_potentials_of_weighted_clusters_only():
    empty = torch.tensor([False, True, False])
    values = [torch.tensor([0.5, 0.25], dtype=torch.float64)]
    assert read_back(values, torch.tensor([[1.0, -math.inf, -1.0]], dtype=torch.float64), empty) == [0.5, 0.25]
    for bad in (math.inf, -math.inf, math.nan):
        with pytest.raises(ValueError, match="non-finite"):
            read_back(values, torch.tensor([[1.0, 0.0, 0.0], [0.0, 0.0, bad]], dtype=torch.float64), empty)
    with pytest.raises(ValueError, match="non-finite"):  # no mask given: every cluster has weight
        read_back([], torch.tensor([[1.0, -math.inf, -1.0]], dtype=torch.float64), None)


def test_the_worst_head_of_each_iteration_carries_nan():
    assert worst_per_iteration([0.1, 0.3, 0.2, 0.05], 2) == [0.3, 0.2]
    worst = worst_per_iteration([0.1, math.nan, math.nan, 0.2], 2)
    assert all(math.isnan(x) for x in worst)
    assert worst_per_iteration([0.4, 0.2], 1) == [0.4, 0.2]


def test_the_centring_in_one_operation_is_bitwise_the_mean_subtracted():
    g = torch.Generator().manual_seed(2)
    for weights in (
        torch.full((9,), 1 / 9, dtype=torch.float64),
        torch.tensor([0.5, 0, 0.25, 0, 0.25], dtype=torch.float64),
    ):
        clusters = ClusterMarginal.of(weights, has_zero_weights=bool((weights == 0).any()))
        b = 1e3 * torch.randn(4, weights.shape[0], dtype=torch.float64, generator=g)
        b = torch.where(weights == 0, -math.inf, b)
        mean = torch.where(weights == 0, 0.0, b).sum(dim=-1, keepdim=True) / clusters.count
        assert torch.equal(centred(b, clusters), b - mean)


def test_tensors_are_detached_and_resolved_only_where_needed():
    """A tensor that neither requires grad nor carries the negative bit is taken as it is (no torch call)."""
    x = torch.randn(3, 4)
    assert dense_tensor(x, "scores") is x
    w = torch.randn(3, 4, requires_grad=True)
    assert not dense_tensor(w, "scores").requires_grad
    z = torch.randn(3, 4, dtype=torch.complex64).conj().imag  # a view with the negative bit
    got = dense_tensor(z, "scores")
    assert z.is_neg() and not got.is_neg() and torch.equal(got, z)
