"""Features-mode Triton kernels (S = Z Cᵀ + bias, never stored) vs a float64 reference built from Z @ C.T.

Without a GPU these run under ``TRITON_INTERPRET=1`` (set in conftest.py): sizes are tiny and tiles are 16
(the smallest ``tl.dot`` takes), so N, K and D not multiples of the tiles hit every masking edge. The
interpreter multiplies fp32 exactly whatever ``input_precision`` says, so the tf32 rows of the tolerance
table only bite on a GPU.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import assert_close, centred, fast_argmax_takes_the_last

from otlabel.backends.reference import ReferenceOperator
from otlabel.backends.triton import TritonFeaturesOperator, triton_available
from otlabel.solver import run_sinkhorn

pytest.importorskip("triton")

from otlabel.kernels.sinkhorn_features import (  # noqa: E402  (after the importorskip)
    FeaturesWorkspace,
    features_assign,
    features_cluster_lse,
    features_launch,
    features_transport_score,
    prepare_fp16,
)
from otlabel.kernels.utils import LOG2E  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = Path(__file__).resolve().parents[1]
INV_EPS = 4.0  # eps = 0.25 on scores of unit spread: x = S / eps spans about +-12

# (dtype, tl.dot input_precision) -> tolerances (atol, rtol) per quantity. The reference multiplies the same
# rounded inputs in float64, so fp16/bf16 differ only by fp32 accumulation, like exact fp32 ("ieee"). tf32
# rounds each product to a 10-bit mantissa: |dS| up to ~2^-11 sum_d |z_d c_d| (~3e-3 at D = 64), times
# inv_eps in the logits. Under the interpreter tf32 is exact fp32; its looser row is for GPU runs. "fp16" (fp32
# inputs rounded to fp16 after power-of-two scaling: tf32's 10 bits, rounded to nearest) runs for real here.
TOLERANCES = {
    (torch.float32, "ieee"): {"lse": (3e-5, 3e-6), "codes": (3e-6, 2e-5), "score": (2e-5, 2e-5)},
    (torch.float32, "tf32"): {"lse": (3e-2, 1e-3), "codes": (2e-2, 1e-2), "score": (3e-3, 3e-3)},
    (torch.float32, "fp16"): {"lse": (3e-2, 1e-3), "codes": (2e-2, 1e-2), "score": (3e-3, 3e-3)},
    (torch.float16, "tf32"): {"lse": (3e-5, 3e-6), "codes": (3e-6, 2e-5), "score": (2e-5, 2e-5)},
    (torch.bfloat16, "tf32"): {"lse": (3e-5, 3e-6), "codes": (3e-6, 2e-5), "score": (2e-5, 2e-5)},
}
PRECISIONS = [pytest.param(dtype, prec, id=f"{str(dtype).replace('torch.', '')}-{prec}") for dtype, prec in TOLERANCES]

# (H, N, K, D, block_d, n_programs): None lets the launch heuristic choose (tiles of 16 under the interpreter).
SHAPES = [
    pytest.param(1, 1, 1, 3, None, None, id="N1-K1-D3"),  # a 16x16x16 tile with one live entry
    pytest.param(1, 37, 45, 3, None, None, id="N37-K45-D3"),  # N tail 5, K tail 13, D padded 3 -> 16
    pytest.param(2, 9, 70, 64, None, None, id="H2-K>N-D64"),  # two heads, K > N, BLOCK_N > N, D whole (64)
    pytest.param(2, 21, 40, 40, 16, None, id="D-streamed"),  # D in chunks of 16 (last 8 of 16), ONE_D off
    pytest.param(1, 70, 20, 8, None, 2, id="persistent"),  # 5 row tiles on 2 programs: partials read back
    pytest.param(1, 20, 18, 300, None, None, id="D300"),  # default launch past MAX_ONE_D: D streamed, tail 44 of 64
]


def _inputs(h, n, k, d, dtype, *, seed=0, bias=True):
    """Z (N, D), C (H, K, D) rounded to ``dtype``, scaled so that S = Z Cᵀ has unit spread; bias (H, K)."""
    g = torch.Generator().manual_seed(seed)
    z = (torch.randn(n, d, generator=g) / d**0.25).to(dtype).to(DEVICE)
    c = (torch.randn(h, k, d, generator=g) / d**0.25).to(dtype).to(DEVICE)
    b = (0.5 * torch.randn(h, k, generator=g)).to(DEVICE) if bias else None
    return z, c, b


def _scores64(z, c, bias):
    """The float64 reference scores (H, N, K) from the same rounded inputs."""
    s = torch.einsum("nd,hkd->hnk", z.double().cpu(), c.double().cpu())
    return s if bias is None else s + bias.double().cpu()[:, None, :]


def _operands(z, c, precision):
    """(prototypes, scales) the launchers take: for "fp16", the fp16 copy of C and the power-of-two scales."""
    if precision == "fp16":
        return prepare_fp16(z, c)
    return c, (1.0, 1.0)


def _bias2(bias):
    return None if bias is None else bias * (INV_EPS * LOG2E)


def _log_c(n, *, zero_weight=()):
    c = torch.full((n,), 1.0 / n, dtype=torch.float64)
    c[list(zero_weight)] = 0.0
    return c.log().float().to(DEVICE)


def _potentials(h, k, *, seed=1, closed=()):
    b = torch.randn(h, k, generator=torch.Generator().manual_seed(seed))
    b[:, list(closed)] = float("-inf")
    return b.to(DEVICE)


def _ws(z, c, block_d=None, n_programs=None, column_mass=True):
    n, d = z.shape
    h, k, _ = c.shape
    launch = features_launch(
        n, k, d, h, z.element_size(), z.device, block_d=block_d, n_programs=n_programs, column_mass=column_mass
    )
    return FeaturesWorkspace.for_inputs(z, c, launch)


def ref_cluster_lse(s, b, log_c, inv_eps):
    x = s * inv_eps  # (H, N, K) float64
    a = log_c.double().cpu().expand(x.shape[:2])  # (H, N)
    if b is not None:
        a = a - torch.logsumexp(x + b.double().cpu()[:, None, :], dim=-1)
    return torch.logsumexp(x + a[..., None], dim=1)  # (H, K)


def assert_labels(labels, logits, what, tol=1e-4):
    """labels maximise the float64 logits up to ``tol`` relative (fp32 rounding of the logits by default)."""
    labels = labels.cpu()
    assert labels.dtype == torch.int64, f"{what}: labels dtype {labels.dtype}"
    picked = logits.gather(-1, labels[..., None])[..., 0]
    best = logits.max(-1).values
    bad = (picked < best - tol * best.abs().clamp_min(1.0)).nonzero().tolist()
    assert not bad, f"{what}: labels not the argmax at (h, j) {bad[:5]}"


# ---------------------------------------------------------------------------------------------------
# cluster LSE (the iteration kernel)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, precision", PRECISIONS)
@pytest.mark.parametrize("h, n, k, d, block_d, n_programs", SHAPES)
@pytest.mark.parametrize(
    "warm, with_bias, column_mass",
    [(False, True, True), (True, False, True), (True, True, True), (True, True, False)],
    ids=["cold-bias", "warm", "warm-bias", "warm-bias-lse"],  # cold: b = None, a = log c, sweep 2 only
)
def test_cluster_lse_matches_reference(dtype, precision, h, n, k, d, block_d, n_programs, warm, with_bias, column_mass):
    """Cold and warm passes, warm ones summing plan masses (the default) or log-domain sums, against float64."""
    atol, rtol = TOLERANCES[dtype, precision]["lse"]
    z, c, bias = _inputs(h, n, k, d, dtype, bias=with_bias)
    b = _potentials(h, k) if warm else None
    log_c = _log_c(n)
    c_op, scales = _operands(z, c, precision)
    ws = _ws(z, c_op, block_d, n_programs, column_mass)
    out = features_cluster_lse(
        z, c_op, _bias2(bias), b, log_c, INV_EPS, input_precision=precision, scales=scales, workspace=ws
    )
    assert out.dtype == torch.float32 and out.shape == (h, k)
    expected = ref_cluster_lse(_scores64(z, c, bias), b, log_c, INV_EPS)
    assert_close(out, expected, atol, rtol, f"cluster_lse {dtype} {precision} {(h, n, k, d)}")


@pytest.mark.parametrize("dtype, precision", PRECISIONS[:1] + PRECISIONS[2:3] + PRECISIONS[4:])
@pytest.mark.parametrize(
    "warm, column_mass", [(False, True), (True, True), (True, False)], ids=["cold", "warm", "warm-lse"]
)
def test_cluster_lse_zero_weights_and_closed_clusters(dtype, precision, warm, column_mass):
    """Zero-weight samples contribute nothing (bit for bit); a cluster with bias -inf is unreachable (-inf);
    a zero-weight cluster (b = -inf) is left out of every row's LSE; summing masses, its own entry is -inf (it
    holds no mass; the solver never reads it), log-domain sums give its LSE."""
    atol, rtol = TOLERANCES[dtype, precision]["lse"]
    h, n, k, d = 2, 40, 21, 5
    z, c, bias = _inputs(h, n, k, d, dtype, seed=3)
    bias[:, 6] = float("-inf")  # cluster 6: nobody may join it
    log_c = _log_c(n, zero_weight=(2, 17, 39))
    b = _potentials(h, k, closed=(7,)) if warm else None
    c_op, scales = _operands(z, c, precision)
    kw = dict(input_precision=precision, scales=scales, workspace=_ws(z, c_op, n_programs=2, column_mass=column_mass))
    out = features_cluster_lse(z, c_op, _bias2(bias), b, log_c, INV_EPS, **kw)
    assert (out[:, 6] == float("-inf")).all(), f"a cluster with bias -inf must give -inf, got {out[:, 6].tolist()}"
    expected = ref_cluster_lse(_scores64(z, c, bias), b, log_c, INV_EPS)
    if warm and column_mass:
        expected[:, 7] = float("-inf")
    assert_close(out, expected, atol, rtol, "masked")
    z2 = z.clone()
    z2[[2, 17, 39]] = (3 * torch.randn(3, d)).to(dtype).to(DEVICE)
    out2 = features_cluster_lse(z2, c_op, _bias2(bias), b, log_c, INV_EPS, **kw)
    assert torch.equal(out, out2), f"zero-weight samples changed the result: {(out - out2).abs().max()}"


def _light_clusters_problem(dtype, precision, d=5):
    """Three heads, K = 70 (two merge blocks of 64), with a bias, and potentials that leave some clusters next to no
    mass: in head 0 clusters 1 and 4, b 80 and 250 nats below the rest (plan masses ~1e-35 and ~1e-109, both under the
    N * 2**-100 floor: both recomputed, though only cluster 4's entries underflow fp32), cluster 6 40 nats down
    (summed as a mass); in head 1 cluster 66 (the second block), in head 2 cluster 3, 250 nats each."""
    h, n, k = 3, 37, 70
    z, c, bias = _inputs(h, n, k, d, dtype, seed=21)
    b = _potentials(h, k, seed=22)
    for head, cluster, drop in [(0, 1, 80.0), (0, 4, 250.0), (0, 6, 40.0), (1, 66, 250.0), (2, 3, 250.0)]:
        b[head, cluster] -= drop
    c_op, scales = _operands(z, c, precision)
    expected = ref_cluster_lse(_scores64(z, c, bias), b, _log_c(n), INV_EPS)
    return (z, c_op, _bias2(bias), b, _log_c(n), INV_EPS), dict(input_precision=precision, scales=scales), expected


UNDERFLOWING = [(0, 4), (1, 66), (2, 3)]  # (head, cluster) whose every plan entry is 0 in fp32


@pytest.mark.parametrize("dtype, precision", [PRECISIONS[0], PRECISIONS[2], PRECISIONS[4]])
@pytest.mark.parametrize("d, block_d", [(5, None), (40, 16)], ids=["D-whole", "D-streamed"])
def test_column_mass_falls_back_to_exact_for_light_clusters(dtype, precision, d, block_d):
    """The mass sums flush plan entries below 2**-126 to 0; the merge recomputes such light clusters in log domain,
    their scores recomputed from Z and C (fp32 exact, fp32 rounded to fp16, bf16; D whole or streamed in the pass):
    the result equals the reference everywhere."""
    args, kw, expected = _light_clusters_problem(dtype, precision, d)
    out = features_cluster_lse(*args, **kw, workspace=_ws(args[0], args[1], block_d, n_programs=2))
    assert_close(out, expected, *TOLERANCES[dtype, precision]["lse"], f"light clusters {dtype} {precision}")


def test_column_mass_fallback_is_what_keeps_light_clusters(monkeypatch):
    """Without the fallback (a floor of 0) the light clusters' masses underflow to -inf, and every other cluster is
    unchanged: so the test above reaches the fallback, and the floor is what decides it."""
    from otlabel.kernels import sinkhorn_features

    args, kw, expected = _light_clusters_problem(torch.float32, "ieee")
    monkeypatch.setattr(sinkhorn_features, "MASS_FLOOR_PER_SAMPLE", 0.0)
    out = features_cluster_lse(*args, **kw, workspace=_ws(args[0], args[1], n_programs=2))
    for head, cluster in UNDERFLOWING:
        assert out[head, cluster] == float("-inf"), f"({head}, {cluster}) should underflow: {out[head, cluster]}"
        expected[head, cluster] = float("-inf")
    assert_close(out, expected, *TOLERANCES[torch.float32, "ieee"]["lse"], "the other clusters, summed as masses")


def test_column_mass_fallback_left_alone_on_ordinary_potentials(monkeypatch):
    """Ordinary potentials (no cluster near the floor): the same bits with the fallback on and off, so the masses are
    what the reference checks in the other tests, not the fallback's log-domain recomputation."""
    from otlabel.kernels import sinkhorn_features

    h, n, k, d = 3, 41, 70, 6
    z, c, bias = _inputs(h, n, k, d, torch.float32, seed=23)
    args = (z, c, _bias2(bias), _potentials(h, k, seed=24), _log_c(n), INV_EPS)
    runs = []
    for floor in (sinkhorn_features.MASS_FLOOR_PER_SAMPLE, 0.0, float("inf")):  # inf: every block recomputed
        monkeypatch.setattr(sinkhorn_features, "MASS_FLOOR_PER_SAMPLE", floor)
        runs.append(features_cluster_lse(*args, input_precision="ieee", workspace=_ws(z, c, n_programs=2)))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[2], runs[0]), "the fallback's log-domain sums should round differently"
    expected = ref_cluster_lse(_scores64(z, c, bias), args[3], args[4], INV_EPS)
    for run, what in zip(runs[::2], ("masses", "every block recomputed"), strict=True):
        assert_close(run, expected, *TOLERANCES[torch.float32, "ieee"]["lse"], what)


