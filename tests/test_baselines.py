"""The SwAV- and SeLa-style baselines against sinkhorn_assign: parity where they work, and where they break."""

import warnings
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import assert_close, clustered_cosine_scores, cosine_scores, random_problem

from otlabel import sela_sinkhorn, sinkhorn_assign, swav_sinkhorn


@pytest.mark.parametrize("n_iter", [1, 3, 10])
def test_swav_baseline_equals_fixed_iteration_sinkhorn(n_iter):
    """Iteration for iteration: the cold start is SwAV's first row normalisation."""
    s = cosine_scores(256, 30, seed=30)
    ours = sinkhorn_assign(s, 0.05, max_iter=n_iter, tol=None)
    assert ours.n_iter == n_iter
    assert_close(ours.codes, swav_sinkhorn(s, 0.05, n_iter), atol=1e-5, what="codes vs SwAV baseline")


@pytest.mark.parametrize(
    "scores, eps",
    [
        (clustered_cosine_scores(256, 30, seed=31), 0.01),  # cosines near 1: e^(1 / 0.01) overflows float32
        (random_problem(256, 30, seed=32) * 3, 0.05),  # fp32 logits of magnitude ~10: e^200
        (cosine_scores(256, 30, seed=33).half(), 0.05),  # fp16 input: e^(1 / 0.05) is beyond fp16's 65504
    ],
)
def test_swav_baseline_breaks_where_sinkhorn_assign_does_not(scores, eps):
    with torch.no_grad(), np.errstate(all="ignore"):
        q = swav_sinkhorn(scores, eps, 3)
    assert not bool(torch.isfinite(q).all()), "the linear-domain baseline was expected to overflow here"
    ours = sinkhorn_assign(scores, eps, max_iter=3, tol=None)
    reference = sinkhorn_assign(scores.double(), eps, max_iter=3, tol=None, backend="reference")
    assert torch.isfinite(ours.codes).all()
    assert_close(ours.codes, reference.codes, atol=1e-4, what="codes where SwAV overflows")
    converged = sinkhorn_assign(scores, eps, tol=1e-4, max_iter=10_000)
    assert converged.converged
    sizes = torch.bincount(converged.labels, minlength=30)
    assert int(sizes.max()) <= 2 * 256 // 30 + 2


def test_sela_baseline_equals_sinkhorn_assign_at_lambda():
    logits = random_problem(200, 8, seed=34, dtype=torch.float64)
    lam = 10.0
    plan = sela_sinkhorn(logits, lam=lam, max_iter=5000, tol=1e-12)
    ours = sinkhorn_assign(logits, 1 / lam, tol=1e-10, max_iter=50_000, backend="reference")
    assert_close(plan, ours.codes, atol=1e-6, what="SeLa P^lambda plan vs codes")


def test_sela_baseline_takes_a_model_output():
    """Logits that require grad (a head's output) raised 'Can't call numpy() on Tensor that requires grad'."""
    logits = random_problem(50, 4, seed=35, dtype=torch.float64).requires_grad_()
    np.testing.assert_array_equal(sela_sinkhorn(logits, lam=5.0), sela_sinkhorn(logits.detach().numpy(), lam=5.0))


def published_sela(logits: np.ndarray, lam: float) -> np.ndarray:
    """SeLa's ``cpu_sk`` loop as its public code has it (K x N layout, the error read on every 10th iteration)."""
    n, k = logits.shape
    ps = np.exp(logits - logits.max(1, keepdims=True))
    ps = (ps / ps.sum(1, keepdims=True)).T ** lam  # (K, N)
    r, c = np.ones((k, 1)) / k, np.ones((n, 1)) / n
    err, counter = 1e6, 0
    while err > 1e-1:
        r = (1 / k) / (ps @ c)
        c_new = (1 / n) / (r.T @ ps).T
        if counter % 10 == 0:
            err = np.nansum(np.abs(c / c_new - 1))
        c = c_new
        counter += 1
    return (ps * c.T * r).T * n


@pytest.mark.parametrize("lam", [2.0, 5.0, 10.0])
def test_sela_baseline_follows_the_published_stopping_rule(lam):
    """SeLa reads its error on the 1st, 11th, 21st, ... iteration: the baseline read it on every one and stopped
    earlier (here after 6, 19 and 40 iterations where SeLa runs 11, 21 and 41)."""
    logits = random_problem(300, 10, seed=36, dtype=torch.float64).numpy()
    np.testing.assert_allclose(sela_sinkhorn(logits, lam=lam), published_sela(logits, lam), rtol=1e-12, atol=0)


