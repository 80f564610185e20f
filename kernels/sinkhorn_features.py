"""Fused Triton kernels for log-domain Sinkhorn when the scores are a product ``S = Z Cᵀ + bias``.

Features mode (DESIGN.md §3, issue 4): features Z (N, D), prototypes C (H, K, D), optional per-cluster
bias (H, K). The K×N score matrix is never stored: every pass recomputes its tiles with ``tl.dot``
(tensor cores; tf32 or exact fp32 for fp32 inputs, native bf16/fp16) and feeds them straight into the
Sinkhorn reductions, FlashAttention style. Per head h, with ``x = S / eps``:

    sample step   a[j] = log c[j] - LSE_k( x[j, k] + b[k] )
    cluster LSE   L[k] = LSE_j( x[j, k] + a[j] )            (the solver then sets b = log r - L)

``features_cluster_lse`` runs a persistent grid of P programs per head. A program walks its row tiles
(``BLOCK_N`` samples); for each it holds the Z tile and makes two sweeps over the prototypes in chunks
of ``BLOCK_K`` clusters:

    sweep 1: S tile (BLOCK_N, BLOCK_K) = Z_t Cᵀ_chunk    -> online LSE along K (row reduction) -> a (BLOCK_N,)
    sweep 2: Sᵀ tile (BLOCK_K, BLOCK_N) = C_chunk Z_tᵀ  -> the plan's masses exp2(x + a + b) summed along the
             tile's samples -> added to the program's running sums for that chunk, kept in its row of the
             (H, P, K_pad) partial buffer

Column masses (``FeaturesLaunch.column_mass``, the default for warm passes) as in ``sinkhorn_dense``: every plan
entry is at most its sample's weight, so sweep 2 needs no running max and no rescale, and ``L = log(sum) - b``. A
block of 64 clusters containing one that holds under N * 2**-100 of the mass (fp32 underflow may have dropped its
terms: after a far-off warm start or an extrapolated step, never in plain steps with uniform weights; a cluster closed
by a -inf bias holds none by construction and does not count) is recomputed exactly in log domain by the merge,
which recomputes that block's scores from Z and C with the sample potentials sweep 1 stored. The cold
start (``b = None``: ``a = log c``, no bound on the entries) skips sweep 1 and keeps log-domain partials (a running
(max, sum) per chunk), merged by ``merge.merge_partials``; so does ``column_mass=False``.

The per-cluster terms ``(b + bias / eps) * log2(e)`` are written once per pass into a (H, K_pad) buffer padded with
-inf to whole chunks, and the partial buffers' rows are K_pad long: the loops load and store them without masks
(per chunk, the masked loads of b and the bias cost ~80 of ~400 instructions per thread at bf16 128x64).

Sweep 2 computes the transposed tile so that both reductions run along the accumulator's second axis
(within a thread and a few lane shuffles, never across warps through shared memory). A program owns its
row of the partial buffers, read-modify-written once per chunk per row tile (a few % of the L2 traffic
of the prototype reads); a barrier per row tile orders those global accesses between threads. A
second small kernel merges the P partials in a fixed order: no atomics, bitwise reproducible.

    Z, C --[_features_partials_kernel, grid (P, H)]--> masses (H, P, K_pad) --[_features_merge_masses_kernel,
    grid (K/64, H)]--> L (H, K)

Why two matmul sweeps: ``a`` needs a whole row of S before any of the row's terms can enter the cluster
sums, and a row tile's K scores (128 x 3000 fp32 = 1.5 MB) fit neither registers nor shared memory. The
other exact orders are worse: recomputing per cluster chunk with the rows inner re-reads Z from HBM
K / BLOCK_K times; storing ``exp(x - rowmax)`` per tile for a later weighting is the K×N matrix again; and
using last iteration's ``a`` in the same sweep is a different (Jacobi) iteration, not the one the solver
loop and the other backends run. The cold start needs only sweep 2.

Cost per iteration (warm, H heads; flash-sinkhorn's alternating iteration does the same two passes):

    matmul  FLOPs = 2 sweeps x 2 N K D H          (N = 2^20, K = 3000, D = 128: 1.61e12)
    exp2          = 2 N K H  (+ N K H / BLOCK_K rescales in sweep 1)   (6.3e9)
    HBM bytes     = N D itemsize (each Z tile read once, used by both sweeps) + H N 4 (sample potentials)
                    + H P K 4 x 2 (partials)
                    + prototypes from L2: 2 (N / BLOCK_N) K D itemsize of L2 traffic

    floor = max(FLOPs / matmul rate, exps / exp rate, bytes / HBM bandwidth)
    H100 SXM (989 TFLOP/s bf16 dense, 494 tf32, 3.9e12 exp2/s on the SFUs, 3.35 TB/s):
        bf16: max(1.63 ms, 1.61 ms, 0.08 ms) = 1.63 ms     tf32: max(3.26 ms, 1.61 ms, 0.16 ms) = 3.26 ms
    vs the dense kernel on the same S materialised in fp32: N K 4 bytes = 12.6 GB, 3.8 ms at 3.35 TB/s.

At D = 128 in bf16 the tensor cores and the exp units are equally loaded (2 D = 256 FLOPs per exp at
989 / 3.9 = 254 FLOPs per exp), so both must overlap to reach the floor; tf32 is matmul-bound, and its floor is
within 15% of the dense kernel's. Hence ``input_precision="fp16"`` for fp32 inputs (``prepare_fp16``): Z and C
scaled by powers of two and rounded to fp16 — tf32's 10-bit mantissa, rounded to nearest where tf32 tensor cores
truncate — multiplied at the fp16 rate: the bf16 floor (1.63 ms) with tf32-grade scores.

Measured on an H100 (2026-11-23, log-domain sums in sweep 2): bf16 at N = 2^20, K = 3000 took 5.4 ms, 43% of the
floor at the measured rates. Besides the tensor-core work, each thread issued ~12 instructions per score per sweep
(sm_90 SASS; ~5 of them the arithmetic of the LSE, the rest per-chunk loads, masks and bookkeeping), about as much
issue time as the matmul, and the two did not overlap. Column masses and the unmasked per-cluster buffers cut the
loop bodies per thread per chunk from 805 to 622 instructions (bf16 128x64, both sweeps) and from 797 to 686 (fp32
tf32 64x64); not yet timed.

Numerics as in ``sinkhorn_dense``: fp32 accumulation and arithmetic, base 2 with a log2(e) prescale,
``-inf`` guards on every running max, int64 offsets, every stride a runtime argument. A cluster whose
bias is ``-inf`` is unreachable (its LSE is ``-inf``); a zero-weight sample contributes nothing; summing masses, a
zero-weight cluster (b = -inf) gets -inf (it holds no mass; the solver's step for it never reads it).
"""

