"""Fused Triton kernels for log-domain Sinkhorn on a dense score tensor S (H, N, K).

Math (DESIGN.md §2), per head h, with ``x = S / eps``:

    sample step   a[j] = log c[j] - LSE_k( x[j, k] + b[k] )
    cluster LSE   L[k] = LSE_j( x[j, k] + a[j] )            (the solver then sets b = log r - L)

``dense_cluster_lse`` does both in one pass over S. A persistent grid of P programs per head walks
its own row tiles; for each tile it computes ``a`` (online LSE over K), then folds the tile into a
running per-cluster (max, sum of exp). Each program writes its (K,) partials to an (H, P, K) buffer
and a second small kernel merges them in program order: no atomics, bitwise reproducible.

    S (H, N, K) --[_cluster_partials_kernel, grid (P, H)]--> max, sum (H, P, K)      (column masses: sum only)
                --[merge._merge_partials_kernel or _merge_masses_kernel, grid (K / MERGE_BLOCK_K, H)]--> L (H, K)

When the padded row fits one tile (``one_chunk``: K <= 4096, or K <= 8192 with the one-row tiles that
``kernels.utils.row_tile`` gives row-major scores when N is large enough) a row tile is loaded once and reused for
both reductions: one read of S per iteration. For larger K the program first computes ``a`` for all
its rows (streaming K in chunks), then streams S again chunk by chunk: two reads, no float atomics.

Column masses (``DenseLaunch.column_mass``, the default for warm passes): with ``b`` given, the plan's entries
``P[j, k] = exp(x[j, k] + a[j] + b[k])`` are at most ``c[j]``, so the per-cluster partials are plain sums of P
(no running max, no rescale) and ``L = log(sum_j P[j, k]) - b[k]``. In the one-chunk tile P is the row step's own
``exp2(x + b - rowmax)`` times ``c / rowsum``: one exp2 per score instead of two and a quarter, and 20-30% fewer
registers (sm_90 compile). P below 2**-126 underflows, so a cluster holding next to no mass (under N * 2**-100)
is recomputed in log domain by the merge (``_merge_masses_kernel``). Plain Sinkhorn steps with uniform sample
weights never get there (each cluster step restores every mass to r; a sample step divides a sample's entries by
its mass, at most 1, and multiplies them by c = 1/N: a cluster keeps at least r / N); a far-off warm start, an
extrapolated step or very uneven sample weights can; a cluster whose own weight r is under the floor is recomputed
on every pass (slow, still exact). The bound assumes sample weights c <= 1 (the solver's marginals sum to 1; a shard's
sum to less). The cold pass (``b = None``: P is not bounded) keeps the log-domain sums.

All arithmetic is fp32 in base 2 (``exp2``/``log2`` with a log2(e) prescale); masked lanes load
``-inf`` and every running max goes through ``_finite_or_zero`` before it is subtracted, so
``-inf - -inf`` never produces a NaN. Offsets are int64 (N * K may exceed 2**31) and every stride is a
runtime argument, so a transposed view of an (H, K, N) tensor works without a copy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .lse import _finite_or_zero, _lse2, _lse_from_masses, _multiple_of, _online_lse, _sample_step2
from .merge import (
    EXACT_FALLBACK_ROWS,
    MASS_FLOOR_PER_SAMPLE,
    MERGE_BLOCK_K,
    MERGE_BLOCK_P,
    merge_options,
    merge_partials,
)
from .utils import KERNEL_DTYPES, LN2, LOG2E, DenseLaunch, _check_row_tiles, as_float32, compile_options, dense_launch

_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)

__all__ = [
    "DenseWorkspace",
    "default_launch",
    "dense_assign",
    "dense_cluster_lse",
    "dense_transport_score",
    "is_transposed",
]


# ----------------------------------------------------------------------------------------------------
# Device helpers (those the features kernels share are in lse.py)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _multiples_of(VEC: tl.constexpr, K, stride_n, stride_h):
    """K and the row and head strides as multiples of VEC (elements per 16-byte load), so that loads and stores
    along K become vector ones. K = 1000 or 3000 is not a multiple of 16."""
    return _multiple_of(VEC, K), _multiple_of(VEC, stride_n), _multiple_of(VEC, stride_h)


@triton.jit
def _load_tile(S, h_off, rows, row_mask, k0, K, stride_n, stride_k, BLOCK_K: tl.constexpr):
    """Scores S[h, rows, k0:k0+BLOCK_K] as fp32 (BLOCK_N, BLOCK_K); out-of-range lanes are -inf."""
    cols = k0 + tl.arange(0, BLOCK_K)
    ptrs = S + h_off + rows.to(tl.int64)[:, None] * stride_n + cols.to(tl.int64)[None, :] * stride_k
    mask = row_mask[:, None] & (cols < K)[None, :]
    return tl.load(ptrs, mask=mask, other=float("-inf")).to(tl.float32)


@triton.jit
def _load_vec(X, k0, K, BLOCK_K: tl.constexpr, other: tl.constexpr):
    """X[k0:k0+BLOCK_K] as fp32 (BLOCK_K,) with ``other`` past K (X contiguous)."""
    cols = k0 + tl.arange(0, BLOCK_K)
    return tl.load(X + cols, mask=cols < K, other=other).to(tl.float32)


@triton.jit
def _row_share(logc2, rsum):
    """c / rsum per row: the plan's entry at (j, k) is ``exp2(x + b - rowmax) * c / rsum``; 0 for a zero-weight row
    or one with no reachable cluster (rsum = 0), never inf * 0."""
    return tl.where(rsum > 0.0, tl.exp2(logc2 - tl.log2(tl.where(rsum > 0.0, rsum, 1.0))), 0.0)


# ----------------------------------------------------------------------------------------------------
# Cluster LSE: one pass over S per Sinkhorn iteration
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _cluster_partials_kernel(
    S,  # (H, N, K) scores, any float dtype, any strides
    B,  # (H, K) fp32 cluster potentials, contiguous (unused when not HAS_B)
    LOGC,  # (N,) fp32 log sample weights
    A_WS,  # (H, N) fp32 workspace for the sample potentials (multi-chunk path, and column masses' fallback)
    PMAX,  # (H, P, K) fp32 out: per-program running max (base 2)
    PSUM,  # (H, P, K) fp32 out: per-program sum of exp2(. - max)
    N,
    K,
    P,
    stride_h,
    stride_n,
    stride_k,
    scale2,  # inv_eps * log2(e)
    HAS_B: tl.constexpr,
    COLUMN_MASS: tl.constexpr,  # (needs HAS_B) PSUM holds the plan's column masses (PMAX unused), A_WS every row's a
    ONE_CHUNK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,
):
    tl.static_assert(HAS_B or not COLUMN_MASS, "column masses need b: the cold pass sums in log domain")
    K, stride_n, stride_h = _multiples_of(VEC, K, stride_n, stride_h)
    pid = tl.program_id(0)
    h = tl.program_id(1)
    h_off = h.to(tl.int64) * stride_h
    part_off = (h.to(tl.int64) * P + pid) * K
    n_tiles = tl.cdiv(N, BLOCK_N)
    if ONE_CHUNK:
        tl.static_assert(BLOCK_N * BLOCK_K <= 65536, "one-chunk tile too large for registers")
        cols = tl.arange(0, BLOCK_K)
        if HAS_B:
            b2 = _load_vec(B + h * K, 0, K, BLOCK_K, float("-inf")) * _LOG2E  # (BLOCK_K,)
        pmax = tl.full((BLOCK_K,), float("-inf"), tl.float32)
        psum = tl.zeros((BLOCK_K,), tl.float32)
        for t in range(pid, n_tiles, P):
            rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
            row_mask = rows < N
            logc2 = tl.load(LOGC + rows, mask=row_mask, other=float("-inf")) * _LOG2E  # (BLOCK_N,)
            x2 = _load_tile(S, h_off, rows, row_mask, 0, K, stride_n, stride_k, BLOCK_K) * scale2  # (BN, BK)
            if HAS_B:
                rmax = tl.max(x2 + b2[None, :], 1)
                e = tl.exp2(x2 + b2[None, :] - _finite_or_zero(rmax)[:, None])  # (BN, BK), each <= 1
                rsum = tl.sum(e, 1)
                a2 = _sample_step2(logc2, _lse2(rmax, rsum))
                if COLUMN_MASS:
                    # The plan's entries are e * c / rsum (<= c): reuse the row's exp2 for the column sums.
                    tl.store(A_WS + h * N + rows, a2, mask=row_mask)  # for the merge's exact fallback
                    psum += tl.sum(e * _row_share(logc2, rsum)[:, None], 0)
                else:
                    pmax, psum = _online_lse(pmax, psum, x2 + a2[:, None], 0)
            else:
                a2 = logc2  # cold start: a = log c
                pmax, psum = _online_lse(pmax, psum, x2 + a2[:, None], 0)
        if not COLUMN_MASS:  # column masses need no max
            tl.store(PMAX + part_off + cols, pmax, mask=cols < K)
        tl.store(PSUM + part_off + cols, psum, mask=cols < K)
    else:
        if HAS_B:
            # Phase 1: sample potentials of all this program's rows, K streamed in chunks.
            for t in range(pid, n_tiles, P):
                rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
                row_mask = rows < N
                rmax = tl.full((BLOCK_N,), float("-inf"), tl.float32)
                rsum = tl.zeros((BLOCK_N,), tl.float32)
                for k0 in range(0, K, BLOCK_K):
                    b2 = _load_vec(B + h * K, k0, K, BLOCK_K, float("-inf")) * _LOG2E
                    x2 = _load_tile(S, h_off, rows, row_mask, k0, K, stride_n, stride_k, BLOCK_K) * scale2
                    rmax, rsum = _online_lse(rmax, rsum, x2 + b2[None, :], 1)
                logc2 = tl.load(LOGC + rows, mask=row_mask, other=float("-inf")) * _LOG2E
                tl.store(A_WS + h * N + rows, _sample_step2(logc2, _lse2(rmax, rsum)), mask=row_mask)
            # The same program reads these rows back below, possibly from other threads.
            tl.debug_barrier()
        # Phase 2: per chunk of clusters, fold all this program's rows into registers, store once.
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            pmax = tl.full((BLOCK_K,), float("-inf"), tl.float32)
            psum = tl.zeros((BLOCK_K,), tl.float32)
            if COLUMN_MASS:
                b2 = _load_vec(B + h * K, k0, K, BLOCK_K, float("-inf")) * _LOG2E
            for t in range(pid, n_tiles, P):
                rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
                row_mask = rows < N
                if HAS_B:
                    a2 = tl.load(A_WS + h * N + rows, mask=row_mask, other=float("-inf"))
                else:
                    a2 = tl.load(LOGC + rows, mask=row_mask, other=float("-inf")) * _LOG2E
                x2 = _load_tile(S, h_off, rows, row_mask, k0, K, stride_n, stride_k, BLOCK_K) * scale2
                if COLUMN_MASS:
                    # The plan's entries exp2(x + b + a) are <= c: a plain sum, no running max to rescale.
                    psum += tl.sum(tl.exp2(x2 + b2[None, :] + a2[:, None]), 0)
                else:
                    pmax, psum = _online_lse(pmax, psum, x2 + a2[:, None], 0)
            if not COLUMN_MASS:
                tl.store(PMAX + part_off + cols, pmax, mask=cols < K)
            tl.store(PSUM + part_off + cols, psum, mask=cols < K)


@triton.jit
def _merge_masses_kernel(
    PSUM,  # (H, P, K) fp32: per-program column masses of the plan
    B,  # (H, K) fp32 cluster potentials
    OUT,  # (H, K) fp32 out: cluster LSE (natural log)
    S,  # the scores and the sample potentials, read only by the exact fallback
    A_WS,  # (H, N) fp32 base-2 sample potentials of this pass
    P,
    N,
    K,
    stride_h,
    stride_n,
    stride_k,
    scale2,
    mass_floor,  # below it a column's mass may have lost terms to exp2 underflow
    BLOCK_P: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT_ROWS: tl.constexpr,
):
    """OUT[h, k] = ln(2) * (log2 sum_p PSUM[h, p, k] - b2[k]), partials summed BLOCK_P at a time in a fixed order.

    Every plan entry below 2**-126 may have been flushed to 0, so a column whose mass is below ``mass_floor``
    (N * 2**-100: the lost part is then under 2**-26 of it) is not trusted: if the block has one, its LSE is
    recomputed from the scores and the stored sample potentials, exactly as the log-domain pass would (reading
    N x BLOCK scores; only while a cluster holds next to no mass: after a far-off warm start or extrapolated step).
    A cluster with b = -inf (weight 0) gets -inf: the loop never reads it.
    """
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1).to(tl.int64)
    col_mask = cols < K
    lse2, untrusted = _lse_from_masses(PSUM, B, h, P, K, K, cols, col_mask, mass_floor, BLOCK_P, BLOCK)
    if tl.sum(untrusted.to(tl.int32), 0) > 0:
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for r0 in range(0, N, EXACT_ROWS):
            rows = r0 + tl.arange(0, EXACT_ROWS)
            row_mask = rows < N
            a2 = tl.load(A_WS + h * N + rows, mask=row_mask, other=float("-inf"))
            x2 = _load_tile(S, h * stride_h, rows, row_mask, pid * BLOCK, K, stride_n, stride_k, BLOCK) * scale2
            m, s = _online_lse(m, s, x2 + a2[:, None], 0)
        lse2 = tl.where(untrusted, _lse2(m, s), lse2)
    tl.store(OUT + h * K + cols, lse2 * _LN2, mask=col_mask)


# ----------------------------------------------------------------------------------------------------
# Read-out: labels, codes and the transport score, per row
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _row_stats(
    S, B, h_off, rows, row_mask, K, stride_n, stride_k, inv_eps, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr
):
    """Over all K in chunks: argmax of x = S * inv_eps + b (lowest index on ties), and the base-2
    running (max, sum) of the softmax of x."""
    rmax = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    rsum = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    label = tl.zeros((BLOCK_N,), tl.int64)
    for k0 in range(0, K, BLOCK_K):
        x = _load_tile(S, h_off, rows, row_mask, k0, K, stride_n, stride_k, BLOCK_K) * inv_eps
        x = x + _load_vec(B, k0, K, BLOCK_K, float("-inf"))[None, :]
        chunk_best = tl.max(x, 1)
        chunk_label = tl.argmax(x, 1, tie_break_left=True).to(tl.int64) + k0
        label = tl.where(chunk_best > best, chunk_label, label)  # strict: an earlier chunk wins ties
        best = tl.maximum(best, chunk_best)
        rmax, rsum = _online_lse(rmax, rsum, x * _LOG2E, 1)
    return label, rmax, rsum


@triton.jit
def _assign_kernel(
    S,  # (H, N, K) scores
    B,  # (H, K) fp32 potentials, contiguous
    LABELS,  # (H, N) int64 out, contiguous
    CODES,  # (H, N, K) fp32 out, contiguous (unused when not WANT_CODES)
    N,
    K,
    stride_h,
    stride_n,
    stride_k,
    inv_eps,
    WANT_CODES: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,
):
    K, stride_n, stride_h = _multiples_of(VEC, K, stride_n, stride_h)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1).to(tl.int64)
    h_off = h * stride_h
    row_mask = rows < N
    b_row = B + h * K
    label, rmax, rsum = _row_stats(S, b_row, h_off, rows, row_mask, K, stride_n, stride_k, inv_eps, BLOCK_N, BLOCK_K)
    tl.store(LABELS + h * N + rows, label, mask=row_mask)
    if WANT_CODES:
        # Second sweep over the row tile (from L1/L2 when K fits one chunk): codes written exactly once.
        shift = _finite_or_zero(rmax)[:, None]
        inv_sum = (1.0 / tl.where(row_mask, rsum, 1.0))[:, None]  # rsum > 0 on every real row
        out_rows = CODES + (h * N + rows.to(tl.int64))[:, None] * K
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            x = _load_tile(S, h_off, rows, row_mask, k0, K, stride_n, stride_k, BLOCK_K) * inv_eps
            x = x + _load_vec(b_row, k0, K, BLOCK_K, float("-inf"))[None, :]
            codes = tl.exp2(x * _LOG2E - shift) * inv_sum
            tl.store(out_rows + cols[None, :], codes, mask=row_mask[:, None] & (cols < K)[None, :])


@triton.jit
def _row_transport_kernel(
    S,  # (H, N, K) scores
    B,  # (H, K) fp32 potentials, contiguous
    OUT,  # (H, N) fp32 out: sum_k codes[j, k] * S[j, k]
    N,
    K,
    stride_h,
    stride_n,
    stride_k,
    inv_eps,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    VEC: tl.constexpr,
):
    K, stride_n, stride_h = _multiples_of(VEC, K, stride_n, stride_h)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1).to(tl.int64)
    h_off = h * stride_h
    row_mask = rows < N
    b_row = B + h * K
    _, rmax, rsum = _row_stats(S, b_row, h_off, rows, row_mask, K, stride_n, stride_k, inv_eps, BLOCK_N, BLOCK_K)
    shift = _finite_or_zero(rmax)[:, None]
    acc = tl.zeros((BLOCK_N,), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        s = _load_tile(S, h_off, rows, row_mask, k0, K, stride_n, stride_k, BLOCK_K)
        x = s * inv_eps + _load_vec(b_row, k0, K, BLOCK_K, float("-inf"))[None, :]
        weight = tl.exp2(x * _LOG2E - shift)
        acc += tl.sum(weight * tl.where(s == float("-inf"), 0.0, s), 1)  # a forbidden pair has no mass
    tl.store(OUT + h * N + rows, acc / tl.where(row_mask, rsum, 1.0), mask=row_mask)


# ----------------------------------------------------------------------------------------------------
# Host launchers
# ----------------------------------------------------------------------------------------------------


@dataclass
class DenseWorkspace:
    """Buffers reused across ``dense_cluster_lse`` calls, so an iteration allocates nothing but its
    (H, K) output and can be captured in a CUDA graph."""

    launch: DenseLaunch
    pmax: torch.Tensor  # (H, P, K) fp32
    psum: torch.Tensor  # (H, P, K) fp32
    a: torch.Tensor  # (H, N) fp32 sample potentials, or (0,) when nothing reads them back (one chunk, log-domain sums)

    @classmethod
    def for_scores(cls, scores: torch.Tensor, launch: DenseLaunch | None = None) -> DenseWorkspace:
        h, n, k = scores.shape
        launch = launch or default_launch(scores)
        p = launch.n_programs
        pmax = torch.empty((h, p, k), dtype=torch.float32, device=scores.device)
        psum = torch.empty((h, p, k), dtype=torch.float32, device=scores.device)
        a = torch.empty(cls._a_shape(launch, h, n), dtype=torch.float32, device=scores.device)
        return cls(launch, pmax, psum, a)

    @staticmethod
    def _a_shape(launch: DenseLaunch, h: int, n: int) -> tuple[int, ...]:
        return (h, n) if launch.column_mass or not launch.one_chunk else (0,)

    def check_fits(self, h: int, n: int, k: int) -> None:
        """A workspace is sized for one (H, N, K): the kernels write its buffers without bounds of their own."""
        p = self.launch.n_programs
        _check_row_tiles(p, self.launch.row_tiles(n), n)
        if self.psum.shape != (h, p, k) or self.a.shape != self._a_shape(self.launch, h, n):
            raise ValueError(
                f"this DenseWorkspace was made for other scores (partials {tuple(self.psum.shape)}, sample potentials "
                f"{tuple(self.a.shape)}); scores (H, N, K) = ({h}, {n}, {k}) need DenseWorkspace.for_scores(scores)"
            )


def _check_scores(scores: torch.Tensor) -> tuple[int, int, int]:
    if scores.dim() != 3:
        raise ValueError(f"scores must be (H, N, K), got shape {tuple(scores.shape)}")
    if scores.dtype not in KERNEL_DTYPES:
        raise TypeError(f"scores must be float32, float16 or bfloat16, got {scores.dtype}")
    return scores.shape


def _potentials(b: torch.Tensor, h: int, k: int) -> torch.Tensor:
    if b.shape != (h, k):
        raise ValueError(f"b must be (H, K) = ({h}, {k}), got {tuple(b.shape)}")
    return as_float32(b)


def is_transposed(scores: torch.Tensor) -> bool:
    """S (H, N, K) contiguous along N rather than K: a transposed view of an (H, K, N) tensor, read without a copy."""
    h, n, k = scores.shape
    return n > 1 and k > 1 and scores.stride(1) == 1 and scores.stride(2) != 1


def default_launch(scores: torch.Tensor, *, readout: bool = False) -> DenseLaunch:
    """``dense_launch`` for these scores: their shape, device, layout and element size; ``readout``: the tiles of the
    labels, codes and transport-score kernels (never one-row tiles: their grid has a program per tile)."""
    h, n, k = scores.shape
    return dense_launch(
        n, k, h, scores.device, transposed=is_transposed(scores), itemsize=scores.element_size(), row_tiles=not readout
    )


def vector_width(scores: torch.Tensor, launch: DenseLaunch) -> int:
    """Elements per 16-byte access along K (8 for 16-bit scores, 4 for fp32) that divide K and the row and head
    strides; 1 when rows are not contiguous (a transposed view), nothing larger divides them, or the launch says
    so (``vector_loads=False``: for A/B timing; sm_90 cubins show 16-byte loads with it, 2-byte ones without)."""
    h, n, k = scores.shape
    stride_h, stride_n, stride_k = scores.stride()
    if stride_k != 1 or not launch.vector_loads:
        return 1
    vec = 16 // scores.element_size()
    # A stride that is never multiplied by a nonzero index (one head, one row) may be rounded freely.
    while vec > 1 and (k % vec or (n > 1 and stride_n % vec) or (h > 1 and stride_h % vec)):
        vec //= 2
    return vec


def _options(num_warps: int, fp_fusion: bool) -> dict:
    """Compile options. ``fp_fusion=False`` keeps ``S * inv_eps + b`` two roundings, as torch computes it,
    so labels tie-break like ``torch.argmax``; the iteration kernels may fuse (an FMA is more accurate)."""
    return compile_options(num_warps=num_warps, enable_fp_fusion=fp_fusion)


def dense_cluster_lse(
    scores: torch.Tensor,
    b: torch.Tensor | None,
    log_c: torch.Tensor,
    inv_eps: float,
    *,
    workspace: DenseWorkspace | None = None,
) -> torch.Tensor:
    """``L[h, k] = LSE_j( S[h, j, k] * inv_eps + a[h, j] )`` with ``a = log_c - LSE_k(S * inv_eps + b)``.

    scores (H, N, K) fp32/fp16/bf16, any strides; b (H, K) or None (cold start: ``a = log_c``);
    log_c (N,) fp32, -inf for a zero-weight sample. Returns (H, K) fp32, -inf for an unreachable
    cluster and, summing column masses, for a cluster with b = -inf (it holds no mass; the solver's step for a
    zero-weight cluster never reads it). Two launches, no host synchronisation, bitwise deterministic for a given
    workspace.
    """
    h, n, k = _check_scores(scores)
    ws = workspace or DenseWorkspace.for_scores(scores)
    ws.check_fits(h, n, k)
    cfg = ws.launch
    log_c = as_float32(log_c)
    has_b = b is not None
    b = _potentials(b, h, k) if has_b else log_c  # any fp32 pointer; never read when HAS_B is False
    column_mass = has_b and cfg.column_mass
    scale2 = float(inv_eps) * LOG2E
    _cluster_partials_kernel[(cfg.n_programs, h)](
        scores, b, log_c, ws.a, ws.pmax, ws.psum,
        n, k, cfg.n_programs, *scores.stride(), scale2,
        HAS_B=has_b, COLUMN_MASS=column_mass, ONE_CHUNK=cfg.one_chunk, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        VEC=vector_width(scores, cfg), **_options(cfg.num_warps, fp_fusion=True),
    )  # fmt: skip
    if not column_mass:
        return merge_partials(ws.pmax, ws.psum)
    out = torch.empty((h, k), dtype=torch.float32, device=scores.device)
    _merge_masses_kernel[(triton.cdiv(k, MERGE_BLOCK_K), h)](
        ws.psum, b, out, scores, ws.a,
        cfg.n_programs, n, k, *scores.stride(), scale2, n * MASS_FLOOR_PER_SAMPLE,
        BLOCK_P=MERGE_BLOCK_P, BLOCK=MERGE_BLOCK_K, EXACT_ROWS=EXACT_FALLBACK_ROWS, **merge_options(),
    )  # fmt: skip
    return out


def _readout_launch(scores: torch.Tensor, launch: DenseLaunch | None) -> DenseLaunch:
    return launch or default_launch(scores, readout=True)


def dense_assign(
    scores: torch.Tensor,
    b: torch.Tensor,
    inv_eps: float,
    want_codes: bool,
    *,
    launch: DenseLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """labels (H, N) int64 ``= argmax_k(S * inv_eps + b)`` (lowest index on ties) and, when asked,
    codes (H, N, K) fp32 ``= softmax_k(S * inv_eps + b)``; the codes are the only K x N memory written."""
    h, n, k = _check_scores(scores)
    b = _potentials(b, h, k)
    cfg = _readout_launch(scores, launch)
    labels = torch.empty((h, n), dtype=torch.int64, device=scores.device)
    codes = torch.empty((h, n, k), dtype=torch.float32, device=scores.device) if want_codes else None
    _assign_kernel[(cfg.row_tiles(n), h)](
        scores, b, labels, codes if want_codes else labels,
        n, k, *scores.stride(), float(inv_eps),
        WANT_CODES=want_codes, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, VEC=vector_width(scores, cfg),
        **_options(cfg.num_warps, fp_fusion=False),
    )  # fmt: skip
    return labels, codes


def dense_transport_score(
    scores: torch.Tensor,
    b: torch.Tensor,
    log_c: torch.Tensor,
    inv_eps: float,
    *,
    launch: DenseLaunch | None = None,
) -> torch.Tensor:
    """``<P, S>`` per head (H,) float64: ``sum_jk exp(log_c[j]) * codes[j, k] * S[j, k]``, -inf pairs skipped.

    Each row's ``sum_k codes * S`` is an fp32 kernel output; the weighted sum over rows is float64.
    """
    h, n, k = _check_scores(scores)
    b = _potentials(b, h, k)
    cfg = _readout_launch(scores, launch)
    rows = torch.empty((h, n), dtype=torch.float32, device=scores.device)
    _row_transport_kernel[(cfg.row_tiles(n), h)](
        scores, b, rows, n, k, *scores.stride(), float(inv_eps),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, VEC=vector_width(scores, cfg),
        **_options(cfg.num_warps, fp_fusion=False),
    )  # fmt: skip
    weights = log_c.to(torch.float64).exp()  # (N,); exp(-inf) = 0 drops zero-weight samples
    return (rows.to(torch.float64) * weights).sum(-1)
