"""The compiled (Numba) CPU loops against PyTorch and float64, and end to end against the PyTorch fallback."""

import math

import numpy as np
import pytest
import torch
from helpers import assert_close, cosine_scores, random_problem

from otlabel import sinkhorn_assign
from otlabel.backends import cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason="numba is not installed")


@pytest.mark.parametrize("n_clusters", [1, 37, cpu_kernels.EXP_BLOCK_MAX_K])  # blocks of rows (ranges cut them), rows
def test_exp_kernel_rows_is_the_shifted_exponential(n_clusters):
    k = n_clusters
    s = torch.randn(300, k) * 3
    s[13, 5 % k] = -math.inf if k > 1 else 0.0  # a forbidden pair: exactly 0 in the kernel
    s[17, :] = -1e4  # a row far below its one allowed maximum: everything else underflows to exactly 0
    s[17, 2 % k] = 0.0
    b0 = torch.randn(k)
    kernel, shift = torch.full((300, k), float("nan")), torch.full((300,), float("nan"))
    cpu_kernels.exp_kernel_rows(s, 20.0, b0, 10, 290, kernel, shift)  # rows outside [10, 290) untouched
    x = s.double() * 20 + b0.double()
    want_shift = x.amax(dim=1)
    want = torch.exp(x - want_shift[:, None])
    rows = slice(10, 290)
    assert torch.isnan(kernel[:10]).all() and torch.isnan(shift[290:]).all()
    assert_close(shift[rows], want_shift[rows], atol=0, rtol=1e-6, what="row maxima")
    # float32 x of magnitude ~100 carries 6e-6 of rounding; the polynomial itself adds ~1e-7
    assert_close(kernel[rows], want[rows], atol=1e-30, rtol=2e-5, what="kernel entries")
    assert kernel[17, 2 % k] == 1.0 and (kernel[17, torch.arange(k) != 2 % k] == 0).all()
    assert kernel[13, 5 % k] == (0.0 if k > 1 else 1.0)
    assert float(kernel[rows].amax(dim=1).min()) == 1.0  # every row has its exp(0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matvec_rows_matches_float64(dtype):
    g = torch.rand(1000, 53, dtype=dtype)
    v = torch.rand(53, dtype=dtype)
    w = torch.rand(1000, dtype=dtype)
    got = cpu_kernels.fused_matvec_rows(g, v, w, 100, 901)
    g64, w64 = g[100:901].double(), w[100:901].double()
    want = g64.T @ (w64 / (g64 @ v.double()))
    assert got.dtype == torch.float64
    assert_close(got, want, atol=0, rtol=1e-6 if dtype == torch.float32 else 1e-13, what="fused matvecs")
    assert_close(cpu_kernels.fused_matvec_rows(g, None, w, 0, 1000), g.double().T @ w.double(), atol=0,
                 rtol=1e-6 if dtype == torch.float32 else 1e-13, what="cold-start matvec")  # fmt: skip


def test_float32_error_floor():
    """Each range summed its kernel rows into a float32 partial per cluster, 256 rows before adding it into the float64
    total, and that partial's rounding floored the marginal error of 3,000 x 40 cosine scores at eps 0.05 at 1.3e-7
    (four draws, 1 to 3 threads: 1.3-1.7e-7): tol = 1e-7 was never reached. Partials of 128 rows reach 6.5-7.6e-8.
    Two heads (240,000 scores) go in two ranges on two threads."""
    scores = torch.stack([cosine_scores(3000, 40, seed=seed) for seed in (0, 1)])
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        solves = {"one head": sinkhorn_assign(scores[0], 0.05, tol=1e-7, max_iter=300, warn=False),
                  "two heads": sinkhorn_assign(scores, 0.05, tol=1e-7, max_iter=300, warn=False)}  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    for what, res in solves.items():
        assert res.converged and res.marginal_error < 1e-7, f"{what}: {res.marginal_error:.3g} after {res.n_iter}"


