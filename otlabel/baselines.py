"""Baselines written from their published algorithms, for comparison and parity tests — not for use.

* :func:`swav_sinkhorn` — the linear-domain loop every self-supervised repository carries (SwAV,
  Caron et al. 2020, Alg. 1 and its public code's ``distributed_sinkhorn``): exponentiate once, then
  alternately normalise the rows and columns of the materialised K×N matrix a fixed number of times.
  It overflows for small ``eps`` (``exp(1 / 0.01)`` is beyond float32) and in half precision. :func:`swav_loop` is
  the same loop without the input checks: what the benchmarks time.
* :func:`sela_sinkhorn` — SeLa's scaling-vector Sinkhorn (Asano et al. 2020): ``P = P0^lambda`` with
  ``P0 = softmax(logits)``, vectors ``r, c`` updated by matrix-vector products, in float64 on the CPU.

Both return a torch tensor on the input's device (a CPU one for a NumPy array or a list), as
:func:`otlabel.sinkhorn_assign` does, and take their iteration count as ``max_iter``, its name there (``n_iter`` is
what a result calls the iterations that ran).
"""

from __future__ import annotations

import math
import numbers
import warnings

import numpy as np
import torch

from .problem import as_tensor, check_epsilon, check_scores, described, one_number, real_as_float
from .solver import is_number


def check_baseline_scores(scores, name: str, integers_as: torch.dtype, given: str = "scores") -> torch.Tensor:
    """One (N, K) problem of real scores, as :func:`otlabel.sinkhorn_assign` takes them (a tensor, NumPy array or
    list), except that integer (or bool) scores are taken, as ``integers_as``: the loops took them before they were
    checked (SwAV's division promotes them to torch's default dtype, SeLa's ``np.asarray(logits, np.float64)``).
    Only shape and dtype: the values are judged by :func:`refuse_non_finite`. ``given``: the argument's name."""
    scores = as_tensor(scores, given)
    if not (scores.is_floating_point() or scores.is_complex() or scores.is_quantized):  # check_scores refuses those
        scores = scores.to(integers_as)
    scores3, batched = check_scores(scores, given)
    if batched:
        raise ValueError(f"{name} takes one (N, K) problem, got shape {tuple(scores3.shape)}; loop over the heads "
                         f"yourself ({given}[h]).")  # fmt: skip
    return scores3[0]


def refuse_non_finite(scores: torch.Tensor, name: str = "scores") -> None:
    """NaN or +inf among the scores: the loops' output would be NaN, silently. The overflow of ``exp(S / eps)`` that
    the linear-domain loop is known for is left as it is."""
    bad = torch.isnan(scores) | torch.isposinf(scores)
    if bool(bad.any()):
        j, k = (int(i) for i in torch.nonzero(bad)[0])
        what = "NaN" if math.isnan(float(scores[j, k])) else "+inf"
        raise ValueError(f"{name} contain {what} (first at index ({j}, {k}) of the (N, K) {name}). Fix the model "
                         "output; only -inf is allowed: 'this sample may not go to this cluster'.")  # fmt: skip


def refuse_fully_masked(scores: torch.Tensor, entry: str = "score") -> None:
    """A sample, or a cluster, whose every score is -inf: the loops divide 0 by 0 there and return NaN, silently.
    ``entry``: what one of them is called in the message (SeLa's: ``logit``)."""
    masked = torch.isneginf(scores)
    for dim, what, fix in ((1, "sample", "it cannot go to any cluster. Allow at least one cluster per sample, or drop "
                            "the sample."),
                           (0, "cluster", "no sample can go to it and its share cannot be filled. Allow at least one "
                            "sample per cluster, or drop the cluster.")):  # fmt: skip
        full = masked.all(dim)
        if bool(full.any()):
            raise ValueError(f"infeasible mask: {what} {int(torch.nonzero(full)[0])} has every {entry} -inf, so {fix}")


class DefaultCount(int):
    """An argument's default count: an ``int``, told apart by identity from the same number passed (a plain ``3`` is
    CPython's shared small int, so ``max_iter is 3`` cannot tell ``f(x)`` from ``f(x, max_iter=3)``)."""


