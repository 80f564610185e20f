"""Every door to the solver, on problems drawn by hypothesis, against the float64 reference and each other.

The doors: ``sinkhorn_assign`` on float64/float32/float16/bfloat16 tensors and NumPy arrays (torch backend), the
Triton backend (its CPU interpreter here), ``sinkhorn_assign_stream`` from arrays, memory maps and ``.npy`` paths
in chunks of a few samples, ``sinkhorn_assign_sharded`` without a group, features mode (kernel, chunked, streamed,
reference), batched heads and the command line. What each result must satisfy, whatever the door:

* its codes are ``softmax(S / eps + b)`` of its own potentials ``b`` (float64 arithmetic here), and its labels the
  argmax of those logits wherever the top two are not within the door's rounding;
* ``converged`` is honest: the returned codes' cluster marginals are within ``tol`` (plus the float32 drift the
  README allows, ~4e-8 x |S| / eps, and its floor of about 1e-7 to 1e-6);
* it solves the reference's problem: codes close to the reference's, and labels equal wherever the reference's
  top-two margin exceeds twice the largest difference of the two sets of potentials (up to a constant), which is
  where they cannot differ;
* refusals agree: a problem one door refuses (infeasible mask, weights that do not sum to 1) every door refuses.

The draws are small (N <= 14, K <= 6: the Triton interpreter runs every kernel in Python) and the problems
well-scaled (|S| / eps <= 60; up to ~300 with the shifts), so the float32 doors are compared at tol 1e-5, the
float64 ones at 1e-9.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import assert_close
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from otlabel import sinkhorn_assign, sinkhorn_assign_sharded, sinkhorn_assign_stream
from otlabel.backends.triton import triton_installed
from otlabel.host_sources import BYTES_PER_ENTRY

# Hypothesis draws degenerate problems too (every row alike, a flat epsilon): their InputWarning is right and
# tested in test_input_warnings.py; here it is noise.
pytestmark = pytest.mark.filterwarnings("ignore::otlabel.InputWarning")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# The Triton doors: kernels on the GPU, or in the interpreter on CPU tensors (conftest sets it without a GPU).
TRITON = triton_installed() and (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
SETTINGS = dict(deadline=None, max_examples=15)
REF_TOL, TOL32, TOL64 = 1e-10, 1e-5, 1e-9
FLOAT32_FLOOR = 2e-6  # float32 sums over the samples: the measured error's floor (README, "Stopping")


@dataclass
class Drawn:
    scores: np.ndarray  # float64, (N, K) or (H, N, K); -inf masks
    eps: float
    r: np.ndarray | None  # cluster weights (K,), or None for uniform
    c: np.ndarray | None  # sample weights (N,), or None for uniform

    @property
    def n(self) -> int:
        return self.scores.shape[-2]

    @property
    def k(self) -> int:
        return self.scores.shape[-1]

    def weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(r, c) as float64 tensors, the defaults filled in."""
        r = torch.full((self.k,), 1 / self.k, dtype=torch.float64) if self.r is None else torch.from_numpy(self.r)
        c = torch.full((self.n,), 1 / self.n, dtype=torch.float64) if self.c is None else torch.from_numpy(self.c)
        return r, c

    def options(self) -> dict:
        return dict(cluster_weights=self.r, sample_weights=self.c)


def proportions(draw, size: int, zeros: bool) -> np.ndarray:
    w = np.array(draw(st.lists(st.floats(0.1, 1.0), min_size=size, max_size=size)))
    if zeros and size > 1 and draw(st.booleans()):
        w[draw(st.integers(0, size - 1))] = 0.0
    return w / w.sum()


@st.composite
def problems(draw, max_n=14, max_k=6, heads=False, masks=True, weights=True):
    """A drawn problem: scores in [-3, 3] (float64), eps from 0.1 to 0.5, optionally a sparse -inf mask (which may
    leave no balanced plan: the tests check that every door refuses it alike), cluster weights (one may be 0) and
    sample weights."""
    n, k = draw(st.integers(1, max_n)), draw(st.integers(1, max_k))
    shape = (draw(st.integers(2, 3)), n, k) if heads else (n, k)
    s = draw(arrays(np.float64, shape, elements=st.floats(-3, 3, allow_nan=False, allow_subnormal=False)))
    if masks and draw(st.booleans()):
        s = np.where(draw(arrays(np.bool_, shape, elements=st.sampled_from((False, False, False, True)))), -np.inf, s)
    r = proportions(draw, k, zeros=True) if weights and draw(st.booleans()) else None
    c = proportions(draw, n, zeros=False) if weights and draw(st.booleans()) else None
    return Drawn(s, draw(st.sampled_from((0.1, 0.2, 0.5))), r, c)


