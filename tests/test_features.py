"""sinkhorn_assign(features=, prototypes=): equal to the dense solve on Z @ C.T, with bounded memory."""

import math
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers import assert_close, centred

from otlabel import sinkhorn_assign


def normalised(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)


@pytest.mark.parametrize("heads, with_bias", [(None, False), (None, True), (2, True)])
def test_torch_features_equal_dense(heads, with_bias):
    z = normalised(301, 24, 60)  # N not a multiple of any chunk
    c = normalised(17 * (heads or 1), 24, 61)
    c = c if heads is None else c.view(heads, 17, 24)
    bias = 0.1 * torch.randn(c.shape[:-1]) if with_bias else None
    dense = torch.matmul(z, c.transpose(-1, -2)) + (0 if bias is None else bias[..., None, :])
    got = sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=0.05, tol=1e-6, backend="torch")
    want = sinkhorn_assign(dense, 0.05, tol=1e-6)
    ref = sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=0.05, tol=1e-9, backend="reference")
    assert got.converged and got.labels.shape == want.labels.shape
    assert torch.equal(got.labels, want.labels) and torch.equal(got.labels, ref.labels)
    assert_close(got.codes, want.codes, atol=1e-5, what="features vs dense codes")
    assert_close(got.codes, ref.codes, atol=2e-5, what="features vs reference codes")  # worst of 5 seeds: 3.0e-6
    # A per-cluster bias moves the cluster potentials only (the plan absorbs it): a bias dropped, scaled wrongly or
    # taken from the wrong head shows here and nowhere in the labels and codes. Worst over 5 seeds: 1.9e-6 against
    # the dense solve, 8.1e-6 against the reference.
    got_b = centred(got.cluster_potentials)
    assert_close(got_b, centred(want.cluster_potentials), atol=2e-5, what="features vs dense cluster potentials")
    assert_close(got_b, centred(ref.cluster_potentials), atol=5e-5, what="features vs reference cluster potentials")


def test_triton_features_through_sinkhorn_assign():
    pytest.importorskip("triton")
    device = "cuda" if torch.cuda.is_available() else "cpu"  # the interpreter on CPU tensors
    z, c = normalised(70, 16, 62), normalised(9, 16, 63)
    bias = 0.1 * torch.randn(9, generator=torch.Generator().manual_seed(64))
    got = sinkhorn_assign(features=z.to(device), prototypes=c.to(device), bias=bias.to(device), epsilon=0.05,
                          tol=1e-5, backend="triton", allow_tf32=False)  # fmt: skip
    want = sinkhorn_assign(z.double() @ c.double().T + bias.double(), 0.05, tol=1e-9, backend="reference")
    assert got.converged and torch.equal(got.labels.cpu(), want.labels)
    assert_close(got.codes.cpu(), want.codes, atol=1e-4, what="triton features codes")  # worst of 4 seeds: 2.3e-5
    # The bias shows in the cluster potentials only (worst of 4 seeds: 6.7e-5, at tol 1e-5).
    got_b, want_b = centred(got.cluster_potentials.cpu()), centred(want.cluster_potentials)
    assert_close(got_b, want_b, atol=5e-4, what="triton features cluster potentials")


