"""``otlabel.InputWarning``: valid input whose answer is likely meaningless gets a warning, on every entry point.

Probabilities passed as scores (SeLa's ``P = softmax(logits)``), SeLa's ``lambda`` passed as ``epsilon`` (far above the
scores' spread) and every sample scored alike (a collapsed network) each solved without a word. Typical input (logits
at eps 0.05-0.1, SwAV's cosine similarities at 0.05, small problems) must stay silent, and pay no pass or device read
for the checks: those are judged from the extremes the input checks already read back.
"""

from __future__ import annotations

import collections
import math
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import clustered_cosine_scores, cosine_scores, random_problem

import otlabel
from otlabel import InputWarning, sinkhorn_assign, sinkhorn_assign_sharded, sinkhorn_assign_stream

PROBABILITIES = "look like probabilities"
LAMBDA = r"epsilon = 1 / lambda"
COLLAPSE = "have the same scores"


def logits(n=300, k=12, seed=0, scale=2.0):
    return random_problem(n, k, seed=seed, scale=scale)


def dense(scores, epsilon, **kwargs):
    return sinkhorn_assign(scores, epsilon, **kwargs)


def streamed(scores, epsilon, **kwargs):
    """Streamed in chunks of about 64 samples, from a NumPy array."""
    return sinkhorn_assign_stream(np.asarray(scores), epsilon, memory_budget=64 * (scores.shape[-1] + 8) * 16, **kwargs)


def sharded_alone(scores, epsilon, **kwargs):
    return sinkhorn_assign_sharded(scores, epsilon, **kwargs)


def reference(scores, epsilon, **kwargs):
    return sinkhorn_assign(scores, epsilon, backend="reference", **kwargs)


ENTRY_POINTS = [dense, reference, streamed, sharded_alone]


