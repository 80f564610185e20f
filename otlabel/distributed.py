"""Sharded solve over ``torch.distributed``: each rank holds its own samples; ranks exchange K-vectors only.

One code path for any world size — with ``group=None`` or a group of one process there are no collectives::

    rank r:   local scores (N_r, K)
                 │  local pass (the rank's usual backend: CPU kernel, torch, Triton)
                 ▼
              lse_r[k] = LSE_{j in rank r}( S[j, k] / eps + a[j] )              (H, K)
                 │  all_gather: every rank receives every rank's (H, K)      (W·H·K floats)
                 ▼
              lse[k] = LSE_r lse_r[k]   (max, then sum of exp, in rank order: identical bits on every rank)
              b_new = log r - lse;  err = sum_k r_k |exp(b - b_new) - 1|;  stop if err < tol
                 │  (decided on all-gathered quantities only: same iterations and `converged` everywhere;
                 │   a mixed or over-relaxed step is broadcast from rank 0, whose solve every rank then uses)
                 ▼
              next pass ...   finally each rank labels its own samples: argmax_k S[j, k] / eps + b[k]

Sample weights are global: by default ``1 / N`` with ``N = sum_r N_r`` (uneven shards are fine); explicit
weights are each rank's slice of one vector that sums to 1 over all ranks. Before iterating, two small
all-gathers check that the ranks agree (K, heads, dtype, epsilon, tol, max_iter, cluster weights, warm start) and
that every rank's input is valid: a bad rank makes every rank raise, instead of leaving the others waiting.
Every collective waits at most ``timeout`` seconds, so a rank that died or never calls gives an error, not a hang.
Gloo (CPU tensors) and NCCL (CUDA tensors) both work; NCCL collectives run on the current CUDA device.
"""

from __future__ import annotations

import math
import warnings
from datetime import timedelta

import torch
import torch.distributed as dist

from .backends import make_operator, resolve_backend
from .backends.base import ScoreOperator
from .problem import Problem, as_tensor, check_epsilon, check_scores, check_weights
from .result import SinkhornResult
from .solver import (
    ADAPTIVE,
    ANDERSON,
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    check_init,
    check_solver_options,
    package_result,
    run_sinkhorn,
    warn_if_not_converged,
)
from .streaming import check_columns, check_rows

__all__ = ["ShardedOperator", "sinkhorn_assign_sharded"]

DEFAULT_TIMEOUT = 600.0  # seconds per collective: one iteration of the slowest rank must fit
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}


