"""The README's Python examples run as written.

Blocks 1 and 2 are whole programs. Blocks 3 and 4 are fragments that name a user's data (``scores.npy``,
``emb.npy``, ``C``, ``local_logits``, ``local_z``, ``scores``) and a process group: the test provides small
versions of those (a one-process Gloo group) and runs the fragment's code unchanged.
"""

from __future__ import annotations

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
    assert "sinkhorn_assign(logits" in blocks[0] and "features=Z" in blocks[1]
    assert "sinkhorn_assign_stream" in blocks[2] and "exact_plan" in blocks[3]


@pytest.mark.parametrize("index", [0, 1])
def test_whole_examples_run(index):
    namespace: dict = {}
    exec(compile(python_blocks()[index], f"README.md python block {index + 1}", "exec"), namespace)
    res = namespace["res"]
    assert res.converged and torch.isfinite(res.codes).all()


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


def test_checking_fragment_runs():
    scores = torch.randn(60, 4)
    namespace = dict(scores=scores)
    exec(compile(python_blocks()[3], "README.md python block 4", "exec"), namespace)


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
