"""Sharded solve over ``torch.distributed``: each rank holds its own samples; ranks exchange K-vectors only.

One code path for any world size — with no process group initialised or a group of one process there are no
collectives::

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

Features mode shards the same way: each rank passes its own features ``Z_r`` (N_r, D) and the common prototypes
(checked by a fingerprint); the local pass is the features kernel on CUDA tensors, or a chunked stream otherwise.

Sample weights are global: by default ``1 / N`` with ``N = sum_r N_r`` (uneven shards are fine); explicit
weights are each rank's slice of one vector that sums to 1 over all ranks. Before iterating, two small
all-gathers check that the ranks agree (K, heads, dtype, epsilon, tol, max_iter, cluster weights, warm start) and
that every rank's input is valid: a bad rank makes every rank raise, instead of leaving the others waiting.
Every collective waits at most ``timeout`` seconds, so a rank that died or never calls gives an error, not a hang.
Gloo (CPU tensors) and NCCL (CUDA tensors) both work; NCCL collectives run on the current CUDA device.
"""

from __future__ import annotations

import hashlib
import math
import os
import time
import warnings
import weakref
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist

from .advice import ScoreSummary, checked_rows_summary, features_summary, warn_about_scores
from .backends import check_backend_name, make_operator, resolve_backend
from .backends.base import ScoreOperator
from .entry import entry_point, user_stacklevel
from .features import bound_error, check_bias, check_finite_rows, dense_scores, kernel_inputs, score_bound, uses_kernel
from .host_sources import FeatureSource, check_memory_budget
from .inputs import open_host_array
from .problem import (
    TRANSPOSE_FIX,
    TRANSPOSE_PATH_FIX,
    Problem,
    as_tensor,
    check_columns,
    check_epsilon,
    check_rows,
    check_scores,
    check_weights,
    compute_dtype_of,
    described,
    max_score_span,
    reference_arithmetic,
    refuse_bool_weights,
    transposed_hint,
    weight_rounding,
    weight_sum_tolerance,
    weighted_clusters,
)
from .result import SinkhornResult
from .solver import (
    ADAPTIVE,
    ANDERSON,
    AUTO,
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    check_flags,
    check_init,
    check_solver_options,
    check_tol,
    is_number,
    no_epsilon_scaling,
    package_result,
    run_sinkhorn,
    warn_if_not_converged,
)
from .sources import column_max
from .streaming import StreamingOperator, chunk_bytes, warn_if_chunks_too_small

__all__ = ["ShardedOperator", "sinkhorn_assign_sharded"]

DEFAULT_TIMEOUT = 600.0  # seconds per collective: one iteration of the slowest rank must fit
FINGERPRINT_SIZE = 4  # 48-bit pieces of a SHA-256 of the prototypes and bias (features mode)
META_SIZE = 26  # numbers each rank sends in the first all-gather, after a failure flag (see AGREEMENT)
# Columns of that metadata read by name, besides those AGREEMENT compares: the rank's number of samples, the sum of
# its sample weights, the two parts of its tolerance on their global sum (problem.weight_sum_tolerance), and what
# rounding its cluster and sample weights to the dtypes they came in may have moved (problem.weight_rounding).
META_SAMPLES, META_WEIGHT_SUM, META_SUM_RTOL, META_SUM_SUBNORMAL = 1, 10, 13, 14
META_CLUSTER_ROUNDING, META_SAMPLE_ROUNDING = 15, 16
# The rank's ScoreSummary (otlabel.advice: what its input checks read of the values), columns 17-25: the smallest and
# largest score, whether they look like probabilities, whether they are the scores' own (not a bound), whether every
# sample has one row, and that row's digest (FINGERPRINT_SIZE numbers)
META_SUMMARY = 17
GLOO_LACKS_GATHER_INTO_TENSOR = torch.__version__ < (2, 4)  # TorchVersion compares with tuples
DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2, torch.float64: 3}  # narrowest first
DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


def collective_device(backend: str | None, data) -> torch.device:
    """Where the collectives' buffers live: the CPU for Gloo; for NCCL the rank's own GPU — that of its data when
    the data is a CUDA tensor (a rank need not have called ``torch.cuda.set_device``), else the current one."""
    if backend != "nccl":
        return torch.device("cpu")
    if getattr(data, "is_cuda", False):
        return data.device
    return torch.device("cuda", torch.cuda.current_device())


def group_reference(group):
    """A weak reference to ``group`` (torch's registry holds it until ``destroy_process_group``); for ``None``, or a
    group that takes no weak references, a function that returns it."""
    try:
        return weakref.ref(group)
    except TypeError:
        return lambda: group


