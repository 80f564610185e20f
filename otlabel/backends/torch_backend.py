"""PyTorch backends: any device, fp32 arithmetic (float64 for float64 input).

Two operators share one interface:

* :class:`LogDomainOperator` — the general path. Every iteration recomputes ``S / eps + b`` and two
  log-sum-exps chunk by chunk, so extra memory is one chunk (``chunk_elements``), never O(N·K).
  On a GPU this is the fallback when Triton is absent.
* :class:`CachedKernelOperator` — the CPU workhorse. On a CPU an ``exp`` costs ~15× a read of the
  matrix, so it exponentiates once, ``G[j, k] = exp(S[j, k] / eps + b0[k] - m[j])`` with the row
  maximum ``m`` shifted out (every row of ``G`` has a 1; nothing overflows), and iterates with
  matrix-vector products on ``G`` in the scaling form ``u = c / (G v)``, ``G^T u``. The absorbed
  potentials ``b0`` are refreshed (one more ``exp`` pass) whenever ``|b - b0|`` exceeds
  ``absorb_threshold`` nats, which keeps ``v = exp(b - b0)`` within ``e^±threshold``; a cluster whose
  column of ``G`` underflowed entirely is answered by the exact log-domain pass instead. Both matvecs
  run on a cache-sized tile of rows before moving on, so ``G`` is read from memory once per iteration,
  and row ranges are split over the CPU threads. Memory: ``G`` costs ``4·H·N·K`` bytes.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import torch

from .base import ScoreOperator
from .reference import sample_potentials

NEG_INF = float("-inf")
DEFAULT_CHUNK_ELEMENTS = 1 << 18  # 1 MB of fp32 per temporary: cache-resident, reused by the allocator


def compute_dtype(scores: torch.Tensor) -> torch.dtype:
    return torch.float64 if scores.dtype == torch.float64 else torch.float32


def row_chunks(n_rows: int, row_elements: int, chunk_elements: int):
    """Yield ``slice`` objects covering ``range(n_rows)`` with at most ``chunk_elements`` per chunk."""
    step = max(1, chunk_elements // max(1, row_elements))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))


class LogDomainOperator(ScoreOperator):
    """Exact log-domain passes over dense scores, chunked over samples to bound memory."""

    def __init__(self, scores, epsilon, sample_weights, chunk_elements: int = DEFAULT_CHUNK_ELEMENTS):
        self.n_heads, self.n_samples, self.n_clusters = scores.shape
        self.device = scores.device
        self.dtype = compute_dtype(scores)
        self.scores = scores  # (H, N, K), any float dtype, not copied
        self.inv_eps = 1.0 / epsilon
        self.log_c = sample_weights.to(self.dtype).log()  # (N,)
        self.chunk_elements = chunk_elements

    def chunks(self):
        return row_chunks(self.n_samples, self.n_heads * self.n_clusters, self.chunk_elements)

    def scaled(self, rows: slice) -> torch.Tensor:
        """``S / eps`` for a chunk of samples in the compute dtype, (H, T, K)."""
        return self.scores[:, rows].to(self.dtype) * self.inv_eps

    def cluster_lse(self, b):
        partials = []
        for rows in self.chunks():
            x = self.scaled(rows)  # (H, T, K)
            log_c = self.log_c[rows]
            a = log_c.expand(self.n_heads, -1) if b is None else sample_potentials(x, b, log_c)  # (H, T)
            partials.append(torch.logsumexp(x.add_(a[:, :, None]), dim=1))  # (H, K)
        return torch.logsumexp(torch.stack(partials), dim=0)  # fixed order: deterministic

    def assign(self, b, want_codes):
        h, n, k = self.n_heads, self.n_samples, self.n_clusters
        labels = torch.empty((h, n), dtype=torch.int64, device=self.device)
        codes = torch.empty((h, n, k), dtype=torch.float32, device=self.device) if want_codes else None
        for rows in self.chunks():
            logits = self.scaled(rows).add_(b[:, None, :])  # (H, T, K)
            labels[:, rows] = logits.argmax(dim=2)
            if want_codes:
                codes[:, rows] = torch.softmax(logits, dim=2)
        return labels, codes

    def transport_score(self, b):
        total = torch.zeros(self.n_heads, dtype=torch.float64, device=self.device)
        for rows in self.chunks():
            s = self.scores[:, rows].double()  # (H, T, K)
            logits = s * self.inv_eps + b.double()[:, None, :]
            plan = torch.softmax(logits, dim=2) * self.log_c[rows].double().exp()[None, :, None]
            total += torch.where(torch.isfinite(s), plan * s, 0.0).sum(dim=(1, 2))
        return total


class CachedKernelOperator(ScoreOperator):
    """Exponentiate once, then iterate with fused, cache-tiled matrix-vector products (CPU path)."""

    def __init__(self, scores, epsilon, sample_weights, absorb_threshold: float = 15.0, tile_bytes: int = 1 << 21):
        self.exact = LogDomainOperator(scores, epsilon, sample_weights)
        self.n_heads, self.n_samples, self.n_clusters = scores.shape
        self.device, self.dtype = self.exact.device, self.exact.dtype
        self.c = sample_weights.to(self.dtype)  # (N,)
        self.absorb_threshold = absorb_threshold
        self.tile_rows = max(8, tile_bytes // (self.n_clusters * torch.finfo(self.dtype).bits // 8))
        col_max = scores.amax(dim=1).to(self.dtype)  # (H, K)
        self.reachable = col_max > NEG_INF  # clusters some sample may go to
        # Absorb b0 = -max_j S / eps first: the cold-start potentials are within log N of it, so one exp pass
        # serves the cold start and usually every later iteration too.
        self.b0 = torch.where(self.reachable, -col_max * self.exact.inv_eps, NEG_INF)
        self.kernel = None  # (H, N, K): exp(S / eps + b0 - m), built on first use
        self.row_shift = None  # (H, N): m, the row maxima of S / eps + b0

    def cluster_lse(self, b):
        if self.kernel is None or (b is not None and self._drifted(b)):
            self._absorb(self.b0 if b is None else b)
        if b is None:  # cold start, a = log c:  sum_j c_j exp(S / eps) = e^-b0 sum_j G_jk c_j e^m_j
            log_w = self.c.log() + self.row_shift  # (H, N)
            top = log_w.amax(dim=1, keepdim=True)  # factored out so the weights stay <= 1
            col = self._fused_matvecs(None, (log_w - top).exp())
            offset = top
        else:
            v = torch.where(torch.isneginf(b), 0.0, (b - self.b0).exp())  # (H, K), within e^(+-threshold)
            col = self._fused_matvecs(v, self.c.expand(self.n_heads, -1))  # sum_j G_jk c_j / (G v)_j
            offset = 0.0
        if bool(((col <= 0) & self.reachable).any()):  # a column underflowed: the kernel cannot answer
            self.kernel = None  # rebuilt around the next b, which the exact pass below moves towards
            return self.exact.cluster_lse(b)
        return col.log() + offset - self.b0

    def assign(self, b, want_codes):
        return self.exact.assign(b, want_codes)

    def transport_score(self, b):
        return self.exact.transport_score(b)

    def _drifted(self, b) -> bool:
        finite = torch.isfinite(b)
        return bool(((b - self.b0).abs()[finite] > self.absorb_threshold).any())

    def _absorb(self, b):
        """(Re)build the kernel around the potentials ``b``: the one ``exp`` pass over the scores."""
        if self.kernel is None:
            self.kernel = torch.empty(self.exact.scores.shape, dtype=self.dtype)
            self.row_shift = torch.empty((self.n_heads, self.n_samples), dtype=self.dtype)
        for rows in self.exact.chunks():
            x = torch.add(b[:, None, :], self.exact.scores[:, rows], alpha=self.exact.inv_eps)  # (H, T, K)
            m = x.amax(dim=2, keepdim=True)  # every row's largest entry becomes exp(0) = 1
            torch.exp(x.sub_(m), out=self.kernel[:, rows])
            self.row_shift[:, rows] = m[:, :, 0]
        self.b0 = b.clone()

    def _fused_matvecs(self, v, weights):
        """``sum_j G[j, k] w_j / (G v)_j`` per head (``/ (G v)`` skipped when ``v`` is None), reading each
        tile of ``G`` once from memory: both products run on a cache-sized tile before the next."""
        workers = worker_pool()
        bounds = split_rows(self.n_samples, workers._max_workers, self.tile_rows)
        futures = [workers.submit(self._matvec_range, v, weights, lo, hi) for lo, hi in bounds]
        col = futures[0].result()
        for f in futures[1:]:  # fixed order: deterministic
            col += f.result()
        return col

    def _matvec_range(self, v, weights, lo, hi):
        col = torch.zeros(self.n_heads, self.n_clusters, dtype=self.dtype)
        for h in range(self.n_heads):
            kernel, col_h = self.kernel[h], col[h]
            for start in range(lo, hi, self.tile_rows):
                stop = min(start + self.tile_rows, hi)
                tile = kernel[start:stop]  # (T, K): stays in cache for both products
                u = weights[h, start:stop] if v is None else weights[h, start:stop] / torch.mv(tile, v[h])  # (T,)
                col_h.addmv_(tile.T, u)
        return col


_POOL: ThreadPoolExecutor | None = None


def worker_pool() -> ThreadPoolExecutor:
    """Threads for the row ranges (torch releases the GIL inside mv); one per intra-op thread."""
    global _POOL
    n = max(1, torch.get_num_threads())
    if _POOL is None or _POOL._max_workers != n:
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="otlabel")
    return _POOL


def split_rows(n: int, parts: int, align: int) -> list[tuple[int, int]]:
    """``parts`` contiguous ranges of ``range(n)``, boundaries on multiples of ``align`` where possible."""
    per = -(-n // parts)
    per = -(-per // align) * align
    return [(lo, min(lo + per, n)) for lo in range(0, n, per)]


def available_memory_bytes() -> int:
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return 2**33


def make_torch_operator(scores, epsilon, sample_weights) -> ScoreOperator:
    """The cached-kernel path on CPU when its kernel fits in half the free memory, else log-domain."""
    kernel_bytes = scores.numel() * (8 if scores.dtype == torch.float64 else 4)
    if scores.device.type == "cpu" and kernel_bytes <= available_memory_bytes() // 2:
        return CachedKernelOperator(scores, epsilon, sample_weights)
    return LogDomainOperator(scores, epsilon, sample_weights)