@pytest.mark.parametrize(
    "kwargs, error, words",
    [
        (dict(features=torch.full((5, 3), float("nan")), prototypes=torch.randn(2, 3)), ValueError, ["NaN"]),
        (dict(features=torch.randn(5, 3), prototypes=torch.randn(2, 4)), ValueError, ["prototypes", "D = 3"]),
        (dict(features=torch.randn(5, 3)), ValueError, ["prototypes"]),
        (dict(features=torch.randn(0, 3), prototypes=torch.randn(2, 3)), ValueError, ["features", "non-empty"]),
        (dict(scores=torch.randn(5, 2), features=torch.randn(5, 3), prototypes=torch.randn(2, 3)), ValueError,
         ["either"]),
        (dict(), TypeError, ["scores"]),
        (dict(features=torch.randn(5, 3), prototypes=torch.randn(2, 3), bias=torch.randn(3)), ValueError,
         ["bias", "(2,)"]),
        (dict(features=torch.randn(5, 3), prototypes=torch.randn(2, 3), bias=torch.randn(5, 2)), ValueError,
         ["bias", "(1, 2)"]),
        (dict(features=torch.randn(5, 3), prototypes=[[1.0, 0.0, 0.0]] * 2), TypeError, ["prototypes", "list"]),
        (dict(features=torch.randn(5, 3), prototypes=torch.randn(2, 3), bias=[0.0, 0.0]), TypeError, ["bias", "list"]),
        (dict(features=[[1.0, 0.0, 0.0]] * 5, prototypes=torch.randn(2, 3)), TypeError, ["features", "list"]),
        (dict(features=torch.randn(5, 3), prototypes=torch.randn(2, 3).int()), TypeError, ["prototypes", "int32"]),
        (dict(features=torch.randn(5, 3), prototypes=torch.randn(2, 3), bias=torch.full((2,), -math.inf)), ValueError,
         ["-inf for every cluster"]),  # the chunked path blamed "features row 0" for it
    ],
)  # fmt: skip
@pytest.mark.parametrize("backend", ["auto", "reference", pytest.param("triton", marks=pytest.mark.interpreter)])
def test_features_bad_input(kwargs, error, words, backend):
    """The same checks on every path (the reference path used to broadcast a (N, K) bias into (N, N) labels; the
    Triton path took list prototypes and biases that the others refuse, and called list features a missing GPU)."""
    with pytest.raises(error) as info:
        sinkhorn_assign(epsilon=0.05, backend=backend, **kwargs)
    for word in words:
        assert word in str(info.value)


PEAK_SCRIPT = textwrap.dedent(
    """
    import torch
    from otlabel import sinkhorn_assign

    # The peak grows by about 7 MiB per CPU thread (2, 14 and 112 MiB at 1, 2 and 16 threads; not traced to its
    # source, likely per-thread matmul and allocator buffers): a set number of threads on every machine (two for the
    # solve), or a 16-core machine fails the bound (seen on the lent H100's host).
    torch.set_num_threads({threads})

    def kib(field):  # from /proc/self/status: VmRSS now, VmHWM the peak since the last reset
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    n, k, d = {n}, {k}, 32
    z = torch.nn.functional.normalize(torch.randn(n, d), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d), dim=1)
    sinkhorn_assign(features=z[:1000], prototypes=c, epsilon=0.05, max_iter=2, tol=None)  # warm up the code paths
    before = kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    res = sinkhorn_assign(features=z, prototypes=c, epsilon=0.05, max_iter=5, tol=None)
    assert res.labels.shape == (n,)
    print((kib("VmHWM:") - before) * 1024)
    if {objective}:  # the read-out's pass: one more, chunk by chunk
        res.objective  # noqa: B018
        print((kib("VmHWM:") - before) * 1024)
    """
)


def peak_growth(n: int, k: int, threads: int, objective: bool) -> int:
    """Bytes by which a fresh process's peak RSS grew solving (and, with ``objective``, reading the objective of) an
    N x K features problem: :data:`PEAK_SCRIPT`."""
    script = PEAK_SCRIPT.format(n=n, k=k, threads=threads, objective=objective)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return int(out.stdout.strip().splitlines()[-1])


def test_torch_features_peak_memory_far_below_the_score_matrix():
    """Peak RSS growth of a features solve, measured in a fresh process, against N·K·4 bytes of scores."""
    n, k = 100_000, 1000
    extra = peak_growth(n, k, threads=2, objective=False)
    dense_bytes = n * k * 4
    assert extra < dense_bytes / 10, (
        f"peak grew by {extra / 2**20:.0f} MiB; the score matrix is {dense_bytes >> 20} MiB"
    )


