"""Features mode: ``S = Z C^T (+ bias)`` computed tile by tile, never stored (``sinkhorn_assign(features=...)``).

SwAV/DINO scores are cosine similarities of features ``Z`` (N, D) and prototypes ``C`` (K, D); SeLa's heads are
linear layers on stored activations. At N = 1.28M, K = 3,000 the score matrix is 15 GB in fp32 while its inputs
are under 1 GB. Routes, chosen like the dense backends:

* CUDA tensors with Triton (``backend="auto"`` or ``"triton"``):
  :class:`~otlabel.backends.triton.TritonFeaturesOperator`, which recomputes tiles of ``Z C^T`` on tensor
  cores at every pass; extra memory O(H·P·K + N).
* otherwise (``"torch"``): the chunked feature source of :func:`otlabel.sinkhorn_assign_stream` — a fused
  ``baddbmm`` per chunk of samples; extra memory bounded by ``memory_budget`` (default 256 MiB on the CPU).
* ``"reference"``: materialises ``Z C^T`` in float64 and runs the reference backend (small problems, for checking).
"""

from __future__ import annotations

import math
import os

import torch

from .advice import features_summary, one_features_row, warn_about_scores
from .backends import _triton_usable, check_backend_name
from .inputs import open_host_array  # what the streamed and reference paths take too, with their errors
from .kernels.utils import KERNEL_DTYPES
from .problem import (
    MAX_SCORE_SPAN_FP32,
    ScoreSpanError,
    bad_features_row_error,
    check_epsilon,
    check_float_dtype,
    check_weights,
    dense_tensor,
    span_error,
)
from .solver import (
    LoopOutput,
    check_init,
    check_solver_options,
    no_epsilon_scaling,
    package_result,
    run_sinkhorn,
    warn_if_not_converged,
)


def assign_features(features, prototypes, bias, epsilon, *, backend, epsilon_scaling, allow_tf32, **solve):
    """Route a features-mode call (see the module docstring); ``solve`` holds the shared solver options."""
    if features is None:
        # what is missing: bias= alone named prototypes=, not given; prototypes= given is not asked for
        missing = "prototypes= needs features=" if prototypes is not None else "bias= needs features= and prototypes="
        raise ValueError(f"{missing}: the scores are features @ prototypes.T (+ bias) (or pass the scores themselves "
                         "as the first argument).")  # fmt: skip
    if prototypes is None:
        raise ValueError("features= needs prototypes=: the (K, D) cluster centres (or (H, K, D) for H heads).")
    check_solver_options(
        solve["max_iter"], solve["tol"], solve["acceleration"], solve["over_relaxation"], solve.get("callback")
    )  # early
    no_epsilon_scaling(epsilon_scaling, "with features=")
    warn = solve.pop("warn")  # warned here, as sinkhorn_assign's, at the caller's line
    if isinstance(features, torch.Tensor):  # a meta tensor's device reached the stream's device check (and Triton's)
        dense_tensor(features, "features")  # the error every path gives for tensors that hold no values
    check_backend_name(backend)
    if backend == "reference":
        from .solver import sinkhorn_assign

        try:
            scores = dense_scores(features, prototypes, bias, cluster_weights=solve["cluster_weights"])
            res = sinkhorn_assign(scores, epsilon, backend="reference", warn=False, **solve)
        except ScoreSpanError as error:  # said for the features and prototypes, as the other paths say it
            span_over_eps, compute_dtype, detail, _ = error.parts
            raise span_error(span_over_eps, compute_dtype, detail, features=True) from None
    elif uses_kernel(features, backend):
        res = solve_with_kernel(features, prototypes, bias, epsilon, allow_tf32=allow_tf32, **solve)
    else:
        from .streaming import sinkhorn_assign_stream

        # Host features (NumPy, a .npy path) are computed on the CPU, as NumPy scores are: results on the input's
        # device, as documented (device=None streamed them through a GPU where one exists, and left the potentials
        # there). sinkhorn_assign_stream is the entry point that streams host data through a GPU.
        device = features.device if isinstance(features, torch.Tensor) else torch.device("cpu")
        res = sinkhorn_assign_stream(
            features=features, prototypes=prototypes, bias=bias, epsilon=epsilon, device=device, warn=False, **solve
        )
    if warn:  # warned here, at the caller's line, as sinkhorn_assign warns
        out = LoopOutput(res.cluster_potentials, res.n_iter, res.errors, res.converged, error=res.marginal_error)
        warn_if_not_converged("sinkhorn_assign", out, solve["tol"], res.epsilon, res._operator.dtype)
    return res


