"""How the public calls run in a researcher's surroundings (:mod:`otlabel.entry`): inside a ``torch.compile``d training
step, under ``torch.set_default_device``, and with warnings at the caller's line."""

import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from helpers import random_problem

from otlabel import ConvergenceWarning, sinkhorn_assign, sinkhorn_assign_sharded, sinkhorn_assign_stream


class GraphRecorder:
    """A ``torch.compile`` backend that keeps every graph Dynamo hands it and runs it as traced (no Inductor: no C++
    compiler needed, and the test is about what gets traced)."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def traced_lines(self) -> list[str]:
        """The source lines of every traced operation, from the graphs' stack traces."""
        return [n.meta.get("stack_trace") or "" for gm in self.graphs for n in gm.graph.nodes]


@pytest.fixture
def dynamo():
    """torch._dynamo, imported here rather than at collection: the test files before this one then run without it,
    through the entry points' plain path, and the ones after with it, through torch's disabling wrapper."""
    dynamo = pytest.importorskip("torch._dynamo")
    dynamo.reset()  # other tests' compiled frames and counters out of the way
    yield dynamo
    dynamo.reset()


def training_step(scores):
    """What a SwAV/SeLa step does around the solve: scores from a computation, then labels and codes."""
    res = sinkhorn_assign(scores * 2.0, 0.1)
    return res.labels, res.codes, res.objective


def test_a_compiled_training_step_runs_the_solve_eagerly_and_once_compiled(dynamo):
    """Found porting a compiled SwAV step: Dynamo traced into the solver (its host loop, its data-dependent checks),
    took 32 s to compile a 256 x 30 call and ran each later call 13x slower than eager through dozens of graph
    breaks. Now the solve is one graph break: nothing of otlabel's is traced, the results are eager's bit for bit,
    and later calls (other values, the same shapes) compile nothing new."""
    s = random_problem(128, 12, seed=50)
    recorder = GraphRecorder()
    step = torch.compile(training_step, backend=recorder)
    for scores in (s, s + 0.01):
        got, want = step(scores), training_step(scores)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1]) and got[2] == want[2]
    assert recorder.graphs, "Dynamo compiled nothing: the test would not see a traced solve"
    traced = recorder.traced_lines()
    assert any("scores * 2.0" in line for line in traced)  # the caller's own work is traced ...
    assert not [line for line in traced if "otlabel" in line]  # ... the solve's is not
    compiled_once = len(recorder.graphs)
    step(s + 0.02)
    assert len(recorder.graphs) == compiled_once  # no recompilation


def test_fullgraph_compilation_refuses_the_solve(dynamo):
    """``fullgraph=True`` asks for no graph break, and the solve is one: Dynamo says so rather than tracing it."""
    with pytest.raises(dynamo.exc.Unsupported):
        torch.compile(training_step, backend=GraphRecorder(), fullgraph=True)(random_problem(32, 4, seed=51))


def test_a_compiled_caller_is_warned_at_its_own_line(dynamo):
    """The ConvergenceWarning names the caller's file, past Dynamo's disabling wrappers."""

    def step(scores):
        return sinkhorn_assign(scores, 0.01, max_iter=2).labels

    with pytest.warns(ConvergenceWarning) as caught:
        torch.compile(step, backend=GraphRecorder())(random_problem(64, 8, seed=52))
    assert [w.filename for w in caught] == [__file__]


PLAIN_PATH = """
import sys, warnings
import numpy as np, torch
from otlabel import ConvergenceWarning, sinkhorn_assign

scores = np.random.default_rng(0).standard_normal((60, 5)).astype(np.float32)
torch.set_default_device("meta")  # a CUDA default's stand-in
res = sinkhorn_assign(scores, 0.1)
print(res.labels.device, res.codes.device, round(float(res.codes.sum()), 3))
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sinkhorn_assign(scores, 0.01, max_iter=2)
print([w.filename == __file__ for w in caught if w.category is ConvergenceWarning])
print("torch._dynamo" in sys.modules)
"""


