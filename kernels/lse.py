"""Device building blocks shared by the dense and features kernels (``sinkhorn_dense``, ``sinkhorn_features``).

Everything here is a ``@triton.jit`` helper, inlined into the kernels that call it; nothing is launched from here.

* Online log-sum-exp in base 2 (DESIGN.md §4): ``_online_lse`` folds a tile of base-2 logits into a running
  (max, sum of exp2) along one axis, ``_lse2`` reads the log2-sum-exp2 back, ``_sample_step2`` turns a row's LSE
  into its sample potential ``a = log c - LSE``. Every running max goes through ``_finite_or_zero`` before it is
  subtracted, so a masked lane (-inf) never makes ``-inf - -inf`` = NaN.
* The second stage of the cluster reduction: each program of a cluster-LSE grid leaves its (K,) partials in an
  (H, P, K) buffer, and the merges read them BLOCK_P at a time in program order (``_partials_tile``): no atomics,
  bitwise reproducible. ``_lse_from_masses`` merges column masses into the cluster LSE and flags the clusters too
  light to trust (the merges then recompute those exactly).
* ``_multiple_of``: the alignment hint that lets the compiler emit 16-byte loads for sizes and strides the host
  checked are multiples of the vector width.

Helpers only one family uses stay in its own file.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .utils import LOG2E

_LOG2E = tl.constexpr(LOG2E)


# ----------------------------------------------------------------------------------------------------
# Online log-sum-exp (base 2) and the alignment hint
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _finite_or_zero(m):
    """A running max that is safe to subtract: -inf (nothing seen yet) becomes 0, so exp2(-inf - 0) = 0."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _multiple_of(VEC: tl.constexpr, x):
    """``x``, which the host checked is a multiple of VEC, rounded down to one (a no-op): the compiler can then
    prove it, which Triton's own argument specialisation does only for multiples of 16."""
    if VEC > 1:
        x = (x // VEC) * VEC
    return x


@triton.jit
def _online_lse(m, s, x, AXIS: tl.constexpr):
    """Fold x (base-2 logits) into a running (max m, sum s of exp2(x - m)) along AXIS.

    One exp2 per element plus one per running entry; the new max is taken first so the tile's terms
    are never rescaled twice.
    """
    m_new = tl.maximum(m, tl.max(x, AXIS))
    shift = _finite_or_zero(m_new)
    s = s * tl.exp2(m - shift) + tl.sum(tl.exp2(x - tl.expand_dims(shift, AXIS)), AXIS)
    return m_new, s


@triton.jit
def _lse2(m, s):
    """log2 of sum_i exp2(x_i) from its running (max, sum); -inf when nothing was summed."""
    return tl.where(s > 0.0, _finite_or_zero(m) + tl.log2(tl.where(s > 0.0, s, 1.0)), float("-inf"))


@triton.jit
def _sample_step2(logc2, lse2):
    """a = log c - LSE_k(x + b) in base 2; a sample with no reachable cluster, or out of range, gets -inf."""
    return tl.where(lse2 == float("-inf"), float("-inf"), logc2 - _finite_or_zero(lse2))


# ----------------------------------------------------------------------------------------------------
# Merging the (H, P, K) partials of a cluster-LSE pass
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _partials_tile(h, p0, P, row_stride, cols, col_mask, BLOCK_P: tl.constexpr):
    """Offsets (BLOCK_P, BLOCK) of partials p0 .. p0 + BLOCK_P - 1 of clusters ``cols`` in an (H, P, row_stride)
    buffer (row_stride >= K: the features kernel pads its rows to whole chunks), and their mask: the merges read a
    tile of partials per step, in a fixed order."""
    parts = p0 + tl.arange(0, BLOCK_P)
    return (h * P + parts[:, None]) * row_stride + cols[None, :], (parts < P)[:, None] & col_mask[None, :]


@triton.jit
def _lse_from_masses(
    PSUM, B, h, P, K, row_stride, cols, col_mask, mass_floor, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr
):  # fmt: skip
    """(lse2, untrusted) for clusters ``cols``: the base-2 cluster LSE ``log2(sum_p PSUM[h, p, k]) - b2[k]`` (partials
    summed BLOCK_P at a time, a fixed order), and which clusters hold under ``mass_floor`` (see the merges)."""
    total = tl.zeros((BLOCK,), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        off, mask = _partials_tile(h, p0, P, row_stride, cols, col_mask, BLOCK_P)
        total += tl.sum(tl.load(PSUM + off, mask=mask, other=0.0), 0)
    b2 = tl.load(B + h * K + cols, mask=col_mask, other=float("-inf")) * _LOG2E
    has_b = b2 > float("-inf")
    lse2 = tl.where(has_b & (total > 0.0), tl.log2(tl.where(total > 0.0, total, 1.0)) - b2, float("-inf"))
    return lse2, col_mask & has_b & (total < mass_floor)