def test_float64_features_are_solved_in_float64():
    """float64 features used to be multiplied in fp32: potentials good to ~1e-6 only, and inputs beyond fp32's range
    (scaled by 1e25 with eps scaled by 1e50: the same problem) gave a wrong 'converged' answer."""
    g = torch.Generator().manual_seed(3)
    z = torch.nn.functional.normalize(torch.randn(60, 4, generator=g, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(5, 4, generator=g, dtype=torch.float64), dim=1)
    ref = sinkhorn_assign(z @ c.T, 0.1, tol=1e-10, max_iter=5000, backend="reference")
    for scale in (1.0, 1e25):
        res = sinkhorn_assign(features=z * scale, prototypes=c * scale, epsilon=0.1 * scale**2, tol=1e-10,
                              max_iter=5000)  # fmt: skip
        assert res.converged and torch.equal(res.labels, ref.labels)
        gap = res.cluster_potentials - ref.cluster_potentials
        assert (gap - gap.mean()).abs().max() < 1e-11, scale


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch", "reference"])
def test_tiny_epsilon_for_the_features_is_an_error_on_every_path(backend):
    """The kernel path judges by |z| |c| + |bias| (it never forms the scores), the others by the scores."""
    z, c = torch.randn(40, 4), torch.randn(5, 4)
    with pytest.raises(ValueError, match="scores / epsilon"):
        sinkhorn_assign(features=z, prototypes=c, epsilon=1e-12, backend=backend)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_a_bias_too_large_for_epsilon_is_an_error(backend):
    """Unit features and prototypes (|S| <= 1 without the bias) at eps = 0.01 are well within fp32's range (100),
    a bias of 50 is not: 5,100 > 3,000 = MAX_SCORE_SPAN_FP32. The kernel path judges by |z| |c| + |bias|: without the
    bias, or with the limit 10x too lenient, it solved. A bias of 20 (span 2,100) is within the range."""
    z, c = normalised(40, 4, 65), normalised(5, 4, 66)
    with pytest.raises(ValueError, match="scores / epsilon"):
        sinkhorn_assign(features=z, prototypes=c, bias=torch.full((5,), 50.0), epsilon=0.01, backend=backend)
    res = sinkhorn_assign(features=z, prototypes=c, bias=torch.full((5,), 20.0), epsilon=0.01, backend=backend)
    assert res.labels.shape == (40,)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch"])
def test_a_bias_entry_far_below_the_rest_is_told_to_drop_the_bias(backend):
    """One bias entry 100 below the others at eps = 0.01 (span 10,100): the error advised subtracting the bias's
    maximum, which leaves that span as it is, and the streamed path gave the scores' fixes (scores.amax), which a
    features caller cannot apply. Dropping the bias is the fix (a per-cluster shift: the same labels)."""
    z, c = normalised(40, 4, 65), normalised(5, 4, 66)
    bias = torch.tensor([0.0, 0.0, -100.0, 0.0, 0.0])
    with pytest.raises(ValueError, match="scores / epsilon") as error:
        sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=0.01, backend=backend)
    assert "drop the bias if you pass one (bias=None" in str(error.value)
    assert "maximum" not in str(error.value) and "scores.amax" not in str(error.value)
    shifted = sinkhorn_assign(features=z, prototypes=c, bias=bias / 100, epsilon=0.01, backend=backend, tol=1e-6)
    plain = sinkhorn_assign(features=z, prototypes=c, epsilon=0.01, backend=backend, tol=1e-6)
    assert torch.equal(shifted.labels, plain.labels)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch", "reference"])
def test_a_minus_inf_bias_on_a_zero_weight_cluster_is_accepted(backend):
    """-inf closes a cluster: allowed where that cluster has weight 0 (refused elsewhere, see the bad-input table);
    no sample goes to it, and the others are labelled as by the dense solve without it."""
    z, c = normalised(60, 8, 67), normalised(5, 8, 68)
    bias = torch.tensor([0.0, 0.0, -math.inf, 0.0, 0.0])
    r = torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25])
    res = sinkhorn_assign(features=z, prototypes=c, bias=bias, cluster_weights=r, epsilon=0.05, tol=1e-6,
                          backend=backend)  # fmt: skip
    want = sinkhorn_assign((z.double() @ c.double().T)[:, [0, 1, 3, 4]], 0.05, tol=1e-9, backend="reference")
    assert res.converged and 2 not in res.labels.tolist()
    assert torch.equal(res.labels, torch.tensor([0, 1, 3, 4])[want.labels])
    assert (res.codes[:, 2] == 0).all()