@pytest.mark.parametrize("n_clusters", [29, cpu_kernels.ARGMAX_VECTOR_MIN_K, 130])  # a scalar and a vectorised max
def test_argmax_rows_takes_the_first_maximum(n_clusters):
    g = torch.rand(500, n_clusters, generator=torch.Generator().manual_seed(n_clusters))
    v = torch.rand(n_clusters)
    v[4] = 0.0  # an unreachable cluster never wins
    g[0] = 1.0
    v[:2] = 1.0  # row 0: clusters 0 and 1 tie at the top; the first wins, as in torch.argmax
    g[1] = 0.0  # row 1: every product is 0, the first wins
    g[2, -1], v[-1] = 2.0, 1.0  # row 2: the last cluster
    labels = torch.full((500,), -1, dtype=torch.int64)
    cpu_kernels.argmax_rows(g, v, 0, 500, labels)
    assert torch.equal(labels, (g * v).argmax(dim=1))
    assert labels[0] == 0 and labels[1] == 0 and labels[2] == n_clusters - 1 and not (labels == 4).any()


@pytest.mark.parametrize(
    "n_clusters", [12, cpu_kernels.SOFTMAX_VECTOR_MIN_K - 1, cpu_kernels.SOFTMAX_VECTOR_MIN_K, 41]
)  # a scalar max (blocks of rows, ranges cutting them; at its largest K) and a vectorised one
def test_softmax_rows_is_the_float64_softmax_and_its_first_argmax(n_clusters):
    """Against the float64 softmax of the same float32 logits: ``1 / eps = 16`` makes ``16 s`` exact, so ``x`` is
    rounded once, as the compiled loop rounds it (fused multiply-add or not). (At 1 / eps = 20 the float32 rounding of
    ``x`` itself, up to 2e-5 relative at |x| ~ 300, made the comparison depend on the random draw.)"""
    g = torch.Generator().manual_seed(5)
    last = n_clusters - 1
    s = torch.randn(300, n_clusters, generator=g) * 3
    s[13, 5] = -math.inf  # a forbidden pair: exactly 0 in the codes
    s[17, :] = -1e4  # a row far below its one allowed maximum: everything else underflows to exactly 0
    s[17, 2] = 0.0
    s[21, 7] = s[21, last - 1] = 10.0  # a tie at the top: the first wins, as in torch.argmax
    s[25] = -5.0 - torch.rand(n_clusters, generator=g)  # every logit negative
    s[27] = -1.0  # -0.0 (at 3) and +0.0 (at 9) tie at the top: the first wins, though their bits differ
    s[27, 3], s[27, 9] = -0.0, 0.0
    s[29, last] = 50.0  # the last cluster
    b = torch.randn(n_clusters, generator=g)
    b[last - 1] = b[7] = b[9] = 0.0
    b[3] = -0.0
    b[last] = -math.inf  # a closed cluster: never a label, code exactly 0
    labels = torch.full((300,), -1, dtype=torch.int64)
    codes = torch.full((300, n_clusters), float("nan"))
    cpu_kernels.softmax_rows(s, 16.0, b, 10, 290, labels, codes)  # rows outside [10, 290) untouched
    x = (s * 16 + b).double()
    rows = slice(10, 290)
    assert torch.isnan(codes[:10]).all() and torch.isnan(codes[290:]).all()
    assert (labels[:10] == -1).all() and (labels[290:] == -1).all()
    assert torch.equal(labels[rows], x[rows].argmax(dim=1)) and labels[21] == 7 and labels[27] == 3
    assert labels[29] == x[29].argmax()
    # the polynomial's error (~1e-7), the normalisation and the final rounding to float32
    assert_close(codes[rows], torch.softmax(x[rows], dim=1), atol=1e-9, rtol=1e-6, what="codes")
    assert codes[13, 5] == 0.0 and (codes[:, last][rows] == 0).all() and codes[17, 2] == 1.0
    assert_close(codes[rows].double().sum(dim=1), torch.ones(280, dtype=torch.float64), atol=2e-6, what="row sums")
    labels_only = torch.full((300,), -1, dtype=torch.int64)
    cpu_kernels.softmax_rows(s, 16.0, b, 0, 300, labels_only)  # no codes: the labels alone
    assert torch.equal(labels_only, x.argmax(dim=1))


