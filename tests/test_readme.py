"""The README's Python examples run as written and show what the README says they show.

Blocks 1 and 2 are whole programs. Blocks 3 and 4 are fragments that name a user's data (``scores.npy``,
``emb.npy``, ``C``, ``local_logits``, ``local_z``, ``scores``) and a process group: the test provides small
versions of those (a one-process Gloo group) and runs the fragment's code unchanged.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_readme_has_the_examples_this_test_runs():
    blocks = python_blocks()
    assert len(blocks) == 4, "a README example was added or removed: run it here too"
    assert "sinkhorn_assign(logits" in blocks[0] and "# next training step" in blocks[0] and "features=Z" in blocks[1]
    assert "sinkhorn_assign_stream" in blocks[2] and "exact_plan" in blocks[3]


def run_block(index: int, namespace: dict) -> list:
    """Run README python block ``index`` (0-based) in ``namespace``, its code unchanged, and return the values of its
    bare expression statements (``res.labels``, ``exact_plan(scores).objective``: what the README shows), in order."""
    source = python_blocks()[index]
    name = f"README.md python block {index + 1}"
    shown = []
    for statement in ast.parse(source).body:
        if isinstance(statement, ast.Expr):
            expression = ast.Expression(statement.value)
            shown.append(eval(compile(ast.fix_missing_locations(expression), name, "eval"), namespace))
        else:
            exec(compile(ast.Module([statement], type_ignores=[]), name, "exec"), namespace)
    return shown


def assert_codes_solve_the_balanced_problem(res, k: int):
    """codes rows sum to 1 (SwAV's q), and their column sums meet the cluster marginal to the default tol=1e-4
    (the README: "converges to tol=1e-4 (cluster-marginal L1 error)")."""
    codes = res.codes.double()
    assert torch.allclose(codes.sum(dim=1), torch.ones(len(codes), dtype=torch.float64), atol=1e-5)
    marginal_error = (codes.sum(dim=0) / len(codes) - 1 / k).abs().sum().item()
    assert res.converged and res.marginal_error <= 1e-4 and marginal_error <= 1e-4 + 1e-6, marginal_error


def test_first_example_shows_balanced_labels_and_a_faster_warm_start():
    """Block 1 says: codes rows sum to 1, ~100 samples per cluster (10,000 samples, 100 clusters), and the next
    step warm-starts from the last solution (which must then take fewer iterations than a cold start on the same
    scores). The block's two solves are run apart to keep the first result and the perturbed scores."""
    from otlabel import sinkhorn_assign

    source = python_blocks()[0]
    at = source.index("# next training step")
    first, warm = source[:at], source[at:]
    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(first, "README.md python block 1", "exec"), namespace)
    res = namespace["res"]
    assert res.labels.shape == (10_000,) and res.labels.dtype == torch.int64
    assert_codes_solve_the_balanced_problem(res, 100)
    counts = torch.bincount(res.labels, minlength=100)
    assert 90 <= counts.min() and counts.max() <= 110, counts  # "~100 samples per cluster" (seen: 93 to 106)

    torch.manual_seed(1)
    exec(compile(warm, "README.md python block 1 (warm start)", "exec"), namespace)
    warm_res = namespace["res"]
    torch.manual_seed(1)  # the same noise, for a cold start on the same scores
    cold = sinkhorn_assign(namespace["logits"] + 0.01 * torch.randn_like(namespace["logits"]), epsilon=0.05)
    assert_codes_solve_the_balanced_problem(warm_res, 100)
    assert warm_res.n_iter < cold.n_iter, (warm_res.n_iter, cold.n_iter)  # seen: 4 against 11 to 13


def test_features_example_solves_the_scores_problem():
    """Block 2 passes the factors instead of the scores Z @ C.T: the result is that of the scores (same labels,
    codes within float32 rounding) and solves the same balanced problem."""
    from otlabel import sinkhorn_assign

    namespace: dict = {}
    torch.manual_seed(0)
    exec(compile(python_blocks()[1], "README.md python block 2", "exec"), namespace)
    res, z, c = namespace["res"], namespace["Z"], namespace["C"]
    assert_codes_solve_the_balanced_problem(res, len(c))
    scores = sinkhorn_assign(z @ c.T, epsilon=0.05)
    assert (res.labels == scores.labels).float().mean() > 0.999
    assert torch.allclose(res.codes, scores.codes, atol=1e-4), (res.codes - scores.codes).abs().max()