def _with_nan(n, k):
    s = random_problem(n, k, seed=37)
    s[2, 1] = float("nan")
    return s


def _quantized():
    with warnings.catch_warnings():  # torch deprecates quantized tensors (2.10 and later), and warns at their creation
        warnings.simplefilter("ignore", UserWarning)
        return torch.quantize_per_tensor(random_problem(10, 4), 0.1, 0, torch.qint8)


BAD_BASELINE_INPUTS = [
    # (what, call, exception, words the message must contain): each was a silent NaN result or a raw traceback
    ("swav NaN score", lambda: swav_sinkhorn(_with_nan(10, 4), 0.05, 3), ValueError, ["NaN", "(2, 1)"]),
    ("swav +inf score", lambda: swav_sinkhorn(torch.tensor([[0.0, float("inf")], [0, 0]]), 0.05, 3), ValueError,
     ["+inf", "-inf is allowed"]),
    ("swav epsilon 0", lambda: swav_sinkhorn(random_problem(10, 4), 0.0, 3), ValueError, ["epsilon", "> 0"]),
    ("swav epsilon < 0", lambda: swav_sinkhorn(random_problem(10, 4), -0.05, 3), ValueError, ["epsilon", "> 0"]),
    ("swav max_iter < 0", lambda: swav_sinkhorn(random_problem(10, 4), 0.05, -1), ValueError, ["max_iter", ">= 0"]),
    ("swav max_iter float", lambda: swav_sinkhorn(random_problem(10, 4), 0.05, 2.5), ValueError, ["max_iter", "2.5"]),
    ("swav 1-d", lambda: swav_sinkhorn(torch.randn(4), 0.05, 3), ValueError, ["(N, K)", "(4,)"]),
    ("swav heads", lambda: swav_sinkhorn(torch.randn(2, 10, 4), 0.05, 3), ValueError, ["one (N, K) problem"]),
    ("sela NaN logit", lambda: sela_sinkhorn(_with_nan(10, 4)), ValueError, ["NaN", "(2, 1)"]),
    ("sela masked sample", lambda: sela_sinkhorn(torch.tensor([[0.0, 1.0], [-float("inf")] * 2])), ValueError,
     ["infeasible mask: sample 1"]),
    # a sample or a cluster with every score -inf: 0 / 0 in the loops, NaN codes returned silently
    ("swav masked sample", lambda: swav_sinkhorn(torch.tensor([[0.0, 1.0], [-float("inf")] * 2]), 0.05, 3), ValueError,
     ["infeasible mask: sample 1", "Allow at least one cluster"]),
    ("swav masked cluster", lambda: swav_sinkhorn(torch.tensor([[0.0, -float("inf")], [1.0, -float("inf")]]), 0.05, 3),
     ValueError, ["infeasible mask: cluster 1", "Allow at least one sample"]),
    ("sela masked cluster", lambda: sela_sinkhorn(torch.tensor([[0.0, -float("inf")], [1.0, -float("inf")]])),
     ValueError, ["infeasible mask: cluster 1", "Allow at least one sample"]),
    ("sela lam 0", lambda: sela_sinkhorn(random_problem(10, 4), lam=0), ValueError, ["lam", "> 0"]),
    ("sela lam < 0", lambda: sela_sinkhorn(random_problem(10, 4), lam=-5.0), ValueError, ["lam", "> 0"]),
    # Python's OverflowError from math.isfinite, naming no argument
    ("sela lam an int beyond float", lambda: sela_sinkhorn(random_problem(10, 4), lam=10**400), ValueError, ["lam"]),
    ("sela 1-d", lambda: sela_sinkhorn(np.zeros(4)), ValueError, ["(N, K)", "(4,)"]),
    ("sela empty", lambda: sela_sinkhorn(np.zeros((0, 4))), ValueError, ["empty"]),
    # torch's "Creation of quantized tensor requires quantized dtype like torch.quint8", from a cast to float
    ("swav quantized", lambda: swav_sinkhorn(_quantized(), 0.05, 3), TypeError,
     ["scores must be a floating-point tensor", "got torch.qint8", "Convert with scores.dequantize()"]),
    ("sela quantized", lambda: sela_sinkhorn(_quantized()), TypeError, ["got torch.qint8", "logits.dequantize()"]),
]  # fmt: skip


@pytest.mark.parametrize("what, call, error, words", BAD_BASELINE_INPUTS, ids=[b[0] for b in BAD_BASELINE_INPUTS])
def test_baselines_refuse_bad_input(what, call, error, words):
    with pytest.raises(error) as info:
        call()
    for word in words:
        assert word in str(info.value), f"{what}: message {str(info.value)!r} lacks {word!r}"