def test_workspace_for_other_inputs_is_refused():
    """The kernels write a workspace's buffers without bounds of their own: one made for other inputs is refused."""
    z, c, _ = _inputs(1, 40, 21, 5, torch.float32)
    ws = _ws(z, c)
    log_c = _log_c(40)
    for other_z, other_c, why in [(z, c[:, :20], "made for other inputs"), (z[:30], c, "but N = 30 makes 2 row tiles")]:
        with pytest.raises(ValueError, match=why):
            features_cluster_lse(other_z, other_c, None, None, log_c[: other_z.shape[0]], INV_EPS, workspace=ws)


@pytest.mark.parametrize("column_mass", [True, False], ids=["masses", "lse"])
def test_workspace_with_more_programs_than_row_tiles_is_refused(column_mass):
    """A workspace for more samples, used for fewer: its programs without a row tile would leave their partials as
    the last call wrote them, and the merge would read them (log-domain sums: silently wrong before, found in
    review)."""
    z, c, bias = _inputs(1, 200, 21, 5, torch.float32, seed=3)
    ws = _ws(z, c, n_programs=8, column_mass=column_mass)  # 13 row tiles of 16 under the interpreter
    b = _potentials(1, 21)
    features_cluster_lse(z, c, _bias2(bias), b, _log_c(200), INV_EPS, workspace=ws)
    with pytest.raises(ValueError, match="8 programs but N = 20 makes 2 row tiles"):
        features_cluster_lse(z[:20], c, _bias2(bias), b, _log_c(20), INV_EPS, workspace=ws)