def uses_kernel(features, backend: str) -> bool:
    """Whether features go to the Triton features kernel (else the chunked stream); ``backend`` is "auto", "torch"
    or "triton" ("reference" is handled by the caller). Raises for an unknown or unusable backend."""
    check_backend_name(backend)
    if backend == "reference":
        raise ValueError("backend='reference' here: the caller solves the reference on dense scores itself.")
    z = features if isinstance(features, torch.Tensor) else None
    usable = z is not None and z.dtype in KERNEL_DTYPES and _triton_usable(z)
    if backend == "triton" and z is None:  # what no features path takes (a list) gets their TypeError
        open_host_array(features, "features")
        # A host array or .npy path: the kernel takes torch tensors, whatever GPU, Triton or interpreter there is
        raise RuntimeError(
            "backend='triton' takes features as a torch tensor on the GPU, got "
            f"{'a .npy path' if isinstance(features, (str, os.PathLike)) else 'a NumPy array'}: pass "
            "torch.from_numpy(features).cuda() (np.load the path first), or leave backend='auto' (or 'torch'), which "
            "computes host features chunk by chunk on the CPU."
        )
    if backend == "triton" and z is not None and z.dtype not in KERNEL_DTYPES:
        # A dtype problem is a TypeError, as on the other paths, not a missing GPU or Triton.
        check_float_dtype(z, "features")
        raise TypeError(
            f"backend='triton' takes float32, float16 or bfloat16 features, got {z.dtype}. Cast them "
            "(features.float()), or pass backend='torch', which computes float64 features in float64."
        )
    if backend == "triton" and not usable:
        raise RuntimeError(
            "backend='triton' with features needs fp32/fp16/bf16 CUDA tensors and Triton (or TRITON_INTERPRET=1). "
            "Use backend='torch' for the chunked CPU path."
        )
    return backend == "triton" or (backend == "auto" and usable and z.is_cuda)


def check_feature_shapes(
    features_shape: tuple, prototypes_shape: tuple, bias_shape: tuple | None = None, *, files: bool = False
) -> None:
    """Features (N, D), non-empty; prototypes (K, D) or (H, K, D) of the same D; a bias (K,) or (H, K). Every
    features route (kernel, streamed, reference) checks its inputs here, so they all say the same. Transposed
    features or prototypes are named as such; ``files``: they came from ``.npy`` files (the command line), so the fix
    is to save them anew, not ``.T``."""
    if len(features_shape) != 2 or 0 in features_shape:
        raise ValueError(f"features must have shape (N, D) and be non-empty, got shape {tuple(features_shape)}.")
    d = features_shape[1]
    if len(prototypes_shape) not in (2, 3) or prototypes_shape[-1] != d or 0 in prototypes_shape:
        hints = []  # both when N == K: (D, N) features and (D, K) prototypes have the same shapes as the right ones
        if tuple(prototypes_shape[-1:]) == tuple(features_shape[:1]) != (d,):
            fix = "save them as (N, D): np.save(path, features.T)" if files else "pass features.T"
            hints.append(f"features look transposed ({tuple(features_shape)} is (D, N)): {fix}")
        if len(prototypes_shape) in (2, 3) and prototypes_shape[-2] == d and 0 not in prototypes_shape:
            two_d = len(prototypes_shape) == 2  # (D, K): C.T, e.g. a linear layer's weight.T
            flip = "prototypes.T" if two_d else "prototypes.swapaxes(-1, -2)"
            want, got = ("(K, D)", "(D, K)") if two_d else ("(H, K, D)", "(H, D, K)")
            fix = f"save them as {want}: np.save(path, {flip})" if files else f"pass {flip}"
            hints.append(f"prototypes look transposed ({tuple(prototypes_shape)} is {got}): {fix}")
        hint = f" The {'. Or the '.join(hints)}." if hints else ""
        raise ValueError(f"prototypes must have shape (K, D) or (H, K, D) with D = {d} (the features' dimension), "
                         f"got shape {tuple(prototypes_shape)}.{hint}")  # fmt: skip
    h, k = (prototypes_shape[0] if len(prototypes_shape) == 3 else 1), prototypes_shape[-2]
    if bias_shape is not None and tuple(bias_shape) not in ((k,), (h, k)):
        raise ValueError(f"bias must have shape ({k},) or ({h}, {k}), got {tuple(bias_shape)}.")


