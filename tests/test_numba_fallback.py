"""The CPU path without Numba: pure PyTorch, where Numba has no wheel for the platform or ``OTLABEL_NUMBA=0``.

``make test`` runs with Numba installed, so the compiled loops of :mod:`otlabel.backends.cpu_kernels` take every CPU
pass there and the fallback would go unchecked. Here a subprocess started with ``OTLABEL_NUMBA=0`` solves a few
problems that reach each of its parts, against the float64 reference: the cached kernel's passes on the caller's
thread and across the worker pool (its products of more than ``MV_SUM_MAX_ROWS`` rows), batched heads, masks with a
zero-weight cluster, a kernel rebuilt as the potentials drift, a cold start that underflows (the exact log-domain
pass), features mode, and streaming from an array and from a ``.npy`` file in chunks; and it refuses bad input in
the same words as with Numba.

The whole suite runs that way too (``OTLABEL_NUMBA=0 python -m pytest``, ~11 min on 2 cores); the tests that count
the compiled passes' operations or call the compiled loops skip there, naming Numba.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

# Run with OTLABEL_NUMBA=0; argv[1] is the tests folder (helpers), argv[2] a scratch folder.
FALLBACK_CHECKS = r"""
import math, re, sys
from pathlib import Path

sys.path.insert(0, sys.argv[1])
import numpy as np
import pytest
import torch
from helpers import assert_close, cosine_scores, random_problem, random_weights

from otlabel import ConvergenceWarning, sinkhorn_assign, sinkhorn_assign_stream
from otlabel.backends import cpu_kernels

assert not cpu_kernels.available(), "OTLABEL_NUMBA=0 left the compiled loops on"
assert "numba" not in sys.modules, "OTLABEL_NUMBA=0 still imported numba"
TOL = 1e-6


def check(what, got, scores, eps, **options):
    want = sinkhorn_assign(torch.as_tensor(scores).double(), eps, backend="reference", tol=1e-11, max_iter=100_000,
                           **options)
    assert got.converged and got.marginal_error < TOL, (what, got.n_iter, got.marginal_error)
    differ = int((got.labels != want.labels).sum())
    assert differ == 0, f"{what}: labels differ from the reference's at {differ} places"
    assert_close(got.codes, want.codes, atol=1e-4, what=f"{what}: codes")  # at most 1.9e-5 apart at tol 1e-6


def dense(scores, eps, **options):
    return sinkhorn_assign(scores, eps, tol=TOL, max_iter=20_000, **options)


s = random_problem(300, 7, seed=1)
check("dense, one thread", dense(s, 0.1), s, 0.1)
s = cosine_scores(3000, 50, seed=2)  # above SERIAL_PASS_ELEMENTS: passes across the pool, 5,120-row products
check("dense, worker pool", dense(s, 0.05), s, 0.05)
s = torch.stack([random_problem(400, 9, seed=seed) for seed in (3, 4, 5)])
check("three heads", dense(s, 0.05), s, 0.05)
s = random_problem(400, 10, seed=6)
s[torch.rand(400, 10, generator=torch.Generator().manual_seed(7)) < 0.3] = -math.inf
s[:, 0] = 0.5  # every sample keeps an allowed cluster
w = random_weights(10, seed=8, zeros=1)  # cluster 0, which every sample may take, has weight 0
check("masks, a zero-weight cluster", dense(s, 0.05, cluster_weights=w), s, 0.05, cluster_weights=w)
s = random_problem(300, 6, seed=10)  # eps 0.002: b drifts out of the kernel's reach, which is rebuilt (10 exp passes)
check("kernel rebuilt", dense(s, 0.002), s, 0.002)
s, w = torch.tensor([[0.0, 10.0], [10.0, 0.0], [9.0, -1.0]]), torch.tensor([0.0, 0.5, 0.5])
check("underflowed cold start", dense(s, 0.05, sample_weights=w), s, 0.05, sample_weights=w)  # the exact pass

z = torch.nn.functional.normalize(torch.randn(500, 16, generator=torch.Generator().manual_seed(11)), dim=1)
c = torch.nn.functional.normalize(torch.randn(12, 16, generator=torch.Generator().manual_seed(12)), dim=1)
got = sinkhorn_assign(features=z, prototypes=c, epsilon=0.05, tol=TOL)
check("features", got, z.double() @ c.double().T, 0.05)

s = random_problem(3000, 20, seed=13)
check("streamed array", sinkhorn_assign_stream(s.numpy(), 0.05, tol=TOL), s, 0.05)
path = Path(sys.argv[2]) / "scores.npy"
np.save(path, s.numpy())
got = sinkhorn_assign_stream(str(path), 0.05, tol=TOL, memory_budget="64K")  # chunks of a few hundred samples
check("streamed .npy, in chunks", got, s, 0.05)

bad = random_problem(50, 4, seed=14)
bad[7, 2] = float("nan")
with pytest.raises(ValueError, match=re.escape("scores contain NaN (first at index (7, 2) of the (N, K) scores)")):
    sinkhorn_assign(bad, 0.05)
with pytest.raises(ValueError, match=re.escape("scores contain NaN (first at index (7, 2)")):
    sinkhorn_assign_stream(bad.numpy(), 0.05)
bad = random_problem(50, 4, seed=14)
bad[5] = -math.inf
with pytest.raises(ValueError, match="infeasible mask: sample 5 .head 0. has every score -inf"):
    sinkhorn_assign(bad, 0.05)
with pytest.warns(ConvergenceWarning, match="did not converge"):
    assert not sinkhorn_assign(random_problem(200, 10, seed=15), 0.01, max_iter=2).converged
print("fallback checked")
"""


def test_the_cpu_path_without_numba_solves_and_refuses_as_with_it(tmp_path):
    env = {**os.environ, "OTLABEL_NUMBA": "0"}
    done = subprocess.run([sys.executable, "-c", FALLBACK_CHECKS, str(Path(__file__).parent), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0 and done.stdout.endswith("fallback checked\n"), done.stderr[-3000:]
