"""``sinkhorn_assign(..., cuda_graph=True)``: a fixed-iteration solve captured once per shape and replayed.

Without a GPU the capture is replaced by an eager recorder that runs the same body and copies its outputs into the
first run's tensors, as a replay rewrites a graph's buffers: everything but CUDA graph capture itself is checked
here (the buffers a call fills, the copies it returns, the cache, the refusals). The ``gpu`` test captures for real.
"""

import weakref

import pytest
import torch
from helpers import random_problem

from otlabel import graphs, sinkhorn_assign

pytest.importorskip("triton")  # the captured solve is the triton backend's (an optional extra)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 0.1


def record_eagerly(body, device):
    """A stand-in for CUDA graph capture: replaying re-runs ``body`` into the first run's output tensors.

    Like a CUDA graph it keeps no strong reference to ``body`` (a bound method): were the cache entry not to own
    the body and the buffers it writes, the replay would find it gone (on a GPU: write into freed memory)."""
    outputs = body()
    weak_body = weakref.WeakMethod(body)

    def replay():
        alive = weak_body()
        assert alive is not None, "the captured body (operator, buffers) was freed while its capture is cached"
        for kept, new in zip(outputs, alive(), strict=True):
            if kept is not None:
                kept.copy_(new)

    return replay, outputs, None


@pytest.fixture
def recorder(monkeypatch):
    """The real CUDA graph on a GPU, the eager stand-in elsewhere; an empty cache before and after."""
    graphs.clear_cache()
    if DEVICE == "cpu":
        monkeypatch.setattr(graphs, "recorder_for", lambda device: record_eagerly)
    yield
    graphs.clear_cache()


def scores(seed, n=37, k=11, h=None):
    s = random_problem(n, k, seed=seed) if h is None else random_problem(n, k, h=h, seed=seed)
    return s.to(DEVICE)


def assert_same(captured, eager):
    for name in ("labels", "cluster_potentials", "codes"):
        a, b = getattr(captured, name), getattr(eager, name)
        assert torch.equal(a, b), f"{name} differ: max {(a.double() - b.double()).abs().max()}"
    assert captured.errors == eager.errors and captured.n_iter == eager.n_iter and not captured.converged


def test_a_capture_made_in_inference_mode_serves_calls_outside_it(recorder):
    """The first call of a shape under torch.inference_mode() (an evaluation loop) captured into inference tensors,
    which every later call refills: outside inference mode (the training step), each raised torch's 'Inplace update
    to inference tensor outside InferenceMode'."""
    call = dict(max_iter=3, tol=None, backend="triton")
    for inference in (True, False, True):
        s = scores(4 + inference)
        with torch.inference_mode(inference):
            res = sinkhorn_assign(s, EPS, cuda_graph=True, **call)
        assert_same(res, sinkhorn_assign(s, EPS, **call))
    assert len(graphs._CACHE) == 1