@pytest.mark.interpreter
def test_the_features_route_and_its_refusals(monkeypatch):
    """backend="triton" takes the features kernel, "auto" (on CPU tensors) and "torch" the chunked stream; an unknown
    backend, float64 features for the kernel and an unusable Triton are refused, each with its own error. The route
    was unchecked (a "triton" call sent to the stream gives the same labels), and so were the three refusals."""
    import otlabel.features as features

    z, c = normalised(20, 4, 1), normalised(3, 4, 2)
    assert features.uses_kernel(z, "triton") and not features.uses_kernel(z, "auto")
    assert not features.uses_kernel(z, "torch")
    with pytest.raises(ValueError, match=r"backend must be one of \('auto', 'torch', 'reference', 'triton'\), got 'x'"):
        sinkhorn_assign(features=z, prototypes=c, epsilon=0.5, backend="x")
    wanted = "backend='triton' takes float32, float16 or bfloat16 features, got torch.float64"
    with pytest.raises(TypeError, match=wanted):
        sinkhorn_assign(features=z.double(), prototypes=c, epsilon=0.5, backend="triton")
    monkeypatch.setattr(features, "_triton_usable", lambda z: False)  # no GPU, no interpreter
    with pytest.raises(RuntimeError, match="backend='triton' with features needs fp32/fp16/bf16 CUDA tensors"):
        sinkhorn_assign(features=z, prototypes=c, epsilon=0.5, backend="triton")


def test_prototype_shapes_at_the_edges():
    """One prototype (K = 1) is a problem, none is not; (D, N) features with (H, K, D) prototypes get the transposed
    hint too. Untested before: a check of "1 in the prototypes' shape" refused K = 1 and took K = 0, and a hint that
    compared the last two prototype dimensions with N passed the (K, D) case alone."""
    z = normalised(30, 4, 5)
    res = sinkhorn_assign(features=z, prototypes=z[:1], epsilon=0.5)
    assert res.labels.tolist() == [0] * 30 and res.codes.shape == (30, 1)
    with pytest.raises(ValueError, match=r"prototypes must have shape \(K, D\) or \(H, K, D\) .*got shape \(0, 4\)"):
        sinkhorn_assign(features=z, prototypes=z[:0], epsilon=0.5)
    with pytest.raises(ValueError, match=r"look transposed \(\(4, 30\) is \(D, N\)\): pass features.T"):
        sinkhorn_assign(features=z.T, prototypes=torch.stack([z[:3], z[3:6]]), epsilon=0.5)


@pytest.mark.interpreter
def test_the_kernel_checks_every_entry_and_the_longest_row():
    """The features kernel checks its inputs up front (it never forms the scores): one NaN feature, one inf prototype
    entry, or one NaN or +inf bias entry among finite ones, is refused as such; the score bound takes the longest
    features row, here one of norm 40 spread over 64 dimensions among unit rows: 40 / 0.01 = 4,000 > 3,000 =
    MAX_SCORE_SPAN_FP32. Untested before: the tests had all-NaN features, an all -inf bias and rows of equal norm, so
    checks of "any entry", "every bias entry" and the shortest row's or the longest column's norm passed them (a bad
    prototype or feature entry then read "scores / epsilon reach nan")."""
    z, c = normalised(20, 64, 70), normalised(5, 64, 71)
    bad = z.clone()
    bad[7, 3] = math.nan
    with pytest.raises(ValueError, match="features contain NaN or inf"):
        sinkhorn_assign(features=bad, prototypes=c, epsilon=0.05, backend="triton")
    bad = c.clone()
    bad[2, 9] = math.inf
    with pytest.raises(ValueError, match="prototypes contain NaN or inf"):
        sinkhorn_assign(features=z, prototypes=bad, epsilon=0.05, backend="triton")
    for value in (math.nan, math.inf):
        bias = torch.zeros(5)
        bias[2] = value
        with pytest.raises(ValueError, match=r"bias contains NaN or \+inf"):
            sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=0.05, backend="triton")
    long = z.clone()
    long[7] = 5.0  # norm 40; every column's norm stays near 5
    with pytest.raises(ValueError, match="scores / epsilon"):
        sinkhorn_assign(features=long, prototypes=c, epsilon=0.01, backend="triton")
    assert sinkhorn_assign(features=z, prototypes=c, epsilon=0.01, backend="triton").labels.shape == (20,)