# the baselines' default max_iter (SwAV's fixed count; a cap for SeLa)
SWAV_ITERATIONS, SELA_ITERATIONS = DefaultCount(3), DefaultCount(100)


def check_iterations(max_iter, n_iter, function: str, default: DefaultCount) -> int:
    """``max_iter``, or ``n_iter`` as it was called up to 0.1.0 (with a FutureWarning: a result's ``n_iter`` is the
    iterations that ran, where the argument bounds them), checked as a count and named as it was passed.
    ``default``: ``max_iter``'s, the very object in the signature (any other, even equal, was passed)."""
    name = "max_iter"
    if n_iter is not None:
        if max_iter is not default:
            raise TypeError(f"{function} got both max_iter and n_iter, its old name: pass max_iter alone.")
        warnings.warn(f"{function}(n_iter=...) is now max_iter=..., as in sinkhorn_assign (a result's n_iter is the "
                      "iterations that ran); n_iter= will be removed.", FutureWarning, stacklevel=3)  # fmt: skip
        max_iter, name = n_iter, "n_iter"
    if not is_number(max_iter, numbers.Integral) or max_iter < 0:
        raise ValueError(f"{name} must be an integer >= 0 (the number of iterations), got {described(max_iter)}.")
    return int(max_iter)


def swav_sinkhorn(
    scores, epsilon: float = 0.05, max_iter: int = SWAV_ITERATIONS, *, n_iter: int | None = None
) -> torch.Tensor:
    """SwAV's codes for ``scores`` (N, K): returns ``Q`` (N, K), a tensor of the scores' dtype on their device, each
    row summing to 1 (for ``max_iter >= 1``; with ``max_iter=0``, as in the published loop, ``exp(S / eps)``
    normalised as a whole times N).

    Iteration = normalise each cluster's row of ``Q`` (K, N) to ``1/K``, then each sample's column to
    ``1/N``, exactly ``max_iter`` times. Equivalent to ``sinkhorn_assign(scores, epsilon, max_iter, tol=None).codes``
    where it neither overflows nor underflows: ``exp(S / eps)`` divided by its sum over the batch falls below float32's
    smallest numbers for scores ~90 eps or more below the batch's best, and a sample whose scores all lie there gets
    codes of 0 or far off, silently (1,000 x 10 standard-normal scores at eps 0.05: codes off by up to 0.11 from
    float64's). The input is checked first (reads of the scores for NaN, +inf, and a sample or cluster whose
    every score is -inf); :func:`swav_loop` is the loop alone.

    Args:
        scores: one ``(N, K)`` problem (a tensor, NumPy array or list of numbers), higher is better.
        epsilon: temperature ``> 0`` in the units of the scores (SwAV's 0.05).
        max_iter: iterations, ``>= 0`` (SwAV's 3), all of them run (SwAV has no stopping rule).
        n_iter: ``max_iter``'s name up to 0.1.0, taken with a FutureWarning.
    """
    scores = check_baseline_scores(scores, "swav_sinkhorn", torch.get_default_dtype())
    epsilon = check_epsilon(epsilon)
    max_iter = check_iterations(max_iter, n_iter, "swav_sinkhorn", SWAV_ITERATIONS)
    refuse_non_finite(scores)
    refuse_fully_masked(scores)
    return swav_loop(scores, epsilon, max_iter)


@torch.no_grad()
def swav_loop(scores: torch.Tensor, epsilon: float, n_iter: int) -> torch.Tensor:
    """:func:`swav_sinkhorn` without its input checks: the loop as the SSL repositories write it, which the CPU
    benchmarks time (on this 2-core CPU the checks added 9 and 33 us, 25% and 40% of the loop, at 64 x 10
    and 256 x 100)."""
    q = torch.exp(scores / epsilon).t()  # (K, N) in the input's dtype, as the SSL repositories do
    n_clusters, n_samples = q.shape
    q /= torch.sum(q)
    for _ in range(n_iter):
        q /= torch.sum(q, dim=1, keepdim=True)  # clusters to equal mass
        q /= n_clusters
        q /= torch.sum(q, dim=0, keepdim=True)  # samples to equal mass
        q /= n_samples
    q *= n_samples  # each sample's column sums to 1
    return q.t()