def test_the_plain_path_without_dynamo(tmp_path):
    """Without Dynamo imported (a program that never compiles: the CLI, or the test files before this one) a call takes
    the entry point's plain path and never imports Dynamo (~1 s): still with the CPU as default device, and warned
    at the caller's line."""
    script = tmp_path / "plain.py"
    script.write_text(PLAIN_PATH)
    out = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[:3] == ["cpu cpu 60.0", "[True]", "False"], out.stderr


def test_a_call_after_dynamo_was_imported_warns_at_the_callers_line(dynamo):
    """With Dynamo imported (a compiled model elsewhere in the program) an uncompiled call goes through torch's
    disabling wrappers too: the warning still names the caller's line, not one of torch's."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sinkhorn_assign(random_problem(100, 5, seed=53), 0.01, max_iter=2)
    assert [w.filename for w in caught if w.category is ConvergenceWarning] == [__file__]


def test_a_default_device_other_than_the_inputs_changes_nothing():
    """Found porting training code that calls torch.set_default_device("cuda") and labels CPU or NumPy scores: the
    factory calls inside the solve (the CPU kernel, the streamed labels) followed the default device, and the solve
    failed with torch's 'can't convert meta device type tensor to numpy' or 'cross-device copies are not allowed', or
    returned streamed labels and codes on it. The meta device stands in for CUDA here: every result on the CPU, as
    without a default device, and the caller's default device restored."""
    s = random_problem(300, 6, seed=44)
    z = torch.nn.functional.normalize(random_problem(300, 8, seed=45), dim=1)
    c = random_problem(6, 8, seed=46)
    solves = {
        "dense": lambda: sinkhorn_assign(s, 0.1),
        "float64": lambda: sinkhorn_assign(s.double(), 0.1),
        "numpy": lambda: sinkhorn_assign(s.numpy(), 0.1, cluster_weights=np.full(6, 1 / 6)),
        "warm": lambda: sinkhorn_assign(s, 0.1, init=torch.zeros(6, device="cpu"), epsilon_scaling=0.5),
        "annealed": lambda: sinkhorn_assign(s, 0.1, epsilon_scaling=0.5),  # (an init skips the stages)
        "stream": lambda: sinkhorn_assign_stream(s.numpy(), 0.1),
        "features": lambda: sinkhorn_assign(features=z, prototypes=c, epsilon=0.1),
        "sharded": lambda: sinkhorn_assign_sharded(s, 0.1),
    }
    for name, solve in solves.items():
        want = solve()
        torch.set_default_device("meta")
        try:
            got = solve()
            got = (got.labels, got.codes, got.objective)
            assert torch.empty(0).device.type == "meta"
        finally:
            torch.set_default_device(None)
        assert all(x.device.type == "cpu" for x in got[:2]), name
        assert torch.equal(got[0], want.labels) and torch.equal(got[1], want.codes) and got[2] == want.objective, name


def test_the_callers_default_device_is_set_aside_not_covered():
    """Inside the solve (seen from its callback) the CPU is the default device and no torch-function mode is active:
    the caller's device context is popped for the call, not covered by a second one, which would send every torch
    call of the solve through two Python modes (64 x 8, 20 iterations: 6.4 against 3.5 ms). Restored after."""
    seen = []

    def callback(iteration, error):  # the default device read as torch.empty(0)'s: get_default_device is torch >= 2.3
        seen.append((torch.empty(0).device.type, torch._C._len_torch_function_stack()))

    scores = random_problem(64, 8, seed=54)
    torch.set_default_device("meta")
    try:
        sinkhorn_assign(scores, 0.1, max_iter=3, tol=None, callback=callback)
        assert torch.empty(0).device.type == "meta"
    finally:
        torch.set_default_device(None)
    assert seen == [("cpu", 0)] * 3
