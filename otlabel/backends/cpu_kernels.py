"""Compiled CPU loops (Numba) for the cached-kernel iteration, with a pure-PyTorch fallback.

One Sinkhorn iteration on the cached kernel ``G`` (N, K) needs both ``G v`` and ``G^T u`` with
``u = w / (G v)``. PyTorch can only do that as two BLAS matrix-vector calls per cache-sized tile, and a
single-threaded ``sgemv`` streams at about 70% of a plain read. The loop below fuses them per row: a
row of ``G`` (4 KB at K = 1,000) is read from memory once for its dot product with ``v`` and then again,
from L1, for the scaled accumulation into the column sums. Measured on the 2-core benchmark machine at
N = 100,000, K = 1,000: 10 ms against 21 ms for the two-``mv`` tiles in the same run (8.6 ms since rows go
four at a time).

The same compiled loops build ``G`` (one exponential per entry, a polynomial the compiler vectorises) and read the
labels and the soft codes out in one pass per row (``softmax_rows``): 2.5-3.5x torch's softmax and argmax at
4,096 x 3,000, whether or not most entries underflow (torch's softmax, unlike its ``exp``, has no slow path there).

Validation takes each row's and each column's maximum and the smallest score of float32 scores in one read
(``score_extremes_rows``), as integer maxima and minima over order keys of the float bits, which LLVM vectorises.

Each entry point takes one head (N, K) or a batch of heads (H, N, K) and loops over the heads inside one compiled
call, each head in the same order as on its own: a call per head cost ~5 us of Python and dispatch, more than the
pass itself for many small heads (50 heads of 256 x 10: a fused pass 0.32 -> 0.05 ms).

Numba is a dependency of otlabel, but the library works without it (this module reports
``available() is False`` and the operator keeps its PyTorch path); ``OTLABEL_NUMBA=0`` forces the fallback.
The loop runs without the GIL, so the caller's own thread pool splits rows across cores exactly as for the
PyTorch path: same threads, same fixed order of partial sums, bitwise reproducible for a given machine and
thread count.
"""

from __future__ import annotations

import functools
import os

import numpy as np
import torch

try:  # an optional speed-up, never a reason to fail
    if os.environ.get("OTLABEL_NUMBA", "1") == "0":
        raise ImportError("disabled by OTLABEL_NUMBA=0")
    import numba
except ImportError:  # pragma: no cover - run in a subprocess by tests/test_numba_fallback.py (OTLABEL_NUMBA=0)
    numba = None

# Reassociation lets the compiler vectorise the dot product and the accumulation; the other fast-math
# flags (no NaNs, no infinities) are left off because v holds exact zeros for unreachable clusters.
_FASTMATH = {"reassoc", "contract"}
# Rows per fp32 partial, added into the float64 total after each tile. The partial's rounding grows with its rows and
# sets the floor of the marginal error a float32 solve reaches. Measured (2-core VM, cosine scores, eps 0.05), floor
# at 256 -> 128 -> 64 rows: 1.3e-7 -> 6.8e-8 -> 3.9e-8 at 3,000 x 40, 1.1e-7 -> 5.1e-8 -> 3.5e-8 at 50,000 x 10,
# 2.1e-7 -> 9.9e-8 -> 5.2e-8 at 20,000 x 1,000; the pass's CPU time against 256 rows, 128: +0.1-1.0% at
# 100,000 x 1,000, +0.7-1.3% at 1,000,000 x 10, +1.2-1.7% for 50 heads of 256 x 10; 64: +1.3-1.8%, +2.8-4.8%, +3%
# (the flush, a float64 add per cluster, and the tile's set-up weigh most on short rows); at 200,000 x 100 neither
# stood out of the run-to-run spread (+-4%). A float64 partial (floors 0.8-1.5e-8) cost +5% at 100,000 x 1,000, a
# compensated (Kahan) float32 one, its adds compiled without reassociation, 3x at 50 x 256 x 10.
TILE_ROWS = 128
# Rows at least this long take their maximum vectorised (:func:`_first_max`), shorter ones in a scalar loop (faster
# there: its set-up and the scan after it cost more than a short row). Measured on one thread, short-row loop (the
# exponentials a block at a time, the first maximum found without a branch) against long-row: the codes and the
# labels from the logits 0.57x and 0.42x at K = 12, 0.84x and 0.55x at K = 20, 1.01x and 0.73x at K = 24, 1.55x and
# 1.43x at K = 48, 2.1x and 1.8x at K = 100; the labels from the kernel 4.4x at K = 10, 1.03x at K = 64, 0.83x at
# K = 96, 0.5x at K = 500.
SOFTMAX_VECTOR_MIN_K = 24
# The two read-outs agree bitwise except on NaN logits (validation rejects NaN scores): the short one's float maximum
# skips a NaN (label: the first maximum of the other logits; the NaN's code 0, the row's other codes finite), the long
# one's order keys take a positive NaN as the maximum, as torch.argmax does (that row's codes NaN). So at K = 16-23
# such rows read out differently since the threshold moved from 16 (session 22).
ARGMAX_VECTOR_MIN_K = 96
# Kernel rows shorter than this take their exponentials a block of rows at once (:func:`_exp_block`): the compiler's
# vector loop over one row leaves the entries past its last full vector to a scalar remainder, a whole short row.
# Measured on one thread against a row at a time (the same values, bitwise): 0.23x at K = 4, 0.41x at K = 10, 0.87x
# at K = 32; 1.13x at K = 48, a multiple of the vector width, which the row loop covers; 0.93x at K = 56-60.
EXP_BLOCK_MAX_K = 40
EXP_BLOCK_ENTRIES = 2048  # per block: 8 KB of float32, in L1 with its scratch