def test_sela_baseline_takes_lam_as_any_real_number():
    # a Fraction passed the check, then failed in NumPy's power ("Cannot cast ufunc 'power' output from dtype('O')")
    logits = random_problem(30, 4, seed=39, dtype=torch.float64).numpy()
    want = sela_sinkhorn(logits, lam=10.0)
    for lam in (Fraction(10), np.float32(10), np.int64(10), 10):
        np.testing.assert_array_equal(sela_sinkhorn(logits, lam=lam), want, err_msg=repr(lam))


def test_sela_baseline_takes_tol_and_lam_as_sinkhorn_assign_takes_tol_and_epsilon():
    """A number held in a one-element tensor or array (a scheduled value), which sinkhorn_assign takes for tol and
    epsilon: sela_sinkhorn refused it for tol and for lam (1 / epsilon), "must be a positive number"."""
    logits = random_problem(30, 4, seed=40, dtype=torch.float64).numpy()
    want = sela_sinkhorn(logits, lam=10.0, tol=0.1)
    for held in (np.array, torch.tensor, lambda x: torch.tensor([x]), lambda x: np.array([[x]])):
        sinkhorn_assign(logits, epsilon=held(0.1), tol=held(0.1))  # taken by the main entry point
        np.testing.assert_array_equal(sela_sinkhorn(logits, lam=held(10.0), tol=held(0.1)), want, err_msg=repr(held))
    for bad in (dict(tol=torch.tensor(True)), dict(tol=np.zeros(2)), dict(lam=torch.tensor([1j]))):
        with pytest.raises(TypeError, match=r"(tol|lam) must be .* \(a float, or a one-element tensor or array\)"):
            sela_sinkhorn(logits, **bad)
    with pytest.raises(ValueError, match="tol must be a positive number"):
        sela_sinkhorn(logits, tol=np.array(0.0))


def test_sela_baseline_calls_its_argument_logits_in_its_messages():
    """sela_sinkhorn(logits) borrowed sinkhorn_assign's checks, whose messages named an argument it does not have:
    "scores contain NaN", "scores is a NumPy masked array", "loop over the heads yourself (scores[h])", "every score
    -inf". They name logits now; swav_sinkhorn's, whose argument is scores, are unchanged."""
    nan = np.zeros((3, 2))
    nan[1, 0] = np.nan
    hidden = np.ma.masked_array(np.zeros((3, 2)), mask=[[True, False], [False, False], [False, False]])
    for logits, error, words in (
        (nan, ValueError, "logits contain NaN (first at index (1, 0) of the (N, K) logits)"),
        (hidden, TypeError, "logits is a NumPy masked array with 1 masked entry"),
        (np.zeros(4), ValueError, "logits must have shape (N, K)"),
        (np.zeros((0, 4)), ValueError, "logits is empty"),
        (np.zeros((2, 3, 4)), ValueError, "loop over the heads yourself (logits[h])"),
        (np.array([[0.0, 1.0], [-np.inf, -np.inf]]), ValueError, "sample 1 has every logit -inf"),
        (np.zeros((2, 2), dtype=np.complex128), TypeError, "logits must be a floating-point tensor"),
        ("logits.npy", TypeError, "logits must be a torch.Tensor"),
    ):
        with pytest.raises(error) as info:
            sela_sinkhorn(logits)
        assert words in str(info.value) and "scores" not in str(info.value), str(info.value)
    with pytest.raises(ValueError, match=r"^scores contain NaN .* of the \(N, K\) scores\)"):
        swav_sinkhorn(nan)


def test_baselines_take_integer_scores_as_before_their_checks():
    """Integer logits were taken (SeLa's np.asarray(logits, np.float64), SwAV's division by epsilon); the checks,
    borrowed from sinkhorn_assign, refused them ("scores must be a floating-point tensor")."""
    ints = np.array([[3, 0, 1], [0, 2, 0], [1, 1, 4], [2, 0, 0]])
    np.testing.assert_array_equal(sela_sinkhorn(ints, lam=2.0), sela_sinkhorn(ints.astype(np.float64), lam=2.0))
    np.testing.assert_array_equal(sela_sinkhorn(ints.tolist(), lam=2.0), sela_sinkhorn(ints * 1.0, lam=2.0))
    got = swav_sinkhorn(torch.from_numpy(ints), 0.5, 3)
    assert got.dtype == torch.float32
    assert torch.equal(got, swav_sinkhorn(torch.from_numpy(ints).float(), 0.5, 3))