class Collectives:
    """The few collectives the solver needs, each with a timeout; a no-op for ``group=None`` or one process."""

    def __init__(self, group, timeout: float):
        self.group = group
        self.active = group is not None and dist.get_world_size(group) > 1
        self.world = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        self.timeout = timeout
        self.device = torch.device("cpu")
        if self.active and dist.get_backend(group) == "nccl":
            self.device = torch.device("cuda", torch.cuda.current_device())

    def all_gather(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's ``t`` stacked in rank order, ``(W, *t.shape)``, on ``t``'s device."""
        if not self.active:
            return t[None]
        send = t.detach().to(self.device).reshape(-1)
        out = torch.empty(self.world * send.numel(), dtype=send.dtype, device=self.device)  # rank-major
        gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10
        self._wait(lambda: gather(out, send, group=self.group, async_op=True), f"all-gather of the {what}")
        return out.view(self.world, *t.shape).to(t.device)

    def from_first_rank(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (a broadcast), on ``t``'s device."""
        if not self.active:
            return t
        buf = t.detach().to(self.device).contiguous().clone()
        root = dist.get_global_rank(self.group, 0)  # broadcast names its source by global rank
        self._wait(lambda: dist.broadcast(buf, src=root, group=self.group, async_op=True), f"broadcast of the {what}")
        return buf.to(t.device)

    def _wait(self, start, what: str) -> None:
        """Start a collective and wait for it at most ``timeout`` seconds; a rank that never joins is an error."""
        try:
            start().wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as err:
            raise RuntimeError(
                f"sinkhorn_assign_sharded: rank {self.rank} gave up on the {what} after waiting "
                f"up to {self.timeout:g} s: another rank failed, exited, or did not call with the same arguments "
                f"({type(err).__name__}: {err}). Raise timeout= if one iteration of the slowest rank takes longer."
            ) from err


class ShardedOperator(ScoreOperator):
    """The local operator of one rank, made global: ``cluster_lse`` combines every rank's partial LSE.

    ``assign`` stays local (each rank labels its own samples); ``transport_score`` sums over ranks, so reading
    ``result.objective`` is a collective: call it on every rank or on none.
    """

    def __init__(self, local: ScoreOperator, comm: Collectives):
        self.local, self.comm = local, comm
        self.n_heads, self.n_samples, self.n_clusters = local.n_heads, local.n_samples, local.n_clusters
        self.device, self.dtype = local.device, local.dtype

    def cluster_lse(self, b):
        lse = self.local.cluster_lse(b).double()  # (H, K); one dtype on every rank and every pass
        return torch.logsumexp(self.comm.all_gather(lse, "cluster log-sum-exps"), dim=0)  # rank order

    def agree(self, b):
        # Mixed or over-relaxed iterates come out of small linear solves that may round differently on
        # different hardware; drifting apart would split the ranks' error trajectories (and iteration counts,
        # which ends in a timeout). Everyone continues from rank 0's iterate: H*K floats per iteration.
        return self.comm.from_first_rank(b, "mixed cluster potentials")

    def assign(self, b, want_codes):
        return self.local.assign(b, want_codes)

    def transport_score(self, b):
        parts = self.comm.all_gather(self.local.transport_score(b), "transport scores")  # (W, H)
        total = parts[0]
        for part in parts[1:]:  # rank order: identical on every rank
            total = total + part
        return total


def sinkhorn_assign_sharded(
    local_scores,
    epsilon: float = 0.05,
    *,
    group=None,
    cluster_weights=None,
    sample_weights=None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float | None = DEFAULT_TOL,
    init=None,
    backend: str = "auto",
    acceleration: str = "auto",
    over_relaxation: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    callback=None,
    warn: bool = True,
) -> SinkhornResult:
    r""":func:`otlabel.sinkhorn_assign` over samples sharded across the ranks of a process group.

    Every rank calls this with its own samples (any number per rank, at least one) and the same other
    arguments. The problem solved is the one over the concatenation of all ranks' samples (in rank order):
    the result on each rank is that rank's slice of the single-process result, up to fp32 rounding (identical
    labels for tie-free scores). Per iteration the ranks exchange ``W·H·K`` floats; nothing of size N moves.

    Args:
        local_scores: this rank's ``(N_r, K)`` or ``(H, N_r, K)`` scores (torch tensor on any device, or a NumPy
            array): CPU tensors with Gloo, CUDA tensors with NCCL.
        group: the ``torch.distributed`` process group (e.g. ``torch.distributed.group.WORLD`` under
            ``torchrun``). ``None`` (or a group of one process) solves this rank's samples alone, with no
            collectives.
        sample_weights: this rank's slice ``(N_r,)`` of global sample weights that sum to 1 over all ranks.
            Default: ``1 / N`` for every sample, ``N`` the total over ranks.
        cluster_weights: ``(K,)``, the same on every rank (checked).
        timeout: seconds any collective may wait for the other ranks before raising ``RuntimeError``.
        epsilon, max_iter, tol, init, backend, acceleration, over_relaxation, callback, warn: as in
            :func:`otlabel.sinkhorn_assign`; they must agree across ranks (checked).

    Returns:
        :class:`~otlabel.SinkhornResult` with this rank's ``labels`` (N_r,) and ``codes``, and the global
        ``cluster_potentials``, ``n_iter``, ``converged`` and errors — identical on every rank. ``objective`` is
        the global ``<P, S>`` and a collective.
    """
    if group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        warnings.warn(
            "sinkhorn_assign_sharded(group=None) solves this rank's samples alone although torch.distributed is "
            "initialised with several ranks; pass group=torch.distributed.group.WORLD to solve over all of them.",
            UserWarning,
            stacklevel=2,
        )
    comm = Collectives(group, timeout)
    failure, meta, problem, local_max = None, None, None, None
    try:  # local checks: a failure is shared with the other ranks below, not raised before they hear of it
        epsilon = check_epsilon(epsilon)
        acceleration = check_solver_options(max_iter, tol, acceleration, over_relaxation)
        scores3, batched = check_scores(local_scores)
        h, n, k = scores3.shape
        device = scores3.device
        r = check_weights(cluster_weights, k, "cluster_weights", "number of clusters K (last dimension)", device)
        c_local = None
        if sample_weights is not None:
            c_local = check_local_weights(sample_weights, n, device)
        check_rows(scores3, r, where=f" of rank {comm.rank}'s shard")
        local_max = scores3.amax(dim=1).double()  # (H, K)
        draft = Problem(scores=scores3, epsilon=epsilon, sample_weights=None, cluster_weights=r, batched=batched)
        resolve_backend(backend, draft)  # an unusable backend fails here, on its rank, before any collective
        check_init(init, draft, torch.float64)
        meta = [h, n, k, DTYPE_CODES[scores3.dtype], float(batched), epsilon, -1.0 if tol is None else tol]
        omega_code = ACCELERATION_CODES.get(acceleration, acceleration)  # collectives carry numbers
        meta += [max_iter, omega_code, float(c_local is not None)]
        meta += [0.0 if c_local is None else float(c_local.sum()), float(init is not None)]
    except (ValueError, TypeError, RuntimeError) as err:
        failure = err
    metas = comm.all_gather(torch.tensor([0.0 if failure is None else 1.0] + (meta or [math.nan] * 12)), "checks")
    bad = [i for i in range(comm.world) if metas[i, 0] != 0]
    if bad:
        if failure is not None:
            raise failure
        raise ValueError(f"sinkhorn_assign_sharded: rank(s) {bad} rejected their input (see the error on those ranks).")
    check_agreement(metas[:, 1:])
    n_total = int(metas[:, 2].sum())
    if c_local is None:
        c_local = torch.full((n,), 1.0 / n_total, dtype=torch.float64, device=device)
    elif abs(float(metas[:, 11].sum()) - 1.0) > 1e-4:
        raise ValueError(
            f"sample_weights must sum to 1 over all ranks, got a sum of {float(metas[:, 11].sum()):.6g}. Pass each "
            "rank its slice of one global weight vector (w / w.sum() for counts)."
        )
    problem = Problem(scores=scores3, epsilon=epsilon, sample_weights=c_local, cluster_weights=r, batched=batched)
    operator = make_operator(problem, backend)
    init = check_init(init, problem, operator.dtype)
    shared = torch.cat([local_max.flatten(), r.double().cpu()])
    if init is not None:
        shared = torch.cat([shared, init.double().flatten().cpu()])
    shared = comm.all_gather(shared.cpu(), "column maxima and cluster weights")  # (W, H K + K [+ H K])
    if not bool((shared[:, h * k :] == shared[:1, h * k :]).all()):
        raise ValueError(
            "cluster_weights (or init) differ between ranks: every rank must pass the same (K,) cluster weights."
        )
    check_columns(shared[:, : h * k].amax(dim=0).view(h, k).to(device), r)
    sharded = ShardedOperator(operator, comm)
    out = run_sinkhorn(sharded, r, init, max_iter, tol, acceleration, callback=callback)
    if warn:
        warn_if_not_converged("sinkhorn_assign_sharded", out, tol, max_iter, epsilon)
    return package_result(problem, sharded, out)


def check_local_weights(weights, n: int, device) -> torch.Tensor:
    """This rank's slice of the global sample weights: (N_r,), finite, non-negative (the sum is checked globally)."""
    w = as_tensor(weights, "sample_weights")
    if w.shape != (n,):
        raise ValueError(f"sample_weights must have shape ({n},), this rank's number of samples, got {tuple(w.shape)}.")
    w = w.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("sample_weights must be finite and non-negative.")
    return w


ACCELERATION_CODES = {ADAPTIVE: -1.0, ANDERSON: -2.0}  # a fixed omega travels as itself

AGREEMENT = [  # (column of the metadata, what it is, whether ranks must agree)
    (0, "number of heads H", True),
    (1, "number of samples", False),
    (2, "number of clusters K (last dimension of the scores)", True),
    (3, "scores dtype", True),
    (4, "batched (3-d) scores", True),
    (5, "epsilon", True),
    (6, "tol", True),
    (7, "max_iter", True),
    (8, "acceleration (over_relaxation)", True),
    (9, "whether sample_weights are given", True),
    (11, "whether init is given", True),
]


def check_agreement(meta: torch.Tensor) -> None:
    """Raise on every rank (they all see the same table) when the ranks disagree on the problem."""
    for col, what, must in AGREEMENT:
        values = meta[:, col]
        if must and not bool((values == values[0]).all()):
            per_rank = ", ".join(f"rank {i}: {v:g}" for i, v in enumerate(values.tolist()))
            raise ValueError(
                f"sinkhorn_assign_sharded: the ranks disagree on the {what} ({per_rank}). Every rank must pass "
                "scores with the same clusters and the same solver arguments."
            )
