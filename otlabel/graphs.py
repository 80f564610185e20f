"""Fixed-iteration solves replayed from a CUDA graph: ``sinkhorn_assign(..., tol=None, cuda_graph=True)``.

A small solve on a GPU is bound by the host, not the device: a SwAV batch (N = 4,096, K = 3,000, 3 iterations,
labels and codes) launched ~50 kernels and took 1.64 ms through ``sinkhorn_assign`` on an H100 (2026-11-23), while
its kernels need ~0.2 ms. Here the checks of the score values, the whole fixed-iteration loop and the
labels-and-codes pass are captured once per problem shape; a call then checks shapes, dtypes and weights on the
host, copies its scores and weights into the captured buffers, replays the graph and reads the error history, the
finiteness of the potentials and the extremes of the scores back together (one synchronisation). Results, and the
errors bad scores raise, are bitwise those of the same call without ``cuda_graph``. (With a zero cluster weight the
score values are checked before the replay, as without the graph: one synchronisation more. Scores with a -inf get
the uncaptured call's mask check after the replay, which reads from the device as that check does.) Options a capture
cannot replay are refused first, before the scores are read.

Each cached shape holds a copy of the scores and a codes buffer (2 x 4·H·N·K bytes for fp32 scores: 98 MB at
4,096 x 3,000) besides the graph; at most :data:`MAX_CACHED` shapes are kept, the least recently used dropped
first (:func:`clear_cache` drops them all).
"""

from __future__ import annotations

import collections
import dataclasses
import math
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from . import cached
from .backends import make_operator
from .problem import Problem, check_score_values, extremes_from_values, extremes_on_device

MAX_CACHED = 4  # captured shapes kept per process

_CACHE: collections.OrderedDict = collections.OrderedDict()
# One call at a time fills, replays and reads a capture: two threads solving the same shape would otherwise
# overwrite each other's scores in the one set of buffers.
_LOCK = threading.Lock()


class SolveBody:
    """What a capture records and every replay re-runs: the solve over the buffers a call fills.

    The cache entry owns it, and with it the input buffers: a CUDA graph keeps addresses, not Python objects. All
    else the solve touches (the operator's log c and workspace, the outputs) is allocated inside the body, so the
    capture puts it in the graph's own memory pool, kept with the graph, and every replay recomputes it from the
    buffers, as the uncaptured call computes it from its inputs.
    """

    def __init__(self, problem: Problem, max_iter: int, omega: float):
        scores = same_layout_empty(problem.scores)  # the launch, the vector width and Triton's alignment
        sample_weights = torch.empty_like(problem.sample_weights)  # specialisation all follow the layout
        cluster_weights = torch.empty_like(problem.cluster_weights)
        # column_max: a replay's scores are not the first call's (validation leaves it out here anyway)
        self.buffers = dataclasses.replace(problem, scores=scores, sample_weights=sample_weights,
                                           cluster_weights=cluster_weights, column_max=None)  # fmt: skip
        self.fill(problem)
        self.max_iter, self.omega = max_iter, omega

    def fill(self, problem: Problem) -> None:
        """Copy a call's scores and weights into the buffers the capture reads."""
        self.buffers.scores.copy_(problem.scores)
        self.buffers.sample_weights.copy_(problem.sample_weights)
        self.buffers.cluster_weights.copy_(problem.cluster_weights)

    def run(self) -> tuple:
        """``(b, errors, labels, codes, empty, extremes)``: the checks of the score values (unless some cluster weight
        is 0: then the caller checked them), the fixed-iteration solve, then labels and codes."""
        from .solver import ClusterMarginal, steps_without_reading

        problem = self.buffers
        extremes = None  # (5,): what the input checks judge, then the smallest score (-inf: a mask to check)
        if not problem.has_zero_weights:
            extremes = torch.cat([extremes_on_device(problem.scores), problem.scores.amin()[None]])
        operator = make_operator(problem, "triton")
        clusters = ClusterMarginal.of(problem.cluster_weights, problem.has_zero_weights)
        b, measured = steps_without_reading(operator, clusters, None, self.max_iter, self.omega)
        cold = torch.full((b.shape[0],), math.inf, dtype=torch.float64, device=b.device)  # the cold start's error
        errors = torch.stack([cold if err is None else err for err in measured])  # (max_iter, H)
        labels, codes = operator.assign(b, want_codes=True)
        return b, errors, labels, codes, clusters.empty, extremes