def sela_sinkhorn(logits, lam: float = 25.0, max_iter: int = SELA_ITERATIONS, tol: float | None = 1e-1, *,
                  n_iter: int | None = None) -> torch.Tensor:  # fmt: skip
    """SeLa's self-labelling step for ``logits`` (N, K): returns the plan ``P`` (N, K) scaled to rows of 1, a float64
    tensor on the logits' device (a CPU one for a NumPy array or a list; it is computed on the CPU).

    ``P0 = softmax(logits) ** lam`` then scaling vectors ``r = 1/K / (P0^T c)``, ``c = 1/N / (P0 r)``
    alternate until the change of ``c``, ``sum |c_old / c_new - 1|``, measured as SeLa's code does on the 1st, 11th,
    21st, ... iteration only, is below ``tol`` (SeLa's stopping rule), or for ``max_iter`` iterations (SeLa's code
    has no such cap; ``tol=None`` runs exactly ``max_iter``, as in sinkhorn_assign). In ``epsilon`` terms this is
    entropic OT with
    ``epsilon = 1 / lam``.

    Args:
        logits: one ``(N, K)`` problem (a tensor, NumPy array or list of numbers); computed in float64.
        lam: SeLa's lambda, ``> 0`` (``1 / epsilon``).
        max_iter: most iterations.
        tol: SeLa's stopping threshold on the change of ``c`` (above), or ``None`` for exactly ``max_iter``.
        n_iter: ``max_iter``'s name up to 0.1.0, taken with a FutureWarning.
    """
    logits = check_baseline_scores(logits, "sela_sinkhorn", torch.float64, "logits")  # may require grad or be on a GPU
    device = logits.device
    # Numbers, or one-element tensors or arrays (scheduled values), as sinkhorn_assign takes epsilon and tol (a 0-d
    # array was refused). As floats: a Python int beyond float's range (10**400) raised OverflowError in isfinite, a
    # Fraction NumPy's ufunc error in the power below.
    lam = real_as_float(one_number(lam, "lam", "a finite number > 0 (SeLa's lambda, 1 / epsilon)"))
    if not (lam > 0 and math.isfinite(lam)):
        raise ValueError(f"lam must be a finite number > 0 (SeLa's lambda, 1 / epsilon), got {lam!r}.")
    max_iter = check_iterations(max_iter, n_iter, "sela_sinkhorn", SELA_ITERATIONS)
    if tol is not None:
        tol = real_as_float(one_number(tol, "tol", "a positive number (or None for exactly max_iter iterations)"))
        if not tol > 0:
            raise ValueError(f"tol must be a positive number (or None for exactly max_iter iterations), got {tol!r}.")
    logits = logits.cpu().double().numpy()
    n_samples, n_clusters = logits.shape
    row_max = logits.max(axis=1, keepdims=True)
    # NaN or +inf (max propagates both), or a sample or a cluster masked everywhere
    if not np.isfinite(row_max).all() or np.isneginf(logits.max(axis=0)).any():
        refuse_non_finite(torch.from_numpy(logits), "logits")
        refuse_fully_masked(torch.from_numpy(logits), "logit")
    p0 = np.exp(logits - row_max)
    p0 /= p0.sum(axis=1, keepdims=True)
    p0 **= lam  # (N, K); underflows to 0 where lam * log p0 < -745
    row = np.full(n_samples, 1.0 / n_samples)  # sample scaling
    col = np.full(n_clusters, 1.0 / n_clusters)
    for it in range(max_iter):
        col = (1.0 / n_clusters) / (p0.T @ row)
        row_new = (1.0 / n_samples) / (p0 @ col)
        stop = tol is not None and it % 10 == 0 and np.nansum(np.abs(row / row_new - 1)) < tol
        row = row_new
        if stop:
            break
    plan = p0 * row[:, None] * col[None, :]
    return torch.from_numpy(plan * n_samples).to(device)