@pytest.mark.interpreter
def test_the_kernel_bound_takes_the_longest_prototype_and_the_largest_finite_bias():
    """|S| <= max |z| max |c| + max |finite bias|: one prototype of norm 40 (over 64 dimensions) among unit ones, or
    one bias entry of 50 among zeros, is refused at eps = 0.01; unit vectors at eps = 5e-4 (bound 1: 2,000 < 3,000)
    solve, with no bias or with a -inf one on a zero-weight cluster (which adds nothing). The tests had prototypes of
    equal norm and a constant bias, so the smallest norm, norms over other dimensions, z / c, the smallest bias, or
    1 for no bias or for a -inf entry all passed."""
    z, c = normalised(20, 64, 72), normalised(5, 64, 73)
    long = c.clone()
    long[3] = 5.0  # norm 40; every other direction's norm stays near 5
    with pytest.raises(ValueError, match="scores / epsilon"):
        sinkhorn_assign(features=z, prototypes=long, epsilon=0.01, backend="triton")
    with pytest.raises(ValueError, match="scores / epsilon"):
        sinkhorn_assign(features=z, prototypes=c, bias=torch.tensor([0.0, 0.0, 50.0, 0.0, 0.0]), epsilon=0.01,
                        backend="triton")  # fmt: skip
    closed, r = torch.tensor([0.0, 0.0, -math.inf, 0.0, 0.0]), torch.tensor([0.25, 0.25, 0.0, 0.25, 0.25])
    for kwargs in (dict(), dict(bias=closed, cluster_weights=r)):
        res = sinkhorn_assign(features=z, prototypes=c, epsilon=5e-4, tol=None, max_iter=3, backend="triton", **kwargs)
        assert res.labels.shape == (20,)


@pytest.mark.parametrize("backend", [pytest.param("triton", marks=pytest.mark.interpreter), "torch", "reference"])
def test_a_bias_closing_every_cluster_of_one_head_is_refused(backend):
    """With heads, one head's bias all -inf leaves its samples nowhere to go, whatever the other heads: refused up
    front (the tests had one head; a check that wanted every head closed passed it)."""
    z, c = normalised(20, 8, 74), torch.stack([normalised(3, 8, 75), normalised(3, 8, 76)])  # (2, 3, 8)
    bias = torch.tensor([[0.0, 0.0, 0.0], [-math.inf] * 3])
    with pytest.raises(ValueError, match=r"bias is -inf for every cluster \(of some head\)"):
        sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=0.5, backend=backend)


@pytest.mark.interpreter
def test_a_minus_inf_bias_on_one_weighted_cluster_is_refused_by_the_kernel_path():
    """-inf on one cluster of positive weight (the others open): infeasible, refused before the kernel runs. The
    bad-input table closed every cluster (a check of its own), so the weighted-cluster check was never reached."""
    z, c = normalised(20, 8, 77), normalised(4, 8, 78)
    bias = torch.tensor([0.0, -math.inf, 0.0, 0.0])
    with pytest.raises(ValueError, match="infeasible: a cluster with positive weight has bias -inf"):
        sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=0.5, backend="triton")


@pytest.mark.interpreter
def test_reversed_numpy_prototypes_and_bias_on_the_kernel_path():
    """Reversed NumPy views (negative strides, which torch cannot share) are copied, as on the other paths; the
    kernel path had no test with NumPy prototypes or bias at all."""
    z, c = normalised(30, 8, 79), normalised(4, 8, 80).numpy()
    bias = np.array([0.3, 0.2, 0.1, 0.0], np.float32)
    got = sinkhorn_assign(features=z, prototypes=c[::-1], bias=bias[::-1], epsilon=0.5, tol=None, max_iter=5,
                          backend="triton")  # fmt: skip
    want = sinkhorn_assign(features=z, prototypes=c[::-1].copy(), bias=bias[::-1].copy(), epsilon=0.5, tol=None,
                           max_iter=5, backend="triton")  # fmt: skip
    assert torch.equal(got.labels, want.labels) and torch.equal(got.cluster_potentials, want.cluster_potentials)


@pytest.mark.interpreter
def test_float64_prototypes_with_float32_features_on_the_kernel_path():
    """Mixed dtypes go to the wider one, and float64 to float32 (the kernels' arithmetic): float64 prototypes (NumPy's
    default) with float32 features solve as float32 ones do. Untested: no kernel-path test mixed dtypes."""
    z, c = normalised(30, 8, 81), normalised(4, 8, 82)
    got = sinkhorn_assign(features=z, prototypes=c.double(), epsilon=0.5, tol=None, max_iter=5, backend="triton")
    want = sinkhorn_assign(features=z, prototypes=c, epsilon=0.5, tol=None, max_iter=5, backend="triton")
    assert torch.equal(got.labels, want.labels) and torch.equal(got.cluster_potentials, want.cluster_potentials)
    assert got.codes.dtype == torch.float32