def available() -> bool:
    return numba is not None


def _jit(fn, **extra):
    """Numba-compile ``fn`` (on first call), cached on disk where Numba finds a writable place for it."""
    # error_model="numpy": a division by zero gives inf/NaN as in IEEE (and as in torch), which the operator
    # detects and answers exactly; Numba's default ("python") would raise ZeroDivisionError from the thread.
    options = dict(nogil=True, fastmath=_FASTMATH, error_model="numpy", **extra)
    try:
        return numba.njit(cache=True, **options)(fn)
    except RuntimeError:  # no writable cache location (read-only install, no usable HOME): compile per process
        return numba.njit(**options)(fn)


if numba is not None:

    @_jit
    def _fused_head(kernel, v, weights, divide, lo, hi, out):  # pragma: no cover - compiled
        """One head: ``out[k] += sum_{lo <= j < hi} kernel[j, k] * weights[j] / (kernel[j] . v)`` (no division when
        ``divide`` is False), in fp32 partials of ``TILE_ROWS`` rows added into the float64 ``out``.

        Rows go four at a time: each load of ``v[k]`` and of ``partial[k]`` then serves four rows, which took
        the pass from 10.1 to 8.6 ms at N = 100,000, K = 1,000 (2 threads; a plain read: 5.4 ms)."""
        n_clusters = kernel.shape[1]
        partial = np.zeros_like(kernel[0])
        for start in range(lo, hi, TILE_ROWS):
            stop = min(start + TILE_ROWS, hi)
            partial[:] = 0
            j = start
            while j + 4 <= stop:
                r0, r1, r2, r3 = kernel[j], kernel[j + 1], kernel[j + 2], kernel[j + 3]
                u0, u1, u2, u3 = weights[j], weights[j + 1], weights[j + 2], weights[j + 3]
                if divide:
                    d0 = np.float32(0.0)  # Numba widens these to float64 for a float64 kernel
                    d1 = np.float32(0.0)
                    d2 = np.float32(0.0)
                    d3 = np.float32(0.0)
                    for k in range(n_clusters):
                        vk = v[k]
                        d0 += r0[k] * vk
                        d1 += r1[k] * vk
                        d2 += r2[k] * vk
                        d3 += r3[k] * vk
                    u0, u1, u2, u3 = u0 / d0, u1 / d1, u2 / d2, u3 / d3
                for k in range(n_clusters):
                    partial[k] += (u0 * r0[k] + u1 * r1[k]) + (u2 * r2[k] + u3 * r3[k])
                j += 4
            for tail in range(j, stop):  # the last rows of the tile, one at a time
                row, u = kernel[tail], weights[tail]
                if divide:
                    dot = np.float32(0.0)
                    for k in range(n_clusters):
                        dot += row[k] * v[k]
                    u = u / dot
                for k in range(n_clusters):
                    partial[k] += u * row[k]
            for k in range(n_clusters):
                out[k] += partial[k]

    @_jit
    def _fused_rows(kernel, v, weights, divide, lo, hi, out):  # pragma: no cover - compiled
        """:func:`_fused_head` for every head ``h`` of ``kernel`` (H, N, K) with ``v[h]``, ``out[h]`` ((H, K) each)
        and ``weights[h]`` ((H, N), or (1, N) shared by all heads): the same compiled loop, so the same order of
        partial sums, as a call per head, without the Python and dispatch each such call cost (~5 us: 50 heads of
        256 x 10, 0.32 -> 0.05 ms a pass)."""
        for h in range(kernel.shape[0]):
            _fused_head(kernel[h], v[h], weights[h % weights.shape[0]], divide, lo, hi, out[h])


