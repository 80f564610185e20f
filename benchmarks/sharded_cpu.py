"""Sharded scaling on CPU: ``sinkhorn_assign_sharded`` over Gloo, 1 -> 2 processes, against one process.

Each rank generates its own shard of a clustered cosine problem (N samples, K clusters; the shards together are
the same problem for every configuration), then solves it with ``sinkhorn_assign_sharded`` (the rank's local
operator is the CPU backend's exp-once kernel). Timed after a barrier, slowest rank: the whole call (``--iters``
fixed iterations, tol=None, so every configuration does the same work, + labels), the first iteration (checks,
kernel build, cold start) and the median of the later iterations (from the ``callback`` hook). Configurations:

* 1 process x T threads (the usual single-process solve through the same code path, no collectives)
* P processes x 1 thread (Gloo all-gathers of K-vectors each iteration)

On this shared 2-core machine the interesting number is the ratio of the 2-process time to the 1-process,
1-thread time (ideal 0.5) and to the 1-process, 2-thread time (same cores, threads vs processes).

    python benchmarks/sharded_cpu.py [--n 200000] [--k 1000] [--iters 50] [--features]

``--features`` gives each rank its features (N_r, D) and the prototypes instead (features mode: the scores are
recomputed by a chunked matmul every pass).

Rows are appended to ``benchmarks/out/sharded_cpu.csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
import tempfile
import time
from datetime import timedelta

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

HERE = os.path.dirname(os.path.abspath(__file__))
CSV_PATH = os.path.join(HERE, "out", "sharded_cpu.csv")


def shard(n: int, k: int, d: int, lo: int, hi: int, features: bool = False):
    """Rows [lo, hi) of one fixed clustered cosine problem, generated in blocks so any sharding agrees: the scores
    (hi - lo, K), or with ``features`` the features (hi - lo, D) and the prototypes (K, D)."""
    g = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    block, out = 10_000, []
    for start in range(lo - lo % block, hi, block):
        gb = torch.Generator().manual_seed(1 + start // block)
        m = min(block, n - start)
        z = centres[torch.randint(k, (m,), generator=gb)] + 0.1 * torch.randn(m, d, generator=gb)
        z = torch.nn.functional.normalize(z, dim=1)[max(lo - start, 0) : min(hi - start, m)]
        out.append(z if features else z @ centres.T)
    return (torch.cat(out), centres) if features else torch.cat(out)


def _rank(rank, world, threads, opts, init_file, out_file):
    from otlabel.distributed import sinkhorn_assign_sharded

    torch.set_num_threads(threads)
    group = None
    if world > 1:
        dist.init_process_group(
            "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world, timeout=timedelta(seconds=600)
        )
        group = dist.group.WORLD
    lo, hi = rank * opts.n // world, (rank + 1) * opts.n // world
    local = shard(opts.n, opts.k, opts.d, lo, hi, features=opts.features)
    data = dict(features=local[0], prototypes=local[1]) if opts.features else dict(scores=local)
    stamps = []
    if group is not None:
        dist.barrier()
    t0 = time.perf_counter()
    sinkhorn_assign_sharded(
        **data,
        epsilon=opts.epsilon,
        group=group,
        tol=None,
        max_iter=opts.iters,
        callback=lambda i, e: stamps.append(time.perf_counter()),
    )
    total = time.perf_counter() - t0
    steps = torch.tensor(stamps).diff()[1:]  # after the first iteration (cold start + kernel build)
    gather_s = 0.0
    if group is not None:  # the collective alone: one all-gather of an (H, K) float32 vector, as per iteration
        from otlabel.distributed import Collectives

        comm, vec = Collectives(group, 60.0), torch.zeros(1, opts.k)
        comm.all_gather(vec, "warm-up")
        t1 = time.perf_counter()
        for _ in range(200):
            comm.all_gather(vec, "benchmark")
        gather_s = (time.perf_counter() - t1) / 200
    slow = torch.tensor([total, float(steps.median()), stamps[0] - t0, gather_s], dtype=torch.float64)
    if group is not None:  # the slowest rank's times
        dist.all_reduce(slow, op=dist.ReduceOp.MAX)
        dist.destroy_process_group()
    if rank == 0:
        torch.save(
            dict(total=float(slow[0]), per_iter=float(slow[1]), first=float(slow[2]), gather=float(slow[3])), out_file
        )


def run(world: int, threads: int, opts) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out_file = os.path.join(tmp, "result.pt")
        args = (world, threads, opts, os.path.join(tmp, "rdv"), out_file)
        if world == 1:
            _rank(0, *args)
        else:
            mp.spawn(_rank, args=args, nprocs=world, join=True)
        r = torch.load(out_file)
    return dict(
        processes=world,
        threads_per_process=threads,
        total_s=r["total"],
        first_iteration_s=r["first"],
        per_iteration_s=r["per_iter"],
        all_gather_ms=r["gather"] * 1e3,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--iters", type=int, default=40)
    p.add_argument("--features", action="store_true", help="each rank passes features and prototypes, not scores")
    opts = p.parse_args()
    cores = os.cpu_count()
    configs = [(1, 1), (1, min(2, cores)), (2, 1)]
    rows = []
    for world, threads in configs:
        load = os.getloadavg()[0]
        row = run(world, threads, opts)
        row.update(load_1min=round(load, 2))
        rows.append(row)
        print(row, flush=True)
    base = rows[0]["per_iteration_s"]
    local = f"features (D={opts.d}), chunked matmul" if opts.features else "scores, exp-once CPU kernel"
    print(f"\nN={opts.n:,} K={opts.k:,} eps={opts.epsilon}, {opts.iters} iterations ({local} per rank)")
    print(
        "| processes x threads | total (s) | first iteration (s) | later iterations (ms, median) | speed-up vs 1x1 "
        "| all-gather of K floats (ms) | load (1 min) |"
    )
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['processes']} x {r['threads_per_process']} | {r['total_s']:.2f} | {r['first_iteration_s']:.2f} | "
            f"{r['per_iteration_s'] * 1e3:.1f} | {base / r['per_iteration_s']:.2f} | {r['all_gather_ms']:.3f} | "
            f"{r['load_1min']} |"
        )
    os.makedirs(os.path.dirname(CSV_PATH), exist_ok=True)
    new = not os.path.exists(CSV_PATH)
    with open(CSV_PATH, "a", newline="") as f:
        meta = dict(
            date=datetime.datetime.now().isoformat(timespec="seconds"),
            machine=f"{platform.node()} {cores} cpus",
            python=platform.python_version(),
            torch=torch.__version__,
            n=opts.n,
            k=opts.k,
            epsilon=opts.epsilon,
            iters=opts.iters,
            input="features" if opts.features else "scores",
        )
        w = csv.DictWriter(f, fieldnames=list(meta) + list(rows[0]))
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({**meta, **r})


if __name__ == "__main__":
    sys.exit(main())