@pytest.mark.parametrize("kwargs", [
    dict(),
    dict(over_relaxation=1.5),
    dict(cluster_weights=torch.tensor([0.0] + [0.1] * 10, dtype=torch.float64)),  # a zero weight: masked steps
], ids=["plain", "over-relaxed", "zero-weight"])  # fmt: skip
def test_replays_equal_the_eager_solve_call_after_call(recorder, kwargs):
    """Each call gets its own scores' answer, bitwise the uncaptured one; a result is not changed by later calls."""
    call = dict(max_iter=4, tol=None, backend="triton", **kwargs)
    first = None
    for seed in (1, 2, 3):
        s = scores(seed)
        weights = torch.rand(37, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        weights = weights / weights.sum()
        res = sinkhorn_assign(s, EPS, sample_weights=weights, cuda_graph=True, **call)
        assert_same(res, sinkhorn_assign(s, EPS, sample_weights=weights, **call))
        if first is None:
            first, first_labels, first_codes = res, res.labels.clone(), res.codes.clone()
    assert torch.equal(first.labels, first_labels) and torch.equal(first.codes, first_codes)
    assert len(graphs._CACHE) == 1  # one shape, one capture


def test_every_option_in_the_key_and_every_buffer_refreshed(recorder, monkeypatch):
    """One shape, calls that differ in epsilon, steps, cluster weights (with and without zero weights) and
    dtype: each equals its eager solve, and an earlier result keeps its values."""
    s = scores(8)
    uniform = torch.full((11,), 1 / 11, dtype=torch.float64)
    skewed = torch.linspace(1, 3, 11, dtype=torch.float64)
    closed = torch.cat([torch.zeros(2, dtype=torch.float64), torch.ones(9, dtype=torch.float64)])
    calls = [
        dict(epsilon=EPS),
        dict(epsilon=0.3),
        dict(epsilon=EPS, over_relaxation=1.4),
        dict(epsilon=EPS, cluster_weights=skewed / skewed.sum()),
        dict(epsilon=EPS, cluster_weights=closed / closed.sum()),
        dict(epsilon=EPS, cluster_weights=uniform),
        dict(epsilon=EPS, dtype=torch.bfloat16),
    ]
    monkeypatch.setattr(graphs, "MAX_CACHED", 8)
    results = []
    for options in calls:
        options = dict(options)
        x = s.to(options.pop("dtype", s.dtype))
        call = dict(max_iter=3, tol=None, backend="triton", **options)
        res = sinkhorn_assign(x, cuda_graph=True, **call)
        assert_same(res, sinkhorn_assign(x, **call))
        results.append((res, res.cluster_potentials.clone(), res.labels.clone()))
    for res, potentials, labels in results:
        assert torch.equal(res.cluster_potentials, potentials) and torch.equal(res.labels, labels)
    # eps 0.1, eps 0.3, omega 1.4, zero-weight masking, bf16 (weights without a zero share the first capture)
    assert len(graphs._CACHE) == 5


@pytest.mark.parametrize("layout", ["transposed view", "every other column", "offset by one row", "gapped transposed"])
def test_any_layout_gives_the_eager_bits(recorder, layout):
    """The captured buffer copies the caller's strides and alignment, so the kernels launched are the same ones."""
    base = scores(9, n=40, k=24)
    x = {
        "transposed view": base.T.contiguous().T,
        "every other column": scores(9, n=40, k=48)[:, ::2],
        "offset by one row": scores(9, n=41, k=11)[1:],
        "gapped transposed": scores(9, n=1000, k=256)[:, ::2].T,  # (128, 1000), strides (2, 256)
    }[layout]
    call = dict(max_iter=3, tol=None, backend="triton")
    assert_same(sinkhorn_assign(x, EPS, cuda_graph=True, **call), sinkhorn_assign(x, EPS, **call))


def test_one_shape_in_two_layouts_gets_two_captures(recorder):
    x = scores(12, n=40, k=40)
    call = dict(max_iter=3, tol=None, backend="triton")
    for view in (x, x.T.contiguous().T):  # the same (N, K), stored (N, K) then (K, N)
        assert_same(sinkhorn_assign(view, EPS, cuda_graph=True, **call), sinkhorn_assign(view, EPS, **call))
    assert len(graphs._CACHE) == 2


def test_batched_heads_and_the_lazy_objective(recorder):
    s = scores(4, h=3)
    call = dict(max_iter=3, tol=None, backend="triton")
    res, eager = sinkhorn_assign(s, EPS, cuda_graph=True, **call), sinkhorn_assign(s, EPS, **call)
    assert res.labels.shape == (3, 37) and res.codes.shape == (3, 37, 11)
    assert_same(res, eager)
    assert torch.equal(res.objective, eager.objective)  # built on first use, over the caller's scores


def test_the_cache_keeps_the_most_recent_shapes(recorder, monkeypatch):
    monkeypatch.setattr(graphs, "MAX_CACHED", 2)
    call = dict(max_iter=2, tol=None, backend="triton", cuda_graph=True)
    for n in (20, 21, 22, 21):
        sinkhorn_assign(scores(n, n=n), EPS, **call)
    assert [key[0][1] for key in graphs._CACHE] == [22, 21]  # N of each cached (H, N, K), least recent first
    graphs.clear_cache()
    assert not graphs._CACHE


@pytest.mark.parametrize("kwargs, words", [
    (dict(tol=1e-3), "fixed number of iterations"),
    (dict(tol=None, callback=lambda it, err: None), "callback"),
    (dict(tol=None, epsilon_scaling=0.5), "epsilon_scaling"),
    (dict(tol=None, acceleration="anderson"), "Anderson"),
    (dict(tol=None, acceleration="over-relaxation"), "adapts omega"),
    (dict(tol=None, backend="torch"), "triton backend"),
    (dict(tol=None, backend="reference"), "triton backend \\(backend='reference' resolves to 'reference'"),
])  # fmt: skip
def test_what_a_capture_cannot_do_is_refused(recorder, kwargs, words):
    with pytest.raises(ValueError, match=words):
        sinkhorn_assign(scores(6), EPS, max_iter=3, cuda_graph=True, **{"backend": "triton", **kwargs})


def test_a_warm_start_and_features_mode_are_refused(recorder):
    s = scores(7)
    res = sinkhorn_assign(s, EPS, max_iter=3, tol=None, backend="triton")
    with pytest.raises(ValueError, match="init= is not captured"):
        sinkhorn_assign(s, EPS, max_iter=3, tol=None, backend="triton", init=res, cuda_graph=True)
    with pytest.raises(ValueError, match="features mode is not captured"):
        sinkhorn_assign(features=torch.randn(9, 4), prototypes=torch.randn(3, 4), cuda_graph=True)


def test_a_capture_makes_its_own_constants(recorder, monkeypatch):
    """A graph reads its tensors by address at every replay. The captured solve took the clusters' count (the
    centring divides by it) from otlabel.cached, which frees an entry after MAX_ENTRIES others: a replay then read
    freed memory (a count of 0: NaN potentials). The counts made while recording are the capture's own."""
    from otlabel import cached, solver

    made, of = [], solver.ClusterMarginal.of.__func__

    def spy(cls, *args, **kwargs):
        marginal = of(cls, *args, **kwargs)
        made.append(marginal.count)
        return marginal

    def capture(*args, **kwargs):  # the counts made while recording (the stand-in's replays run the body again)
        entry = original_capture(*args, **kwargs)
        made.append(None)
        return entry

    original_capture = graphs.capture
    monkeypatch.setattr(solver.ClusterMarginal, "of", classmethod(spy))
    monkeypatch.setattr(graphs, "capture", capture)
    s = scores(9)
    sinkhorn_assign(s, EPS, cuda_graph=True, max_iter=3, tol=None, backend="triton")
    recorded, kept = made[: made.index(None)], cached.count(s.shape[-1], s.device)
    assert recorded and not any(count is kept for count in recorded), len(recorded)


def test_cpu_scores_are_refused_without_the_stand_in():
    if DEVICE == "cuda":
        pytest.skip("the refusal is for CPU scores")
    with pytest.raises(ValueError, match="needs CUDA scores"):
        sinkhorn_assign(scores(10), EPS, max_iter=3, tol=None, cuda_graph=True)


def test_float64_scores_are_refused_with_the_reason(recorder):
    with pytest.raises(ValueError, match="got float64"):
        sinkhorn_assign(scores(11).double(), EPS, max_iter=3, tol=None, cuda_graph=True)


@pytest.mark.gpu
def test_real_cuda_graph_replays_bitwise(recorder):
    """The capture itself, on a GPU: a SwAV-sized batch, three calls, each equal to the eager solve."""
    call = dict(max_iter=3, tol=None, backend="triton")
    for seed in (1, 2, 3):
        s = torch.randn(4096, 300, generator=torch.Generator().manual_seed(seed)).cuda()
        assert_same(sinkhorn_assign(s, 0.05, cuda_graph=True, **call), sinkhorn_assign(s, 0.05, **call))


def bad(kind):
    """Scores the input checks reject, and the cluster weights that go with them."""
    s = scores(13).clone()
    weights = None
    if kind == "NaN":
        s[3, 4] = float("nan")
    elif kind == "+inf":
        s[5, 1] = float("inf")
    elif kind == "masked sample":
        s[7, :] = float("-inf")
    elif kind == "unreachable cluster":
        s[:, 2] = float("-inf")
    elif kind == "span":
        s[0, 0] = 1e6
    elif kind == "only zero-weight clusters":
        s[4, 1:] = float("-inf")
        weights = torch.tensor([0.0] + [0.1] * 10, dtype=torch.float64)
    elif kind == "batched bf16 NaN":
        s = scores(13, h=2).to(torch.bfloat16)
        s[1, 6, 3] = float("nan")
    elif kind == "infeasible mask":  # cluster 0 needs 1/11 of the mass, only sample 0 (1/37) may go there
        s[1:, 0] = float("-inf")
    elif kind == "infeasible mask, a zero weight":
        s[1:, 1] = float("-inf")
        weights = torch.tensor([0.0] + [0.1] * 10, dtype=torch.float64)
    return s, weights


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the interpreter computing on NaN and inf, as a GPU would
@pytest.mark.parametrize(
    "kind",
    ["NaN", "+inf", "masked sample", "unreachable cluster", "span", "only zero-weight clusters", "batched bf16 NaN",
     "infeasible mask", "infeasible mask, a zero weight"],
)  # fmt: skip
def test_bad_scores_raise_what_the_uncaptured_call_raises(recorder, kind):
    """The capture checks the score values inside the graph and judges them with its results: the same error, and
    a good call after a bad one on the same capture still gets its own answer. A mask that leaves no balanced plan
    (every score finite or -inf, each sample and cluster with somewhere to go) returned a result: the mask check
    was skipped with cuda_graph=True, where the uncaptured call raises before any iteration."""
    s, weights = bad(kind)
    call = dict(max_iter=3, tol=None, backend="triton", cluster_weights=weights)
    with pytest.raises(ValueError) as eager:
        sinkhorn_assign(s, EPS, **call)
    with pytest.raises(ValueError) as captured:
        sinkhorn_assign(s, EPS, cuda_graph=True, **call)
    assert str(captured.value) == str(eager.value)
    assert not graphs._CACHE or weights is not None  # a capture recorded for bad scores is dropped
    good = scores(14)
    assert_same(sinkhorn_assign(good, EPS, cuda_graph=True, **call), sinkhorn_assign(good, EPS, **call))


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_bad_scores_the_uncaptured_checks_pass_are_an_internal_error(recorder, monkeypatch):
    """If the capture's verdict on the scores and the uncaptured checks ever disagreed, the call raises an internal
    error (and keeps no capture) rather than returning results computed from the bad scores."""
    s, _ = bad("NaN")
    monkeypatch.setattr(graphs, "check_score_values", lambda *args, **kwargs: None)  # a check that finds nothing
    with pytest.raises(RuntimeError, match="internal error: the captured input checks and the uncaptured ones"):
        sinkhorn_assign(s, EPS, max_iter=3, tol=None, backend="triton", cuda_graph=True)
    assert not graphs._CACHE


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
def test_options_are_refused_before_the_scores_are_read(recorder):
    """The order of errors with cuda_graph=True: what cannot be captured first, then the score values."""
    s, _ = bad("NaN")
    with pytest.raises(ValueError, match="fixed number of iterations"):
        sinkhorn_assign(s, EPS, max_iter=3, tol=1e-3, backend="triton", cuda_graph=True)
    with pytest.raises(ValueError, match="scores contain NaN"):
        sinkhorn_assign(s, EPS, max_iter=3, tol=None, backend="triton", cuda_graph=True)


def test_capture_buffers_keep_the_layout_and_alignment_in_the_least_memory():
    """A capture's score buffer has the caller's shape, strides (gaps included) and 16-byte alignment, in storage just
    large enough; overlapping (expanded) scores get a contiguous buffer. The solve tests compare results only, which
    any buffer layout gives on the CPU stand-in: the layout and its size were unchecked."""
    from otlabel.graphs import same_layout_empty

    base = torch.empty(10 * 8 + 3)
    for x, elements in ((base[:80].view(10, 8)[:, :5], 77),  # rows with a gap: 9 x 8 + 4 + 1
                        (base[1:81].view(10, 8).T, 80),  # transposed, 4 bytes past a 16-byte boundary
                        (base[3:83].view(2, 5, 8)[:, :, 2:], 40 + 4 * 8 + 5 + 1),  # heads, gaps, 20 bytes in
                        (base[:1].view(1, 1), 1)):  # fmt: skip
        y = same_layout_empty(x)
        lead = (x.data_ptr() % 16) // 4
        assert y.shape == x.shape and y.stride() == x.stride() and y.data_ptr() % 16 == x.data_ptr() % 16
        assert y.untyped_storage().nbytes() == 4 * (lead + elements), (x.shape, x.stride())
    expanded = torch.randn(1, 6).expand(2, 6)
    y = same_layout_empty(expanded)
    assert y.shape == (2, 6) and y.is_contiguous()
    column = torch.randn(6, 1).expand(6, 1).as_strided((6, 1), (1, 0))  # stride 0 on a size-1 dimension: no overlap
    assert same_layout_empty(column).stride() == (1, 0)