def dense_scores(features, prototypes, bias, where: str = "", cluster_weights=None) -> torch.Tensor:
    """``Z C^T + bias`` in float64: (N, K), or (H, N, K) for (H, K, D) prototypes (the reference backend's input).

    The same inputs as the other paths (tensors, arrays, ``.npy`` paths) and the same shape checks. ``where``: what a
    message adds to a features row's index (a sharded solve's " of rank 1's shard"); ``cluster_weights``: the solve's
    (checked here), whose clusters of weight 0 do not count in telling a row that overflowed."""
    z = open_host_array(features, "features", copied_anyway=True).double()  # float64 copies anyway
    c = open_host_array(prototypes, "prototypes", copied_anyway=True).double()
    b = None if bias is None else open_host_array(bias, "bias", copied_anyway=True).double()
    check_feature_shapes(z.shape, c.shape, None if b is None else b.shape)
    k = c.shape[-2]
    r = None if cluster_weights is None else check_weights(cluster_weights, k, "cluster_weights",
                                                            "number of clusters K", z.device)  # fmt: skip
    check_bias(b, r)  # what the other paths say of a bias (a weighted cluster closed too), before the scores' checks
    for name, x in (("features", z), ("prototypes", c)):  # named, as the other paths do, not as "scores contain NaN"
        if not bool(torch.isfinite(x).all()):
            raise not_finite_error(name)
    scores = torch.matmul(z, c.transpose(-1, -2))  # (N, K) or (H, N, K)
    if b is not None:  # (K,) or (H, K); a (1, K) bias of unbatched (K, D) prototypes keeps the scores (N, K)
        scores = scores + (b.reshape(-1, 1, b.shape[-1]) if c.ndim == 3 else b.reshape(-1))
    # Finite inputs and a checked bias: NaN, +inf, or a row all -inf (on every cluster of positive weight) is a product
    # that overflowed float64. Said as the chunked path says it (which likewise takes a lone -inf product as the 0 it
    # stands for), not as "scores contain NaN" or "infeasible mask" of scores the caller never passed.
    weighted = scores if r is None else scores[..., r > 0]
    overflow = (torch.isnan(scores) | torch.isposinf(scores)).any(dim=-1) | torch.isneginf(weighted).all(dim=-1)
    if bool(overflow.any()):
        row = int(torch.nonzero(overflow.reshape(-1, overflow.shape[-1]).any(dim=0))[0])
        raise bad_features_row_error(row, where, z, torch.float64, math.nan)
    if one_features_row(z) is not None:  # (a pass over Z, 1 / K of the product's work; the first rows decide)
        # A collapsed encoder: its scores' rows made the same bits, as they are in exact arithmetic, so that the
        # reference's checks see identical rows (otlabel.advice); float64 matmuls of 777 identical 2,048-d rows at
        # 129 prototypes gave rows differing in their last bit, and no warning.
        scores = scores[..., :1, :].expand(scores.shape).contiguous()
    return scores


def not_finite_error(name: str) -> ValueError:
    """The error for ``features`` or ``prototypes`` holding NaN or inf, on every features path."""
    fix = " Fix the model output." if name == "features" else ""
    return ValueError(f"{name} contain NaN or inf; they must be finite vectors.{fix}")