@pytest.mark.parametrize("scale", [1e20, 1e25])
def test_float32_products_beyond_float32_are_refused_whatever_epsilon(scale):
    """Finite float32 features and prototypes whose products overflow float32 (|S| ~ 1e40, 1e50), with epsilon of the
    same size (S / eps within range): the dense solve refuses such scores (+inf), the chunked path solved them. Its
    fused baddbmm scaled by 1 / eps (a subnormal or zero float32) before any inf showed: at 1e20 the objective read 0,
    at 1e25 the labels were wrong and the solve said it converged. Float64 features solve the same problem."""
    z, c = normalised(60, 8, 83), normalised(5, 8, 84)
    with pytest.raises(ValueError, match="overflow float32 arithmetic .* pass float64 features"):
        sinkhorn_assign(features=z * scale, prototypes=c * scale, epsilon=scale**2, backend="torch")
    want = sinkhorn_assign(z.double() @ c.double().T, 1.0, tol=1e-9, backend="reference")
    res = sinkhorn_assign(features=z.double() * scale, prototypes=c.double() * scale, epsilon=scale**2, tol=1e-9)
    assert torch.equal(res.labels, want.labels)
    assert res.objective == pytest.approx(want.objective * scale**2, rel=1e-9)


def test_reading_the_objective_stays_within_the_memory_budget():
    """``res.objective`` of a features solve streams the scores once more, chunk by chunk, each worker thread within
    its share of the 256 MiB default budget. That pass made six float64 temporaries of every chunk (~50 bytes a score
    where the budget counts 16): at 100,000 x 1,000 on 8 threads the peak grew by ~500 MiB, more than the 381 MiB
    score matrix that features mode exists not to build (~140 MiB now; 2 threads: 140-215 MiB, now ~40)."""
    from otlabel.host_sources import DEFAULT_MEMORY_BUDGET

    n, k = 100_000, 1000
    extra = peak_growth(n, k, threads=8, objective=True)
    assert extra < DEFAULT_MEMORY_BUDGET["cpu"], (
        f"peak grew by {extra / 2**20:.0f} MiB reading the objective: beyond the "
        f"{DEFAULT_MEMORY_BUDGET['cpu'] >> 20} MiB budget (the score matrix is {n * k * 4 >> 20} MiB)"
    )


BUDGET_SCRIPT = textwrap.dedent(
    """
    import torch
    from otlabel import sinkhorn_assign_stream

    torch.set_num_threads(4)  # four ranges of rows, each chunked to a quarter of the budget (below the 16 MiB cap)

    def kib(field):
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith(field))

    budget = {budget}
    z = torch.nn.functional.normalize(torch.randn(20_000, 32), dim=1).to({dtype})
    c = torch.nn.functional.normalize(torch.randn(1000, 32), dim=1).to({dtype})
    kw = dict(epsilon=0.05, max_iter=2, tol=None, device="cpu", memory_budget=budget)
    sinkhorn_assign_stream(features=z[:2000], prototypes=c, **kw).objective  # warm up the code paths
    res = sinkhorn_assign_stream(features=z, prototypes=c, **kw)
    before = kib("VmRSS:")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak to the current RSS
    res.objective  # noqa: B018
    print((kib("VmHWM:") - before) * 1024)
    """
)


@pytest.mark.parametrize("dtype", ["torch.float32", "torch.float64"])
def test_reading_the_objective_stays_within_an_explicit_memory_budget(dtype):
    """The objective's pass keeps two float64 buffers a chunk (the 16 bytes a score the budget counts). Features
    computed their product into a fresh chunk besides, 4 (float64: 8) bytes a score more: with a budget that the
    threads' chunks fill (32 MiB over 4 threads), the peak grew by 38 MiB (float64 features: 45), now ~31 (30).

    glibc keeps freed blocks of its heap resident, and the read-out reused those the solve had freed without growing
    RSS: with every buffer mapped on its own (``MALLOC_MMAP_THRESHOLD_``) and unmapped when freed, the peak RSS is
    that of the memory in use."""
    budget = 32 << 20
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": str(1 << 16)}
    script = BUDGET_SCRIPT.format(budget=budget, dtype=dtype)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    extra = int(out.stdout.strip().splitlines()[-1])
    # 4 MiB beside the budget for what it does not count (N- and K-length vectors, code pages, another BLAS):
    # before the fix the peak grew by 38 MiB
    slack = 4 << 20
    assert extra <= budget + slack, f"the peak grew by {extra / 2**20:.1f} MiB reading the objective (budget 32 MiB)"