# Solves of at most this many scores (H * N * K) may run their plain steps in one compiled call (:func:`plain_steps`):
# a torch step there costs ~60 us of per-operation overhead, the compiled one 1 us at 64 x 10 and 15 us at 131,072
# scores. The same bound as the serial passes' (torch_backend.SERIAL_PASS_ELEMENTS): such passes run on the caller's
# thread, so one call holds the whole loop.
PLAIN_STEPS_MAX_ELEMENTS = 1 << 17
# A budgeted call (acceleration="auto"'s plain start, see otlabel.solver.PLAIN_START) judges after every step whether
# tol is in reach: at the mean rate of fall over the last PLAIN_RATE_WINDOW steps, OUTLOOK times the steps still needed
# must fit the budget. Plain steps often speed up after a slow start (the rate seen then is pessimistic): with the whole
# count (OUTLOOK 1), 6 of the 1,161 solves that plain steps finish within 100 were given up and mixed instead (2,160
# small solves at max_iter 1000, cold and warm, eps 0.005-0.1; a mixed step costs ~180 us, a plain one 1-15 us); with
# half, none, and a plain start that falls short takes 30 steps on average before the mixing (100 without judging)
PLAIN_RATE_WINDOW = 8
OUTLOOK = 0.5

if numba is not None:

    @_jit
    def _out_of_reach(worst, step, tol, budget):  # pragma: no cover - compiled
        """Whether, after ``step + 1`` steps with the errors ``worst[: step + 1]`` (a cold start's first inf), ``tol``
        is out of reach within ``budget`` steps in all at the mean rate of fall over the last ``PLAIN_RATE_WINDOW``
        (``OUTLOOK`` of the steps that rate needs): the error did not fall there, or would fall too slowly. Needs two
        measured errors."""
        oldest = max(step - PLAIN_RATE_WINDOW, 0)
        if not worst[oldest] < np.inf:
            oldest += 1  # a cold start's first step measures nothing
        if oldest >= step:
            return False
        newest, previous = worst[step], worst[oldest]
        if not newest < previous:
            return True
        needed = (step - oldest) * np.log(tol / newest) / np.log(newest / previous)
        return step + 1 + OUTLOOK * needed > budget

    @_jit
    def _plain_steps(kernel, weights, b0, log_r, r, b, cold, cold_shift, threshold, tol, worst, taken,
                     budget):  # pragma: no cover  # fmt: skip
        """Plain Sinkhorn steps on the cached kernel, each as :class:`~otlabel.backends.torch_backend.
        CachedKernelOperator` and :func:`otlabel.solver.iterate` take it in torch: ``v = exp(b - b0)``, the fused
        pass (:func:`_fused_rows`, as the operator calls it: the same sums, bitwise), ``lse = log(col) - b0``,
        ``b_new = log r - lse``, the error ``sum_k |exp(b + lse) - r_k|``, then ``b`` becomes ``b_new`` less its
        mean. ``b`` (H, K) float64 is updated in place; ``worst[i]`` gets step ``i``'s largest error over the heads
        (NaN if any is NaN). A cold start (``cold``: the (H, N) or (1, N) float32 weights ``exp(log c + m - top)``
        of the rows, not empty) takes the first step from ``a = log c``: ``lse = log(col) + top - b0`` with
        ``top = cold_shift[h]``, and no error (inf).

        ``worst[:taken]`` holds the errors of the steps taken before this call (the steps here count on from them),
        and ``budget`` > 0 asks for the judgement of :func:`_out_of_reach` after each step (0: none).

        Stops at ``len(worst)`` steps, or when a step's error is below ``tol`` (``b`` is then that step's iterate,
        whose error was measured: returns the steps taken with a status 0), or before a step it cannot take as the
        operator would (status 1: ``b`` drifted more than ``threshold`` from ``b0`` (a new ``exp`` pass is due), a
        column sum was not positive (an underflow: the exact pass is due) or a potential not finite; ``b`` is then
        the last iterate, and the caller takes that step itself), or after a step that finds ``tol`` out of reach
        within ``budget`` (status 3, ``b`` the last iterate). Returns ``(steps, status)`` (steps counted from 0, those
        before the call included), status 2: all taken."""
        n_heads, n_clusters = b.shape
        col = np.zeros((n_heads, n_clusters))
        v = np.empty((n_heads, n_clusters), dtype=kernel.dtype)
        b_new = np.empty_like(b)
        for step in range(taken, worst.shape[0]):
            first = step == taken and cold.shape[1] > 0
            for h in range(n_heads):  # every head within reach of the kernel before any pass
                for k in range(n_clusters):
                    if not first and not abs(b[h, k] - b0[h, k]) <= threshold:
                        return step, 1
                    v[h, k] = np.exp(b[h, k] - b0[h, k])
            col[:] = 0.0
            _fused_rows(kernel, v, cold if first else weights, not first, 0, kernel.shape[1], col)
            largest = -np.inf
            for h in range(n_heads):
                error = 0.0
                for k in range(n_clusters):
                    if not col[h, k] > 0:
                        return step, 1
                    lse = np.log(col[h, k]) + cold_shift[h] - b0[h, k] if first else np.log(col[h, k]) - b0[h, k]
                    b_new[h, k] = log_r[k] - lse
                    error += abs(np.exp(b[h, k] + lse) - r[k])
                error = np.inf if first else error
                largest = np.nan if error != error or largest != largest else max(largest, error)
            worst[step] = largest
            if largest < tol:
                return step + 1, 0
            for h in range(n_heads):
                total = 0.0
                for k in range(n_clusters):
                    total += b_new[h, k]
                if not abs(total) < np.inf:
                    return step, 1
                mean = total / n_clusters
                for k in range(n_clusters):
                    b[h, k] = b_new[h, k] - mean
            if budget > 0 and _out_of_reach(worst, step, tol, budget):
                return step + 1, 3
        return worst.shape[0], 2


