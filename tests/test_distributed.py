"""Sharded == single process: Gloo process groups of 1-4 CPU processes (``torch.multiprocessing`` spawn, a
``file://`` rendezvous in a temporary folder), uneven shards, non-uniform sample weights; each rank checks its
slice of the single-process result, and the parent checks that every rank ran the same iterations.

Spawning costs a torch import per process, so each world size is one spawn that runs every case in turn.
"""

from __future__ import annotations

import contextlib
import os
import time
import warnings
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close, centred, random_problem, random_weights

from otlabel import sinkhorn_assign
from otlabel.distributed import sinkhorn_assign_sharded

N, K, EPS = 203, 7, 0.1
ITERS = 60  # fixed-iteration comparisons: the same arithmetic path length on both sides


def join_group(rank: int, world: int, init_file: str, threads: int | None = 1):
    """Join a spawned test's Gloo group (``file://`` rendezvous, 60 s timeout); ``threads``: torch threads of this
    rank (one by default: the ranks share the machine's cores; ``None`` leaves them as they are)."""
    if threads is not None:
        torch.set_num_threads(threads)
    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    return dist.group.WORLD


@contextlib.contextmanager
def gloo_worker(rank: int, world: int, init_file: str, out_dir: str, threads: int | None = 1):
    """A spawned worker's process group for its body; when the body returns, the ranks meet at a barrier, each
    leaves ``done{rank}`` in ``out_dir`` (what :func:`spawn_workers` checks) and the group is destroyed."""
    group = join_group(rank, world, init_file, threads)
    yield group
    dist.barrier()
    Path(out_dir, f"done{rank}").touch()
    dist.destroy_process_group()


def spawn_workers(worker, tmp_path, world: int = 2, done: bool = True) -> None:
    """``worker(rank, world, init_file, out_dir)`` on ``world`` spawned processes (a rank that raises fails the
    test); with ``done``, every rank must also have left its ``done{rank}`` file (run to its end)."""
    mp.spawn(worker, args=(world, str(tmp_path / "rendezvous"), str(tmp_path)), nprocs=world, join=True)
    if done:
        missing = [r for r in range(world) if not (tmp_path / f"done{r}").exists()]
        assert not missing, f"rank(s) {missing} did not finish their worker"


def shard_bounds(n: int, world: int) -> list[tuple[int, int]]:
    """Deliberately uneven shards: rank r gets a share proportional to r + 1."""
    cuts = np.round(np.cumsum([0] + [r + 1 for r in range(world)]) / sum(range(1, world + 1)) * n).astype(int)
    return [(int(cuts[r]), int(cuts[r + 1])) for r in range(world)]


def cases():
    """(name, full scores, sample weights or None, cluster weights or None, kwargs) — built identically everywhere."""
    return [
        ("uniform-fp32", random_problem(N, K, seed=1), None, None, dict(tol=None, max_iter=ITERS)),
        (
            "weighted-fp64",
            random_problem(N, K, seed=2, dtype=torch.float64),
            random_weights(N, seed=3),
            random_weights(K, seed=4),
            dict(tol=None, max_iter=ITERS),
        ),
        ("heads-fp32", random_problem(N, K, h=2, seed=5), None, None, dict(tol=None, max_iter=ITERS)),
        ("converge", random_problem(N, K, seed=6), random_weights(N, seed=7), None, dict(tol=1e-6, max_iter=2000)),
    ]


D = 12


