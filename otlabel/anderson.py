"""Anderson mixing of the cluster step: the default acceleration when solving to a tolerance.

:class:`AndersonMixer` turns the plain Sinkhorn step ``b -> F(b)`` that :func:`otlabel.solver.run_sinkhorn`
computes into a safeguarded Anderson step: it works on the (H, K) cluster potentials only, never on the scores, so
it costs no pass of its own. The solver loop calls :meth:`AndersonMixer.step` once per iteration with the error it
has read, and :meth:`AndersonMixer.last_step_sound` / :meth:`AndersonMixer.review_last_step` to learn, with the
next error, whether the last proposal was usable.
"""

from __future__ import annotations

import math

import torch

ANDERSON_MEMORY = 5  # iterate differences kept: 3-10 measured alike at 100k x 1000; 5 was best at 1e-6
ANDERSON_RESTART = 1.5  # restart the mixing when the error exceeds this multiple of the best error so far
ANDERSON_MAX_EXTRAPOLATION = 10.0  # nats: the most a mixed step may move any b_k beyond the plain step
ANDERSON_PATIENCE = 200  # iterations without a 1% fall of the error, after which plain steps and mixing take turns
ANDERSON_MIN_REACH = 1e-3  # nats: restarts shrink the trust region no further
ANDERSON_FLAT = 1e-3  # residual differences below this fraction of the residual: a plateau (see across_plateaus)


def masked(x: torch.Tensor, empty: torch.Tensor | None, fill: float) -> torch.Tensor:
    """``x`` (..., K) with the zero-weight clusters' entries set to ``fill``; ``x`` itself when there are none
    (``empty`` is ``None``)."""
    return x if empty is None else torch.where(empty, fill, x)