def test_softmax_rows_with_one_cluster():
    """K = 1: every label 0 and every code exactly 1, over several blocks of rows (2,048 rows each) that the range
    cuts, codes or not."""
    s = torch.randn(2, 5000, 1, generator=torch.Generator().manual_seed(1)) * 3
    b = torch.randn(2, 1)
    for codes in (torch.full((2, 5000, 1), float("nan")), None):
        labels = torch.full((2, 5000), -1, dtype=torch.int64)
        cpu_kernels.softmax_rows(s, 20.0, b, 7, 4990, labels, codes)
        assert (labels[:, 7:4990] == 0).all() and (labels[:, :7] == -1).all() and (labels[:, 4990:] == -1).all()
        if codes is not None:
            assert (codes[:, 7:4990] == 1.0).all() and codes[:, :7].isnan().all() and codes[:, 4990:].isnan().all()


def test_softmax_rows_takes_every_head_in_one_call():
    """(H, N, K) scores, (H, K) potentials: one compiled call for all heads (the operator's read-out of many small
    heads paid a call per head, 20x torch's batched ops at 2,000 x 10 x 7), each head as on its own."""
    s = torch.randn(3, 50, 7, generator=torch.Generator().manual_seed(3)).transpose(1, 2).contiguous().transpose(1, 2)
    b = torch.randn(3, 7)
    b[1, 4] = -math.inf
    labels = torch.full((3, 50), -1, dtype=torch.int64)
    codes = torch.full((3, 50, 7), float("nan"))
    cpu_kernels.softmax_rows(s, 5.0, b, 2, 48, labels, codes)
    for h in range(3):
        want_labels = torch.full((50,), -1, dtype=torch.int64)
        want_codes = torch.full((50, 7), float("nan"))
        cpu_kernels.softmax_rows(s[h], 5.0, b[h], 2, 48, want_labels, want_codes)
        assert torch.equal(labels[h], want_labels), h
        assert torch.equal(codes[h].nan_to_num(-1.0), want_codes.nan_to_num(-1.0)), h
    labels_only = torch.full((3, 50), -1, dtype=torch.int64)
    cpu_kernels.softmax_rows(s, 5.0, b, 0, 50, labels_only)
    assert torch.equal(labels_only, (s.double() * 5 + b.double()[:, None]).argmax(dim=2))


