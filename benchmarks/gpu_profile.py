"""Where a small solve's time goes on the GPU: ``sinkhorn_assign`` at a SwAV batch (N = 4096, K = 3000, 3 iterations,
labels + codes), under ``torch.profiler``.

Prints, after a warm-up: the whole call's wall time (synchronised), the device time of each kernel, and the host
functions that take the most time of their own. The issue-3 latency target compares the whole call with the
SwAV-style baseline; this says whether the gap is host work (validation, launches, synchronisations) or kernels::

    python benchmarks/gpu_profile.py            # on a CUDA machine
    python benchmarks/gpu_profile.py --n 65536  # another size
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_dense import EPS, choose_device  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--k", type=int, default=3000)
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25, help="lines of each profiler table")
    ap.add_argument("--cuda-graph", action="store_true", help="profile sinkhorn_assign(..., cuda_graph=True)")
    args = ap.parse_args(argv)
    if choose_device(False, "a GPU solve") is None:
        return 0
    from torch.profiler import ProfilerActivity, profile

    import otlabel

    s = torch.empty(args.n, args.k, device="cuda").uniform_(-1, 1)  # (N, K)

    def call():
        res = otlabel.sinkhorn_assign(
            s, EPS, max_iter=args.iters, tol=None, backend="triton", cuda_graph=args.cuda_graph
        )
        return res.labels, res.codes

    for _ in range(5):
        call()
    torch.cuda.synchronize()
    times = []
    for _ in range(50):
        t0 = time.perf_counter()
        call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    times.sort()
    mode = ", cuda_graph=True" if args.cuda_graph else ""
    print(f"sinkhorn_assign N={args.n} K={args.k} {args.iters} iterations{mode}: median {1e6 * times[25]:.0f} us")
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(10):
            call()
        torch.cuda.synchronize()
    averages = prof.key_averages()
    print("\nDevice time per kernel (10 calls):")
    print(averages.table(sort_by="cuda_time_total", row_limit=args.rows))
    print("\nHost time of its own per torch operation (10 calls):")
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    # The Python side: otlabel's own functions by cumulative time (validation, the loop, the read-outs).
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(20):
        call()
    torch.cuda.synchronize()
    profiler.disable()
    print("\nPython functions by cumulative time (20 calls):")
    pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.rows)
    print("\nPython functions by own time (20 calls):")
    pstats.Stats(profiler).sort_stats("tottime").print_stats(args.rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
