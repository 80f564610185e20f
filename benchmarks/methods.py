"""Every method the benchmarks compare, set up in this one place, each with the same signature:

    method(problem: Problem, n_iter: int, tol: float | None) -> Outcome

``tol=None`` runs exactly ``n_iter`` iterations (per-iteration timing, SwAV's fixed 3); a number runs until
the method's own stopping rule says the marginal error is below ``tol``, at most ``n_iter`` iterations.
The call is what gets timed: inputs are converted to each method's native format beforehand
(:class:`~benchmarks.problems.Problem` caches them), and everything measured afterwards (marginal errors,
objective, labels) is computed from the returned plan by :func:`benchmarks.harness.evaluate`, uniformly.

Stopping rules differ, and the benchmarks keep each method's own, set to the same number:
* otlabel and the SwAV-style loop: L1 error of the cluster marginal, checked every iteration.
* SeLa: its published rule, the L1 change of the sample scaling vector; ``tol * N`` is the same L1
  marginal error (rows carry mass 1/N).
* POT: the L2 norm of the cluster-marginal error, checked every 10th iteration. ``L1 <= sqrt(K) L2``, so
  ``stopThr = tol / sqrt(K)`` is what guarantees an L1 error below ``tol`` (``stopThr = tol`` stopped POT at
  an L1 error of 0.027 for ``tol = 1e-3`` at K = 1,000: no comparison at all).
The uniform L1 error of every returned plan is reported next to the time.
"""

from __future__ import annotations

import importlib.util
import inspect
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

import otlabel
from otlabel.baselines import swav_loop

from .problems import Problem


class Unavailable(Exception):
    """The method cannot run here (missing package, wrong device, feature not in this otlabel)."""


@dataclass
class Outcome:
    """What a method returned: its plan as ``values * scale`` (N, K), rows summing to ``1/N``."""

    values: object  # (N, K) torch tensor or NumPy array (plan, or codes with scale 1/N), or a callable giving it
    scale: float
    n_iter: int
    converged: bool | None  # by the method's own rule; None when it has none (fixed iterations)
    warnings: list[str] = field(default_factory=list)
    result: object = None  # the method's native result, for callers that want more


@dataclass(frozen=True)
class Method:
    name: str
    run: Callable[[Problem, int, float | None], Outcome]
    family: str  # "otlabel", "baseline", "pot", "optional"
    linear_domain: bool = False  # exponentiates the scores once and scales: overflows at small eps
    devices: tuple[str, ...] = ("cpu", "cuda")
    needs: str | None = None  # importable module it needs
    prepare: Callable[[Problem, float | None], None] | None = None  # untimed set-up before a timed call
    input: str = "scores"  # its native input, a Problem method: "scores64", "cost64", "cost_torch"

    def prepare_inputs(self, problem: Problem) -> None:
        """Convert the scores to this method's native input now, so no timing or memory peak includes it."""
        if self.input != "scores":
            getattr(problem, self.input)()

    def available(self, device: torch.device) -> str | None:
        """``None`` if it can run on ``device``, else the reason it cannot."""
        if device.type not in self.devices:
            return f"{self.name} does not run on {device.type}"
        if self.needs and importlib.util.find_spec(self.needs) is None:
            return f"{self.needs} is not installed"
        return None


# ---------------------------------------------------------------------------------------------------------------
# otlabel


def has_epsilon_scaling() -> bool:
    """Whether this otlabel's ``sinkhorn_assign`` has the ``epsilon_scaling`` option."""
    return "epsilon_scaling" in inspect.signature(otlabel.sinkhorn_assign).parameters


