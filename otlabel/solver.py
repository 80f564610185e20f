"""The Sinkhorn loop, written once for every backend, and the public entry point ``sinkhorn_assign``.

One iteration is one pass over the scores (``operator.cluster_lse``) plus O(K) arithmetic here:

    lse   = LSE_j( S / eps + a(b) )          # the operator's pass; a(b) is the exact sample step
    b_new = log r - lse                      # the cluster step
    err   = sum_k r_k |exp(b - b_new) - 1|   # column-marginal L1 error of the plan at b, for free

The loop never touches a backend's tensors beyond these K-vectors, so the dense, streaming, sharded and
kernel paths all share it.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from . import cached
from .advice import dense_summary, warn_about_scores
from .anderson import ANDERSON_MEMORY, AndersonMixer, masked
from .backends import make_operator
from .backends.base import ScoreOperator
from .backends.torch_backend import caller_on_one_thread
from .entry import entry_point, user_stacklevel
from .problem import (
    as_tensor,
    compute_dtype_of,
    dense_tensor,
    described,
    judge_score_values,
    one_number,
    real_as_float,
    reference_arithmetic,
    validate,
)
from .result import ConvergenceWarning, SinkhornResult

DEFAULT_MAX_ITER = 1000
DEFAULT_TOL = 1e-4
ADAPTIVE = "adaptive"  # over_relaxation from the contraction rate of the first plain steps
ANDERSON = "anderson"  # Anderson mixing of the last few iterates
# acceleration="auto" with a tol: Anderson mixing, or first up to PLAIN_START plain steps (while tol stays in reach)
# where the operator takes them in compiled calls (small problems on the CPU, see ScoreOperator.takes_plain_steps)
AUTO = "auto"
ACCELERATIONS = ("auto", "anderson", "over-relaxation", "none")
RATE_SAMPLES = 3  # plain steps whose errors estimate the rate (after the cold start, which has no error)
MAX_ADAPTIVE_OMEGA = 1.9
# The plain steps acceleration="auto" takes first where they are compiled (at most a tenth of max_iter). There a step
# costs 1-15 us (64 x 10 to 131,072 scores), a mixed one ~180 us more of torch operations: plain steps solve most small
# problems sooner (64 x 10 to 1e-4 at eps 0.05: 14 plain steps against 7 mixed ones). The mixing takes plain steps
# itself until it has two errors (mixing_plain_steps): those are always taken. Beyond them the plain steps go on
# while their rate of fall keeps tol within this budget (cpu_kernels.OUTLOOK); those that fall short (small epsilon:
# hundreds or thousands of plain steps) start again from the same start with mixing, as "anderson" (the steps they
# share counted once), at a cost of the plain steps beyond the shared ones (0.1 ms at 64 x 10 for 100, ~1.6 ms at
# 131,072 scores). Mixing on from where the plain steps had got instead took fewer steps on most such problems, but
# 523 after the 100 where it took 340 from the start (2,000 x 50, eps 0.002, to 1e-6), and at max_iter 20-100 it left
# 149 of 7,560 solves unconverged that "anderson" converged (the restart: 145; the restart with the budget judged: 0).
PLAIN_START = 100
FLOAT32_FLOOR = 1e-5  # a tol below this may not be reached in float32 arithmetic (README, Stopping)


@dataclass
class ClusterMarginal:
    """The cluster weights ``r`` as the loop uses them, prepared once per solve rather than once per iteration: on a
    GPU each torch operation costs ~10-25 us of host time, and a small solve (a SwAV batch) is bound by them.

    ``empty`` marks the zero-weight clusters (``b = -inf`` there: they receive nothing and take no part in the
    error or the centring); it is ``None`` when the caller knows on the host that there are none, and then no
    step masks anything.
    """

    r: torch.Tensor  # (K,) float64
    log_r: torch.Tensor  # (K,) float64; -inf where r is 0
    empty: torch.Tensor | None  # (K,) bool, or None: no cluster has weight 0
    count: torch.Tensor  # 0-d int64 on the device: the clusters with weight (at least 1), whose mean centres b

    @classmethod
    def of(cls, cluster_weights: torch.Tensor, has_zero_weights: bool | None = None) -> ClusterMarginal:
        """``has_zero_weights``: what the caller knows of ``r`` on the host; ``None`` (not known) masks, as when some
        weight is 0 (asking the device would synchronise it)."""
        r = cluster_weights if cluster_weights.dtype == torch.float64 else cluster_weights.to(torch.float64)
        if has_zero_weights is False:
            # The count stays a tensor, as it is with zero weights: a division by a Python number is a multiplication
            # by its reciprocal on a GPU, which would round the mean differently. It, and the default weights' log,
            # are made once per size and device.
            k = r.shape[-1]
            log_r = cached.uniform_weights(k, r.device, log=True) if cached.is_uniform_weights(r) else r.log()
            return cls(r, log_r, None, cached.count(k, r.device))
        empty = r == 0
        return cls(r, r.log(), empty, (~empty).sum().clamp(min=1))


@dataclass
class LoopOutput:
    """What :func:`run_sinkhorn` returns, and every entry point turns into a :class:`SinkhornResult`."""

    potentials: torch.Tensor  # (H, K) float64
    n_iter: int
    errors: list[float]
    converged: bool
    error: float | None = None  # the marginal error reported for ``potentials``; not given: the last of ``errors``
    # Whether the error stopped falling (:func:`stalled`); not given: judged on ``errors``. epsilon_scaling's errors
    # are its stages' one after another, each stage starting afresh: it judges them stage by stage
    stalled: bool | None = None

    def __post_init__(self):
        if self.error is None:
            self.error = self.errors[-1]
        if self.stalled is None:
            self.stalled = stalled(self.errors)


def run_sinkhorn(
    operator: ScoreOperator,
    cluster_weights: torch.Tensor,
    init: torch.Tensor | None,
    max_iter: int,
    tol: float | None,
    acceleration: float | str = 1.0,
    callback=None,
    has_zero_weights: bool | None = None,
) -> LoopOutput:
    """Iterate cluster steps from ``init`` (H, K) (``None``: cold start) until ``err < tol`` or ``max_iter``.

    ``acceleration`` (from :func:`resolve_acceleration`): a fixed over-relaxation ``omega`` (1.0 is plain
    Sinkhorn), ``ADAPTIVE`` (omega from the first steps' contraction rate) or ``ANDERSON`` (mixing, see
    :class:`AndersonMixer`). Anderson mixing reads the error every iteration to guard itself, so with it even
    ``tol=None`` synchronises the device once per iteration (the default, ``"auto"``, mixes only with a ``tol``).

    With ``tol=None`` exactly ``max_iter`` iterations run and the device is never synchronised inside the
    loop (errors are read once at the end), which keeps small GPU solves launch-bound rather than sync-bound.
    ``callback(iteration, error)``, if given, is called after every iteration with the worst head's error
    (a float, ``inf`` on the cold start; it synchronises the device): progress bars hook in here.

    The loop's K-vectors are float64 whatever the operator computes in: a float32 ``b`` of magnitude 30 is
    quantised to 2e-6, which alone would floor the measured error there. ``b`` is also re-centred after every
    update (a constant added to every ``b_k`` changes nothing: the sample step absorbs it), which keeps the
    float32 copy handed to the operator small and precise.

    ``has_zero_weights``: whether some cluster weight is 0, when the caller knows it on the host (``False`` spares
    every iteration its masking operations); ``None`` when it does not.

    On the CPU the caller's thread runs torch on one thread meanwhile (:func:`caller_on_one_thread`; the passes keep
    their worker threads), a ``callback`` included.
    """
    with caller_on_one_thread(operator.device):
        return iterate(operator, cluster_weights, init, max_iter, tol, acceleration, callback, has_zero_weights)


def iterate(operator, cluster_weights, init, max_iter, tol, acceleration, callback, has_zero_weights) -> LoopOutput:
    """:func:`run_sinkhorn`'s loop."""
    adaptive = acceleration == ADAPTIVE
    omega = 1.0 if isinstance(acceleration, str) else acceleration
    clusters = ClusterMarginal.of(cluster_weights, has_zero_weights)
    empty = clusters.empty  # zero-weight clusters (None: there are none): b = -inf, they receive nothing
    mixes = acceleration in (ANDERSON, AUTO)
    b = None if init is None else centred(init.to(torch.float64), clusters)
    # Where the operator takes plain steps in compiled calls (a small problem on the CPU), it takes all of them, or
    # auto's plain start: the mixing's own first plain steps, and more while they keep tol within a tenth of max_iter
    # (PLAIN_START at most)
    plain = max_iter if not mixes and omega == 1.0 and not adaptive else 0
    shared = min(mixing_plain_steps(cold=b is None), max_iter)
    if acceleration == AUTO:
        plain = max(min(PLAIN_START, max_iter // 10), shared)
    if plain and empty is None and operator.takes_plain_steps():
        out = compiled_plain_steps(operator, clusters, b, plain, tol, callback, judged=acceleration == AUTO)
        if out.converged or acceleration != AUTO:
            return out
        return mixed_after_plain_start(operator, clusters, b, out, shared, max_iter, tol, callback)
    if tol is None and callback is None and not mixes:
        b, errors = steps_without_reading(operator, clusters, b, max_iter, omega)
        measured = [err for err in errors if err is not None]  # all but a cold start's
        history = worst_per_iteration(read_back(measured, b, empty), b.shape[0])  # every iteration's worst error
        return LoopOutput(potentials=b, n_iter=max_iter, errors=[math.inf] * (max_iter - len(measured)) + history,
                          converged=False)  # fmt: skip
    return steps_reading_errors(operator, clusters, b, max_iter, tol, acceleration, callback, [])


def compiled_plain_steps(operator, clusters: ClusterMarginal, b, n_plain: int, tol, callback,
                         judged: bool = False) -> LoopOutput:  # fmt: skip
    """Up to ``n_plain`` plain steps from ``b`` in the operator's compiled calls (:meth:`ScoreOperator.plain_steps`:
    they read their errors on the host), stopping where one reaches ``tol``, or (``judged``) where their rate of fall
    puts ``tol`` beyond ``n_plain`` steps. A step a call cannot take (it stops before it) is taken here as
    :func:`steps_reading_errors` takes it; with a ``callback``, one step a call, the callback after each (the same
    steps, bitwise: the judgement reads the errors before the call). The returned ``b`` is checked finite (by the
    compiled steps, or by that loop)."""
    history: list[float] = []
    converged = out_of_reach = False
    budget = n_plain if judged else 0
    while len(history) < n_plain and not converged and not out_of_reach:
        n_steps = 1 if callback is not None else n_plain - len(history)
        judge_with = history if judged else []  # (the judgement reads them; a call without it, none)
        b, errors, status = operator.plain_steps(b, clusters.log_r, clusters.r, n_steps, tol, judge_with, budget)
        history += errors
        converged, out_of_reach = status == 0, status == 3
        if callback is not None and errors:
            callback(len(history), errors[0])
        if status == 1:  # the loop's own plain step (omega 1.0)
            out = steps_reading_errors(operator, clusters, b, len(history) + 1, tol, 1.0, callback, history)
            b, converged = out.potentials, out.converged
    return LoopOutput(potentials=b, n_iter=len(history), errors=history, converged=converged)


def mixing_plain_steps(cold: bool) -> int:
    """The plain steps Anderson mixing takes before it mixes: it needs two measured errors, so 3 from a ``cold`` start
    (whose first step measures nothing), 2 from a warm one. They are a plain start's too, the same errors and steps."""
    return 3 if cold else 2


def mixed_after_plain_start(operator, clusters: ClusterMarginal, start, plain: LoopOutput, shared: int, max_iter: int,
                            tol, callback) -> LoopOutput:  # fmt: skip
    """acceleration="auto" after a plain start (``plain``, from ``start``) that ended short of ``tol``: the solve
    again from ``start`` with mixing, as acceleration="anderson", whose first ``shared`` steps are the plain start's
    first (:func:`mixing_plain_steps`): counted once, and not shown to the ``callback`` again. Where the plain start
    took no more than those, the potentials are "anderson"'s, bitwise. The errors are the plain start's (those the
    ``callback`` saw; the shared ones equal the mixing's to rounding: the compiled sums run in another order), then
    the mixing's after the shared steps; the solve is judged stalled or not on the mixing's own errors."""
    shared = min(shared, plain.n_iter)
    extra = plain.n_iter - shared  # plain steps the mixing does not take
    seen = None if callback is None else (lambda i, err: None if i <= shared else callback(i + extra, err))
    out = steps_reading_errors(operator, clusters, start, max_iter - extra, tol, AUTO, seen, [])
    out.stalled = stalled(out.errors)
    # (a mixing that converged within the shared steps, where the plain start's same errors did not: a tie with tol
    # rounded apart, keeps the plain start's errors and count)
    errors = plain.errors + out.errors[shared:]
    return dataclasses.replace(out, n_iter=len(errors), errors=errors)


def steps_reading_errors(operator, clusters: ClusterMarginal, b, max_iter, tol, acceleration, callback,
                         history: list[float]) -> LoopOutput:  # fmt: skip
    """Steps to ``max_iter`` (counting those ``history`` holds), each error read back as it runs (a ``tol``, a
    ``callback`` or mixing reads it): plain, over-relaxed or Anderson-mixed."""
    adaptive = acceleration == ADAPTIVE
    omega = 1.0 if isinstance(acceleration, str) else acceleration
    empty = clusters.empty
    mixer = AndersonMixer(ANDERSON_MEMORY, clusters.r) if acceleration in (ANDERSON, AUTO) else None
    converged = False
    best_error, step_from_best = math.inf, None  # with mixing: the smallest error read, and F(b) of that b
    while len(history) < max_iter:
        b_new, err = cluster_step(operator, clusters, b)
        # the iteration's one sync (with the mixer's verdict on its last proposal, where it made one)
        sound = None if mixer is None else mixer.last_step_sound()
        values = read_back([x for x in (err, sound) if x is not None], b_new, empty)
        worst = math.inf if err is None else worst_per_iteration(values[: len(err)], len(err))[0]
        history.append(worst)
        if mixer is not None:
            mixer.review_last_step(sound is None or values[-1] != 0)
            if worst < best_error:
                best_error, step_from_best = worst, b_new
        if callback is not None:
            callback(len(history), worst)
        if tol is not None:
            if worst < tol:
                converged = True  # keep b: its error is the one just measured
                break
            if omega != 1.0 and len(history) > 2 and worst > 1.01 * history[-2]:
                omega, adaptive = 1.0, False  # safeguard: over-relaxation is only locally convergent
            elif adaptive and len(history) == 1 + RATE_SAMPLES:
                omega, adaptive = omega_for_rate(history[1:]), False
        if mixer is not None and b is not None:
            b_new = mixer.step(b, b_new, worst, empty)
        b = next_iterate(
            operator, clusters, b, b_new, omega, mixed=b is not None and (mixer is not None or omega != 1.0)
        )
    read_back([], b, empty)  # the returned b's check (the errors were read on the way)
    error = None  # the last of history
    if step_from_best is not None and not converged:
        # The last mixed step is never measured: in 7 of 450 unconverged solves (cosines, eps 0.002-0.05, 5-80
        # iterations) it had more error than the iterate before it, up to 2.0x (4x seen in a review). A result must
        # not be worse than the error it reports; the plain step from the best iterate read never was (<= 1.00x).
        b, error = next_iterate(operator, clusters, None, step_from_best, 1.0, mixed=True), best_error
    return LoopOutput(potentials=b, n_iter=len(history), errors=history, converged=converged, error=error)


def steps_without_reading(operator: ScoreOperator, clusters: ClusterMarginal, b, max_iter: int, omega: float):
    """``max_iter`` cluster steps (over-relaxed by a fixed ``omega``) that read nothing back: ``(b, errors)`` with
    ``b`` the (H, K) float64 potentials and ``errors`` each iteration's marginal error (H,) on the device, ``None``
    for a cold start's first (it has no plan to measure: its error is inf).

    The whole fixed-iteration solve: nothing here waits for the device, so a CUDA graph can capture it
    (:mod:`otlabel.graphs`). :func:`run_sinkhorn` takes this path when nothing asks for the error on the way.
    """
    errors = []
    for _ in range(max_iter):
        b_new, err = cluster_step(operator, clusters, b)
        errors.append(err)
        b = next_iterate(operator, clusters, b, b_new, omega, mixed=b is not None and omega != 1.0)
    return b, errors


def cluster_step(operator: ScoreOperator, clusters: ClusterMarginal, b):
    """One pass over the scores: the plain Sinkhorn step ``b_new = log r - LSE`` (H, K) and the marginal error (H,)
    of the plan at ``b`` (``None`` on the cold start, ``b`` None: no plan yet, no error measured)."""
    lse = operator.cluster_lse(potentials_for(operator, b))  # (H, K)
    # float32 or float64: the subtraction from the float64 log r promotes it exactly (no copy of its own)
    b_new = masked(clusters.log_r - lse, clusters.empty, float("-inf"))
    return b_new, None if b is None else marginal_error(b, lse, clusters)


def next_iterate(operator: ScoreOperator, clusters: ClusterMarginal, b, b_new, omega: float, mixed: bool):
    """The next ``b``: ``b_new`` (over-relaxed from ``b`` when ``mixed`` and ``omega != 1``), centred; a mixed step is
    then taken from rank 0 on every rank (sharded solves may round differently)."""
    b = relax(b, b_new, omega, clusters.empty) if mixed and omega != 1.0 else b_new
    b = centred(b, clusters)
    return operator.agree(b) if mixed else b


def read_back(values: list[torch.Tensor], b, empty) -> list[float]:
    """``values`` (1-d tensors) as one list of floats, read together with a check that ``b`` is finite: one device
    sync. The check reads ``b``'s sum per head over the clusters with weight, finite exactly when each of them is
    (potentials are far below float64's overflow: a sum of finite ones stays finite; NaN and either inf carry)."""
    sums = masked(b, empty, 0.0).sum(dim=-1)  # (H,)
    floats = (torch.cat([*values, sums]) if values else sums).tolist()
    n_values = len(floats) - sums.shape[0]
    if not all(math.isfinite(x) for x in floats[n_values:]):
        raise_infeasible()
    return floats[:n_values]


def worst_per_iteration(errors: list[float], n_heads: int) -> list[float]:
    """Each iteration's worst head from ``errors`` read back as iterations x heads, NaN where any head's is."""
    if n_heads == 1:
        return errors
    rows = (errors[i : i + n_heads] for i in range(0, len(errors), n_heads))
    return [math.nan if any(math.isnan(x) for x in row) else max(row) for row in rows]


def raise_infeasible():
    """Masks are checked before solving (``cuda_graph=True``: after the replay), except where the check is skipped
    (masks of too many distinct rows, no SciPy): an infeasible one then shows here. Without -inf scores this should not
    happen."""
    raise ValueError(
        "Sinkhorn potentials became non-finite: the masked problem has no feasible balanced plan "
        "(some group of clusters cannot reach enough samples). Relax the mask or the cluster weights. If the scores "
        "have no -inf, this is a bug in otlabel: please report it with the scores' shape, dtype and epsilon."
    )


def epsilon_stages(problem, epsilon_scaling: float) -> list[float]:
    """Temperatures from a start near the scores' spread down to ``problem.epsilon``, shrinking by a factor.

    The spread is that of the scores of (at most) the first 4096 samples that can carry mass (:func:`mass_spread`):
    above it the plan is nearly uniform and Sinkhorn converges in a few iterations.
    """
    spread = mass_spread(problem.scores[:, :4096].double(), problem.cluster_weights > 0)
    stages = [problem.epsilon]
    while stages[-1] / epsilon_scaling < spread and len(stages) < 64:
        stages.append(stages[-1] / epsilon_scaling)
    return stages[::-1]


# A score this many spreads below its row's maximum weighs under e^-100 at any stage that starts from that spread.
MASS_GAPS = 100.0


def mass_spread(scores: torch.Tensor, weighted: torch.Tensor) -> float:
    """The standard deviation of the scores (H, N, K) that can carry mass: a score more than ``MASS_GAPS`` spreads
    below its row's maximum weighs nothing at any stage, and only acts as a mask (-1e9, ``torch.finfo(dtype).min``:
    counted, -3e38 made the start ~1e37 and the schedule its 64 stages). The spread is the smallest that the scores
    within that reach give back, grown from that of the row maxima and the weighted clusters' column maxima (scores,
    not masks, in any problem with a balanced plan), or from the median gap between a sample's best score and its
    runner-up where that is wider; 0 when nothing is spread."""
    finite = torch.isfinite(scores)
    gap = scores.amax(dim=2, keepdim=True) - scores  # (H, N, K): inf where the scores are -inf
    maxima = torch.cat([scores.amax(dim=2).flatten(), scores.amax(dim=1)[:, weighted].flatten()])
    maxima = maxima[torch.isfinite(maxima)]
    spread = float(maxima.std()) if maxima.numel() > 1 else 0.0
    # Scores less each sample's maximum (the span error's fix) have every maximum 0, or nearly: started from their
    # spread (or from a tiny gap), the rounds below stop at once, the row maxima outweighing the few scores taken in
    # (randn 4096 x 8: 2.7e-7 for 1.06, no stage but the last). The typical sample's gap to its runner-up is a score
    # difference unless most samples have a single score within reach.
    runner_up = gap.masked_fill(~(finite & (gap > 0)), math.inf).amin(dim=2).flatten()  # (H * N,)
    runner_up = runner_up[torch.isfinite(runner_up)]
    if runner_up.numel():
        spread = max(spread, float(runner_up.median()))
    for _ in range(64):  # each round takes in more scores; a few suffice (two when no score is a mask)
        within = scores[finite & (gap <= MASS_GAPS * spread)]
        wider = float(within.std()) if within.numel() > 1 else 0.0
        if not wider > spread:
            return wider
        spread = wider
    return spread


def run_with_epsilon_scaling(problem, backend, init, max_iter, tol, acceleration, epsilon_scaling, callback=None):
    """Solve at decreasing temperatures, each stage warm-starting the next; the last is ``problem.epsilon``.

    Potentials are rescaled between stages (``b * eps_old / eps_new``: the dual ``eps * b`` is what stays put).
    Intermediate stages stop at a looser tolerance; all iterations count towards ``max_iter``, and the last stage
    (the requested ``epsilon``) always keeps at least one: intermediate stages that find none left are skipped.
    ``callback`` sees the iterations counted across stages, and each stage's own error.

    An ``init`` (potentials at ``problem.epsilon``) is solved from at that epsilon, with no coarser stage: annealing
    is a cold start's aid, and undid a warm one (rescaled to the first stage, a converged init took 18-74 iterations
    where it takes 1 at epsilon, no fewer than a cold start).
    """
    stages = epsilon_stages(problem, epsilon_scaling) if init is None else [problem.epsilon]
    b, errors, used, stage_stalled = init, [], 0, False
    # With tol=None no stage stops early: give each stage an equal share of max_iter (the last one the rest), or the
    # first, coarsest stage would take every iteration but one.
    share = max_iter // len(stages) if tol is None else max_iter
    for i, eps in enumerate(stages):
        last = i == len(stages) - 1
        budget = max_iter - used if last else min(share, max_iter - used - 1)
        if budget < 1:
            b = None if b is None else b * (eps / stages[i + 1])
            continue
        operator = make_operator(dataclasses.replace(problem, epsilon=eps), backend)
        if b is not None and i:  # carried from the stage before, rescaled: as wide as an init may be (pulled_in)
            b = pulled_in(b, problem.cluster_weights == 0, compute_dtype_of(problem.scores))
        stage_tol = tol if last or tol is None else max(tol, 1e-2)
        counted = None if callback is None else (lambda it, err, done=used: callback(done + it, err))
        out = run_sinkhorn(operator, problem.cluster_weights, b, budget, stage_tol, acceleration, callback=counted,
                           has_zero_weights=problem.has_zero_weights)  # fmt: skip
        errors += out.errors
        used += out.n_iter
        stage_stalled = stage_stalled or (not out.converged and out.stalled)
        if not last:
            b = out.potentials * (eps / stages[i + 1])
    return operator, LoopOutput(out.potentials, used, errors, out.converged, error=out.error, stalled=stage_stalled)


def no_epsilon_scaling(epsilon_scaling, where: str) -> None:
    """Refuse ``epsilon_scaling`` on the entry points without it (features, streamed, sharded), saying what helps.

    Each stage would need its own operator (and, streamed, its own checking pass), and on top of the default
    Anderson mixing it did not pay in-memory: 4.9x over plain steps against Anderson alone's 7.7x (100,000 x 1,000,
    eps 0.01, to 1e-3; benchmarks/RESULTS_CPU.md)."""
    if epsilon_scaling is not None:
        raise ValueError(
            f"epsilon_scaling is not available {where}; the default acceleration (Anderson mixing) and "
            "init=<previous result> are what speed up small epsilon there. Leave epsilon_scaling=None."
        )


def marginal_error(b, lse, clusters: ClusterMarginal) -> torch.Tensor:
    """``sum_k r_k |exp(b - b_new) - 1|`` per head (H,), the column-marginal L1 error of the plan at ``b``: its column
    sums are ``r exp(b - b_new) = exp(b + lse)`` (``b_new = log r - lse``), so this is ``||exp(b + lse) - r||_1``,
    in four operations (zero-weight clusters, ``b = -inf``, hold no mass)."""
    mass = masked(torch.exp(b + lse), clusters.empty, 0.0)  # (H, K), float64 (lse promoted exactly)
    return torch.linalg.vector_norm(mass - clusters.r, ord=1, dim=-1)


def potentials_for(operator: ScoreOperator, b):
    """``b`` as the operator takes it: float64 where it can use the precision, else its compute dtype."""
    if b is None or operator.takes_float64_potentials:
        return b
    return b.to(operator.dtype)


def omega_for_rate(errors: list[float]) -> float:
    """Over-relaxation for the contraction rate seen over plain steps: ``2 / (1 + sqrt(1 - kappa))``.

    That is the optimal factor for a linear iteration contracting by ``kappa`` per step (successive
    over-relaxation); fast-converging problems (small ``kappa``) get ~1, slow ones approach 2 (capped at 1.9).
    """
    first, last = errors[0], errors[-1]
    if not (0 < first < math.inf and 0 < last < 1.5 * first):
        return 1.0  # no rate to read (or the error is clearly rising): plain steps
    kappa = min((last / first) ** (1.0 / (len(errors) - 1)), 0.999)  # a flat error is a plateau: kappa -> 1
    return min(MAX_ADAPTIVE_OMEGA, 2.0 / (1.0 + math.sqrt(1.0 - kappa)))


def centred(b, clusters: ClusterMarginal) -> torch.Tensor:
    """``b`` minus its mean over the clusters with weight (per head): the same plan, smaller numbers.

    The count stays a tensor: reading it as an int would synchronise the device every iteration. ``addcdiv`` forms
    ``b + (-1) (sum / count)`` in one operation, bitwise ``b - sum / count`` (the negation is exact)."""
    return torch.addcdiv(b, masked(b, clusters.empty, 0.0).sum(dim=-1, keepdim=True), clusters.count, value=-1)


def relax(b, b_new, omega: float, empty) -> torch.Tensor:
    """Over-relaxed step ``b + omega (b_new - b)``; zero-weight clusters stay at ``-inf``."""
    return masked(b + omega * (b_new - b), empty, float("-inf"))


def potentials_finite(b, empty) -> torch.Tensor:
    """0-d bool tensor (no sync): every potential of a cluster with weight is finite. (``|b| < inf`` is two operations,
    where ``isfinite`` is four: NaN fails the comparison too.)"""
    return (masked(b, empty, 0.0).abs() < math.inf).all()


# How init= is named in check_potentials' messages, what to give instead, how to keep a -inf one and how to start
# without it (the command line has words of its own: otlabel.cli.read_init)
INIT_WORDS = dict(named="init", give="a previous result (or its cluster_potentials)", cold="start cold with init=None",
                  zero_weights="init fits only cluster_weights that are 0 where it is -inf",
                  patch="set it to a finite value (e.g. the smallest finite potential), ")  # fmt: skip


def check_potentials(init: torch.Tensor | np.ndarray, n_heads: int, empty: torch.Tensor, *, named: str, give: str,
                     cold: str, zero_weights: str, patch: str = "") -> torch.Tensor:  # fmt: skip
    """The rules of a warm start's potentials, for ``init=`` and the command line's ``--init`` alike (a tensor, or
    the NumPy array read from the file), each in its own words: real floating point; shape (K,) or (H, K); finite for
    every cluster of positive weight (``empty``: (K,) bool, the clusters of weight 0, which may hold -inf). Returns
    them as float64 (H, K) on ``empty``'s device. ``named`` names them, ``give`` says what to give instead, ``cold``
    how to start without them; for a -inf potential, ``zero_weights`` says which weights it fits and ``patch`` (ending
    in ", " where given) how to keep the rest of the start."""
    floating = init.dtype.is_floating_point if isinstance(init, torch.Tensor) else init.dtype.kind == "f"
    if not floating:
        raise TypeError(f"{named} holds {str(init.dtype).removeprefix('torch.')} values, not cluster potentials (real "
                        f"floating point): give {give}, or {cold}.")  # fmt: skip
    h, k = n_heads, empty.shape[0]
    if tuple(init.shape) not in ((k,), (h, k)):
        heads = f"{h} heads of " if h > 1 else ""
        raise ValueError(f"{named} must have shape ({k},) or ({h}, {k}), one potential per cluster, got "
                         f"{tuple(init.shape)}: it was written for other clusters (or heads) than this problem's "
                         f"{heads}K = {k}. Give {give} on these clusters, or {cold}.")  # fmt: skip
    if isinstance(init, np.ndarray):
        init = torch.from_numpy(np.array(init, dtype=init.dtype.newbyteorder("=")))  # a copy, in native byte order
    init = init.detach().to(device=empty.device, dtype=torch.float64).expand(h, k)
    if not bool(potentials_finite(init, empty)):  # zero-weight clusters get -inf whatever they held
        head, cluster = (int(i) for i in torch.nonzero(~torch.isfinite(init) & ~empty)[0])
        value = float(init[head, cluster])
        where = f"cluster {cluster}" + (f", head {head}" if h > 1 else "")
        if value == -math.inf:  # what a solve gives a cluster of weight 0
            fixes = f"{patch}give {give} with these weights, or {cold}"
            raise ValueError(f"{named} holds -inf for {where}, whose weight is positive: potentials must be finite "
                             f"there (a solve gives -inf to its clusters of weight 0: {zero_weights}). "
                             f"{fixes[0].upper()}{fixes[1:]}.")  # fmt: skip
        raise ValueError(f"{named} holds {'NaN' if math.isnan(value) else value} for {where}, whose weight is "
                         f"positive: potentials must be finite there. Give {give} with these weights, or "
                         f"{cold}.")  # fmt: skip
    return init


def check_init(init, n_heads: int, cluster_weights: torch.Tensor, dtype, arithmetic=None, *,
               epsilon: float) -> torch.Tensor | None:  # fmt: skip
    """A warm start: a previous result or its ``cluster_potentials``, shaped (K,) or (H, K); returned (H, K) in
    ``dtype`` on the cluster weights' device, -inf for clusters of weight 0. ``arithmetic`` (default ``dtype``): the
    dtype the passes form ``S / eps + b`` in (:func:`~otlabel.problem.compute_dtype`), which bounds how far apart
    potentials can usefully be. A result solved at another temperature is rescaled to ``epsilon`` (the dual
    ``eps * b`` kept, as between epsilon_scaling's stages); bare potentials carry no epsilon and are taken as given."""
    if init is None:
        return None
    if isinstance(init, SinkhornResult):
        init = (
            init.cluster_potentials * (init.epsilon / epsilon) if init.epsilon != epsilon else init.cluster_potentials
        )
    if isinstance(init, (np.ndarray, list, tuple, str, os.PathLike)):  # saved with numpy.save, or written out
        init = as_tensor(init, "init")  # a path: 'load it first: np.load(path)' (a str was only "got str")
    elif isinstance(init, torch.Tensor):  # sparse, meta or nested: torch's own errors came from the copy below
        init = dense_tensor(init, "init")
    if not isinstance(init, torch.Tensor):
        raise TypeError(f"init must be a SinkhornResult or real floating-point potentials (a tensor or NumPy array), "
                        f"got {type(init).__name__}.")  # fmt: skip
    empty = cluster_weights == 0
    init = check_potentials(init, n_heads, empty, **INIT_WORDS)  # (H, K) float64
    # Only differences between potentials matter (the sample step absorbs a constant): the start is taken less its
    # largest potential (which becomes exactly 0), and pulled in to the widest spread the passes can take
    top = masked(init, empty, -math.inf).amax(dim=1, keepdim=True)  # (H, 1)
    return pulled_in(init - top, empty, arithmetic or dtype).to(dtype)


def widest_spread(arithmetic: torch.dtype) -> float:
    """How far below the largest potential a start may hold one (a warm start's, or one carried between
    epsilon_scaling's stages): 1 / (the machine epsilon of the passes' ``arithmetic``), 8.4e6 for float32.

    Beyond it one ulp is a nat, so no solution's potentials can be resolved that far apart, and a wider start made the
    first pass overflow: one cluster 1e20 above the rest gave NaN in float32, and so did the potentials carried between
    stages of a problem whose mass must cross -1e9 fills (rescaled by up to 2^30 where iterations ran out, they reached
    +-5e9: a pass rounds ``b`` to float32, and ``exp(b - round(b))`` overflows once that rounding passes 88 nats, above
    2^31). Spreads of converged solves stay far inside it (2.2e4 at eps 1e-5 on unit-range float32 scores)."""
    return 1.0 / torch.finfo(arithmetic).eps


def pulled_in(b: torch.Tensor, empty: torch.Tensor, arithmetic: torch.dtype) -> torch.Tensor:
    """A start ``b`` (H, K) float64 (a warm start, or potentials carried to epsilon_scaling's next stage), none more
    than :func:`widest_spread` below the largest of its head; -inf where ``empty`` (zero-weight clusters). Those within
    it are returned bitwise."""
    top = masked(b, empty, -math.inf).amax(dim=1, keepdim=True)  # (H, 1)
    return torch.where(empty, -math.inf, b.clamp(min=top - widest_spread(arithmetic)))


def resolve_acceleration(acceleration, over_relaxation, tol) -> float | str:
    """What :func:`run_sinkhorn` does between passes: a fixed ``omega`` (1.0 = plain), ``ADAPTIVE``, ``ANDERSON`` or
    ``AUTO``.

    ``acceleration="auto"`` (the default) is ``AUTO`` when solving to a tolerance: Anderson mixing, or where the
    operator takes plain steps in compiled calls (small problems on the CPU) first up to ``PLAIN_START`` of them (while
    their rate of fall keeps ``tol`` in reach); plain steps (the classic iterates, SwAV's) with ``tol=None``, where no
    error is read inside the loop. An explicit ``over_relaxation`` is a fixed ``omega``.
    """
    if not isinstance(acceleration, str) or acceleration not in ACCELERATIONS:  # an array: NumPy's "ambiguous"
        raise ValueError(f"acceleration must be one of {', '.join(map(repr, ACCELERATIONS))}; got {acceleration!r}.")
    if over_relaxation is not None:
        if acceleration not in ("auto", "over-relaxation"):
            raise ValueError(
                f"over_relaxation={over_relaxation!r} is a fixed over-relaxation: it cannot be combined with "
                f"acceleration={acceleration!r}. Pass one or the other."
            )
        return float(over_relaxation)
    if acceleration == "over-relaxation" and tol is None:
        raise ValueError(
            "acceleration='over-relaxation' adapts omega to the errors read at each convergence check, and "
            "tol=None reads none (it would run plain Sinkhorn). Pass over_relaxation=<omega> for a fixed omega "
            "(e.g. 1.5), or a tol."
        )
    if acceleration == "none" or (acceleration == "auto" and tol is None):
        return 1.0
    return {"over-relaxation": ADAPTIVE, "anderson": ANDERSON}.get(acceleration, AUTO)


def check_tol(tol) -> float | None:
    """``tol`` as a float (``None`` kept): a number, or one held in a one-element real tensor or array (a scheduled
    value), as ``epsilon`` takes. Each entry point reads it so before anything uses it."""
    if tol is None:
        return None
    tol = real_as_float(one_number(tol, "tol", "a positive number (or None for exactly max_iter iterations)"))
    if not (math.isfinite(tol) and tol > 0):
        raise ValueError(f"tol must be a positive number (or None for exactly max_iter iterations), got {tol!r}.")
    return tol


def check_solver_options(max_iter, tol, acceleration, over_relaxation, callback=None) -> float | str:
    """Every entry point's loop options, checked before any pass over the data; returns the resolved
    acceleration for :func:`run_sinkhorn` (see :func:`resolve_acceleration`)."""
    if callback is not None and not callable(callback):  # else Python's "'int' object is not callable", mid-solve
        raise TypeError(f"callback must be a function callback(iteration, error) (or None), got "
                        f"{type(callback).__name__}.")  # fmt: skip
    if not is_number(max_iter, numbers.Integral) or max_iter < 1:
        held = isinstance(max_iter, (torch.Tensor, np.ndarray))  # (epsilon and tol take one; a count is a Python int)
        fix = " Pass a Python int: int(max_iter)." if held else ""
        raise ValueError(f"max_iter must be an integer >= 1, got {described(max_iter)}.{fix}")
    tol = check_tol(tol)
    if over_relaxation is not None and not (is_number(over_relaxation) and 1.0 <= over_relaxation < 2.0):
        raise ValueError(f"over_relaxation must be in [1, 2), got {described(over_relaxation)}; 1 is plain Sinkhorn.")
    return resolve_acceleration(acceleration, float(over_relaxation) if over_relaxation else None, tol)


def check_flags(**flags) -> None:
    """Each boolean option must be True or False (a NumPy bool too): a string such as ``cuda_graph="no"`` is
    truthy, and was taken for True."""
    for name, value in flags.items():
        if not isinstance(value, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {value!r}.")


def is_number(x, kind=numbers.Real) -> bool:
    """A Python or NumPy number of that kind (``numbers.Real`` or ``numbers.Integral``), not a bool."""
    return isinstance(x, kind) and not isinstance(x, (bool, np.bool_))


@entry_point
def sinkhorn_assign(
    scores=None,
    epsilon: float = 0.05,
    *,
    features=None,
    prototypes=None,
    bias=None,
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
    callback=None,
    warn: bool = True,
    cuda_graph: bool = False,
) -> SinkhornResult:
    r"""Balanced assignment of N samples to K clusters by entropic optimal transport.

    Solves ``max_P <P, S> + eps H(P)`` over plans ``P >= 0`` with row sums ``c`` (sample weights) and column
    sums ``r`` (cluster weights) by log-domain Sinkhorn-Knopp, and returns the hard labels
    ``argmax_k P[j, k]`` and the soft codes ``P[j, :] / c_j``. Adding a per-sample or per-cluster
    constant to ``scores`` changes nothing, so logits and log-probabilities give the same answer, and SeLa's
    ``P^lambda`` scaling is ``epsilon = 1 / lambda``.

    Args:
        scores: ``(N, K)`` or batched ``(H, N, K)`` (H independent problems, e.g. SeLa's heads): torch tensor
            (any device) or NumPy array of float16/bfloat16/float32/float64, a list of numbers, or a list of H
            tensors of one shape (stacked); higher is better. ``-inf`` marks
            a forbidden pair; a mask that leaves no balanced plan (some clusters too few samples: Hall's condition,
            :mod:`otlabel.feasibility`) is a ``ValueError`` before any iteration. Detached: the result carries no
            autograd graph (pseudo-labels are targets).
        epsilon: temperature ``> 0`` in the units of the scores. The default, 0.05, is SwAV's for cosine
            similarities; for SeLa's ``P ** lambda`` on logits give ``1 / lambda``. Smaller is harder and slower to
            converge. ``|scores| / epsilon`` is limited to 3e3 (1e11 for float64 scores): beyond, a
            :class:`~otlabel.ScoreSpanError` says what to do (subtracting each sample's maximum changes nothing).
        features, prototypes, bias: instead of ``scores``, features ``Z`` (N, D) and prototypes ``C`` (K, D) (or
            (H, K, D) for H heads), optionally a per-cluster ``bias`` (K,)/(H, K): the scores ``Z C^T + bias`` are
            computed tile by tile and never stored (see :mod:`otlabel.features`). ``Z`` may also be a NumPy array,
            a memmap or a ``.npy`` path (streamed from the host).
        cluster_weights: ``(K,)`` non-negative, summing to 1 (default uniform ``1/K``): each cluster's share.
            Zero is allowed (the cluster gets nothing).
        sample_weights: ``(N,)`` non-negative, summing to 1 (default uniform ``1/N``).
        max_iter: most iterations (each is one pass over the scores); reaching it before ``tol`` is a
            :class:`~otlabel.ConvergenceWarning` (``converged=False`` in the result), not an error.
        tol: stop when the cluster-marginal L1 error (summed over the clusters, at most 2) is below this; ``None``
            runs exactly ``max_iter`` iterations with no convergence check (SwAV's fixed 3: ``max_iter=3,
            tol=None``). With float32 scores the error stops near 1e-7 to 1e-6: pass float64 for tighter ones.
        init: warm start — a previous ``SinkhornResult`` or its ``cluster_potentials``. A result solved at another
            ``epsilon`` is rescaled to this one (``b * eps_old / eps``, as between ``epsilon_scaling``'s stages);
            bare potentials are taken as potentials at this ``epsilon``.
        backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"`` (float64 specification).
        acceleration: what happens between passes. ``"auto"`` (default): ``"anderson"`` when solving to ``tol``,
            plain steps with ``tol=None`` (the classic iterates, e.g. SwAV's). One size rule: on the CPU with Numba,
            a problem of at most 131,072 scores (H x N x K, every cluster weight positive) takes its plain steps
            in one compiled call, ~1-15 us a step where a mixed one costs ~180 us of torch operations, so ``"auto"``
            takes up to 100 plain steps there first (at most ``max_iter // 10``; 64 x 10 to 1e-4 at eps 0.05: 14
            plain steps in 0.27 ms instead of 7 mixed ones in 1.5 ms), beyond the mixing's own first plain steps
            only while their rate of fall keeps ``tol`` within that budget; should they not reach ``tol``, it starts
            again with the mixing, as ``"anderson"`` (their count included in ``n_iter``, and in ``max_iter``; the
            steps both take counted once). Larger problems mix from the start, as before.
            ``"anderson"``: Anderson mixing of
            the last 6 iterates (5 differences), safeguarded (restarted with a plain step whenever the error rises
            1.5x above its best) — fewer iterations than plain Sinkhorn, most at small ``epsilon``: to 1e-3 at
            100,000 x 1,000, 25 instead of 72 at eps 0.05 and 60 instead of 838 at eps 0.01. ``"over-relaxation"``:
            three plain steps measure the contraction rate ``kappa``, then ``b <- b + omega (b_new - b)`` with
            ``omega = 2 / (1 + sqrt(1 - kappa))`` (capped at 1.9; back to plain steps should the error grow by
            more than 1%). ``"none"``: plain Sinkhorn-Knopp.
        over_relaxation: a fixed ``omega`` in ``[1, 2)`` instead (1 is plain Sinkhorn).
        epsilon_scaling: ``None`` (default) or a factor in (0, 1): solve first at a temperature near the
            scores' spread, then shrink it by this factor per stage down to ``epsilon``, warm-starting each
            stage. Pays at small ``epsilon``; each stage costs one extra ``exp`` pass on the CPU path. With an ``init``
            (potentials at ``epsilon``) there are no stages: the solve starts from it at ``epsilon``, as without
            ``epsilon_scaling`` (annealing from a coarser temperature undid a warm start). Dense scores only:
            refused with ``features=``.
        allow_tf32: for fp32 CUDA features on the features kernel: multiply on tf32 tensor cores (scores good to
            ~1e-3 relative) or, with ``False``, in exact fp32. Streamed features are multiplied by PyTorch, as
            torch's own TF32 setting says (``torch.backends.cuda``); scores are never multiplied.
        callback: ``callback(iteration, marginal_error)`` after every iteration (the worst head's error; ``inf``
            for the cold start), e.g. to drive a progress bar or log convergence. It reads the error back from
            the device every iteration, which a ``tol=None`` solve otherwise never does. It runs inside the solve:
            uncompiled, and with the CPU as torch's default device (see :mod:`otlabel.entry`).
        warn: emit a :class:`ConvergenceWarning` when ``tol`` is not reached in ``max_iter`` iterations. It does
            not silence :class:`~otlabel.InputWarning` (below): filter that with :func:`warnings.filterwarnings`.
        cuda_graph: for small fixed-iteration solves on a GPU (a SwAV batch: ``max_iter=3, tol=None``), whose time
            goes to launching kernels: capture the solve in a CUDA graph on the first call of each shape and replay
            it after (see :mod:`otlabel.graphs`; same results, bitwise). CUDA scores, the triton backend,
            ``tol=None``, plain or fixed over-relaxed steps, no ``init``, ``callback`` or ``epsilon_scaling``;
            codes are computed with the labels. Each cached shape keeps a copy of the scores and the codes.

    Returns:
        :class:`SinkhornResult` with ``labels``, ``codes`` (lazy), ``plan`` (lazy), ``objective`` (lazy),
        ``cluster_potentials``, ``n_iter``, ``converged``, ``marginal_error``, ``errors`` and ``epsilon``, on the
        input's device.

    Raises:
        TypeError: scores or weights of a kind that is not taken as is (integers, complex, a sparse or meta tensor,
            a ``.npy`` path: :func:`~otlabel.sinkhorn_assign_stream` reads those); the message says how to convert.
        ValueError: wrong shapes (weights sized for the other dimension: transposed scores?), NaN or +inf scores,
            ``epsilon <= 0``, negative weights or weights that do not sum to 1 (within 1e-4, then rescaled), a
            mask (``-inf``) that leaves no balanced plan (naming the samples or clusters), options that do not go
            together. :class:`~otlabel.ScoreSpanError`, a ``ValueError``: ``|scores| / epsilon`` too large (above).

    Warns:
        ConvergenceWarning: ``tol`` not reached in ``max_iter`` iterations (unless ``warn=False``).
        InputWarning: input that solves but likely means nothing: probabilities passed as scores (pass logits or
            log-probabilities), an ``epsilon`` above the scores' whole range (SeLa's ``lambda`` given as
            ``epsilon``?), every sample scored alike (a collapsed network). The message says what to do.

    Example:
        >>> import torch
        >>> from otlabel import sinkhorn_assign
        >>> _ = torch.manual_seed(0)
        >>> res = sinkhorn_assign(torch.randn(1000, 10), epsilon=0.05)
        >>> torch.bincount(res.labels, minlength=10).tolist()  # balanced plan; hard labels near N/K  # doctest: +SKIP
        [102, 97, 101, 99, 99, 101, 99, 100, 101, 101]
    """
    check_flags(allow_tf32=allow_tf32, warn=warn, cuda_graph=cuda_graph)
    tol = check_tol(tol)  # a float from here on (a one-element tensor or array given)
    if features is not None or prototypes is not None or bias is not None:
        if cuda_graph:
            raise ValueError("cuda_graph=True takes dense scores: features mode is not captured.")
        if scores is not None:
            if features is None and prototypes is None:  # bias= alone, with dense scores
                raise ValueError("bias= is for features mode (S = Z C^T + bias); with scores, add it to them: "
                                 "scores + bias.")  # fmt: skip
            if features is None:  # prototypes= beside the scores: no features to multiply them with
                raise ValueError("prototypes= (and bias=) go with features=, which the scores replace: pass the scores "
                                 "alone, or features= with prototypes= instead of the scores.")  # fmt: skip
            raise ValueError("give either scores, or features= with prototypes= — not both.")
        from .features import assign_features

        solve = dict(cluster_weights=cluster_weights, sample_weights=sample_weights, max_iter=max_iter, tol=tol,
                     init=init, acceleration=acceleration, over_relaxation=over_relaxation, callback=callback,
                     warn=warn)  # fmt: skip
        return assign_features(features, prototypes, bias, epsilon, backend=backend, epsilon_scaling=epsilon_scaling,
                               allow_tf32=allow_tf32, **solve)  # fmt: skip
    if scores is None:
        raise TypeError("sinkhorn_assign needs scores (N, K), or features= with prototypes=.")
    acceleration = check_solver_options(max_iter, tol, acceleration, over_relaxation, callback)  # before reading S
    if epsilon_scaling is not None and not (is_number(epsilon_scaling) and 0 < epsilon_scaling < 1):
        raise ValueError(
            f"epsilon_scaling must be None or a float in (0, 1), e.g. 0.5; got {described(epsilon_scaling)}."
        )
    # Not for a capture, which refuses the reference by name (converted first, float32 scores were refused as "got
    # float64: convert them")
    arithmetic = None if cuda_graph else reference_arithmetic(backend)
    problem = validate(scores, epsilon, cluster_weights, sample_weights, check_values=not cuda_graph,
                       arithmetic=arithmetic)  # fmt: skip
    if cuda_graph:
        return assign_from_graph(problem, backend, max_iter, tol, init, callback, epsilon_scaling, acceleration)
    given_weights = None if cluster_weights is None else problem.cluster_weights  # (read only for a collapse)
    warn_about_scores(problem.summary, problem.epsilon, problem.shape[2], given_weights)
    init = check_init(init, problem.shape[0], problem.cluster_weights, torch.float64, compute_dtype_of(problem.scores),
                      epsilon=problem.epsilon)  # fmt: skip
    if epsilon_scaling is None:
        operator = make_operator(problem, backend)
        out = run_sinkhorn(operator, problem.cluster_weights, init, max_iter, tol, acceleration, callback=callback,
                           has_zero_weights=problem.has_zero_weights)  # fmt: skip
    else:  # each stage builds its own operator (the CPU kernel depends on epsilon)
        operator, out = run_with_epsilon_scaling(problem, backend, init, max_iter, tol, acceleration, epsilon_scaling,
                                                 callback)  # fmt: skip
    if warn:
        warn_if_not_converged("sinkhorn_assign", out, tol, problem.epsilon, operator.dtype)
    return package_result(operator, out, epsilon=problem.epsilon, batched=problem.batched,
                          sample_weights=problem.sample_weights)  # fmt: skip


def assign_from_graph(problem, backend, max_iter, tol, init, callback, epsilon_scaling, acceleration):
    """``sinkhorn_assign(..., cuda_graph=True)`` after the input checks: the solve replayed from its capture."""
    from . import graphs

    graphs.check_capturable(problem, backend, tol, init, callback, epsilon_scaling, acceleration)
    extremes = None
    if problem.has_zero_weights:  # the capture checks the score values itself only when no weight is 0
        _, extremes = judge_score_values(problem.scores, problem.cluster_weights, has_zero_weights=True,
                                         epsilon=problem.epsilon, batched=problem.batched,
                                         sample_weights=problem.sample_weights,
                                         mass_rounding=problem.mass_rounding)  # fmt: skip
    out, labels, codes, judged = graphs.solve_captured(problem, max_iter, acceleration)
    # from the extremes read with the history (outside the graph: a rare path's pass and read come after the replay)
    summary = dense_summary(problem.scores, extremes or judged, problem.has_zero_weights)
    warn_about_scores(summary, problem.epsilon, problem.shape[2], problem.cluster_weights)
    # The lazy read-outs (objective, plan) need an operator over the caller's scores: built only if one is read.
    operator = DeferredOperator(lambda: make_operator(problem, backend))
    return package_result(operator, out, epsilon=problem.epsilon, batched=problem.batched,
                          sample_weights=problem.sample_weights, labels=labels, codes=codes)  # fmt: skip


class DeferredOperator:
    """An operator built on first use: a captured solve's result needs one only for ``objective`` and ``plan``."""

    def __init__(self, build):
        self._build, self._operator = build, None

    def release(self) -> None:  # nothing built yet, and building one here would defeat the deferral
        if self._operator is not None:
            self._operator.release()

    def __getattr__(self, name):
        if name.startswith("_"):  # never for its own state (copy and pickle look these up before __init__ ran)
            raise AttributeError(name)
        if self._operator is None:
            self._operator = self._build()
        return getattr(self._operator, name)


def describe_error(error: float, tol: float) -> str:
    """``marginal error 0.0123 > tol 0.001``, or what an error of inf means: none measured yet."""
    if math.isinf(error):
        return "no marginal error measured yet (a cold start's first iteration has none; 2 or more measure one)"
    return f"marginal error {error:.3g} > tol {tol:g}"


def warn_if_not_converged(caller: str, out: LoopOutput, tol, epsilon: float, dtype: torch.dtype | None = None) -> None:
    """The one :class:`ConvergenceWarning` every entry point gives when ``tol`` was not reached, at the user's line.
    ``dtype``: the passes' arithmetic (the operator's ``dtype``); below ``FLOAT32_FLOOR`` a float32 one is named as
    the likely cause, since more iterations do not take its measured error lower, once the error has come down to
    it (a solve cut short far above it needs more iterations, not float64)."""
    if tol is None or out.converged:
        return
    retry = "raise max_iter, raise epsilon, or warm-start with init=<previous result>."
    advice = retry.capitalize()
    near_floor = tol < FLOAT32_FLOOR and out.error <= FLOAT32_FLOOR  # NaN or inf: not near it
    if dtype is not None and dtype != torch.float64 and near_floor:
        advice = (
            f"A tol of {tol:g} meets the floor that float32 arithmetic leaves on the measured error (about "
            "1e-7 on the CPU, up to ~1e-6 on some problems; on a GPU, not yet measured, allow a few 1e-6: its sums "
            "over the samples round), which more iterations do not lower: pass float64 scores (or features) for it, "
            f"or a larger tol. Otherwise {retry}"
        )
    masks = ""
    if out.stalled:  # a mask with no balanced plan holds the error still
        masks = (
            " The error stopped falling: if the scores carry -inf masks that were not checked before solving (very "
            "many distinct masked rows, no SciPy), the masked problem may have no balanced plan at all: check that "
            "every group of clusters can reach enough samples. If they carry masks written as a large finite value "
            "(-1e9, torch.finfo(dtype).min), no iteration count or warm start helps where the balanced plan needs "
            "those pairs: write the masks as -inf, which otlabel checks before solving (naming the clusters that "
            "cannot be filled), or relax them."
        )
    warnings.warn(
        f"{caller} did not converge: {describe_error(out.error, tol)} after {out.n_iter} iterations "
        f"(epsilon={epsilon:g}). {advice}{masks}",
        ConvergenceWarning,
        stacklevel=user_stacklevel(),
    )


def stalled(errors: list[float]) -> bool:
    """Whether the marginal error stopped falling, as a mask with no balanced plan holds it (it levels off at the
    excess mass): measured at 8 iterations or more, the best of the second half of them below the best of the first by
    less than a factor 1.1, and either by less than 1.01 or at most half as fast (in log terms) as over the first
    half. Where it was still falling (a solve cut short: 5 iterations at a small epsilon), the warning's notes on masks
    were noise on every such call; so they were on plain steps at a small epsilon, whose error falls steadily but slowly
    (1.3x over 10 iterations, or 1.5x faster in the second half than the first, was judged stalled: 97 of 282 such
    warnings on random and cosine scores carried the notes, 4 do now, each levelling off at a plateau). The best, not
    the error at two points: Anderson's errors rise and fall (0.098 at the midpoint, then 0.068 0.075 0.14 0.067
    looked stalled). One stage's errors: epsilon_scaling's start afresh at each stage (:func:`run_with_epsilon_scaling`
    judges each)."""
    finite = [e for e in errors if math.isfinite(e)]
    if len(finite) < 8:
        return False
    half = len(finite) // 2
    first, middle, last = finite[0], min(finite[:half]), min(finite[half:])
    if middle == 0 or last == 0:  # it reached 0
        return False
    earlier, later = first / middle, middle / last  # how far the best error fell over each half
    return later < 1.1 and (later < 1.01 or later * later <= earlier)


def package_result(operator: ScoreOperator, out: LoopOutput, *, epsilon: float, batched: bool,
                   sample_weights: torch.Tensor, labels=None, codes=None) -> SinkhornResult:  # fmt: skip
    """The result of a solve; ``labels`` (H, N) and ``codes`` (H, N, K) when already computed (a captured solve writes
    both). ``batched``: whether the caller passed a head dimension, which the result's shapes follow."""
    if labels is None:
        labels, _ = operator.assign(out.potentials, want_codes=False)
    operator.release()  # the result keeps the operator for its read-outs only
    shape = (lambda x: x) if batched else (lambda x: x[0])
    return SinkhornResult(
        labels=shape(labels),
        cluster_potentials=shape(out.potentials),
        n_iter=out.n_iter,
        converged=out.converged,
        marginal_error=out.error,
        errors=out.errors,
        epsilon=epsilon,
        _operator=operator,
        _sample_weights=sample_weights,
        _batched=batched,
        _codes=None if codes is None else shape(codes),
    )
