"""How often a solve reads device values back to the host.

On a GPU every such read (``bool(t)``, ``t.item()``, ``t.tolist()``, ``int(t)``, ``float(t)``) waits for the whole
queue to drain; a small solve (a SwAV batch, 3 iterations) is then bound by those waits instead of by its kernels.
The budget: one read to validate the inputs (two with a warm start), none inside a fixed-iteration loop, one at
the end (the error history and a finiteness check together), and one per iteration when solving to a tolerance
(Anderson mixing included); the torch backend on a GPU reads once more per iteration (its underflow check).
Weights given by the user are checked on the host after one transfer (a synchronisation on a GPU that the CPU
counter below does not see).

On the CPU the reads are counted by wrapping the tensor methods that convert to Python values and keeping the
calls made from otlabel's own code; on a GPU, ``torch.cuda.set_sync_debug_mode`` counts the real synchronisations.
"""

import collections
import sys
import warnings
from pathlib import Path

import pytest
import torch
from helpers import random_problem

from otlabel import sinkhorn_assign

ROOT = Path(__file__).resolve().parents[1]
OWN_CODE = (str(ROOT / "otlabel"), str(ROOT / "kernels"))
READS = ("__bool__", "item", "tolist", "__int__", "__float__", "__index__")


@pytest.fixture
def host_reads(monkeypatch):
    """A Counter of 'method file:line' for each tensor-to-Python conversion made by otlabel's code."""
    counts = collections.Counter()

    def counting(name):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(OWN_CODE):
                counts[f"{name} {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return original(self, *args, **kwargs)

        return wrapper

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    return counts


S = random_problem(48, 20, seed=7)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "reference"])
def test_fixed_iteration_solve_reads_back_twice_whatever_the_iteration_count(host_reads, backend):
    seen = {}
    for max_iter in (3, 12):
        host_reads.clear()
        res = sinkhorn_assign(S, 0.05, max_iter=max_iter, tol=None, backend=backend)
        assert res.n_iter == max_iter
        seen[max_iter] = sum(host_reads.values())
        assert seen[max_iter] == 2, dict(host_reads)  # validation, and the history at the end
    host_reads.clear()
    sinkhorn_assign(S, 0.05, max_iter=5, tol=None, init=res, backend=backend)
    assert sum(host_reads.values()) == 3, dict(host_reads)  # + checking the warm start


def test_torch_backend_on_a_gpu_reads_back_once_more_per_iteration(host_reads, monkeypatch):
    """The operator a CUDA tensor gets on the torch backend (the log-domain one; the cached kernel is CPU-only) reads
    whether a cluster's sums underflowed in every iteration after the cold start: README says so."""
    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend, "make_torch_operator", torch_backend.LogDomainOperator)
    for max_iter in (3, 12):
        host_reads.clear()
        sinkhorn_assign(S, 0.05, max_iter=max_iter, tol=None, backend="torch")
        underflow_checks = sum(n for where, n in host_reads.items() if where.startswith("__bool__ torch_backend.py"))
        assert underflow_checks == max_iter - 1, dict(host_reads)
        assert sum(host_reads.values()) == 2 + max_iter - 1, dict(host_reads)


@pytest.mark.interpreter
def test_features_mode_reads_back_twice_whatever_the_iteration_count(host_reads):
    z, c, bias = torch.randn(40, 8), torch.randn(12, 8), 0.1 * torch.randn(12)
    for max_iter in (3, 12):
        host_reads.clear()
        sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=0.5, max_iter=max_iter, tol=None, backend="triton")
        assert sum(host_reads.values()) == 2, dict(host_reads)  # the input checks together, the history


@pytest.mark.interpreter
@pytest.mark.parametrize("kwargs", [
    dict(acceleration="none"),
    dict(over_relaxation=1.5),
    dict(acceleration="over-relaxation"),
    dict(),  # Anderson mixing: its safeguard's verdict on a step is read with the next iteration's error
])  # fmt: skip
def test_solving_to_a_tolerance_reads_once_per_iteration(host_reads, kwargs):
    res = sinkhorn_assign(S, 0.05, max_iter=15, tol=1e-12, warn=False, backend="triton", **kwargs)
    assert res.n_iter == 15 and not res.converged
    assert sum(host_reads.values()) == res.n_iter + 2, dict(host_reads)  # + the input checks and the history


@pytest.mark.interpreter
def test_given_weights_are_checked_on_the_host(host_reads):
    r, c = torch.full((20,), 1 / 20), torch.full((48,), 1 / 48)
    sinkhorn_assign(S, 0.05, max_iter=5, tol=None, backend="triton", cluster_weights=r, sample_weights=c)
    assert sum(host_reads.values()) == 2, dict(host_reads)


