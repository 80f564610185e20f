"""sinkhorn_assign end to end through the Triton backend (its CPU interpreter here; real kernels on a GPU)."""

import pytest
import torch
from helpers import assert_close, centred, clustered_cosine_scores, offset_scores, random_problem

from otlabel import sinkhorn_assign
from otlabel.backends import resolve_backend
from otlabel.problem import MAX_SCORE_SPAN_FP32, validate

pytest.importorskip("triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_triton_solve_matches_torch_and_reference(dtype):
    """tol 1e-6 (at 1e-5 the gap to the reference was the solve's, up to 7.5e-5 in codes over seeds 50-53, and hid
    kernel errors of that size); the reference solves the same rounded scores, so one tolerance serves every dtype.
    Worst over seeds 50-53 and the three dtypes: codes 6.3e-6, potentials 2.8e-5, objective 2.5e-7."""
    s = clustered_cosine_scores(150, 7, seed=50).to(dtype)  # N, K not multiples of any tile
    s[3, 2] = float("-inf")
    r = torch.tensor([0.1, 0.2, 0.1, 0.2, 0.1, 0.2, 0.1], dtype=torch.float64)
    kw = dict(cluster_weights=r, tol=1e-6, max_iter=2000)
    tri = sinkhorn_assign(s.to(DEVICE), 0.05, backend="triton", **kw)
    tor = sinkhorn_assign(s, 0.05, backend="torch", **kw)
    ref = sinkhorn_assign(s.double(), 0.05, backend="reference", tol=1e-9, max_iter=20_000, cluster_weights=r)
    assert tri.converged and tri.labels.device.type == DEVICE
    assert torch.equal(tri.labels.cpu(), tor.labels)
    assert torch.equal(tri.labels.cpu(), ref.labels)
    assert_close(tri.codes.cpu(), ref.codes, atol=5e-5, what="triton codes vs reference")
    assert_close(centred(tri.cluster_potentials.cpu()), centred(ref.cluster_potentials), atol=2e-4, what="potentials")
    assert abs(float(tri.objective) - float(ref.objective)) < 2e-6


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


def test_a_triton_older_than_3_is_not_used(monkeypatch):
    """torch 2.1 installs Triton 2.1, whose language the kernels do not target: backend="auto" must not pick it, and
    backend="triton" says which version it needs. Read from the package metadata, without importing Triton."""
    import importlib.metadata

    from otlabel.backends import triton as triton_backend

    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda name: "2.1.0" if name == "triton" else real_version(name))
    triton_backend.triton_installed.cache_clear()
    try:
        assert triton_backend.triton_version() == (2, 1)
        assert not triton_backend.triton_available(torch.zeros(1, device=DEVICE))
        with pytest.raises(RuntimeError, match=r"needs Triton >= 3.0"):
            sinkhorn_assign(torch.randn(4, 3), 0.1, backend="triton")
    finally:
        monkeypatch.undo()
        triton_backend.triton_installed.cache_clear()
    assert triton_backend.triton_version() >= triton_backend.MIN_TRITON  # the installed one, as CI has it


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


MIXED_DTYPES = [(torch.bfloat16, torch.float32), (torch.float16, torch.float32), (torch.bfloat16, torch.float16)]


@pytest.mark.parametrize("z_dtype, c_dtype", MIXED_DTYPES)
def test_triton_features_of_mixed_dtypes_compute_in_the_wider_one(z_dtype, c_dtype):
    """fp32 prototypes (a model's parameters) with bf16 features (autocast): the triton path rounded the prototypes to
    the features' dtype, codes 5e-3 off the reference where the torch path, computing in fp32, is within 1e-6. Both
    now compute in the wider dtype; fp32 prototypes beyond fp16's range no longer turn into inf."""
    g = torch.Generator().manual_seed(54)
    z = torch.nn.functional.normalize(torch.randn(40, 24, generator=g), dim=1).to(z_dtype)
    c = torch.nn.functional.normalize(torch.randn(6, 24, generator=g), dim=1).to(c_dtype)
    kw = dict(epsilon=0.05, max_iter=5, tol=None)
    tri = sinkhorn_assign(features=z.to(DEVICE), prototypes=c.to(DEVICE), backend="triton", allow_tf32=False, **kw)
    ref = sinkhorn_assign(features=z.double(), prototypes=c.double(), backend="reference", **kw)
    assert_close(tri.codes.cpu(), ref.codes, atol=1e-5, what=f"{z_dtype} features, {c_dtype} prototypes")
    if z_dtype == torch.float16 and c_dtype == torch.float32:  # 2**17 overflows fp16; the scores do not
        z, c = z * 2.0**-17, c * 2.0**17
        assert bool((c.abs() > torch.finfo(torch.float16).max).any())
        big = sinkhorn_assign(features=z.to(DEVICE), prototypes=c.to(DEVICE), backend="triton", allow_tf32=False, **kw)
        ref = sinkhorn_assign(features=z.double(), prototypes=c.double(), backend="reference", **kw)
        assert_close(big.codes.cpu(), ref.codes, atol=1e-5, what="prototypes beyond fp16's range")


@pytest.mark.parametrize("dtype", [torch.int32, torch.float64], ids=str)
def test_triton_features_of_a_dtype_the_kernels_do_not_take_is_a_type_error(dtype):
    """Integer or float64 features with backend='triton' are a dtype problem (a TypeError, as on the torch path for
    integers), not a RuntimeError saying that CUDA or Triton is missing."""
    z, c = torch.ones(8, 4, dtype=dtype, device=DEVICE), torch.ones(3, 4, device=DEVICE)
    with pytest.raises(TypeError, match="features"):
        sinkhorn_assign(features=z, prototypes=c, epsilon=0.1, backend="triton")
