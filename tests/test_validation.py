"""Bad input gets a specific exception whose message says what is wrong; extreme but valid input works."""

import math
import re
import warnings

import numpy as np
import pytest
import torch
from helpers import offset_scores, random_problem

from otlabel import (
    ConvergenceWarning,
    InputWarning,
    exact_assign,
    exact_plan,
    sela_sinkhorn,
    sinkhorn_assign,
    sinkhorn_assign_sharded,
    sinkhorn_assign_stream,
    swav_sinkhorn,
)
from otlabel.backends import cpu_kernels
from otlabel.problem import MAX_SCORE_SPAN_FP32, _autocast_takes_a_device_type

S = random_problem(10, 4, seed=40)
INF = float("inf")


def with_value(index, value):
    s = S.clone()
    s[index] = value
    return s


def masked(rows=slice(None), cols=slice(None)):
    s = S.clone()
    s[rows, cols] = -INF
    return s


BAD_INPUTS = [
    # (description, kwargs, exception, words the message must contain)
    ("NaN score", dict(scores=with_value((2, 1), float("nan"))), ValueError, ["NaN", "(2, 1) of the (N, K)"]),
    ("NaN score, heads", dict(scores=with_value((2, 1), float("nan"))[None]), ValueError, ["(0, 2, 1) of the (H, N"]),
    ("+inf score", dict(scores=with_value((3, 0), INF)), ValueError, ["+inf", "-inf is allowed"]),
    ("1-d scores", dict(scores=torch.randn(10)), ValueError, ["(N, K)", "(10,)"]),
    ("4-d scores", dict(scores=torch.randn(2, 2, 3, 4)), ValueError, ["(H, N, K)"]),
    ("empty N", dict(scores=torch.randn(0, 4)), ValueError, ["empty"]),
    ("empty K", dict(scores=torch.randn(5, 0)), ValueError, ["empty"]),
    ("integer scores", dict(scores=torch.ones(5, 3, dtype=torch.int64)), TypeError, ["floating-point", ".float()"]),
    # quantized: the advice was scores.float(), which raises torch's "Creation of quantized tensor requires ..."
    ("quantized scores", dict(scores="quantized"), TypeError, ["got torch.qint8. Convert with scores.dequantize()"]),
    ("a ragged list", dict(scores=[[1.0, 2.0], [3.0]]), TypeError, ["rectangular", "np.asarray"]),
    ("a list of strings", dict(scores=[["a", "b"]]), TypeError, ["list of numbers"]),
    ("a dict", dict(scores={"a": 1.0}), TypeError, ["torch.Tensor", "dict"]),
    ("eps vector", dict(epsilon=torch.tensor([0.1, 0.2])), TypeError, ["epsilon"]),
    ("eps = 0", dict(epsilon=0.0), ValueError, ["epsilon", "> 0"]),
    ("eps < 0", dict(epsilon=-0.1), ValueError, ["epsilon must be a finite number > 0", "got -0.1"]),
    ("eps NaN", dict(epsilon=float("nan")), ValueError, ["epsilon", "finite"]),
    ("eps inf", dict(epsilon=INF), ValueError, ["epsilon", "finite"]),
    ("eps string", dict(epsilon="0.1"), TypeError, ["epsilon"]),
    ("eps subnormal", dict(epsilon=1e-310), ValueError, ["too small", "1/epsilon overflows"]),
    # Python's "OverflowError: int too large to convert to float", naming no argument
    ("eps an int beyond float", dict(epsilon=10**400), ValueError, ["epsilon must be a finite number > 0"]),
    ("tol an int beyond float", dict(tol=10**400), ValueError, ["tol must be a positive number"]),
    # torch's "Tensor.item() cannot be called on meta tensors"
    ("eps a meta tensor", dict(epsilon=torch.tensor(0.1, device="meta")), TypeError, ["epsilon is a meta tensor"]),
    # torch's "Internal error: NestedTensorImpl doesn't support sizes"
    (
        "eps a nested tensor",
        dict(epsilon=torch.nested.nested_tensor([S[0], S[1, :2]], layout=torch.jagged)),
        TypeError,
        ["epsilon must be one positive number", "got a nested tensor"],
    ),
    # NumPy's "The truth value of an array with more than one element is ambiguous", naming no argument
    ("backend an array", dict(backend=np.array([1, 2])), ValueError, ["backend must be one of"]),
    ("acceleration an array", dict(acceleration=np.array([1, 2])), ValueError, ["acceleration must be one of"]),
    ("an object array", dict(scores=np.array([[1.0, "a"]], dtype=object)), TypeError, ["hold numbers", "np.asarray"]),
    ("eps tiny for the scores", dict(epsilon=1e-17), ValueError, ["scores / epsilon", "raise epsilon"]),
    ("scores huge for eps", dict(scores=S * 1e37), ValueError, ["scores / epsilon", "float32", "amax(-1"]),
    ("cluster weights shape", dict(cluster_weights=torch.ones(5) / 5), ValueError, ["cluster_weights", "(4,)"]),
    ("sample weights shape", dict(sample_weights=torch.ones(4) / 4), ValueError, ["sample_weights", "(10,)"]),
    (
        "cluster weights per head",
        dict(scores=S[None].expand(2, -1, -1), cluster_weights=torch.ones(2, 4) / 4),
        ValueError,
        ["cluster_weights must have shape (4,)", "share one weight vector", "each head on its own"],
    ),
    # (K, N) scores: weights sized for the caller's real K (or N) meet the other axis; the error says so
    (
        "transposed, cluster weights",
        dict(scores=S.T, cluster_weights=torch.ones(4) / 4),
        ValueError,
        [
            "got (4,). 4 is the scores' number of samples N: are the scores transposed?",
            "N = 4 samples by K = 10",
            "pass scores.swapaxes(-1, -2)",
        ],
    ),
    (
        "transposed, heads, sample weights",
        dict(scores=S.T[None], sample_weights=torch.ones(10) / 10),
        ValueError,
        ["10 is the scores' number of clusters K: are the scores transposed?", "scores.swapaxes(-1, -2)"],
    ),
    ("negative weight", dict(cluster_weights=torch.tensor([0.5, 0.6, -0.2, 0.1])), ValueError, ["-0.2"]),
    ("weights not summing", dict(cluster_weights=torch.ones(4)), ValueError, ["sum to 1", "w.sum()"]),
    ("NaN weight", dict(sample_weights=torch.full((10,), float("nan"))), ValueError, ["NaN"]),
    (
        "one NaN weight",
        dict(sample_weights=torch.tensor([0.1] * 3 + [float("nan")] + [0.1] * 6)),
        ValueError,
        ["sample_weights contain NaN or inf"],
    ),
    (
        "one inf weight",
        dict(cluster_weights=torch.tensor([0.5, INF, 0.25, 0.25])),
        ValueError,
        ["cluster_weights contain NaN or inf"],
    ),
    ("sample with no cluster", dict(scores=masked(rows=4)), ValueError, ["infeasible", "sample 4"]),
    ("cluster with no sample", dict(scores=masked(cols=2)), ValueError, ["infeasible", "cluster 2"]),
    (
        "sample only in zero-weight clusters",
        dict(scores=masked(rows=1, cols=slice(1, None)), cluster_weights=torch.tensor([0.0, 0.4, 0.3, 0.3])),
        ValueError,
        ["infeasible", "sample 1", "weight 0"],
    ),
    ("max_iter 0", dict(max_iter=0), ValueError, ["max_iter"]),
    ("tol negative", dict(tol=-1.0), ValueError, ["tol"]),
    ("tol zero", dict(tol=0.0), ValueError, ["tol must be a positive number"]),
    ("over-relaxation 2", dict(over_relaxation=2.0), ValueError, ["over_relaxation"]),
    ("unknown backend", dict(backend="cuda"), ValueError, ["backend", "'torch'"]),
    ("init shape", dict(init=torch.zeros(7)), ValueError, ["init", "(4,)"]),
    ("init NaN", dict(init=torch.full((4,), float("nan"))), ValueError, ["init", "NaN"]),
    ("init -inf", dict(init=torch.tensor([0.0, -INF, 0.0, 0.0])), ValueError, ["init", "weight 0", "init=None"]),
    ("init complex", dict(init=torch.zeros(4, dtype=torch.complex64)), TypeError, ["init", "complex64"]),
    # the imaginary parts were dropped with only torch's warning
    ("complex weights", dict(cluster_weights=np.full(4, 0.25) + 0.5j), TypeError, ["real", "w.real"]),
    # the mask was dropped: its hidden scores solved as if unmasked
    (
        "masked array",
        dict(scores=np.ma.masked_array(S.numpy(), mask=S.numpy() > 1)),
        TypeError,
        ["scores is a NumPy masked array", "filled(-np.inf)"],
    ),
    # torch's page-long NotImplementedError ("Could not run 'aten::amax' with arguments from the 'SparseCPU' backend")
    ("sparse scores", dict(scores=S.to_sparse()), TypeError, ["sparse_coo tensor", "scores.to_dense()", "-inf"]),
    ("sparse weights", dict(cluster_weights=torch.full((4,), 0.25).to_sparse()), TypeError, ["cluster_weights is a"]),
    ("meta scores", dict(scores=torch.empty(10, 4, device="meta")), TypeError, ["meta tensor", "holds no values"]),
    # torch's "Internal error: NestedTensorImpl doesn't support sizes. Please file an issue."
    (
        "nested scores",
        dict(scores=torch.nested.nested_tensor([S, S[:5]], layout=torch.jagged)),
        TypeError,
        ["scores is a nested tensor", "to_padded_tensor(float('-inf'))"],
    ),
    # torch's "Multiple dispatch failed for 'torch._ops.aten.aminmax.default'", pages long
    ("MaskedTensor scores", dict(scores="masked tensor"), TypeError, ["scores is a torch MaskedTensor", "get_mask()"]),
    # torch's "Cannot copy out of meta tensor; no data!" and "expand is unsupported for Sparse tensors"
    ("meta init", dict(init=torch.zeros(4, device="meta")), TypeError, ["init is a meta tensor"]),
    ("sparse init", dict(init=torch.zeros(4).to_sparse()), TypeError, ["init is a sparse_coo tensor", "to_dense()"]),
    # was Python's "'int' object is not callable" from inside the loop
    ("callback not callable", dict(callback=3), TypeError, ["callback must be a function", "got int"]),
]