def test_swav_baseline_takes_numpy_scores_and_still_overflows_as_published():
    s = cosine_scores(64, 8, seed=38)
    np.testing.assert_array_equal(swav_sinkhorn(s.numpy(), 0.05, 3).numpy(), swav_sinkhorn(s, 0.05, 3).numpy())
    with np.errstate(all="ignore"):  # the linear-domain overflow is the baseline's known failure, not an input error
        assert not bool(torch.isfinite(swav_sinkhorn(s.half(), 0.05, 3)).all())


def test_swav_baseline_underflows_where_sinkhorn_assign_does_not():
    """The README's parity claim holds where SwAV's loop neither overflows nor underflows. A sample whose scores all
    lie ~100 eps below the batch's best (-1.5 to -2.1 against 3.6, eps 0.05): its entries of exp(S / eps), divided
    by their sum over the batch, fall below float32's smallest number, and its codes come out 0 or off by 0.4 from
    the float64 reference, with no inf or NaN to show for it; the log domain stays within 1e-5."""
    s = random_problem(1000, 10, seed=0)
    s[0] = torch.tensor([-1.88, -1.97, -1.61, -1.88, -1.69, -2.09, -2.03, -2.08, -1.47, -1.95])
    assert float(s.max() - s[0].max()) / 0.05 > 100
    reference = sinkhorn_assign(s.double(), 0.05, max_iter=3, tol=None, backend="reference").codes
    swav = swav_sinkhorn(s, 0.05, 3)
    assert torch.isfinite(swav).all() and int((swav[0] == 0).sum()) >= 5
    assert float((swav[0].double() - reference[0]).abs().max()) > 0.1
    assert_close(sinkhorn_assign(s, 0.05, max_iter=3, tol=None).codes.double(), reference, atol=1e-5, what="codes")


def test_baselines_return_tensors_and_take_max_iter_as_sinkhorn_assign_does():
    """sela_sinkhorn returned a NumPy array for a tensor (swav_sinkhorn, like sinkhorn_assign, a tensor), and both
    called their iteration budget n_iter, the name a result gives the iterations that ran (sela's is a cap: n_iter=100
    stopped after 11). Both take max_iter now, as sinkhorn_assign does; n_iter= still works, with a FutureWarning."""
    logits = random_problem(40, 5, seed=41, dtype=torch.float64)
    for given in (logits, logits.numpy(), logits.tolist()):
        plan = sela_sinkhorn(given, lam=5.0)
        assert isinstance(plan, torch.Tensor) and plan.dtype == torch.float64 and plan.device.type == "cpu"
    assert torch.equal(sela_sinkhorn(logits, 5.0, 7, None), sela_sinkhorn(logits, lam=5.0, max_iter=7, tol=None))
    for call, new in (
        (lambda **kw: sela_sinkhorn(logits, lam=5.0, tol=None, **kw), lambda: sela_sinkhorn(logits, 5.0, 7, None)),
        (lambda **kw: swav_sinkhorn(logits, 0.5, **kw), lambda: swav_sinkhorn(logits, 0.5, 7)),
    ):
        with pytest.warns(FutureWarning, match=r"\(n_iter=\.\.\.\) is now max_iter=\.\.\.") as caught:
            old = call(n_iter=7)
        assert caught[0].filename == __file__, caught[0].filename  # at the caller's line
        assert torch.equal(old, new())
        with pytest.raises(TypeError, match="got both max_iter and n_iter"):
            call(n_iter=7, max_iter=8)


def test_n_iter_with_max_iter_at_its_default_is_refused_and_a_bad_n_iter_is_named():
    """Telling max_iter's default from an explicit value by `is` took max_iter=3 (swav) or 100 (sela) passed with
    n_iter= as not passed (CPython shares small ints), so the n_iter value won silently where "both" is a TypeError;
    and a bad n_iter=-1 was reported as "max_iter must be ... got -1", an argument the caller did not pass."""
    logits = random_problem(20, 4, seed=42, dtype=torch.float64)
    for call in (lambda **kw: swav_sinkhorn(logits, 0.5, **kw), lambda **kw: sela_sinkhorn(logits, 5.0, **kw)):
        for default in (3, 100):
            with pytest.raises(TypeError, match="got both max_iter and n_iter"):
                call(max_iter=default, n_iter=7)
        with pytest.warns(FutureWarning), pytest.raises(ValueError, match=r"^n_iter must be an integer >= 0 .* -1\."):
            call(n_iter=-1)
    assert torch.equal(swav_sinkhorn(logits, 0.5), swav_sinkhorn(logits, 0.5, 3))  # the defaults are still 3 and 100
    assert torch.equal(sela_sinkhorn(logits, 5.0, tol=None), sela_sinkhorn(logits, 5.0, 100, None))