def test_one_workspace_alternating_cold_warm_bias_and_light_clusters():
    """Cold, warm, with and without a bias, a zero-weight cluster, light clusters in both heads and both merge
    blocks, on one workspace (10 row tiles on 3 programs, K = 70 padded to 80): bit for bit what fresh ones give."""
    h, n, k, d = 2, 150, 70, 24
    z, c, bias = _inputs(h, n, k, d, torch.float32, seed=5)
    bs = [_potentials(h, k, seed=s) for s in (6, 7, 8)]
    bs[1][1, 69] = float("-inf")
    bs[2][0, 3] -= 250.0
    bs[2][1, 66] -= 250.0
    calls = [(None, bias), (bs[0], bias), (bs[1], None), (None, None), (bs[2], bias), (bs[0], None), (bs[2], None)]
    ws = _ws(z, c, n_programs=3)
    for b, call_bias in calls:
        args = (z, c, _bias2(call_bias), b, _log_c(n), INV_EPS)
        out = features_cluster_lse(*args, input_precision="ieee", workspace=ws)
        fresh = features_cluster_lse(*args, input_precision="ieee", workspace=_ws(z, c, n_programs=3))
        assert torch.equal(out, fresh), f"reused workspace differs by {(out - fresh).abs().max()}"


def test_closed_cluster_bias_does_not_trigger_the_fallback(monkeypatch):
    """A cluster closed by a -inf bias (b finite) holds no mass by construction: not a reason to recompute its block
    from Z and C on every warm pass (found in review). Counted under the interpreter, where the merge's fallback
    calls ``_aligned_d`` as Python."""
    from otlabel.kernels import sinkhorn_features
    from otlabel.kernels.utils import interpreting

    if not interpreting():
        pytest.skip("counts calls of a jit function, which only the interpreter runs as Python")
    in_merge, fallbacks = [False], [0]
    aligned, merge = sinkhorn_features._aligned_d, sinkhorn_features._features_merge_masses_kernel

    def counting_aligned(*args):
        fallbacks[0] += in_merge[0]
        return aligned(*args)

    class CountingMerge:
        def __getitem__(self, grid):
            def run(*args, **kwargs):
                in_merge[0] = True
                try:
                    return merge[grid](*args, **kwargs)
                finally:
                    in_merge[0] = False

            return run

    monkeypatch.setattr(sinkhorn_features, "_aligned_d", counting_aligned)
    monkeypatch.setattr(sinkhorn_features, "_features_merge_masses_kernel", CountingMerge())
    z, c, bias = _inputs(1, 40, 21, 5, torch.float32, seed=3)
    b = _potentials(1, 21)
    b_light = b.clone()
    b_light[0, 2] -= 250.0
    bias[:, 6] = float("-inf")
    out = features_cluster_lse(z, c, _bias2(bias), b, _log_c(40), INV_EPS, workspace=_ws(z, c))
    assert out[0, 6] == float("-inf") and fallbacks[0] == 0, f"{fallbacks[0]} block(s) recomputed for a closed cluster"
    features_cluster_lse(z, c, _bias2(bias), b_light, _log_c(40), INV_EPS, workspace=_ws(z, c))
    assert fallbacks[0] == 1, "a light cluster should be recomputed: the count sees the fallback"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_cluster_lse_strided_inputs(dtype):
    """Any strides are read in place: Z stored (D, N) and seen transposed, C a strided slice of a larger tensor."""
    h, n, k, d = 2, 30, 25, 20
    z, c, bias = _inputs(h, n, k, d, dtype, seed=5)
    z_t = z.t().contiguous().t()  # (N, D) view, stride (1, N)
    c_big = torch.zeros(h, 2 * k, d + 3, dtype=dtype, device=DEVICE)
    c_big[:, ::2, 1 : d + 1] = c
    c_view = c_big[:, ::2, 1 : d + 1]  # (H, K, D), stride (2K(D+3), 2(D+3), 1)
    assert not z_t.is_contiguous() and not c_view.is_contiguous()
    b, log_c = _potentials(h, k), _log_c(n)
    ws = _ws(z, c)
    contiguous = features_cluster_lse(z, c, _bias2(bias), b, log_c, INV_EPS, input_precision="ieee", workspace=ws)
    strided = features_cluster_lse(z_t, c_view, _bias2(bias), b, log_c, INV_EPS, input_precision="ieee", workspace=ws)
    assert torch.equal(contiguous, strided), f"strided inputs differ by {(contiguous - strided).abs().max()}"
    labels, _ = features_assign(z_t, c_view, bias, b, INV_EPS, False, input_precision="ieee")
    assert torch.equal(labels, features_assign(z, c, bias, b, INV_EPS, False, input_precision="ieee")[0])


