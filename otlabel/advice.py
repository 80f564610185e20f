"""Warnings for valid input that gives a meaningless answer: :class:`InputWarning`.

Three misuses of self-labelling solve without error and say nothing: probabilities passed as scores (SeLa's
``P = softmax(logits)``, whose ``P ** lambda`` is ``exp(log(P) / eps)``, not ``exp(P / eps)``), SeLa's ``lambda``
passed as ``epsilon`` (a temperature far above the scores' spread: the plan is near the one that ignores them), and
a collapsed network (every sample scored alike: one label for all). Each is judged from what the input checks
already read back, the smallest and largest score (:class:`ScoreSummary`); only where those make a misuse possible
(every score in [0, 1] and the first row summing to 1, every row maximum alike; in features mode every feature norm
alike) is one more pass made to decide it. So typical input costs no pass and no device synchronisation more (scores
in [0, 1]: a read of the first row's sum). Each kind is shown once per calling
line under Python's default filter (:func:`show_input_warning`).
"""

from __future__ import annotations

import dataclasses
import math
import sys
import warnings
from dataclasses import dataclass
from functools import reduce

import torch

from .entry import user_stacklevel

# epsilon above the whole range of the scores (largest - smallest, over every sample and cluster): S / eps then
# differs by less than 1 nat anywhere, and each code lies within a factor e^(2 range / eps) of its cluster's weight
# (b - log r lies within range / eps of one value). In a sweep of random-normal scores (N x K from 64 x 2 to
# 4,096 x 100, 5 draws each, epsilon at their range) the codes then kept 0.1-1.5% of the information of a hard
# assignment (their KL divergence from the weights, in units of log K), and the labels were as unbalanced as an
# argmax of the column-centred scores (largest cluster 1.03-2.5x its share; 1.0-1.5x at epsilon 0.05, 16 x 8 the
# least even, where a share is 2 samples). The range is the extremes': ~10 standard deviations of the scores for a
# large problem, so typical scores differ by a tenth of epsilon there. SwAV's eps 0.05 on cosine similarities, or
# logits at 0.05-0.1, warn only where every score lies within 0.05-0.1 of every other.
NEAR_UNIFORM_RANGE = 1.0  # range / epsilon below this: the warning
# ... judged from this many scores (N x K, per head) on. Fewer span only a few standard deviations, and legitimate
# ones fall under epsilon by chance: 2 x 2 unit-normal logits at epsilon 1 one time in 9, 4 x 2 cosines of 2,048-d
# features at SwAV's 0.05 one time in 4, and there a plan within a factor e^2 of its weights can still label every
# sample right (2 x 2: up to 16% of a hard assignment's information). Of 128 normal scores with a standard deviation
# of 0.3 epsilon, 5 in 200,000 draws spanned less than epsilon (0.44 epsilon, SwAV's 2,048-d cosines: none).
RANGE_JUDGED_FROM = 128
ROW_SUM_RTOL = 1e-3  # rows within this (plus 4 units of rounding of the scores' dtype) of 1 sum to 1


class InputWarning(UserWarning):
    """Valid input whose answer is likely meaningless: probabilities passed as scores, an epsilon far above the
    scores' spread (SeLa's lambda for epsilon = 1 / lambda), or every sample scored alike (a collapsed network).

    Each kind is shown once per line of your code that calls otlabel (a training loop's every step: once), though
    its message carries that call's numbers; ``warnings.simplefilter("always", otlabel.InputWarning)`` shows every
    one, ``"once"`` each kind once per process, ``"error"`` raises every time. Silence it with
    ``warnings.filterwarnings("ignore", category=otlabel.InputWarning)``."""


@dataclass(frozen=True)
class ScoreSummary:
    """What the input checks learn of the scores' values, in the scores' units, over every head.

    ``lowest``, ``highest``: the smallest and largest score (``-inf`` with a mask), or ``-bound`` and ``bound`` where
    only a bound on ``|S|`` is known (features on the kernel: ``exact`` False). ``probabilities``: every score in
    [0, 1], every row summing to 1, and not all of them 0 or 1 (:func:`look_like_probabilities`). ``row``: (H, K), the
    one row every sample has, where they all have the same (None: they do not, or it was not decided), left where the
    scores are; in features mode (1, D), the one features row (:func:`features_summary`); ``alike``: that row's
    smallest and largest value, on the host (None for a features row). ``n_samples``: the samples summed up."""

    lowest: float
    highest: float
    n_samples: int
    probabilities: bool = False
    row: torch.Tensor | None = None
    alike: tuple[float, float] | None = None
    exact: bool = True

    def merged(self, other: ScoreSummary) -> ScoreSummary:
        """The summary of both blocks of samples (chunks of a stream, ranks' shards). Their rows are compared (a read
        from the device) only where their extremes, on the host, are the same."""
        same = self.row is not None and other.row is not None and self.alike == other.alike
        same = same and torch.equal(self.row, other.row.to(self.row.device))
        return ScoreSummary(min(self.lowest, other.lowest), max(self.highest, other.highest),
                            self.n_samples + other.n_samples, self.probabilities and other.probabilities,
                            self.row if same else None, self.alike if same else None,
                            self.exact and other.exact)  # fmt: skip


