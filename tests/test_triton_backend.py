"""sinkhorn_assign end to end through the Triton backend (its CPU interpreter here; real kernels on a GPU)."""

import pytest
import torch
from helpers import assert_close, centred, clustered_cosine_scores, offset_scores, random_problem

from otlabel import sinkhorn_assign
from otlabel.backends import resolve_backend
from otlabel.problem import MAX_SCORE_SPAN_FP32, validate

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize(
    "dtype, atol",
    [(torch.float32, 1e-5), (torch.float16, 1e-4), (torch.bfloat16, 1e-4)],
)
def test_triton_solve_matches_torch_and_reference(dtype, atol):
    s = clustered_cosine_scores(150, 7, seed=50).to(dtype)  # N, K not multiples of any tile
    s[3, 2] = float("-inf")
    r = torch.tensor([0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1], dtype=torch.float64)
    kw = dict(cluster_weights=r, tol=1e-5, max_iter=2000)
    tri = sinkhorn_assign(s.to(DEVICE), 0.05, backend="triton", **kw)
    tor = sinkhorn_assign(s, 0.05, backend="torch", **kw)
    ref = sinkhorn_assign(s.double(), 0.05, backend="reference", tol=1e-9, max_iter=20_000, cluster_weights=r)
    assert tri.converged and tri.labels.device.type == DEVICE
    assert torch.equal(tri.labels.cpu(), tor.labels)
    assert torch.equal(tri.labels.cpu(), ref.labels)
    assert_close(tri.codes.cpu(), ref.codes, atol=atol * 10, what="triton codes vs reference")
    assert_close(centred(tri.cluster_potentials.cpu()), centred(ref.cluster_potentials), atol=1e-3, what="potentials")
    assert abs(float(tri.objective) - float(ref.objective)) < 1e-4


def test_triton_fixed_iterations_batched_heads():
    s = random_problem(40, 5, h=3, seed=51)
    tri = sinkhorn_assign(s.to(DEVICE), 0.1, backend="triton", max_iter=4, tol=None)
    ref = sinkhorn_assign(s.double(), 0.1, backend="reference", max_iter=4, tol=None)
    assert tri.n_iter == 4 and tri.codes.shape == (3, 40, 5)
    assert_close(tri.codes.cpu(), ref.codes, atol=1e-5, what="batched fixed-iteration codes")


def test_auto_keeps_cpu_tensors_on_torch_and_float64_off_triton():
    assert resolve_backend("auto", validate(torch.randn(4, 3), 0.1)) == "torch"
    if torch.cuda.is_available():
        assert resolve_backend("auto", validate(torch.randn(4, 3, device="cuda"), 0.1)) == "triton"
        assert resolve_backend("auto", validate(torch.randn(4, 3, device="cuda").double(), 0.1)) == "torch"


@pytest.mark.parametrize("kind", ["common", "per sample", "per cluster"])
def test_triton_solve_at_the_float32_score_limit_converges_with_faithful_codes(kind):
    """The kernels form S / eps + b in float32 as the torch passes do: up to |S| / eps = MAX_SCORE_SPAN_FP32 they
    converge, and the codes' marginal error is the reported one to within 20% of tol (at 1e4 a 200 x 20 solve
    stalled at 2.6e-4 and never converged)."""
    s = offset_scores(kind, 0.95 * MAX_SCORE_SPAN_FP32, 0.05, n=64, k=32)
    res = sinkhorn_assign(s.to(DEVICE), 0.05, backend="triton", max_iter=300)
    codes_error = float((res.codes.double().mean(0) - 1 / 32).abs().sum())
    assert res.converged and abs(codes_error - res.marginal_error) < 2e-5, (res.marginal_error, codes_error)


@pytest.mark.parametrize("mode", ["dense", "features"])
def test_triton_result_pickles_and_reads_out_after_loading(mode):
    """A result keeps its operator for the lazy read-outs (codes, objective); the triton operators hold their kernels'
    module, which pickle refuses: they store its name instead. A loaded result reads out what the original does."""
    import pickle

    if mode == "dense":
        inputs = dict(scores=random_problem(30, 6, seed=52).to(DEVICE))
    else:
        g = torch.Generator().manual_seed(53)
        inputs = dict(features=torch.randn(30, 16, generator=g).to(DEVICE), prototypes=torch.randn(6, 16, generator=g))
        inputs["prototypes"] = inputs["prototypes"].to(DEVICE)
    result = sinkhorn_assign(**inputs, epsilon=0.2, backend="triton", max_iter=5, tol=None)
    loaded = pickle.loads(pickle.dumps(result))
    assert torch.equal(loaded.labels, result.labels)
    assert torch.equal(loaded.codes, result.codes)  # computed after loading, through the re-imported kernels
    assert float(loaded.objective) == float(result.objective)