def same_layout_empty(x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor with ``x``'s shape, strides (gaps included) and 16-byte alignment: the kernels launched
    on it are the ones launched on ``x``, so the captured solve computes the same bits. (Scores whose elements
    overlap, an ``expand``-ed tensor, get a contiguous buffer: same plan, last bits may differ.)"""
    if any(stride == 0 and size > 1 for size, stride in zip(x.shape, x.stride(), strict=True)):
        return torch.empty(x.shape, dtype=x.dtype, device=x.device)
    lead = (x.data_ptr() % 16) // x.element_size()
    span = 1 + sum((size - 1) * stride for size, stride in zip(x.shape, x.stride(), strict=True) if size > 0)
    storage = torch.empty(lead + span, dtype=x.dtype, device=x.device)
    return storage.as_strided(x.shape, x.stride(), lead)


@dataclass
class CapturedSolve:
    """One captured solve: its body (which owns every buffer the graph touches), the replay, and its outputs."""

    body: SolveBody
    replay: Callable[[], None]
    potentials: torch.Tensor  # (H, K) float64
    errors: torch.Tensor  # (max_iter, H): each iteration's marginal error
    labels: torch.Tensor  # (H, N) int64
    codes: torch.Tensor  # (H, N, K) float32
    empty: torch.Tensor | None  # (K,) zero-weight clusters, None when the weights have none
    extremes: torch.Tensor | None  # (4,) what the input checks judge (None: the caller checked the scores)
    graph: object  # the CUDA graph (its private memory pool holds the outputs)


def check_capturable(problem: Problem, backend: str, tol, init, callback, epsilon_scaling, acceleration) -> None:
    """Refuse, naming the option, what a captured solve cannot do (it replays a fixed plan of launches)."""
    from .backends import resolve_backend
    from .solver import ADAPTIVE, ANDERSON, AUTO

    recorder_for(problem.scores.device)  # CUDA scores first: the clearest reason on a CPU
    dtype, resolved = problem.scores.dtype, resolve_backend(backend, problem)
    refusals = [
        (tol is not None, f"runs a fixed number of iterations: pass tol=None and max_iter=... (got tol={tol!r})"),
        (init is not None, "starts cold: init= is not captured"),
        (callback is not None, "reads nothing back while it runs: callback= is not supported"),
        (epsilon_scaling is not None, "runs one epsilon: epsilon_scaling= is not supported"),
        (acceleration in (ANDERSON, AUTO, ADAPTIVE), "replays plain or fixed over-relaxed steps: Anderson mixing and "
                                                "adaptive over-relaxation read the error each iteration"),
        (dtype == torch.float64, "runs the triton backend, which takes float32, float16 or bfloat16 scores (got "
                                 "float64: convert them, or drop cuda_graph)"),
        (resolved != "triton", f"runs the triton backend (backend={backend!r} resolves to {resolved!r} here)"),
    ]  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise ValueError(f"cuda_graph=True {why}.")


def recorder_for(device: torch.device):
    """How to record a solve on ``device``: a CUDA graph; anything else is refused."""
    if device.type != "cuda":
        raise ValueError(
            f"cuda_graph=True needs CUDA scores (got scores on {device}): CUDA graphs replay GPU launches. "
            "Drop cuda_graph on the CPU."
        )
    return record_cuda_graph


def record_cuda_graph(body: Callable[[], tuple], device: torch.device):
    """``(replay, outputs, graph)``: ``body`` run once on a side stream (compiling the kernels and warming the
    allocator, as capture requires), then captured; ``outputs`` are the captured run's tensors, which every replay
    rewrites in place. ``thread_local``: another thread's CUDA calls (a data loader pinning memory) do not break
    the capture."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, capture_error_mode="thread_local"):
            outputs = body()
    return graph.replay, outputs, graph


def capture(problem: Problem, max_iter: int, omega: float) -> CapturedSolve:
    """Build the body over fresh buffers and record it. Outside inference mode, whatever the caller's: every later call
    refills the buffers, and one outside inference mode could not write inference tensors (a first call under
    ``torch.inference_mode()``, say in evaluation, made every later call of that shape raise). With constants of its
    own (:func:`otlabel.cached.not_kept`): the graph reads them by address, and one of the cache's, evicted after
    ``MAX_ENTRIES`` others, would be freed under it (the clusters' count, which the centring divides by)."""
    with torch.inference_mode(False), torch.no_grad(), cached.not_kept():
        body = SolveBody(problem, max_iter, omega)
        replay, outputs, graph = recorder_for(problem.scores.device)(body.run, problem.scores.device)
    return CapturedSolve(body, replay, *outputs, graph)


def cache_key(problem: Problem, max_iter: int, omega: float) -> tuple:
    """Everything that changes the recorded launches: shape, layout and alignment, dtype, device, epsilon (a
    kernel argument), the iterations, the step and whether zero-weight clusters are masked."""
    s = problem.scores
    layout = (tuple(s.shape), s.stride(), s.data_ptr() % 16, s.dtype, s.device)
    return (*layout, problem.epsilon, max_iter, omega, problem.has_zero_weights)


def captured(problem: Problem, max_iter: int, omega: float) -> tuple[CapturedSolve, tuple, bool]:
    """``(entry, key, new)``: the cached capture for this problem's shape and options, recorded on first use."""
    key = cache_key(problem, max_iter, omega)
    entry = _CACHE.pop(key, None)
    new = entry is None
    if new:
        entry = capture(problem, max_iter, omega)
    _CACHE[key] = entry  # most recently used last
    while len(_CACHE) > MAX_CACHED:
        _CACHE.popitem(last=False)
    return entry, key, new


def solve_captured(problem: Problem, max_iter: int, omega: float):
    """``(LoopOutput, labels (H, N), codes (H, N, K), extremes)`` of a fixed-iteration solve, by replaying its capture;
    ``extremes``: the :class:`~otlabel.problem.ScoreExtremes` the replay judged, None where the caller checked the
    scores (a zero cluster weight).

    The outputs are copies, taken before the one synchronisation (so it covers them): the next call's replay
    rewrites the captured buffers. That one read brings back the error history, whether the potentials are
    finite and the extremes of the scores: bad scores (NaN, +inf, a sample with nowhere to go, a span too large
    for epsilon) raise the error the uncaptured call would have raised, and nothing computed from them is returned.
    Scores with a -inf then get the uncaptured call's mask check (with ``problem.mass_rounding``, its allowance),
    after the replay: a mask that leaves no balanced plan raises its error too.
    """
    from .feasibility import check_dense_mask
    from .solver import LoopOutput, potentials_finite, raise_infeasible

    with _LOCK:
        entry, key, new = captured(problem, max_iter, omega)
        entry.body.fill(problem)
        entry.replay()
        potentials, labels, codes = entry.potentials.clone(), entry.labels.clone(), entry.codes.clone()
        parts = [entry.errors.amax(dim=1), potentials_finite(entry.potentials, entry.empty).double()[None]]
        if entry.extremes is not None:
            parts.append(entry.extremes.double())
        history = torch.cat(parts).tolist()  # the one synchronisation
    finite, extremes = history[max_iter], history[max_iter + 1 : max_iter + 5]
    masked = entry.extremes is not None and history[-1] == -math.inf  # the smallest score, after the extremes
    judged = None if not extremes else dataclasses.replace(extremes_from_values(extremes), lowest=history[-1] + 0.0)
    if judged is not None and not judged.acceptable_for(problem.scores, problem.epsilon):
        forget(key, new)
        check_score_values(problem.scores, problem.cluster_weights, has_zero_weights=False, epsilon=problem.epsilon,
                           batched=problem.batched)  # fmt: skip
        raise RuntimeError("otlabel: internal error: the captured input checks and the uncaptured ones disagree.")
    if masked:  # (with a zero cluster weight the caller checked the mask)
        try:
            check_dense_mask(problem.scores, problem.sample_weights, problem.cluster_weights, problem.batched,
                             problem.mass_rounding)  # fmt: skip
        except ValueError:
            forget(key, new)
            raise
    if not finite:
        raise_infeasible()
    out = LoopOutput(potentials=potentials, n_iter=max_iter, errors=history[:max_iter], converged=False)
    return out, labels, codes, judged


def forget(key: tuple, new: bool) -> None:
    """Drop a capture just recorded for bad scores: it would hold memory, maybe in a good one's place."""
    if new:
        with _LOCK:
            _CACHE.pop(key, None)


def clear_cache() -> None:
    """Drop every captured solve (and the GPU memory its buffers hold)."""
    with _LOCK:
        _CACHE.clear()