def input_warnings(call, *args, **kwargs) -> list[str]:
    """The messages of the InputWarnings ``call`` gives (others, such as SmallChunksWarning, are let through)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(*args, **kwargs)
    return [str(w.message) for w in caught if issubclass(w.category, InputWarning)]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_probabilities_passed_as_scores_are_named(entry):
    """SeLa's P = softmax(logits) passed with epsilon = 1 / lambda solves exp(P / eps), not P ** lambda."""
    p = logits().softmax(-1)
    said = input_warnings(entry, p, 1 / 25, max_iter=50, warn=False)
    assert len(said) == 1 and PROBABILITIES in said[0], said
    assert "logits.log_softmax(-1)" in said[0] and "exp(P / epsilon)" in said[0]
    assert input_warnings(entry, p.log(), 1 / 25, max_iter=50, warn=False) == []  # log(P): what it should be
    assert input_warnings(entry, logits(), 1 / 25, max_iter=50, warn=False) == []


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_lambda_passed_as_epsilon_is_named(entry):
    """epsilon = 25 (SeLa's lambda) on logits whose range is ~11: the plan is within a factor e^2 of uniform."""
    s = logits()
    said = input_warnings(entry, s, 25.0, warn=False)
    assert len(said) == 1 and "epsilon = 25 is above the whole range of the scores" in said[0], said
    assert LAMBDA in said[0] and "1 / 25 = 0.04" in said[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        res = entry(s, 25.0, warn=False)
    codes = res.codes * s.shape[-1]
    assert float(codes.max()) < 2.0 and float(codes.min()) > 0.5  # what the message says: near the weights
    assert input_warnings(entry, s, 1 / 25, warn=False) == []


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_identical_rows_are_a_collapse(entry):
    """Every sample scored alike (a constant network output): the plan spreads them, their labels are all one."""
    row = torch.randn(1, 8, generator=torch.Generator().manual_seed(3))
    s = row.expand(200, 8).contiguous()
    said = input_warnings(entry, s, 0.05)
    assert len(said) == 1 and "all 200 samples have the same scores" in said[0], said
    assert "whose weight is at most 0.125" in said[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        assert entry(s, 0.05).labels.unique().numel() == 1  # what the warning is about
    # a weight that takes (nearly) all the mass: one label is the balanced answer
    r = torch.tensor([0.999] + [0.001 / 7] * 7, dtype=torch.float64)
    assert input_warnings(entry, s, 0.05, cluster_weights=r) == []
    assert input_warnings(entry, s[:1], 0.05) == []  # one sample: nothing to balance
    s2 = s.clone()
    s2[17, 3] += 1e-3  # one sample differs: not a collapse (but within epsilon: a near-uniform plan)
    said = input_warnings(entry, s2, 0.05)
    assert not any(COLLAPSE in m for m in said), said


def test_rows_alike_across_chunks_and_ranges_only_if_the_same():
    """Streamed: chunks whose rows are each alike, but not the same from chunk to chunk, are no collapse."""
    a = torch.randn(1, 8).expand(100, 8)
    b = torch.randn(1, 8).expand(100, 8)
    assert input_warnings(streamed, torch.cat([a, b]).contiguous(), 0.05) == []
    assert len(input_warnings(streamed, torch.cat([a, a]).contiguous(), 0.05)) == 1


def typical_inputs():
    """(name, scores, epsilon) that are used as meant: none may warn."""
    g = torch.Generator().manual_seed(0)
    forbidden = torch.eye(4, dtype=torch.bool)[torch.arange(50) % 4]  # sample j may not go to cluster j % 4
    return [
        ("swav cosines eps 0.05", cosine_scores(512, 30, seed=1), 0.05),
        ("trained swav cosines eps 0.05", clustered_cosine_scores(512, 30, seed=2), 0.05),
        ("logits eps 0.05", logits(512, 30, seed=3, scale=1.0), 0.05),
        ("logits eps 0.1", logits(512, 30, seed=4, scale=1.0), 0.1),
        ("log-probabilities eps 0.05", logits(512, 30, seed=5).log_softmax(-1), 0.05),
        ("small logits at initialisation eps 0.05", logits(256, 10, seed=6, scale=0.1), 0.05),
        ("heads", random_problem(64, 10, h=3, seed=7), 0.05),
        ("4 x 3", torch.randn(4, 3, generator=g), 0.05),
        ("2 x 2", torch.tensor([[1.0, -0.2], [0.3, 0.9]]), 0.05),
        ("1 x 5", torch.randn(1, 5, generator=g), 10.0),
        ("one cluster", torch.rand(50, 1, generator=g), 0.05),
        ("masked, eps 1", logits(50, 4, seed=8).log_softmax(-1).masked_fill(forbidden, -torch.inf), 1.0),
    ]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_typical_inputs_do_not_warn_nor_pay_a_pass(entry, monkeypatch):
    """No warning, and neither rare-path check (a pass over the scores and a device read) is made: those run only
    where every score lies in [0, 1] or every row maximum is the same (test_one_hot_preferences_are_scores)."""
    from otlabel import advice

    def refused(scores, *args):
        if scores.shape[1] > 1:  # (a block of one sample is its one row, compared with the other blocks' on the host)
            raise AssertionError("the rare path ran on typical input")

    monkeypatch.setattr(advice, "look_like_probabilities", refused)
    monkeypatch.setattr(advice, "the_one_row", refused)
    for name, s, eps in typical_inputs():
        if entry is streamed and s.ndim == 3:
            continue  # (heads stream too, but the chunk budget below is for 2-d scores)
        assert input_warnings(entry, s, eps, max_iter=30, warn=False) == [], name


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_one_hot_preferences_are_scores(entry):
    """Rows of 1 and 0 lie in [0, 1] and sum to 1, but with nothing strictly between they are preferences written as
    scores, not probabilities (their rows' check, the rare path, is made: no warning)."""
    assert input_warnings(entry, torch.eye(6)[torch.arange(60) % 6], 0.1) == []
    assert input_warnings(entry, torch.eye(2), 0.1) == []


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_one_hot_preferences_above_epsilon_are_said(entry):
    """Preferences of 1 and 0 at epsilon 2 (above their range, 1): no false alarm. Each sample prefers its cluster by
    only exp(1 / 2) = 1.65, so the codes stay near the weights, as the message says (0.2-3.1% of a hard assignment's
    information at K = 30, 6, 2), and the labels are the preferences whatever epsilon (identical rows tie): what the
    message's centred argmax gives. At epsilon 0.5 (2 nats) their codes keep 6-24%: silent."""
    s = torch.eye(6)[torch.multinomial(torch.linspace(1, 3, 6), 120, True, generator=torch.Generator().manual_seed(0))]
    said = input_warnings(entry, s, 2.0, warn=False)
    assert len(said) == 1 and "epsilon = 2 is above the whole range of the scores (1:" in said[0], said
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", InputWarning)
        res = entry(s, 2.0)
    codes = res.codes.double()
    assert float((codes * (codes * 6).log()).sum(-1).mean()) / math.log(6) < 0.015  # near the weights, as said
    assert torch.equal(res.labels, s.argmax(-1))
    assert input_warnings(entry, s, 0.5, warn=False) == []


def test_features_mode_warns_by_the_bound_or_the_scores():
    """Features: on the kernel (Triton) by the bound |z| |c| + |bias| (the scores are never formed), streamed or by the
    reference by the scores themselves. SwAV's eps = 0.05 on L2-normalised features is silent on every route."""
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    routes = [dict(backend="torch"), dict(backend="reference")]
    if otlabel.backends.triton.triton_installed():
        routes.append(dict(backend="triton"))
    for route in routes:
        said = input_warnings(sinkhorn_assign, features=z, prototypes=c, epsilon=25.0, **route)
        assert len(said) == 1 and LAMBDA in said[0], (route, said)
        assert input_warnings(sinkhorn_assign, features=z, prototypes=c, epsilon=0.05, **route) == [], route
    if otlabel.backends.triton.triton_installed():
        said = input_warnings(sinkhorn_assign, features=z, prototypes=c, epsilon=25.0, backend="triton")
        assert "twice the bound |features| x |prototypes| + |bias|" in said[0]
    said = input_warnings(sinkhorn_assign_stream, features=z.numpy(), prototypes=c, epsilon=25.0)
    assert len(said) == 1 and LAMBDA in said[0]


def features_routes():
    """(name, call(features, prototypes, epsilon)) for every features route a process has."""
    routes = [("torch", lambda z, c, eps: sinkhorn_assign(features=z, prototypes=c, epsilon=eps, backend="torch")),
              ("reference", lambda z, c, eps: sinkhorn_assign(features=z, prototypes=c, epsilon=eps,
                                                              backend="reference")),
              ("stream", lambda z, c, eps: sinkhorn_assign_stream(features=z.numpy(), prototypes=c, epsilon=eps,
                                                                  memory_budget=64 * (c.shape[0] + 8) * 16)),
              ("sharded", lambda z, c, eps: sinkhorn_assign_sharded(features=z, prototypes=c,
                                                                    epsilon=eps))]  # fmt: skip
    if otlabel.backends.triton.triton_installed():
        routes.append(("triton", lambda z, c, eps: sinkhorn_assign(features=z, prototypes=c, epsilon=eps,
                                                                   backend="triton")))  # fmt: skip
    return routes


def test_a_collapsed_encoder_is_named_on_every_features_route():
    """Every sample with the same features: judged by the features' rows, since their products, computed in blocks,
    can differ in the last bit (the chunked CPU route missed it 3 seeds in 4; the kernel routes never judged it)."""
    # (float64 products of 777 x 2,048 identical rows at 129 prototypes differ in their last bit: the reference's)
    for seed, (n, d, k) in enumerate([(300, 16, 10)] * 4 + [(777, 2048, 129)]):
        g = torch.Generator().manual_seed(seed)
        z = torch.nn.functional.normalize(torch.randn(1, d, generator=g), dim=1).expand(n, d).contiguous()
        c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
        for name, call in features_routes():
            if name == "triton" and d > 16:
                continue  # (interpreted: slow at 2,048-d)
            said = input_warnings(call, z, c, 0.05)
            assert len(said) == 1 and f"all {n} samples have the same" in said[0], (seed, name, said)
            z2 = z.clone()
            z2[123, 5] += 1e-3  # one sample differs: no collapse
            assert not any(COLLAPSE in m or "same features" in m for m in input_warnings(call, z2, c, 0.05)), name


def test_typical_features_do_not_compare_their_rows(monkeypatch):
    """L2-normalised features (SwAV's) have norms that differ in their last bits, and spread-out products: their rows
    are never compared (no pass, no read), on any route but the reference's (which forms every score in float64 and
    compares the features once, 1 / K of that product's work)."""
    from otlabel import advice

    def refused(features, *args):
        raise AssertionError("the features' rows were compared on typical input")

    monkeypatch.setattr(advice, "one_features_row", refused)
    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(300, 16, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(10, 16, generator=g), dim=1)
    for name, call in features_routes():
        if name != "reference":
            assert input_warnings(call, z, c, 0.05) == [], name


def test_the_warning_is_exported_silenceable_and_at_the_callers_line():
    assert "InputWarning" in otlabel.__all__ and issubclass(otlabel.InputWarning, UserWarning)
    p = logits().softmax(-1)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warnings.filterwarnings("ignore", category=otlabel.InputWarning)
        sinkhorn_assign(p, 25.0, warn=False)
    assert caught == []
    with pytest.warns(InputWarning) as caught:
        sinkhorn_assign(p, 25.0, warn=False)
    assert {Path(w.filename).name for w in caught} == {Path(__file__).name}
    assert len(caught) == 2  # probabilities, and an epsilon above their range: both said


def solve_here(scores, epsilon):
    """One line of user code that calls otlabel (a training step's)."""
    return sinkhorn_assign(scores, epsilon, max_iter=5, tol=None)


def said_in(caught) -> list[tuple[str, int]]:
    return [(str(w.message), w.lineno) for w in caught if issubclass(w.category, InputWarning)]


def test_a_training_loop_is_told_once_per_line_and_kind():
    """Each step's scores have another range, so each message has other numbers: Python's filters, which remember a
    warning by its text, showed SeLa's lambda as epsilon at every step of a training loop. Now each kind is shown once
    per calling line under the default filter, every time under "always", once a process under "once"."""
    steps = [logits(seed=i) for i in range(4)]
    assert len({input_warnings(solve_here, s, 25.0)[0] for s in steps}) == 4  # four texts (their ranges)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", InputWarning)
        for s in steps:
            solve_here(s, 25.0)
        for s in steps:
            solve_here(s.softmax(-1), 25.0)  # the same line: only the new kind (probabilities) is new
        sinkhorn_assign(steps[0], 25.0, max_iter=5, tol=None)  # another line: told again
    said = said_in(caught)
    assert [LAMBDA in m for m, _ in said] == [True, False, True] and PROBABILITIES in said[1][0], said
    assert len({line for _, line in said}) == 2  # solve_here's line twice, then this test's
    with warnings.catch_warnings(record=True) as caught:  # other filters: from scratch, as Python's registries are
        warnings.simplefilter("default", InputWarning)
        solve_here(steps[1], 25.0)
    assert len(said_in(caught)) == 1
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)  # the documented way to see each one
        for s in steps:
            solve_here(s, 25.0)
    assert len(said_in(caught)) == 4
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("once", InputWarning)
        for s in steps:
            solve_here(s, 25.0)
            sinkhorn_assign(s, 25.0, max_iter=5, tol=None)
    assert len(said_in(caught)) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error", InputWarning)
        for s in steps[:2]:  # raised every time, not only the first
            with pytest.raises(InputWarning, match="epsilon = 25"):
                solve_here(s, 25.0)
    for s in steps[:2]:  # pytest.warns sees each one
        with pytest.warns(InputWarning, match="epsilon = 25"):
            solve_here(s, 25.0)


class OtherWarning(UserWarning):
    """Any other warning, ignored: one issued makes the warnings machinery let go of the filters list it last used."""


def test_each_new_catch_warnings_starts_afresh_on_any_list():
    """Each catch_warnings block starts afresh, as Python's registries do (a test suite checking the warning in two
    tests at one helper line sees it in both), though its filters list may take a freed one's memory: the filters
    were told apart by id(), and CPython's list free list gives a new block the last one's list once the warnings
    machinery lets go of it (at any other warning). 4 blocks told 1, 0, 0, 0 times; now each once."""
    kept = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OtherWarning)
        for seed in range(4):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("default", InputWarning)
                solve_here(logits(seed=seed), 25.0)
                kept.append((caught, [[] for _ in range(100)]))  # the free list emptied: this block's list goes on it
            warnings.warn("another", OtherWarning, stacklevel=1)
    assert [len(said_in(caught)) for caught, _ in kept] == [1, 1, 1, 1]