def check_features(z: torch.Tensor, c: torch.Tensor, bias, cluster_weights: torch.Tensor,
                   epsilon=None) -> tuple[float, bool]:  # fmt: skip
    """What the kernel cannot check as it goes: finite inputs, no weighted cluster closed by a -inf bias, and (given
    ``epsilon``) scores within the range the solver resolves — judged by the bound ``|S| <= max |z| max |c| +
    max |bias|``, since the scores themselves are never formed. Returns that bound, and whether the smallest feature
    norm is the largest (every features row may then be the same: :func:`otlabel.advice.features_summary`).

    The verdicts come back to the host together (one device synchronisation); the bias's own messages are
    produced by :func:`check_bias` on failure only."""
    verdicts = [torch.isfinite(z).all(), torch.isfinite(c).all()]
    smallest_z, largest_z = torch.aminmax(torch.linalg.vector_norm(z, dim=-1, dtype=torch.float64))  # (as amax)
    bound = score_bound(largest_z, c, bias)
    verdicts.append(bound <= (math.inf if epsilon is None else MAX_SCORE_SPAN_FP32 * epsilon))  # fp32 kernels
    if bias is not None:
        verdicts += [~(torch.isnan(bias) | torch.isposinf(bias) | (torch.isneginf(bias) & (cluster_weights > 0))).any()]
    # the bound and the extreme norms in the same read (for otlabel.advice; NaN from NaN inputs, refused below)
    features_ok, prototypes_ok, span_ok, *bias_ok, smallest, largest, bound = torch.stack(
        [*verdicts, smallest_z, largest_z, bound]
    ).tolist()
    if not features_ok:
        raise not_finite_error("features")
    if not prototypes_ok:
        raise not_finite_error("prototypes")
    if not all(bias_ok):
        check_bias(bias, cluster_weights)
    if not span_ok:
        raise bound_error(bound, epsilon, torch.float32)
    return bound, smallest == largest


def check_finite_rows(host: torch.Tensor, name: str, rows_per_check: int = 1 << 16) -> tuple[float, float]:
    """Every entry finite, checked a block of rows at a time (a memmap is read once, never held whole); returns the
    smallest and largest row norm (float64), read in the same pass."""
    smallest, largest = math.inf, 0.0
    for lo in range(0, host.shape[0], rows_per_check):
        block = host[lo : lo + rows_per_check]
        if not bool(torch.isfinite(block).all()):
            row = lo + int(torch.nonzero(~torch.isfinite(block).reshape(block.shape[0], -1).all(dim=1))[0])
            raise ValueError(f"{name} contain NaN or inf (first in row {row}); they must be finite vectors.")
        low, high = torch.stack(torch.aminmax(torch.linalg.vector_norm(block, dim=-1, dtype=torch.float64))).tolist()
        smallest, largest = min(smallest, low), max(largest, high)
    return smallest, largest


def score_bound(largest_z, c: torch.Tensor, bias) -> torch.Tensor:
    """0-d float64: ``max_j |z_j| max_k |c_k| + max |bias|`` (Cauchy-Schwarz), a bound on every |score|, from the
    largest feature norm ``largest_z`` and the prototypes ``c`` (..., K, D). Norms in float64: no overflow."""
    c_norm = torch.linalg.vector_norm(c, dim=-1, dtype=torch.float64).amax()
    finite_bias = 0.0 if bias is None else torch.where(torch.isfinite(bias), bias.abs(), 0).amax().double()
    return largest_z * c_norm + finite_bias


def bound_error(bound: float, epsilon: float, compute_dtype: torch.dtype) -> ValueError:
    detail = f" (bounded by |features| x |prototypes| + |bias| = {bound:.3g}, epsilon {epsilon:.3g})"
    return span_error(bound / epsilon, compute_dtype, detail, features=True)


def check_bias(bias: torch.Tensor | None, cluster_weights: torch.Tensor | None = None) -> None:
    """A per-cluster bias may be -inf (closing that cluster) only where the cluster has weight 0 (checked when
    ``cluster_weights`` are given); NaN and +inf never."""
    if bias is None:
        return
    if bool(torch.isnan(bias).any() | torch.isposinf(bias).any()):
        raise ValueError("bias contains NaN or +inf; only -inf is allowed (it closes a cluster).")
    if bool(torch.isneginf(bias).all(dim=-1).any()):  # whatever the weights (a message about rows misled here)
        raise ValueError("infeasible: bias is -inf for every cluster (of some head), so no sample may go anywhere. "
                         "Leave at least one cluster open (a finite bias).")  # fmt: skip
    if cluster_weights is not None:
        refuse_closed_clusters(bias, cluster_weights)