@pytest.fixture
def one_process_group(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_streaming_and_sharding_fragment_runs(tmp_path, monkeypatch, one_process_group):
    monkeypatch.chdir(tmp_path)
    rng = np.random.default_rng(0)
    z = rng.standard_normal((2_000, 16)).astype(np.float32)
    z /= np.linalg.norm(z, axis=1, keepdims=True)
    c = torch.nn.functional.normalize(torch.randn(12, 16, generator=torch.Generator().manual_seed(0)), dim=1)
    np.save("scores.npy", z @ c.numpy().T)
    np.save("emb.npy", z)
    namespace = dict(torch=torch, C=c, local_logits=torch.from_numpy(z) @ c.T, local_z=z)
    exec(compile(python_blocks()[2], "README.md python block 3", "exec"), namespace)
    labels = np.load("labels.npy")  # from the first call (tol 1e-3); the last solves the same problem to 1e-4
    res = namespace["res"]
    assert labels.shape == (2_000,) and res.converged
    agree = (labels == res.labels.numpy()).mean()
    assert agree > 0.98, agree  # the tolerances differ: a few near-ties may flip
    assert np.bincount(labels, minlength=12).min() > 0.8 * 2_000 / 12  # balanced


def test_checking_fragment_shows_what_it_says():
    """Block 4's lines are expressions: their values are checked against what the README says of each."""
    scores = torch.randn(60, 4)
    namespace = dict(scores=scores)
    objective, labels, swav, sela = run_block(3, namespace)
    # exact_assign: "N/K samples per cluster, rounded down or up" (60 / 4 = 15 each)
    assert torch.equal(torch.bincount(labels, minlength=4), torch.full((4,), 15))
    # exact_plan: "unregularised optimum": no plan with the marginals scores more. With N/K whole, the best hard
    # assignment is such a plan and an optimal one (the plan polytope's vertices are whole), so the two agree.
    from otlabel import sinkhorn_assign

    assignment = scores.double().gather(1, labels[:, None]).mean().item()
    assert objective == pytest.approx(assignment, rel=1e-9, abs=1e-12)
    entropic = sinkhorn_assign(scores.double(), epsilon=0.05)
    assert objective >= (entropic.codes * scores.double()).sum().item() / 60 - 1e-12
    # the baselines "give tensors": SwAV's and SeLa's codes, (N, K) rows of 1
    for codes in (swav, sela):
        assert isinstance(codes, torch.Tensor) and codes.shape == (60, 4)
        assert torch.allclose(codes.double().sum(dim=1), torch.ones(60, dtype=torch.float64), atol=1e-5)


def test_streamed_labels_copy_is_described_with_its_exception():
    """The README said labels written to a path come back as a copy in memory, leaving out sinkhorn_assign_stream's
    exception (tested in test_streaming): not when the copy would take more than an eighth of the available memory."""
    from otlabel import sinkhorn_assign_stream

    text = " ".join(README.read_text().split())
    assert "labels written to a path come back as a copy in memory, unless" in text
    assert "more than an eighth of the available memory (then, like codes, as a view of their file)" in text
    assert "more than an eighth of the available memory" in " ".join(sinkhorn_assign_stream.__doc__.split())


def test_the_exact_solvers_example_says_what_to_install():
    """README block 4 calls exact_plan and exact_assign, which need POT and SciPy, which `pip install .` leaves out:
    a user following the README met an ImportError first. The section and the install line name the extra."""
    text = README.read_text()
    section = text.split("### Checking against exact solvers and baselines")[1].split("```python")[0]
    assert "pip install '.[exact]'" in section
    install = " ".join(text.split("## Use")[0].split())
    assert "`.[exact]` adds POT and SciPy" in install
