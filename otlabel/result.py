"""The result of a solve: potentials, convergence record, and read-outs computed on demand."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from .backends.base import ScoreOperator
from .entry import entry_point


class ConvergenceWarning(UserWarning):
    """Sinkhorn stopped at ``max_iter`` with the marginal error still above ``tol``."""


@dataclass(eq=False, init=False)
class SinkhornResult:
    """What :func:`otlabel.sinkhorn_assign` (and the streamed and sharded entry points) return.

    Shapes are the caller's: ``(N, ...)`` for a 2-d input, ``(H, N, ...)`` for a batched one.

    Attributes:
        labels: (N,) int64 — ``argmax_k`` of the balanced plan (hard pseudo-labels).
        cluster_potentials: (K,) — the cluster log-potentials ``b``; pass as ``init=`` to warm-start the
            next call on similar scores. Zero-weight clusters hold ``-inf``.
        n_iter: iterations run (one pass over the scores each).
        converged: whether the cluster-marginal error went below ``tol``.
        marginal_error: L1 error ``sum_k |sum_j P[j, k] - r_k|`` of the returned plan when converged. Otherwise
            the error measured at the iterate the returned plan is one step from: the last one with plain or
            over-relaxed steps (with a fixed iteration count, ``tol=None``, SwAV's iterates), and with Anderson
            mixing the best one measured, the returned plan being the plain step from it (a last mixed step is
            never measured, and could be worse). A plain step did not raise the error in any solve we tested.
            The sample marginal is exact by construction.
        errors: that error at every iteration (``inf`` for the cold-start iteration, which has no plan yet).
        epsilon: the temperature used.

    Batched input ``(H, N, K)``: the H heads are iterated together, in the same passes, until the worst head
    reaches ``tol``. ``n_iter``, ``converged``, ``marginal_error`` and ``errors`` are therefore shared by all
    heads: the iteration count of the slowest head and, at every iteration, the largest error of any head (a
    head that alone would have stopped earlier keeps iterating with the others; when the solve converged, every
    head's error is below ``tol``). ``labels``, ``cluster_potentials``, ``codes`` and ``objective`` are per head.
    The heads share ``cluster_weights`` and ``sample_weights`` ((K,) and (N,); per-head weights are not taken).

    ``codes`` (N, K) — each row a softmax summing to 1; float32, or float64 for float64 input and the
    reference backend — and ``objective`` cost one more pass over the scores and are computed on first
    access, then kept (``codes`` holds ``4·N·K`` bytes in float32). ``plan`` is ``codes`` times the sample
    weights, a new (N, K) tensor on every read (not kept). That pass reads the inputs as they are then, without a
    copy: scores or features changed in place since the solve (a reused buffer, a queue), or the prototypes of the
    CUDA features kernel (after ``optimizer.step()``), give codes that belong to other scores than ``labels``. Read
    ``codes`` before changing them.

    ``res.to(device)`` (a ``torch.device``, a string such as ``"cpu"`` or ``"cuda:1"``, or a device index) and
    ``res.cpu()`` give a new result whose tensors are on ``device``: ``labels``, ``cluster_potentials``, and ``codes``
    and ``objective`` where already read; tensors already there are shared, not copied (as ``Tensor.to``), and
    ``non_blocking=True`` is passed on to their copies. The scores stay where they are: ``codes``, ``plan`` and
    ``objective`` first read on the moved result are computed on the solve's device from the solve's potentials,
    exactly as on the original (the same values), then moved. So a result moved off a GPU still needs the scores
    there for them, and keeps them alive as the original does: read ``codes`` before moving it, or keep the tensors
    alone, to free them. It moves, it does not convert: a ``dtype`` is refused (convert the tensor you need:
    ``res.codes.half()``).

    A result pickles with the inputs its lazy read-outs need (the scores), so ``torch.load`` takes it only with
    ``weights_only=False``; to keep pseudo-labels, save ``labels``, ``codes`` and ``cluster_potentials`` (tensors,
    which load with the defaults).

    Results are made by the solvers, not by hand: the constructor's ``internal`` keywords carry the solver's
    state that ``codes``, ``plan`` and ``objective`` are computed from.
    """

    labels: torch.Tensor
    cluster_potentials: torch.Tensor
    n_iter: int
    converged: bool
    marginal_error: float
    errors: list[float]
    epsilon: float
    # The solver's state for the lazy read-outs: the operator over the scores, the sample weights, whether the
    # caller's input had a head dimension, codes already written (streamed outputs) and the objective once computed.
    # Fields (so that dataclasses.replace copies them), with no class-level defaults and given through **internal,
    # so that help() shows the public fields only.
    _operator: ScoreOperator = field(repr=False)
    _sample_weights: torch.Tensor = field(repr=False)
    _batched: bool = field(repr=False)
    _codes: torch.Tensor | None = field(repr=False)
    _objective: torch.Tensor | None = field(repr=False)
    # After .to(device): that device, where the lazy read-outs are moved, and the potentials as the solve left them
    # (on its device), which they are computed from. None for a result as the solver made it. Class-level defaults
    # (unlike the fields above): a result pickled by an otlabel without .to() has neither, and reads them from here.
    _device: torch.device | None = field(default=None, repr=False)
    _solve_potentials: torch.Tensor | None = field(default=None, repr=False)

    def __init__(self, labels, cluster_potentials, n_iter, converged, marginal_error, errors, epsilon, **internal):
        self.labels, self.cluster_potentials, self.n_iter = labels, cluster_potentials, n_iter
        self.converged, self.marginal_error, self.errors, self.epsilon = converged, marginal_error, errors, epsilon
        missing = {"_operator", "_sample_weights", "_batched"} - internal.keys()
        if missing:
            raise TypeError(f"SinkhornResult is made by otlabel's solvers: the solver's state {sorted(missing)} is "
                            "missing.")  # fmt: skip
        self._operator = internal.pop("_operator")
        self._sample_weights = internal.pop("_sample_weights")
        self._batched = internal.pop("_batched")
        self._codes = internal.pop("_codes", None)
        self._objective = internal.pop("_objective", None)
        self._device = internal.pop("_device", None)
        self._solve_potentials = internal.pop("_solve_potentials", None)
        if internal:
            raise TypeError(f"SinkhornResult got unexpected keyword arguments {sorted(internal)}.")

    def __repr__(self) -> str:
        # A summary: the full labels, potentials and error history would run to megabytes for a real solve.
        labels = f"labels={tuple(self.labels.shape)} {str(self.labels.dtype).removeprefix('torch.')}"
        state = "converged" if self.converged else "not converged"
        return (
            f"SinkhornResult({labels} on {self.labels.device}, {state} after {self.n_iter} iterations, "
            f"marginal_error={self.marginal_error:.3g}, epsilon={self.epsilon:g})"
        )

    @property
    def codes(self) -> torch.Tensor:
        """Soft assignments ``softmax_k(S / eps + b)``, (N, K); rows sum to 1 (SwAV's ``q``)."""
        if self._codes is None:  # once read, a plain attribute read: the entry point's checks cost ~0.1-3 us
            self._codes = self._compute_codes()
        return self._codes

    @entry_point
    def _compute_codes(self) -> torch.Tensor:
        _, codes = self._operator.assign(self._potentials_3d(), want_codes=True)
        return self._moved(self._shape(codes))

    @property
    def plan(self) -> torch.Tensor:
        """The transport plan ``P = codes * c[:, None]`` (N, K): rows sum to ``c``, columns to ``r``.

        Not kept: every read multiplies ``codes`` anew into a new (N, K) tensor in memory (``4·N·K`` bytes in float32,
        even where ``codes`` is a view of a ``codes_out`` file), so keep it in a variable (``plan = res.plan``) to use
        it more than once."""
        return self.codes * self._sample_weights.to(self.codes.dtype)[:, None]

    @property
    def objective(self) -> torch.Tensor | float:
        """``<P, S>``: the total score of the plan (float64; a tensor of H values for a batched input)."""
        if self._objective is None:
            self._objective = self._compute_objective()
        return self._objective if self._batched else float(self._objective[0])

    @entry_point
    def _compute_objective(self) -> torch.Tensor:
        return self._moved(self._operator.transport_score(self._potentials_3d()))

    def _potentials_3d(self) -> torch.Tensor:
        b = self.cluster_potentials if self._solve_potentials is None else self._solve_potentials
        return (b if self._batched else b.unsqueeze(0)).to(self._operator.dtype)

    def _moved(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._device is None else x.to(self._device)

    def to(self, device=None, *, dtype=None, non_blocking: bool = False) -> SinkhornResult:
        """A new result with its tensors on ``device`` (see the class's docstring); the scores stay where they are.

        ``device``: a ``torch.device``, a string (``"cpu"``, ``"cuda:1"``) or a device index (as ``torch.device(i)``:
        CUDA's on a CUDA machine)."""
        if isinstance(device, torch.dtype) or dtype is not None:
            raise TypeError(
                "SinkhornResult.to moves a result between devices; it does not convert dtypes (labels are int64, "
                f"the potentials keep the solve's precision): got dtype {device if dtype is None else dtype}. "
                "Convert the tensor you need instead, e.g. res.codes.to(torch.float16)."
            )
        if isinstance(device, torch.Tensor):
            raise TypeError(
                "SinkhornResult.to takes a device, not a tensor: pass the tensor's device, res.to(x.device)."
            )
        if device is None:
            raise TypeError("SinkhornResult.to needs a device: res.to('cpu'), res.to(torch.device('cuda', 0)).")
        if not isinstance(device, (torch.device, str, int)) or isinstance(device, bool):
            raise TypeError(
                f"SinkhornResult.to takes a torch.device, a device string or a device index, not "
                f"{type(device).__name__}: res.to('cpu'), res.to('cuda:0')."
            )
        try:
            device = torch.device(device)
        except RuntimeError as e:
            if not isinstance(device, int):
                raise  # torch's own message names the device types it knows
            # torch reads an index as its accelerator's (CUDA's where there is one; torch 2.13); with none, its error
            # ("Cannot access accelerator device when none is available.") said nothing of the index or what to pass
            raise ValueError(
                f"SinkhornResult.to({device}): an integer is a device index of this machine's accelerator, and torch "
                f"could not use it ({e}). Pass a device string instead: res.cpu(), res.to('cuda:0')."
            ) from e

        def move(x):
            return None if x is None else x.to(device, non_blocking=non_blocking)

        return SinkhornResult(
            labels=move(self.labels),
            cluster_potentials=move(self.cluster_potentials),
            n_iter=self.n_iter,
            converged=self.converged,
            marginal_error=self.marginal_error,
            errors=list(self.errors),
            epsilon=self.epsilon,
            _operator=self._operator,
            _sample_weights=move(self._sample_weights),
            _batched=self._batched,
            _codes=move(self._codes),
            _objective=move(self._objective),
            _device=device,
            _solve_potentials=self.cluster_potentials if self._solve_potentials is None else self._solve_potentials,
        )

    def cpu(self) -> SinkhornResult:
        """``self.to("cpu")``: a new result with its tensors in host memory (see :meth:`to`)."""
        return self.to("cpu")

    def _shape(self, x: torch.Tensor) -> torch.Tensor:
        return x if self._batched else x[0]