def feature_cases():
    """(name, features (N, D), prototypes, bias or None, sample weights or None, kwargs) for features mode."""
    g = torch.Generator().manual_seed(11)
    z = torch.nn.functional.normalize(torch.randn(N, D, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(K, D, generator=g), dim=1)
    heads = torch.nn.functional.normalize(torch.randn(2, K, D, generator=g), dim=1)
    bias = 0.1 * torch.randn(K, generator=g)
    return [
        ("features", z, c, bias, None, dict(tol=None, max_iter=ITERS)),
        ("features-heads-weighted", z, heads, None, random_weights(N, seed=12), dict(tol=None, max_iter=ITERS)),
        ("features-converge", z, c, None, None, dict(tol=1e-6, max_iter=2000)),
        ("features-short", z, c, bias, None, dict(tol=None, max_iter=4)),  # for the (interpreted, slow) kernel
    ]


def check_slice(name, res, ref, lo, hi, batched):
    """One rank's result against its slice of the single-process one."""
    labels = ref.labels[..., lo:hi]
    assert torch.equal(res.labels, labels), f"{name}: labels differ at {torch.nonzero(res.labels != labels)[:5]}"
    atol = 1e-9 if ref.codes.dtype == torch.float64 else 2e-4  # potentials are float64 either way: ask the codes
    if ref.n_iter != res.n_iter:  # converged runs may stop one iteration apart: potentials agree up to a constant
        res_b, ref_b = centred(res.cluster_potentials), centred(ref.cluster_potentials)
    else:
        res_b, ref_b = res.cluster_potentials, ref.cluster_potentials
    assert_close(res_b, ref_b, atol=atol, what=f"{name}: potentials ({res.n_iter} vs {ref.n_iter} iterations)")
    assert_close(res.codes, ref.codes[..., lo:hi, :], atol=1e-5, what=f"{name}: codes")


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    group = join_group(rank, world, init_file)
    lo, hi = shard_bounds(N, world)[rank]
    record = {}
    for name, scores, c, r, kw in cases():
        ref = torch.load(os.path.join(out_dir, f"ref-{name}.pt"), weights_only=False)
        local = scores[..., lo:hi, :]
        res = sinkhorn_assign_sharded(
            local, EPS, group=group, sample_weights=None if c is None else c[lo:hi], cluster_weights=r, timeout=30, **kw
        )
        check_slice(name, res, ref, lo, hi, scores.ndim == 3)
        objective = res.objective  # a collective: every rank reads it
        assert_close(objective, ref.objective, atol=1e-6, what=f"{name}: objective")
        record[name] = (res.n_iter, res.converged, res.errors)
    record["perturbed-mixing"] = perturbed_mixing_on_rank_one(rank, group, lo, hi)
    for name, z, c, bias, w, kw in feature_cases():
        ref = torch.load(os.path.join(out_dir, f"ref-{name}.pt"), weights_only=False)
        weights = None if w is None else w[lo:hi]
        res = sinkhorn_assign_sharded(
            features=z[lo:hi], prototypes=c, bias=bias, epsilon=EPS, group=group, sample_weights=weights, **kw
        )
        check_slice(name, res, ref, lo, hi, c.ndim == 3)
        record[name] = (res.n_iter, res.converged, res.errors)
    # Features from this rank's .npy on disk (memory-mapped, streamed), and through the Triton kernel (interpreted).
    name, z, c, bias, _, kw = feature_cases()[0]
    ref = torch.load(os.path.join(out_dir, f"ref-{name}.pt"), weights_only=False)
    path = os.path.join(out_dir, f"features-rank{rank}.npy")
    np.save(path, z[lo:hi].numpy())
    on_disk = sinkhorn_assign_sharded(features=path, prototypes=c, bias=bias, epsilon=EPS, group=group, **kw)
    check_slice("features from .npy", on_disk, ref, lo, hi, False)
    name, z, c, bias, _, kw = feature_cases()[3]
    ref = torch.load(os.path.join(out_dir, f"ref-{name}.pt"), weights_only=False)
    kernel = sinkhorn_assign_sharded(
        features=z[lo:hi], prototypes=c, bias=bias, epsilon=EPS, group=group, backend="triton", **kw
    )
    check_slice("features through the kernel", kernel, ref, lo, hi, False)
    # Equal prototypes must agree whatever each rank's thread count (a float sum would not: it splits by threads).
    big = torch.nn.functional.normalize(torch.randn(1000, D, generator=torch.Generator().manual_seed(5)), dim=1)
    threads = torch.get_num_threads()
    torch.set_num_threads(rank + 1)
    try:
        sinkhorn_assign_sharded(features=z[lo:hi], prototypes=big, epsilon=EPS, group=group, tol=None, max_iter=2)
    finally:
        torch.set_num_threads(threads)
    # A rank that fails while building its operator (after the input checks): every rank raises, none waits.
    from otlabel import distributed

    build = distributed.FeatureShard.operator

    def out_of_memory(self, *args):
        raise MemoryError("out of memory (simulated)")  # not a ValueError/RuntimeError: still shared

    distributed.FeatureShard.operator = out_of_memory if rank == 0 else build
    try:
        error, expected = (MemoryError, "out of memory") if rank == 0 else (RuntimeError, "rank\\(s\\) \\[0\\] failed")
        with pytest.raises(error, match=expected):
            sinkhorn_assign_sharded(features=z[lo:hi], prototypes=c, epsilon=EPS, group=group, timeout=30)
    finally:
        distributed.FeatureShard.operator = build
    # The same for a failure in the first, local checks (opening a shard): an OSError, say, from a file.
    open_shard = distributed.open_shard

    def unreadable(*args, **kwargs):
        raise OSError("disk went away (simulated)")

    distributed.open_shard = unreadable if rank == world - 1 else open_shard
    try:
        error, expected = (OSError, "disk") if rank == world - 1 else (ValueError, "rejected their input")
        with pytest.raises(error, match=expected):
            sinkhorn_assign_sharded(features=z[lo:hi], prototypes=c, epsilon=EPS, group=group, timeout=30)
    finally:
        distributed.open_shard = open_shard
    # Ranks with different score dtypes: refused on every rank, with the dtypes by name.
    half = random_problem(3, K).to(torch.float16 if rank == 0 else torch.float32)
    with pytest.raises(ValueError, match="disagree on the scores dtype \\(rank 0: float16, rank 1: float32"):
        sinkhorn_assign_sharded(half, EPS, group=group, timeout=30)
    # The same for features, named as features (they were called "the scores dtype").
    half = z[lo:hi].to(torch.float16 if rank == 0 else torch.float32)
    with pytest.raises(ValueError, match="disagree on the features dtype \\(rank 0: float16, rank 1: float32.*pass "
                       "features of one dtype"):  # fmt: skip
        sinkhorn_assign_sharded(features=half, prototypes=c, epsilon=EPS, group=group, timeout=30)
    # Different prototypes on one rank, scores on one rank and features on the others, NaN features: all raise.
    nudged = c + (1e-3 if rank == world - 1 else 0.0)
    with pytest.raises(ValueError, match="prototypes or bias differ between ranks"):
        sinkhorn_assign_sharded(features=z[lo:hi], prototypes=nudged, epsilon=EPS, group=group, timeout=30)
    mixed = dict(scores=z[lo:hi] @ c.T) if rank == 0 else dict(features=z[lo:hi], prototypes=c)
    with pytest.raises(ValueError, match="disagree on the input"):
        sinkhorn_assign_sharded(**mixed, epsilon=EPS, group=group, timeout=30)
    bad = z[lo:hi].clone()
    if rank == world - 1:
        bad[2, 3] = float("nan")
    expected = "features contain NaN or inf \\(first in row 2\\)" if rank == world - 1 else "rejected their input"
    with pytest.raises(ValueError, match=expected):
        sinkhorn_assign_sharded(features=bad, prototypes=c, epsilon=EPS, group=group, timeout=30)
    # K mismatch: every rank raises (no hang), and the group stays usable afterwards.
    bad = torch.randn(3, K + (rank == world - 1))
    with pytest.raises(ValueError, match="disagree on the number of clusters K"):
        sinkhorn_assign_sharded(bad, EPS, group=group, timeout=30)
    # One rank with NaN: every rank raises.
    nan = torch.randn(3, K)
    if rank == 0:
        nan[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN" if rank == 0 else "rank\\(s\\) \\[0\\] rejected"):
        sinkhorn_assign_sharded(nan, EPS, group=group, timeout=30)
    # A mask no balanced plan can respect, visible only over all ranks (Hall's condition): only sample 0 (on rank 0)
    # may go to clusters 0 and 1, which need 2/7 of the mass. Every rank raises the same error; with those clusters'
    # weights lowered to what sample 0 carries (split in two), every rank solves.
    full = random_problem(N, K, seed=21)
    full[1:, :2] = -float("inf")
    with pytest.raises(ValueError, match=r"infeasible mask: clusters \[0, 1\] need 0.286 of the mass"):
        sinkhorn_assign_sharded(full[lo:hi], EPS, group=group, timeout=30, tol=None, max_iter=3)
    weights = torch.full((K,), (1 - 1 / N) / (K - 2), dtype=torch.float64)
    weights[:2] = 0.5 / N
    fine = sinkhorn_assign_sharded(full[lo:hi], EPS, group=group, cluster_weights=weights, timeout=30)
    assert fine.converged
    # A rank failing inside the mask check (out of memory, say), in its sums or in its verdict: every rank raises at
    # once, that rank its own error, the others one naming it (they used to wait out the timeout in the solve).
    from otlabel import feasibility

    for step in ("hot_sums", "check_feasible"):
        original = getattr(feasibility, step)

        def out_of_memory(*args, step=step, **kwargs):
            raise MemoryError(f"out of memory in {step} (simulated)")

        setattr(feasibility, step, out_of_memory if rank == 0 else original)
        try:
            error, expected = (MemoryError, "simulated") if rank == 0 else (RuntimeError, r"rank\(s\) \[0\] failed")
            with pytest.raises(error, match=expected):
                sinkhorn_assign_sharded(full[lo:hi], EPS, group=group, cluster_weights=weights, timeout=30)
        finally:
            setattr(feasibility, step, original)
    torch.save(record, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    # A rank that never calls: the others raise after the timeout instead of hanging. (Last: the group is
    # then left with a pending collective.) The other ranks stay alive meanwhile: had they exited, rank 0 would see
    # their connections close at once (the error then comes after ~0.1 s, without the hint to raise the timeout).
    if rank == 0:
        gave_up = r"gave up on the all-gather of the checks after [0-9.]+ s \(timeout=2\).* Raise timeout= if one"
        with pytest.raises(RuntimeError, match=gave_up):
            sinkhorn_assign_sharded(random_problem(5, K), EPS, group=group, timeout=2)
        with open(os.path.join(out_dir, "timeout-ok"), "w"):
            pass
    else:  # until rank 0 is through (a fixed 4 s left it 2 s of margin on a loaded machine), at most 60 s
        waited_until = time.monotonic() + 60
        while not os.path.exists(os.path.join(out_dir, "timeout-ok")) and time.monotonic() < waited_until:
            time.sleep(0.05)
    os._exit(0)  # no destroy_process_group: rank 0 has a collective pending that will never complete


def perturbed_mixing_on_rank_one(rank, group, lo, hi):
    """Hardware whose linear solves round differently: rank 1's Anderson proposals are nudged by ~1e-4 nats.

    Every rank must still continue from the same iterate (rank 0's), so all end with identical potentials and
    iteration counts; without that the error trajectories split and the ranks would wait on each other.
    """
    from otlabel.anderson import AndersonMixer

    _, scores, c, _, kw = cases()[3]  # the converging case, default (Anderson) acceleration
    step = AndersonMixer.step

    def nudged(self, b, b_new, error, empty):
        out = step(self, b, b_new, error, empty)
        return out + 1e-4 * torch.randn(out.shape, dtype=out.dtype) if rank == 1 else out

    AndersonMixer.step = nudged
    try:
        res = sinkhorn_assign_sharded(scores[lo:hi], EPS, group=group, sample_weights=c[lo:hi], timeout=30, **kw)
    finally:
        AndersonMixer.step = step
    everyone = [torch.empty_like(res.cluster_potentials) for _ in range(dist.get_world_size(group))]
    dist.all_gather(everyone, res.cluster_potentials, group=group)
    assert all(torch.equal(b, everyone[0]) for b in everyone), "ranks ended with different potentials"
    assert res.converged
    return (res.n_iter, res.converged, res.errors)


def reference_results(out_dir: str) -> None:
    for name, scores, c, r, kw in cases():
        ref = sinkhorn_assign(scores, EPS, sample_weights=c, cluster_weights=r, **kw)
        _ = ref.codes, ref.objective  # computed now, saved with it
        ref._operator = None
        torch.save(ref, os.path.join(out_dir, f"ref-{name}.pt"))
    for name, z, c, bias, w, kw in feature_cases():
        ref = sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=EPS, sample_weights=w, **kw)
        _ = ref.codes, ref.objective
        ref._operator = None
        torch.save(ref, os.path.join(out_dir, f"ref-{name}.pt"))


@pytest.mark.interpreter  # some cases run backend="triton" on CPU tensors
@pytest.mark.parametrize("world", [2, 3, 4])
def test_sharded_matches_single_process(world, tmp_path):
    reference_results(str(tmp_path))
    spawn_workers(_worker, tmp_path, world, done=False)  # no done files: it ends in os._exit, see there
    records = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name in records[0]:
        per_rank = [rec[name] for rec in records]
        assert all(p == per_rank[0] for p in per_rank), f"{name}: ranks disagree on (n_iter, converged, errors)"
    n_iter, converged, _ = records[0]["converge"]
    assert converged and n_iter > 5
    assert (tmp_path / "timeout-ok").exists(), "rank 0 did not time out cleanly"


def test_world_size_one_and_no_group():
    """group=None and a one-process group take the same path as a single-process solve (no collectives)."""
    scores, c = random_problem(N, K, seed=1), random_weights(N, seed=3)
    ref = sinkhorn_assign(scores, EPS, sample_weights=c, tol=None, max_iter=ITERS)
    res = sinkhorn_assign_sharded(scores, EPS, sample_weights=c, tol=None, max_iter=ITERS)
    assert torch.equal(res.labels, ref.labels)
    assert_close(res.cluster_potentials, ref.cluster_potentials, atol=1e-6, what="potentials")
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/rdv", rank=0, world_size=1)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # world size 1: no "group=None" warning either
                one = sinkhorn_assign_sharded(
                    scores, EPS, group=dist.group.WORLD, sample_weights=c, tol=None, max_iter=ITERS
                )
        finally:
            dist.destroy_process_group()
    assert torch.equal(one.labels, ref.labels)
    assert torch.equal(one.cluster_potentials, res.cluster_potentials)


def test_group_world_before_init_process_group_warns_under_a_launcher(monkeypatch):
    """``torch.distributed.group.WORLD`` is None before ``init_process_group()`` (and after
    ``destroy_process_group()``), so passing it then is ``group=None``: each rank solved its own samples alone, without
    a word, although the launcher (torchrun sets WORLD_SIZE) started several ranks. It warns now, saying what to do."""
    assert not dist.is_initialized() and dist.group.WORLD is None
    scores = random_problem(20, 3, seed=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.warns(UserWarning, match=r"not initialised.*WORLD_SIZE=2.*init_process_group\(\) first"):
        res = sinkhorn_assign_sharded(scores, EPS, group=dist.group.WORLD)
    assert res.labels.shape == (20,)  # still this rank's solve, as documented for group=None
    for quiet in ("1", "not a number"):  # one process, or a variable that is not the launcher's: no warning
        monkeypatch.setenv("WORLD_SIZE", quiet)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sinkhorn_assign_sharded(scores, EPS)


def test_sharded_cpu_solve_keeps_float64_potentials():
    """The sharded operator hands the CPU kernel operator the loop's float64 potentials, as a single-process solve
    does: at eps = 0.002 rounding them to float32 every iteration (|b| ~ 85) floored the error at ~3.6e-6, and the
    sharded solve ran its 3000 iterations without reaching tol = 1e-6 where the single-process one took 346."""
    scores = torch.randn(2000, 50, generator=torch.Generator().manual_seed(0))
    ref = sinkhorn_assign(scores, 0.002, tol=1e-6, max_iter=3000)
    res = sinkhorn_assign_sharded(scores, 0.002, tol=1e-6, max_iter=3000)
    assert ref.converged and res.converged and res.n_iter == ref.n_iter
    assert torch.equal(res.cluster_potentials, ref.cluster_potentials)


def _one_bad_rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Arguments refused on one rank only, each raised on every rank at once (a regression waits out timeout=10)."""
    with gloo_worker(rank, world, init_file, out_dir) as group:
        bad = rank == world - 1
        scores = random_problem(4, K, seed=rank)
        others = "rank\\(s\\) \\[1\\] rejected their input"
        # Checked before the first collective, these raised on the bad rank alone and left the others waiting.
        with pytest.raises(ValueError, match="timeout must be a positive number" if bad else others):
            sinkhorn_assign_sharded(scores, EPS, group=group, timeout=-1 if bad else 10)
        with pytest.raises(ValueError, match="give scores= only" if bad else others):
            sinkhorn_assign_sharded(scores, EPS, group=group, timeout=10, local_scores=scores if bad else None)
        # An epsilon that differs only beyond 6 digits (a float32 tensor's 0.1 against 0.1): the message shows both.
        epsilon = torch.tensor(EPS) if bad else EPS
        with pytest.raises(ValueError, match=r"disagree on epsilon \(rank 0: 0.1, rank 1: 0.10000000149011612\)"):
            sinkhorn_assign_sharded(scores, epsilon, group=group, timeout=10)
        # Every other argument the ranks must agree on, different on one rank: every rank raises, naming both values
        # (a rank that ran other iterations, heads or weights would wait for the others, or solve another problem).
        disagreements = [
            ("the number of heads H", "2, rank 1: 3", dict(scores=random_problem(4, K, h=3 if bad else 2))),
            ("batched \\(3-d\\) scores", "2-d, rank 1: 3-d", dict(scores=scores[None] if bad else scores)),
            ("tol", "1e-06, rank 1: 1e-05", dict(tol=1e-5 if bad else 1e-6)),
            ("max_iter", "10, rank 1: 11", dict(max_iter=11 if bad else 10, tol=None)),
            ("acceleration \\(or over_relaxation\\)", "'auto', rank 1: over_relaxation=1.5",
             dict(over_relaxation=1.5 if bad else None)),
            ("whether sample_weights are given", "no, rank 1: yes",
             dict(sample_weights=torch.full((4,), 0.125) if bad else None)),
            ("whether init is given", "no, rank 1: yes", dict(init=torch.zeros(K) if bad else None)),
        ]  # fmt: skip
        for what, values, kw in disagreements:
            with pytest.raises(ValueError, match=f"the ranks disagree on {what} \\(rank 0: {values}\\)"):
                sinkhorn_assign_sharded(**{"scores": scores, **kw}, epsilon=EPS, group=group, timeout=10)
        # Both give a warm start, a different one: refused, by how much. (A constant shift is the same start.)
        with pytest.raises(ValueError, match=r"init differ between ranks \(by up to 0.001;"):
            sinkhorn_assign_sharded(scores, EPS, group=group, timeout=10, init=-1e-3 * bad * (torch.arange(K) == 0))
        # Both give sample weights, 1.5e-4 over 1 in all: refused on every rank. Each rank may be off by 1e-4
        # (weight_sum_tolerance), but the allowance is the largest rank's, not the sum of them.
        over = torch.full((4,), (1 + 1.5e-4) / 8, dtype=torch.float64)
        with pytest.raises(ValueError, match="sum to 1 over all ranks, got a sum of 1.00015"):
            sinkhorn_assign_sharded(scores, EPS, group=group, timeout=10, sample_weights=over)
        # A cluster far below the rest: too far for float32, not for the float64 reference backend on rank 1. The column
        # check judges in the narrowest arithmetic of any rank, so both raise (rank 1 used to wait in the mask check).
        far = scores.clone()
        far[:, 0] -= 1000
        with pytest.raises(ValueError, match=r"epsilon reach .* \(cluster 0, head 0: its best score -99\d, epsilon"):
            sinkhorn_assign_sharded(far, EPS, group=group, timeout=10, backend="reference" if bad else "torch")
        # The same cluster weights in float32 on one rank: refused, saying by how much and why.
        weights = torch.arange(1.0, K + 1, dtype=torch.float32 if bad else torch.float64)
        differ = r"cluster_weights differ between ranks \(by up to [0-9.e-]+; the same values"
        with pytest.raises(ValueError, match=differ):
            sinkhorn_assign_sharded(scores, EPS, group=group, timeout=10, cluster_weights=weights / weights.sum())
        # Features through the float64 reference on one rank: the same solve (it was refused as a scores-dtype
        # disagreement, the reference rank having turned its features into float64 scores).
        z = torch.nn.functional.normalize(torch.randn(40, 5, generator=torch.Generator().manual_seed(rank)), dim=1)
        c = torch.nn.functional.normalize(torch.randn(K, 5, generator=torch.Generator().manual_seed(9)), dim=1)
        mixed = sinkhorn_assign_sharded(features=z, prototypes=c, epsilon=EPS, group=group, timeout=10, tol=1e-6,
                                        backend="reference" if bad else "torch")  # fmt: skip
        same = sinkhorn_assign_sharded(features=z, prototypes=c, epsilon=EPS, group=group, timeout=10, tol=1e-6)
        assert mixed.converged and torch.equal(mixed.labels, same.labels)
        assert_close(mixed.codes.float(), same.codes, atol=1e-5, what="codes of a rank on the reference backend")
        # A bias that differs on one rank: refused like different prototypes (the fingerprint covers both).
        with pytest.raises(ValueError, match="prototypes or bias differ between ranks"):
            sinkhorn_assign_sharded(features=z, prototypes=c, bias=torch.zeros(K) + 1e-3 * bad, epsilon=EPS,
                                    group=group, timeout=10)  # fmt: skip
        # The far cluster on rank 0 only: over all ranks its column reaches the others, so this is a problem like any
        # other (judged on the column maxima of every rank, not of one): the single-process solve's slice (float32
        # partial sums per rank: potentials measured 7.7e-7 apart).
        shards = [random_problem(4, K, seed=0), random_problem(4, K, seed=1)]  # each rank's `scores`
        shards[0][:, 0] -= 1000
        whole = sinkhorn_assign(torch.cat(shards), EPS, tol=None, max_iter=20)
        res = sinkhorn_assign_sharded(shards[rank], EPS, group=group, timeout=10, tol=None, max_iter=20)
        assert torch.equal(res.labels, whole.labels[4 * rank : 4 * rank + 4])
        assert_close(res.cluster_potentials, whole.cluster_potentials, atol=5e-6, what="far cluster on rank 0 only")
        # Sample weights in float32 on one rank only, whose 3 samples may only go to cluster 0 (weight 0.3): their
        # rounding makes them 3e-9 too heavy for it. Every rank allows that rounding (agreed in the metadata); a rank
        # judging by its own float64 weights alone refused the mask while the other accepted it.
        tight = torch.zeros(3, 2) if bad else torch.randn(4, 2, generator=torch.Generator().manual_seed(5))
        if bad:
            tight[:, 1] = -float("inf")
        w = torch.full((3,), 0.1) if bad else torch.full((4,), 0.175, dtype=torch.float64)
        res = sinkhorn_assign_sharded(tight, EPS, group=group, timeout=10, sample_weights=w, tol=1e-6,
                                      cluster_weights=torch.tensor([0.3, 0.7], dtype=torch.float64))  # fmt: skip
        assert res.converged and (not bad or bool((res.labels == 0).all()))
        # A rank left out of a subgroup is told so (new_group gives it a placeholder, not a group).
        subgroup = dist.new_group([0])
        if bad:
            with pytest.raises(ValueError, match="rank 1 is not a member of this process group"):
                sinkhorn_assign_sharded(scores, EPS, group=subgroup, timeout=10)


def test_arguments_refused_on_one_rank_fail_every_rank(tmp_path):
    spawn_workers(_one_bad_rank_worker, tmp_path)


def _subgroup_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """A subgroup of global ranks 1 and 2 (their group ranks are 0 and 1), rank 0 left out: the errors name the ranks
    by their global numbers, which are the ones a user knows (a message on rank 1 saying "rank 1: 5" where rank 2 had
    passed K = 5 sent it looking at its own input)."""
    with gloo_worker(rank, world, init_file, out_dir):
        subgroup = dist.new_group([1, 2])
        if rank == 0:
            return
        shards = [random_problem(6, K, seed=1), random_problem(9, K, seed=2)]
        whole = sinkhorn_assign(torch.cat(shards), EPS, tol=1e-6)
        res = sinkhorn_assign_sharded(shards[rank - 1], EPS, group=subgroup, timeout=10, tol=1e-6)
        assert torch.equal(res.labels, whole.labels[:6] if rank == 1 else whole.labels[6:])
        bad = rank == 2
        with pytest.raises(ValueError, match=r"disagree on the number of clusters K .*\(rank 1: 7, rank 2: 8\)"):
            sinkhorn_assign_sharded(random_problem(4, K + bad), EPS, group=subgroup, timeout=10)
        nan = random_problem(4, K)
        nan[1, 2] = float("nan") if bad else 0.0
        expected = r"scores contain NaN .* of rank 2's shard" if bad else r"rank\(s\) \[2\] rejected their input"
        with pytest.raises(ValueError, match=expected):
            sinkhorn_assign_sharded(nan, EPS, group=subgroup, timeout=10)

        def stop(it, err):
            raise CallbackStop("stop")

        error, expected = (CallbackStop, "stop") if bad else (RuntimeError, r"callback raised on rank\(s\) \[2\]")
        with pytest.raises(error, match=expected):
            sinkhorn_assign_sharded(nan.nan_to_num(), EPS, group=subgroup, timeout=10, callback=stop if bad else None)


def _default_group_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Under an initialised process group, group=None is the default group, as in torch.distributed's collectives:
    each rank solved its own samples alone, with only a warning (23 and 26 iterations on two ranks of a torchrun
    script), so the labels were not the balanced assignment of all samples."""
    with gloo_worker(rank, world, init_file, out_dir):
        shards = [random_problem(30, K, seed=1), random_problem(50, K, seed=2)]
        # Anderson mixing from the first step, as the ranks' solve takes it ("auto" starts a problem this small in one
        # process with compiled plain steps; steps that exchange with other ranks are not compiled)
        whole = sinkhorn_assign(torch.cat(shards), EPS, tol=1e-6, acceleration="anderson")
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            res = sinkhorn_assign_sharded(shards[rank], EPS, timeout=10, tol=1e-6)
        assert torch.equal(res.labels, whole.labels[:30] if rank == 0 else whole.labels[30:])
        assert res.converged and abs(res.n_iter - whole.n_iter) <= 2  # sums in another order: rounding near tol


def _empty_rank_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """A rank with no samples (10 samples over many ranks) got the single-process words, "scores is empty ... there
    must be at least one sample", which did not say it was this rank's shard or what to do."""
    with gloo_worker(rank, world, init_file, out_dir):
        for name in ("scores", "features"):
            local = torch.randn(0 if rank == 1 else 10, 4)
            data = dict(scores=local) if name == "scores" else dict(features=local, prototypes=torch.randn(3, 4))
            said = (rf"rank 1's {name} have no samples \(shape \(0, 4\)\): .* DistributedSampler" if rank == 1
                    else r"rank\(s\) \[1\] rejected their input")  # fmt: skip
            with pytest.raises(ValueError, match=said):
                sinkhorn_assign_sharded(**data, epsilon=0.1, timeout=10)


def test_a_rank_without_samples_is_told_so(tmp_path):
    spawn_workers(_empty_rank_worker, tmp_path, world=2)


def test_group_none_is_the_default_group_once_initialised(tmp_path):
    spawn_workers(_default_group_worker, tmp_path, world=2)


def test_errors_in_a_subgroup_name_global_ranks(tmp_path):
    spawn_workers(_subgroup_worker, tmp_path, world=3)


class CallbackStop(Exception):
    """A user's exception, raised by a callback (say, a progress bar asked to stop)."""


def _callback_raises_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """A callback that raises on one rank stops every rank at the next exchange; the other ranks hear which rank.
    Rank 0 has no callback (a progress bar on one rank only), so it never reads an error itself. Before, rank 0
    waited out timeout=10 and raised 'gave up on the all-gather', which the matches below refuse."""
    with gloo_worker(rank, world, init_file, out_dir) as group:
        scores = random_problem(30, K, seed=rank)
        calls = []

        def stop_at(iteration):
            def callback(it, err):
                calls.append(it)
                if it == iteration:
                    raise CallbackStop(f"stop at {it}")

            return callback

        others = r"the callback raised on rank\(s\) \[1\]"
        for tol, stop in [(None, 3), (1e-6, 3), (None, 5)]:  # mid-solve, mid-solve with a tol, the last iteration
            calls.clear()
            error, words = (CallbackStop, f"stop at {stop}") if rank == 1 else (RuntimeError, others)
            with pytest.raises(error, match=words):
                sinkhorn_assign_sharded(scores, EPS, group=group, timeout=10, tol=tol, max_iter=5,
                                        callback=stop_at(stop) if rank == 1 else None)  # fmt: skip
            assert calls == (list(range(1, stop + 1)) if rank == 1 else [])  # not called again once it raised
        # Both ranks' callbacks raise: each rank raises its own.
        with pytest.raises(CallbackStop, match="stop at 2"):
            sinkhorn_assign_sharded(scores, EPS, group=group, timeout=10, max_iter=5, callback=stop_at(2))
        # A callback that returns on rank 0 only changes nothing.
        seen = []
        res = sinkhorn_assign_sharded(scores, EPS, group=group, timeout=10, max_iter=500,
                                      callback=(lambda it, err: seen.append(err)) if rank == 0 else None)  # fmt: skip
        plain = sinkhorn_assign_sharded(scores, EPS, group=group, timeout=10, max_iter=500)
        assert res.converged and torch.equal(res.cluster_potentials, plain.cluster_potentials)
        assert seen == (res.errors if rank == 0 else [])


def test_a_callback_that_raises_on_one_rank_stops_every_rank(tmp_path):
    spawn_workers(_callback_raises_worker, tmp_path)


def test_a_callback_failure_leaves_no_reference_cycle():
    """The operator held the callback's exception, whose traceback held the operator: a cycle that kept the process
    group alive until a garbage collection. Left for the interpreter's exit, Gloo's threads were destroyed late and
    a rank aborted (SIGABRT) in about 1 of 10 runs of the spawned test above. Now nothing is left to collect."""
    import gc

    from otlabel.distributed import ShardedOperator

    def stop_at_2(it, err):
        if it == 2:
            raise CallbackStop("stop")

    gc.collect()
    gc.disable()
    try:
        with pytest.raises(CallbackStop):
            sinkhorn_assign_sharded(random_problem(30, K, seed=0), EPS, max_iter=5, tol=None, callback=stop_at_2)
        assert not [o for o in gc.get_objects() if type(o) is ShardedOperator]  # (isinstance wakes deprecated proxies)
    finally:
        gc.enable()


def test_a_shared_input_error_leaves_no_reference_cycle():
    """The input errors a rank shares before raising (its own checks, a failed all_gather_or_fail) were kept in a
    variable of frames that the error's traceback holds: a cycle that kept those frames, and the process group among
    their arguments, alive until a garbage collection (the abort at exit above)."""
    import gc
    import types

    from otlabel.distributed import Collectives

    names = ("sinkhorn_assign_sharded", "solve_shards", "all_gather_or_fail")

    def frames_left():
        return [o.f_code.co_name for o in gc.get_objects() if type(o) is types.FrameType and o.f_code.co_name in names]

    def boom():
        raise MemoryError("out of memory")

    gc.collect()
    gc.disable()
    try:
        with pytest.raises(ValueError, match="timeout must be a positive number"):
            sinkhorn_assign_sharded(random_problem(30, K, seed=0), EPS, timeout=-1)
        assert not frames_left()
        with pytest.raises(MemoryError):
            Collectives(None, 10.0).all_gather_or_fail(boom, 3, "column maxima")
        assert not frames_left()
    finally:
        gc.enable()


def _result_outlives_group_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    import gc
    import weakref

    group = weakref.ref(join_group(rank, world, init_file))
    scores = random_problem(N, K, seed=4)
    lo, hi = shard_bounds(N, world)[rank]
    res = sinkhorn_assign_sharded(scores[lo:hi], EPS, group=group(), tol=None, max_iter=5)
    dist.destroy_process_group()
    gc.collect()
    assert group() is None, "the result kept the destroyed process group alive"
    local_passes, local_score = [], res._operator.local.transport_score
    res._operator.local.transport_score = lambda b: local_passes.append(b) or local_score(b)
    with pytest.raises(RuntimeError, match="process group of this solve was destroyed"):
        _ = res.objective
    assert not local_passes, "objective read this rank's scores (a whole streamed pass) before saying it cannot run"
    assert res.labels.shape == (hi - lo,)  # the local read-outs still work
    Path(out_dir, f"done{rank}").touch()


def test_a_result_does_not_keep_its_process_group_alive(tmp_path):
    """A result kept past destroy_process_group() (a script's global) held the Gloo group until the interpreter's
    exit, which destroyed its threads late: a rank aborted (SIGABRT) in ~1 of 6 torchrun runs. The result holds it
    weakly; its one collective read-out, ``objective``, then says why it cannot run."""
    spawn_workers(_result_outlives_group_worker, tmp_path)


def test_sharded_warm_start_is_not_rounded_to_float32():
    """init= reaches the loop in float64, as in sinkhorn_assign: on float32 scores it was rounded to float32 first
    (|b| ~ 5: 2e-7), so a warm-started solve of one rank differed from the single-process one (13 iterations
    against 14 in one case), where every cold-started solve agrees bitwise."""
    scores = random_problem(57, 6, seed=12)
    init = sinkhorn_assign(scores, 0.05, tol=1e-4).cluster_potentials + 1e-3 * torch.arange(6)  # not float32-exact
    assert not torch.equal(init.float().double(), init)
    for kw in (dict(tol=None, max_iter=3), dict(tol=1e-6)):
        ref = sinkhorn_assign(scores, 0.05, init=init, **kw)
        res = sinkhorn_assign_sharded(scores, 0.05, init=init, **kw)
        assert res.n_iter == ref.n_iter and torch.equal(res.cluster_potentials, ref.cluster_potentials), kw


def test_local_errors_without_group():
    with pytest.raises(ValueError, match="sample_weights must have shape"):
        sinkhorn_assign_sharded(torch.randn(5, 3), EPS, sample_weights=torch.ones(4) / 4)
    with pytest.raises(ValueError, match="sum to 1 over all ranks"):
        sinkhorn_assign_sharded(torch.randn(5, 3), EPS, sample_weights=torch.ones(5))
    for bad in (-1e-3, float("nan")):  # a negative weight that the sum alone would not show, a NaN
        w = torch.tensor([0.2, 0.2, 0.2, 0.4 - bad, bad], dtype=torch.float64)
        with pytest.raises(ValueError, match="sample_weights must be finite and non-negative"):
            sinkhorn_assign_sharded(torch.randn(5, 3), EPS, sample_weights=w)
    with pytest.raises(ValueError, match="backend must be one of"):
        sinkhorn_assign_sharded(torch.randn(5, 3), EPS, backend="nope")
    with pytest.raises(ValueError, match=r"init must have shape \(3,\)"):
        sinkhorn_assign_sharded(torch.randn(5, 3), EPS, init=torch.zeros(4))
    with pytest.raises(ValueError, match="sample 1 .* of rank 0's shard has every score -inf"):
        s = torch.randn(4, 3)
        s[1] = float("-inf")
        sinkhorn_assign_sharded(s, EPS)


@pytest.mark.interpreter  # its last check runs backend="triton" on CPU tensors
def test_features_without_group_and_their_errors():
    name, z, c, bias, _, kw = feature_cases()[0]
    ref = sinkhorn_assign(features=z, prototypes=c, bias=bias, epsilon=EPS, **kw)
    res = sinkhorn_assign_sharded(features=z.numpy(), prototypes=c, bias=bias, epsilon=EPS, **kw)
    assert torch.equal(res.labels, ref.labels)
    assert_close(res.cluster_potentials, ref.cluster_potentials, atol=1e-6, what="potentials")
    with pytest.raises(ValueError, match="needs prototypes"):
        sinkhorn_assign_sharded(features=z, epsilon=EPS)
    with pytest.raises(ValueError, match="not both"):
        sinkhorn_assign_sharded(z @ c.T, features=z, prototypes=c)
    with pytest.raises(ValueError, match="go with features"):
        sinkhorn_assign_sharded(z @ c.T, prototypes=c)
    with pytest.raises(ValueError, match="positive weight has bias -inf"):
        closed = bias.clone()
        closed[0] = float("-inf")
        sinkhorn_assign_sharded(features=z, prototypes=c, bias=closed)
    closed_ok = sinkhorn_assign_sharded(
        features=z, prototypes=c, bias=closed, cluster_weights=torch.tensor([0.0] + [1 / (K - 1)] * (K - 1))
    )
    assert not bool((closed_ok.labels == 0).any())
    with pytest.raises(FileNotFoundError, match="does not exist"):
        sinkhorn_assign_sharded(features="/nonexistent/features.npy", prototypes=c)
    heads = torch.stack([c, c])
    for run in (sinkhorn_assign, sinkhorn_assign_sharded):  # the kernel path checks the bias shape up front too
        with pytest.raises(ValueError, match="bias must have shape"):
            run(features=z, prototypes=heads, bias=bias[None], backend="triton", max_iter=2, tol=None)


def test_big_endian_features_are_read_a_block_at_a_time(tmp_path, monkeypatch):
    """A sharded features solve from a big-endian file (refused before) gives the little-endian file's result bit for
    bit, and never converts the features whole: the finite check took them as one (N, D) tensor, which for big-endian
    ones was a copy of the whole file. N is above the check's 65,536-row blocks."""
    from otlabel.inputs import SwappedArray

    rng = np.random.default_rng(4)
    n = 70_000
    z, c = rng.standard_normal((n, 4)).astype(np.float32), rng.standard_normal((K, 4)).astype(np.float32)
    np.save(tmp_path / "little.npy", z)
    np.save(tmp_path / "big.npy", z.astype(">f4"))
    read_rows = []  # the samples each read of the big-endian features converted
    convert = SwappedArray.__getitem__

    def spy(self, index):
        block = convert(self, index)
        read_rows.append(block.shape[-2] if block.ndim >= 2 else 1)
        return block

    monkeypatch.setattr(SwappedArray, "__getitem__", spy)
    kw = dict(epsilon=0.5, tol=None, max_iter=3, memory_budget=1 << 20)
    ref = sinkhorn_assign_sharded(features=str(tmp_path / "little.npy"), prototypes=c, **kw)
    res = sinkhorn_assign_sharded(features=str(tmp_path / "big.npy"), prototypes=c, **kw)
    assert torch.equal(res.labels, ref.labels) and torch.equal(res.cluster_potentials, ref.cluster_potentials)
    assert read_rows and max(read_rows) < n, max(read_rows)


def test_reference_features_shard_converts_big_endian_features_once():
    """backend="reference" copies big-endian features in native order to form the float64 scores; it opened them a
    second time, another whole copy, for their dtype alone (what the ranks compare)."""
    conversions = []

    class Counted(np.ndarray):  # a big-endian array that records each whole conversion (astype) of itself
        def astype(self, *args, **kwargs):
            conversions.append(self.shape)
            return np.asarray(self).astype(*args, **kwargs)

    _, z, c, bias, _, kw = feature_cases()[0]
    ref = sinkhorn_assign_sharded(features=z, prototypes=c, bias=bias, epsilon=EPS, backend="reference", **kw)
    big = z.numpy().astype(">f4").view(Counted)
    res = sinkhorn_assign_sharded(features=big, prototypes=c, bias=bias, epsilon=EPS, backend="reference", **kw)
    assert torch.equal(res.labels, ref.labels) and torch.equal(res.cluster_potentials, ref.cluster_potentials)
    assert conversions == [tuple(z.shape)], conversions


def test_nccl_collectives_use_the_data_gpu_not_the_current_one():
    """A rank that never called torch.cuda.set_device must still communicate on its own GPU (that of its data);
    Gloo always uses the CPU. (NCCL itself cannot run here; the choice of device is what this checks.)"""
    from types import SimpleNamespace

    from otlabel.distributed import collective_device

    on_gpu_1 = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 1))
    assert collective_device("nccl", on_gpu_1) == torch.device("cuda", 1)
    assert collective_device("gloo", on_gpu_1) == torch.device("cpu")
    assert collective_device(None, torch.zeros(1)) == torch.device("cpu")


@pytest.mark.parametrize("kwargs, error, words", [
    (dict(group="world"), TypeError, "process group"),
    (dict(timeout=-1), ValueError, "timeout must be a positive number"),
    (dict(timeout="x"), ValueError, "timeout must be a positive number"),
    (dict(timeout=float("inf")), ValueError, "timeout must be a positive number"),  # timedelta overflowed
    (dict(timeout=0), ValueError, "timeout must be a positive number"),
    (dict(memory_budget=0), ValueError, "memory_budget must be a positive number of bytes"),  # unused by scores
    (dict(memory_budget="lots"), ValueError, r"memory_budget: not a size: 'lots' \(use e.g. 256M"),
])  # fmt: skip
def test_group_and_timeout_are_checked(kwargs, error, words):
    with pytest.raises(error, match=words):
        sinkhorn_assign_sharded(torch.randn(20, 3), 0.1, **kwargs)


def test_a_numpy_float32_timeout_is_a_number_of_seconds():
    """np.float32(30) passed the number check and raised datetime's "unsupported type for timedelta seconds component:
    numpy.float32"."""
    res = sinkhorn_assign_sharded(torch.randn(20, 3), 0.1, timeout=np.float32(30))
    assert res.labels.shape == (20,)


def test_every_parameter_has_an_args_entry():
    """memory_budget's entry was indented as a new section, which ended Args for the entries after it (epsilon,
    tol, backend, ...) in help() and any Google-style reader."""
    import inspect

    lines = inspect.getdoc(sinkhorn_assign_sharded).splitlines()
    start = lines.index("Args:") + 1
    indent = len(lines[start]) - len(lines[start].lstrip())
    named = set()
    for line in lines[start:]:
        if line and not line.startswith(" "):  # the next section
            break
        if len(line) - len(line.lstrip()) == indent and ":" in line:
            named |= {name.strip() for name in line.split(":")[0].split(",")}
    assert set(inspect.signature(sinkhorn_assign_sharded).parameters) - named == set()


def test_shard_checks_the_score_range_and_renormalises_sample_weights():
    with pytest.raises(ValueError, match="scores / epsilon reach"):
        sinkhorn_assign_sharded(torch.randn(20, 3) * 1e12, 0.05)
    s = random_problem(20, 4, seed=9)
    w = torch.full((20,), (1 + 9e-5) / 20, dtype=torch.float64)  # within the tolerance, not exactly 1
    r = torch.full((4,), (1 - 9e-5) / 4, dtype=torch.float64)
    res = sinkhorn_assign_sharded(s, 0.1, sample_weights=w, cluster_weights=r, tol=1e-6, max_iter=5000)
    assert res.converged


def test_shard_sample_weight_sum_tolerates_the_rounding_of_their_dtype():
    """fp16 sevenths sum to 1 - 2.4e-4: sinkhorn_assign accepts them, so the sharded entry point must too."""
    s = random_problem(7, 3, seed=4)
    w = torch.full((7,), 1 / 7, dtype=torch.float16)
    assert abs(float(w.double().sum()) - 1) > 1e-4
    ref = sinkhorn_assign(s, 0.1, sample_weights=w, tol=1e-6)
    res = sinkhorn_assign_sharded(s, 0.1, sample_weights=w, tol=1e-6)
    assert torch.equal(res.labels, ref.labels)
    torch.testing.assert_close(res.cluster_potentials, ref.cluster_potentials, rtol=0, atol=1e-5)  # fp32
    with pytest.raises(ValueError, match="sum to 1 over all ranks"):  # still refused beyond fp16's rounding
        sinkhorn_assign_sharded(s, 0.1, sample_weights=w * 1.01)


TORCHRUN_SCRIPT = """
import os, sys
import torch, torch.distributed as dist
sys.path.insert(0, {tests!r})
from helpers import random_problem
from otlabel import sinkhorn_assign, sinkhorn_assign_sharded

dist.init_process_group("gloo")  # torchrun's environment: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
rank, world = dist.get_rank(), dist.get_world_size()
scores = random_problem(101, 5, seed=21)
lo, hi = [(0, 40), (40, 101)][rank]
res = sinkhorn_assign_sharded(scores[lo:hi], 0.1, group=dist.group.WORLD, tol=1e-6, max_iter=2000)
whole = sinkhorn_assign(scores, 0.1, tol=1e-6, max_iter=2000)
ok = res.converged and torch.equal(res.labels, whole.labels[lo:hi]) and world == 2
with open(os.path.join({out!r}, f"rank{{rank}}"), "w") as f:
    f.write(f"{{ok}} {{res.n_iter}}")
dist.destroy_process_group()
"""


def test_under_torchrun(tmp_path):
    """What the README promises: launched by torchrun (its env:// rendezvous), two Gloo ranks give the labels of the
    single-process solve, after the same number of iterations."""
    import subprocess
    import sys
    from pathlib import Path

    script = tmp_path / "job.py"
    script.write_text(TORCHRUN_SCRIPT.format(tests=str(Path(__file__).parent), out=str(tmp_path)))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True, text=True, timeout=300, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    results = [(tmp_path / f"rank{r}").read_text().split() for r in range(2)]
    assert [ok for ok, _ in results] == ["True", "True"] and results[0][1] == results[1][1], results


def test_streamed_feature_shard_checks_the_range_before_any_collective():
    """A rank whose streamed features are far too large for eps must fail while opening its shard (its failure
    then reaches the other ranks in the first all-gather), not in the first pass, after the ranks agreed: there
    the others waited for it until the timeout."""
    from otlabel.distributed import FeatureShard

    z, c = torch.randn(30, 4) * 1e6, torch.randn(5, 4)
    with pytest.raises(ValueError, match="scores / epsilon reach"):
        FeatureShard(z.numpy(), c, None, None, "torch", torch.device("cpu"), True, None, epsilon=0.05)
    with pytest.raises(ValueError, match="scores / epsilon reach"):
        sinkhorn_assign_sharded(features=z.numpy(), prototypes=c, epsilon=0.05, backend="torch")


GPU_N, GPU_K, GPU_D = 4099, 50, 32  # N not a multiple of any tile


def gpu_problem():
    """Scores and features built on the CPU (the same bits in every process), as CUDA tensors."""
    g = torch.Generator().manual_seed(21)
    z = torch.nn.functional.normalize(torch.randn(GPU_N, GPU_D, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(GPU_K, GPU_D, generator=g), dim=1)
    return (z @ c.T).cuda(), z.cuda(), c.cuda()


def _gpu_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    with gloo_worker(rank, world, init_file, out_dir, threads=None) as group:
        lo, hi = shard_bounds(GPU_N, world)[rank]
        scores, z, c = gpu_problem()
        ref = torch.load(os.path.join(out_dir, "ref-gpu.pt"), weights_only=False)
        call = dict(epsilon=EPS, group=group, tol=None, max_iter=ITERS, timeout=60)
        dense = sinkhorn_assign_sharded(scores[lo:hi], **call)
        features = sinkhorn_assign_sharded(features=z[lo:hi], prototypes=c, **call)
        for name, res in (("dense", dense), ("features", features)):
            assert res.labels.is_cuda, name
            labels, potentials = ref[name][0][lo:hi], ref[name][1]
            differ = torch.nonzero(res.labels.cpu() != labels)[:5]
            assert torch.equal(res.labels.cpu(), labels), f"{name}: labels differ at {differ}"
            assert_close(res.cluster_potentials, potentials, atol=2e-4, what=f"{name}: potentials")


@pytest.mark.gpu
def test_sharded_cuda_shards_match_the_single_gpu_solve(tmp_path):
    """Two ranks on the one GPU lent (NCCL refuses two ranks on one device; Gloo carries the K-vectors through the
    host): CUDA scores and CUDA features run the Triton kernels on each shard and give the single-process labels."""
    scores, z, c = gpu_problem()
    call = dict(tol=None, max_iter=ITERS)
    solved = {
        "dense": sinkhorn_assign(scores, EPS, **call),
        "features": sinkhorn_assign(features=z, prototypes=c, epsilon=EPS, **call),
    }
    ref = {name: (res.labels.cpu(), res.cluster_potentials.cpu()) for name, res in solved.items()}
    torch.save(ref, tmp_path / "ref-gpu.pt")
    spawn_workers(_gpu_worker, tmp_path)


class ThreadRanks:
    """Ranks as threads of one process, for the collective logic alone (no process group): each rank's
    :class:`~otlabel.distributed.Collectives` all-gathers through a shared board, a barrier on each side."""

    def __init__(self, world: int):
        import threading

        self.world, self.barrier, self.slots = world, threading.Barrier(world, timeout=30), [None] * world

    def comm(self, rank: int):
        from otlabel.distributed import Collectives

        ranks = self

        class Threaded(Collectives):
            def __init__(self):
                self.active, self.world, self.rank = True, ranks.world, rank
                self.timeout, self.device = 30.0, torch.device("cpu")

            def all_gather(self, t, what):
                ranks.slots[rank] = t.detach().clone()
                ranks.barrier.wait()
                out = torch.stack(ranks.slots)
                ranks.barrier.wait()
                return out

        return Threaded()

    def run(self, body) -> list:
        """``body(rank, comm)`` on every rank at once; what each rank raised (None if nothing), in rank order."""
        from concurrent.futures import ThreadPoolExecutor

        def call(rank):
            try:
                body(rank, self.comm(rank))
            except Exception as err:  # noqa: BLE001 (returned for the test to judge)
                return err
            return None

        with ThreadPoolExecutor(self.world) as pool:
            return list(pool.map(call, range(self.world)))


def sharded_mask_check(shards, r):
    """check_sharded_masks on one (N_r, K) or (H, N_r, K) score shard per thread-rank, uniform global sample weights:
    what each rank raised."""
    from otlabel.distributed import check_sharded_masks

    n = sum(s.shape[-2] for s in shards)

    def body(rank, comm):
        batched = shards[rank].ndim == 3
        scores = shards[rank] if batched else shards[rank][None]
        masked = bool((torch.isneginf(scores) & (r > 0)).any())
        c = torch.full((scores.shape[1],), 1 / n, dtype=torch.float64)
        check_sharded_masks(comm, scores, c, r, batched=batched, masked=masked)

    return ThreadRanks(len(shards)).run(body)


@pytest.mark.parametrize("masked_rank", [0, 1])
def test_sharded_mask_check_sees_a_violation_on_any_rank(masked_rank):
    """Hall's condition over all ranks when only one rank has masked samples: rank `masked_rank`'s 6 samples (0.6 of
    the mass) may only go to cluster 2 (weight 1/3). Every rank raises, whichever rank holds them: the hot-pair test's
    largest `shut` and the number of patterns to exchange are taken over every rank, not from rank 0."""
    shards = [random_problem(4, 3, seed=1), random_problem(6, 3, seed=2)]
    if masked_rank == 0:
        shards = shards[::-1]
    shards[masked_rank][:, :2] = -float("inf")
    r = torch.full((3,), 1 / 3, dtype=torch.float64)
    expected = "infeasible mask: 6 samples (0.6 of the sample mass) may only go to clusters [2]"
    for rank, err in enumerate(sharded_mask_check(shards, r)):
        assert isinstance(err, ValueError) and expected in str(err), f"rank {rank}: {err!r}"
    r_fits = torch.tensor([0.2, 0.2, 0.6], dtype=torch.float64)  # cluster 2 can take them all: no error on any rank
    assert sharded_mask_check(shards, r_fits) == [None, None]


def test_sharded_mask_check_margin_adds_up_the_ranks_errors(monkeypatch):
    """Each rank's float32 hot-pair sums may be off by up to its margin, and summed over ranks so may their errors:
    the margin that decides is the ranks' sum. Here each rank's `barred` comes out low by 0.9 of its margin (within
    its bound) on a mask infeasible by 2e-6 of the mass (100 samples of 200 may not go to cluster 0 of weight
    0.5 + 2e-6); with one rank's margin alone the violation passed as feasible."""
    from otlabel import feasibility

    hot_sums = feasibility.hot_sums

    def low_by_margin(*args):
        shut, barred, margin = hot_sums(*args)
        return shut, barred - 0.9 * margin * (barred > 0), margin

    monkeypatch.setattr(feasibility, "hot_sums", low_by_margin)
    shards = [random_problem(100, 3, seed=3), random_problem(100, 3, seed=4)]
    for shard in shards:
        shard[:50, 0] = -float("inf")
    r = torch.tensor([0.5 + 2e-6, 0.25 - 1e-6, 0.25 - 1e-6], dtype=torch.float64)
    for rank, err in enumerate(sharded_mask_check(shards, r)):
        assert isinstance(err, ValueError) and "infeasible mask" in str(err), f"rank {rank}: {err!r}"


def test_sharded_mask_check_reaches_every_head():
    """Batched scores: head 0's mask is feasible, head 1's is not (as in the test above); every rank raises for
    head 1 (a feasible head must not end the check)."""
    shards = [random_problem(4, 3, h=2, seed=1), random_problem(6, 3, h=2, seed=2)]
    shards[1][1, :, :2] = -float("inf")
    shards[0][0, :2, 0] = -float("inf")  # head 0: two samples closed to cluster 0, far from Hall's bound
    r = torch.full((3,), 1 / 3, dtype=torch.float64)
    for rank, err in enumerate(sharded_mask_check(shards, r)):
        assert isinstance(err, ValueError) and "infeasible mask (head 1)" in str(err), f"rank {rank}: {err!r}"


def test_sharded_mask_far_from_halls_bound_is_decided_by_the_sums_alone(monkeypatch):
    """As on one process (test_feasibility): every forbidden pair has shut + barred <= 0.74 over both ranks, within
    the ranks' summed margin of nothing, so no rank collects or exchanges mask rows."""
    from otlabel import feasibility

    def never(*args):
        raise AssertionError("hot_patterns ran: some pair counted as hot")

    monkeypatch.setattr(feasibility, "hot_patterns", never)
    scores = random_problem(30, 3, seed=5)
    scores[np.arange(30), np.r_[np.zeros(12, dtype=int), np.arange(18) % 2 + 1]] = -float("inf")  # barred .4, .3, .3
    r = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert sharded_mask_check([scores[:13], scores[13:]], r) == [None, None]


def test_what_the_ranks_must_agree_on_is_compared_part_by_part():
    """check_same_on_every_rank on 3 ranks' (cluster weights K = 3, prototype digest, warm start K = 3) rows: each
    part is compared with rank 0's, a -inf in the same place is no difference, and the message names the part and
    the largest gap (the digests: only that they differ)."""
    from otlabel.distributed import FINGERPRINT_SIZE, check_same_on_every_rank

    ninf = -float("inf")
    row = torch.tensor([0.5, 0.25, 0.25] + [7.0] * FINGERPRINT_SIZE + [1.0, ninf, -2.0], dtype=torch.float64)
    same = row.expand(3, -1).clone()
    check_same_on_every_rank(same, 3)  # identical, -inf included
    cases = [
        (1, 0.5, "cluster_weights", "by up to 0.25"),
        (3, 9.0, "prototypes or bias", "their SHA-256 digests differ"),
        (3 + FINGERPRINT_SIZE, 1.5, "init", "by up to 0.5"),
        (5 + FINGERPRINT_SIZE, -1.0, "init", "by up to 1"),
        (4 + FINGERPRINT_SIZE, 0.0, "init", "by up to inf"),
    ]  # -inf on rank 0 only (printed 1.8e+308)
    for column, value, what, how in cases:
        for rank in (1, 2):
            agreed = same.clone()
            agreed[rank, column] = value
            with pytest.raises(ValueError, match=rf"{what} differ between ranks \({how};"):
                check_same_on_every_rank(agreed, 3)


def test_what_the_ranks_disagree_on_is_named_for_the_input_given():
    """check_agreement on two ranks' metadata: a features dtype, K and batched prototypes are named as such (they read
    "the scores dtype", "last dimension of the scores", "batched (3-d) scores"), and scores on one rank with features
    on the other is that disagreement, not the dtype or K that came with it."""
    from otlabel.distributed import DTYPE_CODES, META_SIZE, check_agreement

    def table(**columns):
        rows = torch.zeros(2, META_SIZE, dtype=torch.float64)
        rows[:, [0, 2, 3, 12]] = torch.tensor([1.0, 7.0, DTYPE_CODES[torch.float32], 1.0], dtype=torch.float64)
        for column, (first, second) in columns.items():
            rows[:, int(column[1:])] = torch.tensor([first, second], dtype=torch.float64)
        return rows

    half, single, double = (DTYPE_CODES[d] for d in (torch.float16, torch.float32, torch.float64))
    check_agreement(table(), [0, 1])
    cases = [
        (table(c3=(half, single)), r"the features dtype \(rank 0: float16, rank 1: float32\)\. Every rank must pass "
         "features of one dtype"),
        (table(c3=(half, single), c12=(0, 0)), r"the scores dtype \(rank 0: float16, rank 1: float32\)\. Every rank "
         "must pass scores of one dtype"),
        (table(c2=(7, 8)), r"the number of clusters K \(rows of the prototypes\) \(rank 0: 7, rank 1: 8\)"),
        (table(c4=(0, 1)), r"batched \(3-d\) prototypes \(rank 0: 2-d, rank 1: 3-d\)"),
        (table(c12=(0, 1), c3=(double, single), c2=(8, 7)), r"the input \(scores, or features with prototypes\) "
         r"\(rank 0: scores, rank 1: features\)\. Every rank must pass the same kind of input"),
    ]  # fmt: skip
    for rows, message in cases:
        with pytest.raises(ValueError, match=message):
            check_agreement(rows, [0, 1])


def test_sharded_mask_check_is_skipped_everywhere_when_one_rank_has_too_many_patterns(monkeypatch):
    """A feasible mask (10 samples, K = 3): rank 0's 3 samples may only go to cluster 2, rank 1 has two hot samples of
    different patterns, more than it may keep (MAX_PATTERN_EDGES patched to 3: one pattern). Every rank skips the
    check; deciding on the other ranks' patterns alone (rank 1's hot mass missing) would refuse it as infeasible."""
    from otlabel import feasibility

    monkeypatch.setattr(feasibility, "MAX_PATTERN_EDGES", 3)
    shards = [random_problem(3, 3, seed=6), random_problem(7, 3, seed=7)]
    shards[0][:, :2] = -float("inf")
    shards[1][0, 1:] = -float("inf")  # only cluster 0
    shards[1][1, [0, 2]] = -float("inf")  # only cluster 1
    r = torch.full((3,), 1 / 3, dtype=torch.float64)
    assert sharded_mask_check(shards, r) == [None, None]
    monkeypatch.setattr(feasibility, "MAX_PATTERN_EDGES", 9)  # all 3 patterns kept: checked, feasible
    assert sharded_mask_check(shards, r) == [None, None]
    shards[0] = torch.cat([shards[0], shards[0][:1]])  # a 4th sample only for cluster 2 (0.36 > 1/3): infeasible
    for rank, err in enumerate(sharded_mask_check(shards, r)):
        assert isinstance(err, ValueError) and "infeasible mask" in str(err), f"rank {rank}: {err!r}"


def test_sharded_mask_check_merges_every_pattern_of_every_rank():
    """Rank 1's samples come in three patterns (only cluster 2, only 3, only 2 or 3: 0.2 of the mass each), none a
    violation alone; together 0.6 of the mass may only go to clusters 2 and 3 (weight 0.5), which leaves clusters 0
    and 1 short: every rank raises, counting rank 0's 4 unmasked samples as the only ones that may go there."""
    shards = [random_problem(4, 4, seed=8), random_problem(6, 4, seed=9)]
    closed = [[0, 1, 3], [0, 1, 3], [0, 1, 2], [0, 1, 2], [0, 1], [0, 1]]
    for row, cols in enumerate(closed):
        shards[1][row, cols] = -float("inf")
    r = torch.full((4,), 0.25, dtype=torch.float64)
    expected = "clusters [0, 1] need 0.5 of the mass (their cluster_weights), but only 4 samples (0.4 of the sample"
    for rank, err in enumerate(sharded_mask_check(shards, r)):
        assert isinstance(err, ValueError) and expected in str(err), f"rank {rank}: {err!r}"


def test_sharded_features_warm_start_starts_from_init():
    """On the CPU a sharded features solve streams each rank's features (a StreamingOperator) with no checking pass
    of its own (the features were checked up front), so its operator is never marked validated: a warm start must
    still take the iteration at ``init``, not the cold start the first pass of a stream does for an unchecked one."""
    g = torch.Generator().manual_seed(13)
    z = torch.nn.functional.normalize(torch.randn(60, 8, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(5, 8, generator=g), dim=1)
    init = sinkhorn_assign(features=z, prototypes=c, epsilon=0.05, tol=1e-6).cluster_potentials
    kw = dict(features=z, prototypes=c, epsilon=0.05, init=init, tol=None, max_iter=2)
    ref, res = sinkhorn_assign(**kw), sinkhorn_assign_sharded(**kw)
    assert res.errors[0] < 1e-5, res.errors  # the marginal error of init itself: a cold start's would be ~1
    assert_close(res.cluster_potentials, ref.cluster_potentials, atol=1e-5, what="potentials after 2 iterations")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_reference_shard_judges_the_span_in_its_own_float64(dtype):
    """A scores shard on backend="reference" is solved in float64 whatever its dtype, but its rows were judged by
    float32's span limit: |S| / eps of 1.8e4 (eps 2e-4) was refused ("float32 arithmetic cannot resolve ...") where
    sinkhorn_assign(backend="reference") solves it. Now the same solve; the torch backend still refuses it."""
    s = random_problem(300, 6, seed=3).to(dtype)
    assert float(s.abs().max()) / 2e-4 > 1e4
    single = sinkhorn_assign(s.double(), 2e-4, backend="reference", max_iter=5000)
    res = sinkhorn_assign_sharded(s, 2e-4, backend="reference", max_iter=5000)
    assert res.converged and torch.equal(res.labels, single.labels)
    assert_close(res.codes, single.codes, atol=1e-9, what="codes of the sharded reference")
    with pytest.raises(ValueError, match="float32 arithmetic cannot resolve"):
        sinkhorn_assign_sharded(s, 2e-4, backend="torch")


def _scores_path_worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    """Each rank's scores as a .npy path, as features are taken (both were refused: "scores must be a torch.Tensor
    ... sinkhorn_assign_stream(path) reads it in chunks", a single-process entry point), and sample weights sized
    for a rank's scores transposed, said to be so on that rank as in sinkhorn_assign (it was told only the shape)."""
    with gloo_worker(rank, world, init_file, out_dir):
        scores = random_problem(N, K, seed=61)
        lo, hi = shard_bounds(N, world)[rank]
        path = os.path.join(out_dir, f"scores-rank{rank}.npy")
        np.save(path, scores[lo:hi].numpy())
        in_memory = sinkhorn_assign_sharded(scores[lo:hi], EPS, timeout=30)
        on_disk = sinkhorn_assign_sharded(path, EPS, timeout=30)
        assert torch.equal(on_disk.labels, in_memory.labels) and on_disk.n_iter == in_memory.n_iter
        assert torch.equal(on_disk.cluster_potentials, in_memory.cluster_potentials)
        transposed = scores[lo:hi].T.contiguous() if rank == 1 else scores[lo:hi]  # rank 1 saved its (K, N_r)
        weights = torch.full((hi - lo,), 1.0 / N, dtype=torch.float64)  # (N_r,) as rank 1 meant it
        said = (rf"sample_weights must have shape \({K},\), this rank's number of samples, got \({hi - lo},\)\. "
                rf"{hi - lo} is the scores' number of clusters K: are the scores transposed\? .* pass scores.swapaxes"
                if rank == 1 else r"rank\(s\) \[1\] rejected their input")  # fmt: skip
        with pytest.raises(ValueError, match=said):
            sinkhorn_assign_sharded(transposed, EPS, sample_weights=weights, timeout=30)


def test_sharded_scores_from_a_path_and_the_transposed_hint(tmp_path):
    spawn_workers(_scores_path_worker, tmp_path, world=2)


def test_sharded_takes_the_entry_points_words_for_paths_and_transposed_weights(tmp_path):
    """Alone (no group), the same: a scores path solves as the array, weights sized for the other dimension of a
    path's scores are told to pass the file's transposed view (as sinkhorn_assign_stream says it), and a features
    shard (which cannot be transposed scores) gets no such hint."""
    scores = random_problem(40, 3, seed=62)
    np.save(tmp_path / "s.npy", scores.numpy())
    np.save(tmp_path / "t.npy", scores.T.contiguous().numpy())
    want = sinkhorn_assign_sharded(scores, EPS)
    got = sinkhorn_assign_sharded(str(tmp_path / "s.npy"), EPS)
    assert torch.equal(got.labels, want.labels) and torch.equal(got.cluster_potentials, want.cluster_potentials)
    for kw, length in ((dict(sample_weights=np.full(40, 1 / 40)), 40), (dict(cluster_weights=np.full(3, 1 / 3)), 3)):
        with pytest.raises(ValueError, match=rf"{length} is the scores' number of .* transposed\? .* pass np\.load"
                           r"\(path, mmap_mode=\"r\"\)\.swapaxes\(-1, -2\) instead of the path"):  # fmt: skip
            sinkhorn_assign_sharded(tmp_path / "t.npy", EPS, **kw)
    with pytest.raises(ValueError, match=r"got \(3,\)\. Each rank passes the weights of its own samples"):
        # features: no transposed hint, only what to pass
        sinkhorn_assign_sharded(features=torch.randn(40, 3), prototypes=torch.randn(3, 3), sample_weights=np.ones(3))


def test_a_rank_given_the_global_sample_weights_is_told_to_pass_its_slice():
    """A rank of 250 samples passing the global (500,) weights was told only "must have shape (250,), this rank's
    number of samples, got (500,)." Now also what to pass: its own slice, weights[start:stop]."""
    from otlabel.distributed import check_local_weights

    weights = torch.full((500,), 1 / 500)
    with pytest.raises(ValueError) as raised:
        check_local_weights(weights, 250, torch.device("cpu"), (250, 10))
    said = str(raised.value)
    assert said.startswith("sample_weights must have shape (250,), this rank's number of samples, got (500,).")
    assert "Are these the weights of every rank's samples? Each rank passes the weights of its own samples: its " \
        "slice of the global weights, e.g. weights[start:stop]" in said, said  # fmt: skip
    w, _ = check_local_weights(weights[250:], 250, torch.device("cpu"), (250, 10))  # the slice it means
    assert w.shape == (250,) and w.dtype == torch.float64