def reference(scores: np.ndarray, p: Drawn, **kw):
    """The float64 reference solve of ``scores`` (p's rounded to a door's dtype, or p's own), tightly converged."""
    return sinkhorn_assign(torch.from_numpy(np.asarray(scores, np.float64)), p.eps, backend="reference", tol=REF_TOL,
                           max_iter=20_000, warn=False, **p.options(), **kw)  # fmt: skip


def reference_or_refusal(p: Drawn):
    """The reference result, or the ValueError it raised (an infeasible mask)."""
    try:
        ref = reference(p.scores, p)
    except ValueError as err:
        return err
    assume(ref.converged)  # a rare degenerate draw too slow for 20,000 float64 iterations says nothing here
    return ref


def logits(scores: np.ndarray, eps: float, b: torch.Tensor) -> torch.Tensor:
    """``S / eps + b`` in float64, (..., N, K); ``b`` (..., K) may hold -inf (zero-weight clusters)."""
    return torch.from_numpy(np.asarray(scores, np.float64)) / eps + b.detach().cpu().double().unsqueeze(-2)


def top_two_margin(x: torch.Tensor) -> torch.Tensor:
    """Per row, the largest logit minus the second (inf for one cluster, or one finite logit)."""
    if x.shape[-1] == 1:
        return torch.full(x.shape[:-1], torch.inf, dtype=x.dtype)
    top = x.topk(2, dim=-1).values
    return torch.where(torch.isfinite(top[..., 1]), top[..., 0] - top[..., 1], torch.inf)


def potential_gap(b: torch.Tensor, b_ref: torch.Tensor) -> torch.Tensor:
    """Per head, the largest difference of two sets of potentials once the best constant is taken out (half the
    spread of ``b - b_ref`` over the finite entries): logits differ by at most this, so labels can differ only where
    a margin is within twice it."""
    d = b.detach().cpu().double() - b_ref.double()
    finite = torch.isfinite(d)
    hi = torch.where(finite, d, -torch.inf).amax(-1)
    lo = torch.where(finite, d, torch.inf).amin(-1)
    return torch.where(finite.any(-1), (hi - lo) / 2, 0.0)


def check_result(res, scores: np.ndarray, p: Drawn, tol: float, ref, door: str, codes_atol: float = 5e-4,
                 ref_scores: np.ndarray | None = None, shift: np.ndarray | None = None) -> None:  # fmt: skip
    """What every door's result must satisfy (module docstring). ``scores`` are the door's own (rounded) scores in
    float64; ``ref`` the reference solve of exactly those, or of ``ref_scores`` = ``scores - shift`` (a per-cluster
    ``shift``, which moves the potentials by ``-shift / eps``, and per-sample ones, which do not move them)."""
    fp64 = res.codes.dtype == torch.float64
    x = logits(scores, p.eps, res.cluster_potentials)
    codes = res.codes.detach().cpu().double()
    assert bool(torch.isfinite(codes).all()), f"{door}: codes not finite"
    # float32 forms S / eps + b with a rounding of ~6e-8 of its operands' size (README: ~4e-8 x |S| / eps)
    b_own = res.cluster_potentials.detach().cpu().double()
    b_finite = b_own.numpy()[np.isfinite(b_own.numpy())]
    size = float(np.abs(scores[np.isfinite(scores)]).max(initial=0.0)) / p.eps + float(np.abs(b_finite).max(initial=0))
    rounding = 1e-10 if fp64 else 1e-6 + 1e-7 * size
    assert_close(codes, torch.softmax(x, dim=-1), atol=rounding, what=f"{door}: codes vs own potentials")
    own_margin = top_two_margin(x)
    decided = own_margin > (1e-9 if fp64 else 1e-4) * (1 + x.abs().nan_to_num(posinf=0, neginf=0).amax(-1))
    argmax = x.argmax(-1)
    bad = decided & (res.labels.cpu() != argmax)
    assert not bool(bad.any()), f"{door}: labels are not the argmax of the door's own plan at {torch.nonzero(bad)[:4]}"
    r, c = p.weights()
    col_error = ((codes * c[:, None]).sum(-2) - r).abs().sum(-1).amax()  # the worst head
    span = float(np.abs(scores[np.isfinite(scores)]).max(initial=0.0)) / p.eps
    drift = 0.0 if fp64 else 1e-7 * span + FLOAT32_FLOOR
    if res.converged:
        assert res.marginal_error <= tol, f"{door}: converged with marginal_error {res.marginal_error} > tol {tol}"
        assert float(col_error) <= tol + drift, f"{door}: converged, but its codes' marginal error is {col_error:.3g}"
    assert_close(codes, ref.codes, atol=codes_atol, what=f"{door}: codes vs the reference")
    b = res.cluster_potentials.detach().cpu().double()
    if shift is not None:
        b = b + torch.from_numpy(shift) / p.eps
    gap = potential_gap(b, ref.cluster_potentials)
    ref_margin = top_two_margin(logits(scores if ref_scores is None else ref_scores, p.eps, ref.cluster_potentials))
    clear = ref_margin > 2 * gap.unsqueeze(-1) + 1e-3
    bad = clear & (res.labels.cpu() != ref.labels)
    assert not bool(bad.any()), f"{door}: labels differ from the reference at {torch.nonzero(bad)[:4]} (gap {gap})"