def _distinct_heads(h, n, k, seed, dtype=torch.float32):
    """(H, N, K) laid out K-major (not C-contiguous: a strided read must find its head and row), heads unlike."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(h, k, n, generator=g, dtype=dtype).transpose(1, 2)
    return x * torch.arange(1, h + 1, dtype=dtype)[:, None, None]  # a head read in place of another shows


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fused_matvec_rows_takes_every_head_in_one_call(dtype):
    """(H, N, K) kernel, (H, K) ``v``, (H, N) weights: each head exactly (bitwise) as on its own, in one call (a call
    per head was ~20 us of fixed cost per head and pass)."""
    g = _distinct_heads(3, 301, 11, seed=4, dtype=dtype).abs().contiguous()  # the operator's kernel: C-contiguous
    g[1, :, 6] = 0.0  # a cluster the head's kernel no longer holds
    v = _distinct_heads(3, 2, 11, seed=5, dtype=dtype)[:, 0].abs()  # (H, K), strided
    v[2, 3] = 0.0
    w = _distinct_heads(3, 301, 1, seed=6, dtype=dtype)[:, :, 0].abs()  # (H, N), strided
    shared = torch.rand(301, dtype=dtype).expand(3, -1)  # one row for all heads, stride 0 (the loop's weights)
    for vec in (v, None):
        for weights in (w, shared):
            got = cpu_kernels.fused_matvec_rows(g, vec, weights, 7, 297)
            assert got.shape == (3, 11) and got.dtype == torch.float64
            for h in range(3):
                alone = cpu_kernels.fused_matvec_rows(g[h], None if vec is None else vec[h], weights[h].contiguous(),
                                                      7, 297)  # fmt: skip
                assert torch.equal(got[h], alone), (h, vec is None, weights is shared)
                g64, w64 = g[h, 7:297].double(), weights[h, 7:297].double()
                want = g64.T @ (w64 if vec is None else w64 / (g64 @ vec[h].double()))
                assert_close(got[h], want, atol=0, rtol=1e-6 if dtype == torch.float32 else 1e-13, what=f"head {h}")


def test_exp_kernel_rows_takes_every_head_in_one_call():
    s = _distinct_heads(3, 60, 9, seed=7)
    s[2, 30, 4] = -math.inf
    b0 = _distinct_heads(3, 2, 9, seed=8)[:, 0]  # (H, K), strided
    kernel, shift = torch.full((3, 60, 9), float("nan")), torch.full((3, 60), float("nan"))
    cpu_kernels.exp_kernel_rows(s, 4.0, b0, 3, 57, kernel, shift)
    assert torch.isnan(kernel[:, :3]).all() and torch.isnan(shift[:, 57:]).all()
    for h in range(3):
        want, want_shift = torch.full((60, 9), float("nan")), torch.full((60,), float("nan"))
        cpu_kernels.exp_kernel_rows(s[h], 4.0, b0[h], 3, 57, want, want_shift)
        assert torch.equal(kernel[h].nan_to_num(-1.0), want.nan_to_num(-1.0)), h
        assert torch.equal(shift[h].nan_to_num(-1.0), want_shift.nan_to_num(-1.0)), h
    assert kernel[2, 30, 4] == 0.0
    assert_close(shift[:, 3:57], (s.double() * 4 + b0.double()[:, None]).amax(dim=2)[:, 3:57], atol=0, rtol=1e-6,
                 what="row maxima")  # fmt: skip


def test_argmax_rows_takes_every_head_in_one_call():
    g = _distinct_heads(4, 80, 13, seed=9).abs()
    v = _distinct_heads(4, 2, 13, seed=10)[:, 0].abs()
    v[1, g[1].argmax(dim=1)[5]] = 0.0  # an unreachable cluster never wins
    labels = torch.full((4, 80), -1, dtype=torch.int64)
    cpu_kernels.argmax_rows(g, v, 2, 78, labels)
    assert (labels[:, :2] == -1).all() and (labels[:, 78:] == -1).all()
    assert torch.equal(labels[:, 2:78], (g * v[:, None]).argmax(dim=2)[:, 2:78])
    for h in range(4):
        alone = torch.full((80,), -1, dtype=torch.int64)
        cpu_kernels.argmax_rows(g[h], v[h], 2, 78, alone)
        assert torch.equal(labels[h], alone), h


@pytest.fixture
def without_compiled_loops(monkeypatch):
    def solve(*args, **kwargs):
        with monkeypatch.context() as patch:
            patch.setattr(cpu_kernels, "available", lambda: False)
            return sinkhorn_assign(*args, **kwargs)

    return solve


@pytest.mark.parametrize(
    "scores",
    [
        random_problem(700, 13, seed=1),
        cosine_scores(900, 30, seed=2),
        torch.stack([random_problem(400, 9, seed=s) for s in (3, 4, 5)]),  # batched heads
    ],
    ids=["random", "cosine", "three-heads"],
)
def test_compiled_loops_agree_with_the_torch_fallback(scores, without_compiled_loops):
    for eps in (0.1, 0.02):
        fast = sinkhorn_assign(scores, eps, tol=1e-6, max_iter=5000, acceleration="none")
        slow = without_compiled_loops(scores, eps, tol=1e-6, max_iter=5000, acceleration="none")
        assert fast.converged and slow.converged
        assert torch.equal(fast.labels, slow.labels)
        assert_close(fast.cluster_potentials, slow.cluster_potentials, atol=1e-4, what="potentials")
        assert_close(fast.codes, slow.codes, atol=1e-5, what="codes")


def test_compiled_loops_respect_masks(without_compiled_loops):
    s = random_problem(400, 10, seed=6)
    s[torch.rand(400, 10, generator=torch.Generator().manual_seed(7)) < 0.3] = -math.inf
    s[:, 0] = 0.5  # every sample keeps an allowed cluster
    fast = sinkhorn_assign(s, 0.05, tol=1e-6, max_iter=5000)
    slow = without_compiled_loops(s, 0.05, tol=1e-6, max_iter=5000)
    assert torch.equal(fast.labels, slow.labels)
    assert (fast.plan[torch.isinf(s)] == 0).all()
    assert not bool(torch.isinf(s)[torch.arange(400), fast.labels].any())  # no label on a forbidden pair


def test_zero_weight_cluster_holding_every_rows_maximum(without_compiled_loops):
    """A zero-weight cluster holding the largest kernel entry of every row: after the cold start its potential is
    -inf, and the kernel built around the cold start must be rebuilt without it, or ``G v`` is 0 on every row."""
    s = random_problem(200, 6, seed=8)
    s[:, 0] = 1.0  # the same for every sample: after the column shift, 0 nats in every row, while the weighted
    # clusters sit (at eps = 0.005, 200 nats per unit of score) more than 87 nats below their best sample in most rows
    weights = torch.tensor([0.0, 0.2, 0.2, 0.2, 0.2, 0.2])
    got = sinkhorn_assign(s, 0.005, cluster_weights=weights, tol=1e-5, max_iter=20_000)
    want = sinkhorn_assign(s.double(), 0.005, cluster_weights=weights, tol=1e-5, max_iter=20_000, backend="reference")
    assert got.converged and not (got.labels == 0).any()
    assert torch.equal(got.labels, want.labels)
    assert_close(got.codes, want.codes, atol=2e-3, what="codes, zero-weight cluster")  # eps 0.005: touchy codes


def test_scores_that_require_grad():
    s = random_problem(300, 7, seed=9).requires_grad_()
    with torch.no_grad():
        res = sinkhorn_assign(s, 0.05)
    assert res.converged and torch.bincount(res.labels, minlength=7).min() > 30


def _bits(t):
    return t.contiguous().view(torch.int32)


@pytest.mark.parametrize("n_clusters", [1, 2, 15, 16, 17, 63, 64, 65, 130])
@pytest.mark.parametrize("n_heads", [1, 3])
def test_score_extremes_rows_are_torchs_maxima_bitwise(n_clusters, n_heads):
    n = 300
    s = torch.randn(n_heads, n, n_clusters, generator=torch.Generator().manual_seed(n_clusters))
    s[0, 20] = -math.inf  # a masked row
    s[-1, 21, 0] = math.inf
    s[0, 22, -1] = -math.inf  # one forbidden pair
    s[-1, 23] = -torch.rand(n_clusters) - 1
    s[-1, 23, n_clusters // 2] = -0.0  # a row whose maximum is -0 (no +0 beside it)
    s[0, 24] = -torch.rand(n_clusters) - 1
    s[0, 24, -1] = 0.0  # and one whose maximum is +0
    s[:, 25] = torch.randn(n_clusters) * 1e-42  # subnormals of both signs
    lo, hi = 10, 290
    row_max = torch.full((n_heads, n), math.nan)
    keys = np.full((n_heads, n_clusters), cpu_kernels.NO_KEY, dtype=np.int32)
    lowest = cpu_kernels.score_extremes_rows(s, lo, hi, row_max, keys)
    inside = s[:, lo:hi]
    assert torch.isnan(row_max[:, :lo]).all() and torch.isnan(row_max[:, hi:]).all()  # other rows untouched
    assert torch.equal(_bits(row_max[:, lo:hi]), _bits(inside.amax(dim=2)))
    assert torch.equal(_bits(cpu_kernels.float_of_keys(keys)), _bits(inside.amax(dim=1)))
    assert cpu_kernels.float_of_keys(np.array([lowest]))[0] == inside.amin()
    s[0, 30, 0] = -math.inf  # outside the range: nothing changes
    again = np.full_like(keys, cpu_kernels.NO_KEY)
    assert cpu_kernels.score_extremes_rows(s, lo, hi, row_max, again) == lowest
    assert np.array_equal(again, keys)


def test_score_extremes_rows_combine_ranges_into_the_whole():
    s = torch.randn(2, 1000, 40)
    whole = np.full((2, 40), cpu_kernels.NO_KEY, dtype=np.int32)
    parts = [np.full_like(whole, cpu_kernels.NO_KEY) for _ in range(3)]
    rows_whole, rows_parts = torch.empty(2, 1000), torch.empty(2, 1000)
    low = cpu_kernels.score_extremes_rows(s, 0, 1000, rows_whole, whole)
    lows = [cpu_kernels.score_extremes_rows(s, lo, hi, rows_parts, part)
            for (lo, hi), part in zip([(0, 333), (333, 700), (700, 1000)], parts, strict=True)]  # fmt: skip
    assert min(lows) == low and np.array_equal(np.maximum.reduce(parts), whole)
    assert torch.equal(_bits(rows_parts), _bits(rows_whole))


@pytest.mark.parametrize("nan", [math.nan, -math.nan], ids=["+NaN", "-NaN"])
def test_score_maxima_leaves_nan_to_torch(nan, monkeypatch):
    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend, "MAXIMA_MIN_SCORES", 1 << 15)
    score_maxima = torch_backend.score_maxima

    s = torch.randn(1, 10000, 20)
    assert score_maxima(s) is not None
    s[0, 1234, 7] = nan
    assert math.copysign(1, float(s[0, 1234, 7])) == math.copysign(1, nan)
    assert score_maxima(s) is None


@pytest.mark.parametrize("threaded", [False, True], ids=["one range", "ranges"])
@pytest.mark.parametrize("shape", [(1, 9000, 16), (2, 2000, 33), (1, 200, 1000), (3, 4000, 20)])
def test_score_maxima_is_torchs_bitwise(shape, threaded, monkeypatch):
    from otlabel.backends import torch_backend
    from otlabel.sources import column_max

    monkeypatch.setattr(torch_backend, "MAXIMA_MIN_SCORES", 1 << 15)  # small enough to test quickly
    monkeypatch.setattr(torch_backend, "MAXIMA_SERIAL_SCORES", 0 if threaded else 1 << 40)
    monkeypatch.setattr(torch_backend, "solve_threads", lambda: 3)  # three ranges, whatever the machine
    score_maxima = torch_backend.score_maxima
    s = torch.randn(shape, generator=torch.Generator().manual_seed(shape[2]))
    s[0, 5] = -math.inf
    s[-1, 6, 1] = math.inf
    s[:, :, 3] = -s[:, :, 3].abs()
    s[:, 0, 3] = 0.0  # a column whose maximum is +0: no -0 anywhere yet
    for zeros in ("+0 only", "-0 too"):
        if zeros == "-0 too":  # +0 and -0 in one row and one column: torch's zero, whichever it is
            s[:, -1, 3] = -0.0
            s[-1, 7] = -torch.rand(shape[2])
            s[-1, 7, 0], s[-1, 7, -1] = -0.0, 0.0
        row_max, col_max, lowest = score_maxima(s)
        assert torch.equal(_bits(row_max), _bits(s.amax(dim=2))), (zeros, threaded)
        assert torch.equal(_bits(col_max), _bits(column_max(s))), (zeros, threaded)
        assert lowest == s.amin() and lowest.shape == () and col_max.dtype == torch.float32


def test_score_maxima_applies_only_where_it_is_faster(monkeypatch):
    from otlabel.backends import torch_backend
    from otlabel.backends.torch_backend import MAXIMA_MIN_K, score_maxima

    monkeypatch.setattr(torch_backend, "MAXIMA_MIN_SCORES", 1 << 15)
    s = torch.randn(1, 5000, 40)
    assert score_maxima(s) is not None
    assert score_maxima(s.double()) is None and score_maxima(s.half()) is None
    assert score_maxima(s.transpose(1, 2).contiguous().transpose(1, 2)) is None  # not contiguous
    assert score_maxima(torch.randn(1, 50000, MAXIMA_MIN_K - 1)) is None
    assert score_maxima(torch.randn(1, 100, 40)) is None  # too small to gain


@pytest.mark.parametrize("last_range", ["-inf", "-NaN", "+NaN"])
def test_score_maxima_reads_the_smallest_score_of_every_range(last_range, monkeypatch):
    """Only the last of three ranges holds the -inf (a masked pair: validation's Hall check hangs on it) or the NaN:
    the smallest score and the NaN test combine every range's, not the first's (the other tests put their -inf in the
    first range)."""
    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend, "MAXIMA_MIN_SCORES", 1 << 15)
    monkeypatch.setattr(torch_backend, "MAXIMA_SERIAL_SCORES", 0)
    monkeypatch.setattr(torch_backend, "solve_threads", lambda: 3)
    s = torch.randn(2, 3000, 20, generator=torch.Generator().manual_seed(5))
    s[-1, -1, -1] = {"-inf": -math.inf, "-NaN": -math.nan, "+NaN": math.nan}[last_range]
    maxima = torch_backend.score_maxima(s)
    if last_range == "-inf":
        assert maxima is not None and maxima[2] == -math.inf
    else:
        assert maxima is None  # torch's reductions: validation names the NaN


@pytest.mark.parametrize("n_clusters", [7, cpu_kernels.SOFTMAX_VECTOR_MIN_K, cpu_kernels.EXP_BLOCK_MAX_K])
@pytest.mark.parametrize("n_heads", [None, 3])
def test_strided_kernel_and_codes_are_filled_as_contiguous_ones(n_clusters, n_heads):
    """A strided ``kernel`` or ``codes`` (a column slice, a transpose) gets bitwise the values of a C-contiguous one:
    the short rows' block exponential reads C-contiguous rows as one flat array, which Numba refused to compile for a
    strided array (a TypingError, where the row-at-a-time loop before it took any layout)."""
    k, heads = n_clusters, () if n_heads is None else (n_heads,)
    s = torch.randn(*heads, 300, k, generator=torch.Generator().manual_seed(k)) * 3
    s[..., 13, 0] = -math.inf
    b = torch.randn(*heads, k)
    want_kernel, want_shift = torch.full((*heads, 300, k), float("nan")), torch.full((*heads, 300), float("nan"))
    cpu_kernels.exp_kernel_rows(s, 20.0, b, 10, 290, want_kernel, want_shift)
    want_labels, want_codes = torch.full((*heads, 300), -1), torch.full((*heads, 300, k), float("nan"))
    cpu_kernels.softmax_rows(s, 20.0, b, 10, 290, want_labels, want_codes)
    strided = {"column slice": lambda: torch.full((*heads, 300, k + 3), float("nan"))[..., :k],
               "transposed": lambda: torch.full((*heads, k, 300), float("nan")).transpose(-1, -2)}  # fmt: skip
    for layout, empty in strided.items():
        kernel, shift = empty(), torch.full((*heads, 300), float("nan"))
        cpu_kernels.exp_kernel_rows(s, 20.0, b, 10, 290, kernel, shift)
        assert torch.equal(_bits(kernel), _bits(want_kernel)) and torch.equal(_bits(shift), _bits(want_shift)), layout
        labels, codes = torch.full((*heads, 300), -1), empty()
        cpu_kernels.softmax_rows(s, 20.0, b, 10, 290, labels, codes)
        assert torch.equal(labels, want_labels) and torch.equal(_bits(codes), _bits(want_codes)), layout