def refuse_closed_clusters(bias: torch.Tensor, cluster_weights: torch.Tensor) -> None:
    """A -inf ``bias`` (K,) or (H, K) on a cluster of positive weight: no sample may go there."""
    if bool((torch.isneginf(bias) & (cluster_weights > 0)).any()):
        raise ValueError(
            "infeasible: a cluster with positive weight has bias -inf, so no sample may go to it. "
            "Give it weight 0 in cluster_weights, or a finite bias."
        )


def solve_with_kernel(z, prototypes, bias, epsilon, *, allow_tf32, cluster_weights, sample_weights, max_iter, tol,
                      init, acceleration, over_relaxation, callback=None):  # fmt: skip
    """``sinkhorn_assign(features=...)`` on the Triton features kernel (:func:`uses_kernel` chose it); the caller
    warns when it did not converge."""
    from .backends.triton import TritonFeaturesOperator

    epsilon = check_epsilon(epsilon)
    acceleration = check_solver_options(max_iter, tol, acceleration, over_relaxation, callback)
    z, c3, bias_t, r, batched, bound, norms_alike = kernel_inputs(z, prototypes, bias, cluster_weights, epsilon)
    h, n = c3.shape[0], z.shape[0]
    # by the bound (the scores are never formed) and, where the norms allow it, the features' rows; the weights are
    # read for a collapse's message only
    warn_about_scores(features_summary(z, bound, norms_alike), epsilon, c3.shape[1],
                      None if cluster_weights is None else r, features=True)  # fmt: skip
    w = check_weights(sample_weights, n, "sample_weights", "number of samples N", z.device)
    operator = TritonFeaturesOperator(z, c3, bias_t, epsilon, w, allow_tf32=allow_tf32)
    b0 = check_init(init, h, r, operator.dtype, epsilon=epsilon)
    out = run_sinkhorn(operator, r, b0, max_iter, tol, acceleration, callback=callback,
                       has_zero_weights=False if cluster_weights is None else None)  # fmt: skip
    return package_result(operator, out, epsilon=epsilon, batched=batched, sample_weights=w)  # assign_features warns


def kernel_inputs(z: torch.Tensor, prototypes, bias, cluster_weights, epsilon=None):
    """Checked inputs of the features kernel: the features (N, D) and prototypes (H, K, D) in one dtype on ``z``'s
    device, the bias (fp32 or None), the cluster weights (K,), whether the prototypes carried a head dimension, and
    what the checks read (:func:`check_features`): the bound on ``|S|`` and whether every feature norm is one value.

    Features and prototypes of different dtypes are both cast to the wider one (float32 where that is float64, the
    kernels' arithmetic), as the torch path computes them: casting the prototypes down to the features' dtype
    (fp32 prototypes with bf16 features under autocast) silently rounded them to 8 bits, codes off by ~5e-3 at
    eps = 0.05. Pass both in bf16/fp16 for the 16-bit tensor-core rate; mixed, the features are copied."""
    z = dense_tensor(z, "features")  # the kernel reads raw memory: a negative bit would flip every score's sign
    c = open_host_array(prototypes, "prototypes", copied_anyway=True)
    bias_t = None if bias is None else open_host_array(bias, "bias", copied_anyway=True)
    dtype = torch.promote_types(z.dtype, c.dtype)
    dtype = torch.float32 if dtype == torch.float64 else dtype  # z is fp32/fp16/bf16 here (uses_kernel)
    z, c = z.detach().to(dtype), c.to(device=z.device, dtype=dtype)
    bias_t = None if bias_t is None else bias_t.to(device=z.device, dtype=torch.float32)
    check_feature_shapes(z.shape, c.shape, None if bias_t is None else bias_t.shape)
    batched = c.ndim == 3
    c3 = c if batched else c.unsqueeze(0)  # (H, K, D)
    r = check_weights(cluster_weights, c3.shape[1], "cluster_weights", "number of clusters K", z.device)
    h, k = c3.shape[:2]
    if bias_t is not None:
        bias_t = bias_t.expand(h, k).contiguous()
    bound, norms_alike = check_features(z, c3, bias_t, r, epsilon)
    return z, c3, bias_t, r, batched, bound, norms_alike