def merge_all(summaries) -> ScoreSummary | None:
    """One summary of blocks in order, None where there is none (or one of them is None: not judged)."""
    summaries = list(summaries)
    if not summaries or any(s is None for s in summaries):
        return None
    return reduce(ScoreSummary.merged, summaries)


def bound_summary(bound: float, n_samples: int) -> ScoreSummary:
    """A summary from a bound on ``|S|`` alone (features judged by ``|z| |c| + |bias|``): their range is at most
    twice it."""
    return ScoreSummary(-bound, bound, n_samples, exact=False)


def features_summary(features: torch.Tensor, bound: float, norms_alike: bool) -> ScoreSummary:
    """:func:`bound_summary` of features (N, D), with their one row where every sample has the same features (a
    collapsed encoder): decided (the rare path: a pass over the features and a read) only where the smallest and
    largest feature norm the input checks read are one value."""
    row = one_features_row(features) if norms_alike else None
    return dataclasses.replace(bound_summary(bound, features.shape[0]), row=row)


def one_features_row(features: torch.Tensor, rows_per_check: int = 1 << 16) -> torch.Tensor | None:
    """(1, D), a copy: the row every sample of ``features`` (T, D) has, or None where they differ. Compared a block of
    rows at a time (a memory-mapped file is read, not held); the first block that differs ends it. A block of one
    sample is its row: no pass, no read (a stream's last chunk may be one row).

    The features' rows, not the scores': products of identical rows, computed in blocks, can differ in their last bit
    (CPU matmuls of a collapsed encoder's 300 x 16 features at 10 prototypes gave rows that differ 3 seeds in 4), so
    identical scores are no test of a collapse in features mode."""
    first = features[:1]
    for lo in range(0, features.shape[0] if features.shape[0] > 1 else 0, rows_per_check):
        if not bool((features[lo : lo + rows_per_check] == first).all()):
            return None
    return first.detach().clone()


# Streamed features: a chunk's rows may all be one features row only where their score extremes (row minima, row
# maxima) each lie within this of one value, relative to the largest |score|: what the products of equal rows, in
# blocks, may differ by (a few units of rounding of a D-term dot product; fp32 and D = 4,096: ~2.4e-4 of |z| |c|).
# Typical features' row maxima spread over tens of percent of them: their rows are not compared.
FEATURES_ROWS_RTOL = 1e-3


def features_chunk_summary(scores: torch.Tensor, extremes, dtype: torch.dtype, scale: float,
                           chunk_features) -> ScoreSummary:  # fmt: skip
    """:func:`checked_rows_summary` of a chunk of streamed features' scores (H, T, K), whose one row (where every sample
    of the chunk has the same features) is the features row, read by ``chunk_features()`` (T, D) only where the
    extremes allow it (:data:`FEATURES_ROWS_RTOL`). The rows are merged with other chunks' features rows."""
    min_lo, min_hi, max_lo, max_hi = extremes
    summary = block_summary(scores, min_lo, max_hi, False, dtype, scale=scale)
    size = max(abs(min_lo), abs(max_hi))
    near = max_hi - max_lo <= FEATURES_ROWS_RTOL * size and min_hi - min_lo <= FEATURES_ROWS_RTOL * size
    if scores.shape[2] < 2 or not (near and math.isfinite(size)):
        return summary
    return dataclasses.replace(summary, row=one_features_row(chunk_features()))


def in_unit_interval(lowest: float, highest: float) -> bool:
    """Every score in [0, 1] (a largest score from ``S / eps`` times ``eps`` may round just above 1)."""
    return lowest >= 0.0 and highest <= 1.0 + 1e-6