def test_cluster_lse_deterministic():
    """Fixed-order two-stage reduction, no atomics: two runs are bitwise equal (several tiles per program)."""
    z, c, bias = _inputs(2, 70, 33, 24, torch.float32, seed=9)
    b, log_c = _potentials(2, 33), _log_c(70)
    ws = _ws(z, c, n_programs=2)
    runs = [features_cluster_lse(z, c, _bias2(bias), b, log_c, INV_EPS, workspace=ws) for _ in range(2)]
    assert torch.equal(runs[0], runs[1]), f"runs differ by {(runs[0] - runs[1]).abs().max()}"


def test_a_hand_built_launch_with_more_programs_than_row_tiles_is_clamped():
    """A program with no row tile never writes its partials: over a workspace of garbage, a FeaturesLaunch of 3
    programs for 2 row tiles gave a log-sum-exp off by 11.9. The workspace clamps P to the tiles."""
    z, c, bias = _inputs(1, 20, 9, 16, torch.float32, seed=4)
    b, log_c = _potentials(1, 9), _log_c(20)
    tiled = features_launch(20, 9, 16, 1, 4, z.device, n_programs=1)
    wide = dataclasses.replace(tiled, block_n=16, n_programs=3)  # 2 row tiles of 16
    ws = FeaturesWorkspace.for_inputs(z, c, wide)
    assert ws.launch.n_programs == 2
    ws.pmax.fill_(123.0)  # garbage, as uninitialised GPU memory may hold
    ws.psum.fill_(7.0)
    got = features_cluster_lse(z, c, _bias2(bias), b, log_c, INV_EPS, input_precision="ieee", workspace=ws)
    want = ref_cluster_lse(_scores64(z, c, bias), b, log_c, INV_EPS)
    assert (got.cpu().double() - want).abs().max() < 1e-4