def test_filters_of_plain_strings_match_as_pythons_do():
    """A filter may hold its message or module as a plain string (CPython's own defaults do: ("default", None,
    DeprecationWarning, "__main__", 0)), which Python matches by equality; read as a regex it raised AttributeError
    ('str' object has no attribute 'match') from inside the solve."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", InputWarning)
        warnings.filters.insert(0, ("ignore", None, InputWarning, __name__, 0))  # this module's warnings: none
        solve_here(logits(), 25.0)
        warnings.filters[0] = ("ignore", None, InputWarning, __name__ + "x", 0)  # another module's: no match
        solve_here(logits(), 25.0)
    assert len(said_in(caught)) == 1


def test_context_aware_filters_are_the_ones_read(monkeypatch):
    """Python 3.14 with context-aware warnings (the free-threaded build's default, ``-X context_aware_warnings``):
    catch_warnings keeps its filters in a context variable, warnings.filters is the process's. Simulated here (3.14's
    names): a pytest.warns-like "always" in the context, "default" globally. The global filters were read: the
    second step at one line was taken as already shown (pytest.warns in a second test at one helper line: DID NOT
    WARN; an "error" context: one raise, then silence, and a sharded job's ranks but 0 never raising: a hang)."""
    import contextvars
    import types

    class Context:  # as 3.14's warnings._Context: the filters of one catch_warnings
        _filters = [("always", None, Warning, None, 0)]

    context = contextvars.ContextVar("warnings_context")
    flags = {name: getattr(sys.flags, name) for name in dir(sys.flags) if not name.startswith(("_", "n_"))}
    monkeypatch.setattr(sys, "flags", types.SimpleNamespace(**{**flags, "context_aware_warnings": True}))
    monkeypatch.setattr(warnings, "_warnings_context", context, raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", InputWarning)  # the process's (this Python's warn reads these)
        token = context.set(Context())
        try:
            for seed in range(2):
                solve_here(logits(seed=seed), 25.0)
        finally:
            context.reset(token)
    assert len(said_in(caught)) == 2


def test_filters_that_cannot_be_read_leave_every_call_to_warnings(monkeypatch):
    """Context-aware warnings whose private names this version does not know (a later Python): the filters in force
    cannot be read, and guessing the process's could silence a warning a catch_warnings block asks to see or raise.
    Every call is then left to ``warnings.warn``: under "default" two steps whose messages differ are two warnings
    (deduplicated by kind, as the readable filters are, they were one)."""
    import types

    flags = {name: getattr(sys.flags, name) for name in dir(sys.flags) if not name.startswith(("_", "n_"))}
    monkeypatch.setattr(sys, "flags", types.SimpleNamespace(**{**flags, "context_aware_warnings": True}))
    monkeypatch.delattr(warnings, "_warnings_context", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default", InputWarning)
        for seed in range(2):
            solve_here(logits(seed=seed), 25.0)
    assert len(said_in(caught)) == 2


def test_a_script_prints_it_once_for_a_loop():
    """As a user's script runs it, with Python's own filters: 5 steps, 5 ranges, one paragraph on stderr."""
    import subprocess

    step = "    otlabel.sinkhorn_assign(torch.randn(300, 12) * (1 + step / 10), 25.0, max_iter=5, tol=None)"
    script = "\n".join(["import torch, otlabel", "for step in range(5):", step])
    root = Path(otlabel.__file__).resolve().parent.parent
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "PYTHONPATH": str(root)})  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("InputWarning: epsilon = 25 is above") == 1, done.stderr


@pytest.fixture
def host_reads(monkeypatch):
    """A Counter of tensor-to-Python conversions made by otlabel's code (as in test_host_syncs)."""
    root = Path(otlabel.__file__).resolve().parent
    counts = collections.Counter()
    for name in ("__bool__", "item", "tolist", "__int__", "__float__", "__index__"):
        original = getattr(torch.Tensor, name)

        def wrapper(self, *args, _original=original, _name=name, **kwargs):
            caller = sys._getframe(1).f_code.co_filename
            if caller.startswith(str(root)):
                counts[f"{_name} {Path(caller).name}:{sys._getframe(1).f_lineno}"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, wrapper)
    return counts


def test_only_the_rare_path_reads_more(host_reads):
    """A fixed-iteration solve reads back twice (test_host_syncs); scores in [0, 1] once more (their first row's sum)
    and, where that is 1, once more (every row's sums); identical rows once more (their equality; with weights
    given, once more for the largest in the message)."""
    weights = torch.full((5,), 0.2, dtype=torch.float64)
    cases = [(logits(), None, 0), (logits().softmax(-1), None, 2), (logits().sigmoid(), None, 1),
             (torch.full((40, 5), 2.0), None, 1), (torch.full((40, 5), 2.0), weights, 2)]  # fmt: skip
    for s, r, extra in cases:
        host_reads.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", InputWarning)
            sinkhorn_assign(s, 0.05, max_iter=3, tol=None, backend="reference", cluster_weights=r)
        assert sum(host_reads.values()) == 2 + extra, dict(host_reads)


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_scores_in_the_unit_interval_that_are_not_probabilities_pay_no_pass(entry, monkeypatch):
    """Cosines of non-negative (ReLU) features, sigmoids: every score in [0, 1], every call. Their first row's sum
    (one per head, per streamed chunk) already says they are not probabilities; the pass over every row's sums was
    made on each call before."""
    from otlabel import advice

    def refused(*args):
        raise AssertionError("every row's sum was read for scores whose first row does not sum to 1")

    monkeypatch.setattr(advice, "every_row_sums_to_one", refused)
    relu = torch.randn(300, 16, generator=torch.Generator().manual_seed(0)).relu()
    relu = relu / relu.norm(dim=-1, keepdim=True).clamp(min=1e-6)
    cosines = relu @ relu[:12].T  # (300, 12), in [0, 1]
    assert cosines.min() >= 0 and cosines.max() <= 1 + 1e-6
    for s in (cosines, logits().sigmoid()):
        assert input_warnings(entry, s, 0.05, max_iter=30, warn=False) == []
    monkeypatch.undo()  # probabilities are not missed: their first row sums to 1, and every row's sums are read
    said = input_warnings(entry, logits().softmax(-1), 0.05, max_iter=30, warn=False)
    assert len(said) == 1 and PROBABILITIES in said[0], said


@pytest.mark.interpreter
def test_a_captured_solve_warns_from_what_its_replay_read(monkeypatch):
    """cuda_graph=True: the extremes come back with the history (one read); only the rare path reads more, after the
    replay (nothing is read inside the captured body)."""
    from test_graphs import record_eagerly

    from otlabel import graphs

    monkeypatch.setattr(graphs, "recorder_for", lambda device: record_eagerly)
    graphs.clear_cache()
    call = dict(max_iter=3, tol=None, backend="triton", cuda_graph=True)
    try:
        for weights in (None, torch.tensor([0.0] + [1 / 11] * 11, dtype=torch.float64)):
            said = input_warnings(sinkhorn_assign, logits().softmax(-1), 1 / 25, cluster_weights=weights, **call)
            assert len(said) == 1 and PROBABILITIES in said[0], said
            said = input_warnings(sinkhorn_assign, logits(), 25.0, cluster_weights=weights, **call)
            assert len(said) == 1 and LAMBDA in said[0], said
            assert input_warnings(sinkhorn_assign, logits(), 0.05, cluster_weights=weights, **call) == []
        said = input_warnings(sinkhorn_assign, torch.ones(1, 12).expand(50, 12).contiguous(), 0.05, **call)
        assert len(said) == 1 and COLLAPSE in said[0], said
    finally:
        graphs.clear_cache()


def test_the_ranks_summaries_are_judged_together():
    """Sharded: each rank's smallest and largest score, probabilities flag and one-row digest travel with the
    metadata every rank gathers anyway; the verdict is the whole problem's, the same on every rank."""
    from otlabel.advice import ScoreSummary
    from otlabel.distributed import META_SIZE, META_SUMMARY, gathered_summary, summary_columns

    def table(*summaries):
        rows = torch.zeros(len(summaries), META_SIZE, dtype=torch.float64)
        for i, summary in enumerate(summaries):
            rows[i, META_SUMMARY:] = torch.tensor(summary_columns(summary), dtype=torch.float64)
        return rows

    row_a, row_b = torch.arange(4.0)[None], torch.arange(4.0)[None] + 1
    low = ScoreSummary(0.0, 0.5, 10, probabilities=True, row=row_a)
    high = ScoreSummary(10.0, 10.5, 10, probabilities=False, row=row_b)
    whole = gathered_summary(table(low, high), 20)
    assert (whole.lowest, whole.highest, whole.n_samples, whole.probabilities, whole.row) == (0.0, 10.5, 20, False,
                                                                                                None)  # fmt: skip
    assert gathered_summary(table(low, low), 20).probabilities
    assert gathered_summary(table(low, low), 20).row is not None  # one row on every rank
    assert gathered_summary(table(low, None), 20) is None  # a rank without a summary: nothing judged


def _sharded_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    from test_distributed import gloo_worker

    with gloo_worker(rank, world, init_file, out_dir):
        # each rank's range is under epsilon, the whole problem's is not: no warning
        local = torch.rand(40, 6, generator=torch.Generator().manual_seed(rank)) * 0.5 + 10 * rank
        assert input_warnings(sinkhorn_assign_sharded, local, 1.0, timeout=30) == []
        # rows alike on each rank, the same row on both: a collapse, said once for the job (by rank 0)
        same = torch.arange(6.0).expand(30, 6).contiguous()
        said = input_warnings(sinkhorn_assign_sharded, same, 0.05, timeout=30)
        assert len(said) == (1 if rank == 0 else 0) and all("all 60 samples" in m for m in said), (rank, said)
        # ... raised by every rank under an "error" filter (rank 0 alone would leave rank 1 waiting: a timeout)
        with warnings.catch_warnings():
            warnings.simplefilter("error", InputWarning)
            with pytest.raises(InputWarning, match="all 60 samples"):
                sinkhorn_assign_sharded(same, 0.05, timeout=30)
        # ... a different row on each: none
        assert input_warnings(sinkhorn_assign_sharded, same + rank * torch.eye(6)[0], 0.05, timeout=30) == []
        # probabilities on both ranks; on one only, none
        p = logits(30, 6, seed=rank).softmax(-1)
        said = input_warnings(sinkhorn_assign_sharded, p, 0.05, timeout=30)
        assert len(said) == (1 if rank == 0 else 0) and all(PROBABILITIES in m for m in said), (rank, said)
        assert input_warnings(sinkhorn_assign_sharded, p if rank else p.log(), 0.05, timeout=30) == []
        # a collapsed encoder's features, the same row on both ranks (streamed shards): said by rank 0
        z = torch.full((30, 8), 8**-0.5)
        c = torch.nn.functional.normalize(torch.randn(5, 8, generator=torch.Generator().manual_seed(0)), dim=1)
        said = input_warnings(sinkhorn_assign_sharded, features=z, prototypes=c, epsilon=0.05, timeout=30)
        assert len(said) == (1 if rank == 0 else 0) and all("all 60 samples have the same features" in m
                                                            for m in said), (rank, said)  # fmt: skip
        # ... each rank's rows alike, but not the same row on both: none
        assert input_warnings(sinkhorn_assign_sharded, features=z * (1 + rank), prototypes=c, epsilon=0.05,
                              timeout=30) == []  # fmt: skip


def test_sharded_warnings_judge_every_rank_together_and_rank_0_says_them(tmp_path):
    from test_distributed import spawn_workers

    spawn_workers(_sharded_worker, tmp_path, world=2)


def test_the_command_line_prints_them(tmp_path, capsys):
    """`otlabel assign` ignores the library's warnings (non-convergence is in its summary): these are printed, as its
    other warnings are, without the Python advice to silence them."""
    from otlabel.cli import main

    np.save(tmp_path / "p.npy", logits().softmax(-1).numpy())
    np.save(tmp_path / "s.npy", logits().numpy())
    for name, epsilon, said in (("p.npy", "0.04", PROBABILITIES), ("s.npy", "25", LAMBDA), ("s.npy", "0.05", None)):
        assert main(["assign", str(tmp_path / name), "--epsilon", epsilon, "--out", str(tmp_path / "y.npy"),
                     "-q"]) == 0  # fmt: skip
        err = capsys.readouterr().err
        if said is None:
            assert err == ""
        else:
            assert err.startswith("otlabel: warning: ") and said in err and "filterwarnings" not in err, err


def small_problems_within_epsilon():
    """(name, scores, epsilon) of fewer than 128 scores whose whole range lies below epsilon, used as meant."""
    g = torch.Generator().manual_seed(9)
    z = torch.nn.functional.normalize(torch.randn(4, 2048, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(2, 2048, generator=g), dim=1)
    # cosines of 2,048-d features (standard deviation ~0.022): 8 of them span under 0.05 one time in 4
    swav = z @ c.T  # (a range of 0.042)
    # 4 draws of a unit normal span under 1 one time in 9, 8 draws one in 270
    logits_2x2 = torch.tensor([[-0.3, 0.2], [0.4, -0.1]])
    logits_4x2 = torch.tensor([[0.1, -0.3], [0.5, 0.2], [-0.2, 0.4], [0.3, -0.1]])
    return [
        ("swav cosines 4 x 2, eps 0.05", swav, 0.05),
        ("logits 2 x 2, eps 1", logits_2x2, 1.0),
        ("logits 4 x 2, eps 1", logits_4x2, 1.0),
    ]


@pytest.mark.parametrize("entry", ENTRY_POINTS)
def test_small_problems_are_not_judged_by_their_range(entry):
    """Below 128 scores the range is no measure of their spread: a few legitimate scores span less than epsilon by
    chance, and their plan can still mean something (each 2 x 2 sample goes to the cluster it prefers)."""
    for name, s, eps in small_problems_within_epsilon():
        assert float(s.max() - s.min()) < eps, name  # what made these warn
        assert input_warnings(entry, s, eps, warn=False) == [], name
    res = entry(torch.tensor([[-0.45, 0.45], [0.45, -0.45]]), 1.0, warn=False)
    assert res.labels.tolist() == [1, 0]  # a range of 0.9 under epsilon 1, and the right labels
    # from 128 scores on, SeLa's lambda as epsilon is said (64 x 2 logits at epsilon 25)
    said = input_warnings(entry, logits(64, 2, seed=10), 25.0, warn=False)
    assert len(said) == 1 and LAMBDA in said[0], said


def test_merged_blocks_keep_one_row_only_where_their_rows_are_equal():
    """Blocks (chunks, ranges) whose rows are each alike, with the same extremes: one row only where it is the same."""
    from otlabel.advice import ScoreSummary

    row = torch.tensor([[0.0, 1.0, 2.0]])
    first = ScoreSummary(0.0, 2.0, 10, row=row, alike=(0.0, 2.0))
    assert first.merged(ScoreSummary(0.0, 2.0, 5, row=row.clone(), alike=(0.0, 2.0))).row is not None
    flipped = ScoreSummary(0.0, 2.0, 5, row=row.flip(-1), alike=(0.0, 2.0))  # the same extremes, another row
    assert first.merged(flipped).row is None and first.merged(flipped).n_samples == 15
