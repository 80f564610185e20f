"""The ``triton`` backend: fused kernels over a dense score tensor, or over features and prototypes whose
product is never stored (``TritonFeaturesOperator``), on a CUDA device.

Each Sinkhorn iteration is one pass over S (two kernel launches, no host synchronisation); the
workspace is allocated once per operator, so a whole solve can be captured in a CUDA graph. On a
machine without a GPU the same kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (slow; that is
how CI checks them). Triton is imported lazily: ``import otlabel`` never needs it.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import importlib.util
import os
import re

import torch

from ..kernels.utils import KERNEL_DTYPES  # no Triton: the kernel modules themselves are imported lazily, below
from ..problem import check_inverse_epsilon
from .base import ScoreOperator

__all__ = ["TritonDenseOperator", "TritonFeaturesOperator", "triton_available"]


MIN_TRITON = (3, 0)  # the kernels' language level (otlabel[triton] asks for triton>=3.0)


@functools.cache
def triton_installed() -> bool:
    """Whether a Triton the kernels can run on is installed, without importing it: torch 2.1 brings Triton 2.1,
    whose language the kernels do not target, and ``backend="auto"`` picked it on a GPU all the same."""
    return importlib.util.find_spec("triton") is not None and triton_version() >= MIN_TRITON


def triton_version() -> tuple[int, ...]:
    """The installed Triton's (major, minor), from its package metadata; (0,) when that cannot be read."""
    try:
        release = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        return (0,)
    parts = [int(p) for p in re.findall(r"\d+", release)[:2]]
    return tuple(parts) or (0,)


def triton_available(tensor: torch.Tensor) -> bool:
    """Whether the triton backend can run on ``tensor``: a CUDA tensor with Triton installed, or any
    tensor when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    if not triton_installed():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return tensor.is_cuda


def on_own_device(method):
    """Run an operator method with its tensors' CUDA device current: Triton launches on the current device, which
    need not be the one the tensors live on (``cuda:1`` data while ``cuda:0`` is current)."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        context = torch.cuda.device(self.device) if self.device.type == "cuda" else contextlib.nullcontext()
        with context:
            return method(self, *args, **kwargs)

    return wrapper


def kernel_inv_eps(epsilon: float) -> float:
    """1/eps for the kernels, which take it as a float32 scalar: refused where that underflows (eps above ~1e38),
    which silently made every score 0 and the codes NaN."""
    inv_eps = 1.0 / float(epsilon)
    check_inverse_epsilon(epsilon, torch.float32)
    if inv_eps < torch.finfo(torch.float32).tiny:
        raise ValueError(
            f"epsilon={epsilon:g} is too large for the Triton kernels: 1/epsilon underflows in their float32 "
            "arithmetic. Such an epsilon makes the plan uniform; choose one on the scale of the scores' differences "
            "(or pass backend='torch', which computes 1/epsilon in the scores' own dtype)."
        )
    return inv_eps


class _PicklableKernels:
    """An operator keeps its kernels' module in ``self._kernels`` (imported once, for the hot path). A module cannot
    be pickled, so a pickled operator (inside a pickled ``SinkhornResult``, whose codes and objective are read out
    lazily) stores the module's name and imports it again when loaded."""

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_kernels"] = state["_kernels"].__name__
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state, _kernels=importlib.import_module(state["_kernels"]))


