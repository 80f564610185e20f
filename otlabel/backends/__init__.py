"""Backends: each supplies a :class:`~otlabel.backends.base.ScoreOperator` for the solver loop.

* ``reference`` — float64, plain log-domain: the executable specification (slow, O(N·K) float64 memory).
* ``torch`` — any device; on CPU it exponentiates once and iterates with fused matrix-vector products.
* ``triton`` — fused GPU kernels (CUDA tensors; CPU tensors under ``TRITON_INTERPRET=1``).
* ``auto`` — ``triton`` for fp32/fp16/bf16 CUDA tensors when Triton is importable, else ``torch`` (float64
  scores keep their precision on the torch path).
"""

from __future__ import annotations

import torch

from ..problem import Problem
from .base import ScoreOperator

BACKENDS = ("auto", "torch", "reference", "triton")


def check_backend_name(name) -> None:
    """``name`` must be one of :data:`BACKENDS` (an array compared with them raised NumPy's "truth value ... is
    ambiguous")."""
    if not isinstance(name, str) or name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}.")


def resolve_backend(name: str, problem: Problem) -> str:
    check_backend_name(name)
    if name == "auto":
        kernel_dtype = problem.scores.dtype != torch.float64  # float64 keeps full precision on the torch path
        return "triton" if problem.scores.is_cuda and kernel_dtype and _triton_usable(problem.scores) else "torch"
    if name == "triton" and not _triton_usable(problem.scores):
        raise RuntimeError(
            "backend='triton' needs Triton >= 3.0 and a CUDA tensor (or TRITON_INTERPRET=1 to run the kernels on "
            "the CPU, slowly). Install otlabel[triton], move scores to the GPU, or use backend='torch'."
        )
    return name


def make_operator(problem: Problem, backend: str = "auto") -> ScoreOperator:
    """The operator that gives the solver loop its passes over ``problem.scores``."""
    name = resolve_backend(backend, problem)
    args = (problem.scores, problem.epsilon, problem.sample_weights)
    if name == "reference":
        from .reference import ReferenceOperator

        return ReferenceOperator(*args)
    if name == "triton":
        from .triton import TritonDenseOperator

        return TritonDenseOperator(*args)
    from ..sources import DenseSource
    from .torch_backend import make_torch_operator

    source = DenseSource(problem.scores, known_column_max=problem.column_max)
    return make_torch_operator(source, problem.epsilon, problem.sample_weights)


def _triton_usable(scores) -> bool:
    try:
        from .triton import triton_available
    except ImportError:
        return False
    return triton_available(scores)
