"""The seam between the solver loop and the backends.

The solver loop (``otlabel.solver``) only ever talks to a :class:`ScoreOperator`: an object that
knows where the scores live (a dense tensor, a GPU kernel, a file on disk, features and prototypes)
and can do what the loop and the result need: one pass per iteration (:meth:`ScoreOperator.cluster_lse`) and the
read-outs (labels, codes, objective).
Everything about devices, tiling, kernels and memory lives behind it; the loop itself (``otlabel.solver``: plain,
over-relaxed or Anderson-mixed steps) only does arithmetic on K-vectors.

Convention (see DESIGN.md §2): scores ``S`` of shape ``(H, N, K)`` (H independent heads), higher is
better, temperature ``eps``, sample weights ``c`` (N,), cluster weights ``r`` (K,). The plan is
``log P[h, j, k] = S[h, j, k] / eps + a[h, j] + b[h, k]``. The solver's state is ``b`` (H, K): the
sample potentials ``a`` are always the exact closed form ``a = log c - LSE_k(S / eps + b)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class ScoreOperator(ABC):
    """Scores of one (possibly batched) problem, as the solver loop sees them.

    Subclasses set ``n_heads``, ``n_samples``, ``n_clusters``, ``device`` and ``dtype`` (their compute dtype:
    float32, or float64 for the reference and for float64 input). The loop keeps its potentials in float64 and
    rounds them to ``dtype`` before handing them over, unless ``takes_float64_potentials`` is set: such operators
    (the torch ones) take the float64 potentials themselves, so that their rounding never reaches the column sums.
    """

    n_heads: int
    n_samples: int
    n_clusters: int
    device: torch.device
    dtype: torch.dtype
    takes_float64_potentials: bool = False  # see above; read by ``otlabel.solver.potentials_for``

    @abstractmethod
    def cluster_lse(self, b: torch.Tensor | None) -> torch.Tensor:
        """One pass over the scores: the log-sum-exp over samples that the cluster step needs.

        Returns ``(H, K)``: ``LSE_j( S[h, j, k] / eps + a[h, j] )`` where ``a = log c - LSE_k(S / eps + b)``
        is the exact sample step for the given cluster potentials ``b`` (H, K). ``b = None`` is the cold
        start, ``a = log c`` (the first half-step of classic Sinkhorn-Knopp from ``u = 1``).
        A cluster no sample may reach (all its scores ``-inf``) gives ``-inf``; so may a cluster whose ``b`` is
        ``-inf`` (weight 0: the loop sets its potential to ``-inf`` without reading it). The result may be float32 or
        float64 (operators that accumulate in float64 return it); the loop keeps its state in float64.
        """

    @abstractmethod
    def assign(self, b: torch.Tensor, want_codes: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Final read-out for cluster potentials ``b`` (H, K).

        Returns ``labels`` (H, N) int64 ``= argmax_k S / eps + b`` and, when ``want_codes``, ``codes``
        (H, N, K) ``= softmax_k(S / eps + b)`` (each row sums to 1) in ``self.dtype`` (float32, or float64
        for the reference and float64 input), else ``None``.
        """

    @abstractmethod
    def transport_score(self, b: torch.Tensor) -> torch.Tensor:
        """``<P, S>`` per head (H,) float64 for the plan defined by ``b``: ``sum_jk c_j codes_jk S_jk``."""

    def takes_plain_steps(self) -> bool:
        """Whether :meth:`plain_steps` takes steps here (False: the default)."""
        return False

    def plain_steps(self, b: torch.Tensor | None, log_r: torch.Tensor, r: torch.Tensor, n_steps: int,
                    tol: float | None, history: list[float] = (),
                    budget: int = 0) -> tuple[torch.Tensor, list[float], int]:  # fmt: skip
        """Up to ``n_steps`` plain Sinkhorn steps from ``b`` (H, K) float64 (``None``: the cold start) in one call,
        where the operator can take a small problem's whole loop at once (the CPU's compiled loops: see
        :meth:`takes_plain_steps`; the loop calls this only where it does). Every cluster weight is positive (``log_r``,
        ``r``: (K,) float64). Each step is the loop's own: ``b_new = log r - lse``, the error of ``b`` (see
        :func:`otlabel.solver.marginal_error`; none on the cold start: inf), then ``b_new`` less its mean.

        ``budget`` > 0 (with a ``tol``): the plain steps the solve may take in all, ``history`` the errors of those it
        took before this call; the call then stops once the rate of fall says ``tol`` is out of reach within them
        (``otlabel.backends.cpu_kernels.OUTLOOK``).

        Returns ``(b, errors, status)``: the iterate reached, each step's worst error over the heads, and 0 when the
        last error was below ``tol`` (``b`` is then that measured iterate), 1 when it stopped before a step it could
        not take as :meth:`cluster_lse` would (the loop takes that one), 2 when it took all ``n_steps``, 3 when it
        stopped with ``tol`` out of reach within ``budget``."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop what only the iterations and the final labels needed. The result keeps its operator for ``codes``,
        ``plan`` and ``objective``; an operator that caches something of the scores' size frees it here."""
        return None

    def agree(self, b: torch.Tensor) -> torch.Tensor:
        """The iterate every process continues from: ``b`` itself, except across ranks (``ShardedOperator``).

        The loop calls it after a step that did more than the plain Sinkhorn arithmetic (Anderson mixing,
        over-relaxation), whose small linear solves need not round identically on different hardware.
        """
        return b