@pytest.mark.parametrize("masked", [False, True])
def test_streamed_input_checks_read_back_once_per_chunk(host_reads, monkeypatch, masked):
    """Validating a chunk (NaN/inf, spans, stranded samples, and whether it holds a mask for Hall's condition) is one
    read, whatever the mask and the zero-weight clusters; the masked rows themselves then move as arrays."""
    import otlabel.streaming as streaming

    checked = collections.Counter()
    check_rows = streaming.check_rows
    monkeypatch.setattr(streaming, "check_rows", lambda *a, **k: checked.update(["chunk"]) or check_rows(*a, **k))
    scores = random_problem(600, 20, seed=3)
    if masked:
        scores[::7, 3] = -torch.inf
    r = torch.full((20,), 1 / 18, dtype=torch.float64)
    r[[5, 9]] = 0.0  # clusters without weight: their scores are left out of the row checks
    reads, chunks = {}, {}
    for rows in (200, 50):
        host_reads.clear(), checked.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # SmallChunksWarning
            streaming.sinkhorn_assign_stream(scores, 0.1, max_iter=3, tol=None, cluster_weights=r,
                                             memory_budget=rows * 20 * 4)  # fmt: skip
        reads[rows], chunks[rows] = sum(host_reads.values()), checked["chunk"]
    assert chunks[50] > chunks[200] > 1
    assert reads[50] - reads[200] == chunks[50] - chunks[200], (reads, chunks, dict(host_reads))


OLD_CENTRED = """
def centred(b, clusters):
    mean = b.sum(dim=-1, keepdim=True) / max(1, int(clusters.count))
    return b - mean
"""


def test_counting_sees_a_read_in_the_loop(host_reads, monkeypatch):
    """The counter itself: the centring step as it was (an int() of a tensor per iteration) is seen."""
    import otlabel.solver as solver

    namespace = {"torch": torch}
    exec(compile(OLD_CENTRED, solver.__file__, "exec"), namespace)  # compiled as if it lived in solver.py
    monkeypatch.setattr(solver, "centred", namespace["centred"])
    sinkhorn_assign(S, 0.05, max_iter=6, tol=None, backend="reference")
    assert sum(host_reads.values()) == 2 + 6, dict(host_reads)


def gpu_syncs(scores, backend="triton", **kwargs) -> list[str]:
    """The device synchronisations one solve makes, seen by torch's sync debug mode: 'file:line' of each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            sinkhorn_assign(scores, 0.05, backend=backend, **kwargs)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]


@pytest.mark.gpu
def test_fixed_iteration_solve_synchronises_the_gpu_a_fixed_number_of_times():
    s = S.cuda()
    sinkhorn_assign(s, 0.05, max_iter=3, tol=None, backend="triton")  # compile the kernels first
    torch.cuda.synchronize()
    gpu_syncs(s, max_iter=3, tol=None)  # the first counted call also sees torch's one-time set-up of the counting
    syncs = {max_iter: gpu_syncs(s, max_iter=max_iter, tol=None) for max_iter in (3, 12)}
    assert len(syncs[3]) == len(syncs[12]) <= 2, syncs


@pytest.mark.gpu
def test_torch_backend_on_a_gpu_synchronises_once_more_per_iteration():
    """What README says and the CPU count above stands in for: the log-domain operator's underflow check reads back
    once per iteration after the cold start."""
    s = S.cuda()
    sinkhorn_assign(s, 0.05, max_iter=3, tol=None, backend="torch")
    torch.cuda.synchronize()
    gpu_syncs(s, backend="torch", max_iter=3, tol=None)  # torch's one-time set-up of the counting
    syncs = {max_iter: gpu_syncs(s, backend="torch", max_iter=max_iter, tol=None) for max_iter in (3, 12)}
    assert len(syncs[12]) - len(syncs[3]) == 9, syncs


@pytest.mark.gpu
@pytest.mark.parametrize("acceleration", ["none", "anderson"])
def test_tolerance_solve_synchronises_the_gpu_once_per_iteration(acceleration):
    s = S.cuda()
    kwargs = dict(tol=1e-12, warn=False, acceleration=acceleration)
    sinkhorn_assign(s, 0.05, max_iter=3, backend="triton", **kwargs)  # compile the kernels first
    torch.cuda.synchronize()
    gpu_syncs(s, max_iter=3, **kwargs)  # the first counted call also sees torch's one-time set-up of the counting
    syncs = {max_iter: gpu_syncs(s, max_iter=max_iter, **kwargs) for max_iter in (3, 12)}
    assert len(syncs[12]) - len(syncs[3]) == 9, syncs


@pytest.mark.interpreter
@pytest.mark.parametrize("zero_weight", [False, True], ids=["uniform", "a zero cluster weight"])
def test_a_captured_solve_reads_back_once(host_reads, monkeypatch, zero_weight):
    """cuda_graph=True: one read per call (the history, the finiteness and the score checks together), two with a
    zero cluster weight (the scores are then checked before the replay). Nothing is read inside the captured body:
    a read there would break CUDA graph capture. The capture is stood in for by an eager recorder (test_graphs)."""
    from test_graphs import record_eagerly

    from otlabel import graphs

    monkeypatch.setattr(graphs, "recorder_for", lambda device: record_eagerly)
    graphs.clear_cache()
    weights = torch.tensor([0.0] + [1 / 19] * 19, dtype=torch.float64) if zero_weight else None
    try:
        for _ in range(3):  # the first call records, the others replay
            host_reads.clear()
            sinkhorn_assign(S, 0.05, max_iter=3, tol=None, backend="triton", cluster_weights=weights, cuda_graph=True)
            assert sum(host_reads.values()) == (2 if zero_weight else 1), dict(host_reads)
    finally:
        graphs.clear_cache()