# ---------------------------------------------------------------------------------------------------
# read-out: labels, codes, transport score
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype, precision", PRECISIONS)
@pytest.mark.parametrize("h, n, k, d, block_d, n_programs", SHAPES)
def test_assign_and_transport_score(dtype, precision, h, n, k, d, block_d, n_programs):
    tol = TOLERANCES[dtype, precision]
    z, c, bias = _inputs(h, n, k, d, dtype, seed=5)
    b, log_c = _potentials(h, k, seed=6), _log_c(n, zero_weight=(0,) if n > 1 else ())
    c_op, scales = _operands(z, c, precision)
    kw = dict(
        input_precision=precision, scales=scales, launch=features_launch(n, k, d, h, 2, z.device, block_d=block_d)
    )
    labels, codes = features_assign(z, c_op, bias, b, INV_EPS, want_codes=True, **kw)
    s = _scores64(z, c, bias)
    logits = s * INV_EPS + b.double().cpu()[:, None, :]
    assert labels.shape == (h, n) and codes.shape == (h, n, k) and codes.dtype == torch.float32
    what = f"{dtype} {precision} {(h, n, k, d)}"
    assert_labels(labels, logits, f"labels {what}")
    assert_close(codes, torch.softmax(logits, -1), *tol["codes"], f"codes {what}")
    only, none = features_assign(z, c_op, bias, b, INV_EPS, want_codes=False, **kw)
    assert none is None and torch.equal(only, labels)
    score = features_transport_score(z, c_op, bias, b, log_c, INV_EPS, **kw)
    expected = (log_c.double().cpu().exp()[:, None] * torch.softmax(logits, -1) * s).sum(dim=(1, 2))
    assert score.dtype == torch.float64 and score.shape == (h,)
    assert_close(score, expected, *tol["score"], f"transport score {what}")


@pytest.mark.parametrize("fast_ties", ["first", "last"])
def test_assign_ties_lowest_index_and_closed_clusters(fast_ties, monkeypatch):
    """Duplicate prototypes give exact ties, inside a chunk and across chunks of 16: the lowest index wins,
    as torch.argmax. A cluster closed by b = -inf or bias = -inf never wins and gets code 0. ``"last"``: the
    interpreter's fast argmax tie-break takes the last maximiser, as a GPU may (the kernel must ask for the first)."""
    if fast_ties == "last":
        if os.environ.get("TRITON_INTERPRET") != "1":
            pytest.skip("patches the Triton interpreter")
        fast_argmax_takes_the_last(monkeypatch)
    z, c, _ = _inputs(1, 6, 40, 8, torch.float32, seed=11)
    c[0, 20] = c[0, 3]  # tie across chunks (0 and 1)
    c[0, 9] = c[0, 8]  # tie inside chunk 0
    c[0, 39] = c[0, 35]  # tie inside the last, partly masked chunk
    z[:3] = c[0, [3, 8, 35]] * 4  # rows 0-2 point at the tied pairs
    b = torch.zeros(1, 40, device=DEVICE)
    bias = torch.zeros(1, 40, device=DEVICE)
    z[3] = c[0, 12] * 4  # row 3 prefers 12, which b closes
    b[0, 12] = float("-inf")
    z[4] = c[0, 30] * 4  # row 4 prefers 30, which the bias closes
    bias[0, 30] = float("-inf")
    labels, codes = features_assign(z, c, bias, b, INV_EPS, True, input_precision="ieee")
    expected = (_scores64(z, c, bias) * INV_EPS + b.double().cpu()).argmax(-1)
    assert labels.cpu().tolist() == expected.tolist()
    assert labels[0, :3].tolist() == [3, 8, 35] and 12 not in labels.tolist()[0] and 30 not in labels.tolist()[0]
    assert (codes[0, :, [12, 30]] == 0).all()