def otlabel_method(
    backend: str = "torch",
    *,
    acceleration: str = "none",
    omega: float | None = None,
    warm: bool = False,
    eps_scaling: float | None = None,
):
    """``sinkhorn_assign`` with one set of accelerations (``acceleration="none"``: plain Sinkhorn steps;
    ``"auto"``: the library default; ``omega``: a fixed over-relaxation).

    ``warm``: the timed call starts from the potentials of the previous problem (prototypes drifted), solved
    beforehand, untimed. ``eps_scaling``: the library's ``epsilon_scaling`` factor (stages from the scores'
    spread down to ``eps``, each warm-starting the next); unavailable in an otlabel without that option.
    """

    def run(problem: Problem, n_iter: int, tol: float | None) -> Outcome:
        # Adaptive over-relaxation tunes omega from the errors read at convergence checks; a fixed-iteration call
        # (tol=None: the harness's probe of the time per iteration) reads none, and the library refuses it. Plain
        # steps do the same work per iteration, which is all the probe measures.
        steps = "none" if acceleration == "over-relaxation" and tol is None else acceleration
        kwargs = dict(backend=backend, acceleration=steps, over_relaxation=omega, warn=False)
        init = None
        if warm:
            if problem.previous is None:
                raise Unavailable("warm start needs problem.previous")
            init = problem._cache.get(("warm", problem.epsilon, acceleration))
            if init is None:
                raise Unavailable("the warm start's prepare(problem, tol) was not called before timing")
        if eps_scaling is not None:
            if not has_epsilon_scaling():
                raise Unavailable("sinkhorn_assign has no epsilon_scaling option in this otlabel version")
            kwargs["epsilon_scaling"] = eps_scaling
        res = otlabel.sinkhorn_assign(problem.scores, problem.epsilon, max_iter=n_iter, tol=tol, init=init, **kwargs)
        return otlabel_outcome(res, problem, tol)

    return run


def warm_preparation(acceleration: str = "none"):
    """Solve the previous (drifted) problem to 1e-4, untimed, and keep its potentials for the warm start (the
    drift, not that tolerance, is what separates them from the new problem's)."""

    def prepare(problem: Problem, tol: float | None) -> None:
        key = ("warm", problem.epsilon, acceleration)
        if key not in problem._cache:
            prev = otlabel.sinkhorn_assign(
                problem.previous, problem.epsilon, tol=1e-4, max_iter=5_000, acceleration=acceleration, warn=False
            )
            problem._cache[key] = prev.cluster_potentials

    return prepare


def otlabel_outcome(res, problem: Problem, tol: float | None = None) -> Outcome:
    # codes are computed lazily, after the timed call (one more pass, as for a user who reads them)
    out = Outcome(
        lambda: res.codes, 1.0 / problem.n, res.n_iter, res.converged if tol is not None else None, result=res
    )
    floor = stall_level(res.errors) if tol is not None else None
    if not res.converged and floor is not None:
        out.warnings.append(f"error stalls at {floor:.2g} (no progress over the last half of the iterations)")
    return out


def stall_level(errors: list[float], min_iters: int = 200) -> float | None:
    """The error level a run got stuck at, or None: the second half of the history did not halve the best
    error of the first half (a precision floor, not slow convergence)."""
    if len(errors) < min_iters:
        return None
    half = len(errors) // 2
    first, second = min(errors[1:half]), min(errors[half:])
    return second if second > 0.5 * first else None


# ---------------------------------------------------------------------------------------------------------------
# the baselines every self-supervised repository carries


def swav(problem: Problem, n_iter: int, tol: float | None) -> Outcome:
    """SwAV-style linear-domain Sinkhorn: ``swav_loop`` (``otlabel.swav_sinkhorn`` without its input checks) for fixed
    iterations.

    To a tolerance, the same loop (exp once, normalise cluster rows, then sample columns of the K×N matrix)
    with a stopping check that costs nothing: the cluster sums computed at the start of an iteration are the
    cluster marginal of the current plan (whose sample marginal is exact).
    """
    if tol is None:
        return Outcome(swav_loop(problem.scores, problem.epsilon, n_iter), 1.0 / problem.n, n_iter, None)
    with torch.no_grad():
        q = torch.exp(problem.scores.float() / problem.epsilon).t()  # (K, N)
        k, n = q.shape
        q /= torch.sum(q)
        converged, done = False, 0
        for done in range(1, n_iter + 1):
            sums = torch.sum(q, dim=1, keepdim=True)  # (K, 1): cluster marginal of the current plan
            if done > 1 and float((sums - 1.0 / k).abs().sum()) < tol:
                converged, done = True, done - 1
                break
            q /= sums
            q /= k
            q /= torch.sum(q, dim=0, keepdim=True)
            q /= n
        q *= n
    return Outcome(q.t(), 1.0 / n, done, converged)


