"""PyTorch backends: any device, fp32 arithmetic (float64 for float64 input).

Two operators share one interface:

* :class:`LogDomainOperator` — the general path, over any :class:`~otlabel.sources.ScoreSource`
  (dense, streamed, computed from features). Every iteration recomputes ``exp(S / eps + b - m)`` chunk by
  chunk, so extra memory is one chunk (``chunk_elements``), never O(N·K). It runs on a GPU wherever the triton
  backend does not (no Triton, float64 scores, ``backend="torch"``), on the CPU when the cached kernel below would
  not fit in memory, and under every streamed solve (``otlabel.streaming.StreamingOperator``).
* :class:`CachedKernelOperator` — the CPU workhorse. On a CPU an ``exp`` costs ~15× a read of the
  matrix, so it exponentiates once, ``G[j, k] = exp(S[j, k] / eps + b0[k] - m[j])`` with the row
  maximum ``m`` shifted out (every row of ``G`` has a 1; nothing overflows), and iterates with
  matrix-vector products on ``G`` in the scaling form ``u = c / (G v)``, ``G^T u``. The absorbed
  potentials ``b0`` are refreshed (one more ``exp`` pass) whenever ``|b - b0|`` exceeds
  ``absorb_threshold`` nats, which keeps ``v = exp(b - b0)`` within ``e^±threshold``; a cluster whose
  column of ``G`` underflowed entirely is answered by the exact log-domain pass instead. Both matvecs
  are fused per row by compiled loops (:mod:`~otlabel.backends.cpu_kernels`, Numba) or, without them, run on a
  cache-sized tile of rows before moving on, so ``G`` is read from memory once per iteration; row ranges are
  split over the CPU threads. Memory: ``G`` costs ``4·H·N·K`` bytes (``8·H·N·K`` for float64 scores).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
import math
import os
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from .. import cached
from ..problem import any_autocast_enabled, autocast_off, check_inverse_epsilon, compute_dtype
from ..sources import DenseSource, ScoreSource, column_max, row_chunks
from . import cpu_kernels
from .base import ScoreOperator
from .reference import sample_potentials

NEG_INF = float("-inf")
LOG2_E = 1.4426950408889634


def exp_(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """``x.exp_()`` (or into ``out``; ``x`` is then overwritten), as ``exp2(x log2 e)`` for float32 on the CPU:
    torch's float32 ``exp`` there takes a slow path for every entry whose result underflows (below about -87,
    ``-inf`` included): 7-34 ns per entry instead of 0.75 (torch 2.13, AVX-512), and the log-domain passes
    exponentiate ``S / eps`` less its row maximum, where most entries of a hard plan (logits at a small epsilon) are
    far below -87. ``exp2`` has no such path (0.5-0.8 ns); its relative error is ~1e-7 near the row maximum, at most
    ~4e-6 on entries 1e-38 below it."""
    if x.device.type == "cpu" and x.dtype == torch.float32:
        x.mul_(LOG2_E)
        return x.exp2_() if out is None else torch.exp2(x, out=out)
    return x.exp_() if out is None else torch.exp(x, out=out)


# How far (nats) the cluster potentials may move from the log-domain pass's reference before it is reset: e is then
# at most e^30 (no float32 overflow), and the entries lost to underflow (below e^-87 before the rescale) weigh at most
# e^(-87 + 2 * 30) = e^-27 of their row.
REFERENCE_DRIFT = 30.0
# CPU chunks stay below torch's parallel grain size (32768 elements), so every op runs single-threaded and
# the threads come from splitting the rows into ranges instead: many small OpenMP regions collapse when the
# machine is loaded (measured 15x slower), a handful of long-running threads do not.
DEFAULT_CHUNK_ELEMENTS = {"cpu": 1 << 15, "other": 1 << 24}
# In-memory scores up to this many (H * N * K) are passed over on the caller's thread alone: handing a pass to the
# worker threads and waiting for them costs tens of us or more (more under load), while such a pass takes a few. On
# the 2-core development VM, side by side: a 64 x 10 solve of 3 iterations took 0.92-1.15 ms split over 2 threads and
# 0.52-0.53 ms on the caller's; at 128,000 scores 10 iterations took 0.64x the split time (loaded; the split paid
# only between 4M and 20M scores there).
SERIAL_PASS_ELEMENTS = 1 << 17


class LogDomainOperator(ScoreOperator):
    """Log-domain passes over a :class:`~otlabel.sources.ScoreSource`, chunk by chunk to bound memory.

    Per chunk and iteration it computes ``e = exp(S / eps + b - m)`` once (``m`` the row maximum), takes
    the sample step from the row sums of ``e`` and the cluster partials from ``e^T (c / rowsum)``: one
    ``exp`` per entry. Entries more than ~87 nats below their row's maximum underflow to 0; they carry
    less than 1e-38 of mass, so that is exact to fp32, unless a whole cluster underflows (possible at tiny
    eps, far from convergence): then the pass is redone with a max-shifted log-sum-exp per cluster.

    It takes the loop's float64 ``b`` and forms ``e`` as ``exp(S / eps + b_ref - m) * exp(b - b_ref)``, with a
    per-cluster reference ``b_ref`` that stays put until ``b`` moves more than ``REFERENCE_DRIFT`` nats from it.
    ``S / eps + b`` rounded to float32 would move in steps of its own ulp as ``b`` converges (~1e-4 at
    |S| / eps ~ 1000): the column sums then jitter, and at eps = 0.002 a streamed solve stalled at an error of
    3.5e-6 where the in-memory one reached 1e-6 in 346 iterations. With the reference, the rounding is the same on
    every pass and ``exp(b - b_ref)`` is formed in float64: 303 iterations.

    On the CPU, with a random-access source, the rows are split into one contiguous range per thread; the
    per-range partial results are combined in range order, so results do not depend on timing. In-memory scores of
    at most ``SERIAL_PASS_ELEMENTS`` are one range, on the caller's thread (the hand-off would cost more than the
    pass).
    """

    takes_float64_potentials = True  # see the class docstring; assign and transport_score round them themselves

    def __init__(self, source: ScoreSource, epsilon: float, sample_weights: torch.Tensor, chunk_elements=None):
        self.source = source
        self._reference = None  # (H, K) float64 b_ref, each value exact in the compute dtype
        self.n_heads, self.n_samples, self.n_clusters = source.n_heads, source.n_samples, source.n_clusters
        self.device = source.device
        self.dtype = compute_dtype(source.dtype)
        check_inverse_epsilon(epsilon, self.dtype)
        self.inv_eps = 1.0 / epsilon
        # (N,); the default weights' copy in the compute dtype is made once (cached), as their log
        self._uniform = cached.is_uniform_weights(sample_weights) and sample_weights.device == self.device
        if self._uniform:
            self.c = cached.uniform_weights(self.n_samples, self.device, self.dtype)
        else:
            self.c = sample_weights.to(device=self.device, dtype=self.dtype)
        self._log_c = None  # log c, when a pass first needs it (the cached kernel's iterations do not)
        on_cpu = self.device.type == "cpu"
        self.chunk_elements = chunk_elements or DEFAULT_CHUNK_ELEMENTS["cpu" if on_cpu else "other"]
        small = isinstance(source, DenseSource) and source.n_heads * source.n_samples * source.n_clusters <= (
            SERIAL_PASS_ELEMENTS
        )
        self.parallel = on_cpu and getattr(source, "random_access", False) and not small
        self._reachable = None

    def chunks(self, lo: int = 0, hi: int | None = None):
        """Chunks of rows in ``[lo, hi)``, in increasing order."""
        hi = self.n_samples if hi is None else hi
        for rows in row_chunks(hi - lo, self.n_heads * self.n_clusters, self.chunk_elements):
            yield slice(lo + rows.start, lo + rows.stop)

    def map_ranges(self, fn) -> list:
        """``fn(lo, hi)`` over contiguous row ranges — one per CPU thread when parallel — results in order, each run
        in the caller's inference mode and without autocast (:func:`in_callers_mode`)."""
        fn = in_callers_mode(fn)
        if not self.parallel:
            return [fn(0, self.n_samples)]
        return self.map_parallel(worker_pool(), fn)

    def map_parallel(self, pool: ThreadPoolExecutor, fn) -> list:
        """The parallel half of :meth:`map_ranges`: one range per worker of ``pool``."""
        return map_pool_ranges(pool, fn, self.n_samples)

    def shifted(self, rows: slice, b: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """``S / eps + b`` for a chunk of samples in the compute dtype, (H, T, K), written into ``out`` if given."""
        return torch.add(b[:, None, :], self.source.chunk(rows), alpha=self.inv_eps, out=out)

    def work_buffer(self, lo: int, hi: int, dtype: torch.dtype | None = None):
        """A function ``rows -> (H, T, K)`` view into one buffer (of ``dtype``, default the compute dtype) for a
        range's chunks: the hot pass allocates once per range instead of once per chunk (no allocator churn: steadier
        memory, fewer page faults)."""
        rows = next(iter(self.chunks(lo, hi)), slice(0, 0))
        flat = torch.empty(self.n_heads * (rows.stop - rows.start) * self.n_clusters, dtype=dtype or self.dtype,
                           device=self.device)  # fmt: skip
        return lambda r: flat[: self.n_heads * (r.stop - r.start) * self.n_clusters].view(
            self.n_heads, -1, self.n_clusters
        )

    @property
    def log_c(self) -> torch.Tensor:
        """``log c`` (N,), computed once, on first use: an N-length pass (2-4 ms at 4,000,000 samples) that solves
        on the cached kernel need only in its cold start."""
        if self._log_c is None and self._uniform:  # the default weights' log, made once (cached)
            self._log_c = cached.uniform_weights(self.n_samples, self.device, self.dtype, log=True)
        elif self._log_c is None:
            self._log_c = self.c.log()
        return self._log_c

    def compiled_loops(self) -> bool:
        """The Numba passes of :mod:`~otlabel.backends.cpu_kernels` apply: installed, and the scores a dense float32
        CPU tensor (so computed in float32) that may be read in any order (they read its rows, not its chunks)."""
        source = self.source
        return (cpu_kernels.available() and isinstance(source, DenseSource) and source.random_access
                and self.device.type == "cpu" and source.dtype == torch.float32)  # fmt: skip

    def reachable(self) -> torch.Tensor:
        """(H, K) bool: clusters some sample may go to (one pass, computed once)."""
        if self._reachable is None:
            self._reachable = self.source.column_max() > NEG_INF
        return self._reachable

    def cluster_lse(self, b):
        if b is None:
            return self._cluster_lse_exact(None)
        b = b.double()
        reference, scaling = self._rescaled(b)
        sums = sum_in_order(self.map_ranges(lambda lo, hi: self._column_sums(reference, scaling, lo, hi)))
        # A whole cluster underflowed: redo exactly. (Not a zero-weight one: b = -inf gives it no mass on purpose,
        # and counting it sent every pass through the slower, rounding exact pass: 477 iterations instead of 46.)
        if bool(((sums <= 0) & self.reachable() & torch.isfinite(b)).any()):
            return self._cluster_lse_exact(b.to(self.dtype))
        return torch.where(torch.isneginf(b), NEG_INF, sums.log() - b)  # sums = e^b sum_j exp(S/eps + a)

    def _rescaled(self, b):
        """(b_ref, exp(b - b_ref)) in the compute dtype, for float64 ``b``. A cluster whose ``b`` left its reference
        by more than ``REFERENCE_DRIFT`` (or became or stopped being -inf) gets ``b`` as its new one: decided on
        the device, per cluster, with no read-back."""
        rounded = b.to(self.dtype).double()
        if self._reference is None:
            self._reference = rounded
        else:  # NaN (-inf - -inf, a closed cluster) counts as stale too; it then takes -inf and keeps it
            stale = ~((b - self._reference).abs() <= REFERENCE_DRIFT)
            self._reference = torch.where(stale, rounded, self._reference)
        scaling = torch.where(torch.isfinite(b), (b - self._reference).exp(), 0.0)
        return self._reference.to(self.dtype), scaling.to(self.dtype)

    def _column_sums(self, reference, scaling, lo, hi):
        """``sum_j e_jk c_j / sum_k' e_jk'`` over rows ``[lo, hi)``, with ``e = exp(S/eps + b - m)`` formed as
        ``exp(S/eps + b_ref - m) * exp(b - b_ref)`` (see the class docstring)."""
        sums = torch.zeros((self.n_heads, self.n_clusters), dtype=torch.float64, device=self.device)  # N terms
        buffer = self.work_buffer(lo, hi)
        for rows in self.chunks(lo, hi):
            e = self.shifted(rows, reference, out=buffer(rows))  # (H, T, K)
            e = exp_(e.sub_(e.amax(dim=2, keepdim=True))).mul_(scaling[:, None, :])  # one exp per entry
            w = self.c[rows] / e.sum(dim=2)  # (H, T): c_j / sum_k e_jk, i.e. exp(a_j + m_j)
            add_column_sums(sums, w, e)
        return sums

    def _cluster_lse_exact(self, b):
        """Two max-shifted log-sum-exps per chunk (two exps per entry); also the cold start ``a = log c``."""
        log_c = self.log_c  # on this thread: read first in the workers, each of them computed it
        partials = sum(self.map_ranges(lambda lo, hi: self._lse_partials(b, lo, hi, log_c)), [])
        return torch.logsumexp(torch.stack(partials), dim=0)  # fixed order: deterministic

    def _lse_partials(self, b, lo, hi, all_log_c):
        zeros = torch.zeros((self.n_heads, self.n_clusters), dtype=self.dtype, device=self.device)
        partials = []
        for rows in self.chunks(lo, hi):
            x = self.shifted(rows, zeros)  # (H, T, K)
            log_c = all_log_c[rows]
            a = log_c.expand(self.n_heads, -1) if b is None else sample_potentials(x, b, log_c)  # (H, T)
            partials.append(torch.logsumexp(x.add_(a[:, :, None]), dim=1))  # (H, K)
        return partials

    def assign(self, b, want_codes):
        h, n, k = self.n_heads, self.n_samples, self.n_clusters
        b = b.to(self.dtype)
        labels = torch.empty((h, n), dtype=torch.int64, device=self.device)
        codes = torch.empty((h, n, k), dtype=self.dtype, device=self.device) if want_codes else None

        def fill_compiled(lo, hi):  # one compiled pass per row, every head in one call: 2.5-3.5x torch's ops
            cpu_kernels.softmax_rows(self.source.scores, self.inv_eps, b.contiguous(), lo, hi, labels, codes)

        if self.compiled_loops():
            self.map_ranges(fill_compiled)
            return labels, codes

        def fill(lo, hi):
            for rows in self.chunks(lo, hi):
                logits = self.shifted(rows, b)  # (H, T, K)
                labels[:, rows] = logits.argmax(dim=2)
                if want_codes:
                    codes[:, rows] = torch.softmax(logits, dim=2)

        self.map_ranges(fill)
        return labels, codes

    def transport_score(self, b):
        b = b.double()[:, None, :]

        def partial(lo, hi):
            total = torch.zeros(self.n_heads, dtype=torch.float64, device=self.device)
            # Two float64 buffers per range, worked in place: a chunk's budget counts 16 bytes a score. Fresh float64
            # temporaries for every chunk (six of them) took 500 MiB at 100,000 x 1,000 on 8 threads, more than the
            # whole score matrix; mixed-dtype operations would copy the scores to float64 on the CPU anyway.
            scores_buffer = self.work_buffer(lo, hi, torch.float64)
            plan_buffer = self.work_buffer(lo, hi, torch.float64)
            for rows in self.chunks(lo, hi):
                p = plan_buffer(rows)
                s = scores_buffer(rows).copy_(self.source.chunk_in(rows, p))  # (H, T, K); p is free until then
                p = torch.add(b, s, alpha=self.inv_eps, out=p)  # S / eps + b
                p = exp_(p.sub_(p.amax(dim=2, keepdim=True)))
                p.div_(p.sum(dim=2, keepdim=True))  # the softmax over the clusters
                # 0 * -inf (a forbidden pair: no mass) is NaN, which nansum counts as 0
                total += (p.mul_(s).nansum(dim=2) * self.c[rows].double()).sum(dim=1)
            return total

        return sum_in_order(self.map_ranges(partial))


# Rows a float32 product sums before its partial goes into a float64 total (add_column_sums). BLAS adds the rows of
# w^T e one after the other, so the rounding grows with their count: one product over a whole streamed chunk (26,000
# rows at K = 40) left column sums ~6e-6 off (relative), and a streamed solve of 3,000 x 40 scores stalled at a
# marginal error of 1.2e-6 where the in-memory one reached 1.4e-7. In tiles of 64 rows it reached 3.8e-8 (256: 1.4e-7,
# 16: 1.7e-8), for about 0.03 ms more per million scores, which the exp alone takes ~0.7 ms over.
SUM_TILE_ROWS = 64


# Without the compiled loops, the column sums of a tile of the cached kernel are one float32 mv, whose rows BLAS adds
# one after the other: tiles of 1 MiB hold 262,144 / K rows, and the marginal error's floor rose as K fell, 3.7e-8 at
# K = 1,000 (262 rows), 8.5e-7 at K = 256, 1.8e-6 at K = 128, 2.1e-5 at 50,000 x 10 and 1.4e-4 at 400,000 x 2, where the
# default tol was never reached. Tiles of more rows than this are summed by add_column_sums (floors 1.5-4.5e-8), which
# costs 18-28% more a pass at K = 2-100 (2-core VM); shorter ones keep the one mv, whose floor is below 1e-6.
MV_SUM_MAX_ROWS = 1024


def add_column_sums(sums: torch.Tensor, w: torch.Tensor, e: torch.Tensor) -> None:
    """``sums[h, k] += sum_j w[h, j] e[h, j, k]`` for float64 (H, K) ``sums``, (H, T) ``w`` and (H, T, K) ``e`` in
    float32 (or float64): a float32 product per ``SUM_TILE_ROWS`` rows, those partials summed in float64."""
    h, t, k = e.shape
    full = t - t % SUM_TILE_ROWS  # the rows in whole tiles; the rest in one product
    if full < t:
        sums.add_(torch.bmm(w[:, None, full:], e[:, full:])[:, 0])
    for head in range(h) if full else ():  # per head: the tiles of all heads are one view only when full == t
        tiles = torch.bmm(w[head, :full].view(-1, 1, SUM_TILE_ROWS), e[head, :full].view(-1, SUM_TILE_ROWS, k))
        sums[head].add_(tiles[:, 0].sum(dim=0, dtype=torch.float64))


def sum_in_order(parts: list[torch.Tensor]) -> torch.Tensor:
    total = parts[0]
    for part in parts[1:]:  # a fixed order: the same input gives bitwise the same result
        total = total + part
    return total


class CachedKernelOperator(ScoreOperator):
    """Exponentiate once, then iterate with fused, cache-tiled matrix-vector products (CPU path).

    It takes the loop's float64 potentials as they are: ``v = exp(b - b0)`` is formed in float64 and only then
    rounded, so the rounding of a float32 ``b`` (2e-6 at magnitude 20) never reaches the column sums.
    """

    takes_float64_potentials = True

    def __init__(self, source, epsilon, sample_weights, absorb_threshold: float = 30.0, tile_bytes: int = 1 << 20):
        self.exact = LogDomainOperator(source, epsilon, sample_weights)
        self.n_heads, self.n_samples, self.n_clusters = source.n_heads, source.n_samples, source.n_clusters
        self.device, self.dtype = self.exact.device, self.exact.dtype
        self.c = self.exact.c  # (N,), in the kernel's dtype (one conversion of the weights, not two)
        self.absorb_threshold = absorb_threshold
        self.tile_rows = max(8, tile_bytes // (self.n_clusters * torch.finfo(self.dtype).bits // 8))
        if self.tile_rows > MV_SUM_MAX_ROWS:  # whole products of add_column_sums: 10-15% faster at K = 10-100
            self.tile_rows -= self.tile_rows % SUM_TILE_ROWS
        col_max = source.column_max().to(self.dtype)  # (H, K)
        self.reachable = col_max > NEG_INF  # clusters some sample may go to
        self.exact._reachable = self.reachable
        # Every cluster reachable, known on the host (one read, here): the passes then skip their masking of the
        # others (see _near), 15 of the 36 torch operations of an iteration, each ~3 us on a small solve.
        self.all_reachable = self._every_cluster_reachable()
        self.b0_finite = self.all_reachable  # and so b0 below; a kernel built around b = -inf (weight 0) is not
        # Absorb b0 = -max_j S / eps first, centred (less its mean over the reachable clusters) as the loop centres
        # its potentials: the cold start's are then within ~log N of it, so one exp pass serves the cold start and
        # usually every later iteration too. Uncentred, the first warm iteration found b drifted by the mean itself
        # whenever that passed absorb_threshold (column maxima / eps averaging beyond ~30: logits, or cosines at eps
        # 0.01) and built the kernel a second time (two exp passes in every such solve, 3 iterations or 144).
        b0 = col_max.double() * -self.exact.inv_eps  # (H, K) float64
        if self.all_reachable:  # nanmean's own sum and division, bitwise, without its NaN count (there is no NaN)
            self.b0 = b0 - b0.nansum(dim=-1, keepdim=True).div(cached.count(self.n_clusters, self.device))
        else:
            b0 = torch.where(self.reachable, b0, math.nan)
            self.b0 = (b0 - b0.nanmean(dim=-1, keepdim=True)).nan_to_num(nan=NEG_INF)  # -inf: unreachable
        self.kernel = None  # (H, N, K): exp(S / eps + b0 - m), built on first use
        self.row_shift = None  # (H, N): m, the row maxima of S / eps + b0
        self._c_host = None  # c as a (1, N) NumPy array, for the compiled loops

    @property
    def kernel(self) -> torch.Tensor | None:
        return self._kernel

    @kernel.setter
    def kernel(self, kernel: torch.Tensor | None) -> None:
        # its NumPy view for the compiled loops, made on first use (a conversion costs ~2 us, and a small solve made
        # one every pass); dropped with the kernel, whose memory it holds
        self._kernel, self._kernel_host = kernel, None

    def release(self) -> None:
        """The kernel, a second N x K matrix, serves the iterations and the labels only (codes and objective take
        the exact pass): a result kept for a warm start held it, the next solve then built another beside it, and
        a pickled result (``torch.save``) carried it."""
        self.kernel = self.row_shift = self._c_host = None

    def cluster_lse(self, b):
        if b is None:  # cold start, a = log c:  sum_j c_j exp(S / eps) = e^-b0 sum_j G_jk c_j e^m_j
            if self.kernel is None:
                self._absorb(self.b0)
            log_w = self.exact.log_c + self.row_shift  # (H, N)
            top = log_w.amax(dim=1, keepdim=True)  # factored out so the weights stay <= 1
            col = self._fused_matvecs(None, (log_w - top).exp())
            if self.all_reachable:  # the same tests and values as below, where every cluster is reachable
                if bool((col > 0).all()):
                    return col.log() + top - self.b0  # float64
            elif not bool((~(col > 0) & self.reachable).any()):
                return torch.where(self.reachable, col.log() + top - self.b0, NEG_INF)  # float64
            self.kernel = None  # a cluster underflowed (or a row did: NaN): ask the exact pass
            return self.exact.cluster_lse(b)
        near = self._near(b)
        if near is not None:  # the general steps below, in the operations that remain when they mask nothing
            col = self._fused_matvecs(near.exp().to(self.dtype), None)
            if bool((col > 0).all()):
                return col.log() - self.b0  # float64
            self.kernel = None
            return self.exact.cluster_lse(b)
        scaled, shift = self._terms(b)
        if self.kernel is None or self._drifted(b, shift):
            self._absorb(b)
            shift = b.double() - self.b0
        col = self._fused_matvecs(self._scaling(scaled, shift), None)
        # sum_j G_jk c_j / (G v)_j. A cluster of weight 0 (b = -inf) holds nothing on purpose; one that underflowed
        # (or a row that did: NaN) asks the exact pass.
        if bool((~(col > 0) & scaled).any()):
            self.kernel = None  # rebuilt around the next b, which the exact pass below moves towards
            return self.exact.cluster_lse(b)  # float64 b: it takes them (see LogDomainOperator)
        return torch.where(self.reachable, col.log() - self.b0, NEG_INF)  # float64

    def takes_plain_steps(self) -> bool:
        """Where the compiled loops apply, every cluster is reachable and the scores are few enough
        (``cpu_kernels.PLAIN_STEPS_MAX_ELEMENTS``) to be passed over on the caller's thread: a small problem's whole
        loop then runs in one compiled call (:meth:`plain_steps`)."""
        small = self.n_heads * self.n_samples * self.n_clusters <= cpu_kernels.PLAIN_STEPS_MAX_ELEMENTS
        return small and not self.exact.parallel and self.all_reachable and self.exact.compiled_loops()

    def plain_steps(self, b, log_r, r, n_steps, tol, history=(), budget=0):
        cold = shift = None
        if b is None:  # the cold start's weights, as cluster_lse takes them
            if self.kernel is None:
                self._absorb(self.b0)
            log_w = self.exact.log_c + self.row_shift  # (H, N)
            top = log_w.amax(dim=1, keepdim=True)  # factored out so the weights stay <= 1
            cold, shift = (log_w - top).exp().numpy(), top[:, 0]
        elif self.kernel is None or not self.b0_finite:  # the general steps build (or rebuild) the kernel
            return b, [], 1
        if self._c_host is None:
            self._c_host = self.c.numpy()[None]
        return cpu_kernels.plain_steps(self._host_kernel(), self._c_host, self.b0, log_r, r, b, cold, shift,
                                       self.absorb_threshold, tol, n_steps, history, budget)  # fmt: skip

    def assign(self, b, want_codes):
        if want_codes or not self.exact.compiled_loops() or self.kernel is None:
            return self.exact.assign(b.to(self.dtype), want_codes)
        near = self._near(b)
        if near is None:
            scaled, shift = self._terms(b)
            if self._drifted(b, shift):
                return self.exact.assign(b.to(self.dtype), want_codes)
        # argmax_k S/eps + b = argmax_k G[j, k] v[k]: a read of G instead of an exact log-domain pass. The row's
        # own maximum has G = 1 and, not drifted, v >= e^-threshold there (zero-weight clusters, b = -inf, count
        # as drifted until the kernel is built without them), so an underflowed entry (G = 0) can never win.
        # Near-ties (below ~1e-5 relative) may resolve differently from the exact logits or other backends.
        labels = torch.empty((self.n_heads, self.n_samples), dtype=torch.int64)
        v = near.exp().to(self.dtype) if near is not None else self._scaling(scaled, shift)

        def fill(lo, hi):  # every head in one compiled call
            cpu_kernels.argmax_rows(self._host_kernel(), v, lo, hi, labels)

        self.exact.map_ranges(fill)
        return labels, None

    def transport_score(self, b):
        return self.exact.transport_score(b.to(self.dtype))

    def _every_cluster_reachable(self) -> bool:
        """Whether some sample may go to every cluster (one read of the device). False, the general steps throughout:
        they mask the unreachable clusters (a sharded rank may hold no sample of one)."""
        return bool(self.reachable.all())

    def _near(self, b):
        """``b - b0`` (H, K) float64 where every cluster is reachable, the kernel built and ``b`` within
        ``absorb_threshold`` of ``b0`` everywhere (one read); else None. There :meth:`_terms` would find every ``b``
        finite, :meth:`_drifted` nothing, and :meth:`_scaling` would be ``exp(b - b0)`` alone: a cluster of weight 0
        (``b = -inf``), a NaN or a drift fail the test (``b0`` is finite where every cluster is reachable, unless a
        kernel was built with ``b = -inf``), and take the general steps."""
        if not self.b0_finite or self.kernel is None:
            return None
        shift = b.double() - self.b0
        return shift if bool((shift.abs() <= self.absorb_threshold).all()) else None

    def _terms(self, b):
        """``(scaled, shift)`` for :meth:`_scaling`, and ``shift`` for :meth:`_drifted` (a small solve is bound by its
        count of operations): the reachable clusters with a finite ``b`` (``|b| < inf``: two operations where
        ``isfinite`` is four), (H, K) bool, and ``b - b0`` in float64."""
        return (b.abs() < math.inf) & self.reachable, b.double() - self.b0

    def _scaling(self, scaled, shift):
        """``v = exp(b - b0)`` in float64, then rounded (0 for unreachable clusters): (H, K) in the kernel dtype, from
        :meth:`_terms`."""
        return torch.where(scaled, shift.exp(), 0.0).to(self.dtype)

    def _drifted(self, b, shift) -> bool:
        """``b`` moved more than ``absorb_threshold`` from the kernel's ``b0``, or closed a cluster (``-inf``: a
        zero-weight cluster after the cold start) that the kernel still holds: a row whose only large entries sit
        in such columns would otherwise see ``G v = 0``. Clusters no sample here may go to have an all-zero column
        whatever ``b`` is (a sharded rank can hold none of a cluster's samples): they never count as drifted, unless
        closed. ``shift = b - b0`` from :meth:`_terms` tells the cases apart by itself: inf where ``b`` closed a cluster
        the kernel holds, NaN (never drifted) where the kernel was built without it too (``b0 = -inf``). One read."""
        return bool(((shift.abs() > self.absorb_threshold) & (self.reachable | torch.isneginf(b))).any())

    def _absorb(self, b):
        """(Re)build the kernel around the potentials ``b``: the one ``exp`` pass over the scores."""
        first = b is self.b0  # the b0 made in __init__: finite wherever every cluster is reachable
        b = b.to(self.dtype)  # the kernel holds exactly these (rounded) potentials: b0 records them
        if self.kernel is None:
            self.kernel = torch.empty((self.n_heads, self.n_samples, self.n_clusters), dtype=self.dtype)
            self.row_shift = torch.empty((self.n_heads, self.n_samples), dtype=self.dtype)

        def fill(lo, hi):
            for rows in self.exact.chunks(lo, hi):
                x = self.exact.shifted(rows, b)  # (H, T, K)
                m = x.amax(dim=2, keepdim=True)  # every row's largest entry becomes exp(0) = 1
                exp_(x.sub_(m), out=self.kernel[:, rows])
                self.row_shift[:, rows] = m[:, :, 0]

        def fill_compiled(lo, hi):  # the same, in one compiled pass per row (every head in one call): 5-10x faster
            cpu_kernels.exp_kernel_rows(self.exact.source.scores, self.exact.inv_eps, b.contiguous(), lo, hi,
                                        self.kernel, self.row_shift)  # fmt: skip

        self.exact.map_ranges(fill_compiled if self.exact.compiled_loops() else fill)
        self.b0 = b.double()  # -inf: a cluster closed when the kernel was built, which it does not hold
        if not first:  # where b0 is not finite, _near's test would fail every iteration: spared its operations
            self.b0_finite = self.all_reachable and bool((self.b0.abs() < math.inf).all())

    def _fused_matvecs(self, v, weights):
        """``sum_j G[j, k] w_j / (G v)_j`` per head (``/ (G v)`` skipped when ``v`` is None; ``weights`` None: the
        sample weights ``c``), reading each tile of ``G`` once from memory: both products run on a cache-sized tile
        before the next."""
        return sum_in_order(self.exact.map_ranges(lambda lo, hi: self._matvec_range(v, weights, lo, hi)))

    def _host_kernel(self) -> np.ndarray:
        """The kernel's memory as a NumPy array (no copy), made once per kernel."""
        if self._kernel_host is None:
            self._kernel_host = self._kernel.numpy()
        return self._kernel_host

    def _matvec_range(self, v, weights, lo, hi):
        if cpu_kernels.available():  # one compiled pass per row, the tile's two BLAS calls fused; all heads in one call
            if weights is None:  # c, shared by every head: one row
                if self._c_host is None:
                    self._c_host = self.c.numpy()[None]
                weights = self._c_host
            return cpu_kernels.fused_matvec_rows(self._host_kernel(), v, weights, lo, hi)  # (H, K) float64
        weights = self.c.expand(self.n_heads, -1) if weights is None else weights
        col = torch.zeros(self.n_heads, self.n_clusters, dtype=torch.float64)  # float64 across tiles: N terms
        for h in range(self.n_heads):
            kernel, col_h = self.kernel[h], col[h]
            for start in range(lo, hi, self.tile_rows):
                stop = min(start + self.tile_rows, hi)
                tile = kernel[start:stop]  # (T, K): stays in cache for both products
                u = weights[h, start:stop] if v is None else weights[h, start:stop] / torch.mv(tile, v[h])  # (T,)
                if stop - start > MV_SUM_MAX_ROWS and self.dtype == torch.float32:
                    add_column_sums(col[h : h + 1], u[None], tile[None])
                else:
                    col_h += torch.mv(tile.T, u)
        return col


_SOLVE = threading.local()  # .workers: the worker pool's size while caller_on_one_thread holds this thread at one
_SOLVES_LOCK = threading.Lock()
_ACTIVE_SOLVES = 0  # CPU solves inside caller_on_one_thread, in any thread
_SOLVES_THREADS = 1  # the thread count the first of them read: theirs while any runs
_SOLVES_MKL_DYNAMIC: bool | None = None  # MKL's dynamic-threads flag as the first of them found it, for the last


@functools.cache
def _torch_cpu_library() -> ctypes.CDLL | None:
    """torch's own CPU library, through which the C functions of the OpenMP runtime and the MKL it is linked to are
    found (a symbol looked up in a loaded library is searched in its dependencies too: the very libgomp torch runs on,
    not another copy); None where it is not found.

    Only the library already loaded (``RTLD_NOLOAD`` where there is one): a file of that name in torch's folder that is
    not the one torch loaded (a stale copy, a build that loads it from elsewhere) was loaded beside it, and a second
    libtorch_cpu aborts the process as it starts ('Tried to register multiple backend fallbacks for the same dispatch
    key')."""
    lib = Path(torch.__file__).parent / "lib"
    for name in ("libtorch_cpu.so", "libtorch_cpu.dylib", "torch_cpu.dll"):
        if (lib / name).is_file():
            try:
                return ctypes.CDLL(str(lib / name), mode=ctypes.DEFAULT_MODE | getattr(os, "RTLD_NOLOAD", 0))
            except OSError:
                return None
    return None


@functools.cache
def _mkl_service():
    """MKL's dynamic-threads flag as a (read, write) pair of C functions from the MKL linked into torch, or None where
    torch carries no MKL or its library does not export them (MKL is linked statically; reading the flag takes MKL's
    service-layer ``mkl_serv_get_dynamic``, as ``mkl_get_dynamic`` is not exported)."""
    found = _torch_cpu_library() if torch.backends.mkl.is_available() else None
    try:
        read, write = found.mkl_serv_get_dynamic, found.MKL_Set_Dynamic  # int (void); void (int)
    except AttributeError:  # None included
        return None
    read.restype, read.argtypes, write.restype, write.argtypes = ctypes.c_int, [], None, [ctypes.c_int]
    return read, write


def _thread_counts_probe(set_omp) -> bool:
    """Whether torch follows this thread's OpenMP count as set through ``set_omp``: its count moved by one and back."""
    own = torch.get_num_threads()  # torch's first-call setup of this thread first: it would overwrite the count
    set_omp(own + 1)
    followed = torch.get_num_threads() == own + 1
    set_omp(own)
    return followed


@functools.cache
def _thread_counts():
    """This thread's own intra-op thread counts as a pair of C functions, ``(omp_set_num_threads,
    MKL_Set_Num_Threads_Local)``, the second None without MKL; None where they are not found or torch does not follow
    them (another parallel backend than OpenMP), and the solve then sets torch's count, process-wide.

    ``torch.set_num_threads`` is process-wide: it also sets the count that every thread takes at its first torch call,
    so a thread the caller started during a solve (a data loader's, a prefetcher) took 1 and kept it for good. The
    OpenMP count and MKL's thread-local one (what ``torch.set_num_threads`` sets on its own thread besides) hold for the
    calling thread alone, and set neither MKL's dynamic-threads flag nor the count new threads take."""
    found = _torch_cpu_library()
    try:
        set_omp = found.omp_set_num_threads  # void (int)
    except AttributeError:  # None included
        return None
    set_omp.restype, set_omp.argtypes = None, [ctypes.c_int]
    set_mkl = getattr(found, "MKL_Set_Num_Threads_Local", None) if torch.backends.mkl.is_available() else None
    if set_mkl is not None:
        set_mkl.restype, set_mkl.argtypes = ctypes.c_int, [ctypes.c_int]  # the thread's previous setting (0: none)
    return (set_omp, set_mkl) if _thread_counts_probe(set_omp) else None


def one_thread_here() -> None:
    """torch (OpenMP, MKL) on one thread on this thread, for good, where :func:`_thread_counts` can set it for this
    thread alone: a worker of the pool, whose range runs beside the other workers'. Elsewhere nothing: the solve's
    process-wide count of 1 reaches the workers it starts (they start during a solve)."""
    counts = _thread_counts()
    if counts is not None:
        torch.get_num_threads()  # torch's first-call setup first, which would set the count last set anywhere
        counts[0](1)
        if counts[1] is not None:
            counts[1](1)


def mkl_dynamic() -> bool | None:
    """Whether MKL may run fewer threads than its count on small inputs (``MKL_DYNAMIC``; on until anything calls
    ``torch.set_num_threads``, which turns it off); None where it cannot be read (see :func:`_mkl_service`)."""
    service = _mkl_service()
    return None if service is None else bool(service[0]())


def set_mkl_dynamic(on: bool) -> None:
    """Set MKL's dynamic-threads flag (:func:`mkl_dynamic`); nothing where it cannot be read."""
    service = _mkl_service()
    if service is not None:
        service[1](int(on))


@contextlib.contextmanager
def caller_on_one_thread(device: torch.device):
    """Context for a CPU solve's loop: torch (OpenMP, MKL) runs one thread on the caller's thread, where only
    K-vectors and small products are computed, while the passes keep one worker per thread the caller had.

    Why: on a busy machine (data-loader workers, other jobs) every OpenMP region waits until all its threads are
    scheduled. Ops that open one even on 100 floats (float64 ``exp``/``log``/``sqrt`` through MKL, a 5 x 100 matmul)
    then took ~5 ms each instead of 0.05 (2-core VM, 2 busy processes), and a 256 x 100 solve of 30 iterations took
    87-102 ms against 11-22 ms with one thread; a 256 x 100 solve to tol took 85 ms (median) against 25 ms, 4096 x 300
    267 ms against 40, and nothing got slower on an idle machine. Nested calls (the sharded loop over a streamed one)
    keep the outer setting.

    The count is set for the caller's thread alone (its OpenMP count and MKL's thread-local one, :func:`_thread_counts`)
    and given back to that thread after; the pool's workers set theirs when they start (:func:`one_thread_here`). Other
    threads keep their counts, and threads started meanwhile take the process's (the count last set with
    ``torch.set_num_threads``, else torch's default), not the caller's. ``torch.set_num_threads(1)``, used before, is
    process-wide: torch gives a thread, at its first torch call, the count last set anywhere, so a thread the caller
    started during a solve (a data loader's, a prefetcher) took 1 and kept it after the solve (2 threads -> 1 for good);
    and it turns MKL's dynamic threads off (below). Where those C functions are not found (a Windows DLL exports only
    its own functions, not its OpenMP runtime's), or torch does not follow them (a build without OpenMP, or with another
    parallel backend), the solve still sets the count with ``torch.set_num_threads``, with both effects; there a thread
    whose first torch call is made outside solves, or that calls ``torch.set_num_threads`` itself, keeps its count.

    Concurrent solves (several threads) share one count: where it is set process-wide, a solve begun while another
    held it at 1 read 1, split its passes into one range (rounding differently from the same solve alone: codes 1.9e-5
    apart) and, ending last, restored 1 for good. The count read by the first of the solves running at once serves
    them all, and each restores its own thread's.

    ``torch.set_num_threads`` (where the solve calls it; torch also calls it on a thread's first parallel operation
    once any count has been set) turns MKL's dynamic threads off, for good: MKL then runs every call on all threads,
    so after the first solve a float32 ``exp`` of 64 x 10 (MKL VML) or a float64 ``exp`` of 100 opened an OpenMP
    region, and on the busy 2-core VM took 6.5 ms (median) instead of 4 us, in the caller's every later step. The last
    of the solves running at once gives MKL the flag the first one found (:func:`mkl_dynamic`). Not durably where the
    solve sets the count process-wide, or the caller has set one: torch then gives a thread started later, at its
    first parallel operation, that count through ``set_num_threads``, which turns the flag off again; a solve on such a
    thread finds it off and leaves it so (the caller can call :func:`set_mkl_dynamic` after starting its threads)."""
    if device.type != "cpu" or getattr(_SOLVE, "workers", None) is not None:
        yield
        return
    global _ACTIVE_SOLVES, _SOLVES_THREADS, _SOLVES_MKL_DYNAMIC
    with _SOLVES_LOCK:
        if _ACTIVE_SOLVES == 0:
            # the flag first: a thread's first torch call (get_num_threads here) sets the count last set anywhere,
            # and with it turns the flag off
            _SOLVES_MKL_DYNAMIC = mkl_dynamic()
            _SOLVES_THREADS = torch.get_num_threads()
        _ACTIVE_SOLVES += 1
        threads = _SOLVES_THREADS
    pid, counts, own, own_mkl = os.getpid(), None, None, None
    try:  # from here on (an interrupt included) the count of active solves is given back
        _SOLVE.workers = threads
        # inside the try: the first call probes the OpenMP runtime, time enough for a Ctrl-C that, outside, left
        # the solve counted as running for good (every later solve took its thread count, none gave MKL its flag)
        counts = _thread_counts()
        own = torch.get_num_threads()  # this thread's count, given back to it where counts is not None
        if counts is None:
            torch.set_num_threads(1)
        else:
            counts[0](1)
            own_mkl = None if counts[1] is None else counts[1](1)
        yield
    finally:
        # A child forked inside the solve (from its callback) keeps one thread: the parent's count over its own
        # torch.set_num_threads(1) hung it in its next OpenMP operation (torch's own hang after fork)
        here = os.getpid() == pid
        if here and own is not None:  # own None: interrupted before anything was set
            if counts is None:
                torch.set_num_threads(threads)
            else:
                counts[0](own)
                if own_mkl is not None:
                    counts[1](own_mkl)
        _SOLVE.workers = None
        with _SOLVES_LOCK:
            _ACTIVE_SOLVES -= 1
            if here and _ACTIVE_SOLVES == 0 and _SOLVES_MKL_DYNAMIC is not None:  # after every solve's set_num_threads
                set_mkl_dynamic(_SOLVES_MKL_DYNAMIC)


def _forget_other_threads_solves() -> None:
    """In a process just forked, only the forking thread runs: the solves of the parent's other threads never end
    here. Counted, they made every solve of the child take the parent's thread count and restore it on exit, over the
    child's own ``torch.set_num_threads(1)`` (README's way around torch's hang after fork), so that the child hung in
    the solve's own last float64 operations. Their lock is new too: one held at the fork would never be released."""
    global _ACTIVE_SOLVES, _SOLVES_LOCK
    _SOLVES_LOCK = threading.Lock()
    _ACTIVE_SOLVES = 0 if getattr(_SOLVE, "workers", None) is None else 1  # nested solves count once


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_other_threads_solves)


_POOL: ThreadPoolExecutor | None = None
_POOL_PID: int | None = None  # the process that started the pool's threads
_RETIRED: weakref.WeakSet = weakref.WeakSet()  # shared pools that an interrupt in submit shut down


def solve_threads() -> int:
    """The thread count a CPU solve plans its passes for (the worker pool's size, a streamed solve's chunks): the
    pool's size inside :func:`caller_on_one_thread`, the count shared by the solves running elsewhere when there are
    some, else torch's. A thread's first torch call takes the count last set anywhere: where a solve sets it
    process-wide (see :func:`caller_on_one_thread`), 1 when it starts while another solve holds it there, which
    sized a streamed solve's chunks for one thread (twice its memory budget in flight over two workers; other
    rounding)."""
    workers = getattr(_SOLVE, "workers", None)
    if workers is not None:
        return workers
    with _SOLVES_LOCK:
        if _ACTIVE_SOLVES:
            return _SOLVES_THREADS
    return torch.get_num_threads()


def worker_pool() -> ThreadPoolExecutor:
    """Threads for the row ranges (torch releases the GIL inside mv); one per intra-op thread.

    A process forked after a solve (a ``multiprocessing`` worker with as many torch threads) inherited the pool without
    its threads, and every pass it submitted waited forever: it gets a pool of its own."""
    global _POOL, _POOL_PID
    n = max(1, solve_threads())
    if _POOL is None or _POOL._max_workers != n or _POOL_PID != os.getpid():
        _POOL = ThreadPoolExecutor(max_workers=n, thread_name_prefix="otlabel", initializer=one_thread_here)
        _POOL_PID = os.getpid()
    return _POOL


def in_callers_mode(fn):
    """``fn`` as a pass runs it, on a worker thread or the caller's own: in the caller's inference mode, which is
    thread-local (labels, codes and the kernel allocated under ``torch.inference_mode()`` are inference tensors, and a
    worker outside it may not write them in place: ``RuntimeError: Inplace update to inference tensor outside
    InferenceMode``), and with autocast off (see :func:`~otlabel.problem.autocast_off`; thread-local too, so it
    reached only the passes run on the caller's thread: those on a GPU)."""
    inference = torch.is_inference_mode_enabled()

    def run(*args):
        if torch.is_inference_mode_enabled() == inference and not any_autocast_enabled():
            return fn(*args)  # the caller's thread, as usual: entering the two contexts cost ~3 us a pass
        # inference_mode(False) would turn grad mode on: outside inference mode, the thread's own state is kept
        with torch.inference_mode() if inference else contextlib.nullcontext(), autocast_off():
            return fn(*args)

    return run


def submit(pool: ThreadPoolExecutor, fn, *args):
    """``pool.submit(fn, *args)``, safe against an interrupt while it starts a worker thread.

    ``submit`` starts the pool's threads on demand and waits in ``Thread.start`` for each to run: a Ctrl-C (or
    SIGTERM raised as an exception) there left a started thread that the pool had not yet recorded, waiting forever
    for work, and the interpreter, which joins such threads at exit, hung after printing the interrupt (``otlabel
    assign`` interrupted ~1.4 s in, during its first pass). The pool is then shut down without waiting: the None it
    queues reaches that thread too. The shared pool (:func:`worker_pool`) is also forgotten, so that a later solve
    makes a new one, and a pass of another thread's solve that had already taken it submits the rest of its ranges
    to the new one (they raised "cannot schedule new futures after shutdown"). Any other pool (``HostStream``'s)
    is its owner's to replace."""
    global _POOL
    try:
        return pool.submit(fn, *args)
    except RuntimeError:
        if pool not in _RETIRED:
            raise
    except BaseException:
        if _POOL is pool:
            _POOL = None
            _RETIRED.add(pool)
        pool.shutdown(wait=False)  # work already queued still runs (before the None): its futures can be awaited
        raise
    return submit(worker_pool(), fn, *args)  # the shared pool was shut down by an interrupt on another thread


def map_pool_ranges(pool: ThreadPoolExecutor, fn, n: int) -> list:
    """``fn(lo, hi)`` over ``[0, n)`` in one contiguous range per worker of ``pool``; the results in range order."""
    futures = [submit(pool, fn, lo, hi) for lo, hi in split_rows(n, pool._max_workers)]
    return [f.result() for f in futures]


def split_rows(n: int, parts: int) -> list[tuple[int, int]]:
    """At most ``parts`` contiguous ranges of ``range(n)``, of equal length but the last."""
    per = -(-n // parts)
    return [(lo, min(lo + per, n)) for lo in range(0, n, per)]


# float32 CPU scores with rows at least this long, and at least this many scores, have their row and column maxima and
# their smallest value taken in one read (score_maxima); others by torch, three reads. Shorter rows were no faster
# compiled (LLVM's 16-lane AVX-512 loop of a row goes unused below 16 entries: 1,000,000 x 10 6.1 ms against 6.0,
# 4,000,000 x 2 15 against 5.2), nor fewer scores, which torch reduces in cache (idle 2-core machine, medians:
# 20,000 x 100 0.34 ms against 0.26, 40,000 x 100 0.76 against 0.62; but 4,096 x 1,000 0.31 against 0.46: the rows'
# last K % 64 entries go through a scalar loop). On a busy machine torch's reductions could wait ~20 ms for their
# OpenMP threads (4,096 x 100: 47 ms against 0.2 in one read on the caller's thread), which this leaves as it was.
MAXIMA_MIN_K = 16
MAXIMA_MIN_SCORES = 1 << 22
# Up to this many scores the one read runs on the caller's thread: split over 2 threads it was no faster (idle machine,
# medians: 4,096 x 3,000 2.2 ms against 2.0 on one, 1,000,000 x 16 4.4 against 4.3), above a little (100,000 x 1,000:
# 15.0 against 16.2; 1,000,000 x 30: 11.5 either way).
MAXIMA_SERIAL_SCORES = 1 << 24
_POS_INF_KEY = 0x7F800000  # the order key of +inf; a positive NaN's is larger
_NEG_INF_KEY = -0x7F800001  # of -inf; a negative NaN's is smaller


def score_maxima(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """``(scores.amax(dim=2), column_max(scores), scores.amin())`` of (H, N, K) scores, the first two bitwise as
    torch gives them, in one read of the scores (:func:`cpu_kernels.score_extremes_rows`) where that is faster: CPU,
    float32, C-contiguous, rows of at least ``MAXIMA_MIN_K`` and ``MAXIMA_MIN_SCORES`` scores in all; None elsewhere
    (the caller takes torch's three reductions). Rows are split across the worker pool as in a pass, each range
    with its own column maxima, combined exactly (integer order keys).

    Where the keys would differ from torch the answer is torch's: with a NaN anywhere (none of it is kept: validation
    fails there, and says where from torch's results), and, where -0 occurs in the scores, for the row (column) maxima
    when one of them is +0 (torch returns either zero, depending on their order). The smallest score's zero has either
    sign (validation only asks whether it is -inf)."""
    h, n, k = scores.shape
    if not (
        cpu_kernels.available()
        and scores.device.type == "cpu"
        and scores.dtype == torch.float32
        and k >= MAXIMA_MIN_K
        and scores.numel() >= MAXIMA_MIN_SCORES
        and scores.is_contiguous()
    ):
        return None
    row_max = torch.empty((h, n), dtype=torch.float32)

    def read(lo, hi):  # (the smallest key, this range's column keys)
        keys = np.full((h, k), cpu_kernels.NO_KEY, dtype=np.int32)
        return cpu_kernels.score_extremes_rows(scores, lo, hi, row_max, keys), keys

    serial = scores.numel() <= MAXIMA_SERIAL_SCORES
    parts = [read(0, n)] if serial else map_pool_ranges(worker_pool(), read, n)
    lowest = min(low for low, _ in parts)
    col_keys = np.maximum.reduce([keys for _, keys in parts])
    if lowest < _NEG_INF_KEY or int(col_keys.max()) > _POS_INF_KEY:  # a NaN
        return None
    col_max = cpu_kernels.float_of_keys(col_keys)
    rows_at_zero = bool((row_max.view(torch.int32) == 0).any())  # +0: was there a -0 too?
    cols_at_zero = bool((col_keys == 0).any())
    if (rows_at_zero or cols_at_zero) and bool((scores.view(torch.int32) == cpu_kernels.NO_KEY).any()):  # a -0
        row_max = scores.amax(dim=2) if rows_at_zero else row_max
        col_max = column_max(scores) if cols_at_zero else col_max
    return row_max, col_max, cpu_kernels.float_of_keys(np.array([lowest]))[0]


# Cached kernels up to this size are built without asking the system for its free memory: reading /proc/meminfo
# cost ~35 us, a tenth of a 64 x 10 solve of 3 iterations (~360 us).
KERNEL_ALWAYS_FITS_BYTES = 1 << 24


def available_memory_bytes() -> int | None:
    """Bytes of memory the system can give without swapping: Linux's MemAvailable (free pages plus the page cache it
    can reclaim), else the free pages (``sysconf``, which leaves the cache out); None where the system does not say."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def make_torch_operator(source: ScoreSource, epsilon, sample_weights) -> ScoreOperator:
    """The cached-kernel path on CPU when its kernel fits in half the available memory (8 GiB assumed where the
    system does not say; not asked for kernels up to ``KERNEL_ALWAYS_FITS_BYTES``), else log-domain."""
    if source.device.type != "cpu":
        return LogDomainOperator(source, epsilon, sample_weights)
    itemsize = 8 if source.dtype == torch.float64 else 4
    kernel_bytes = source.n_heads * source.n_samples * source.n_clusters * itemsize
    if kernel_bytes > KERNEL_ALWAYS_FITS_BYTES:
        free = available_memory_bytes()
        if kernel_bytes > (2**33 if free is None else free) // 2:
            return LogDomainOperator(source, epsilon, sample_weights)
    return CachedKernelOperator(source, epsilon, sample_weights)
