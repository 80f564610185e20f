"""The second stage of a cluster-LSE pass, shared by the dense and the features kernels.

Each program of a pass leaves its (K,) partials in an (H, P, K) buffer; a merge kernel reads them BLOCK_P at a time
in program order (no atomics: bitwise reproducible). ``merge_partials`` merges log-domain (max, sum) pairs. The
column-mass merges, which may fall back to an exact pass over the inputs, differ by family and stay in each family's
file (``sinkhorn_dense._merge_masses_kernel``, ``sinkhorn_features._features_merge_masses_kernel``); the constants
they share are here.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .lse import _finite_or_zero, _lse2, _partials_tile
from .utils import LN2, compile_options

_LN2 = tl.constexpr(LN2)
# Each merge program merges BLOCK_P partials at a time for MERGE_BLOCK_K clusters. A tile of partials per step keeps
# many loads in flight: one partial per step (1024 clusters per program) took 99 us at K = 3000 on an H100
# (3 programs, 132 dependent steps each), 40% of a SwAV batch's device time.
MERGE_BLOCK_P = 32
MERGE_BLOCK_K = 64
# Column masses (``DenseLaunch.column_mass``, and the features kernel's): exp2 flushes a plan entry below 2**-126 to
# 0, so N samples lose at most N * 2**-126 of a column's mass; at or above N * 2**-100 that is under 2**-26 of it
# (fp32 rounding). A lighter column is recomputed exactly in the merge, EXACT_FALLBACK_ROWS rows at a time.
MASS_FLOOR_PER_SAMPLE = 2.0**-100
EXACT_FALLBACK_ROWS = 64


def merge_options() -> dict:
    """Compile options of every merge kernel (dense and features, log-domain or masses)."""
    return compile_options(num_warps=4, enable_fp_fusion=True)


@triton.jit
def _merge_partials_kernel(PMAX, PSUM, OUT, P, K, row_stride, BLOCK_P: tl.constexpr, BLOCK: tl.constexpr):
    """OUT[h, k] = ln(2) * log2 sum_p PSUM[h, p, k] * exp2(PMAX[h, p, k]), BLOCK_P partials at a time (a fixed
    order: bitwise deterministic)."""
    cols = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1).to(tl.int64)
    col_mask = cols < K
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    for p0 in range(0, P, BLOCK_P):
        off, mask = _partials_tile(h, p0, P, row_stride, cols, col_mask, BLOCK_P)
        pm = tl.load(PMAX + off, mask=mask, other=float("-inf"))
        ps = tl.load(PSUM + off, mask=mask, other=0.0)
        m_new = tl.maximum(m, tl.max(pm, 0))
        shift = _finite_or_zero(m_new)
        s = s * tl.exp2(m - shift) + tl.sum(ps * tl.exp2(pm - shift[None, :]), 0)
        m = m_new
    tl.store(OUT + h * K + cols, _lse2(m, s) * _LN2, mask=col_mask)


def merge_partials(pmax: torch.Tensor, psum: torch.Tensor) -> torch.Tensor:
    """(H, K) fp32 cluster LSE from the (H, P, K) partial (max, sum) pairs of one pass: contiguous tensors, or the
    first K columns of contiguous (H, P, K_pad) ones (the features kernel's padded partials)."""
    h, p, k = pmax.shape
    row_stride = pmax.stride(1)
    if pmax.stride() != (p * row_stride, row_stride, 1) or psum.stride() != pmax.stride() or row_stride < k:
        raise ValueError(f"partials must be (H, P, K) rows of a contiguous (H, P, K_pad) buffer, got strides "
                         f"{pmax.stride()} and {psum.stride()} for shape {tuple(pmax.shape)}")  # fmt: skip
    out = torch.empty((h, k), dtype=torch.float32, device=pmax.device)
    _merge_partials_kernel[(triton.cdiv(k, MERGE_BLOCK_K), h)](
        pmax, psum, out, p, k, row_stride, BLOCK_P=MERGE_BLOCK_P, BLOCK=MERGE_BLOCK_K, **merge_options()
    )
    return out