def sela(problem: Problem, n_iter: int, tol: float | None) -> Outcome:
    """SeLa's float64 scaling-vector Sinkhorn (``otlabel.sela_sinkhorn``) with ``lambda = 1 / eps``."""
    sela_tol = None if tol is None else tol * problem.n  # its rule in units of the L1 marginal error
    plan = otlabel.sela_sinkhorn(problem.scores64(), lam=1.0 / problem.epsilon, max_iter=n_iter, tol=sela_tol)
    return Outcome(plan, 1.0 / problem.n, n_iter if tol is None else -1, None)  # -1: it does not say


def sela_default(problem: Problem, n_iter: int, tol: float | None) -> Outcome:
    """SeLa as published: its own stopping rule (change of the scaling vector < 0.1, read every 10th iteration).
    Its code has no iteration cap; ``n_iter`` is only a guard against an endless loop."""
    plan = otlabel.sela_sinkhorn(problem.scores64(), lam=1.0 / problem.epsilon, max_iter=n_iter)
    return Outcome(plan, 1.0 / problem.n, -1, None)


# ---------------------------------------------------------------------------------------------------------------
# POT


def pot_method(solver: str, backend: str):
    """POT's ``sinkhorn`` (``solver="knopp"``) or ``sinkhorn_log`` on NumPy float64 or torch float32 input."""

    def run(problem: Problem, n_iter: int, tol: float | None) -> Outcome:
        from otlabel.exact import import_pot

        ot = import_pot()

        if backend == "numpy":
            cost = problem.cost64()
            a, b = np.full(problem.n, 1.0 / problem.n), np.full(problem.k, 1.0 / problem.k)
        else:
            cost = problem.cost_torch()
            a = torch.full((problem.n,), 1.0 / problem.n, device=cost.device, dtype=cost.dtype)
            b = torch.full((problem.k,), 1.0 / problem.k, device=cost.device, dtype=cost.dtype)
        fn = ot.bregman.sinkhorn_knopp if solver == "knopp" else ot.bregman.sinkhorn_log
        stop = 0.0 if tol is None else tol / math.sqrt(problem.k)  # its L2 rule, made to guarantee L1 < tol
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            plan, log = fn(
                a,
                b,
                cost,
                problem.epsilon,
                numItermax=n_iter,
                stopThr=stop,
                log=True,
                warn=tol is not None,
            )
        messages = sorted({str(w.message).strip() for w in caught})
        iters = int(log["niter"]) + 1
        converged = None if tol is None else (iters < n_iter or bool(log["err"] and log["err"][-1] < stop))
        if any("numerical errors" in m for m in messages):
            converged = False
        return Outcome(plan, 1.0, iters, converged, warnings=messages)

    return run


# ---------------------------------------------------------------------------------------------------------------
# optional, only where installed (not installed on the machine these were written on: untested there)


def geomloss_tensorized(problem: Problem, n_iter: int, tol: float | None) -> Outcome:
    """GeomLoss ``SamplesLoss("sinkhorn")`` on the features and prototypes behind the scores.

    For unit vectors ``|z - c|^2 / 2 = 1 - S``: GeomLoss's p=2 cost is our problem with ``blur = sqrt(eps)``.
    GeomLoss has no iteration count or tolerance: it anneals the temperature down to ``eps`` in steps of
    ``scaling`` (0.5 here); both arguments are ignored. The plan is rebuilt from its dual potentials.
    """
    from geomloss import SamplesLoss

    if problem.features is None:
        raise Unavailable("GeomLoss needs the features and prototypes, not only the scores")
    z, c = problem.features
    a = torch.full((problem.n,), 1.0 / problem.n, device=z.device)
    b = torch.full((problem.k,), 1.0 / problem.k, device=z.device)
    loss = SamplesLoss(
        "sinkhorn", p=2, blur=problem.epsilon**0.5, scaling=0.5, debias=False, potentials=True, backend="tensorized"
    )
    f, g = loss(a, z, b, c)  # (N,), (K,)
    log_plan = (f[:, None] + g[None, :] - (1 - problem.scores)) / problem.epsilon  # (N, K)
    plan = torch.exp(log_plan) * a[:, None] * b[None, :]
    return Outcome(plan, 1.0, -1, None)