from __future__ import annotations

import dataclasses
import math
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
from .utils import (
    EXACT_STREAM_D,
    KERNEL_DTYPES,
    LN2,
    LOG2E,
    FeaturesLaunch,
    _check_row_tiles,
    as_float32,
    compile_options,
    features_launch,
    interpreting,
    max_shared_memory,
    shared_memory_bound,
)

_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(LN2)
# For fp32 inputs: tl.dot's "tf32", "tf32x3" and "ieee", and "fp16": both operands scaled by powers of two and rounded
# to fp16 (see ``prepare_fp16``). Ignored for fp16/bf16 inputs.
INPUT_PRECISIONS = ("tf32", "tf32x3", "ieee", "fp16")

__all__ = [
    "INPUT_PRECISIONS",
    "FeaturesLaunch",
    "FeaturesWorkspace",
    "d_vector_width",
    "features_assign",
    "features_cluster_lse",
    "features_launch",
    "features_transport_score",
    "max_shared_memory",
    "prepare_fp16",
    "shared_memory_bound",
]


# ----------------------------------------------------------------------------------------------------
# Device helpers: tiles of Z and C, and score tiles from them
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _load_rows(X, rows, row_mask, d0, D, stride_r, stride_d, BLOCK_D: tl.constexpr):
    """X[rows, d0:d0+BLOCK_D] in its own dtype (BLOCK_R, BLOCK_D); zeros past D and on masked rows."""
    d = d0 + tl.arange(0, BLOCK_D)
    ptrs = X + rows.to(tl.int64)[:, None] * stride_r + d.to(tl.int64)[None, :] * stride_d
    return tl.load(ptrs, mask=row_mask[:, None] & (d < D)[None, :], other=0.0)


@triton.jit
def _load_z(Z, rows, row_mask, d0, D, stride_zn, stride_zd, z_scale, BLOCK_D: tl.constexpr, Z_F16: tl.constexpr):
    """A Z tile (BLOCK_N, BLOCK_D); with Z_F16 (fp32 features, "fp16" precision) scaled by the power of two
    ``z_scale`` and rounded to fp16 for the fp16 tensor cores."""
    z = _load_rows(Z, rows, row_mask, d0, D, stride_zn, stride_zd, BLOCK_D)
    if Z_F16:
        z = (z * z_scale).to(tl.float16)
    return z


@triton.jit
def _dot_rows(
    z,
    Z,
    C,
    rows,
    row_mask,
    cols,
    col_mask,
    D,
    stride_zn,
    stride_zd,
    stride_ck,
    stride_cd,
    z_scale,
    TRANSPOSED: tl.constexpr,
    ONE_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    Z_F16: tl.constexpr,
):
    """fp32 ``Z[rows] C[cols]ᵀ`` (BLOCK_N, BLOCK_K), or its transpose (BLOCK_K, BLOCK_N) when TRANSPOSED.

    ONE_D: ``z`` is the whole (zero-padded) Z tile, already in registers; else D is streamed in chunks of
    BLOCK_D and ``z`` is unused. C is the head's (K, D) prototype matrix (fp16 and pre-scaled with Z_F16).
    UPCAST (interpreter, bf16 only): multiply in fp32, as Triton 3.9's interpreter gets ``tl.dot`` of bf16
    operands wrong; bf16 products are exact in fp32, so this is what the tensor cores compute up to the order of
    the fp32 sums.
    """
    if ONE_D:
        c = _load_rows(C, cols, col_mask, 0, D, stride_ck, stride_cd, BLOCK_D)  # (BK, BD)
        if UPCAST:
            z, c = z.to(tl.float32), c.to(tl.float32)
        if TRANSPOSED:
            acc = tl.dot(c, tl.trans(z), input_precision=PRECISION, out_dtype=tl.float32)
        else:
            acc = tl.dot(z, tl.trans(c), input_precision=PRECISION, out_dtype=tl.float32)
    else:
        if TRANSPOSED:
            acc = tl.zeros((BLOCK_K, BLOCK_N), tl.float32)
        else:
            acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
        for d0 in range(0, D, BLOCK_D):
            zc = _load_z(Z, rows, row_mask, d0, D, stride_zn, stride_zd, z_scale, BLOCK_D, Z_F16)  # (BN, BD)
            c = _load_rows(C, cols, col_mask, d0, D, stride_ck, stride_cd, BLOCK_D)  # (BK, BD)
            if UPCAST:
                zc, c = zc.to(tl.float32), c.to(tl.float32)
            if TRANSPOSED:
                acc = tl.dot(c, tl.trans(zc), acc, input_precision=PRECISION, out_dtype=tl.float32)
            else:
                acc = tl.dot(zc, tl.trans(c), acc, input_precision=PRECISION, out_dtype=tl.float32)
    return acc