# ---------------------------------------------------------------------------------------------------
# the backend operator (the seam the solver loop uses)
# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "dtype, precision, atol",
    [
        (torch.float32, "ieee", 2e-4),
        (torch.float32, "fp16", 2e-2),
        (torch.bfloat16, None, 2e-4),
        (torch.float16, None, 2e-4),
    ],  # noqa: E501
    ids=["float32-ieee", "float32-fp16", "bfloat16", "float16"],
)
def test_operator_solve_matches_reference_loop(dtype, precision, atol):
    """20 iterations of the solver loop through TritonFeaturesOperator == the same loop over ReferenceOperator
    on the float64 scores Z @ C.T + bias; then labels, codes, marginals and the transport score."""
    h, n, k, d, eps = 2, 45, 7, 12, 0.25
    z, c, bias = _inputs(h, n, k, d, dtype, seed=13)
    w = torch.rand(n, generator=torch.Generator().manual_seed(14)) + 0.5
    w[3] = 0.0  # a zero-weight sample
    w = (w / w.sum()).to(DEVICE)
    r = torch.full((k,), 1.0 / k, dtype=torch.float64)
    op = TritonFeaturesOperator(z, c, bias, eps, w, input_precision=precision)
    assert (op.n_heads, op.n_samples, op.n_clusters, op.dtype) == (h, n, k, torch.float32)
    ref = ReferenceOperator(_scores64(z, c, bias), eps, w.double().cpu())
    out = run_sinkhorn(op, r.to(DEVICE), None, 20, None)
    out64 = run_sinkhorn(ref, r, None, 20, None)
    assert out.n_iter == out64.n_iter == 20
    assert_close(centred(out.potentials.cpu()), centred(out64.potentials), atol, 0.0, f"potentials {dtype}")
    small = 50 if precision == "fp16" else 1  # fp16-rounded inputs (10-bit mantissas) move logits by ~1e-3
    assert_close(out.errors[1:], out64.errors[1:], 1e-5 * small, 1e-3, f"marginal errors {dtype}")
    labels, codes = op.assign(out.potentials, want_codes=True)
    labels64, codes64 = ref.assign(out64.potentials, want_codes=True)
    if precision == "fp16":
        logits64 = _scores64(z, c, bias) / eps + out64.potentials[:, None, :]
        assert_labels(labels, logits64, "labels fp16", tol=1e-3)
    else:
        assert torch.equal(labels.cpu(), labels64), f"labels differ at {(labels.cpu() != labels64).nonzero().tolist()}"
    assert_close(codes.cpu(), codes64, 1e-4 * small, 0.0, f"codes {dtype}")
    w64 = w.double().cpu()[:, None]
    plan, plan64 = codes.double().cpu() * w64, codes64 * w64  # (H, N, K); 20 iterations: not yet converged
    assert_close(plan.sum(1), plan64.sum(1), 1e-5 * small, 1e-4, f"cluster marginal {dtype}")
    score, score64 = op.transport_score(out.potentials), ref.transport_score(out64.potentials)
    assert_close(score, score64, 1e-4 * small, 1e-4, "score")


def test_operator_matches_dense_operator():
    """Features mode and the dense kernels on the materialised S agree to fp32 rounding, and one head given as
    (K, D) prototypes with a (K,) bias is the same as (1, K, D) with (1, K)."""
    from otlabel.backends.triton import TritonDenseOperator

    z, c, bias = _inputs(1, 33, 19, 10, torch.float32, seed=17)
    w = torch.full((33,), 1 / 33, device=DEVICE)
    dense = TritonDenseOperator(_scores64(z, c, bias).float().to(DEVICE), 0.2, w)
    feats = TritonFeaturesOperator(z, c[0], bias[0], 0.2, w, allow_tf32=False)
    feats3 = TritonFeaturesOperator(z, c, bias, 0.2, w, allow_tf32=False)
    b = dense.cluster_lse(None)
    assert_close(feats.cluster_lse(None), b, 1e-5, 1e-6, "cold")
    b = math.log(1 / 19) - b
    assert_close(feats.cluster_lse(b), dense.cluster_lse(b), 1e-5, 1e-6, "warm")
    assert torch.equal(feats.cluster_lse(b), feats3.cluster_lse(b))
    assert torch.equal(feats.assign(b, False)[0], dense.assign(b, False)[0])