# exp(x) for float32 x <= 0 as 2^n * p(r), |r| <= ln(2)/2, with the classic degree-7 minimax polynomial of the
# Cephes library's expf (relative error ~1e-7, the float32 rounding of x itself is larger). Written out so
# the compiler vectorises it: Numba calls the scalar libm expf otherwise, five times slower than a read.
_LOG2E = np.float32(1.4426950408889634)
_LN2_HI = np.float32(0.693359375)  # ln 2 split in two so n * ln2 is exact for the n that occur here
_LN2_LO = np.float32(-2.12194440e-4)
_EXP_FLOOR = np.float32(-87.0)  # below: the result would be subnormal; it is written as an exact 0
_EXP_COEFFS = (1.9875691500e-4, 1.3981999507e-3, 8.3334519073e-3, 4.1665795894e-2, 1.6666665459e-1, 5.0000001201e-1)
_C0, _C1, _C2, _C3, _C4, _C5 = (np.float32(c) for c in _EXP_COEFFS)

if numba is not None:

    @functools.partial(_jit, inline="always")
    def _exp_shifted(x, top, out, exponent_bits):  # pragma: no cover - compiled
        """``out[k] = exp(x[k] - top)`` for a row ``x`` with ``top >= max(x)`` (``out`` may be ``x``); entries below
        ``_EXP_FLOOR`` (``-inf`` included) become exact zeros. ``exponent_bits``: an int32 scratch row."""
        two_to_n = exponent_bits.view(np.float32)  # 2^n built in the exponent field, no ldexp call
        for k in range(x.shape[0]):
            shifted = x[k] - top  # <= 0; -inf for a masked pair
            xc = max(shifted, _EXP_FLOOR)
            n = np.floor(xc * _LOG2E + np.float32(0.5))
            r = xc - n * _LN2_HI - n * _LN2_LO
            p = ((((_C0 * r + _C1) * r + _C2) * r + _C3) * r + _C4) * r + _C5
            p = p * r * r + r + np.float32(1.0)
            exponent_bits[k] = (np.int32(n) + np.int32(127)) << 23
            out[k] = p * two_to_n[k] if shifted >= _EXP_FLOOR else np.float32(0.0)

    @functools.partial(_jit, inline="always")
    def _order_key(bits):  # pragma: no cover - compiled
        """The int32 bits of a float32, remapped so that integers order as the floats do (-0 just below +0)."""
        return np.int32(bits ^ ((bits >> np.int32(31)) & np.int32(0x7FFFFFFF)))  # (Numba widens to int64 otherwise)

    @functools.partial(_jit, inline="always")
    def _first_max(x, bits):  # pragma: no cover - compiled
        """The index of the first maximum of the float32 row ``x`` (no NaN), whose int32 view is ``bits``.

        The maximum is taken over order keys: LLVM vectorises an integer max but not a float one (Numba leaves the
        fcmp without the flags it needs), and the scalar ``maxss`` chain cost 0.45 ns an entry at K = 1,000, four
        times the vectorised exp. Its first index is an integer minimum too."""
        n = bits.shape[0]
        top = np.int32(-2147483648)
        for k in range(n):
            top = max(top, _order_key(bits[k]))
        best = n - 1
        for k in range(n):  # the smallest index holding it: an integer minimum, vectorised (a scan stopping there was
            best = min(best, k if _order_key(bits[k]) == top else n - 1)  # mispredicted once a row)
        if x[best] == 0:  # +0 and -0 are one float but two keys: the first of either, as torch.argmax
            best = 0
            while x[best] != 0:
                best += 1
        return best

    @functools.partial(_jit, inline="always")
    def _logits(row, inv_eps, b, out):  # pragma: no cover - compiled
        """``out = row * inv_eps + b``; returns its maximum (a scalar loop: short rows)."""
        top = np.float32(-np.inf)
        for k in range(row.shape[0]):
            x = row[k] * inv_eps + b[k]
            out[k] = x
            top = max(top, x)
        return top

    @functools.partial(_jit, inline="always")
    def _logits_first_max(row, inv_eps, b, out, out_bits):  # pragma: no cover - compiled
        """``out = row * inv_eps + b``; returns the index of its first maximum. For long rows. ``out_bits``: ``out``
        as int32."""
        for k in range(row.shape[0]):
            out[k] = row[k] * inv_eps + b[k]
        return _first_max(out, out_bits)

    @functools.partial(_jit, inline="always")
    def _first_index_of(x, top):  # pragma: no cover - compiled
        """The first ``k`` with ``x[k] == top`` (the last index if none: ``top`` NaN), as torch.argmax takes the first
        maximum. Without a branch: a scan that stopped at it was mispredicted about once a row, which took 40% of
        the codes' time at K = 10 and more than half at K = 2."""
        best = x.shape[0] - 1
        for k in range(x.shape[0] - 2, -1, -1):
            best = k if x[k] == top else best
        return best

    @functools.partial(_jit, inline="always")
    def _exp_block(rows, exponent_bits):  # pragma: no cover - compiled
        """``rows = exp(rows)`` in place for C-contiguous rows already shifted by their maxima (entries <= 0), as one
        flat array: a short row is shorter than the compiler's vector loop, a block of them is not. The values are
        :func:`_exp_shifted`'s (``x - max`` is the same float, formed first)."""
        flat = rows.reshape(rows.shape[0] * rows.shape[1])
        _exp_shifted(flat, np.float32(0.0), flat, exponent_bits[: flat.shape[0]])

    @functools.partial(_jit, inline="always")
    def _exp_block_rows(scores, inv_eps, b0, lo, hi, kernel, row_shift):  # pragma: no cover - compiled
        """:func:`_exp_kernel_head` for short rows: each row's logits, shifted by their maximum, then the exponential
        of a block of rows as one flat array (:func:`_exp_block`). The same values, 2.4x faster at K = 10."""
        n_clusters = scores.shape[1]
        block_rows = max(1, EXP_BLOCK_ENTRIES // n_clusters)
        exponent_bits = np.empty(block_rows * n_clusters, dtype=np.int32)
        for start in range(lo, hi, block_rows):
            stop = min(start + block_rows, hi)
            for j in range(start, stop):
                row = kernel[j]
                top = _logits(scores[j], inv_eps, b0, row)
                row_shift[j] = top
                for k in range(n_clusters):
                    row[k] -= top
            _exp_block(kernel[start:stop], exponent_bits)

    @_jit
    def _exp_kernel_head(scores, inv_eps, b0, lo, hi, kernel, row_shift):  # pragma: no cover - compiled
        """One head, rows ``[lo, hi)``: ``x = scores * inv_eps + b0``, ``row_shift[j] = max_k x``,
        ``kernel = exp(x - max)``."""
        n_clusters = scores.shape[1]
        if n_clusters < EXP_BLOCK_MAX_K:
            _exp_block_rows(scores, inv_eps, b0, lo, hi, kernel, row_shift)
            return
        exponent_bits = np.empty(n_clusters, dtype=np.int32)
        for j in range(lo, hi):  # (a vectorised maximum, as in softmax_rows, was no faster here: 0.8-1.4x)
            row_shift[j] = _logits(scores[j], inv_eps, b0, kernel[j])
            _exp_shifted(kernel[j], row_shift[j], kernel[j], exponent_bits)

    @_jit
    def _exp_kernel_rows(scores, inv_eps, b0, lo, hi, kernel, row_shift):  # pragma: no cover - compiled
        """:func:`_exp_kernel_head` for every head of ``scores``, ``kernel`` (H, N, K), ``b0`` (H, K), ``row_shift``
        (H, N)."""
        for h in range(scores.shape[0]):
            _exp_kernel_head(scores[h], inv_eps, b0[h], lo, hi, kernel[h], row_shift[h])

    @_jit
    def _softmax_rows(scores, inv_eps, b, lo, hi, labels, codes, want_codes):  # pragma: no cover - compiled
        """Rows ``[lo, hi)`` of every head ``h`` (``scores`` (H, N, K), ``b`` (H, K), ``labels`` (H, N)):
        ``labels[h, j] = argmax_k x`` (the first maximum) of ``x = scores[h, j] * inv_eps + b[h]`` and, when
        ``want_codes``, ``codes[h, j] = softmax(x)``, formed in place in ``codes[h, j]`` (else in a scratch row); the
        row sum is taken in float64. For short rows (K below :data:`SOFTMAX_VECTOR_MIN_K`): the exponentials of a
        block of rows go at once (:func:`_exp_block`), and the first maximum is found without a branch."""
        n_clusters = scores.shape[2]
        block_rows = max(1, EXP_BLOCK_ENTRIES // n_clusters)
        exponent_bits = np.empty(block_rows * n_clusters, dtype=np.int32)
        scratch = np.empty(n_clusters, dtype=np.float32)
        for h in range(scores.shape[0]):
            for start in range(lo, hi, block_rows):
                stop = min(start + block_rows, hi)
                for j in range(start, stop):
                    x = codes[h, j] if want_codes else scratch
                    top = _logits(scores[h, j], inv_eps, b[h], x)
                    labels[h, j] = _first_index_of(x, top)
                    if want_codes:
                        for k in range(n_clusters):
                            x[k] -= top
                if want_codes:
                    block = codes[h, start:stop]
                    _exp_block(block, exponent_bits)
                    for x in block:
                        total = 0.0
                        for k in range(n_clusters):
                            total += x[k]
                        scale = np.float32(1.0 / total)
                        for k in range(n_clusters):
                            x[k] *= scale

    @_jit
    def _softmax_long_rows(scores, inv_eps, b, lo, hi, labels, codes, want_codes):  # pragma: no cover - compiled
        """:func:`_softmax_rows` for long rows, whose maximum is vectorised (:func:`_first_max`). The softmax tail is
        written out in both: shared as an ``inline="always"`` function it made the short rows' loop 1.3x slower at
        K = 10 (a test per row between the two maxima, 1.6-2.5x); tried again with the block loop (session 22), this
        loop took 1.10-1.17x as long at K = 50-100 and 0.85x at K = 300."""
        n_clusters = scores.shape[2]
        exponent_bits = np.empty(n_clusters, dtype=np.int32)
        scratch = np.empty(n_clusters, dtype=np.float32)
        codes_bits, scratch_bits = codes.view(np.int32), scratch.view(np.int32)
        for h in range(scores.shape[0]):
            for j in range(lo, hi):
                x, x_bits = (codes[h, j], codes_bits[h, j]) if want_codes else (scratch, scratch_bits)
                best = _logits_first_max(scores[h, j], inv_eps, b[h], x, x_bits)
                labels[h, j] = best
                if want_codes:
                    _exp_shifted(x, x[best], x, exponent_bits)
                    total = 0.0
                    for k in range(n_clusters):
                        total += x[k]
                    scale = np.float32(1.0 / total)
                    for k in range(n_clusters):
                        x[k] *= scale

    @_jit
    def _argmax_head(kernel, v, lo, hi, labels):  # pragma: no cover - compiled
        """One head: ``labels[j] = argmax_k kernel[j, k] * v[k]`` (first maximum) for rows ``[lo, hi)``. For short
        rows (K below :data:`ARGMAX_VECTOR_MIN_K`)."""
        for j in range(lo, hi):
            row = kernel[j]
            best, best_k = row[0] * v[0], 0
            for k in range(1, row.shape[0]):
                value = row[k] * v[k]
                if value > best:
                    best, best_k = value, k
            labels[j] = best_k

    @_jit
    def _argmax_long_head(kernel, v, lo, hi, labels):  # pragma: no cover - compiled
        """:func:`_argmax_head` for long rows: the products go to a scratch row, whose maximum is vectorised."""
        products = np.empty(kernel.shape[1], dtype=np.float32)
        product_bits = products.view(np.int32)
        for j in range(lo, hi):
            row = kernel[j]
            for k in range(row.shape[0]):
                products[k] = row[k] * v[k]
            labels[j] = _first_max(products, product_bits)

    @_jit
    def _argmax_rows(kernel, v, lo, hi, labels, long_rows):  # pragma: no cover - compiled
        """:func:`_argmax_head` (or :func:`_argmax_long_head`) for every head of ``kernel`` (H, N, K), ``v`` (H, K),
        ``labels`` (H, N): the same loop as a call per head (the body written out here instead compiled 4% slower
        at 100,000 x 1,000)."""
        for h in range(kernel.shape[0]):
            if long_rows:
                _argmax_long_head(kernel[h], v[h], lo, hi, labels[h])
            else:
                _argmax_head(kernel[h], v[h], lo, hi, labels[h])


if numba is not None:

    @_jit
    def _extremes_head(bits, lo, hi, row_max, col_keys):  # pragma: no cover - compiled
        """One head, rows ``[lo, hi)`` of ``bits`` (N, K), the int32 view of float32 scores: ``row_max[j]`` gets the
        bits of the row's largest order key (:func:`_order_key`, an involution: the key of a key is the float's
        bits), ``col_keys[k]`` the larger of itself and every key of column ``k``; returns the smallest key met. All
        three are integer maxima and minima, which LLVM vectorises (vpmaxsd, vpminsd), a float maximum not."""
        lowest = np.int32(2147483647)
        for j in range(lo, hi):
            row = bits[j]
            top = np.int32(-2147483648)
            low = np.int32(2147483647)
            for k in range(row.shape[0]):
                key = _order_key(row[k])
                top = max(top, key)
                low = min(low, key)
                col_keys[k] = max(col_keys[k], key)
            row_max[j] = _order_key(top)
            lowest = min(lowest, low)
        return lowest

    @_jit
    def _extremes_rows(bits, lo, hi, row_max, col_keys):  # pragma: no cover - compiled
        """:func:`_extremes_head` for every head of ``bits`` (H, N, K), ``row_max`` (H, N), ``col_keys`` (H, K)."""
        lowest = np.int32(2147483647)
        for h in range(bits.shape[0]):
            lowest = min(lowest, _extremes_head(bits[h], lo, hi, row_max[h], col_keys[h]))
        return lowest


def exp_kernel_rows(scores, inv_eps: float, b0, lo: int, hi: int, kernel, row_shift) -> None:
    """Fill rows ``[lo, hi)`` of the float32 ``kernel`` (N, K) with ``exp(scores * inv_eps + b0 - m)`` and
    ``row_shift`` (N,) with the row maxima ``m``; ``-inf`` scores give exact zeros. Or the same for every head of
    (H, N, K) scores, (H, K) ``b0``, (H, N, K) ``kernel`` and (H, N) ``row_shift``, in one compiled call. Needs
    :func:`available`. ``kernel`` may be strided (it is then filled through a C-contiguous copy of its rows)."""
    if not kernel.is_contiguous():  # the compiled loop reads a block of rows as one flat array (_exp_block)
        rows = kernel[..., lo:hi, :]
        staged = torch.empty(rows.shape, dtype=kernel.dtype)  # the same values, entry by entry
        exp_kernel_rows(scores[..., lo:hi, :], inv_eps, b0, 0, hi - lo, staged, row_shift[..., lo:hi])
        rows.copy_(staged)
        return
    s, b, g, m = _head_arrays(scores.dim() == 2, scores, b0, kernel, row_shift)
    _exp_kernel_rows(s, np.float32(inv_eps), b, lo, hi, g, m)


def softmax_rows(scores, inv_eps: float, b, lo: int, hi: int, labels, codes=None) -> None:
    """Rows ``[lo, hi)`` of the float32 logits ``x = scores * inv_eps + b`` (N, K), or of every head of (H, N, K)
    scores with (H, K) ``b``, in one pass: ``labels`` (N,) or (H, N) int64 gets the first ``argmax_k x`` and ``codes``
    (N, K) or (H, N, K) float32, if given, ``softmax(x)``; both written in place. All heads go in one compiled call
    (a call per head cost more than the pass itself for many small heads). Entries below ``e^-87`` of a row's
    largest become exact zeros (torch's softmax gives subnormals there, < 1e-38). ``codes`` may be strided (then
    filled through a C-contiguous copy of its rows). Needs :func:`available`."""
    if codes is not None and not codes.is_contiguous():  # as in exp_kernel_rows: short rows go a block at a time
        rows = codes[..., lo:hi, :]
        staged = torch.empty(rows.shape, dtype=codes.dtype)
        softmax_rows(scores[..., lo:hi, :], inv_eps, b, 0, hi - lo, labels[..., lo:hi], staged)
        rows.copy_(staged)
        return
    s, vec, out, q = _head_arrays(scores.dim() == 2, scores, b, labels, codes)
    want_codes = q is not None
    q = q if want_codes else np.empty((s.shape[0], 0, s.shape[2]), dtype=np.float32)  # unused
    rows = _softmax_rows if s.shape[2] < SOFTMAX_VECTOR_MIN_K else _softmax_long_rows
    rows(s, np.float32(inv_eps), vec, lo, hi, out, q, want_codes)


def argmax_rows(kernel, v, lo: int, hi: int, labels) -> None:
    """``labels[lo:hi] = argmax_k kernel[j, k] * v[k]`` (int64 tensor, written in place) for an (N, K) ``kernel``,
    or ``labels[h, lo:hi]`` for every head of an (H, N, K) one with (H, K) ``v``, in one compiled call. ``kernel`` may
    be given as its NumPy array (see :func:`_array`)."""
    g, vec, out = _head_arrays(kernel.ndim == 2, kernel, v, labels)
    _argmax_rows(g, vec, lo, hi, out, g.shape[2] >= ARGMAX_VECTOR_MIN_K)


def fused_matvec_rows(kernel, v: torch.Tensor | None, weights, lo: int, hi: int):
    """Float64 ``(K,)``: ``sum_j kernel[j] * weights[j] / (kernel[j] . v)`` over rows ``[lo, hi)`` of a
    C-contiguous (N, K) CPU kernel; ``v is None`` drops the division. For an (H, N, K) kernel, (H, K) ``v`` and
    (H, N) ``weights`` (a stride-0 head dimension, ``expand``ed, or (1, N): one row for all), float64 ``(H, K)``:
    every head in one compiled call, each summed in the same order as on its own. ``kernel`` and ``weights`` may be
    given as NumPy arrays (see :func:`_array`). Needs :func:`available`."""
    one_head = kernel.ndim == 2
    g, w, vec = _head_arrays(one_head, kernel, weights, v)
    if w.strides[0] == 0:  # the same weights for every head: one row, C-contiguous (no second compilation)
        w = w[:1]
    vec = np.empty((g.shape[0], 0), dtype=g.dtype) if vec is None else vec  # unused without v
    out = np.zeros((g.shape[0], g.shape[2]), dtype=np.float64)
    _fused_rows(g, vec, w, v is not None, lo, hi, out)
    return torch.from_numpy(out[0] if one_head else out)


NO_KEY = -(1 << 31)  # below every order key: where :func:`score_extremes_rows` starts a column's maximum


def score_extremes_rows(scores: torch.Tensor, lo: int, hi: int, row_max: torch.Tensor, col_keys: np.ndarray) -> int:
    """One read of rows ``[lo, hi)`` of C-contiguous float32 (H, N, K) CPU ``scores``: ``row_max[:, lo:hi]`` (a
    float32 (H, N) tensor, written in place) gets each row's maximum, the int32 (H, K) ``col_keys`` the larger of
    itself and each column's largest order key (start it at :data:`NO_KEY`; :func:`float_of_keys` reads it), and the
    smallest order key met comes back. Integer keys of the float bits, so every value is exact and the result of ranges
    taken apart and combined does not depend on their order.

    A NaN is a maximum (a positive one) or a minimum (a negative one) here: it is not propagated as by ``amax``. The
    zeros are ordered (-0 below +0), which ``amax`` does not do. The caller tells these cases apart (see
    :func:`otlabel.backends.torch_backend.score_maxima`). Needs :func:`available`."""
    lowest = _extremes_rows(_array(scores).view(np.int32), lo, hi, _array(row_max).view(np.int32), col_keys)
    return int(lowest)


def float_of_keys(keys: np.ndarray) -> torch.Tensor:
    """The float32 values whose order keys are ``keys`` (an int32 array, any shape)."""
    keys = keys.astype(np.int32, copy=False)
    return torch.from_numpy(keys ^ ((keys >> 31) & np.int32(0x7FFFFFFF))).view(torch.float32)


def _head_arrays(one_head: bool, *tensors) -> tuple:
    """The tensors' memory as NumPy arrays (:func:`_array`; ``None`` stays ``None``), each given a leading head axis
    of 1 when ``one_head``: the compiled loops all take a batch of heads."""
    arrays = [None if t is None else _array(t) for t in tensors]
    return tuple(a[None] if one_head and a is not None else a for a in arrays)


def _array(t: torch.Tensor | np.ndarray) -> np.ndarray:
    """The CPU tensor's memory as a NumPy array (no copy; detached where it requires grad, as scores may: a small
    solve converts ~20 tensors a call, and a ``detach`` costs each of them a torch call). A NumPy array as it is: the
    operator keeps its kernel's, made once (a conversion costs ~2 us)."""
    if isinstance(t, np.ndarray):
        return t
    return (t.detach() if t.requires_grad else t).numpy()


def plain_steps(kernel: np.ndarray, weights: np.ndarray, b0: torch.Tensor, log_r: torch.Tensor, r: torch.Tensor,
                b: torch.Tensor | None, cold: np.ndarray | None, cold_shift: torch.Tensor | None, threshold: float,
                tol: float | None, n_steps: int, history: list[float] = (),
                budget: int = 0) -> tuple[torch.Tensor, list[float], int]:  # fmt: skip
    """Up to ``n_steps`` plain Sinkhorn steps in one compiled call (:func:`_plain_steps`): ``(b, worst, status)``, the
    (H, K) float64 iterate reached, each step's worst error over the heads and the status (0: below ``tol``, 1:
    stopped before a step the caller must take, 2: all taken, 3: ``tol`` out of reach within ``budget``). ``kernel``
    (H, N, K) and ``weights`` ((1, N) or (H, N)) float32 NumPy arrays; ``b0`` (H, K), ``log_r`` and ``r`` (K,)
    float64 tensors; ``b`` (H, K) float64 (copied), or ``None`` for the cold start, which takes the rows' weights
    ``cold`` ((1, N) or (H, N) float32 NumPy) and their shift ``cold_shift`` (H,). ``budget`` > 0 (with a ``tol``):
    the steps the solve may take in all, ``history`` the errors of those it took before, judged with these steps'
    (see :func:`_out_of_reach`). Needs :func:`available`."""
    b = torch.zeros(b0.shape, dtype=torch.float64) if b is None else b.clone()
    cold = np.empty((1, 0), dtype=np.float32) if cold is None else cold
    shift = np.zeros(b0.shape[0]) if cold_shift is None else cold_shift.double().numpy()
    taken = len(history)
    worst = np.empty(taken + n_steps)
    worst[:taken] = history
    steps, status = _plain_steps(kernel, weights, b0.numpy(), log_r.numpy(), r.numpy(), b.numpy(), cold, shift,
                                 float(threshold), -1.0 if tol is None else float(tol), worst, taken,
                                 budget if tol is not None else 0)  # fmt: skip
    return b, worst[taken:steps].tolist(), status