class AndersonMixer:
    """Anderson acceleration (type II) of the cluster step, safeguarded.

    Sinkhorn is a fixed-point iteration ``b -> F(b)``; Anderson mixing proposes, instead of ``F(b)``, the
    combination of the last ``memory + 1`` iterates whose residuals ``F(b) - b`` cancel best in the least-squares
    sense. It costs O(H·K·memory²) per iteration, no extra pass over the scores. At small eps, where plain
    Sinkhorn crawls through a long sublinear phase, it cut the iterations to 1e-3 by 14x at N = 100,000,
    K = 1,000, eps = 0.01 (838 -> 60; adaptive over-relaxation managed 443). It is not globally convergent on
    its own, so whenever the measured error rises above ``ANDERSON_RESTART`` times the best so far the history
    is dropped and the next step is a plain Sinkhorn step (which always makes progress from any point), and a
    proposal that would move ``b`` back against the plain step is not taken (see :meth:`points_forward`). Where
    the residual does not change at all (a plateau), the least squares see nothing, and the mixer moves along
    the plain step in doubling strides instead (see :meth:`across_plateaus`).
    """

    def __init__(self, memory: int, cluster_weights: torch.Tensor):
        self.memory = memory
        # (K,) log r, -inf where a weight is 0: r weighs the inner product in which proposals are judged
        self.log_weights = cluster_weights.log()
        # The last b (-inf of empty clusters replaced by 0) and its residual F(b) - b, as (H, K, 1) columns
        self.last: tuple[torch.Tensor, torch.Tensor] | None = None
        # Successive falls of the residual (the old residual less the new: the negated differences, which spare the
        # mixing a negation) and differences of the plain steps F(b) = b + residual, (H, K, m) oldest first, kept up
        # to date one column per step (re-stacking lists of iterates cost ~2 (memory + 1) operations per step)
        self.falls: torch.Tensor | None = None
        self.d_f: torch.Tensor | None = None
        self.stride = None  # (H, 1): plain steps beyond the plain step, 2^n - 1 after n strides in a row (up to 2^60)
        self.best = math.inf
        self.step_from_best = None  # F(b) for the b with the best error: where a restart resumes
        self.reach = ANDERSON_MAX_EXTRAPOLATION  # trust region: the most a step may move b beyond F(b), nats
        self.progress_mark, self.stalled = math.inf, 0  # iterations since the error last fell by 1%
        self.active, self.restarted = True, False
        self.sound = None  # (1,) bool tensor: whether the last proposal was finite and its solve succeeded

    def last_step_sound(self) -> torch.Tensor | None:
        """(1,) bool on the device: whether the last mixed step was sound; ``None`` when there was none to judge. The
        loop reads it together with the error, so the safeguard costs no device synchronisation of its own."""
        return self.sound

    def forget(self) -> None:
        """Start the history again (after a restart, a degenerate solve, or between spells)."""
        self.last = self.stride = self.falls = self.d_f = None

    def review_last_step(self, sound: bool) -> None:
        """A degenerate solve (its plain step was taken instead): start the history again."""
        if not sound:
            self.forget()
        self.sound = None

    def step(self, b, b_new, error: float, empty) -> torch.Tensor:
        """The next iterate, given the current ``b``, the plain step ``b_new = F(b)`` and ``b``'s error."""
        self.stalled = 0 if error < 0.99 * self.progress_mark else self.stalled + 1
        self.progress_mark = min(self.progress_mark, error) if self.stalled else error
        if self.stalled and self.stalled % ANDERSON_PATIENCE == 0:
            # A plateau where plain steps drift steadily along a direction the error hardly sees: the mixing may
            # wander back and forth along it instead (seen at eps = 0.005 on tightly clustered cosines), or may
            # be what gets through it (seen on other problems). So take turns: plain steps for a spell, then
            # mixing afresh, until the error falls by 1% again.
            self.active = not self.active
            self.forget()
            self.best = error
            self.reach = ANDERSON_MAX_EXTRAPOLATION
        if self.stalled == 0:
            self.active = True
        if not self.active:
            return b_new
        restarted, self.restarted = self.restarted, False
        if error > ANDERSON_RESTART * self.best and not restarted:  # astray: resume plain steps from the best point
            self.forget()
            self.restarted = True  # (once: then from wherever that led)
            self.reach = max(self.reach / 4, ANDERSON_MIN_REACH)  # trust it less (a fixed region can cycle)
            return self.step_from_best
        if error <= self.best:
            self.best, self.step_from_best = error, b_new
            self.reach = min(ANDERSON_MAX_EXTRAPOLATION, 1.5 * self.reach)
        x = masked(b, empty, 0.0)
        residual = masked(b_new, empty, 0.0) - x
        last, self.last = self.last, (x[..., None], residual[..., None])  # (H, K, 1) columns
        if last is None:
            return b_new
        self.remember(self.last[0] - last[0], last[1] - self.last[1])
        falls = self.falls  # (H, K, m)
        falls_t = falls.mT  # (a view, but one operation: taken once)
        gram = torch.bmm(falls_t, falls)  # (H, m, m); bmm: matmul's reshaping around it costs ~5 operations more
        diagonal = gram.diagonal(dim1=1, dim2=2)  # (H, m), a view: the ridge below keeps gram invertible
        diagonal += 1e-10 * diagonal.sum(-1, keepdim=True) + 1e-300
        # solve_ex: linalg.solve would read its error flag back from the device (a sync). A degenerate solve is
        # answered on the device (the plain step instead), and the loop reads the verdict with the next error.
        # The weights fit the residual with the differences d_g = -falls: gamma here is their negation, exactly.
        gamma, info = torch.linalg.solve_ex(gram, torch.bmm(falls_t, self.last[1]))
        plain = x + residual
        extrapolation = torch.bmm(self.d_f, gamma)[..., 0]  # how far the mixing moves beyond the plain step
        # (1,): finite (NaN and inf fail the comparison) and the solve succeeded, for every head
        self.sound = (extrapolation.abs().amax() < math.inf) & (info == 0).all(dim=0, keepdim=True)
        extrapolation = self.across_plateaus(extrapolation, residual)
        # Early on the residual barely changes from one step to the next, the least-squares weights blow up and
        # the proposal lands 1e5 nats away. Capping the move beyond the plain step (direction kept) removed those
        # excursions; useful moves seen at 100k x 1000 were under ~7 nats. The cap shrinks 4x at every restart
        # and grows back 1.5x with every new best error.
        reach = extrapolation.abs().amax(dim=-1, keepdim=True)  # (H, 1)
        extrapolation = extrapolation * (self.reach / reach).clamp(max=1.0)
        # A product with the bool (one operation; a where with 0 is two): 0 where the move points back (-0 for
        # negative entries)
        extrapolation = extrapolation * self.points_forward(extrapolation, residual)
        return torch.where(self.sound, masked(plain + extrapolation, empty, float("-inf")), b_new)

    def remember(self, d_x: torch.Tensor, fall: torch.Tensor) -> None:
        """Append the newest difference of the iterates and fall of the residual, (H, K, 1) columns, to the (H, K, m)
        histories, dropping the oldest column beyond ``memory``. ``d_f = d_x - fall`` (= d_x + d_g), column by
        column as the mixing uses it."""
        d_f = d_x - fall
        if self.falls is None:
            self.falls, self.d_f = fall, d_f
            return
        full = self.falls.shape[-1] == self.memory  # then the oldest column goes (sliced only then: 2 operations)
        self.falls = torch.cat([self.falls[..., 1:] if full else self.falls, fall], dim=-1)
        self.d_f = torch.cat([self.d_f[..., 1:] if full else self.d_f, d_f], dim=-1)

    def across_plateaus(self, extrapolation: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """``extrapolation`` (H, K), or where the residual has not changed over the whole history (its falls, (H, K, m),
        below ``ANDERSON_FLAT`` of it), a move along the plain step ``residual`` that doubles with every such step.

        On a plateau the plan is hard: every sample keeps its cluster whatever ``b`` does there, so the cluster
        step is a translation (the residual stays put, and so does the error) and plain steps cross it at
        |residual| per iteration (0.06 nats on the 17 x 2 plateau of the tests, which is 200 nats wide). The
        residual differences are zero or rounding noise, so the least squares see no fixed point to aim at.
        Moving 2, 4, 8, ... plain steps at a time crosses the plateau in a few dozen iterations; the trust region
        caps the stride, and leaving the plateau changes the residual, which ends the doubling: the mixing then
        sees the change and aims back (an error that rises restarts from the best point, as everywhere).
        """
        scale = residual.abs().amax(dim=-1, keepdim=True)  # (H, 1)
        flat = self.falls.abs().amax(dim=(1, 2)).unsqueeze(1) <= ANDERSON_FLAT * scale  # (H, 1)
        on = flat.to(residual.dtype)  # (H, 1): 1 or 0
        # 1, 3, 7, ... plain steps beyond the plain step, 0 where none: (2 stride + 1) on, in one operation
        stride = on if self.stride is None else torch.addcmul(on, self.stride, on, value=2).clamp_(max=2.0**60)
        self.stride = stride
        return torch.where(flat, residual * stride, extrapolation)

    def points_forward(self, extrapolation: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        """(H, 1) bool: whether the move ``extrapolation`` (H, K) beyond the plain step does not point against the
        plain step ``residual`` = F(b) - b; one that does is not taken.

        Linearised at ``b``, the cluster step has the Jacobian ``J = diag(m)^-1 P^T diag(c)^-1 P`` (``P`` the plan,
        ``m = r exp(-residual)`` its column sums): self-adjoint in the inner product weighted by ``m``, with
        eigenvalues in [0, 1]. So the exact (Newton) move beyond the plain step, ``J (I - J)^-1 residual``, never
        has a negative inner product with the plain step (constants aside, which change nothing). A mixed proposal
        that has one was fitted to rounding noise or to a nonlinearity the history cannot see, and the plain step
        is taken instead. On a plateau where the plan is hard, the residual stays put and the least-squares weights
        are rounding noise: such proposals sent ``b`` back and forth by the whole trust region, undoing what the
        plain steps had gained (a 17 x 2 problem at eps = 1e-3 then needed more iterations than plain steps on one
        path and never converged on another).
        """
        m = torch.softmax(self.log_weights - residual, dim=-1)  # (H, K): the column sums, normalised (0 for r = 0)
        deviation = residual - (m * residual).sum(dim=-1, keepdim=True)  # constants add nothing to the product
        return (m * extrapolation * deviation).sum(dim=-1, keepdim=True) >= 0  # (H, 1)