@triton.jit
def _aligned_d(VEC_D: tl.constexpr, D, stride_zn, stride_ch, stride_ck):
    """The host checked that D and the row strides of Z and C are multiples of VEC_D (and that both tensors are
    contiguous along D): rounding them down to multiples (a no-op) lets the compiler prove that each row of a tile
    starts on a 16-byte boundary, so the tile loads become 16-byte cp.async copies into shared memory. Triton's own
    argument specialisation only knows multiples of 16 elements: D = 200 or 136 (multiples of 8, not of 16) loaded
    fp32 tiles with 4-byte loads through registers, which spilled (see ``d_vector_width``)."""
    return (_multiple_of(VEC_D, D), _multiple_of(VEC_D, stride_zn), _multiple_of(VEC_D, stride_ch),
            _multiple_of(VEC_D, stride_ck))  # fmt: skip


@triton.jit
def _load_bias(BIAS, cols, col_mask, HAS_BIAS: tl.constexpr):
    """bias[cols] as fp32 (BLOCK_K,), 0 without a bias; -inf past K (so padded clusters never count)."""
    if HAS_BIAS:
        return tl.load(BIAS + cols, mask=col_mask, other=float("-inf"))
    return tl.where(col_mask, 0.0, float("-inf"))


# ----------------------------------------------------------------------------------------------------
# Cluster LSE: two sweeps of tile matmuls per row tile, partials per program, fixed-order merge
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _features_partials_kernel(
    Z,  # (N, D) features, fp32/fp16/bf16, any strides
    C,  # (H, K, D) prototypes, same dtype, any strides
    BIAS2,  # (H, K) fp32 bias * inv_eps * log2(e), contiguous (unused when not HAS_BIAS)
    V2,  # (H, K_PAD) fp32 (b + bias * inv_eps) * log2(e), -inf past K, contiguous (unused when not HAS_B)
    LOGC,  # (N,) fp32 log sample weights
    A_WS,  # (H, N) fp32 out: base-2 sample potentials, for the merge's exact fallback (COLUMN_MASS only)
    PMAX,  # (H, P, K_PAD) fp32 out: per-program running max (base 2); not written with COLUMN_MASS
    PSUM,  # (H, P, K_PAD) fp32 out: per-program sum of exp2(. - max), or with COLUMN_MASS the plan's column masses
    N,
    K,
    D,
    P,
    stride_zn,
    stride_zd,
    stride_ch,
    stride_ck,
    stride_cd,
    scale2,  # inv_eps * log2(e) / (z_scale * c_scale)
    z_scale,  # power of two applied to Z tiles before fp16 rounding (Z_F16 only)
    HAS_B: tl.constexpr,
    COLUMN_MASS: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ONE_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    Z_F16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VEC_D: tl.constexpr,
):
    tl.static_assert(BLOCK_N >= 16 and BLOCK_K >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    tl.static_assert(HAS_B or not COLUMN_MASS, "column masses are bounded only on warm passes (b given)")
    D, stride_zn, stride_ch, stride_ck = _aligned_d(VEC_D, D, stride_zn, stride_ch, stride_ck)
    pid = tl.program_id(0)
    h = tl.program_id(1).to(tl.int64)
    c_head = C + h * stride_ch
    K_PAD = tl.cdiv(K, BLOCK_K) * BLOCK_K  # padded rows of V2 and the partials: whole chunks, loaded unmasked
    part_off = (h * P + pid) * K_PAD
    n_tiles = tl.cdiv(N, BLOCK_N)
    for t in range(pid, n_tiles, P):
        rows = t * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
        z = _load_z(Z, rows, row_mask, 0, D, stride_zn, stride_zd, z_scale, BLOCK_D, Z_F16)  # (BN, BD), both sweeps
        logc2 = tl.load(LOGC + rows, mask=row_mask, other=float("-inf")) * _LOG2E  # (BN,)
        if HAS_B:
            # Sweep 1: a = log c - LSE_k(x + b), K streamed in chunks, online along the tile's rows.
            rmax = tl.full((BLOCK_N,), float("-inf"), tl.float32)
            rsum = tl.zeros((BLOCK_N,), tl.float32)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                col_mask = cols < K
                # The (BK,) vector is loaded after a whole-D dot and before a D-streaming one: the other way round,
                # sm_90 code held it through the tensor-core matmul (bf16 128x64: 140 registers instead of 125, one
                # program per SM instead of two) or spilled in the exact fp32 loop ("ieee": 32 bytes at 128).
                if not ONE_D:
                    v2 = tl.load(V2 + h * K_PAD + cols)
                acc = _dot_rows(z, Z, c_head, rows, row_mask, cols, col_mask, D, stride_zn, stride_zd, stride_ck,
                                stride_cd, z_scale, False, ONE_D, BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, UPCAST,
                                Z_F16)  # fmt: skip
                if ONE_D:
                    v2 = tl.load(V2 + h * K_PAD + cols)
                rmax, rsum = _online_lse(rmax, rsum, acc * scale2 + v2[None, :], 1)  # (BN, BK) -> (BN,)
            a2 = _sample_step2(logc2, _lse2(rmax, rsum))
            if COLUMN_MASS:
                tl.store(A_WS + h * N + rows, a2, mask=row_mask)
        else:
            a2 = logc2  # cold start: a = log c
        # Sweep 2: the tile's terms x + a, transposed (clusters x samples), reduced along the samples and
        # merged into this program's partials for the chunk.
        a2_t = a2[None, :]  # (1, BN)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            col_mask = cols < K
            acc_t = _dot_rows(z, Z, c_head, rows, row_mask, cols, col_mask, D, stride_zn, stride_zd, stride_ck,
                              stride_cd, z_scale, True, ONE_D, BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, UPCAST,
                              Z_F16)  # fmt: skip
            # On this program's first tile its partials are not written yet (a (BK,) test: the interpreter
            # turns a scalar bool & a bool tensor into integers).
            seen = tl.full((BLOCK_K,), t, tl.int32) != pid
            ps = tl.load(PSUM + part_off + cols, mask=seen, other=0.0)
            if COLUMN_MASS:
                # Plan entries exp2(x + a + b) <= c: summed as they are, no max to find first, nothing to rescale.
                v2 = tl.load(V2 + h * K_PAD + cols)  # (BK,)
                ps += tl.sum(tl.exp2(acc_t * scale2 + v2[:, None] + a2_t), 1)
            else:
                # The bias is constant along the samples: it is added to the (BK,) tile max only.
                y2 = acc_t * scale2 + a2_t  # (BK, BN)
                tmax = tl.max(y2, 1)
                tsum = tl.sum(tl.exp2(y2 - _finite_or_zero(tmax)[:, None]), 1)
                tmax += _load_bias(BIAS2 + h * K, cols, col_mask, HAS_BIAS)  # (BK,)
                pm = tl.load(PMAX + part_off + cols, mask=seen, other=float("-inf"))
                m_new = tl.maximum(pm, tmax)
                shift = _finite_or_zero(m_new)
                ps = ps * tl.exp2(pm - shift) + tsum * tl.exp2(tmax - shift)
                tl.store(PMAX + part_off + cols, m_new)
            tl.store(PSUM + part_off + cols, ps)
        # The next tile's sweep 2 reads these partials back, possibly from other threads of the program.
        tl.debug_barrier()


@triton.jit
def _features_merge_masses_kernel(
    PSUM,  # (H, P, K_PAD) fp32: per-program column masses of the plan
    B,  # (H, K) fp32 cluster potentials
    BIAS2,  # (H, K) fp32 bias * inv_eps * log2(e) (unused when not HAS_BIAS)
    OUT,  # (H, K) fp32 out: cluster LSE (natural log)
    Z,  # the features, prototypes and sample potentials: read only by the exact fallback
    C,
    A_WS,  # (H, N) fp32 base-2 sample potentials of this pass
    P,
    N,
    K,
    K_PAD,
    D,
    stride_zn,
    stride_zd,
    stride_ch,
    stride_ck,
    stride_cd,
    scale2,
    z_scale,
    mass_floor,  # below it a column's mass may have lost terms to exp2 underflow
    HAS_BIAS: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    Z_F16: tl.constexpr,
    BLOCK_P: tl.constexpr,
    BLOCK: tl.constexpr,
    EXACT_ROWS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VEC_D: tl.constexpr,
):
    """``sinkhorn_dense._merge_masses_kernel`` for features: OUT = ln(2) * (log2 sum_p PSUM - b2), and a block of
    clusters holding one under ``mass_floor`` recomputed exactly in log domain, its scores ``Z C_blockᵀ``
    recomputed tile by tile (D streamed in chunks of BLOCK_D) with the stored sample potentials."""
    pid = tl.program_id(0)
    cols = pid * BLOCK + tl.arange(0, BLOCK)
    h = tl.program_id(1).to(tl.int64)
    col_mask = cols < K
    lse2, untrusted = _lse_from_masses(PSUM, B, h, P, K, K_PAD, cols, col_mask, mass_floor, BLOCK_P, BLOCK)
    # A cluster closed by a -inf bias holds no mass by construction (its LSE is -inf already): not a reason to
    # recompute its block on every pass.
    untrusted &= _load_bias(BIAS2 + h * K, cols, col_mask, HAS_BIAS) > float("-inf")
    if tl.sum(untrusted.to(tl.int32), 0) > 0:
        D, stride_zn, stride_ch, stride_ck = _aligned_d(VEC_D, D, stride_zn, stride_ch, stride_ck)
        c_head = C + h * stride_ch
        m = tl.full((BLOCK,), float("-inf"), tl.float32)
        s = tl.zeros((BLOCK,), tl.float32)
        for r0 in range(0, N, EXACT_ROWS):
            rows = r0 + tl.arange(0, EXACT_ROWS)
            row_mask = rows < N
            a2 = tl.load(A_WS + h * N + rows, mask=row_mask, other=float("-inf"))
            acc_t = _dot_rows(a2, Z, c_head, rows, row_mask, cols, col_mask, D, stride_zn, stride_zd, stride_ck,
                              stride_cd, z_scale, True, False, EXACT_ROWS, BLOCK, BLOCK_D, PRECISION, UPCAST,
                              Z_F16)  # fmt: skip
            m, s = _online_lse(m, s, acc_t * scale2 + a2[None, :], 1)
        # The bias again, loaded anew: held across the loop, the exact fp32 ("ieee") merge spilled 48 bytes, not 24.
        exact = _lse2(m, s) + _load_bias(BIAS2 + h * K, cols, col_mask, HAS_BIAS)  # the bias: constant per cluster
        lse2 = tl.where(untrusted, exact, lse2)
    tl.store(OUT + h * K + cols, lse2 * _LN2, mask=col_mask)


# ----------------------------------------------------------------------------------------------------
# Read-out: labels, codes and the transport score, per row tile
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _score_tile(
    z, Z, c_head, BIAS, B, rows, row_mask, k0, K, D, stride_zn, stride_zd, stride_ck, stride_cd, inv_eps,
    z_scale, dot_scale, HAS_BIAS: tl.constexpr, ONE_D: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    Z_F16: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):  # fmt: skip
    """(s, x) for clusters k0:k0+BLOCK_K: s = Z Cᵀ + bias (BN, BK), x = s * inv_eps + b; -inf past K."""
    cols = k0 + tl.arange(0, BLOCK_K)
    col_mask = cols < K
    s = _dot_rows(z, Z, c_head, rows, row_mask, cols, col_mask, D, stride_zn, stride_zd, stride_ck, stride_cd,
                  z_scale, False, ONE_D, BLOCK_N, BLOCK_K, BLOCK_D, PRECISION, UPCAST, Z_F16)  # fmt: skip
    if Z_F16:
        s = s * dot_scale  # undo the power-of-two input scales: exact
    s = s + _load_bias(BIAS, cols, col_mask, HAS_BIAS)[None, :]
    x = s * inv_eps + tl.load(B + cols, mask=col_mask, other=float("-inf"))[None, :]
    return s, x


@triton.jit
def _features_readout_kernel(
    Z,  # (N, D) features
    C,  # (H, K, D) prototypes
    BIAS,  # (H, K) fp32 bias, contiguous (unused when not HAS_BIAS)
    B,  # (H, K) fp32 potentials, contiguous
    LABELS,  # (H, N) int64 out
    CODES,  # (H, N, K) fp32 out, contiguous (unused when not WANT_CODES)
    ROWSCORE,  # (H, N) fp32 out: sum_k codes[j, k] S[j, k] (unused when not WANT_SCORE)
    N,
    K,
    D,
    stride_zn,
    stride_zd,
    stride_ch,
    stride_ck,
    stride_cd,
    inv_eps,
    z_scale,  # power of two applied to Z tiles before fp16 rounding (Z_F16 only)
    dot_scale,  # 1 / (z_scale * c_scale) (Z_F16 only)
    HAS_BIAS: tl.constexpr,
    WANT_CODES: tl.constexpr,
    WANT_SCORE: tl.constexpr,
    ONE_D: tl.constexpr,
    PRECISION: tl.constexpr,
    UPCAST: tl.constexpr,
    Z_F16: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr,
    VEC_D: tl.constexpr,
):
    tl.static_assert(BLOCK_N >= 16 and BLOCK_K >= 16 and BLOCK_D >= 16, "tl.dot needs tiles of at least 16")
    D, stride_zn, stride_ch, stride_ck = _aligned_d(VEC_D, D, stride_zn, stride_ch, stride_ck)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    h = tl.program_id(1).to(tl.int64)
    row_mask = rows < N
    c_head = C + h * stride_ch
    bias_h = BIAS + h * K
    b_h = B + h * K
    z = _load_z(Z, rows, row_mask, 0, D, stride_zn, stride_zd, z_scale, BLOCK_D, Z_F16)
    # Sweep 1: argmax of x (lowest index on ties) and the base-2 running (max, sum) of its softmax.
    rmax = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    rsum = tl.zeros((BLOCK_N,), tl.float32)
    best = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    label = tl.zeros((BLOCK_N,), tl.int64)
    for k0 in range(0, K, BLOCK_K):
        _, x = _score_tile(z, Z, c_head, bias_h, b_h, rows, row_mask, k0, K, D, stride_zn, stride_zd,
                           stride_ck, stride_cd, inv_eps, z_scale, dot_scale, HAS_BIAS, ONE_D, PRECISION,
                           UPCAST, Z_F16, BLOCK_N, BLOCK_K, BLOCK_D)  # fmt: skip
        chunk_best = tl.max(x, 1)
        chunk_label = tl.argmax(x, 1, tie_break_left=True).to(tl.int64) + k0
        label = tl.where(chunk_best > best, chunk_label, label)  # strict: an earlier chunk wins ties
        best = tl.maximum(best, chunk_best)
        rmax, rsum = _online_lse(rmax, rsum, x * _LOG2E, 1)
    tl.store(LABELS + h * N + rows, label, mask=row_mask)
    if WANT_CODES or WANT_SCORE:
        # Sweep 2: the softmax itself, recomputed chunk by chunk; codes written exactly once.
        shift = _finite_or_zero(rmax)[:, None]
        inv_sum = 1.0 / tl.where(row_mask, rsum, 1.0)  # (BN,); rsum > 0 on every real row
        out_rows = CODES + (h * N + rows.to(tl.int64))[:, None] * K
        acc = tl.zeros((BLOCK_N,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            s, x = _score_tile(z, Z, c_head, bias_h, b_h, rows, row_mask, k0, K, D, stride_zn, stride_zd,
                               stride_ck, stride_cd, inv_eps, z_scale, dot_scale, HAS_BIAS, ONE_D, PRECISION,
                               UPCAST, Z_F16, BLOCK_N, BLOCK_K, BLOCK_D)  # fmt: skip
            weight = tl.exp2(x * _LOG2E - shift)  # (BN, BK)
            if WANT_CODES:
                cols = k0 + tl.arange(0, BLOCK_K)
                tl.store(
                    out_rows + cols[None, :], weight * inv_sum[:, None], mask=row_mask[:, None] & (cols < K)[None, :]
                )
            if WANT_SCORE:
                acc += tl.sum(weight * tl.where(s == float("-inf"), 0.0, s), 1)  # an unreachable pair: no mass
        if WANT_SCORE:
            tl.store(ROWSCORE + h * N + rows, acc * inv_sum, mask=row_mask)


# ----------------------------------------------------------------------------------------------------
# Host launchers (the launch heuristics, ``features_launch``, are in utils.py)
# ----------------------------------------------------------------------------------------------------


@dataclass
class FeaturesWorkspace:
    """Buffers reused across ``features_cluster_lse`` calls: an iteration allocates nothing but its (H, K)
    output, so a solve can be captured in a CUDA graph. ``2 H P K_pad + H K_pad`` fp32, plus ``H N`` with column
    masses (the sample potentials, read only by the merge's exact fallback)."""

    launch: FeaturesLaunch
    pmax: torch.Tensor  # (H, P, K_pad) fp32
    psum: torch.Tensor  # (H, P, K_pad) fp32
    v2: torch.Tensor  # (H, K_pad) fp32: (b + bias / eps) * log2(e) of the pass, -inf past K (never written there)
    a: torch.Tensor  # (H, N) fp32 base-2 sample potentials with column masses, else (0,)
    k: int  # the K it was made for: v2's padding must stay -inf

    @classmethod
    def for_inputs(
        cls,
        features: torch.Tensor,
        prototypes: torch.Tensor,
        launch: FeaturesLaunch | None = None,
        precision: str = "tf32",
    ) -> FeaturesWorkspace:
        n, d, h, k = _check_inputs(features, prototypes)
        launch = launch or _default_launch(features, prototypes, precision)
        # A program with no row tile would leave its partials unwritten (garbage in the merge): at most one per tile.
        launch = dataclasses.replace(launch, n_programs=max(1, min(launch.n_programs, launch.row_tiles(n))))
        p, k_pad = launch.n_programs, launch.padded_k(k)
        f32 = dict(dtype=torch.float32, device=features.device)
        pmax = torch.empty((h, p, k_pad), **f32)
        psum = torch.empty((h, p, k_pad), **f32)
        v2 = torch.full((h, k_pad), float("-inf"), **f32)  # the padding stays -inf: no cluster there
        a = torch.empty(cls._a_shape(launch, h, n), **f32)
        return cls(launch, pmax, psum, v2, a, k)

    @staticmethod
    def _a_shape(launch: FeaturesLaunch, h: int, n: int) -> tuple[int, ...]:
        return (h, n) if launch.column_mass else (0,)

    def check_fits(self, h: int, n: int, k: int) -> None:
        """A workspace is sized for one (H, N, K): the kernels write its buffers without bounds of their own."""
        _check_row_tiles(self.launch.n_programs, self.launch.row_tiles(n), n)
        if self.k != k or self.v2.shape[0] != h or self.a.shape != self._a_shape(self.launch, h, n):
            raise ValueError(
                f"this FeaturesWorkspace was made for other inputs (partials {tuple(self.psum.shape)}, sample "
                f"potentials {tuple(self.a.shape)}); (H, N, K) = ({h}, {n}, {k}) need FeaturesWorkspace.for_inputs"
            )


def _default_launch(features: torch.Tensor, prototypes: torch.Tensor, precision: str) -> FeaturesLaunch:
    n, d, h, k = _check_inputs(features, prototypes)
    mixed = _fp16_mode(features, prototypes)
    aligned = d_vector_width(features, prototypes) * features.element_size() >= 16
    return features_launch(
        n, k, d, h, prototypes.element_size(), features.device, z_fp32_to_fp16=mixed, precision=precision,
        z_rows_aligned=aligned,
    )  # fmt: skip


def _check_inputs(features: torch.Tensor, prototypes: torch.Tensor) -> tuple[int, int, int, int]:
    if features.dim() != 2:
        raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
    if prototypes.dim() != 3:
        raise ValueError(f"prototypes must be (H, K, D), got shape {tuple(prototypes.shape)}")
    if features.dtype not in KERNEL_DTYPES:
        raise TypeError(f"features must be float32, float16 or bfloat16, got {features.dtype}")
    if prototypes.dtype != features.dtype and not _fp16_mode(features, prototypes):
        raise TypeError(
            f"prototypes ({prototypes.dtype}) must have the features' dtype ({features.dtype}), or be the fp16 "
            "prototypes of prepare_fp16 for fp32 features"
        )
    n, d = features.shape
    h, k, d2 = prototypes.shape
    if d2 != d:
        raise ValueError(f"features have D = {d} but prototypes have D = {d2}")
    return n, d, h, k


def _vector(x: torch.Tensor | None, h: int, k: int, name: str) -> torch.Tensor | None:
    if x is None:
        return None
    if x.shape != (h, k):
        raise ValueError(f"{name} must be (H, K) = ({h}, {k}), got {tuple(x.shape)}")
    return as_float32(x)


def _precision(input_precision: str) -> str:
    """The ``tl.dot`` option: "fp16" multiplies fp16 operands, for which tl.dot ignores it."""
    if input_precision not in INPUT_PRECISIONS:
        raise ValueError(f"input_precision must be one of {INPUT_PRECISIONS}, got {input_precision!r}")
    return "tf32" if input_precision == "fp16" else input_precision


def _fp16_mode(features: torch.Tensor, prototypes: torch.Tensor) -> bool:
    """fp32 features with fp16 prototypes: the kernels round Z tiles to fp16 (``prepare_fp16``)."""
    return features.dtype == torch.float32 and prototypes.dtype == torch.float16


def _pow2_scale(x: torch.Tensor) -> float:
    """A power of two s with max|x| * s in [128, 256): far from fp16's overflow (65504) and its subnormals (2^-14)."""
    top = float(x.abs().max()) if x.numel() else 0.0
    return 2.0 ** (7 - math.floor(math.log2(top))) if math.isfinite(top) and top > 0 else 1.0


def prepare_fp16(features: torch.Tensor, prototypes: torch.Tensor) -> tuple[torch.Tensor, tuple[float, float]]:
    """fp32 inputs, ``input_precision="fp16"``: ``(C16, (z_scale, c_scale))``, C16 = C * c_scale rounded to fp16.

    Pass C16 as the prototypes and the scales to the launchers with the fp32 features: the kernels round each Z tile
    to fp16 after scaling it by ``z_scale`` and divide the fp32 products by ``z_scale * c_scale`` (powers of two:
    exact). fp16 keeps 10 mantissa bits like tf32 and rounds to nearest (tf32 tensor cores truncate the fp32
    operand), and the scales keep every entry within 2^22 of the largest one out of fp16's subnormals, so scores are
    as accurate as with tf32, at the fp16 tensor-core rate (twice tf32's on an H100) and half the shared memory.
    Costs one pass over Z and C and a host synchronisation: do it once per problem, not per iteration.
    """
    z_scale, c_scale = _pow2_scale(features), _pow2_scale(prototypes)
    return (prototypes.float() * c_scale).to(torch.float16).contiguous(), (z_scale, c_scale)


def d_vector_width(features: torch.Tensor, prototypes: torch.Tensor) -> int:
    """Elements per 16-byte access along D (4 for fp32, 8 for 16-bit; the smaller itemsize decides when Z is fp32
    and C fp16) that divide D and the row strides of Z (N, D) and C (H, K, D); 1 when either tensor is not
    contiguous along D, does not start on a 16-byte boundary, or nothing larger divides them. A stride never
    multiplied by a nonzero index (one row, one cluster, one head) may be rounded freely."""
    d = features.shape[1]
    if features.stride(1) != 1 or prototypes.stride(2) != 1:
        return 1
    if features.data_ptr() % 16 or prototypes.data_ptr() % 16:
        return 1
    vec = 16 // min(features.element_size(), prototypes.element_size())
    strides = _row_strides(features, prototypes)
    while vec > 1 and (d % vec or any(stride % vec for stride in strides)):
        vec //= 2
    return vec


def _vec_d(features: torch.Tensor, prototypes: torch.Tensor) -> int:
    """The kernels' VEC_D: ``d_vector_width``, or 1 where Triton's own argument specialisation (multiples of 16
    elements) already proves the alignment. The rounding in ``_aligned_d`` would then only perturb the register
    allocation (Triton 3.6, fp32 D = 256 read-out: 180 -> 206 registers): those launches compile as they always did."""
    if features.shape[1] % 16 == 0 and all(stride % 16 == 0 for stride in _row_strides(features, prototypes)):
        return 1
    return d_vector_width(features, prototypes)


def _row_strides(features: torch.Tensor, prototypes: torch.Tensor) -> list[int]:
    """The strides that the kernels multiply by a nonzero index: Z's rows, C's clusters and heads (where more than
    one of them exists; the others may be anything)."""
    n, h, k = features.shape[0], prototypes.shape[0], prototypes.shape[1]
    return [features.stride(0)] * (n > 1) + [prototypes.stride(1)] * (k > 1) + [prototypes.stride(0)] * (h > 1)


def _upcast(features: torch.Tensor) -> bool:
    """bf16 under the interpreter: multiply in fp32 (see ``_dot_rows``)."""
    return interpreting() and features.dtype == torch.bfloat16


def _options(cfg: FeaturesLaunch) -> dict:
    # fp fusion (FMA) stated, not inherited: Triton's default for it is changing between releases.
    return compile_options(num_warps=cfg.num_warps, num_stages=cfg.num_stages, enable_fp_fusion=True)


def features_cluster_lse(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    bias2: torch.Tensor | None,
    b: torch.Tensor | None,
    log_c: torch.Tensor,
    inv_eps: float,
    *,
    input_precision: str = "tf32",
    scales: tuple[float, float] = (1.0, 1.0),
    workspace: FeaturesWorkspace | None = None,
) -> torch.Tensor:
    """``L[h, k] = LSE_j(S[h, j, k] * inv_eps + a[h, j])``, ``a = log_c - LSE_k(S * inv_eps + b)``, ``S = Z Cᵀ + bias``.

    features (N, D), prototypes (H, K, D): same dtype (fp32/fp16/bf16), any strides. ``bias2`` (H, K) fp32:
    the bias pre-scaled as ``bias * inv_eps * log2(e)`` (``None``: no bias). b (H, K) or None (cold start:
    ``a = log_c``); log_c (N,) fp32, -inf for a zero-weight sample. ``input_precision`` applies to fp32
    inputs ("tf32" tensor cores, "ieee" exact fp32); for "fp16" pass fp32 features with the fp16 prototypes and
    the ``scales`` of ``prepare_fp16``. Returns (H, K) fp32, -inf for an unreachable cluster and, summing column
    masses, for a cluster with b = -inf (it holds no mass; the solver's step for a zero-weight cluster never reads
    it). Two launches (three on warm passes: the per-cluster terms are written first), no host synchronisation,
    bitwise deterministic for a given workspace.
    """
    n, d, h, k = _check_inputs(features, prototypes)
    ws = workspace or FeaturesWorkspace.for_inputs(features, prototypes, precision=input_precision)
    ws.check_fits(h, n, k)
    cfg = ws.launch
    log_c = as_float32(log_c)
    b = _vector(b, h, k, "b")
    bias2 = _vector(bias2, h, k, "bias2")
    has_b = b is not None
    column_mass = has_b and cfg.column_mass
    if has_b and bias2 is None:  # the per-cluster terms of the pass, once (the kernel reads whole chunks, unmasked)
        torch.mul(b, LOG2E, out=ws.v2[:, :k])
    elif has_b:
        torch.add(bias2, b, alpha=LOG2E, out=ws.v2[:, :k])
    dummy = log_c  # any fp32 pointer for an argument the kernel never reads
    z_f16, (z_scale, c_scale) = _fp16_mode(features, prototypes), scales
    scale2 = float(inv_eps) * LOG2E / (z_scale * c_scale)
    common = dict(
        HAS_BIAS=bias2 is not None, PRECISION=_precision(input_precision), UPCAST=_upcast(features), Z_F16=z_f16,
        VEC_D=_vec_d(features, prototypes),
    )  # fmt: skip
    _features_partials_kernel[(cfg.n_programs, h)](
        features, prototypes, dummy if bias2 is None else bias2, ws.v2, log_c, ws.a, ws.pmax, ws.psum,
        n, k, d, cfg.n_programs, *features.stride(), *prototypes.stride(), scale2, float(z_scale),
        HAS_B=has_b, COLUMN_MASS=column_mass, ONE_D=cfg.one_d(d), BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        BLOCK_D=cfg.block_d, **common, **_options(cfg),
    )  # fmt: skip
    if not column_mass:
        return merge_partials(ws.pmax[:, :, :k], ws.psum[:, :, :k])
    out = torch.empty((h, k), dtype=torch.float32, device=features.device)
    _features_merge_masses_kernel[(triton.cdiv(k, MERGE_BLOCK_K), h)](
        ws.psum, b, dummy if bias2 is None else bias2, out, features, prototypes, ws.a,
        cfg.n_programs, n, k, cfg.padded_k(k), d, *features.stride(), *prototypes.stride(), scale2, float(z_scale),
        n * MASS_FLOOR_PER_SAMPLE, BLOCK_P=MERGE_BLOCK_P, BLOCK=MERGE_BLOCK_K, EXACT_ROWS=EXACT_FALLBACK_ROWS,
        BLOCK_D=min(cfg.block_d, EXACT_STREAM_D), **common, **merge_options(),
    )  # fmt: skip
    return out


def _readout(features, prototypes, bias, b, inv_eps, want_codes, want_score, input_precision, scales, launch):
    n, d, h, k = _check_inputs(features, prototypes)
    cfg = launch or _default_launch(features, prototypes, input_precision)
    b = _vector(b, h, k, "b")
    bias = _vector(bias, h, k, "bias")
    labels = torch.empty((h, n), dtype=torch.int64, device=features.device)
    codes = torch.empty((h, n, k), dtype=torch.float32, device=features.device) if want_codes else None
    rows = torch.empty((h, n), dtype=torch.float32, device=features.device) if want_score else None
    _features_readout_kernel[(cfg.row_tiles(n), h)](
        features, prototypes, b if bias is None else bias, b, labels, labels if codes is None else codes,
        b if rows is None else rows, n, k, d, *features.stride(), *prototypes.stride(), float(inv_eps),
        float(scales[0]), 1.0 / (scales[0] * scales[1]),
        HAS_BIAS=bias is not None, WANT_CODES=want_codes, WANT_SCORE=want_score, ONE_D=cfg.one_d(d),
        PRECISION=_precision(input_precision), UPCAST=_upcast(features), Z_F16=_fp16_mode(features, prototypes),
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, BLOCK_D=cfg.block_d,
        VEC_D=_vec_d(features, prototypes), **_options(cfg),
    )  # fmt: skip
    return labels, codes, rows


def features_assign(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    bias: torch.Tensor | None,
    b: torch.Tensor,
    inv_eps: float,
    want_codes: bool,
    *,
    input_precision: str = "tf32",
    scales: tuple[float, float] = (1.0, 1.0),
    launch: FeaturesLaunch | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """labels (H, N) int64 ``= argmax_k(S * inv_eps + b)`` (lowest index on ties), ``S = Z Cᵀ + bias`` with
    bias (H, K) or None, and when asked codes (H, N, K) fp32 ``= softmax_k(S * inv_eps + b)``: the only K×N
    memory ever written, and only on request."""
    labels, codes, _ = _readout(
        features, prototypes, bias, b, inv_eps, want_codes, False, input_precision, scales, launch
    )
    return labels, codes


def features_transport_score(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    bias: torch.Tensor | None,
    b: torch.Tensor,
    log_c: torch.Tensor,
    inv_eps: float,
    *,
    input_precision: str = "tf32",
    scales: tuple[float, float] = (1.0, 1.0),
    launch: FeaturesLaunch | None = None,
) -> torch.Tensor:
    """``<P, S>`` per head (H,) float64: ``sum_jk exp(log_c[j]) codes[j, k] S[j, k]``, -inf pairs skipped.

    Each row's ``sum_k codes S`` is an fp32 kernel output; the weighted sum over rows is float64.
    """
    _, _, rows = _readout(features, prototypes, bias, b, inv_eps, False, True, input_precision, scales, launch)
    weights = log_c.to(torch.float64).exp()  # (N,); exp(-inf) = 0 drops zero-weight samples
    return (rows.to(torch.float64) * weights).sum(-1)