class Collectives:
    """The few collectives the solver needs, each with a timeout; a no-op for ``group=None`` or one process."""

    global_ranks = None  # each group rank's global rank (None: the same numbers), which messages name ranks by

    def __init__(self, group, timeout: float, data=None):
        self._group = group_reference(group)
        self.active = group is not None and dist.get_world_size(group) > 1
        self.world = dist.get_world_size(group) if self.active else 1
        self.rank = dist.get_rank(group) if group is not None else 0
        if group is not None:  # a subgroup's ranks count from 0: "rank 1" would point the user at another process
            self.global_ranks = [dist.get_global_rank(group, i) for i in range(dist.get_world_size(group))]
        self.timeout = timeout
        self.device = collective_device(dist.get_backend(group) if self.active else None, data)
        # Gloo gathers into one tensor from torch 2.4 (2.1 refused: "no support for _allgather_base in Gloo process
        # group"); before, into a list of its rows.
        self.gathers_by_list = self.active and GLOO_LACKS_GATHER_INTO_TENSOR and dist.get_backend(group) == "gloo"

    @property
    def group(self):
        """The process group, while it lives. Held weakly: a result keeps its operator (for ``result.objective``),
        and a result kept past ``destroy_process_group()`` (a script's global) held the Gloo group until the
        interpreter's exit, which destroyed its threads late: the process aborted (SIGABRT) in ~1 of 6 runs."""
        group = self._group()
        if group is None and self.active:
            raise RuntimeError(
                "sinkhorn_assign_sharded: the process group of this solve was destroyed; read result.objective "
                "(a collective) on every rank before destroy_process_group()."
            )
        return group

    def all_gather(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Every rank's ``t`` stacked in rank order, ``(W, *t.shape)``, on ``t``'s device."""
        if not self.active:
            return t[None]
        group = self.group  # raises here, not inside the wait (whose message blames the other ranks)
        send = t.detach().to(self.device).reshape(-1)
        out = torch.empty(self.world * send.numel(), dtype=send.dtype, device=self.device)  # rank-major
        if self.gathers_by_list:
            rows = list(out.view(self.world, -1).unbind(0))  # each rank's row of out, written in place
            start = lambda: dist.all_gather(rows, send, group=group, async_op=True)
        else:
            gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10
            start = lambda: gather(out, send, group=group, async_op=True)
        self._wait(start, f"all-gather of the {what}")
        return out.view(self.world, *t.shape).to(t.device)

    def all_gather_or_fail(self, compute, size: int, what: str) -> torch.Tensor:
        """:meth:`all_gather` of the float64 ``(size,)`` tensor ``compute()`` returns on each rank, ``(W, size)``; if
        it raises on some rank (out of memory, say), every rank raises: that rank its own error, the others one that
        names it. Without this the others would wait out ``timeout`` in their next collective."""
        failed = torch.ones(1, dtype=torch.float64)
        try:
            local, failure = torch.cat([failed - 1, compute().to("cpu", torch.float64).reshape(size)]), None
        except Exception as err:  # any failure (also MemoryError, OSError) is shared
            local, failure = torch.cat([failed, torch.full((size,), math.nan, dtype=torch.float64)]), err
        gathered = self.all_gather(local, what)
        bad = [i for i in range(self.world) if gathered[i, 0] != 0]
        if failure is not None:
            try:
                raise failure
            finally:
                failure = None  # this frame is in the error's traceback: holding the error it made a cycle
        if bad:
            raise RuntimeError(f"sinkhorn_assign_sharded: rank(s) {self.named(bad)} failed computing the {what} (see "
                               "the error on those ranks).")  # fmt: skip
        return gathered[:, 1:]

    def named(self, ranks) -> list[int]:
        """Group ranks as the global ranks that the user knows the processes by."""
        return list(ranks) if self.global_ranks is None else [self.global_ranks[i] for i in ranks]

    @property
    def name(self) -> int:
        """This rank's global rank (0 without a group)."""
        return self.named([self.rank])[0]

    def from_first_rank(self, t: torch.Tensor, what: str) -> torch.Tensor:
        """Rank 0's ``t`` on every rank (a broadcast), on ``t``'s device."""
        if not self.active:
            return t
        buf = t.detach().to(self.device).contiguous().clone()
        group = self.group
        root = dist.get_global_rank(group, 0)  # broadcast names its source by global rank
        self._wait(lambda: dist.broadcast(buf, src=root, group=group, async_op=True), f"broadcast of the {what}")
        return buf.to(t.device)

    def _wait(self, start, what: str) -> None:
        """Start a collective and wait for it at most ``timeout`` seconds; a rank that never joins is an error."""
        began = time.monotonic()
        try:
            start().wait(timeout=timedelta(seconds=self.timeout))
        except RuntimeError as err:
            waited = time.monotonic() - began
            # A closed connection (a rank that exited) ends the wait early: a longer timeout is then no remedy.
            timed_out = waited >= 0.9 * self.timeout
            hint = " Raise timeout= if one iteration of the slowest rank takes longer." if timed_out else ""
            raise RuntimeError(
                f"sinkhorn_assign_sharded: rank {self.name} gave up on the {what} after {waited:.3g} s "
                f"(timeout={self.timeout:g}): another rank failed, exited, solved alone (no process group), or did "
                f"not call with the same arguments ({type(err).__name__}: {err}).{hint}"
            ) from err


class ShardedOperator(ScoreOperator):
    """The local operator of one rank, made global: ``cluster_lse`` combines every rank's partial LSE.

    ``assign`` stays local (each rank labels its own samples); ``transport_score`` sums over ranks, so reading
    ``result.objective`` is a collective: call it on every rank or on none.
    """

    def __init__(self, local: ScoreOperator, comm: Collectives):
        self.local, self.comm = local, comm
        self.callback_failure: Exception | None = None  # what this rank's callback raised, until the ranks hear of it
        self.n_heads, self.n_samples, self.n_clusters = local.n_heads, local.n_samples, local.n_clusters
        self.device, self.dtype = local.device, local.dtype
        # The loop hands float64 potentials to operators that use them (the torch ones): rounding b to
        # float32 every iteration floors the error at ~ulp(b), and at small eps the sharded solve then stalled
        # where the single-process one converged.
        self.takes_float64_potentials = local.takes_float64_potentials

    def cluster_lse(self, b):
        lse = self.local.cluster_lse(b).double()  # (H, K); one dtype on every rank and every pass
        # Each rank also sends whether its callback raised: one float more, and the ranks stop together.
        failed = lse.new_full((1,), float(self.callback_failure is not None))
        sent = self.comm.all_gather(torch.cat([lse.flatten(), failed]), "cluster log-sum-exps")  # (W, H*K + 1)
        self.raise_if_a_callback_failed(sent[:, -1])
        return torch.logsumexp(sent[:, :-1].view(-1, *lse.shape), dim=0)  # rank order

    def release(self) -> None:
        self.local.release()

    def takes_plain_steps(self) -> bool:
        """One process (no group, or a group of one): there is nothing to exchange, and the local operator's compiled
        plain steps (a small problem on the CPU) are this solve's, as in ``sinkhorn_assign`` (the same steps)."""
        return not self.comm.active and self.local.takes_plain_steps()

    def plain_steps(self, b, log_r, r, n_steps, tol, history=(), budget=0):
        if self.callback_failure is not None:  # the loop's own step (cluster_lse) raises it, as it would have
            return b, [], 1
        return self.local.plain_steps(b, log_r, r, n_steps, tol, history, budget)

    def shared_callback(self, callback):
        """``callback`` as the loop calls it: an exception it raises here is held until the next exchange of
        :meth:`cluster_lse` (or :meth:`finish`) and then raised on every rank at once. Raising at once on this rank
        alone would leave the others waiting out ``timeout``; ranks may differ in whether they have a callback."""
        if callback is None:
            return None

        def call(iteration: int, error: float) -> None:
            if self.callback_failure is None:
                try:
                    callback(iteration, error)
                except Exception as err:  # shared; BaseException (KeyboardInterrupt) stops this rank at once
                    self.callback_failure = err

        return call

    def finish(self) -> None:
        """After the loop: share a callback failure of the last iteration (one float per rank, once per solve)."""
        failed = torch.tensor([float(self.callback_failure is not None)], dtype=torch.float64)
        self.raise_if_a_callback_failed(self.comm.all_gather(failed, "callback verdicts")[:, 0])

    def raise_if_a_callback_failed(self, flags: torch.Tensor) -> None:
        """``flags`` (W,): 1 for each rank whose callback raised. The ranks read their flags after every exchange
        (a few bytes; the exchange's wait has already blocked the host until it completed)."""
        failed = flags.nonzero().flatten().tolist()
        if self.callback_failure is not None:
            # Raised once, and not kept: the operator holding the exception, whose traceback holds the operator, was a
            # cycle that kept the process group alive until a garbage collection; one left for the interpreter's
            # exit destroyed Gloo's threads late, and the process aborted (SIGABRT) about one time in ten.
            failure, self.callback_failure = self.callback_failure, None
            try:
                raise failure
            finally:
                del failure
        if failed:
            raise RuntimeError(f"sinkhorn_assign_sharded: the callback raised on rank(s) {self.comm.named(failed)} "
                               "(see the error on those ranks); every rank stops.")  # fmt: skip

    def agree(self, b):
        # Mixed or over-relaxed iterates come out of small linear solves that may round differently on
        # different hardware; drifting apart would split the ranks' error trajectories (and iteration counts,
        # which ends in a timeout). Everyone continues from rank 0's iterate: H*K floats per iteration.
        return self.comm.from_first_rank(b, "mixed cluster potentials")

    def assign(self, b, want_codes):
        return self.local.assign(b, want_codes)

    def transport_score(self, b):
        # The group first: once destroyed, this rank's pass (a whole streamed pass, for features or a file) came
        # before the error, which all_gather raises.
        _ = self.comm.group
        parts = self.comm.all_gather(self.local.transport_score(b), "transport scores")  # (W, H)
        total = parts[0]
        for part in parts[1:]:  # rank order: identical on every rank
            total = total + part
        return total


@entry_point
def sinkhorn_assign_sharded(
    scores=None,
    epsilon: float = 0.05,
    *,
    features=None,
    prototypes=None,
    bias=None,
    group=None,
    cluster_weights=None,
    sample_weights=None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float | None = DEFAULT_TOL,
    init=None,
    backend: str = "auto",
    acceleration: str = "auto",
    over_relaxation: float | None = None,
    epsilon_scaling: float | None = None,
    allow_tf32: bool = True,
    memory_budget: int | str | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    callback=None,
    warn: bool = True,
    local_scores=None,
) -> SinkhornResult:
    r""":func:`otlabel.sinkhorn_assign` over samples sharded across the ranks of a process group.

    Every rank calls this with its own samples (any number per rank, at least one) and the same other
    arguments. The problem solved is the one over the concatenation of all ranks' samples (in rank order):
    the result on each rank is that rank's slice of the single-process result, up to fp32 rounding (identical
    labels for tie-free scores). Per iteration the ranks exchange ``W·H·K`` floats; nothing of size N moves.

    Args:
        scores: this rank's ``(N_r, K)`` or ``(H, N_r, K)`` scores (torch tensor on any device, a NumPy array, or
            a ``.npy`` path, memory-mapped as ``np.load(path, mmap_mode='r')``, as features paths are taken): CPU
            data with Gloo, CUDA tensors with NCCL.
        features, prototypes, bias: instead of ``scores``, this rank's features ``Z_r`` (N_r, D) and the
            prototypes ``C`` (K, D) or (H, K, D) (the same on every rank: checked) with an optional per-cluster
            ``bias``; the scores ``Z_r C^T + bias`` are never stored (features mode, :mod:`otlabel.features`).
            CUDA tensors run the features kernel; anything else (a CPU tensor, a NumPy array or memmap, a ``.npy``
            path) is streamed in chunks through this rank's device (the CPU with Gloo, the current CUDA device with
            NCCL) within ``memory_budget`` bytes, as in :func:`otlabel.sinkhorn_assign_stream`. Streamed features
            are checked for NaN/inf before the first collective: one extra read of this rank's features.
        group: the ``torch.distributed`` process group to solve over. ``None`` (the default) is the default group,
            ``torch.distributed.group.WORLD``, once ``init_process_group()`` has run, as in torch's own collectives;
            before it (or after ``destroy_process_group()``) it solves this rank's samples alone, with no
            collectives, and warns if the launcher started several ranks (``WORLD_SIZE`` > 1). A group of one
            process solves alone too.
        sample_weights: this rank's slice ``(N_r,)`` of global sample weights that sum to 1 over all ranks.
            Default: ``1 / N`` for every sample, ``N`` the total over ranks.
        cluster_weights: ``(K,)``, the same on every rank (checked).
        timeout: seconds any collective may wait for the other ranks before raising ``RuntimeError``.
        memory_budget: the device memory for streamed features' chunks, in bytes or a size such as ``"512M"``, as in
            :func:`otlabel.sinkhorn_assign_stream` (the same default). Scores and CUDA features are not streamed and
            do not use it.
        epsilon, max_iter, tol, init, backend, acceleration, over_relaxation, allow_tf32, callback, warn: as in
            :func:`otlabel.sinkhorn_assign`; they must agree across ranks (checked). ``callback`` is called on
            every rank that gives one (a progress bar on rank 0 only is fine); an exception it raises on one rank is
            raised there, and a ``RuntimeError`` naming that rank on the others, at the next exchange (one iteration
            later).
        epsilon_scaling: must be ``None`` here: on top of the default Anderson mixing it did not pay on in-memory
            scores.
        local_scores: the former name of ``scores`` (deprecated; it warns).

    Returns:
        :class:`~otlabel.SinkhornResult` with this rank's ``labels`` (N_r,) and ``codes``, and the global
        ``cluster_potentials``, ``n_iter``, ``converged`` and errors — identical on every rank. ``objective`` is
        the global ``<P, S>`` and a collective.
    """
    if group is None and dist.is_available() and dist.is_initialized():
        group = dist.group.WORLD  # as torch.distributed's own collectives read group=None
    elif group is None and dist.is_available() and not dist.is_initialized() and launched_ranks() > 1:
        warnings.warn(
            f"sinkhorn_assign_sharded(group=None) solves this rank's samples alone: torch.distributed is not "
            f"initialised, although WORLD_SIZE={launched_ranks()} says the launcher started several ranks "
            "(torch.distributed.group.WORLD is None before init_process_group() and after destroy_process_group()). "
            "Call torch.distributed.init_process_group() first: group=None then solves over all ranks.",
            UserWarning,
            stacklevel=user_stacklevel(),
        )
    if group is not None and group is getattr(dist.GroupMember, "NON_GROUP_MEMBER", object()):
        raise ValueError(f"group: rank {dist.get_rank()} is not a member of this process group (torch.distributed"
                         ".new_group returns a placeholder on the ranks it leaves out); call sinkhorn_assign_sharded "
                         "only on the group's ranks.")  # fmt: skip
    if group is not None and not isinstance(group, getattr(dist, "ProcessGroup", ())):
        raise TypeError(f"group must be a torch.distributed process group (dist.group.WORLD) or None, got {group!r}.")
    if local_scores is not None and scores is None:
        warnings.warn("sinkhorn_assign_sharded(local_scores=...) is now scores=... (as in sinkhorn_assign); the old "
                      "name will be removed.", DeprecationWarning, stacklevel=user_stacklevel())  # fmt: skip
        scores, local_scores = local_scores, None
    # A bad timeout (or scores given twice) on one rank is shared like any other bad input: raising here, before the
    # first collective, left the other ranks waiting out their timeout. This rank waits DEFAULT_TIMEOUT meanwhile.
    timeout_ok = valid_timeout(timeout)
    comm = Collectives(group, float(timeout) if timeout_ok else DEFAULT_TIMEOUT,
                       data=scores if scores is not None else features)  # fmt: skip
    failure, meta, shard, c_local = None, None, None, None
    try:  # local checks: a failure is shared with the other ranks below, not raised before they hear of it
        if not timeout_ok:
            raise ValueError(f"timeout must be a positive number of seconds (a finite one), got {described(timeout)}.")
        if local_scores is not None:
            raise ValueError("give scores= only: local_scores= is its former name.")
        check_flags(allow_tf32=allow_tf32, warn=warn)
        epsilon, tol = check_epsilon(epsilon), check_tol(tol)
        acceleration = check_solver_options(max_iter, tol, acceleration, over_relaxation, callback)
        no_epsilon_scaling(epsilon_scaling, "in a sharded solve")
        shard = open_shard(scores, features, prototypes, bias, cluster_weights, backend, comm,
                           allow_tf32=allow_tf32, memory_budget=memory_budget, epsilon=epsilon)  # fmt: skip
        c_local, sum_tolerance = None, (0.0, 0.0)
        if sample_weights is not None:  # a length that is K: this rank's scores given (K, N)? (features cannot be)
            as_read = getattr(shard, "scores_shape", None), getattr(shard, "transpose_fix", None)
            c_local, sum_tolerance = check_local_weights(sample_weights, shard.n, shard.device, *as_read)
        check_init(init, shard.h, shard.r, torch.float64, epsilon=epsilon)  # checked only: the operator comes later
        meta = [shard.h, shard.n, shard.k, shard.dtype_code, float(shard.batched), epsilon]  # columns 0-5
        meta += [-1.0 if tol is None else tol]  # 6
        omega_code = ACCELERATION_CODES.get(acceleration, acceleration)  # collectives carry numbers
        meta += [max_iter, omega_code, float(c_local is not None)]  # 7-9
        meta += [0.0 if c_local is None else float(c_local.sum()), float(init is not None), float(shard.mode)]  # 10-12
        meta += list(sum_tolerance)  # 13-14
        meta += [weight_rounding(cluster_weights, shard.k), weight_rounding(sample_weights, shard.n)]  # 15-16
        meta += summary_columns(shard.summary)  # 17-25
    except Exception as err:  # any failure (also MemoryError, OSError) is shared, or the other ranks wait it out
        failure = err
    try:
        return solve_shards(comm, shard, failure, meta, c_local, epsilon, max_iter, tol, init, acceleration,
                            callback, warn)  # fmt: skip
    finally:
        # This frame is in the error's traceback; holding the error as well, it made a cycle, which kept the frame
        # (and the process group among its arguments) alive until a garbage collection. Left for the interpreter's
        # exit, Gloo's threads were destroyed late and the process aborted (SIGABRT).
        failure = None
        if shard is not None:
            shard.close()


def solve_shards(comm, shard, failure, meta, c_local, epsilon, max_iter, tol, init, acceleration, callback, warn):
    """The collective part: agree on the problem (or fail together), then iterate on the global problem."""
    payload = meta if failure is None else [math.nan] * META_SIZE  # a fixed length on every rank, whatever failed
    # float64: the sample-weight sums rescale the weights, and counts beyond 2^24 must stay exact
    metas = comm.all_gather(torch.tensor([0.0 if failure is None else 1.0] + payload, dtype=torch.float64), "checks")
    bad = [i for i in range(comm.world) if metas[i, 0] != 0]
    if bad:
        if failure is not None:
            try:
                raise failure
            finally:
                failure = None  # (a cycle otherwise: see sinkhorn_assign_sharded)
        raise ValueError(
            f"sinkhorn_assign_sharded: rank(s) {comm.named(bad)} rejected their input (see the error on those ranks)."
        )
    table = metas[:, 1:]  # (W, META_SIZE): every rank's metadata, without the failure flags
    check_agreement(table, comm.named(range(comm.world)))
    n_total = int(table[:, META_SAMPLES].sum())
    # the same verdict on every rank, from the table every rank has (no collective of their own); printed by rank 0
    # alone (an 8-process job printed each warning 8 times), raised by every rank under an "error" filter (rank 0
    # raising alone would leave the others waiting out their timeout in the next collective)
    warn_about_scores(gathered_summary(table, n_total), epsilon, shard.k, shard.r, features=shard.mode == 1,
                      quiet=comm.rank != 0)  # fmt: skip
    weight_sum = float(table[:, META_WEIGHT_SUM].sum())
    if c_local is None:
        c_local = torch.full((shard.n,), 1.0 / n_total, dtype=torch.float64, device=shard.device)
    elif abs(weight_sum - 1.0) > float(table[:, META_SUM_RTOL].max() + table[:, META_SUM_SUBNORMAL].sum()):
        raise ValueError(  # problem.py's rule, over all ranks
            f"sample_weights must sum to 1 over all ranks, got a sum of {weight_sum:.6g}. Pass each "
            "rank its slice of one global weight vector (w / w.sum() for counts)."
        )
    else:  # exactly 1 over all ranks, as the cluster weights are (see problem.check_weights)
        c_local = c_local / weight_sum
    h, k, r = shard.h, shard.k, shard.r
    size = 1 + h * k + k + FINGERPRINT_SIZE + (h * k if init is not None else 0)  # the same on every rank
    operator = None

    def set_up() -> torch.Tensor:  # building the operator may still fail on one rank (e.g. out of memory)
        nonlocal operator, init
        operator = shard.operator(epsilon, c_local)
        # As the single-process entry points: float64 for scores (sinkhorn_assign), the operator's dtype for features
        # (sinkhorn_assign(features=...) and the stream, where a float64 warm start showed up as marginal error)
        state = torch.float64 if shard.mode == DenseShard.mode else operator.dtype
        init = check_init(init, shard.h, shard.r, state, operator.dtype, epsilon=epsilon)
        agreed = [r.double().cpu(), shard.fingerprint] + ([] if init is None else [init.double().flatten().cpu()])
        arithmetic = torch.tensor([DTYPE_CODES[operator.dtype]], dtype=torch.float64)
        return torch.cat([arithmetic, shard.column_max().flatten(), *agreed])

    shared = comm.all_gather_or_fail(set_up, size, "column maxima and cluster weights")
    arithmetic, shared = shared[:, 0], shared[:, 1:]
    check_same_on_every_rank(shared[:, h * k :], k)
    col_max = shared[:, : h * k].amax(dim=0).view(h, k).to(shard.device)  # of S (features shards send 0)
    # Ranks may run different backends (the float64 reference on one, float32 on another): judged in the narrowest
    # arithmetic among them, the column check raises on every rank or on none (one rank raising alone left the others
    # waiting out the timeout in the mask check).
    check_columns(col_max / epsilon, r, DTYPES[int(arithmetic.min())], shard.mode == FeatureShard.mode, epsilon)
    if shard.mode == DenseShard.mode:  # features shards: -inf only from a bias, whole columns (checked just above)
        # the same on every rank: the largest cluster part (the values agree, their dtypes need not), and the sample
        # parts added up (an upper bound: each rank's unit of rounding is counted once per rank)
        rounding = float(table[:, META_CLUSTER_ROUNDING].max() + table[:, META_SAMPLE_ROUNDING].sum())
        check_sharded_masks(comm, shard.scores, c_local, r, shard.batched, shard.masked, rounding)
    sharded = ShardedOperator(operator, comm)
    # One process: whether a weight is 0, read once, lets a small CPU problem take its steps compiled as in
    # sinkhorn_assign (ShardedOperator.takes_plain_steps)
    zero_weights = None if comm.active else bool((r == 0).any())
    out = run_sinkhorn(sharded, r, init, max_iter, tol, acceleration, callback=sharded.shared_callback(callback),
                       has_zero_weights=zero_weights)  # fmt: skip
    sharded.finish()
    if warn:
        warn_if_not_converged("sinkhorn_assign_sharded", out, tol, epsilon, sharded.dtype)
    return package_result(sharded, out, epsilon=epsilon, batched=shard.batched, sample_weights=c_local)


def check_same_on_every_rank(agreed: torch.Tensor, k: int) -> None:
    """``agreed`` (W, ...): each rank's cluster weights (K), prototype fingerprint and warm start (if any), in the
    order of ``set_up``; raise, naming what differs and by how much, unless every rank sent the same."""
    parts = [("cluster_weights", agreed[:, :k]), ("prototypes or bias", agreed[:, k : k + FINGERPRINT_SIZE]),
             ("init", agreed[:, k + FINGERPRINT_SIZE :])]  # fmt: skip
    for what, values in parts:
        same = values == values[:1]  # (a -inf in the same place is no difference)
        if bool(same.all()):
            continue
        if what == "prototypes or bias":  # only their digests travel
            how = "their SHA-256 digests differ"
        else:
            gap = torch.where(same, 0.0, (values - values[:1]).abs()).nan_to_num(math.inf, posinf=math.inf).amax()
            how = f"by up to {float(gap):.3g}"
        raise ValueError(
            f"sinkhorn_assign_sharded: {what} differ between ranks ({how}; the same values in float32 on one rank "
            "and float64 on another differ by rounding). Every rank must pass the same cluster weights, prototypes, "
            "bias and warm start, in the same dtype."
        )


def check_sharded_masks(comm: Collectives, scores, c_local, r, batched: bool, masked: bool,
                        mass_rounding: float = 0.0) -> None:  # fmt: skip
    """Hall's condition over every rank's samples (:mod:`otlabel.feasibility`), raised alike on every rank.

    Each rank sums its part of the hot-pair test on its device; the sums travel (H + H K numbers per rank). Only where
    some pair is hot do the ranks exchange the mask patterns of their samples with a hot pair, and then each decides
    on the same merged patterns. Every branch depends on gathered values only: all ranks take the same collectives.
    ``masked``: whether this rank's scores have a -inf for a cluster of positive weight (:func:`check_rows` says).
    ``mass_rounding``: as in :func:`~otlabel.feasibility.check_feasible`, the same on every rank.
    """
    from .feasibility import hot_sums

    h_count, n, k = scores.shape
    sums = []

    def local_sums() -> torch.Tensor:  # margin, H shut maxima, H x K barred
        if not masked:
            return torch.zeros(1 + h_count * (k + 1), dtype=torch.float64)
        sums.extend(hot_sums(scores[h], c_local, r) for h in range(h_count))
        margin = torch.tensor([max(margin for _, _, margin in sums)], dtype=torch.float64)
        shut_maxima = torch.stack([shut.max() for shut, _, _ in sums]).double().cpu()
        return torch.cat([margin, shut_maxima, torch.cat([barred for _, barred, _ in sums]).double().cpu()])

    gathered = comm.all_gather_or_fail(local_sums, 1 + h_count * (k + 1), "mask sums")  # (W, 1 + H + H K)
    margin = float(gathered[:, 0].sum())  # the ranks' sums add up, and so do their errors; the same everywhere
    shut_max = gathered[:, 1 : 1 + h_count].amax(dim=0)
    barred_all = gathered[:, 1 + h_count :].sum(dim=0).view(h_count, k)
    for h in range(h_count):
        if float(shut_max[h] + barred_all[h].max()) <= 1 - margin:
            continue  # no hot pair on any rank
        if masked:
            shut = sums[h][0]
            barred = barred_all[h].to(shut.device, shut.dtype)
        else:  # nothing masked here: no sample of this rank is hot
            shut = torch.zeros(n, dtype=torch.float64, device=scores.device)
            barred = torch.full((k,), -math.inf, dtype=torch.float64, device=scores.device)
        check_sharded_head(comm, scores[h], c_local, r, (shut, barred, margin), head=h if batched else None,
                           mass_rounding=mass_rounding)  # fmt: skip


def check_sharded_head(comm: Collectives, scores, c_local, r, hot_test, head: int | None,
                       mass_rounding: float = 0.0) -> None:  # fmt: skip
    """One head of :func:`check_sharded_masks` where some pair is hot: the ranks exchange the mask patterns of their
    hot samples, and each decides on the same merged patterns. ``hot_test``: this rank's (shut, barred, margin)."""
    from .feasibility import MaskPatterns, check_feasible, hot_patterns

    k = scores.shape[-1]
    mine = []  # (packed rows, weights, counts) of this rank's hot patterns

    def count_patterns() -> torch.Tensor:
        patterns = hot_patterns(scores, c_local, r, *hot_test)
        mine.extend(patterns.packed())
        return torch.tensor([len(mine[1]), float(patterns.too_large), patterns.unmasked_weight,
                             patterns.unmasked_count], dtype=torch.float64)  # fmt: skip

    headers = comm.all_gather_or_fail(count_patterns, 4, "mask pattern counts")  # (W, 4)
    if bool(headers[:, 1].any()):
        return  # too many patterns on some rank: not checked (the solve's warning remains)
    most = int(headers[:, 0].max())
    if most == 0:
        return  # the summed test fired, yet no sample is hot: nothing to exchange (and no empty all-gathers)
    packed, weights, counts = mine
    rows = np.zeros((most, packed.shape[1]), dtype=np.uint8)
    rows[: len(packed)] = packed
    numbers = np.zeros((2, most))
    numbers[:, : len(weights)] = weights, counts
    all_rows = comm.all_gather(torch.from_numpy(rows), "mask patterns")  # (W, most, ceil(K / 8))
    all_numbers = comm.all_gather(torch.from_numpy(numbers), "mask pattern weights")  # (W, 2, most)

    def decide() -> torch.Tensor:  # the same merged patterns on every rank, so the same verdict
        merged = MaskPatterns(k)
        for w in range(comm.world):  # rank order
            g = int(headers[w, 0])
            merged.add_unmasked(float(headers[w, 2]), int(headers[w, 3]))
            merged.add_packed(all_rows[w, :g].numpy(), all_numbers[w, 0, :g].numpy(), all_numbers[w, 1, :g].numpy())
        check_feasible(merged, r.double().cpu().numpy(), head=head, mass_rounding=mass_rounding)
        return torch.zeros(0, dtype=torch.float64)

    comm.all_gather_or_fail(decide, 0, "mask check")  # one rank failing to decide (out of memory) tells the others


class DenseShard:
    """This rank's score matrix: checked rows, column maxima for the global mask check, the usual backends."""

    mode = 0

    def __init__(self, scores, cluster_weights, backend: str, rank: int, epsilon: float | None = None,
                 from_features: bool = False, transpose_fix: str = TRANSPOSE_FIX):  # fmt: skip
        """``from_features``: the scores are features @ prototypes.T (+ bias) (``backend="reference"``), and a span
        error says its fixes for those. ``transpose_fix``: how to pass the scores transposed (for a path, a view of
        the file), said where the weights' length is the scores' other dimension."""
        self.scores, self.batched = check_scores(scores)
        self.fingerprint = torch.zeros(FINGERPRINT_SIZE, dtype=torch.float64)  # scores: nothing more to agree on
        self.h, self.n, self.k = self.scores.shape
        self.device, self.dtype_code, self.backend = self.scores.device, DTYPE_CODES[self.scores.dtype], backend
        # features @ prototypes.T cannot be transposed scores
        self.scores_shape = None if from_features else (self.n, self.k)
        self.transpose_fix = transpose_fix
        self.r = check_weights(cluster_weights, self.k, "cluster_weights", "number of clusters K (last dimension)",
                               self.device, self.scores_shape, transpose_fix)  # fmt: skip
        # as sinkhorn_assign's validate(arithmetic=) judges the span: not refused by float32's limit on the reference
        arithmetic = reference_arithmetic(backend) or compute_dtype_of(self.scores)
        extremes = []  # the rows' smallest and largest minimum and maximum, read with the checks (otlabel.advice)
        masked_rows = check_rows(self.scores, weighted_clusters(self.r), where=f" of rank {rank}'s shard",
                                 inv_eps=epsilon and 1.0 / epsilon, compute_dtype=arithmetic,
                                 batched=self.batched, epsilon=epsilon, from_features=from_features,
                                 extremes=extremes)  # fmt: skip
        self.masked = masked_rows is not None  # a -inf for a weighted cluster: Hall's condition needs this shard
        self.summary = checked_rows_summary(self.scores, extremes, self.scores.dtype)
        resolve_backend(backend, self.problem(1.0, None))  # an unusable backend fails here, before any collective

    def problem(self, epsilon, sample_weights) -> Problem:
        return Problem(self.scores, epsilon, sample_weights, self.r, self.batched)

    def operator(self, epsilon, sample_weights) -> ScoreOperator:
        return make_operator(self.problem(epsilon, sample_weights), self.backend)

    def column_max(self) -> torch.Tensor:
        return column_max(self.scores).double().cpu()  # (H, K)

    def close(self) -> None:
        pass


class FeatureShard:
    """This rank's features and the shared prototypes: the features kernel on CUDA tensors, else streamed chunks.

    Features are finite (checked up front) and a ``-inf`` bias may only close a zero-weight cluster, so every
    sample has somewhere to go and every weighted cluster is reachable: no mask check needs the other ranks.
    """

    mode = 1

    def __init__(self, features, prototypes, bias, cluster_weights, backend, device, allow_tf32, memory_budget,
                 epsilon=None):  # fmt: skip
        z = features if isinstance(features, torch.Tensor) else None
        self.kernel = uses_kernel(features, backend)
        self.allow_tf32, self.source, self.memory_budget = allow_tf32, None, memory_budget
        self.summary = None  # of the scores' values (otlabel.advice): a bound on them, where epsilon is given
        if self.kernel:
            self.z, self.c3, self.bias, self.r, self.batched, bound, norms_alike = kernel_inputs(
                z, prototypes, bias, cluster_weights, epsilon
            )
            self.summary = features_summary(self.z, bound, norms_alike)
        else:
            device = z.device if z is not None and z.is_cuda else device  # host data: through this rank's device
            self.source = FeatureSource(features, prototypes, bias, device,
                                        memory_budget=chunk_bytes(memory_budget, device))  # fmt: skip
            warn_if_chunks_too_small(self.source, memory_budget, self.source.device)
            self.z = self.source.features  # (N, D) on the host (or the device), streamed
            smallest_z, largest_z = check_finite_rows(self.z, "features")
            self.batched = self.source.batched
            self.r = check_weights(cluster_weights, self.source.n_clusters, "cluster_weights", "number of clusters K",
                                   self.source.device)  # fmt: skip
            self.bias = None if self.source.bias is None else self.source.bias[:, 0]  # (H, K)
            check_bias(self.bias, self.r)
            if epsilon is not None:  # before any collective: the streamed pass would find it only after agreeing
                self.check_range(largest_z, epsilon, smallest_z == largest_z)
        self.h, self.k = self.c3.shape[:2] if self.kernel else (self.source.n_heads, self.source.n_clusters)
        self.fingerprint = inputs_fingerprint(prototypes, bias, self.h, self.k)
        self.n, self.device = self.z.shape[0], self.r.device
        self.dtype_code = DTYPE_CODES[self.z.dtype]

    def check_range(self, largest_z: float, epsilon: float, norms_alike: bool) -> None:
        """``|S| / eps`` within what the compute precision resolves, by the bound ``|z| |c| + |bias|`` (kept as
        this shard's :class:`~otlabel.advice.ScoreSummary`, with the one features row where ``norms_alike``)."""
        bound = float(score_bound(largest_z, self.source.proto_t.transpose(1, 2), self.bias))  # proto_t: (H, D, K)
        if bound > max_score_span(self.source.dtype) * epsilon:
            raise bound_error(bound, epsilon, self.source.dtype)
        self.summary = features_summary(self.z, bound, norms_alike)

    def operator(self, epsilon, sample_weights) -> ScoreOperator:
        if self.kernel:
            from .backends.triton import TritonFeaturesOperator

            return TritonFeaturesOperator(
                self.z, self.c3, self.bias, epsilon, sample_weights, allow_tf32=self.allow_tf32
            )
        return StreamingOperator(self.source, epsilon, sample_weights, self.r, memory_budget=self.memory_budget)

    def column_max(self) -> torch.Tensor:
        return torch.zeros(self.h * self.k, dtype=torch.float64)  # every weighted cluster is reachable (above)

    def close(self) -> None:
        if self.source is not None:
            self.source.stream.close()


def summary_columns(summary: ScoreSummary | None) -> list[float]:
    """A rank's :class:`~otlabel.advice.ScoreSummary` as the metadata's columns ``META_SUMMARY`` on (NaN for the
    extremes where there is none: then none is judged)."""
    if summary is None:
        return [math.nan, math.nan] + [0.0] * (3 + FINGERPRINT_SIZE)
    row = summary.row  # (read back only where every sample of the shard has it: the rare path, or one sample)
    digest = [0.0] * FINGERPRINT_SIZE if row is None else sha256_pieces(row.double().cpu().numpy().tobytes())
    return [summary.lowest, summary.highest, float(summary.probabilities), float(summary.exact),
            float(row is not None), *digest]  # fmt: skip


def gathered_summary(table: torch.Tensor, n_total: int) -> ScoreSummary | None:
    """The ranks' summaries (columns ``META_SUMMARY`` on of the gathered metadata) as one, the same on every rank;
    every sample alike only where every rank's are, with one row (their digests equal). None where a rank has none."""
    columns = table[:, META_SUMMARY:]
    lowest, highest, probabilities, exact, alike = (columns[:, i] for i in range(5))
    if bool(torch.isnan(lowest).any()):
        return None
    digests = columns[:, 5:]
    one_row = bool(alike.all()) and bool((digests == digests[:1]).all())
    row = torch.zeros(0) if one_row else None  # (the row itself is not needed: only whether there is one)
    return ScoreSummary(float(lowest.min()), float(highest.max()), n_total, bool(probabilities.all()), row,
                        exact=bool(exact.all()))  # fmt: skip


def sha256_pieces(data: bytes) -> list[float]:
    """``FINGERPRINT_SIZE`` 48-bit pieces of the SHA-256 of ``data``, as floats: they travel exactly in float64."""
    raw = hashlib.sha256(data).digest()
    return [float(int.from_bytes(raw[6 * i : 6 * i + 6], "little")) for i in range(FINGERPRINT_SIZE)]


def inputs_fingerprint(prototypes, bias, h: int, k: int) -> torch.Tensor:
    """A digest of the prototypes and bias as the caller passed them (float64 bytes, bias expanded to (H, K)):
    equal on two ranks exactly when their inputs are, whatever their thread counts, devices or backends. Four
    48-bit pieces of a SHA-256, so they travel exactly in a float64 collective (a full compare would move H·K·D)."""
    digest = hashlib.sha256()
    c = open_host_array(prototypes, "prototypes", copied_anyway=True).detach()
    digest.update(c.to("cpu", torch.float64).reshape(h, k, -1).contiguous().numpy().tobytes())
    if bias is not None:
        b = open_host_array(bias, "bias", copied_anyway=True).detach().to("cpu", torch.float64)
        digest.update(b.expand(h, k).contiguous().numpy().tobytes())
    return torch.tensor(sha256_pieces(digest.digest()), dtype=torch.float64)


def launched_ranks() -> int:
    """The number of ranks a launcher (torchrun, or any that follows its environment) started: ``WORLD_SIZE``, or 1
    where it is unset or not a number."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def valid_timeout(timeout) -> bool:
    """A number of seconds that a collective's wait accepts: positive, finite, within what ``timedelta`` holds."""
    if not is_number(timeout) or not timeout > 0:
        return False
    try:
        timedelta(seconds=float(timeout))  # a NumPy float32 as it is: "unsupported type for timedelta seconds"
    except OverflowError:  # inf, or beyond ~2.7 million years
        return False
    return True


def open_shard(scores, features, prototypes, bias, cluster_weights, backend, comm, *, allow_tf32, memory_budget,
               epsilon=None):  # fmt: skip
    """This rank's input as a :class:`DenseShard` or :class:`FeatureShard` (features with ``backend="reference"``
    materialise ``Z C^T`` in float64: small problems, for checking)."""
    if (scores is None) == (features is None):
        raise ValueError("give either scores, or features= with prototypes= (not both, not neither).")
    fix = TRANSPOSE_FIX  # for weights whose length is the scores' other dimension
    if isinstance(scores, (str, os.PathLike)):  # this rank's .npy, as a features path is taken: memory-mapped, and
        scores = open_host_array(scores, "scores", copied_anyway=True)  # read in place (a big-endian file is copied)
        fix = TRANSPOSE_PATH_FIX
    if comm.active:  # alone, the single-process words say it
        refuse_empty_shard(*((scores, "scores") if features is None else (features, "features")), comm.name)
    if memory_budget is not None:  # checked whatever the input: only streamed features use it
        memory_budget = check_memory_budget(memory_budget)  # bytes, or a size such as "512M"
    if features is None:
        if prototypes is not None or bias is not None:
            raise ValueError("prototypes= and bias= go with features=, not with scores.")
        return DenseShard(scores, cluster_weights, backend, comm.name, epsilon, transpose_fix=fix)
    if prototypes is None:
        raise ValueError("features= needs prototypes=: the (K, D) cluster centres (or (H, K, D) for H heads).")
    check_backend_name(backend)
    if backend == "reference":
        # Opened once (a big-endian or reversed array is copied; opening it again for its dtype copied it again),
        # its dtype kept for the other ranks, and turned into float64 here, as dense_scores would, so that the
        # native copy is let go before the scores are formed
        z = open_host_array(features, "features", copied_anyway=True)
        dtype_code, z = DTYPE_CODES[z.dtype], z.double()
        where = f" of rank {comm.name}'s shard"
        scores = dense_scores(z, prototypes, bias, where=where, cluster_weights=cluster_weights)
        shard = DenseShard(scores, cluster_weights, backend, comm.name, epsilon, from_features=True)
        shard.fingerprint = inputs_fingerprint(prototypes, bias, shard.h, shard.k)
        # Features to the other ranks, as given (they saw a float64 scores shard and refused it as a dtype
        # disagreement): a -inf here comes from the bias, whole columns, as on a FeatureShard.
        shard.mode = FeatureShard.mode
        shard.dtype_code = dtype_code
        return shard
    return FeatureShard(features, prototypes, bias, cluster_weights, backend, comm.device, allow_tf32, memory_budget,
                        epsilon)  # fmt: skip


def refuse_empty_shard(data, name: str, rank) -> None:
    """A rank with no samples (a small data set split over many ranks) is refused as such, with what to do: it got
    the single-process words ("scores is empty ... at least one sample"), and the other ranks only that it refused
    its input. Arrays and tensors only (a path or a list is checked when opened, in those words)."""
    shape = getattr(data, "shape", None)
    if shape is None or len(shape) < 2 or shape[-2] != 0 or 0 in (*shape[:-2], shape[-1]):
        return
    raise ValueError(
        f"rank {rank}'s {name} have no samples (shape {tuple(shape)}): sinkhorn_assign_sharded needs at least one "
        "sample on every rank of its group. Give every rank some (torch's DistributedSampler pads the shards to "
        "equal sizes), or solve over a group without the empty ranks (torch.distributed.new_group)."
    )


def own_weights_hint(shape: tuple, n: int) -> str:
    """What to pass for sample weights of the wrong length (not the scores' other dimension): a rank that passed the
    global (N,) weights was told only this rank's number of samples."""
    longer = len(shape) == 1 and shape[0] > n
    return (
        (" Are these the weights of every rank's samples?" if longer else "")
        + " Each rank passes the weights of its own samples: its slice of the global weights, e.g. "
        "weights[start:stop] where this rank holds samples start to stop - 1 (the slices sum to 1 over all ranks)."
    )


def check_local_weights(weights, n: int, device, scores_shape=None,
                        transpose_fix=None) -> tuple[torch.Tensor, tuple[float, float]]:  # fmt: skip
    """This rank's slice of the global sample weights: (N_r,), finite, non-negative, as float64 — with this rank's
    parts of the tolerance on their global sum (:func:`~otlabel.problem.weight_sum_tolerance`), checked globally.
    ``scores_shape``: this rank's scores' (N_r, K) (None for features), for the hint :func:`sinkhorn_assign` gives
    when the length is K, with ``transpose_fix``."""
    from_numpy = isinstance(weights, np.ndarray)
    w = as_tensor(weights, "sample_weights")
    refuse_bool_weights(w, "sample_weights", from_numpy)
    if w.shape != (n,):
        hint = transposed_hint(w.shape[0], n, scores_shape, transpose_fix or TRANSPOSE_FIX) if w.ndim == 1 else ""
        raise ValueError(f"sample_weights must have shape ({n},), this rank's number of samples, got "
                         f"{tuple(w.shape)}.{hint or own_weights_hint(w.shape, n)}")  # fmt: skip
    dtype = w.dtype
    w = w.to(device=device, dtype=torch.float64)
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("sample_weights must be finite and non-negative.")
    return w, weight_sum_tolerance(dtype, n)


ACCELERATION_CODES = {ADAPTIVE: -1.0, ANDERSON: -2.0, AUTO: -3.0}  # a fixed omega travels as itself
DTYPE_NAMES = {code: str(dtype).removeprefix("torch.") for dtype, code in DTYPE_CODES.items()}


def _number(value: float) -> str:
    """A number in full: a float32 epsilon (0.10000000149011612) and 0.1 differ, and must not both read ``0.1``."""
    return str(int(value)) if float(value).is_integer() else repr(float(value))


def _named(table: dict, other: str = "{}"):
    """How a metadata value reads in an error: its name from ``table``, else :func:`_number` formatted by ``other``."""
    return lambda value: table.get(value, other.format(_number(value)))


_YES_NO = _named({0.0: "no", 1.0: "yes"})
# Where the metadata's words differ between the inputs (column 12: 0 scores, 1 features), by input
_INPUT_WORDS = {
    0.0: dict(data="scores", k_dim="last dimension of the scores", batched="scores"),
    1.0: dict(data="features", k_dim="rows of the prototypes", batched="prototypes"),
}
AGREEMENT = [  # (column of the metadata, what it is, whether ranks must agree, how a value reads in the error)
    # The input first: the words of the others depend on it (scores on one rank and features on another also differ
    # in dtype, which was the disagreement named)
    (12, "the input (scores, or features with prototypes)", True, _named({0.0: "scores", 1.0: "features"})),
    (0, "the number of heads H", True, _named({})),
    (1, "the number of samples", False, _named({})),
    (2, "the number of clusters K ({k_dim})", True, _named({})),
    (3, "the {data} dtype", True, _named(DTYPE_NAMES)),
    (4, "batched (3-d) {batched}", True, _named({0.0: "2-d", 1.0: "3-d"})),
    (5, "epsilon", True, _named({})),
    (6, "tol", True, _named({-1.0: "None"})),
    (7, "max_iter", True, _named({})),
    (8, "acceleration (or over_relaxation)", True,
     _named({1.0: "plain steps", **{code: repr(name) for name, code in ACCELERATION_CODES.items()}},
            "over_relaxation={}")),
    (9, "whether sample_weights are given", True, _YES_NO),
    (11, "whether init is given", True, _YES_NO),
]  # fmt: skip


def check_agreement(meta: torch.Tensor, ranks: list[int]) -> None:
    """Raise on every rank (they all see the same table) when the ranks disagree on the problem; ``ranks``: how each
    row's rank is named (global ranks)."""
    for col, what, must, shown in AGREEMENT:
        values = meta[:, col]
        if must and not bool((values == values[0]).all()):
            per_rank = ", ".join(f"rank {i}: {shown(v)}" for i, v in zip(ranks, values.tolist(), strict=True))
            words = _INPUT_WORDS.get(float(meta[0, 12]), _INPUT_WORDS[0.0])  # one input on every rank after col 12
            fix = (f"pass {words['data']} of one dtype with the same clusters, and the same solver arguments"
                   if col != 12 else "pass the same kind of input: scores, or features= with prototypes=")  # fmt: skip
            raise ValueError(
                f"sinkhorn_assign_sharded: the ranks disagree on {what.format(**words)} ({per_rank}). Every rank must "
                f"{fix}."
            )