class TritonDenseOperator(_PicklableKernels, ScoreOperator):
    """Scores S (H, N, K) held on the device, read by Triton kernels.

    Parameters
    ----------
    scores : (H, N, K) float32, float16 or bfloat16 tensor, any strides (a transposed view of an
        (H, K, N) tensor is read in place). Never copied or upcast.
    epsilon : temperature eps > 0; the kernels use ``x = S / eps``.
    sample_weights : (N,) non-negative weights c; a zero weight makes that sample contribute nothing.
    """

    dtype = torch.float32

    def __init__(self, scores: torch.Tensor, epsilon: float, sample_weights: torch.Tensor):
        if scores.dim() != 3:
            raise ValueError(f"scores must be (H, N, K), got shape {tuple(scores.shape)}")
        if scores.dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"the triton backend takes float32, float16 or bfloat16 scores, got {scores.dtype}: cast them "
                "(scores.float()), or pass backend='torch', which solves float64 scores in float64."
            )
        if not triton_available(scores):
            raise RuntimeError(
                "the triton backend needs a CUDA tensor and Triton installed "
                "(or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)"
            )
        h, n, k = scores.shape
        if sample_weights.shape != (n,):
            raise ValueError(f"sample_weights must be (N,) = ({n},), got {tuple(sample_weights.shape)}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        from otlabel.kernels import sinkhorn_dense  # lazy: imports triton

        self._kernels = sinkhorn_dense
        self.scores = scores  # (H, N, K)
        self.inv_eps = kernel_inv_eps(epsilon)
        self.log_c = sample_weights.to(device=scores.device, dtype=torch.float32).log().contiguous()  # (N,)
        self.n_heads, self.n_samples, self.n_clusters = h, n, k
        self.device = scores.device
        self._workspace = sinkhorn_dense.DenseWorkspace.for_scores(scores)
        self._readout_launch = sinkhorn_dense.default_launch(scores, readout=True)

    @on_own_device
    def cluster_lse(self, b: torch.Tensor | None) -> torch.Tensor:
        return self._kernels.dense_cluster_lse(self.scores, b, self.log_c, self.inv_eps, workspace=self._workspace)

    @on_own_device
    def assign(self, b: torch.Tensor, want_codes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._kernels.dense_assign(self.scores, b, self.inv_eps, want_codes, launch=self._readout_launch)

    @on_own_device
    def transport_score(self, b: torch.Tensor) -> torch.Tensor:
        return self._kernels.dense_transport_score(
            self.scores, b, self.log_c, self.inv_eps, launch=self._readout_launch
        )


class TritonFeaturesOperator(_PicklableKernels, ScoreOperator):
    """Scores ``S[h, j, k] = <Z_j, C_{h,k}> + bias[h, k]`` computed tile by tile inside the kernels, never stored.

    Features mode (issue 4): memory O((N + H K) D) for the inputs plus an (H, P, K) workspace, P a small
    multiple of the SM count (about 6 MB at K = 3000 on an H100), and 4 bytes per sample per head (the sample
    potentials the column-mass merge may read back: 5 MB at N = 1.28M). Each warm iteration makes two tensor-core
    sweeps over the prototypes per row tile (see ``otlabel.kernels.sinkhorn_features``).

    Parameters
    ----------
    features : (N, D) float32, float16 or bfloat16 tensor Z, any strides. Never copied or upcast.
    prototypes : (H, K, D) tensor C (or (K, D) for one head), the features' dtype and device, any strides.
    bias : (H, K) or (K,) per-cluster bias (a linear head's), or None. Kept in fp32; ``-inf`` closes a cluster.
    epsilon : temperature eps > 0; the kernels use ``x = S / eps``.
    sample_weights : (N,) non-negative weights c; a zero weight makes that sample contribute nothing.
    allow_tf32 : fp32 inputs only: True multiplies on tf32 tensor cores (10-bit mantissa products, fp32
        accumulation; scores good to about 1e-3 relative), False computes exact fp32 products (``"ieee"``,
        several times slower). fp16/bf16 inputs always use their native tensor cores with fp32 accumulation.
    input_precision : overrides ``allow_tf32`` for fp32 inputs: ``"tf32"``, ``"ieee"``, ``"tf32x3"`` or ``"fp16"``
        (Z and C scaled by powers of two and rounded to fp16 — tf32's 10-bit mantissa, rounded to nearest — on the
        fp16 tensor cores, twice tf32's rate; see ``otlabel.kernels.sinkhorn_features.prepare_fp16``; costs one pass
        over Z and a host sync here, and a fp16 copy of C).
    """

    dtype = torch.float32

    def __init__(
        self,
        features: torch.Tensor,
        prototypes: torch.Tensor,
        bias: torch.Tensor | None,
        epsilon: float,
        sample_weights: torch.Tensor,
        allow_tf32: bool = True,
        *,
        input_precision: str | None = None,
        launch=None,
    ):
        if features.dim() != 2:
            raise ValueError(f"features must be (N, D), got shape {tuple(features.shape)}")
        if prototypes.dim() == 2:
            prototypes = prototypes.unsqueeze(0)  # (K, D) -> (1, K, D): one head
        if prototypes.dim() != 3:
            raise ValueError(f"prototypes must be (H, K, D) or (K, D), got shape {tuple(prototypes.shape)}")
        if features.dtype not in KERNEL_DTYPES:
            raise TypeError(f"the triton backend takes float32, float16 or bfloat16 features, got {features.dtype}")
        if prototypes.dtype != features.dtype:
            raise TypeError(
                f"prototypes ({prototypes.dtype}) and features ({features.dtype}) must share a dtype; "
                "cast one of them (the kernels multiply them on tensor cores as they are)"
            )
        if prototypes.device != features.device:
            raise ValueError(f"features are on {features.device} but prototypes on {prototypes.device}")
        n, d = features.shape
        h, k, d2 = prototypes.shape
        if d2 != d:
            raise ValueError(f"features have D = {d} but prototypes have D = {d2}: both must be (., D)")
        if sample_weights.shape != (n,):
            raise ValueError(f"sample_weights must be (N,) = ({n},), got {tuple(sample_weights.shape)}")
        if not epsilon > 0:
            raise ValueError(f"epsilon must be > 0, got {epsilon}")
        if not triton_available(features):
            raise RuntimeError(
                "the triton backend needs CUDA tensors and Triton installed "
                "(or TRITON_INTERPRET=1 to run its kernels on the CPU, slowly)"
            )
        if bias is not None:
            if bias.dim() == 1:
                bias = bias.unsqueeze(0).expand(h, -1)
            if bias.shape != (h, k):
                raise ValueError(f"bias must be (H, K) = ({h}, {k}) or (K,), got {tuple(bias.shape)}")
            bias = bias.to(device=features.device, dtype=torch.float32).contiguous()  # (H, K)
        from otlabel.kernels import sinkhorn_features  # lazy: imports triton

        self._kernels = sinkhorn_features
        self.input_precision = input_precision or ("tf32" if allow_tf32 else "ieee")
        if self.input_precision not in sinkhorn_features.INPUT_PRECISIONS:
            raise ValueError(
                f"input_precision must be one of {sinkhorn_features.INPUT_PRECISIONS}, got {self.input_precision!r}"
            )
        self.scales = (1.0, 1.0)  # powers of two applied to Z and C before fp16 rounding ("fp16" only)
        if self.input_precision == "fp16" and features.dtype == torch.float32:
            prototypes, self.scales = sinkhorn_features.prepare_fp16(features, prototypes)  # (H, K, D) fp16
        self.features, self.prototypes, self.bias = features, prototypes, bias
        self.inv_eps = kernel_inv_eps(epsilon)
        # The partials kernel adds the bias in base-2 logit units: scaled once here, not per iteration.
        self._bias2 = None if bias is None else bias * (self.inv_eps * sinkhorn_features.LOG2E)  # (H, K)
        self.log_c = sample_weights.to(device=features.device, dtype=torch.float32).log().contiguous()  # (N,)
        self.n_heads, self.n_samples, self.n_clusters = h, n, k
        self.device = features.device
        self._workspace = sinkhorn_features.FeaturesWorkspace.for_inputs(
            features, prototypes, launch, precision=self.input_precision
        )

    @on_own_device
    def cluster_lse(self, b: torch.Tensor | None) -> torch.Tensor:
        return self._kernels.features_cluster_lse(
            self.features, self.prototypes, self._bias2, b, self.log_c, self.inv_eps,
            input_precision=self.input_precision, scales=self.scales, workspace=self._workspace,
        )  # fmt: skip

    @on_own_device
    def assign(self, b: torch.Tensor, want_codes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._kernels.features_assign(
            self.features, self.prototypes, self.bias, b, self.inv_eps, want_codes,
            input_precision=self.input_precision, scales=self.scales, launch=self._workspace.launch,
        )  # fmt: skip

    @on_own_device
    def transport_score(self, b: torch.Tensor) -> torch.Tensor:
        return self._kernels.features_transport_score(
            self.features, self.prototypes, self.bias, b, self.log_c, self.inv_eps,
            input_precision=self.input_precision, scales=self.scales, launch=self._workspace.launch,
        )  # fmt: skip