def test_operator_rejects_bad_input():
    z = torch.zeros(4, 3, device=DEVICE)
    c = torch.zeros(1, 5, 3, device=DEVICE)
    w = torch.full((4,), 0.25, device=DEVICE)
    with pytest.raises(ValueError, match="sample_weights"):
        TritonFeaturesOperator(z, c, None, 0.1, torch.ones(5, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        TritonFeaturesOperator(z.double(), c.double(), None, 0.1, w)
    with pytest.raises(TypeError, match="share a dtype"):
        TritonFeaturesOperator(z, c.half(), None, 0.1, w)
    with pytest.raises(ValueError, match="D = 3 but prototypes have D = 4"):
        TritonFeaturesOperator(z, torch.zeros(1, 5, 4, device=DEVICE), None, 0.1, w)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        TritonFeaturesOperator(z[None], c, None, 0.1, w)
    with pytest.raises(ValueError, match="bias must be"):
        TritonFeaturesOperator(z, c, torch.zeros(2, 5, device=DEVICE), 0.1, w)
    with pytest.raises(ValueError, match="epsilon"):
        TritonFeaturesOperator(z, c, None, 0.0, w)
    with pytest.raises(ValueError, match="input_precision"):
        features_cluster_lse(z, c, None, None, w.log(), 1.0, input_precision="fp64")


def test_triton_available_without_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not triton_available(torch.zeros(1))
    with pytest.raises(RuntimeError, match="CUDA"):
        TritonFeaturesOperator(torch.zeros(4, 3), torch.zeros(1, 5, 3), None, 0.1, torch.full((4,), 0.25))


# ---------------------------------------------------------------------------------------------------
# benchmark script: importable, a clean exit without CUDA, and its GPU code path dry-run on the CPU
# ---------------------------------------------------------------------------------------------------

SCRIPT = ROOT / "benchmarks" / "gpu_features.py"


def test_benchmark_script_imports():
    spec = importlib.util.spec_from_file_location("gpu_features", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # defines, runs nothing
    assert callable(module.main)


def test_benchmark_script_without_cuda(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--csv", str(tmp_path / "r.csv")], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "no CUDA device" in proc.stdout + proc.stderr
    assert not (tmp_path / "r.csv").exists()


def test_benchmark_script_dry_run(tmp_path):
    """The GPU code path end to end on the CPU (interpreter, tiny sizes), minus do_bench and flash-sinkhorn."""
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    csv_path = tmp_path / "r.csv"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--dry-run", "--csv", str(csv_path)], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.rstrip().endswith("|"), "the markdown table must be printed last"
    lines = csv_path.read_text().splitlines()
    assert lines[0].startswith("date,device,torch,triton") and len(lines) >= 5
    assert any(",otlabel-features," in line for line in lines) and any(",otlabel-dense," in line for line in lines)
    for mode in ("bf16", "fp32", "fp32>fp16"):  # the tile sweep: log-domain and masses side by side, and a verdict
        for setting in ("16x16 w1 s1 p1/SM lse", "16x16 w1 s1 p1/SM masses", "32x16 w1 s1 p1/SM masses"):
            assert f"sweep {mode} {setting}:" in proc.stdout, proc.stdout[-3000:]
        assert f"verdict {mode}: default tile, log-domain / masses" in proc.stdout, proc.stdout[-3000:]


# ---------------------------------------------------------------------------------------------------
# real GPU only
# ---------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, precision", PRECISIONS)
@pytest.mark.parametrize("k, d", [(3000, 128), (1000, 40), (257, 512)], ids=["K3000-D128", "K1000-D40", "D512"])
def test_gpu_default_launch_and_cuda_graph(dtype, precision, k, d):
    """Default heuristics at a real size (tensor cores, tf32 where asked), cold and warm passes, a light cluster
    through the merge's exact fallback, and the iteration from a CUDA graph."""
    h, n = 2, 5000
    tol = TOLERANCES[dtype, precision]
    z, c, bias = _inputs(h, n, k, d, dtype, seed=21)
    w = torch.full((n,), 1.0 / n, device="cuda")
    op = TritonFeaturesOperator(z, c, bias, 1 / INV_EPS, w, input_precision=precision)  # "fp16" too
    b = _potentials(h, k)
    b[:, 3] -= 250.0  # its plan masses underflow fp32: the merge recomputes its block in log domain
    s = _scores64(z, c, bias)
    cold = ref_cluster_lse(s, None, w.log(), INV_EPS)
    assert_close(op.cluster_lse(None), cold, *tol["lse"], f"cold cluster_lse gpu {dtype} {precision}")
    expected = ref_cluster_lse(s, b, w.log(), INV_EPS)
    assert_close(op.cluster_lse(b), expected, *tol["lse"], f"cluster_lse gpu {dtype} {precision}")
    op.cluster_lse(b)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = op.cluster_lse(b)
    graph.replay()
    torch.cuda.synchronize()
    assert_close(out, expected, *tol["lse"], f"cluster_lse gpu graph {dtype} {precision}")
    labels, codes = op.assign(b, want_codes=True)
    logits = s * INV_EPS + b.double().cpu()[:, None, :]
    agree = (labels.cpu() == logits.argmax(-1)).double().mean().item()
    assert agree > (0.999 if precision == "ieee" or dtype != torch.float32 else 0.99), f"labels agree {agree}"
    assert_close(codes, torch.softmax(logits, -1), *tol["codes"], f"codes gpu {dtype} {precision}")


def test_exact_fp32_launch_streams_d(monkeypatch):
    """GPU launch heuristic: exact fp32 products ("ieee", "tf32x3") take D in chunks of 32 (whole D = 128 spills
    registers on sm_90); tf32, fp16 and bf16 keep D whole; a D of 32 or less stays whole."""
    from otlabel.kernels import sinkhorn_features as kf
    from otlabel.kernels import utils

    monkeypatch.setattr(utils, "interpreting", lambda: False)  # the GPU heuristic, not the interpreter's tiles
    launch = lambda d, item, precision: kf.features_launch(  # noqa: E731
        4096, 3000, d, 1, item, "cpu", n_programs=8, precision=precision
    )
    assert launch(128, 4, "ieee").block_d == 32 and not launch(128, 4, "ieee").one_d(128)
    assert launch(128, 4, "tf32x3").block_d == 32
    assert launch(128, 4, "tf32").block_d == 128
    assert launch(128, 2, "ieee").block_d == 128  # bf16/fp16: native tensor cores whatever the flag
    assert launch(24, 4, "ieee").block_d == 32 and launch(24, 4, "ieee").one_d(24)


def test_d_vector_width_and_the_alignment_hint():
    """Elements per 16-byte access along D: what D, the row strides and the data pointers allow. The kernels' hint
    (``_vec_d``) is 1 where D and the strides are multiples of 16, which Triton's specialisation already proves."""
    from otlabel.kernels import sinkhorn_features as kf

    def z_c(d, z_dtype=torch.float32, c_dtype=None):
        return torch.zeros(5, d, dtype=z_dtype), torch.zeros(2, 7, d, dtype=c_dtype or z_dtype)

    assert kf.d_vector_width(*z_c(200)) == 4 and kf._vec_d(*z_c(200)) == 4  # fp32, D = 200: rows of 800 B
    assert kf.d_vector_width(*z_c(136, torch.bfloat16)) == 8 and kf._vec_d(*z_c(136, torch.bfloat16)) == 8
    assert kf.d_vector_width(*z_c(200, torch.float32, torch.float16)) == 8  # fp32 Z, fp16 C: the fp16 rows decide
    assert kf.d_vector_width(*z_c(201)) == 1 and kf.d_vector_width(*z_c(130)) == 2
    assert kf.d_vector_width(*z_c(128)) == 4 and kf._vec_d(*z_c(128)) == 1  # already multiples of 16: no hint
    z, c = z_c(128)
    padded = torch.zeros(5, 136)[:, :128]  # rows 136 apart: aligned, but not a multiple of 16
    assert kf.d_vector_width(padded, c) == 4 and kf._vec_d(padded, c) == 4
    shifted = torch.zeros(5 * 200 + 1)[1:].view(5, 200)  # starts 4 bytes past an aligned address
    assert kf.d_vector_width(shifted, z_c(200)[1]) == 1
    assert kf.d_vector_width(torch.zeros(200, 5).t(), z_c(200)[1]) == 1  # not contiguous along D
    one_row = torch.zeros(1, 200)
    assert kf.d_vector_width(one_row, torch.zeros(1, 1, 200)) == 4  # strides never used may be anything


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_alignment_hint_changes_no_result(dtype, monkeypatch):
    """VEC_D only tells the compiler what the host checked: with and without it, bitwise the same results (D = 40:
    a multiple of 8, not of 16; Z a view with padded rows, so its row stride needs the hint too)."""
    from otlabel.kernels import sinkhorn_features as kf

    h, n, k, d = 2, 37, 21, 40
    z, c, bias = _inputs(h, n, k, d, dtype, seed=6)
    z_padded = torch.zeros(n, d + 8, dtype=dtype, device=DEVICE)
    z_padded[:, :d] = z
    z_view = z_padded[:, :d]
    b, log_c = _potentials(h, k), _log_c(n)
    assert kf._vec_d(z_view, c) > 1

    def run():
        ws = _ws(z_view, c, n_programs=2)
        lse = features_cluster_lse(z_view, c, _bias2(bias), b, log_c, INV_EPS, input_precision="ieee", workspace=ws)
        labels, codes = features_assign(z_view, c, bias, b, INV_EPS, True, input_precision="ieee")
        return lse, labels, codes

    hinted = run()
    monkeypatch.setattr(kf, "_vec_d", lambda features, prototypes: 1)
    plain = run()
    for got, want, what in zip(hinted, plain, ("lse", "labels", "codes"), strict=True):
        assert torch.equal(got, want), f"{what} with the alignment hint differ by {(got - want).abs().max()}"
    assert_close(hinted[0], ref_cluster_lse(_scores64(z, c, bias), b, log_c, INV_EPS), 3e-5, 3e-6, "hinted lse")


def test_unaligned_fp32_rows_stream_d_past_128(monkeypatch):
    """GPU launch heuristic: fp32 rows that cannot start on 16-byte boundaries (D = 201) would load a 256-wide tile
    through registers and spill; they stream D in chunks of 32. Aligned rows (D = 200), 16-bit inputs and D <= 128
    keep D whole; the default launch reads the alignment off the tensors."""
    from otlabel.kernels import sinkhorn_features as kf
    from otlabel.kernels import utils

    monkeypatch.setattr(utils, "interpreting", lambda: False)
    launch = lambda d, item, aligned: kf.features_launch(  # noqa: E731
        4096, 3000, d, 1, item, "cpu", n_programs=8, z_rows_aligned=aligned
    )
    assert launch(201, 4, False).block_d == 32 and not launch(201, 4, False).one_d(201)
    assert launch(200, 4, True).block_d == 256
    assert launch(201, 2, False).block_d == 256  # bf16: no spill with the whole tile (166-208 registers)
    assert launch(100, 4, False).block_d == 128  # D <= 128: 173-186 registers whole, no spill
    for d, block_d in ((200, 256), (201, 32), (136, 256)):
        z, c = torch.zeros(64, d), torch.zeros(1, 30, d)
        assert kf._default_launch(z, c, "tf32").block_d == block_d, d


LIMITS = {"H100": 232448, "A100": 166912, "L4/A10": 101376, "64 KB": 65536, "48 KB": 49152}


@pytest.mark.parametrize("limit", list(LIMITS.values()), ids=list(LIMITS))
def test_launch_fits_the_shared_memory_of_the_device(limit, monkeypatch):
    """GPU launch heuristic under a given shared-memory limit (what a device reports; no GPU needed): every default
    launch fits by ``shared_memory_bound``, with tiles of at least 16, and on an H100 nothing changes."""
    from otlabel.kernels import sinkhorn_features as kf
    from otlabel.kernels import utils

    monkeypatch.setattr(utils, "interpreting", lambda: False)
    kinds = [(4, False, "tf32"), (4, False, "ieee"), (2, False, "tf32"), (2, True, "tf32")]  # fp32, 16-bit, fp32>fp16
    for (item, mixed, precision), d in ((kind, d) for kind in kinds for d in (3, 64, 128, 136, 200, 256, 300, 512)):
        kw = dict(z_fp32_to_fp16=mixed, precision=precision, n_programs=8)
        free = kf.features_launch(2**20, 3000, d, 1, item, "cpu", **kw)  # a CPU device: no limit
        fit = kf.features_launch(2**20, 3000, d, 1, item, "cpu", max_shared=limit, **kw)
        what = f"itemsize {item} mixed {mixed} {precision} D={d}"
        assert kf.shared_memory_bound(fit, d, item, z_fp32_to_fp16=mixed) <= limit, what
        assert min(fit.block_n, fit.block_k, fit.block_d) >= 16 and fit.num_stages >= 2, what
        if limit == LIMITS["H100"]:
            assert fit == free, f"{what}: the H100 launch changed to {fit}"
    # Sizes the caller fixes are kept (a sweep asks for exactly what it times); the others shrink around them.
    fixed = kf.features_launch(2**20, 3000, 256, 1, 4, "cpu", block_n=64, block_k=64, max_shared=LIMITS["L4/A10"])
    assert (fixed.block_n, fixed.block_k) == (64, 64) and fixed.block_d == utils.STREAM_D


def test_the_shared_memory_limit_comes_from_the_device():
    """On a CPU tensor (the interpreter) there is no limit; on CUDA it is what Triton checks at launch."""
    from otlabel.kernels import sinkhorn_features as kf

    assert kf.max_shared_memory("cpu") is None
    if torch.cuda.is_available():
        from triton.runtime.driver import driver

        props = driver.active.utils.get_device_properties(torch.cuda.current_device())
        assert kf.max_shared_memory(torch.device("cuda")) == props["max_shared_mem"]