def look_like_probabilities(scores: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> bool:
    """Whether every row of ``scores`` (H, T, K) times ``scale``, all in [0, 1], sums to 1 (within the rounding of
    probabilities held in ``dtype``) and some score lies strictly between 0 and 1: one-hot rows, preferences written
    as 1 and 0, are scores as they stand. The rare path: a device read of each head's first row sum, which settles
    most scores in [0, 1] that are not probabilities (cosines of non-negative features, sigmoids: their rows sum to
    far more or less than 1) without a pass; only where those sum to 1, a pass and a read more
    (:func:`every_row_sums_to_one`)."""
    return bool(rows_sum_to_one(scores[:, :1], dtype, scale)) and every_row_sums_to_one(scores, dtype, scale)


def rows_sum_to_one(scores: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """0-d bool, on the device: whether every row of ``scores`` (H, T, K) times ``scale`` sums to 1, within the
    rounding of probabilities held in ``dtype``."""
    total = scores.sum(dim=-1, dtype=torch.float64 if scores.dtype == torch.float64 else torch.float32)
    return ((total * scale - 1).abs() <= ROW_SUM_RTOL + 4 * torch.finfo(dtype).eps).all()


def every_row_sums_to_one(scores: torch.Tensor, dtype: torch.dtype, scale: float) -> bool:
    """:func:`look_like_probabilities` past its first rows: every row sums to 1 and some score lies strictly between 0
    and 1 (a pass over ``scores``, and a read)."""
    between = ((scores > 0) & (scores * scale < 1)).any()
    return bool(rows_sum_to_one(scores, dtype, scale) & between)


def the_one_row(scores: torch.Tensor) -> torch.Tensor | None:
    """(H, K), a copy: the row every sample of ``scores`` (H, T, K) has, or None where they differ (the rare path: a
    pass, and a device read; none for a block of one sample)."""
    first = scores[:, :1]
    same = scores.shape[1] == 1 or bool((scores == first).all())
    return first[:, 0].clone() if same else None


def block_summary(scores: torch.Tensor, lowest: float, highest: float, rows_alike: bool, dtype: torch.dtype,
                  scale: float = 1.0) -> ScoreSummary:  # fmt: skip
    """The summary of a block of samples (H, T, K) whose smallest and largest values were read with its checks:
    ``scale`` turns them into scores (``eps`` for a block of ``S / eps``); ``rows_alike``: what was read allows every
    row to be the same (the maxima and minima of the rows each alike: always so for a block of one sample). The rows'
    sums and equality are read only where the extremes leave them possible (the rare path); ``dtype``: the scores' as
    given, for the sums' rounding. One cluster: nothing to judge."""
    low, high = lowest * scale + 0.0, highest * scale + 0.0  # (+0.0: no -0)
    if scores.shape[2] < 2:
        return ScoreSummary(low, high, scores.shape[1])
    probabilities = in_unit_interval(low, high) and look_like_probabilities(scores, dtype, scale)
    row = the_one_row(scores) if rows_alike and math.isfinite(low) else None
    return ScoreSummary(low, high, scores.shape[1], probabilities, row, None if row is None else (low, high))


def checked_rows_summary(scores: torch.Tensor, extremes, dtype: torch.dtype, scale: float = 1.0) -> ScoreSummary:
    """:func:`block_summary` of a block from the extremes :func:`~otlabel.problem.check_rows` read with its checks:
    ``(min_lo, min_hi, max_lo, max_hi)``, the smallest and largest of the rows' minima and of their maxima (the rows
    may all be alike only where both are one value each)."""
    min_lo, min_hi, max_lo, max_hi = extremes
    return block_summary(scores, min_lo, max_hi, min_lo == min_hi and max_lo == max_hi, dtype, scale=scale)


def dense_summary(scores: torch.Tensor, extremes, has_zero_weights: bool) -> ScoreSummary | None:
    """:func:`block_summary` of whole scores (H, N, K) from the extremes their checks read
    (:class:`~otlabel.problem.ScoreExtremes`): every row alike is possible where there are two samples or more, the
    row maxima are one value and the smallest column maximum is the smallest score (each column constant). None where
    the smallest score was not read."""
    if extremes.lowest is None:
        return None
    rows_lo, rows_hi = extremes.rows
    # with zero-weight clusters the column maxima read are the weighted ones (0 elsewhere): not judged then
    rows_alike = (scores.shape[1] > 1 and rows_lo == rows_hi and not has_zero_weights
                  and extremes.weighted_cols[0] == extremes.lowest)  # fmt: skip
    return block_summary(scores, extremes.lowest, rows_hi, rows_alike, scores.dtype)


def warn_about_scores(summary: ScoreSummary | None, epsilon: float, n_clusters: int,
                      cluster_weights: torch.Tensor | None = None, features: bool = False,
                      quiet: bool = False) -> None:  # fmt: skip
    """The :class:`InputWarning` each misuse the summary shows gets, at the user's line (:func:`show_input_warning`).
    ``cluster_weights``: the solve's, None for the default uniform ones (read only when every sample has the same
    scores); ``features``: the scores are features @ prototypes.T (+ bias), and the messages say so; ``quiet``: raised
    under an "error" filter, never printed (a sharded solve's ranks but 0)."""
    if summary is None or n_clusters < 2:
        return  # one cluster: nothing to choose
    if summary.probabilities:
        show_input_warning("probabilities", probabilities_message(summary, epsilon), quiet)
    if summary.row is not None and summary.n_samples >= 2:
        largest_weight = 1.0 / n_clusters if cluster_weights is None else float(cluster_weights.max())
        if (1.0 - largest_weight) * summary.n_samples >= 1.0:  # some sample's share belongs to another cluster
            show_input_warning("collapse", collapse_message(summary, largest_weight, features), quiet)
            return  # (an epsilon above their range is that collapse)
    spread = summary.highest - summary.lowest
    judged = summary.n_samples >= 2 and summary.n_samples * n_clusters >= RANGE_JUDGED_FROM
    if judged and spread < NEAR_UNIFORM_RANGE * epsilon:  # (a -inf mask: inf, never)
        show_input_warning("epsilon", epsilon_message(summary, epsilon, features), quiet)


# The kinds of InputWarning shown so far, by where (see show_input_warning), and the warnings filters they were shown
# under: a change of filters (catch_warnings, simplefilter) starts afresh, as Python's own registries do. The filters
# list itself is held, not its id(): a new catch_warnings' list may take a freed one's memory, and so its id (CPython's
# list free list gave 4 successive blocks one id: told 1, 0, 0, 0 times).
_shown: set = set()
_shown_under: tuple | None = None  # (the filters list, its entries, the default action)


def filter_action(text: str, category: type, module: str, lineno: int) -> str | None:
    """The action the warnings filters give a warning (the first filter matching its text, category, module and line,
    else the default action), as ``warnings.warn`` finds it; None where the filters in force cannot be read."""
    filters = active_filters()
    if filters is None:
        return None
    for action, message, cat, mod, line in filters:
        if (matches(message, text) and issubclass(category, cat) and matches(mod, module)
                and line in (0, lineno)):  # fmt: skip
            return action
    return warnings.defaultaction


def active_filters() -> list | None:
    """The warnings filters ``warnings.warn`` applies here. With context-aware warnings (Python 3.14's
    ``sys.flags.context_aware_warnings``: the free-threaded build's default, ``-X context_aware_warnings``) a
    catch_warnings block's filters are in a context variable, not ``warnings.filters`` (the process's): read there,
    or a pytest.warns' "always" (or an "error") was taken for the process's "default", and the warning deduplicated.
    None where that context cannot be read (3.14's private names changed): the caller then leaves every decision to
    ``warnings.warn`` rather than guess, since a wrong guess silences a warning the user asked to see or raise."""
    if not getattr(sys.flags, "context_aware_warnings", False):
        return warnings.filters
    try:
        context = warnings._warnings_context
    except AttributeError:
        return None
    try:
        return context.get()._filters
    except LookupError:  # outside any catch_warnings block: the process's
        return warnings.filters
    except AttributeError:
        return None


def matches(pattern, value: str) -> bool:
    """A filter's message or module ``pattern`` matches ``value`` as Python's warnings find it: None matches anything,
    a plain string (CPython's own default filters hold "__main__") only itself, a compiled regex from the start."""
    if pattern is None:
        return True
    return pattern == value if isinstance(pattern, str) else bool(pattern.match(value))


def show_input_warning(kind: str, text: str, quiet: bool = False) -> None:
    """An :class:`InputWarning` of ``kind`` at the user's line, once per line and kind where the filters say "default".

    Python's filters remember a warning by its text and line, and these texts carry each call's numbers (the range,
    epsilon, the number of samples), so a training loop's every step was a new warning: SeLa's lambda as epsilon
    printed its paragraph at every one of 100,000 steps. Here the kind stands for the text: under "default" each kind
    is shown once per line of the user's code, under "module" once per file, under "once" once per process; "always"
    shows every one, "error" raises every time, "ignore" shows none, as for any warning. ``quiet``: shown only to raise
    (an "error" filter), for the sharded solve's ranks other than 0, which must raise with it but not print."""
    global _shown_under
    level = user_stacklevel()  # for a warn called here; the frame is sys._getframe(level - 1)
    frame = sys._getframe(level - 1)
    module = frame.f_globals.get("__name__")
    module = module if isinstance(module, str) else "<string>"
    filename, lineno = frame.f_code.co_filename, frame.f_lineno
    action = filter_action(text, InputWarning, module, lineno)
    if action is None:  # the filters in force are unknown: every call warns (a quiet rank too, so that "error" raises)
        warnings.warn(text, InputWarning, stacklevel=level)
        return
    if quiet and action != "error":
        return
    if action in ("default", "module", "once"):
        filters = active_filters()
        under = (filters, tuple(filters), warnings.defaultaction)
        if _shown_under is None or filters is not _shown_under[0] or under[1:] != _shown_under[1:]:
            _shown.clear()
            _shown_under = under
        key = {"default": (kind, filename, lineno), "module": (kind, filename), "once": (kind,)}[action]
        if key in _shown:
            return
        _shown.add(key)
    warnings.warn(text, InputWarning, stacklevel=level)


SILENCE = "If that is what you mean, silence this: warnings.filterwarnings('ignore', category=otlabel.InputWarning)."


def probabilities_message(summary: ScoreSummary, epsilon: float) -> str:
    return (
        f"the scores look like probabilities: every one lies in [0, 1] (from {summary.lowest:.3g} to "
        f"{summary.highest:.3g}) and every sample's scores sum to 1. otlabel takes log-domain scores (logits, "
        "log-probabilities, cosine similarities) and solves with exp(scores / epsilon): probabilities P give "
        f"exp(P / epsilon), which prefers P = 0.9 to P = 0.1 by a factor exp(0.8 / {epsilon:g}), where SeLa's "
        f"P ** (1 / epsilon) = exp(log(P) / epsilon) prefers it by 9 ** (1 / {epsilon:g}). Pass the logits, or "
        "log-probabilities: logits.log_softmax(-1), which stays finite where P underflows to 0 (P.log() makes those "
        "entries -inf, forbidden pairs); a per-sample constant changes nothing, so both give the same plan. " + SILENCE
    )


def epsilon_message(summary: ScoreSummary, epsilon: float, features: bool = False) -> str:
    spread = summary.highest - summary.lowest
    if summary.exact:
        what = f"the whole range of the scores ({spread:.3g}: from {summary.lowest:.3g} to {summary.highest:.3g})"
    else:
        what = (f"2 x {summary.highest:.3g}, twice the bound |features| x |prototypes| + |bias| on the scores (so "
                "above their whole range)")  # fmt: skip
    factor = math.exp(2 * spread / epsilon)
    lam = f"1 / {epsilon:g} = {1 / epsilon:.3g} if {epsilon:g} is lambda"
    cause = "features and prototypes that barely differ" if features else "scores that barely differ"
    return (
        f"epsilon = {epsilon:g} is above {what}: scores / epsilon differ by under 1 nat anywhere, so the balanced plan "
        f"stays near the plan that ignores them. Every code lies within a factor {factor:.3g} of its cluster's weight, "
        "and the labels are close to an argmax of the scores less each cluster's mean (a centring), not a balanced "
        "assignment. "
        "epsilon is a temperature in the units of the scores (SwAV: 0.05 for cosine similarities); SeLa's P ** lambda "
        f"is epsilon = 1 / lambda ({lam}). With {cause} (an untrained or collapsing network) the near-uniform plan "
        "is the right answer. " + SILENCE
    )


def collapse_message(summary: ScoreSummary, largest_weight: float, features: bool = False) -> str:
    same = "scores (every row identical)"
    if features:
        same = "features (every row of features identical), so the same scores"
    return (
        f"all {summary.n_samples:,} samples have the same {same}: a collapsed network (a "
        "constant output: dead features, a zero-initialised head). The balanced plan spreads them over the clusters "
        "by their weights (each sample's codes are the weights), but their labels, the argmax of one row, are all "
        f"one cluster, whose weight is at most {largest_weight:.3g}: no labelling can balance identical samples. Check "
        "the model's outputs. " + SILENCE
    )