def test_numpy_features_are_solved_on_the_cpu_where_a_gpu_exists(monkeypatch):
    """NumPy features (like NumPy scores) give CPU results: they went to sinkhorn_assign_stream with device=None,
    which picks CUDA where it is available, and left cluster_potentials on the GPU beside CPU labels. Here CUDA is
    made to look available: a solve on 'cuda' would fail on this CPU build."""
    z = torch.nn.functional.normalize(torch.randn(40, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    c = torch.nn.functional.normalize(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)), dim=1)
    want = sinkhorn_assign(features=z, prototypes=c, epsilon=0.1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    res = sinkhorn_assign(features=z.numpy(), prototypes=c.numpy(), epsilon=0.1)
    assert res.cluster_potentials.device.type == "cpu" and res.labels.device.type == "cpu"
    assert torch.equal(res.labels, want.labels)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_features_too_large_are_named_as_features_on_the_reference_path(backend):
    """The reference path materialises Z C^T in float64 and solved it as dense scores, so its refusals spoke of scores
    the caller never passed: float64 features of 1e200 (products 1e400, inf - inf = NaN) were "scores contain NaN ...
    Fix the model output", and products of 1e38 with epsilon 0.05 were told to "Subtract each sample's maximum
    (scores - scores.amax(-1, keepdim=True))". Every path now says what the torch path says: the products overflow,
    or are too large for epsilon, and the features and prototypes want L2-normalising."""
    z, c = normalised(6, 3, 85).double(), normalised(4, 3, 86).double()
    with pytest.raises(ValueError, match="overflow float64 arithmetic .* L2-normalise the features") as info:
        sinkhorn_assign(features=z * 1e200, prototypes=c * 1e200, epsilon=0.05, backend=backend)
    assert "NaN (first at" not in str(info.value)
    with pytest.raises(ValueError, match="L2-normalise the features and the prototypes") as info:
        sinkhorn_assign(features=z * 1e19, prototypes=c * 1e19, epsilon=0.05, backend=backend)
    assert "scores.amax" not in str(info.value)


def test_sharded_reference_features_too_large_are_named_as_features_with_the_rank():
    """sinkhorn_assign_sharded(features=..., backend="reference") forms a DenseShard of Z C^T, whose row checks spoke
    of scores: products of 1e38 with epsilon 0.05 were told to "Subtract each sample's maximum (scores -
    scores.amax(-1, keepdim=True))", and products that overflow float64 named a features row without the rank whose
    shard holds it, as every other sharded message does. Both now say what the single-process paths say."""
    from otlabel import sinkhorn_assign_sharded

    z, c = normalised(6, 3, 85).double(), normalised(4, 3, 86).double()
    with pytest.raises(ValueError, match="L2-normalise the features and the prototypes") as info:
        sinkhorn_assign_sharded(features=z * 1e19, prototypes=c * 1e19, epsilon=0.05, backend="reference")
    assert "scores.amax" not in str(info.value) and "of rank 0's shard" in str(info.value), str(info.value)
    z[3] *= 1e200
    with pytest.raises(ValueError, match=r"features row 3 of rank 0's shard, .* overflow float64 arithmetic"):
        sinkhorn_assign_sharded(features=z, prototypes=c * 1e200, epsilon=0.05, backend="reference")


@pytest.mark.parametrize("path", ["torch float32", "torch float64", "stream", "reference", "sharded reference"])
def test_products_that_overflow_to_minus_inf_on_every_weighted_cluster_are_named_as_features(path):
    """Finite features whose products with every weighted prototype overflow to -inf (-1e20 x 1e20 in float32,
    -1e200 x 1e200 in float64), while their product with a zero prototype of a cluster of weight 0 is 0, were refused
    as a mask the caller never gave, "infeasible mask: sample 4 (head 0) is allowed only in clusters of weight 0",
    on every path but the sharded kernel one (which bounds the products first). Each now says the features message:
    the products of that finite features row overflow, L2-normalise."""
    from otlabel import sinkhorn_assign_sharded, sinkhorn_assign_stream

    dtype, big = (torch.float32, 1e20) if path == "torch float32" else (torch.float64, 1e200)
    # The samples' scores are their first 3 coordinates; sample 4's are -big x big, and 0 for cluster 0 (weight 0)
    z = torch.cat([normalised(8, 3, 87), torch.zeros(8, 1)], dim=1).to(dtype)
    c = torch.zeros(4, 4, dtype=dtype)
    c[1:, :3], c[1:, 3] = torch.eye(3), big
    z[4] = torch.tensor([0.0, 0.0, 0.0, -big], dtype=dtype)
    kw = dict(features=z, prototypes=c, epsilon=0.05, cluster_weights=[0.0, 0.3, 0.3, 0.4])
    with pytest.raises(ValueError, match=r"features row 4\b.* overflow float(32|64) arithmetic") as info:
        if path == "stream":
            sinkhorn_assign_stream(**kw)
        elif path == "sharded reference":
            sinkhorn_assign_sharded(**kw, backend="reference")
        else:
            sinkhorn_assign(**kw, backend="reference" if path == "reference" else "torch")
    assert "infeasible mask" not in str(info.value) and "L2-normalise" in str(info.value), str(info.value)


@pytest.mark.parametrize("path", ["torch", "stream", "reference", "sharded reference"])
@pytest.mark.parametrize("bias", [[0.0, -math.inf, -math.inf], [0.0, -math.inf, 0.0]])
def test_a_minus_inf_bias_on_a_weighted_cluster_is_refused_as_such_on_every_features_path(path, bias):
    """A bias of -inf on a cluster of positive weight is infeasible, and the kernel paths say so ("a cluster with
    positive weight has bias -inf"). The other features paths left it to the scores' checks: with every weighted
    cluster closed ([0, -inf, -inf], weights [0, 0.5, 0.5]) each row is -inf on every weighted cluster, which a0772cb
    read as products that overflow, "the scores of features row 0 ... overflow float64 arithmetic ... L2-normalise",
    a fix that cannot help; with one closed, "infeasible mask: cluster 1 ... every sample's score for it is -inf",
    of scores the caller never gave. Each path now checks the bias against the weights, as the kernel paths do."""
    from otlabel import sinkhorn_assign_sharded, sinkhorn_assign_stream

    z, c = normalised(8, 3, 88).double(), normalised(3, 3, 89).double()
    kw = dict(features=z, prototypes=c, bias=torch.tensor(bias, dtype=torch.float64), epsilon=0.05,
              cluster_weights=[0.0, 0.5, 0.5])  # fmt: skip
    with pytest.raises(ValueError, match="infeasible: a cluster with positive weight has bias -inf"):
        if path == "stream":
            sinkhorn_assign_stream(**kw)
        elif path == "sharded reference":
            sinkhorn_assign_sharded(**kw, backend="reference")
        else:
            sinkhorn_assign(**kw, backend=path)


@pytest.mark.parametrize("kind", ["numpy", "memmap", "path"])
def test_host_features_for_the_triton_backend_are_told_to_pass_a_gpu_tensor(kind, tmp_path):
    """backend='triton' with NumPy features (an array, a memmap or a .npy path) said 'needs fp32/fp16/bf16 CUDA tensors
    and Triton (or TRITON_INTERPRET=1)', also where Triton and the interpreter were there and the features fp32: the
    words did not name the cause, a host array where the kernel takes a torch tensor (dense NumPy scores with
    backend='triton' are converted and solved under the interpreter)."""
    z = normalised(6, 3, 0).numpy()
    np.save(tmp_path / "z.npy", z)
    given = {"numpy": z, "memmap": np.load(tmp_path / "z.npy", mmap_mode="r"), "path": str(tmp_path / "z.npy")}[kind]
    wanted = r"a torch tensor on the GPU, got a (NumPy array|\.npy path): pass torch\.from_numpy\(features\)\.cuda\(\)"
    with pytest.raises(RuntimeError, match=wanted):
        sinkhorn_assign(features=given, prototypes=normalised(2, 3, 1), epsilon=0.5, backend="triton")
