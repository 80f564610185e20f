"""The executable specification: plain float64 log-domain Sinkhorn steps, written for reading, not speed.

Every other backend is tested against this one. It materialises ``S / eps`` in float64 (memory
``8·H·N·K`` bytes) and uses nothing but ``torch.logsumexp``.
"""

from __future__ import annotations

import torch

from .base import ScoreOperator


def sample_potentials(x: torch.Tensor, b: torch.Tensor, log_c: torch.Tensor) -> torch.Tensor:
    """Exact sample step ``a = log c - LSE_k(x + b)`` for ``x = S / eps`` (H, N, K); returns (H, N).

    A zero-weight sample (``log c = -inf``) gets ``a = -inf``: it carries no mass.
    """
    a = log_c - torch.logsumexp(x + b[:, None, :], dim=2)  # (H, N)
    return torch.where(torch.isneginf(log_c), float("-inf"), a)


class ReferenceOperator(ScoreOperator):
    def __init__(self, scores: torch.Tensor, epsilon: float, sample_weights: torch.Tensor):
        self.n_heads, self.n_samples, self.n_clusters = scores.shape
        self.device = scores.device
        self.dtype = torch.float64
        self.scores = scores.double()  # (H, N, K)
        self.x = self.scores / epsilon  # (H, N, K)
        self.log_c = sample_weights.double().log()  # (N,)

    def cluster_lse(self, b):
        if b is None:
            a = self.log_c.expand(self.n_heads, -1)  # cold start: a = log c
        else:
            a = sample_potentials(self.x, b.double(), self.log_c)
        return torch.logsumexp(self.x + a[:, :, None], dim=1)  # (H, K)

    def assign(self, b, want_codes):
        logits = self.x + b.double()[:, None, :]  # (H, N, K)
        labels = logits.argmax(dim=2)
        codes = torch.softmax(logits, dim=2) if want_codes else None  # float64: the spec keeps full precision
        return labels, codes

    def transport_score(self, b):
        logits = self.x + b.double()[:, None, :]
        codes = torch.softmax(logits, dim=2)
        mass = codes * self.log_c.exp()[None, :, None]  # the plan P, (H, N, K)
        finite = torch.isfinite(self.scores)
        return torch.where(finite, mass * self.scores, 0.0).sum(dim=(1, 2))