def ott_jax(problem: Problem, n_iter: int, tol: float | None) -> Outcome:
    """OTT-JAX ``Sinkhorn`` on ``Geometry(cost_matrix=-S, epsilon=eps)`` (its error is the L1 marginal error)."""
    import jax.numpy as jnp
    from ott.geometry import geometry
    from ott.problems.linear import linear_problem
    from ott.solvers.linear import sinkhorn

    geom = geometry.Geometry(cost_matrix=jnp.asarray(problem.cost64(), dtype=jnp.float32), epsilon=problem.epsilon)
    solver = sinkhorn.Sinkhorn(
        threshold=tol if tol is not None else 0.0, max_iterations=n_iter, min_iterations=0, inner_iterations=1
    )
    out = solver(linear_problem.LinearProblem(geom))
    plan = np.asarray(out.matrix)
    return Outcome(plan, 1.0, int(out.n_iters), bool(out.converged) if tol is not None else None)


# ---------------------------------------------------------------------------------------------------------------
# the registry


def _otlabel_backends() -> list[Method]:
    methods = [
        Method("otlabel-torch", otlabel_method("torch"), "otlabel"),
        Method("otlabel-reference", otlabel_method("reference"), "otlabel"),
    ]
    if torch.cuda.is_available() and importlib.util.find_spec("triton") is not None:
        methods.append(Method("otlabel-triton", otlabel_method("triton"), "otlabel", devices=("cuda",)))
    return methods


def all_methods() -> dict[str, Method]:
    """Every method, by name (insertion order is the order of tables and plots)."""
    methods = _otlabel_backends() + [
        Method("swav", swav, "baseline", linear_domain=True),
        Method("sela", sela, "baseline", linear_domain=True, devices=("cpu",), input="scores64"),
        Method("pot-sinkhorn-numpy", pot_method("knopp", "numpy"), "pot", True, needs="ot", input="cost64"),
        Method("pot-sinkhorn_log-numpy", pot_method("log", "numpy"), "pot", needs="ot", input="cost64"),
        Method("pot-sinkhorn-torch", pot_method("knopp", "torch"), "pot", True, needs="ot", input="cost_torch"),
        Method("pot-sinkhorn_log-torch", pot_method("log", "torch"), "pot", needs="ot", input="cost_torch"),
        Method("geomloss-tensorized", geomloss_tensorized, "optional", needs="geomloss"),
        Method("ott-jax", ott_jax, "optional", devices=("cpu",), needs="ott", input="cost64"),
    ]
    return {m.name: m for m in methods}


def published_rule_methods() -> dict[str, Method]:
    """Methods that only run their own published schedule (no iteration count or tolerance to set)."""
    sela_rule = Method("sela-default", sela_default, "baseline", linear_domain=True, devices=("cpu",), input="scores64")
    return {sela_rule.name: sela_rule}


OMEGAS = (1.6,)


def acceleration_variants() -> dict[str, Method]:
    """otlabel (torch backend) with each acceleration on its own, and the promising combinations."""
    variants = [
        Method("otlabel", otlabel_method(), "otlabel"),  # plain steps (omega = 1): the reference for speed-ups
        Method("otlabel default", otlabel_method(acceleration="auto"), "otlabel"),  # the default: Anderson mixing
        Method("otlabel adaptive omega", otlabel_method(acceleration="over-relaxation"), "otlabel"),
    ]
    variants += [Method(f"otlabel omega={w}", otlabel_method(omega=w, acceleration="auto"), "otlabel") for w in OMEGAS]
    variants += [
        Method("otlabel warm", otlabel_method(warm=True), "otlabel", prepare=warm_preparation()),
        Method(
            "otlabel warm default",
            otlabel_method(warm=True, acceleration="auto"),
            "otlabel",
            prepare=warm_preparation("auto"),
        ),
        Method("otlabel eps-scaling 0.5", otlabel_method(eps_scaling=0.5), "otlabel"),
        Method("otlabel eps-scaling 0.5 default", otlabel_method(eps_scaling=0.5, acceleration="auto"), "otlabel"),
    ]
    return {m.name: m for m in variants}


def nan_safe(x: float) -> float:
    return x if math.isfinite(x) else float("nan")
