"""The ``triton`` backend: fused kernels over a dense score tensor on a CUDA device.

Each Sinkhorn iteration is one pass over S (two kernel launches, no host synchronisation); the
workspace is allocated once per operator, so a whole solve can be captured in a CUDA graph. On a
machine without a GPU the same kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (slow; that is
how CI checks them). Triton is imported lazily: ``import otlabel`` never needs it.
"""

from __future__ import annotations

import functools
import importlib.util
import os

import torch

from .base import ScoreOperator

__all__ = ["TritonDenseOperator", "triton_available"]

_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.cache
def _triton_importable() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_available(tensor: torch.Tensor) -> bool:
    """Whether the triton backend can run on ``tensor``: a CUDA tensor with Triton installed, or any
    tensor when ``TRITON_INTERPRET=1`` (Triton's CPU interpreter)."""
    if not _triton_importable():
        return False
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        return True
    return tensor.is_cuda


class TritonDenseOperator(ScoreOperator):
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
        if scores.dtype not in _SCORE_DTYPES:
            raise TypeError(f"the triton backend takes float32, float16 or bfloat16 scores, got {scores.dtype}")
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
        self.inv_eps = 1.0 / float(epsilon)
        self.log_c = sample_weights.to(device=scores.device, dtype=torch.float32).log().contiguous()  # (N,)
        self.n_heads, self.n_samples, self.n_clusters = h, n, k
        self.device = scores.device
        self._workspace = sinkhorn_dense.DenseWorkspace.for_scores(scores)

    def cluster_lse(self, b: torch.Tensor | None) -> torch.Tensor:
        return self._kernels.dense_cluster_lse(self.scores, b, self.log_c, self.inv_eps, workspace=self._workspace)

    def assign(self, b: torch.Tensor, want_codes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._kernels.dense_assign(self.scores, b, self.inv_eps, want_codes, launch=self._workspace.launch)

    def transport_score(self, b: torch.Tensor) -> torch.Tensor:
        return self._kernels.dense_transport_score(
            self.scores, b, self.log_c, self.inv_eps, launch=self._workspace.launch
        )