def budget_for(rows: int, p: Drawn) -> int:
    """A memory budget that streams ``rows`` samples a chunk."""
    heads = p.scores.shape[0] if p.scores.ndim == 3 else 1
    return BYTES_PER_ENTRY * rows * p.k * heads


def stream(data, p: Drawn, rows: int = 3, **kw):
    """``sinkhorn_assign_stream`` in chunks of ``rows`` samples (of ``p``'s scores, or of features with ``epsilon=``
    among ``kw``)."""
    kw.setdefault("epsilon", p.eps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # chunks of a few samples: a SmallChunksWarning, which is the point here
        return sinkhorn_assign_stream(data, memory_budget=budget_for(rows, p), **kw)


def dense_doors(p: Drawn, folder: str) -> dict:
    """name -> (solve(**options), tol, the scores that door solves, rounded to its dtype)."""
    s64, s32 = p.scores, p.scores.astype(np.float32)
    path = os.path.join(folder, "scores.npy")
    np.save(path, s32)
    common = dict(max_iter=20_000, warn=False, **p.options())
    doors = {
        "torch float64": (
            lambda **kw: sinkhorn_assign(torch.from_numpy(s64), p.eps, backend="torch", **kw),
            TOL64,
            s64,
        ),
        "torch float32": (
            lambda **kw: sinkhorn_assign(torch.from_numpy(s32), p.eps, backend="torch", **kw),
            TOL32,
            s32,
        ),
        "numpy float32": (lambda **kw: sinkhorn_assign(s32, p.eps, **kw), TOL32, s32),
        "stream float64": (lambda **kw: stream(s64, p, **kw), TOL64, s64),
        "stream memmap": (lambda **kw: stream(np.load(path, mmap_mode="r"), p, rows=1, **kw), TOL32, s32),
        "stream path": (lambda **kw: stream(path, p, rows=2, **kw), TOL32, s32),
        "sharded, no group": (lambda **kw: sinkhorn_assign_sharded(torch.from_numpy(s32), p.eps, **kw), TOL32, s32),
    }
    if TRITON:
        t32 = torch.from_numpy(s32).to(DEVICE)
        doors["triton float32"] = (lambda **kw: sinkhorn_assign(t32, p.eps, backend="triton", **kw), TOL32, s32)
    # Each door runs to its tol with the problem's weights, unless told otherwise.
    return {name: (lambda solve=solve, tol=tol, **kw: solve(**{**common, "tol": tol, **kw}), tol, s)
            for name, (solve, tol, s) in doors.items()}  # fmt: skip


ACCELERATIONS = ({}, {"acceleration": "none"}, {"acceleration": "over-relaxation"}, {"over_relaxation": 1.9})


# Found by HYPOTHESIS_PROFILE=explore: one sample 41 nats from its other scores, the rest all equal. Plain and
# over-relaxed steps converge sublinearly there (marginal error 3e-3 after 100 steps, 3e-4 after 1,000, 1.6e-5 plain
# and 8.4e-6 at omega 1.9 after 20,000), so no fixed number of them reaches 1e-9; Anderson mixing: 49 iterations.
SUBLINEAR = np.full((5, 5), -2.64118638)
SUBLINEAR[0, 0] = 1.5


@settings(**SETTINGS)
@given(problems(), st.sampled_from(ACCELERATIONS))
@example(Drawn(SUBLINEAR, 0.1, None, None), {"over_relaxation": 1.9})
@example(Drawn(SUBLINEAR, 0.1, None, None), {})
def test_every_dense_door_solves_the_references_problem(p, acceleration):
    """Every door, with every acceleration, converges to the reference's solution, and refuses what it refuses.
    Only the default (Anderson mixing) is held to converging: plain and over-relaxed steps may converge sublinearly
    (``SUBLINEAR``); where they converge on the first door, every door is held to converging to the reference."""
    ref = reference_or_refusal(p)
    refs = {}  # the reference on each door's rounded scores, by dtype
    with tempfile.TemporaryDirectory() as folder:
        for door, (solve, tol, s) in dense_doors(p, folder).items():
            if isinstance(ref, ValueError):  # every door refuses what the reference refuses
                with pytest.raises(ValueError, match="^infeasible"):
                    solve(**acceleration)
                continue
            res = solve(**acceleration)
            if acceleration and not res.converged and door == "torch float64":  # the first door
                return  # a slow problem for plain steps (SUBLINEAR), not a wrong answer: nothing to compare
            assert res.converged, f"{door} did not converge: {res.marginal_error:.3g}"
            if s.dtype not in refs:
                refs[s.dtype] = ref if s is p.scores else reference(s, p)
            check_result(res, s, p, tol, refs[s.dtype], door)


@settings(**SETTINGS)
@given(problems(), st.sampled_from(("float16", "bfloat16")))
def test_half_precision_doors_solve_their_rounded_scores(p, dtype):
    """fp16/bf16 scores are solved as given: each door's result is the reference's on the same rounded scores (the
    solver's arithmetic is float32 whatever the input's)."""
    half = torch.from_numpy(p.scores).to(getattr(torch, dtype))
    rounded = half.double().numpy()
    ref = reference_or_refusal(Drawn(rounded, p.eps, p.r, p.c))
    assume(not isinstance(ref, ValueError))  # refusals: test_every_dense_door_solves_the_references_problem
    common = dict(tol=TOL32, max_iter=20_000, warn=False, **p.options())
    doors = {"torch": lambda: sinkhorn_assign(half, p.eps, backend="torch", **common)}
    if dtype == "float16":  # NumPy has no bfloat16
        doors["stream numpy float16"] = lambda: stream(half.numpy(), p, **common)
    if TRITON:
        doors["triton"] = lambda: sinkhorn_assign(half.to(DEVICE), p.eps, backend="triton", **common)
    for door, solve in doors.items():
        res = solve()
        assert res.converged and res.codes.dtype == torch.float32, (door, res.converged, res.codes.dtype)
        check_result(res, rounded, p, TOL32, ref, f"{door} {dtype}")


@settings(**SETTINGS)
@given(problems(max_n=10, max_k=5, heads=True))
def test_batched_heads_are_independent_problems_on_every_door(p):
    """(H, N, K) scores are H problems iterated together: each head's result is its own problem's (the reference
    solved head by head), and a converged batch has every head's marginals within tol (README: the flag is the
    worst head's)."""
    try:
        refs = [reference(s, p) for s in p.scores.astype(np.float32)]
    except ValueError:  # an infeasible head: the batch is refused on every door
        refs = None
    assume(refs is None or all(ref.converged for ref in refs))
    with tempfile.TemporaryDirectory() as folder:
        doors = dense_doors(p, folder)
        del doors["torch float64"], doors["stream float64"]  # the float32 doors, against one float32 reference
        s32 = p.scores.astype(np.float32)
        doors["list of head tensors"] = (
            lambda: sinkhorn_assign(
                [torch.from_numpy(s) for s in s32], p.eps, tol=TOL32, max_iter=20_000, warn=False, **p.options()
            ),  # fmt: skip
            TOL32,
            s32,
        )
        for door, (solve, tol, s) in doors.items():
            if refs is None:
                with pytest.raises(ValueError, match="^infeasible"):
                    solve()
                continue
            res = solve()
            assert res.converged and res.labels.shape == p.scores.shape[:2], door
            for head, ref in enumerate(refs):
                one = SimpleNamespace(labels=res.labels[head], codes=res.codes[head], converged=res.converged,
                                      cluster_potentials=res.cluster_potentials[head],
                                      marginal_error=res.marginal_error)  # fmt: skip
                check_result(one, s[head], p, tol, ref, f"{door}, head {head}")


@st.composite
def feature_problems(draw):
    """Features (N, D), prototypes (K, D) or (H, K, D) and an optional bias (K,) or (H, K), entries in [-1, 1]."""
    n, k, d = draw(st.integers(1, 12)), draw(st.integers(1, 5)), draw(st.integers(1, 4))
    heads = draw(st.sampled_from((None, 2)))
    entries = st.floats(-1, 1, allow_nan=False, allow_subnormal=False)
    z = draw(arrays(np.float64, (n, d), elements=entries))
    protos = draw(arrays(np.float64, (k, d) if heads is None else (heads, k, d), elements=entries))
    bias_shape = draw(st.sampled_from((None, (k,), (k,) if heads is None else (heads, k))))
    bias = None if bias_shape is None else draw(arrays(np.float64, bias_shape, elements=entries))
    r = proportions(draw, k, zeros=False) if draw(st.booleans()) else None
    c = proportions(draw, n, zeros=False) if draw(st.booleans()) else None
    return z, protos, bias, Drawn(np.zeros((n, k)), draw(st.sampled_from((0.1, 0.2, 0.5))), r, c)


def dense(z: np.ndarray, protos: np.ndarray, bias) -> np.ndarray:
    """``Z Cᵀ + β`` in float64: (N, K), or (H, N, K) for (H, K, D) prototypes."""
    z, protos = z.astype(np.float64), protos.astype(np.float64)
    scores = z @ np.swapaxes(protos, -1, -2)
    if bias is None:
        return scores
    bias = bias.astype(np.float64)
    return scores + (bias[..., None, :] if bias.ndim == 2 else bias)


@settings(**SETTINGS)
@given(feature_problems())
def test_features_doors_agree_with_the_dense_reference(drawn):
    """features=Z, prototypes=C, bias=β on every route (the Triton kernel in exact fp32, the chunked CPU path from
    tensors and NumPy, streamed from a .npy in one-sample chunks, the reference) solve the dense problem
    S = Z Cᵀ + β: the float32 routes that of the inputs rounded to float32, the float64 ones that of the inputs."""
    z, protos, bias, p = drawn
    z32, c32 = z.astype(np.float32), protos.astype(np.float32)
    b32 = None if bias is None else bias.astype(np.float32)
    exact, rounded = Drawn(dense(z, protos, bias), p.eps, p.r, p.c), Drawn(dense(z32, c32, b32), p.eps, p.r, p.c)
    refs = {id(q): reference(q.scores, q) for q in (exact, rounded)}
    assume(all(ref.converged for ref in refs.values()))
    t = (lambda x: None if x is None else torch.from_numpy(x))  # fmt: skip
    common = dict(epsilon=p.eps, max_iter=20_000, warn=False, **p.options())
    with tempfile.TemporaryDirectory() as folder:
        path = os.path.join(folder, "features.npy")
        np.save(path, z32)
        doors = {
            "reference": (
                lambda: sinkhorn_assign(
                    features=z, prototypes=protos, bias=bias, backend="reference", tol=REF_TOL, **common
                ),
                REF_TOL,
                exact,
            ),  # fmt: skip
            "torch float64": (
                lambda: sinkhorn_assign(features=t(z), prototypes=t(protos), bias=t(bias), tol=TOL64, **common),
                TOL64,
                exact,
            ),  # fmt: skip
            "torch float32": (
                lambda: sinkhorn_assign(features=t(z32), prototypes=t(c32), bias=t(b32), tol=TOL32, **common),
                TOL32,
                rounded,
            ),  # fmt: skip
            "numpy float32": (
                lambda: sinkhorn_assign(features=z32, prototypes=c32, bias=b32, tol=TOL32, **common),
                TOL32,
                rounded,
            ),  # fmt: skip
            "stream path": (
                lambda: stream(None, rounded, features=path, prototypes=c32, bias=b32, rows=1, tol=TOL32, **common),
                TOL32,
                rounded,
            ),  # fmt: skip
        }
        if TRITON:
            doors["triton"] = (lambda: sinkhorn_assign(features=t(z32).to(DEVICE), prototypes=t(c32), bias=t(b32),
                                                       backend="triton", allow_tf32=False, tol=TOL32, **common),
                               TOL32, rounded)  # fmt: skip
        for door, (solve, tol, q) in doors.items():
            res = solve()
            assert res.converged, f"features {door} did not converge: {res.marginal_error:.3g}"
            check_result(res, q.scores, q, tol, refs[id(q)], f"features {door}")


@settings(**SETTINGS)
@given(problems(), st.integers(1, 6), st.sampled_from((None, 1.5)), st.randoms(use_true_random=False))
def test_fixed_iterations_are_the_same_iterates_on_every_door_and_under_permutations(p, iters, omega, rnd):
    """``tol=None`` runs exactly ``max_iter`` plain (or fixed over-relaxed) steps from the same cold start on every
    door, so the results agree to float32 rounding however far from converged, and permuting the samples and the
    clusters permutes them (SwAV's fixed 3 iterations must not depend on the door or the order of the batch)."""
    assume(not isinstance(reference_or_refusal(p), ValueError))
    ref = sinkhorn_assign(torch.from_numpy(p.scores.astype(np.float32).astype(np.float64)), p.eps, backend="reference",
                          tol=None, max_iter=iters, over_relaxation=omega, **p.options())  # fmt: skip
    rows, cols = np.array(rnd.sample(range(p.n), p.n)), np.array(rnd.sample(range(p.k), p.k))
    permuted = Drawn(p.scores[rows][:, cols], p.eps, None if p.r is None else p.r[cols],
                     None if p.c is None else p.c[rows])  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for q, expect in ((p, ref.codes), (permuted, ref.codes[rows][:, cols])):
            for door, (solve, _, _) in dense_doors(q, folder).items():
                res = solve(tol=None, max_iter=iters, over_relaxation=omega)
                assert res.n_iter == iters and not res.converged, door
                assert_close(res.codes.cpu(), expect, atol=2e-5, what=f"{door} after {iters} fixed iterations")
                same_error = res.marginal_error == ref.marginal_error  # inf after one iteration: none measured yet
                assert same_error or abs(res.marginal_error - ref.marginal_error) <= 2e-5, (door, res.marginal_error)


@settings(**SETTINGS)
@given(problems(), st.data())
def test_per_sample_and_per_cluster_shifts_change_nothing_on_any_door(p, data):
    """README: adding a constant per sample (logits vs log-probabilities) or per cluster changes nothing. Each door,
    given the shifted scores, returns the unshifted problem's codes and labels (its potentials move by -shift / eps)."""
    ref = reference_or_refusal(p)
    assume(not isinstance(ref, ValueError))
    row = np.array(data.draw(st.lists(st.floats(-20, 20), min_size=p.n, max_size=p.n)))
    col = np.array(data.draw(st.lists(st.floats(-5, 5), min_size=p.k, max_size=p.k)))
    shifted = Drawn(p.scores + row[:, None] + col, p.eps, p.r, p.c)
    with tempfile.TemporaryDirectory() as folder:
        for door, (solve, tol, s) in dense_doors(shifted, folder).items():
            res = solve()
            assert res.converged, door
            check_result(res, s, p, tol, ref, f"{door}, shifted", ref_scores=p.scores, shift=col)


@settings(**SETTINGS)
@given(problems(masks=False), st.floats(-5e-5, 5e-5), st.sampled_from(("cluster", "sample")))
def test_weights_within_the_rounding_allowance_are_rescaled_alike_on_every_door(p, error, which):
    """README: weights whose sum is within 1e-4 of 1 are rescaled to exactly 1, on every door: the result is that of
    the rescaled weights (cluster marginals within tol of them, not of the weights as given)."""
    assume((p.r if which == "cluster" else p.c) is not None)
    ref = reference(p.scores, p)
    assume(ref.converged)
    off = Drawn(p.scores, p.eps, p.r * (1 + error) if which == "cluster" else p.r,
                p.c * (1 + error) if which == "sample" else p.c)  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for door, (solve, tol, s) in dense_doors(off, folder).items():
            res = solve()
            assert res.converged, door
            check_result(
                res, s, p, tol, ref if s is p.scores else reference(s, p), f"{door}, weights x (1 + {error:g})"
            )


@settings(**SETTINGS)
@given(problems(masks=False), st.sampled_from((0.5, 0.999, 1.001, 2.0)), st.sampled_from(("cluster", "sample")))
def test_weights_that_do_not_sum_to_one_are_refused_by_every_door(p, factor, which):
    """Counts or unnormalised weights are a mistake the user must hear of, on every door alike, in words that say what
    to pass instead (the API does not normalise them: README, "Bad input")."""
    k_or_n = p.k if which == "cluster" else p.n
    w = np.full(k_or_n, factor / k_or_n)
    off = Drawn(p.scores, p.eps, w if which == "cluster" else p.r, w if which == "sample" else p.c)
    z = np.eye(p.n, 2)
    with tempfile.TemporaryDirectory() as folder:
        doors = {door: solve for door, (solve, _, _) in dense_doors(off, folder).items()}
        doors["features"] = lambda: sinkhorn_assign(features=z, prototypes=np.ones((p.k, 2)), epsilon=p.eps,
                                                    **off.options())  # fmt: skip
        doors["features stream"] = lambda: stream(None, off, features=z, prototypes=np.ones((p.k, 2)), **off.options())
        for solve in doors.values():
            with pytest.raises(ValueError, match=rf"{which}_weights must sum to 1.*got a sum of .*w / w\.sum\(\)"):
                solve()


@settings(**SETTINGS)
@given(problems(), st.sampled_from(("result", "tensor", "numpy float64", "numpy float32", "shifted tensor")))
def test_a_converged_warm_start_from_any_door_is_converged_on_every_door(p, form):
    """``init=`` a solution (the result, its potentials as a tensor or a NumPy array saved between runs, shifted by a
    constant) starts every door at the solution: converged at its first measurement, with the same answer."""
    ref = reference_or_refusal(p)
    assume(not isinstance(ref, ValueError))
    b = ref.cluster_potentials
    init = {"result": ref, "tensor": b, "numpy float64": b.numpy(), "numpy float32": b.numpy().astype(np.float32),
            "shifted tensor": b + 1e3}[form]  # fmt: skip
    with tempfile.TemporaryDirectory() as folder:
        for door, (solve, tol, s) in dense_doors(p, folder).items():
            res = solve(init=init)
            if form != "numpy float32" or tol == TOL32:  # float32 potentials are no float64 solution to 1e-9
                assert res.converged and res.n_iter == 1, (door, res.n_iter, res.marginal_error)
            check_result(res, s, p, tol, ref if s is p.scores else reference(s, p), f"{door}, init={form}")


def test_the_command_line_solves_what_the_api_solves(tmp_path):
    """``otlabel assign`` (one subprocess: a torch import each) on float16 scores of two heads, with a -inf mask and a
    cluster weights file: labels and codes are the reference's on the rounded scores, as the API's streamed door
    gives them."""
    g = np.random.default_rng(5)
    scores = g.uniform(-1, 1, (2, 30, 4)).astype(np.float16)
    scores[0, 3, 1] = scores[1, 7, 2] = -np.inf
    r = np.array([0.1, 0.2, 0.3, 0.4], np.float32)
    np.save(tmp_path / "scores.npy", scores)
    np.save(tmp_path / "r.npy", r)
    out, codes_out = tmp_path / "labels.npy", tmp_path / "codes.npy"
    args = ["assign", tmp_path / "scores.npy", "--out", out, "--codes-out", codes_out, "--epsilon", "0.1",
            "--tol", "1e-6", "--max-iter", "5000", "--cluster-weights", tmp_path / "r.npy", "--device", "cpu",
            "--strict", "-q"]  # fmt: skip
    command = [sys.executable, "-m", "otlabel", *map(str, args)]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr  # --strict: 0 only if converged
    p = Drawn(scores.astype(np.float64), 0.1, r.astype(np.float64), None)
    api = sinkhorn_assign_stream(scores, 0.1, tol=1e-6, cluster_weights=r)
    labels, codes = torch.from_numpy(np.load(out)), torch.from_numpy(np.load(codes_out))
    assert torch.equal(labels, api.labels) and codes.dtype == torch.float32
    assert_close(codes, api.codes, atol=1e-5, what="command-line codes vs the API's")
    for head in range(2):
        ref = reference(p.scores[head], p)
        one = SimpleNamespace(labels=labels[head], codes=codes[head], converged=True, marginal_error=0.0,
                              cluster_potentials=api.cluster_potentials[head])  # fmt: skip
        check_result(one, p.scores[head], p, 1e-6, ref, f"otlabel assign, head {head}")
