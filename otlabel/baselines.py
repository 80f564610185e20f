"""Baselines written from their published algorithms, for comparison and parity tests — not for use.

* :func:`swav_sinkhorn` — the linear-domain loop every self-supervised repository carries (SwAV,
  Caron et al. 2020, Alg. 1 and its public code's ``distributed_sinkhorn``): exponentiate once, then
  alternately normalise the rows and columns of the materialised K×N matrix a fixed number of times.
  It overflows for small ``eps`` (``exp(1 / 0.01)`` is beyond float32) and in half precision.
* :func:`sela_sinkhorn` — SeLa's scaling-vector Sinkhorn (Asano et al. 2020): ``P = P0^lambda`` with
  ``P0 = softmax(logits)``, vectors ``r, c`` updated by matrix-vector products, in float64 on the CPU.
"""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def swav_sinkhorn(scores: torch.Tensor, epsilon: float = 0.05, n_iter: int = 3) -> torch.Tensor:
    """SwAV's codes for ``scores`` (N, K): returns ``Q`` (N, K), each row summing to 1.

    Iteration = normalise each cluster's row of ``Q`` (K, N) to ``1/K``, then each sample's column to
    ``1/N``. Equivalent to ``sinkhorn_assign(scores, epsilon, max_iter=n_iter, tol=None).codes`` where it
    does not overflow.
    """
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


def sela_sinkhorn(logits, lam: float = 25.0, n_iter: int = 100, tol: float | None = 1e-1) -> np.ndarray:
    """SeLa's self-labelling step for ``logits`` (N, K): returns the plan ``P`` (N, K) scaled to rows of 1.

    ``P0 = softmax(logits) ** lam`` then scaling vectors ``r = 1/K / (P0^T c)``, ``c = 1/N / (P0 r)``
    alternate until the change of ``c``, ``sum |c_old / c_new - 1|``, measured as SeLa's code does on the 1st, 11th,
    21st, ... iteration only, is below ``tol`` (SeLa's stopping rule), or for ``n_iter`` iterations (SeLa's code has
    no such cap). In ``epsilon`` terms this is entropic OT with ``epsilon = 1 / lam``.
    """
    if isinstance(logits, torch.Tensor):  # a model's output: it may require grad or live on a GPU
        logits = logits.detach().cpu()
    logits = np.asarray(logits, dtype=np.float64)
    n_samples, n_clusters = logits.shape
    p0 = np.exp(logits - logits.max(axis=1, keepdims=True))
    p0 /= p0.sum(axis=1, keepdims=True)
    p0 **= lam  # (N, K); underflows to 0 where lam * log p0 < -745
    row = np.full(n_samples, 1.0 / n_samples)  # sample scaling
    col = np.full(n_clusters, 1.0 / n_clusters)
    for it in range(n_iter):
        col = (1.0 / n_clusters) / (p0.T @ row)
        row_new = (1.0 / n_samples) / (p0 @ col)
        stop = tol is not None and it % 10 == 0 and np.nansum(np.abs(row / row_new - 1)) < tol
        row = row_new
        if stop:
            break
    plan = p0 * row[:, None] * col[None, :]
    return plan * n_samples