@pytest.mark.parametrize("what, kwargs, error, words", BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_specific_error(what, kwargs, error, words):
    args = dict(scores=S, epsilon=0.1) | kwargs
    if isinstance(args["scores"], str):  # made here: a MaskedTensor or a quantized tensor warns at its creation
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            if args["scores"] == "quantized":
                args["scores"] = torch.quantize_per_tensor(S, 0.1, 0, torch.qint8)
            else:
                args["scores"] = torch.masked.masked_tensor(S, S > 0)
    with pytest.raises(error) as info:
        sinkhorn_assign(args.pop("scores"), args.pop("epsilon"), **args)
    for word in words:
        assert word in str(info.value), f"{what}: message {str(info.value)!r} lacks {word!r}"


def test_features_mode_errors_name_the_features(tmp_path):
    """Found in review: an inf in a features row was reported as "+inf scores" or "every score -inf" (a mask); (D, N)
    features blamed the prototypes alone; prototypes= without features= was a TypeError about None. And the
    reference backend turned a (1, K) bias of (K, D) prototypes into a batched (1, N) result."""
    z, c = torch.rand(40, 4), torch.rand(5, 4) + 0.1
    for value, words in ((INF, "(its scores are inf)"), (-INF, "(its scores are -inf)"), (float("nan"), "NaN or inf")):
        bad = z.clone()
        bad[7, 2] = value
        with pytest.raises(ValueError, match=f"features row 7 contains .*{words}"):
            sinkhorn_assign(features=bad, prototypes=c)
    overflow = r"scores of features row 0, features @ prototypes\.T \(\+ bias\) divided by epsilon, overflow float32"
    for big in (torch.full((40, 4), 1e20), torch.tensor([1e20, -1e20]).repeat(40, 2)):  # products: inf, inf - inf
        with pytest.raises(ValueError, match=rf"{overflow} .* L2-normalise the features and the prototypes"):
            sinkhorn_assign(features=big, prototypes=c * 1e20)  # both finite: no features row to blame
    with pytest.raises(ValueError, match=r"look transposed \(\(4, 40\) is \(D, N\)\): pass features.T"):
        sinkhorn_assign(features=z.T, prototypes=c)
    with pytest.raises(ValueError, match=r"look transposed \(\(4, 5\) is \(D, K\)\): pass prototypes.T\."):
        sinkhorn_assign(features=z, prototypes=c.T)  # found in a docs audit: the shape alone, no hint
    with pytest.raises(ValueError, match=r"\(\(2, 4, 5\) is \(H, D, K\)\): pass prototypes.swapaxes\(-1, -2\)"):
        sinkhorn_assign(features=z, prototypes=torch.stack([c.T, c.T]))
    with pytest.raises(ValueError, match=r"pass features.T. Or the prototypes look transposed \(\(4, 40\) is"):
        sinkhorn_assign(features=z, prototypes=torch.randn(40, 4).T)  # N == K: either may be the transposed one
    with pytest.raises(ValueError, match=r"got shape \(5, 3\)\.$"):  # neither transposed: no hint
        sinkhorn_assign(features=z, prototypes=c[:, :3])
    for extra in (dict(), dict(bias=torch.zeros(5))):  # it said "needs features= and prototypes=", given
        with pytest.raises(ValueError, match="^prototypes= needs features=: the scores are"):
            sinkhorn_assign(prototypes=c, **extra)
    with pytest.raises(ValueError, match="^bias= needs features= and prototypes="):  # it named prototypes=
        sinkhorn_assign(bias=torch.zeros(5))
    scores = z @ c.T  # with prototypes (no features) it said "not both", of scores and features= not given
    for extra in (dict(prototypes=c), dict(prototypes=c, bias=torch.zeros(5))):
        with pytest.raises(ValueError, match=r"^prototypes= \(and bias=\) go with features=, which the scores replace"):
            sinkhorn_assign(scores, **extra)
    with pytest.raises(ValueError, match="not both"):
        sinkhorn_assign(scores, features=z, prototypes=c)
    for name in ("features", "prototypes"):  # the reference backend's dense scores blamed "scores contain NaN"
        bad = {"features": z.clone(), "prototypes": c.clone()}
        bad[name][3, 1] = float("nan")
        with pytest.raises(ValueError, match=f"^{name} contain NaN or inf; they must be finite vectors"):
            sinkhorn_assign(**bad, backend="reference")
    bias = torch.randn(1, 5)
    ref = sinkhorn_assign(features=z, prototypes=c, bias=bias, backend="reference", tol=None, max_iter=20)
    res = sinkhorn_assign(features=z, prototypes=c, bias=bias, backend="torch", tol=None, max_iter=20)
    assert ref.labels.shape == res.labels.shape == (40,) and torch.equal(ref.labels, res.labels)
    # One file as both features and prototypes (self-similarity) is two inputs, not an output over an input.
    path = tmp_path / "z.npy"
    np.save(path, z[:6].numpy())
    same = sinkhorn_assign_stream(features=str(path), prototypes=str(path), tol=None, max_iter=5)
    assert torch.equal(same.labels, sinkhorn_assign(z[:6] @ z[:6].T, tol=None, max_iter=5).labels)


def test_big_endian_arrays_are_read_as_their_values():
    """A NumPy array in non-native byte order (a file from another machine): torch cannot share it, so it is copied
    (torch's own error named no fix)."""
    native = np.random.default_rng(3).standard_normal((30, 8)).astype(np.float32)
    swapped = native.astype(native.dtype.newbyteorder())
    assert not swapped.dtype.isnative and np.array_equal(swapped, native)
    assert torch.equal(sinkhorn_assign(swapped).labels, sinkhorn_assign(native).labels)


def test_exact_solvers_validate_too():
    with pytest.raises(ValueError, match="NaN"):
        exact_plan(with_value((0, 0), float("nan")))
    with pytest.raises(ValueError, match=r"scores contain \+inf \(first at index \(3, 0\)"):  # no epsilon to judge
        exact_plan(with_value((3, 0), INF))
    with pytest.raises(ValueError, match="are the scores transposed"):
        exact_plan(S.T, cluster_weights=torch.ones(4) / 4)


def test_streamed_and_sharded_scores_get_the_transposition_hint():
    from otlabel import sinkhorn_assign_sharded, sinkhorn_assign_stream

    for solve in (sinkhorn_assign_stream, sinkhorn_assign_sharded):
        with pytest.raises(ValueError, match="are the scores transposed"):
            solve(S.T, 0.1, cluster_weights=torch.ones(4) / 4)


def test_no_transposition_hint_without_cause():
    """N < K is a legitimate problem (SwAV's small batches): no warning; and a wrong length that is not the other
    dimension gets no hint."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert sinkhorn_assign(S.T, 0.1).labels.shape == (4,)
    with pytest.raises(ValueError) as info:
        sinkhorn_assign(S, 0.1, cluster_weights=torch.ones(7) / 7)
    assert "transposed" not in str(info.value)


def test_subnormal_epsilon_is_refused_exactly_where_its_reciprocal_overflows():
    """1/eps overflows float64 below ~5.6e-309: eps = 1e-308 (subnormal, 1/eps = 1e308) solves float64 scores that do
    not differ; eps = 4e-309 is refused by the epsilon check itself, before any dtype is considered."""
    flat = torch.zeros(6, 3, dtype=torch.float64)
    with pytest.warns(InputWarning, match="same scores"):  # (rows alike: the collapse warning, rightly)
        res = sinkhorn_assign(flat, epsilon=1e-308)
    assert res.converged and torch.equal(res.codes, torch.full((6, 3), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"epsilon=4e-309 is too small: 1/epsilon overflows to inf"):
        sinkhorn_assign(flat, epsilon=4e-309)


@pytest.mark.interpreter
def test_triton_refuses_an_epsilon_its_float32_cannot_invert():
    """At eps = 1e46 the kernels' float32 1/eps was 0: features mode 'converged' with NaN codes. The torch path
    computes 1/eps in the scores' dtype and gives the (uniform) plan."""
    z, c = torch.rand(20, 16), torch.rand(5, 16)
    for kwargs in (dict(scores=z @ c.T), dict(features=z, prototypes=c)):
        with pytest.raises(ValueError, match="too large for the Triton kernels"):
            sinkhorn_assign(**kwargs, epsilon=1e46, backend="triton")
    res = sinkhorn_assign(z @ c.T, epsilon=1e46, backend="torch")
    assert torch.allclose(res.codes, torch.full((20, 5), 0.2))
    # Integer prototypes or bias: refused as on the torch path (the kernel path cast them silently).
    for kwargs, name in ((dict(prototypes=c.long()), "prototypes"), (dict(prototypes=c, bias=torch.zeros(5).long()),
                                                                      "bias")):  # fmt: skip
        with pytest.raises(TypeError, match=f"{name} must be a float16, bfloat16, float32 or float64 tensor"):
            sinkhorn_assign(features=z, **kwargs, backend="triton")


def test_triton_backend_without_gpu_explains(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    import otlabel.backends as backends

    monkeypatch.setattr(backends, "_triton_usable", lambda scores: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sinkhorn_assign(S, 0.1, backend="triton")


@pytest.mark.parametrize("entry", ["torch", "reference", pytest.param("triton", marks=pytest.mark.interpreter),
                                   "stream"])  # fmt: skip
def test_infeasible_by_counting_is_an_error(entry):
    """Three of four samples may only go to cluster 0, whose share is half: no balanced plan exists. No per-row or
    per-column check sees it (Hall's condition, otlabel.feasibility); it was a ConvergenceWarning after max_iter
    iterations, and nothing at all with tol=None."""
    s = torch.zeros(4, 2)
    s[:3, 1] = -INF
    with pytest.raises(ValueError, match=r"infeasible mask: clusters \[1\] need 0.5 of the mass .* but only 1 sample "
                                         r"\(0.25 of the sample mass\) may go to any of them"):  # fmt: skip
        if entry == "stream":
            sinkhorn_assign_stream(s.numpy(), 0.1, tol=None, max_iter=3)
        else:
            sinkhorn_assign(s, 0.1, tol=None, max_iter=3, backend=entry)


def test_infeasible_mask_left_unchecked_warns_and_stays_finite(monkeypatch):
    """Where the check is skipped (more distinct mask rows than it keeps, or no SciPy for its max-flow), the solver
    must still not return NaN: it warns that it did not converge, the error stuck at the infeasible excess."""
    from otlabel import feasibility

    monkeypatch.setattr(feasibility, "check_feasible", lambda *args, **kwargs: None)
    s = torch.zeros(4, 2)
    s[:3, 1] = -INF
    for backend in ("torch", "reference"):
        with pytest.warns(ConvergenceWarning, match="masks"):
            res = sinkhorn_assign(s, 0.1, max_iter=300, backend=backend)
        assert not res.converged and abs(res.marginal_error - 0.5) < 1e-3
        assert torch.isfinite(res.codes).all() and torch.isfinite(res.cluster_potentials).all()


@pytest.mark.parametrize("fill", [-1e9, float(torch.finfo(torch.float32).min)])
def test_an_infeasible_mask_written_as_a_finite_fill_is_told_to_use_minus_inf(fill):
    """Clusters 0 and 1 need 1/3 of the mass and only samples 0-4 (1/12) may go there. Written as -inf the mask
    check refuses it by name; written as -1e9 or float32's finfo.min (finite scores: nothing to check) every path
    ran max_iter and warned "raise max_iter, raise epsilon, or warm-start", which cannot help, and spoke of -inf
    masks alone. The warning now says what a finite fill does and to write it as -inf; the result stays finite."""
    s = random_problem(60, 6, seed=5)
    s[5:, :2] = -INF
    with pytest.raises(ValueError, match=r"infeasible mask: clusters \[0, 1\] need 0\.333"):
        sinkhorn_assign(s, 0.05)
    s[5:, :2] = fill
    said = r"masks written as a large finite value .* write the masks as -inf"
    solves = [
        lambda: sinkhorn_assign(s, 0.05, max_iter=50, backend="torch"),
        lambda: sinkhorn_assign(s, 0.05, max_iter=50),  # the compiled CPU loops where installed
        lambda: sinkhorn_assign(s.double(), 0.05, max_iter=50, backend="reference"),
        lambda: sinkhorn_assign_sharded(s, 0.05, max_iter=50),
    ]
    if fill > -1e38:  # streamed, -3.4e38 / 0.05 is -inf in float32 arithmetic: the mask check refuses it
        solves.append(lambda: sinkhorn_assign_stream(s.numpy(), 0.05, max_iter=50))
    for solve in solves:
        with pytest.warns(ConvergenceWarning, match=said):
            res = solve()
        assert not res.converged and res.marginal_error > 0.1
        assert torch.isfinite(res.codes).all() and torch.isfinite(res.cluster_potentials).all()


def test_non_convergence_warns():
    with pytest.warns(ConvergenceWarning, match="did not converge.*after 2 iterations"):
        res = sinkhorn_assign(S, 0.01, max_iter=2, tol=1e-9)
    assert not res.converged and res.n_iter == 2
    with pytest.warns(ConvergenceWarning, match="after 3 iterations"):  # the stages of epsilon_scaling count
        sinkhorn_assign(S, 0.01, max_iter=3, tol=1e-9, epsilon_scaling=0.5)


Z, C = random_problem(10, 3, seed=44), random_problem(4, 3, seed=45)
NOT_CONVERGING = dict(epsilon=0.01, max_iter=2, tol=1e-9)


@pytest.mark.parametrize(
    "name, solve",
    [
        ("sinkhorn_assign", lambda: sinkhorn_assign(S, **NOT_CONVERGING)),
        ("sinkhorn_assign", lambda: sinkhorn_assign(features=Z, prototypes=C, **NOT_CONVERGING)),
        ("sinkhorn_assign", lambda: sinkhorn_assign(features=Z, prototypes=C, backend="reference", **NOT_CONVERGING)),
        pytest.param(
            "sinkhorn_assign",
            lambda: sinkhorn_assign(features=Z, prototypes=C, backend="triton", **NOT_CONVERGING),
            marks=pytest.mark.interpreter,
        ),
        ("sinkhorn_assign_stream", lambda: sinkhorn_assign_stream(features=Z, prototypes=C, **NOT_CONVERGING)),
        ("sinkhorn_assign_sharded", lambda: sinkhorn_assign_sharded(S, **NOT_CONVERGING)),
        ("sinkhorn_assign_sharded", lambda: sinkhorn_assign_sharded(features=Z, prototypes=C, **NOT_CONVERGING)),
    ],
)
def test_non_convergence_is_warned_at_the_callers_line_in_its_name(name, solve):
    """Found porting: features mode and the sharded solve warned from otlabel's own lines (features.py,
    distributed.py), where filters by module and the warning's location point at nothing of the caller's; and CPU
    features mode warned as sinkhorn_assign_stream, which the caller never called."""
    with pytest.warns(ConvergenceWarning, match=f"^{name} did not converge") as caught:
        solve()
    assert [w.filename for w in caught] == [__file__]


TOO_TIGHT = dict(epsilon=0.5, max_iter=300, tol=1e-9)


@pytest.mark.parametrize(
    "solve",
    [
        lambda s, z, c: sinkhorn_assign(s, **TOO_TIGHT),
        lambda s, z, c: sinkhorn_assign(features=z, prototypes=c, **TOO_TIGHT),
        lambda s, z, c: sinkhorn_assign_stream(s.numpy(), **TOO_TIGHT),
        lambda s, z, c: sinkhorn_assign_sharded(s, **TOO_TIGHT),
    ],
)
def test_a_tol_below_the_float32_floor_is_told_to_pass_float64(solve):
    """float32 arithmetic leaves the measured error a floor (README: about 1e-7 on the CPU; 2.6-3.8e-8 here after 300
    iterations, the same after 3,000), and the warning's only advice was to raise max_iter, raise epsilon or
    warm-start, none of which gets below it. It says so and names the fix; float64 input, which reaches the tol, is
    not told.

    The measured error is noise at the floor and now and then dips below the tol, to 0 even (the float32 column sums
    land on r exactly), and the solve stops there, converged. These scores keep it >= 2.6e-8 for 3,000 iterations
    through each of the three doors below that take them, with Numba or without (OTLABEL_NUMBA=0), on 1, 2 or 4
    threads. Of seeds 41-60, 6 dip below 1e-9 in one of those 18 solves: 47, used before, to 5.0e-10 at
    iteration 12 without Numba, 41 to 0 at iteration 14 when streamed on one thread."""
    s, z, c = random_problem(60, 4, seed=43), random_problem(60, 3, seed=48), random_problem(4, 3, seed=49)
    with pytest.warns(ConvergenceWarning, match="floor .* float32 arithmetic .* pass float64") as caught:
        res = solve(s, z, c)
    assert not res.converged and res.marginal_error < 1e-6
    assert len(caught) == 1
    assert solve(s.double(), z.double(), c.double()).converged  # the advice works
    with pytest.warns(ConvergenceWarning) as caught:  # a float32 solve cut short at a loose tol: not the floor
        sinkhorn_assign(s, 0.01, max_iter=2, tol=1e-3)
    assert "float64" not in str(caught[0].message)


def test_a_float32_solve_cut_short_far_above_the_floor_is_not_told_of_it():
    """A tol below 1e-5 missed after 2 iterations, the error still 0.5: the warning said the tol "meets the floor
    that float32 arithmetic leaves ..., which more iterations do not lower: pass float64 scores", where more
    iterations are the fix. The floor is named only for an error that has come down near it."""
    with pytest.warns(ConvergenceWarning) as caught:
        res = sinkhorn_assign(random_problem(200, 10, seed=50), 0.01, max_iter=2, tol=1e-6)
    assert res.marginal_error > 1e-2
    message = str(caught[0].message)
    assert "floor" not in message and "float64" not in message and "Raise max_iter" in message


@pytest.mark.parametrize(
    "scores, eps",
    [
        (torch.randn(1, 5), 0.05),  # N = 1
        (torch.randn(7, 1), 0.05),  # K = 1
        (torch.randn(3, 50), 0.05),  # K > N
        (torch.randn(40, 6) * 1e-3, 1e-3),  # tiny scores, tiny eps
    ],
)
def test_extreme_but_valid(scores, eps):
    res = sinkhorn_assign(scores, eps, tol=1e-4, max_iter=20_000)
    assert res.converged and torch.isfinite(res.codes).all() and torch.isfinite(res.cluster_potentials).all()
    n, k = scores.shape
    assert np.allclose(res.plan.sum(0).numpy(), 1.0 / k, atol=2e-4)


def test_scores_that_require_grad_give_a_result_without_a_graph():
    """A pseudo-label is a target: no autograd graph over the iterations (it would hold every intermediate), no
    'converting a tensor that requires grad' warning, and the same answer as on the detached scores."""
    s = S.clone().requires_grad_(True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sinkhorn_assign(s, 0.1, init=torch.zeros(4, requires_grad=True))
        codes = res.codes
    assert not codes.requires_grad and not res.cluster_potentials.requires_grad and not res.plan.requires_grad
    plain = sinkhorn_assign(S, 0.1, init=torch.zeros(4))
    assert torch.equal(res.labels, plain.labels) and torch.equal(codes, plain.codes)


def test_inference_mode_gives_the_same_result(monkeypatch):
    """Found porting SwAV-style code: pseudo-labels computed under torch.inference_mode(). Inference mode is
    thread-local, so the CPU worker threads that fill the labels and codes allocated under it (inference tensors) were
    outside it: reading codes, or any streamed or CPU features solve, raised torch's 'Inplace update to inference
    tensor outside InferenceMode'. Read inside or outside, after a solve inside or outside: the same results."""
    from otlabel.backends import torch_backend

    monkeypatch.setattr(torch_backend, "SERIAL_PASS_ELEMENTS", 0)  # these small scores go to the worker threads too
    s = random_problem(300, 6, seed=41)
    z = torch.nn.functional.normalize(random_problem(300, 8, seed=42), dim=1)
    c = random_problem(6, 8, seed=43)
    solves = {
        "dense": lambda: sinkhorn_assign(s, 0.1),
        "stream": lambda: sinkhorn_assign_stream(s.numpy(), 0.1),
        "features": lambda: sinkhorn_assign(features=z, prototypes=c, epsilon=0.1),
    }
    for name, solve in solves.items():
        want = solve()
        want = (want.labels, want.codes, want.objective)
        for solved_inside, read_inside in [(True, True), (True, False), (False, True)]:
            with torch.inference_mode(solved_inside):
                res = solve()
            with torch.inference_mode(read_inside):
                got = (res.labels, res.codes, res.objective)
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2], name
    monkeypatch.setattr(torch_backend, "available_memory_bytes", lambda: 0)  # the log-domain operator in memory
    monkeypatch.setattr(torch_backend, "KERNEL_ALWAYS_FITS_BYTES", 0)  # and asked even for a small one
    with torch.inference_mode():
        res = sinkhorn_assign(s, 0.1)
        assert torch.equal(res.codes, solves["dense"]().codes)


def test_autocast_leaves_the_mask_check_in_float32():
    """Found porting AMP training code: under torch.autocast (bfloat16 on the CPU) the mask check's float32 sums ran
    in bfloat16, off by more than its float32 margin, and let this infeasible mask through to a ConvergenceWarning.
    Clusters 0-513 need 514/1024 of the mass, only samples 0-1026 (1027/2048) may go there: infeasible by 5e-4."""
    s = torch.zeros(2048, 1024)
    s[1027:, :514] = -INF
    for solve in (sinkhorn_assign, sinkhorn_assign_sharded):
        with torch.autocast("cpu", dtype=torch.bfloat16), pytest.raises(ValueError, match="infeasible mask"):
            solve(s, 0.05, max_iter=5)


@pytest.mark.skipif(
    not _autocast_takes_a_device_type(),
    reason="torch < 2.4: no torch.is_autocast_enabled(device_type), and these autocast modes are not built in",
)
@pytest.mark.parametrize("device_type", ["mps", "xpu", "hpu", "mtia"])
def test_autocast_is_turned_off_for_other_accelerators(device_type):
    """autocast_off turned off only the CPU's and CUDA's autocast: an MPS or XPU training step's region reached the
    passes. Those regions can be entered (not run) on a CPU-only build: each is off inside, restored after."""
    from otlabel.problem import autocast_off

    with torch.autocast(device_type, dtype=torch.bfloat16):
        with autocast_off():
            assert not torch.is_autocast_enabled(device_type)
        assert torch.is_autocast_enabled(device_type)


@pytest.mark.skipif(
    not _autocast_takes_a_device_type(),
    reason="torch < 2.4: no torch.is_autocast_enabled(device_type), and these autocast modes are not built in",
)
@pytest.mark.parametrize("device_type", ["cpu", "mps", "xpu", "hpu", "mtia"])
def test_every_device_types_autocast_is_seen_before_a_pass(device_type):
    """Every pass asks whether some autocast is on (to turn it off): the six device types one by one took 2.5 us a
    pass, a call of torch's for all of them 0.1 us, but that call does not see MPS's (torch 2.13). The device types it
    misses are found at import and asked by name."""
    from otlabel.problem import any_autocast_enabled

    assert not any_autocast_enabled()
    with torch.autocast(device_type, dtype=torch.bfloat16):
        assert any_autocast_enabled()
    assert not any_autocast_enabled()


def test_lists_and_scalar_types_are_accepted():
    """Lists of numbers for scores and weights, NumPy scalars and 0-d tensors for epsilon: the same as floats."""
    weights = [0.1, 0.2, 0.3, 0.4]
    want = sinkhorn_assign(S.double(), 0.1, cluster_weights=torch.tensor(weights, dtype=torch.float64))
    flipped = sinkhorn_assign(S.numpy()[::-1], 0.1)  # a reversed NumPy view (negative strides)
    assert torch.equal(flipped.labels, sinkhorn_assign(S.flip(0), 0.1).labels)
    uniform = (np.ones(10) / 10).tolist()
    for eps in (np.float32(0.1), np.float64(0.1), torch.tensor(0.1, dtype=torch.float64), 0.1):
        got = sinkhorn_assign(S.double().tolist(), eps, cluster_weights=weights, sample_weights=uniform)
        assert torch.equal(got.labels, want.labels)
        atol = 1e-6 if isinstance(eps, np.float32) else 0.0  # float32(0.1) is not 0.1
        assert torch.allclose(got.cluster_potentials, want.cluster_potentials, rtol=0, atol=atol)


def test_a_list_of_per_head_tensors_is_stacked():
    """Found porting SeLa's heads, sinkhorn_assign([head(z) for head in heads]): lists went through NumPy, which took
    detached float32 CPU tensors only; logits that require grad, bfloat16 ones (autocast) and CUDA ones failed with
    torch's own errors ('Can't call numpy() on Tensor that requires grad', 'Got unsupported ScalarType BFloat16')."""
    heads = random_problem(10, 4, h=3, seed=46)
    want = sinkhorn_assign(heads, 0.1)
    for dtype in (torch.float32, torch.bfloat16):
        logits = [h.to(dtype).requires_grad_() for h in heads]
        got = sinkhorn_assign(logits, 0.1)
        assert torch.equal(got.labels, sinkhorn_assign(heads.to(dtype), 0.1).labels)
        assert got.labels.shape == want.labels.shape == (3, 10) and not got.codes.requires_grad
    with pytest.raises(ValueError, match="list of tensors .one per head. must have one shape"):
        sinkhorn_assign([heads[0], heads[1, :, :3]], 0.1)


def test_weights_within_the_sum_tolerance_are_renormalised():
    """Cluster weights summing to 1 - 9e-5 against sample weights summing to 1 + 9e-5 pass the check; unless both are
    rescaled to sum to exactly 1 no plan meets them, and the solver stalled at error 2e-4 with a warning."""
    r = torch.full((4,), (1 - 9e-5) / 4, dtype=torch.float64)
    c = torch.full((10,), (1 + 9e-5) / 10, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sinkhorn_assign(S, 0.1, cluster_weights=r, sample_weights=c, tol=1e-6, max_iter=5000)
    assert res.converged and torch.allclose(res.plan.sum(0).double(), torch.full((4,), 0.25, dtype=torch.float64),
                                            atol=2e-6)  # fmt: skip
    sevenths = torch.full((7,), 1 / 7, dtype=torch.float16)  # sums to 1.0004 in fp16 arithmetic's rounding
    assert sinkhorn_assign(torch.randn(21, 7), 0.1, cluster_weights=sevenths).converged


def test_result_repr_is_a_short_summary():
    res = sinkhorn_assign(S, 0.1, tol=1e-9, max_iter=300, warn=False)
    text = repr(res)
    assert len(text) < 200 and "labels=(10,) int64" in text and f"after {res.n_iter} iterations" in text


def test_result_help_shows_the_public_fields_only():
    """help(SinkhornResult) listed the solver's private state (_operator, _sample_weights, _batched, ...) in its
    signature, and did not say that a batched solve shares one iteration count between its heads."""
    import dataclasses
    import inspect
    import pydoc

    from otlabel import SinkhornResult

    params = list(inspect.signature(SinkhornResult).parameters)
    assert params == ["labels", "cluster_potentials", "n_iter", "converged", "marginal_error", "errors", "epsilon",
                      "internal"]  # fmt: skip
    assert [f.name for f in dataclasses.fields(SinkhornResult)][:7] == params[:-1]
    page = pydoc.render_doc(SinkhornResult, renderer=pydoc.plaintext)
    page = page.split("Data and other attributes")[0]  # past it, pydoc dumps the dataclass machinery's dunders
    assert "_operator" not in page and "_sample_weights" not in page and "_batched" not in page
    assert "shared by all heads" in " ".join(SinkhornResult.__doc__.split())
    res = sinkhorn_assign(torch.stack([S, 3 * S]), 0.1)  # batched: the internal state still drives the read-outs
    assert res.codes.shape == (2, 10, 4) and res.objective.shape == (2,)
    with pytest.raises(TypeError, match="unexpected keyword"):
        SinkhornResult(res.labels, res.cluster_potentials, 1, True, 0.0, [0.0], 0.1, _operator=None,
                       _sample_weights=None, _batched=False, _oops=1)  # fmt: skip
    with pytest.raises(TypeError, match="made by otlabel's solvers"):
        SinkhornResult(res.labels, res.cluster_potentials, 1, True, 0.0, [0.0], 0.1)
    copy = dataclasses.replace(res, labels=res.labels.flip(-1))  # copies the solver's state too, as it did
    assert torch.equal(copy.codes, res.codes) and torch.equal(copy.labels, res.labels.flip(-1))


def test_score_range_check_lets_large_but_solvable_scores_through():
    """Offsets of 1e9 (|S| / eps = 2e10) and a zero-weight cluster parked at float32's lowest value solve as before;
    the check is about what float64 arithmetic can resolve, not about how large the numbers look."""
    s = S.double()
    plain = sinkhorn_assign(s, 0.05, tol=1e-6, max_iter=5000)
    shifted = sinkhorn_assign(s + 1e9, 0.05, tol=1e-6, max_iter=5000)
    assert shifted.converged and torch.equal(shifted.labels, plain.labels)
    assert torch.allclose(shifted.codes, plain.codes, atol=1e-5)
    parked = torch.cat([S, torch.full((10, 1), torch.finfo(torch.float32).min)], dim=1)  # (10, 5)
    weights = torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0])
    res = sinkhorn_assign(parked, 0.05, cluster_weights=weights)
    assert res.converged and not (res.labels == 4).any()
    parked_high = torch.cat([S.double(), torch.full((10, 1), 1e10, dtype=torch.float64)], dim=1)  # above every row
    res = sinkhorn_assign(parked_high, 0.05, cluster_weights=weights)
    assert res.converged and not (res.labels == 4).any()
    with pytest.raises(ValueError, match="scores / epsilon"):  # with weight, the same column is too large
        sinkhorn_assign(parked_high, 0.05)
    overflowing = torch.cat([S, torch.full((10, 1), 1e37)], dim=1)  # S / eps would be inf there: inf - inf = NaN
    with pytest.raises(ValueError, match="cluster of weight 0, where S / eps overflows float32"):
        sinkhorn_assign(overflowing, 0.05, cluster_weights=weights)


def test_float32_scores_with_a_large_offset_are_refused_with_a_fix_that_works():
    """float32 S / eps + b loses about 1e-9 x |S| / eps: at |S| / eps = 2e7 a solve claimed convergence with its codes'
    marginals off by 2e-2. It is refused now, and the suggested fix (subtract each sample's maximum, which changes
    nothing) solves the same rounded scores as float64 does."""
    s = (torch.randn(400, 10, generator=torch.Generator().manual_seed(8)) + 1e6).float()
    with pytest.raises(ValueError, match=r"float32 arithmetic.*amax\(-1, keepdim=True\)"):
        sinkhorn_assign(s, 0.05)
    fixed = sinkhorn_assign(s - s.amax(-1, keepdim=True), 0.05, tol=1e-6, max_iter=5000)
    exact = sinkhorn_assign(s.double(), 0.05, tol=1e-6, max_iter=5000, backend="reference")
    assert fixed.converged and torch.equal(fixed.labels, exact.labels)
    assert torch.allclose(fixed.plan.sum(0).double(), torch.full((10,), 0.1, dtype=torch.float64), atol=1e-5)


@pytest.mark.parametrize("features", [False, True])
def test_float64_input_beyond_its_range_is_not_told_to_pass_float64(features):
    """The range error suggested "pass float64 scores" to callers whose scores were float64 already; float32 input
    still gets that suggestion."""
    g = torch.Generator().manual_seed(9)
    z, c = torch.randn(10, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g, dtype=torch.float64)
    for dtype, scale, wider in [(torch.float64, 1e7, False), (torch.float32, 1e3, True)]:
        inputs = (
            dict(features=z.to(dtype) * scale, prototypes=c.to(dtype) * scale)
            if features
            else dict(scores=(z @ c.T).to(dtype) * scale**2)
        )
        with pytest.raises(ValueError, match="scores / epsilon reach") as info:
            sinkhorn_assign(**inputs, epsilon=0.05)
        message = str(info.value)
        assert ("pass float64" in message) == wider, message
        assert "raise epsilon" in message and "or or" not in message.lower(), message


ENTRY_POINTS = {  # the three ways in, which must judge the same scores alike
    "in memory": lambda s, **kw: sinkhorn_assign(s, 0.05, **kw),
    "streamed": lambda s, **kw: sinkhorn_assign_stream(s.numpy(), 0.05, **kw),
    "sharded": lambda s, **kw: sinkhorn_assign_sharded(s, 0.05, **kw),
}


@pytest.mark.parametrize("entry", ["sharded", "exact"])
def test_sparse_and_meta_tensors_are_refused_on_every_path(entry):
    """The streamed path takes the NumPy copy in ENTRY_POINTS; here the tensors themselves, on the paths that open
    them: streamed, sharded, features and the exact solvers (torch's own errors, pages long, before)."""
    solve = {"sharded": lambda s: sinkhorn_assign_sharded(s, 0.05), "exact": exact_plan}[entry]
    for bad, says in ((S.to_sparse(), "scores is a sparse_coo tensor"), (S.to("meta"), "scores is a meta tensor")):
        with pytest.raises(TypeError, match=says):
            solve(bad)
        with pytest.raises(TypeError, match=says):
            sinkhorn_assign_stream(bad, 0.05)
    with pytest.raises(TypeError, match="features is a sparse_coo tensor"):
        sinkhorn_assign(features=S.to_sparse(), prototypes=S[:3], epsilon=1.0)
    # Meta features in memory: "device must be 'cpu', 'cuda' or 'cuda:N', got device(type='meta')" (the device they
    # were streamed on), and the Triton backend's "needs ... CUDA tensors"; the streamed and sharded paths named them.
    for backend in ("auto", "torch", "triton"):
        with pytest.raises(TypeError, match="^features is a meta tensor, which holds no values"):
            sinkhorn_assign(features=S.to("meta"), prototypes=S[:3], epsilon=1.0, backend=backend)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_refuses_a_callback_that_cannot_be_called(entry):
    """Refused before the first pass (it was Python's "'int' object is not callable" from inside the loop), in
    features mode too."""
    with pytest.raises(TypeError, match="callback must be a function callback\\(iteration, error\\)"):
        ENTRY_POINTS[entry](S, callback="print")
    with pytest.raises(TypeError, match="callback must be a function"):
        sinkhorn_assign(features=S, prototypes=S[:3], epsilon=1.0, callback=1)


FLAGS = {  # the boolean options of each entry point
    "in memory": ("warn", "allow_tf32", "cuda_graph"),
    "streamed": ("warn",),
    "sharded": ("warn", "allow_tf32"),
}


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_takes_boolean_options_as_booleans_only(entry):
    """cuda_graph="no" (truthy) was taken for True, and warn="no" silenced the warning: a flag must be True or
    False (a NumPy bool too), else a TypeError naming it."""
    for name in FLAGS[entry]:
        for bad in ("no", None, 1):
            with pytest.raises(TypeError, match=rf"{name} must be True or False, got {bad!r}"):
                ENTRY_POINTS[entry](S, **{name: bad})
        if name != "cuda_graph":  # True needs a GPU
            assert ENTRY_POINTS[entry](S, **{name: np.bool_(False)}).converged
    with pytest.raises(TypeError, match="cuda_graph must be True or False"):  # features mode checks it too
        sinkhorn_assign(features=S, prototypes=S[:4], epsilon=1.0, cuda_graph="no")


@pytest.mark.parametrize("entry", ENTRY_POINTS)
@pytest.mark.parametrize("name", ["cluster_weights", "sample_weights"])
@pytest.mark.parametrize("as_numpy", [False, True])
def test_every_entry_point_refuses_boolean_weights(entry, name, as_numpy):
    """A bool mask summing to 1 was read as weights 1 and 0 (and one summing to more was refused as "must sum to
    1"), while the same values as a list were refused: boolean weights are a TypeError everywhere, naming the fix."""
    mask = torch.zeros(4 if name == "cluster_weights" else 10, dtype=torch.bool)
    mask[1] = True  # sums to 1: accepted as a one-hot weight before
    weights, fix = (mask.numpy(), r"mask\.astype\(np\.float64\)") if as_numpy else (mask, r"mask\.float\(\)")
    with pytest.raises(TypeError, match=rf"{name} is boolean .*floating-point weights, e\.g\. {name}={fix}"):
        ENTRY_POINTS[entry](S, **{name: weights})
    with pytest.raises(TypeError, match=rf"{name} is boolean"):
        sinkhorn_assign(features=S, prototypes=S[:4], epsilon=1.0, **{name: weights})
    with pytest.raises(TypeError, match=rf"{name} is boolean"):
        exact_plan(S, **{name: weights})


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_checks_the_span_over_the_clusters_with_weight(entry):
    """A zero-weight cluster far above every sample takes no part: accepted. A weighted cluster far below every
    sample's best needs a potential float32 cannot resolve: refused, with the per-cluster shift that fixes it."""
    solve = ENTRY_POINTS[entry]
    parked_high = torch.cat([S, torch.full((10, 1), 1e4)], dim=1)
    res = solve(parked_high, cluster_weights=torch.tensor([0.25, 0.25, 0.25, 0.25, 0.0]))
    assert res.converged and not bool((res.labels == 4).any())
    sunk = torch.cat([S, torch.full((10, 1), -1e4)], dim=1)
    with pytest.raises(ValueError, match=r"reach 2e\+05.*float32 arithmetic.*amax\(-2, keepdim=True\)"):
        solve(sunk)
    res = solve(sunk - sunk.amax(-2, keepdim=True))
    assert res.converged


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_checks_the_span_of_each_sample(entry):
    """A sample far below the others (its scores 1e4 down; every column maximum stays ordinary) needs a potential
    float32 cannot resolve: refused, with the per-sample shift that fixes it."""
    solve = ENTRY_POINTS[entry]
    sunk = S.clone()
    sunk[3] -= 1e4
    with pytest.raises(ValueError, match=r"reach 2e\+05.*float32 arithmetic.*amax\(-1, keepdim=True\)"):
        solve(sunk)
    assert solve(sunk - sunk.amax(-1, keepdim=True)).converged


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_accepts_a_zero_weight_cluster_no_sample_may_reach(entry):
    """A closed cluster (weight 0, every score -inf) needs nothing: not a starved cluster, on every entry point (the
    streamed and sharded ones judge the column maxima accumulated over their chunks or ranks)."""
    closed = S.clone()
    closed[:, 3] = -INF
    res = ENTRY_POINTS[entry](closed, cluster_weights=torch.tensor([0.4, 0.3, 0.3, 0.0]))
    assert res.converged and not bool((res.labels == 3).any())


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_every_entry_point_judges_the_zero_weight_clusters_scores_too(entry):
    """A NaN in a zero-weight cluster's column is still a NaN score, and a sample allowed only in zero-weight clusters
    is named as such (not as scores too large), on every entry point."""
    solve, w = ENTRY_POINTS[entry], torch.tensor([0.4, 0.3, 0.3, 0.0])
    with pytest.raises(ValueError, match=r"scores contain NaN \(first at index \(5, 3\)"):
        solve(with_value((5, 3), float("nan")), cluster_weights=w)
    with pytest.raises(ValueError, match=r"sample 6 \(head 0\).* is allowed only in clusters of weight 0"):
        solve(masked(rows=6, cols=slice(0, 3)), cluster_weights=w)


ZERO_WEIGHT_ROUTES = {  # every way in, sample weights given
    "torch": lambda s, **kw: sinkhorn_assign(s, 0.05, backend="torch", **kw),
    "reference": lambda s, **kw: sinkhorn_assign(s, 0.05, backend="reference", **kw),
    "triton": lambda s, **kw: sinkhorn_assign(s, 0.05, backend="triton", **kw),
    "streamed": lambda s, **kw: sinkhorn_assign_stream(s.numpy(), 0.05, **kw),
    "sharded": lambda s, **kw: sinkhorn_assign_sharded(s, 0.05, **kw),
    "exact pot": lambda s, **kw: exact_plan(s, **kw),
    "exact linprog": lambda s, **kw: exact_plan(s, **kw, method="linprog"),
}


@pytest.mark.parametrize("route", [pytest.param(r, marks=pytest.mark.interpreter) if r == "triton" else r
                                   for r in ZERO_WEIGHT_ROUTES])  # fmt: skip
def test_a_zero_weight_sample_allowed_only_in_zero_weight_clusters_is_refused_saying_why(route):
    """Sample 6 weighs 0 and may only go to cluster 3, of weight 0. It carries no mass, so a plan exists, but its
    label and codes are read over the clusters of positive weight (S / eps + b, b = -inf at weight 0): let through,
    its codes were NaN and its label cluster 0, forbidden to it (reference backend; the torch backend's potentials
    turned NaN). Refused on every route, as before, but no longer with only the words for a sample of positive weight
    ('allowed only in clusters of weight 0. Allow it ...'), which did not say why a sample of no mass is refused. A
    sample of weight 0 that may go to a cluster of weight is labelled there, on every route alike."""
    solve = ZERO_WEIGHT_ROUTES[route]
    r = torch.tensor([0.4, 0.3, 0.3, 0.0], dtype=torch.float64)
    c = torch.full((10,), 1 / 9, dtype=torch.float64)
    c[6] = 0.0
    with pytest.raises(ValueError, match=r"sample 6 \(head 0\).* is allowed only in clusters of weight 0, which take "
                       r"no mass\. With a positive sample weight it has no plan; with sample weight 0 it has no label "
                       r"or codes either"):  # fmt: skip
        solve(masked(rows=6, cols=slice(0, 3)), cluster_weights=r, sample_weights=c)
    s = masked(rows=6, cols=slice(0, 2))  # cluster 2 is its only one of positive weight
    assert int(solve(s, cluster_weights=r, sample_weights=c).labels[6]) == 2


def test_a_cluster_only_zero_weight_samples_may_reach_is_said_to_lack_samples_of_weight():
    """Cluster 3 (weight 0.25) is open to sample 6 alone, of weight 0: no mass can fill it. The message said that "no
    sample may go to" it, which sample 6 may; it now says no sample of positive weight may."""
    s = masked(cols=3)
    s[6, 3] = 0.5
    c = torch.full((10,), 1 / 9, dtype=torch.float64)
    c[6] = 0.0
    with pytest.raises(ValueError, match=r"clusters \[3\] need 0.25 of the mass .* but no sample of positive weight "
                                         r"may go to them"):  # fmt: skip
        sinkhorn_assign(s, 0.05, sample_weights=c)


def test_a_partly_masked_sample_beside_a_zero_weight_cluster_is_accepted():
    """With a cluster of weight 0 the row maxima over the weighted clusters decide which samples are stranded: a
    sample closed to one weighted cluster and open to the others is not."""
    s = S.clone()
    s[2, 0] = -INF
    res = sinkhorn_assign(s, 0.05, cluster_weights=torch.tensor([0.4, 0.3, 0.3, 0.0]))
    assert res.converged and int(res.labels[2]) in (1, 2) and not bool((res.labels == 3).any())


@pytest.mark.parametrize("kind", ["common", "per sample", "per cluster"])
@pytest.mark.parametrize("entry", ["in memory", "streamed"])
def test_float32_offsets_within_the_limit_give_codes_within_tol_and_beyond_it_are_refused(kind, entry):
    """float32 forms S / eps + b with a rounding of ~6e-8 x |S| / eps per entry. At |S| / eps = 8e4 (allowed before
    2026-11-22) the in-memory solve reported convergence with its codes' marginals 2.6x tol away, and the streamed
    one stalled. Up to the limit the codes' marginal error stays within 20% of the default tol of the reported one;
    beyond it the input is refused."""
    solve = ENTRY_POINTS[entry]
    scores = offset_scores(kind, 0.95 * MAX_SCORE_SPAN_FP32, 0.05)
    res = solve(scores)
    codes_error = float((res.codes.double().mean(0) - 1 / scores.shape[1]).abs().sum())
    assert res.converged and abs(codes_error - res.marginal_error) < 2e-5, (res.marginal_error, codes_error)
    with pytest.raises(ValueError, match="scores / epsilon reach"):
        solve(offset_scores(kind, 1.05 * MAX_SCORE_SPAN_FP32, 0.05))


def test_read_only_numpy_scores_give_no_torch_warning(tmp_path):
    """np.load(path, mmap_mode="r") is read-only: torch's "not writable" UserWarning was shown on every call (the
    streamed entry point already silenced it; otlabel never writes to the scores)."""
    import warnings

    np.save(tmp_path / "s.npy", np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32))
    scores = np.load(tmp_path / "s.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        res = sinkhorn_assign(scores, 0.05)
    assert res.converged


def test_adaptive_over_relaxation_needs_a_tolerance():
    """With tol=None no error is read, so the adaptive omega never moved: it ran plain Sinkhorn without a word."""
    s = torch.randn(20, 4)
    with pytest.raises(ValueError, match=r"over_relaxation=<omega> for a fixed omega"):
        sinkhorn_assign(s, 0.1, max_iter=5, tol=None, acceleration="over-relaxation")
    fixed = sinkhorn_assign(s, 0.1, max_iter=5, tol=None, over_relaxation=1.5)
    plain = sinkhorn_assign(s, 0.1, max_iter=5, tol=None, acceleration="none")
    assert not torch.equal(fixed.cluster_potentials, plain.cluster_potentials)  # a fixed omega does act


@pytest.mark.parametrize("name", ["cluster_weights", "sample_weights"])
def test_weights_given_as_a_path_are_told_to_load_it(name, tmp_path):
    """A path for the weights was answered with "For a .npy on disk, sinkhorn_assign_stream(path) reads it in
    chunks", also by sinkhorn_assign_stream itself, which takes weights as arrays only: now "np.load(path)"."""
    scores = np.random.default_rng(0).standard_normal((20, 4)).astype(np.float32)
    path = tmp_path / "w.npy"
    np.save(path, np.full(20 if name == "sample_weights" else 4, 0.05 if name == "sample_weights" else 0.25))
    for entry in (sinkhorn_assign, sinkhorn_assign_stream):
        with pytest.raises(TypeError, match=rf"{name} .* got the path .*load it first: np.load\(path\)") as caught:
            entry(scores, **{name: str(path)})
        assert "sinkhorn_assign_stream" not in str(caught.value)


@pytest.mark.skipif(np.dtype(np.longdouble).itemsize <= 8, reason="long double is float64 on this platform")
def test_extended_precision_arrays_are_told_to_convert():
    """float128 / complex256 arrays: torch's own TypeError listed the types it takes and no fix."""
    for kwargs, name in ((dict(scores=S.numpy().astype(np.longdouble)), "scores"),
                         (dict(cluster_weights=np.full(4, 0.25, dtype=np.longdouble)), "cluster_weights"),
                         (dict(sample_weights=np.full(10, 0.1, dtype=np.clongdouble)), "sample_weights")):  # fmt: skip
        args = dict(scores=S) | kwargs
        with pytest.raises(TypeError, match=f"{name} is a NumPy array of dtype .*extended precision.*astype"):
            sinkhorn_assign(args.pop("scores"), 0.1, **args)


def test_masked_arrays_are_refused_on_the_streamed_and_features_paths():
    """Their masks were dropped there too."""
    m = np.ma.masked_array(S.numpy(), mask=S.numpy() > 1)
    with pytest.raises(TypeError, match="scores is a NumPy masked array"):
        sinkhorn_assign_stream(m, 0.1)
    with pytest.raises(TypeError, match="features is a NumPy masked array"):
        sinkhorn_assign(features=m, prototypes=S[:3].numpy(), epsilon=1.0)


def test_masked_arrays_that_hide_nothing_are_read_as_their_data(tmp_path):
    """A masked array with np.ma.nomask or an all-False mask hides no value (outputs of that kind are written), but
    it was refused as scores, features or weights whatever its mask; it is now read as its data, in memory, streamed
    and memory-mapped. One that hides values is still refused, the message counting them."""
    scores, w = S.numpy(), np.full(4, 0.25)
    path = tmp_path / "s.npy"
    np.save(path, scores)
    for solve in (sinkhorn_assign, sinkhorn_assign_stream):
        want = solve(scores, 0.1, cluster_weights=w)
        for mask in (np.ma.nomask, np.zeros(scores.shape, dtype=bool)):
            for given in (scores, np.load(path, mmap_mode="r")):
                res = solve(np.ma.masked_array(given, mask=mask), 0.1, cluster_weights=np.ma.masked_array(w))
                assert torch.equal(res.labels, want.labels), (solve, mask, type(given))
                assert torch.equal(res.cluster_potentials, want.cluster_potentials), (solve, mask, type(given))
    z = np.ma.masked_array(scores, mask=np.ma.nomask)
    assert torch.equal(sinkhorn_assign(features=z, prototypes=S[:3].numpy(), epsilon=1.0).labels,
                       sinkhorn_assign(features=scores, prototypes=S[:3].numpy(), epsilon=1.0).labels)  # fmt: skip
    hides_two = np.ma.masked_array(scores, mask=np.zeros(scores.shape, dtype=bool))
    hides_two[0, 1] = hides_two[3, 2] = np.ma.masked
    for solve in (sinkhorn_assign, sinkhorn_assign_stream):
        with pytest.raises(TypeError, match="scores is a NumPy masked array with 2 masked entries"):
            solve(hides_two, 0.1)


def test_arrays_of_records_are_refused_with_advice_to_pick_a_field(tmp_path):
    """A structured array (records) was told, for a 2-byte one, that it held bfloat16 raw values (the advised view
    then read int16 bits as bfloat16), and for others to convert with x.astype(np.float32), which NumPy refuses. It
    is now told to pass a field: run as written, that solves as the field's values, in memory, streamed and from a
    memory-mapped file."""
    scores = S.numpy()
    for fields in ([("a", "<i2")], [("score", "<f4"), ("id", "<i8")]):
        records = np.zeros(scores.shape, dtype=fields)
        records[fields[0][0]] = scores * (100 if fields[0][1] == "<i2" else 1)
        path = tmp_path / "records.npy"
        np.save(path, records)
        for solve in (sinkhorn_assign, sinkhorn_assign_stream):
            for x in (records, np.load(path, mmap_mode="r")):  # a path: see the next test
                with pytest.raises(
                    TypeError, match=r"scores is a NumPy array of records \(structured dtype"
                ) as refused:
                    solve(x, 0.5)
                advised = re.search(
                    r"pass the field that holds the values, (x\[.*?\]) \(a view; (.*?) if", str(refused.value)
                )
                assert advised, str(refused.value)
                want = solve(records[fields[0][0]].astype(np.float32), 0.5)
                given = eval(advised[2 if fields[0][1] == "<i2" else 1], {"x": x, "np": np})
                assert torch.equal(solve(given, 0.5).labels, want.labels), (fields, solve, type(x))


def test_the_field_advised_for_records_is_the_one_holding_the_values_and_works_as_written(tmp_path):
    """The advice for records named their first field: x['id'] for [('id', '<i8'), ('score', '<f4')], whose ids
    then solved as scores; x['a'] for nested records ([('a', [('b', '<f4'), ('c', '<i4')])]), refused again as
    records; and x['score'] of packed records ([('id', '<i2'), ('score', '<f4')], 6-byte strides) failed with
    torch's "strides not a multiple of the element byte size". A path (streamed, as from the command line) was told
    to pass x[...], a view it cannot give. The first floating-point field is now named, nested ones by their path,
    packed fields are copied (streamed: a block at a time), and a path is told to save the field as a file."""
    scores = S.numpy()
    id_first = np.zeros(scores.shape, [("id", "<i8"), ("score", "<f4")])
    nested = np.zeros(scores.shape, [("a", [("c", "<i4"), ("b", "<f4")])])
    packed = np.zeros(scores.shape, [("id", "<i2"), ("score", "<f4")])
    id_first["id"], id_first["score"] = np.arange(scores.size).reshape(scores.shape) % 3, scores
    nested["a"]["b"] = scores
    packed["score"] = scores
    for records in (id_first, nested, packed):
        path = tmp_path / "records.npy"
        np.save(path, records)
        for solve in (sinkhorn_assign, sinkhorn_assign_stream):
            want = solve(scores, 0.5)
            for x in (records, np.load(path, mmap_mode="r")):
                with pytest.raises(TypeError, match="NumPy array of records") as refused:
                    solve(x, 0.5)
                advised = re.search(r"pass the field that holds the values, (x\[.*?\]) \(a view", str(refused.value))
                assert advised, str(refused.value)
                given = solve(eval(advised[1], {"x": x}), 0.5)
                assert torch.equal(given.codes, want.codes), (records.dtype, solve, type(x))
        with pytest.raises(TypeError, match="NumPy array of records") as refused:
            sinkhorn_assign_stream(path, 0.5)
        advised = re.search(r"as a \.npy file of its own, (np\.save\(.*?\)), and give that file", str(refused.value))
        assert advised, str(refused.value)
        saved = tmp_path / "saved"
        saved.mkdir(exist_ok=True)
        exec(advised[1].replace("'new.npy'", "new"), {"np": np, "path": str(path), "new": str(saved / "new.npy")})
        assert torch.equal(sinkhorn_assign_stream(saved / "new.npy", 0.5).codes, want.codes), records.dtype


def test_a_number_given_as_a_masked_array_that_hides_it_is_refused():
    """epsilon, tol and SeLa's lam and tol are read as one number, by .item(), which reads a 0-d or one-element masked
    array's hidden value as if it showed (epsilon=np.ma.masked_array(0.1, mask=True) solved at 0.1), and np.ma.masked
    itself read as 0.0 ("epsilon must be a finite number > 0, got 0.0"). Such a number is refused as a masked array
    that hides one entry, as arrays are; one that hides nothing is read as its value."""
    s = S.numpy()
    hidden = np.ma.masked_array(0.1, mask=True)
    for call in (
        lambda: sinkhorn_assign(s, hidden),
        lambda: sinkhorn_assign(s, np.ma.masked),
        lambda: sinkhorn_assign(s, np.ma.masked_array([0.1], mask=[True])),
        lambda: sinkhorn_assign(s, 0.1, tol=np.ma.masked_array(1e-3, mask=True)),
        lambda: sela_sinkhorn(s, lam=np.ma.masked_array(25.0, mask=True)),
        lambda: sela_sinkhorn(s, tol=np.ma.masked_array(0.1, mask=True)),
    ):
        with pytest.raises(TypeError, match=r"is a NumPy masked array with 1 masked entry, whose mask"):
            call()
    shown = sinkhorn_assign(s, np.ma.masked_array(0.1, mask=False), tol=np.ma.masked_array(1e-3))
    assert torch.equal(shown.cluster_potentials, sinkhorn_assign(s, 0.1, tol=1e-3).cluster_potentials)


def test_masked_arrays_inside_a_list_are_refused_when_they_hide_entries():
    """A list of masked rows ([row for row in masked_scores]) went through np.asarray, which reads what the masks
    hide: the hidden scores were solved as if allowed. Masked arrays anywhere in a list or tuple (rows, nested lists,
    single masked values) are now refused as a masked array is, their hidden entries counted; rows that hide nothing
    are read as their values."""
    s = S.numpy()
    hides_two = np.ma.masked_array(s, mask=np.zeros(s.shape, dtype=bool))
    hides_two[0, 1] = hides_two[3, 2] = np.ma.masked
    for given in ([row for row in hides_two], tuple(hides_two), [[row[:2], row[2:]] for row in hides_two]):
        with pytest.raises(TypeError, match=r"scores given as a list holds NumPy masked arrays with 2 masked entries"):
            sinkhorn_assign(given, 0.1)
    nested = [[float(v) for v in row] for row in s]
    nested[5][3] = np.ma.masked
    with pytest.raises(TypeError, match=r"scores given as a list .* 1 masked entry, .*filled\(-np.inf\)"):
        sinkhorn_assign(nested, 0.1)
    with pytest.raises(TypeError, match=r"cluster_weights given as a list .* 1 masked entry"):
        sinkhorn_assign(s, 0.1, cluster_weights=[0.25, np.ma.masked, 0.25, 0.25])
    shown = [np.ma.masked_array(row, mask=False) for row in s]
    assert torch.equal(sinkhorn_assign(shown, 0.1).labels, sinkhorn_assign(s, 0.1).labels)


def test_an_integer_or_option_given_as_a_masked_array_is_refused_saying_so():
    """max_iter, over_relaxation, epsilon_scaling, memory_budget, n_iter and timeout given a NumPy masked array
    were refused with its repr, four lines ending "masked_array(data=--, mask=True, fill_value=999999, dtype=int64)"
    mid-sentence; the message now says it is a masked array and what it hides."""
    s = S.numpy()

    def hidden(value):
        return np.ma.masked_array(value, mask=True)

    for name, call in (
        ("max_iter", lambda: sinkhorn_assign(s, 0.1, max_iter=hidden(50))),
        ("over_relaxation", lambda: sinkhorn_assign(s, 0.1, over_relaxation=hidden(1.5))),
        ("epsilon_scaling", lambda: sinkhorn_assign(s, 0.1, epsilon_scaling=hidden(0.5))),
        ("memory_budget", lambda: sinkhorn_assign_stream(s, 0.1, memory_budget=hidden(2**20))),
        ("max_iter", lambda: sela_sinkhorn(s, max_iter=hidden(10))),
        ("max_iter", lambda: swav_sinkhorn(s, max_iter=hidden(3))),
        ("timeout", lambda: sinkhorn_assign_sharded(s, 0.1, timeout=hidden(3.0))),
    ):
        with pytest.raises(ValueError, match=rf"^{name} must .*got a NumPy masked array of shape \(\) with 1 masked "
                           r"entry \(pass a plain number\)") as info:  # fmt: skip
            call()
        assert "masked_array(" not in str(info.value) and "\n" not in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=r"got a NumPy masked array of shape \(\) that hides nothing"):
        sinkhorn_assign(s, 0.1, max_iter=np.ma.masked_array(50))


def test_a_view_with_its_negative_bit_set_is_read_as_its_values():
    """z.conj().imag is a real view whose negation is pending: NumPy, used in the checks, refused to read it
    ("Can't call numpy() on Tensor that has negative bit set")."""
    z = torch.complex(torch.zeros_like(S), -S)
    view = z.conj().imag  # == S, with the negative bit set
    assert view.is_neg() and torch.equal(view, S)
    assert torch.equal(sinkhorn_assign(view, 0.1).labels, sinkhorn_assign(S, 0.1).labels)


def test_epsilon_in_a_one_element_array_or_integer_tensor_is_taken_as_its_number():
    """A float tensor was taken, but np.array(0.1) and torch.tensor(1) were refused as "must be a positive float,
    got ndarray / Tensor"; several numbers are still refused, now saying their shape."""
    ref = sinkhorn_assign(S, 0.1).labels
    for eps in (np.array(0.1), np.array([0.1]), np.float32(0.1), torch.tensor([0.1])):
        assert torch.equal(sinkhorn_assign(S, eps).labels, ref), eps
    assert torch.equal(sinkhorn_assign(S, torch.tensor(1)).labels, sinkhorn_assign(S, 1.0).labels)
    for bad, says in ((torch.tensor([0.1, 0.2]), "Tensor of shape \\(2,\\)"), (np.ones(3), "ndarray of shape"),
                      (torch.tensor(True), "Tensor"), ("0.1", "got str")):  # fmt: skip
        with pytest.raises(TypeError, match=f"epsilon must be one positive number.*{says}"):
            sinkhorn_assign(S, bad)


TOL_DOORS = {
    "scores": lambda tol: sinkhorn_assign(S, 0.1, tol=tol, max_iter=500),
    "features": lambda tol: sinkhorn_assign(features=S, prototypes=torch.eye(4), epsilon=0.1, tol=tol, max_iter=500),
    "stream": lambda tol: sinkhorn_assign_stream(S.numpy(), 0.1, tol=tol, max_iter=500),
    "sharded": lambda tol: sinkhorn_assign_sharded(S, 0.1, tol=tol, max_iter=500),
    "sharded features": lambda tol: sinkhorn_assign_sharded(
        features=S, prototypes=torch.eye(4), epsilon=0.1, tol=tol, max_iter=500
    ),
}


@pytest.mark.parametrize("door", TOL_DOORS)
def test_tol_in_a_one_element_tensor_or_array_is_taken_as_its_number(door):
    """epsilon took a one-element tensor or array (a scheduled value) but tol refused one ("tol must be a positive
    number ... got tensor(0.001)"), in every entry point. Several numbers are still refused, saying their shape."""
    solve = TOL_DOORS[door]
    ref = solve(1e-3)
    for tol in (torch.tensor(1e-3, dtype=torch.float64), np.array(1e-3), torch.tensor([1e-3], dtype=torch.float64),
                np.array([[1e-3]])):  # fmt: skip
        res = solve(tol)
        assert torch.equal(res.labels, ref.labels) and res.n_iter == ref.n_iter, (door, tol)
        assert res.converged and res.marginal_error <= 1e-3
    for bad, error, says in ((torch.tensor([1e-3, 1e-4]), TypeError, "got Tensor of shape \\(2,\\)"),
                             (np.array(-1e-3), ValueError, "got -0.001"),
                             (torch.tensor(True), TypeError, "got Tensor of shape \\(\\) and dtype torch.bool"),
                             (np.array(1e-3 + 0j), TypeError, "got ndarray of shape \\(\\) and dtype complex128"),
                             ("1e-3", TypeError, "got str")):  # fmt: skip
        with pytest.raises(error, match=f"tol must be a positive number.*{says}"):
            solve(bad)


@pytest.mark.interpreter  # the features kernel on CPU tensors
def test_features_kernel_reads_a_negative_bit_view_and_refuses_sparse_features():
    """The Triton features path read the features' raw memory: a view with its negative bit set gave the labels of
    -Z, without an error; sparse features got torch's error. Both now go through the same opening as the scores."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(40, 8, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    view = torch.complex(torch.zeros_like(z), -z).conj().imag
    assert view.is_neg() and torch.equal(view, z)
    ref = sinkhorn_assign(features=z, prototypes=c, epsilon=0.1, backend="triton").labels
    flipped = sinkhorn_assign(features=-z, prototypes=c, epsilon=0.1, backend="triton").labels
    assert not torch.equal(ref, flipped)  # the mistake would show
    assert torch.equal(sinkhorn_assign(features=view, prototypes=c, epsilon=0.1, backend="triton").labels, ref)
    with pytest.raises(TypeError, match="features is a sparse_coo tensor"):
        sinkhorn_assign(features=z.to_sparse(), prototypes=c, epsilon=0.1, backend="triton")


def _fused_cases():
    """Scores for the one-read CPU validation (torch_backend.score_maxima, its size threshold lowered to 2^15 in the
    test), each with what breaks it."""
    n, k = 4000, 20
    base = random_problem(n, k, seed=41)
    cases = {"valid": base}

    def edit(name, fn, heads=False):
        s = (torch.stack([base, base.flip(0)]) if heads else base).clone()
        fn(s)
        cases[name] = s

    edit("+NaN", lambda s: s.__setitem__((1000, 3), float("nan")))
    edit("-NaN", lambda s: s.__setitem__((1000, 3), -float("nan")))
    edit("+inf", lambda s: s.__setitem__((77, 19), INF))
    edit("masked sample", lambda s: s.__setitem__((2000,), -INF))
    edit("masked sample, heads", lambda s: s.__setitem__((1, 2000), -INF), heads=True)
    edit("masked cluster", lambda s: s.__setitem__((slice(None), 5), -INF))
    edit("Hall", lambda s: s.__setitem__((slice(0, n // 2), slice(1, None)), -INF))  # half the samples, 1 cluster
    edit("huge", lambda s: s.__setitem__((9, 9), 1e30))
    edit("zeros", lambda s: (s.__setitem__((slice(None), 4), -s[:, 4].abs()), s.__setitem__((3, 4), 0.0),
                             s.__setitem__((4, 4), -0.0), s.__setitem__((5,), -0.0)))  # fmt: skip
    return cases


FUSED_CASES = _fused_cases()


@pytest.mark.skipif(not cpu_kernels.available(), reason="the one-read validation is a compiled loop: needs Numba")
@pytest.mark.parametrize("zero_weight", [False, True], ids=["weights", "a zero weight"])
@pytest.mark.parametrize("case", list(FUSED_CASES))
def test_one_read_validation_judges_as_torchs_reductions(case, zero_weight, monkeypatch):
    """The same verdict, message, extremes and column maxima (bitwise) with the one-read CPU path and without it."""
    from otlabel import problem
    from otlabel.backends import torch_backend

    scores = FUSED_CASES[case]
    s3 = scores if scores.ndim == 3 else scores[None]
    k = s3.shape[2]
    weights = torch.full((k,), 1.0 / k, dtype=torch.float64)
    if zero_weight:
        weights[-1] = 0.0
        weights /= weights.sum()
    seen = []
    original = problem.score_extremes

    def judge():
        seen.clear()
        try:
            col_max = problem.check_score_values(s3, weights, has_zero_weights=zero_weight, epsilon=0.05,
                                                 batched=scores.ndim == 3, sample_weights=torch.full((s3.shape[1],),
                                                 1.0 / s3.shape[1], dtype=torch.float64))  # fmt: skip
        except ValueError as e:
            return "raised", str(e), seen[:]
        return "passed", col_max.view(torch.int32), seen[:]

    monkeypatch.setattr(problem, "score_extremes", lambda *a: seen.append(original(*a)) or seen[-1])
    calls = []
    monkeypatch.setattr(torch_backend, "MAXIMA_MIN_SCORES", 1 << 15)
    fused = torch_backend.score_maxima
    monkeypatch.setattr(torch_backend, "score_maxima", lambda s: calls.append(1) or fused(s))
    fast = judge()
    assert calls and (case in ("+NaN", "-NaN") or fused(s3) is not None)  # the one-read path was taken
    monkeypatch.setattr(torch_backend, "score_maxima", lambda s: None)
    slow = judge()
    assert fast[0] == slow[0], (fast, slow)
    if fast[0] == "raised":
        assert fast[1] == slow[1]
    else:
        assert torch.equal(fast[1], slow[1])
    if case != "valid" and not (case == "zeros"):
        assert fast[0] == "raised", case
    assert [repr(e) for e in fast[2]] == [repr(e) for e in slow[2]]  # the zeros' signs too


def _under_a_file(tmp_path):
    (tmp_path / "file.txt").write_text("x")
    return str(tmp_path / "file.txt" / "labels.npy")


S12 = random_problem(12, 3, seed=41)
MASKED12 = S12.clone()
MASKED12[:11, 0] = -torch.inf  # cluster 0 needs 4 of the 12 samples; one may go there
RARE_ERRORS = {  # user errors no other test reached (a coverage run found them): each says what to do
    "bias with scores": (lambda tmp: sinkhorn_assign(S12, 0.5, bias=torch.zeros(3)), "with scores, add it to them"),
    "epsilon_scaling of 1.5": (lambda tmp: sinkhorn_assign(S12, 0.5, epsilon_scaling=1.5), r"a float in \(0, 1\)"),
    "1/epsilon beyond float32": (lambda tmp: sinkhorn_assign(torch.zeros(5, 3), 1e-40), "Pass float64 scores"),
    "batched scores to exact_plan": (lambda tmp: exact_plan(torch.randn(2, 6, 3)), "loop over heads yourself"),
    "unknown exact method": (lambda tmp: exact_plan(S12, method="simplex"), "'pot' or 'linprog'"),
    "exact_assign with no plan": (lambda tmp: exact_assign(MASKED12), r"clusters \[0\] need 0.333 of the mass"),
    "sela_sinkhorn tol of -1": (lambda tmp: sela_sinkhorn(S12.numpy(), tol=-1.0), "or None for exactly max_iter"),
    "labels_out on the meta device": (
        lambda tmp: sinkhorn_assign_stream(S12, 0.5, labels_out=torch.empty(12, dtype=torch.int64, device="meta")),
        "must be on the CPU",
    ),
    "labels_out under a file": (
        lambda tmp: sinkhorn_assign_stream(S12, 0.5, labels_out=_under_a_file(tmp)),
        r"labels_out: cannot write .*file\.txt' is a file, not a directory",
    ),
}


@pytest.mark.parametrize("case", list(RARE_ERRORS))
def test_rarely_reached_user_errors_say_what_to_do(case, tmp_path):
    call, words = RARE_ERRORS[case]
    with pytest.raises(ValueError, match=words):
        call(tmp_path)


def test_a_string_option_given_an_array_names_the_option():
    """backend=/method= given an array (or a tensor) raised NumPy's "truth value of an array ... is ambiguous" (torch's
    "Boolean value of Tensor ..."), naming no argument, on every entry point."""
    from otlabel import exact_plan, sinkhorn_assign_sharded, sinkhorn_assign_stream

    z, c, names = torch.randn(10, 3), torch.randn(4, 3), np.array([1, 2])
    calls = [
        (lambda: sinkhorn_assign(features=z, prototypes=c, backend=names), "backend must be one of"),
        (lambda: sinkhorn_assign_sharded(features=z, prototypes=c, backend=names), "backend must be one of"),
        (lambda: sinkhorn_assign_sharded(S, 0.1, backend=torch.ones(2)), "backend must be one of"),
        (lambda: sinkhorn_assign_stream(S, 0.1, backend=names), "backend must be 'auto' or 'torch' when streaming"),
        (lambda: sinkhorn_assign_stream(S, 0.1, acceleration=names), "acceleration must be one of"),
        (lambda: exact_plan(S, method=np.array([1, 2])), "method must be 'pot' or 'linprog'"),
    ]
    for call, words in calls:
        with pytest.raises(ValueError, match=words):
            call()


def test_an_integer_tensor_is_refused_in_the_same_helpful_words_on_every_door():
    """sinkhorn_assign's scores said how to convert an integer tensor; the same tensor streamed, and integer features,
    prototypes or bias on any door, were refused without a word on what to do ('must be a float16, ... tensor, got
    torch.int64.')."""
    from otlabel import sinkhorn_assign_stream

    scores, z, c = torch.arange(12).reshape(3, 4), torch.randn(3, 2), torch.randn(4, 2)
    calls = {
        "scores": lambda: sinkhorn_assign_stream(scores, 0.5),
        "features": lambda: sinkhorn_assign(features=z.long(), prototypes=c, epsilon=0.5),
        "prototypes": lambda: sinkhorn_assign_stream(features=z, prototypes=c.int(), epsilon=0.5),
        "bias": lambda: sinkhorn_assign(features=z, prototypes=c, bias=torch.arange(4), epsilon=0.5, backend="torch"),
    }
    for name, call in calls.items():
        with pytest.raises(TypeError, match=rf"{name} must be .*got torch.int(64|32)\. Convert with {name}\.float\(\)"):
            call()


def test_complex_inputs_are_told_to_pick_a_part_not_to_cast(tmp_path):
    """Complex scores, features and prototypes were told "Convert with scores.float()" (or x.astype(np.float32)),
    which keeps the real part alone with no more than a warning: a magnitude meant would be solved as the wrong
    scores. Every door now says to pass the real part or the magnitude, whichever is meant."""
    from otlabel import sinkhorn_assign_sharded, sinkhorn_assign_stream

    z = torch.complex(torch.randn(5, 3), torch.randn(5, 3))
    c = torch.randn(4, 3)
    calls = {
        "scores": [
            lambda: sinkhorn_assign(z, 0.5),
            lambda: sinkhorn_assign(z.numpy(), 0.5),
            lambda: sinkhorn_assign_stream(z, 0.5),
            lambda: sinkhorn_assign_sharded(z, 0.5),
        ],
        "features": [
            lambda: sinkhorn_assign(features=z, prototypes=c.to(z.dtype), epsilon=0.5),
            lambda: sinkhorn_assign_stream(features=z, prototypes=c, epsilon=0.5),
        ],
        "prototypes": [lambda: sinkhorn_assign(features=c, prototypes=z, epsilon=0.5, backend="torch")],
    }
    for name, doors in calls.items():
        for call in doors:
            with pytest.raises(TypeError, match=rf"got torch\.complex64\. Pass {name}\.real or {name}\.abs\(\)") as err:
                call()
            assert ".float() would keep the real part alone" in str(err.value)
    np.save(tmp_path / "complex.npy", z.numpy())
    # NumPy arrays streamed: in memory, and as a file (converted a block at a time)
    for given, says in (
        (z.numpy(), r"Pass x\.real or np\.abs\(x\)"),
        (str(tmp_path / "complex.npy"), r"\]\.real \(or np"),
    ):
        with pytest.raises(TypeError, match=rf"got dtype complex64\. .*{says}"):
            sinkhorn_assign_stream(given, 0.5)


def test_the_convergence_warning_speaks_of_masks_only_when_the_error_stopped_falling():
    """Every ConvergenceWarning carried two notes on masks (-inf left unchecked, finite fills), though the scores had
    none and the error was still falling (5 iterations at eps 0.01): noise on the commonest warning. They now come
    only when the error stopped falling, as a mask with no balanced plan makes it (tested above)."""
    s = random_problem(256, 10, seed=4)
    with pytest.warns(ConvergenceWarning) as caught:
        sinkhorn_assign(s, 0.01, max_iter=5)
    text = str(caught[0].message)
    assert "after 5 iterations" in text and "mask" not in text


def test_one_dimensional_integers_are_told_they_look_like_labels():
    """Labels passed for scores (a 1-d integer tensor) were told to convert with scores.float(), which led only to
    the shape error next. The shape is judged first, and integers are named as likely labels."""
    with pytest.raises(ValueError, match=r"got shape \(100,\)\. 100 integers look like labels: pass the \(N, K\)"):
        sinkhorn_assign(torch.randint(0, 10, (100,)), 0.05)
    with pytest.raises(ValueError, match=r"got shape \(100,\)\.$"):  # floats: no such guess
        sinkhorn_assign(torch.randn(100), 0.05)
    with pytest.raises(TypeError, match="floating-point"):  # (N, K) integers: the dtype, as before
        sinkhorn_assign(torch.randint(0, 10, (100, 10)), 0.05)


@pytest.mark.parametrize("kwargs", [
    dict(epsilon=0.003, epsilon_scaling=0.5),  # stages one after another: a saw-tooth, each stage falling
    dict(epsilon=0.01, acceleration="anderson"),  # 0.098 at the midpoint, then 0.068, 0.075, 0.14, 0.067
])  # fmt: skip
def test_the_mask_notes_judge_each_stage_and_the_best_errors(kwargs):
    """The notes on masks come where the error stopped falling. epsilon_scaling's errors were judged as one history,
    though each stage starts afresh: 0.029 0.0048 | 0.024 0.01 0.00079 | ... | 0.046, the last stage's first error,
    looked stalled (34 of 58 such warnings on unmasked random scores carried the notes); and Anderson's non-monotone
    errors were judged at one point, its midpoint, where a dip made a falling error look stalled. Each stage is now
    judged alone, on the best errors of each half. A mask with no balanced plan still gets the notes."""
    s = random_problem(256, 10, seed=0)
    with pytest.warns(ConvergenceWarning) as caught:
        sinkhorn_assign(s, max_iter=10, tol=1e-4, **kwargs)
    text = str(caught[0].message)
    assert "after 10 iterations" in text and "mask" not in text
    closed = random_problem(60, 6, seed=5)
    closed[5:, :2] = -1e9  # clusters 0 and 1 need 1/3 of the mass, samples 0-4 (1/12) may go there
    with pytest.warns(ConvergenceWarning, match="masks written as a large finite value"):
        sinkhorn_assign(closed, max_iter=10, tol=1e-4, **{**kwargs, "epsilon": 0.05})


@pytest.mark.parametrize("acceleration, max_iter", [("none", 10), ("none", 20), ("over-relaxation", 20)])
def test_the_mask_notes_are_not_given_for_a_slow_but_steady_fall(acceleration, max_iter):
    """Plain steps at a small epsilon: the error falls steadily but slowly (0.544, 0.428 at the midpoint, 0.283 after
    20 plain steps, faster in the second half), and "not halved over the second half" called it stopped: the notes on
    masks came with 97 of 282 such warnings on random and cosine scores. A stall is now a fall that levels off (under
    1.1x over the second half, and under 1.01x or half the first half's pace): a mask with no balanced plan still gets
    the notes on plain steps."""
    s = random_problem(256, 10, seed=4)
    with pytest.warns(ConvergenceWarning) as caught:
        res = sinkhorn_assign(s, 0.02, max_iter=max_iter, tol=1e-6, acceleration=acceleration)
    text = str(caught[0].message)
    assert f"after {max_iter} iterations" in text and "mask" not in text, text
    measured = res.errors[1:]  # (the cold step has none)
    assert all(later < earlier for earlier, later in zip(measured, measured[1:], strict=False))  # falling each step
    closed = random_problem(60, 6, seed=5)
    closed[5:, :2] = -1e9  # no balanced plan without those pairs (above)
    with pytest.warns(ConvergenceWarning, match="masks written as a large finite value"):
        sinkhorn_assign(closed, 0.05, max_iter=50, acceleration=acceleration)


def test_a_huge_score_is_named_by_the_span_error_not_a_cluster_below_it():
    """One score of 3e38 (cluster 0) put every other cluster far below the rest, and the span error named cluster 1
    by its own best score: "scores / epsilon reach 21.6 (cluster 1, head 0: its best score 2.16 ...): beyond 3e+03",
    a contradiction. A cluster is named only where its own best score is too large for epsilon."""
    s = random_problem(20, 4, seed=2)
    s[0, 0] = 3e38
    with pytest.raises(ValueError, match=r"reach 3e\+39 \(\|scores\| up to 3e\+38, epsilon 0\.1\)"):
        sinkhorn_assign(s, 0.1)
    s = random_problem(20, 4, seed=2)
    s[:, 2] = -1e9  # a weighted cluster closed by a finite fill is still named, with the note on masks
    with pytest.raises(ValueError, match=r"\(cluster 2, head 0: its best score -1e\+09.* stand for a mask"):
        sinkhorn_assign(s, 0.1)


def test_a_non_finite_warm_start_is_told_what_is_true_and_how_to_keep_it():
    """A -inf potential (a cluster solved with weight 0) given for a cluster of positive weight was told "init needs
    the same cluster_weights", which is not so (potentials warm-start other positive weights: below), and no longer
    the way to keep the warm start, a finite value for that cluster (e.g. the smallest finite potential), which
    check_init gave before check_potentials took its words; a NaN got the weight-0 story too. Now: -inf fits only
    weights that are 0 there, and the fix is given (and works); NaN gets neither."""
    s = random_problem(60, 4, seed=43)
    zero = sinkhorn_assign(s, 0.1, cluster_weights=[0.0, 0.3, 0.3, 0.4])
    other = sinkhorn_assign(s, 0.1, init=sinkhorn_assign(s, 0.1, cluster_weights=[0.1, 0.2, 0.3, 0.4]))
    assert other.converged  # a start solved with other (positive) weights is taken
    with pytest.raises(ValueError) as told:
        sinkhorn_assign(s, 0.1, init=zero)
    message = str(told.value)
    assert message.startswith("init holds -inf for cluster 0, whose weight is positive") and "same" not in message
    assert "init fits only cluster_weights that are 0 where it is -inf" in message, message
    assert "Set it to a finite value (e.g. the smallest finite potential), give a previous" in message, message
    b = zero.cluster_potentials.clone()
    b[0] = b[1:].min()  # as told
    assert sinkhorn_assign(s, 0.1, init=b).converged
    with pytest.raises(ValueError, match="^init holds NaN for cluster 1") as told:
        sinkhorn_assign(s, 0.1, init=torch.tensor([0.0, math.nan, 0.0, 0.0]))
    assert "-inf" not in str(told.value) and "weight 0" not in str(told.value), str(told.value)


def test_weights_of_the_other_length_name_the_other_marginal_too():
    """Cluster priors passed as sample_weights (or the reverse) on right (N, K) scores were told only 'are the scores
    transposed? ... pass scores.swapaxes(-1, -2)', which would make the call wrong in another way. The message now
    names the other marginal as well, in the API's and the command line's words."""
    scores = torch.randn(200, 10)
    with pytest.raises(ValueError, match=r"transposed\?.*Or, if these are the clusters' shares, pass them as "
                       r"cluster_weights\."):  # fmt: skip
        sinkhorn_assign(scores, 0.1, sample_weights=[0.1] * 10)
    with pytest.raises(ValueError, match=r"Or, if these are the samples' shares, pass them as sample_weights\."):
        sinkhorn_assign(scores, 0.1, cluster_weights=[1 / 200] * 200)
    from otlabel.problem import checked_host_weights

    with pytest.raises(ValueError, match=r"pass them as --cluster-weights\."):
        checked_host_weights(np.full(10, 0.1), 200, "--sample-weights", "number of samples N", (200, 10), "fix")


def test_integer_scores_given_as_a_list_get_a_fix_a_list_has():
    """A list of integers (or of integer tensors, one per head) was told 'Convert with scores.float() (a NumPy array:
    scores.astype(np.float32))': a list has neither method."""
    with pytest.raises(TypeError, match=r"got torch\.int64\. Convert the list with np\.asarray\(scores, "
                       r"dtype=np\.float32\), or write its numbers as floats\.$"):  # fmt: skip
        sinkhorn_assign([[1, 2], [3, 4]], 1.0)
    with pytest.raises(TypeError, match=r"got torch\.int64\. Convert each head: \[t\.float\(\) for t in scores\]\.$"):
        sinkhorn_assign([torch.ones(3, 2, dtype=torch.long)] * 2, 1.0)
    with pytest.raises(TypeError, match=r"Convert with scores\.float\(\) \(a NumPy array"):  # tensors: as before
        sinkhorn_assign(torch.ones(3, 2, dtype=torch.long), 1.0)


def test_weights_that_are_all_zero_are_not_told_to_divide_by_their_sum():
    """All-zero weights were told "Pass proportions, e.g. w / w.sum() for counts": 0 / 0, NaN weights. The message
    now says what is wrong with them."""
    scores = torch.randn(20, 4)
    for weights in (torch.zeros(4), np.zeros(4), [0.0] * 4):
        with pytest.raises(ValueError, match="every one of them is 0: give some a positive share") as caught:
            sinkhorn_assign(scores, 0.1, cluster_weights=weights)
        assert "w.sum()" not in str(caught.value)
    with pytest.raises(ValueError, match="sample_weights must sum to 1, but every one of them is 0"):
        sinkhorn_assign(scores, 0.1, sample_weights=torch.zeros(20))


def test_max_iter_held_in_a_tensor_is_told_to_pass_an_int():
    """epsilon and tol take one-element tensors (a schedule's values); an iteration count is a Python int, and the
    refusal of ``max_iter=torch.tensor(10)`` now says how to give it."""
    for held in (torch.tensor(10), np.array(10)):
        with pytest.raises(ValueError, match=r"max_iter must be an integer >= 1, got .*Pass a Python int: int\(max"):
            sinkhorn_assign(torch.randn(20, 4), 0.1, max_iter=held)
    with pytest.raises(ValueError, match=r"got 0\.$"):  # a plain int below 1: no such advice
        sinkhorn_assign(torch.randn(20, 4), 0.1, max_iter=0)
