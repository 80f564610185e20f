"""Fixed-iteration solves replayed from a CUDA graph: ``sinkhorn_assign(..., tol=None, cuda_graph=True)``.

A small solve on a GPU is bound by the host, not the device: a SwAV batch (N = 4,096, K = 3,000, 3 iterations,
labels and codes) launched ~50 kernels and took 1.64 ms through ``sinkhorn_assign`` on an H100 (2026-11-23), while
its kernels need ~0.2 ms. Here the whole fixed-iteration loop and the labels-and-codes pass are captured once per
problem shape; a call then checks its input as usual, copies its scores and weights into the captured buffers,
replays the graph and reads the error history back (one synchronisation). Results are bitwise those of the same
call without ``cuda_graph``.

Each cached shape holds a copy of the scores and a codes buffer (2 x 4·H·N·K bytes for fp32 scores: 98 MB at
4,096 x 3,000) besides the graph; at most :data:`MAX_CACHED` shapes are kept, the least recently used dropped
first (:func:`clear_cache` drops them all).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .backends import make_operator
from .problem import Problem

MAX_CACHED = 4  # captured shapes kept per process

_CACHE: collections.OrderedDict = collections.OrderedDict()
# One call at a time fills, replays and reads a capture: two threads solving the same shape would otherwise
# overwrite each other's scores in the one set of buffers.
_LOCK = threading.Lock()


@dataclass
class CapturedSolve:
    """One captured solve: the buffers a call fills, the replay, and the buffers the replay writes."""

    scores: torch.Tensor  # (H, N, K): each call copies its scores here
    sample_weights: torch.Tensor  # (N,) float64
    cluster_weights: torch.Tensor  # (K,) float64
    replay: Callable[[], None]
    potentials: torch.Tensor  # (H, K) float64
    errors: torch.Tensor  # (max_iter, H): each iteration's marginal error
    labels: torch.Tensor  # (H, N) int64
    codes: torch.Tensor  # (H, N, K) float32
    empty: torch.Tensor | None  # (K,) zero-weight clusters, None when the weights have none
    keep_alive: object  # the graph (its private memory pool holds the output buffers)


def check_capturable(problem: Problem, backend: str, tol, init, callback, epsilon_scaling, acceleration) -> None:
    """Refuse, naming the option, what a captured solve cannot do (it replays a fixed plan of launches)."""
    from .backends import resolve_backend
    from .solver import ADAPTIVE, ANDERSON

    refusals = [
        (tol is not None, f"runs a fixed number of iterations: pass tol=None and max_iter=... (got tol={tol!r})"),
        (init is not None, "starts cold: init= is not captured"),
        (callback is not None, "reads nothing back while it runs: callback= is not supported"),
        (epsilon_scaling is not None, "runs one epsilon: epsilon_scaling= is not supported"),
        (acceleration in (ANDERSON, ADAPTIVE), "replays plain or fixed over-relaxed steps: Anderson mixing and "
                                                "adaptive over-relaxation read the error each iteration"),
        (resolve_backend(backend, problem) != "triton", f"runs the triton backend (backend={backend!r} resolves "
                                                         f"to {resolve_backend(backend, problem)!r} here)"),
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
    rewrites in place."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            outputs = body()
    return graph.replay, outputs, graph


def capture(problem: Problem, max_iter: int, omega: float) -> CapturedSolve:
    """Build the buffers and the operator over them, and record the solve."""
    from .solver import ClusterMarginal, steps_without_reading

    scores = problem.scores.clone()  # (H, N, K), the caller's layout kept (the launch depends on it)
    sample_weights = problem.sample_weights.clone()
    cluster_weights = problem.cluster_weights.clone()
    operator = make_operator(
        Problem(scores, problem.epsilon, sample_weights, cluster_weights, problem.batched), "triton"
    )

    def body():
        # The operator took log c from the first call's weights: refresh it from the buffer on every replay, as
        # a new operator would compute it.
        operator.log_c.copy_(sample_weights.to(torch.float32).log())
        clusters = ClusterMarginal.of(cluster_weights, problem.has_zero_weights)
        b, errors = steps_without_reading(operator, clusters, None, max_iter, omega)
        labels, codes = operator.assign(b, want_codes=True)
        return b, errors, labels, codes, clusters.empty

    replay, (b, errors, labels, codes, empty), keep_alive = recorder_for(scores.device)(body, scores.device)
    return CapturedSolve(scores, sample_weights, cluster_weights, replay, b, errors, labels, codes, empty, keep_alive)


def cache_key(problem: Problem, max_iter: int, omega: float) -> tuple:
    s = problem.scores
    return (tuple(s.shape), s.stride(), s.dtype, s.device, problem.epsilon, max_iter, omega, problem.has_zero_weights)


def captured(problem: Problem, max_iter: int, omega: float) -> CapturedSolve:
    """The cached capture for this problem's shape and options, recorded on first use."""
    key = cache_key(problem, max_iter, omega)
    entry = _CACHE.pop(key, None)
    if entry is None:
        entry = capture(problem, max_iter, omega)
    _CACHE[key] = entry  # most recently used last
    while len(_CACHE) > MAX_CACHED:
        _CACHE.popitem(last=False)
    return entry


def solve_captured(problem: Problem, max_iter: int, omega: float):
    """``(LoopOutput, labels (H, N), codes (H, N, K))`` of a fixed-iteration solve, by replaying its capture.

    The outputs are copies: the next call's replay rewrites the captured buffers.
    """
    from .solver import LoopOutput, read_back

    with _LOCK:
        entry = captured(problem, max_iter, omega)
        entry.scores.copy_(problem.scores)
        entry.sample_weights.copy_(problem.sample_weights)
        entry.cluster_weights.copy_(problem.cluster_weights)
        entry.replay()
        history = read_back(entry.errors.amax(dim=1), entry.potentials, entry.empty)  # the one synchronisation
        out = LoopOutput(potentials=entry.potentials.clone(), n_iter=max_iter, errors=history, converged=False)
        return out, entry.labels.clone(), entry.codes.clone()


def clear_cache() -> None:
    """Drop every captured solve (and the GPU memory its buffers hold)."""
    with _LOCK:
        _CACHE.clear()
