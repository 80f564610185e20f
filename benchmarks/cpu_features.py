"""Features mode on the CPU (issue 4): per-iteration time against the bare matmul, and peak memory.

    python benchmarks/cpu_features.py [--n 200000] [--k 1000] [--d 128] [--repeats 5]

Per-iteration time is ``(t(max_iter=i2) - t(max_iter=i1)) / (i2 - i1)`` with ``tol=None``, so set-up, the cold
start and the final labelling cancel out; the bare matmul ``Z @ C.T`` of the same size is timed in the same run
(the unavoidable work: the Sinkhorn steps may add at most half of it). Peak memory is the growth of the process's
peak RSS over the solve, measured in a fresh subprocess. Medians of ``--repeats`` runs; prints a table last.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

import torch

from otlabel import sinkhorn_assign


def inputs(n, k, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, d, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)
    return z, c


def kib(field: str) -> int:
    """A ``/proc/self/status`` field in KiB: ``VmRSS:`` now, ``VmHWM:`` the peak since the last reset."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field))


def median_seconds(fn, repeats):
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def per_iteration(z, c, repeats, i1=2, i2=12):
    def solve(iters):
        return lambda: sinkhorn_assign(features=z, prototypes=c, epsilon=0.05, max_iter=iters, tol=None)

    return (median_seconds(solve(i2), repeats) - median_seconds(solve(i1), repeats)) / (i2 - i1)


def peak_growth_bytes(n, k, d) -> int:
    """Peak-RSS growth over one 10-iteration features solve, in a fresh process, with the peak reset first."""
    here = os.path.dirname(os.path.abspath(__file__))
    code = "\n".join(
        [
            f"import sys; sys.path.insert(0, {here!r})",
            "from cpu_features import inputs, kib",
            "from otlabel import sinkhorn_assign",
            f"z, c = inputs({n}, {k}, {d})",
            "sinkhorn_assign(features=z[:1000], prototypes=c, epsilon=0.05, max_iter=2, tol=None)",
            "before = kib('VmRSS:')",
            "open('/proc/self/clear_refs', 'w').write('5')",  # reset the peak (VmHWM) to the current RSS
            "sinkhorn_assign(features=z, prototypes=c, epsilon=0.05, max_iter=10, tol=None)",
            "print((kib('VmHWM:') - before) * 1024)",
        ]
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--k", type=int, default=1000)
    ap.add_argument("--d", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args(argv)
    z, c = inputs(args.n, args.k, args.d)
    matmul = median_seconds(lambda: z @ c.T, args.repeats)
    iteration = per_iteration(z, c, args.repeats)
    peak = peak_growth_bytes(args.n, args.k, args.d)
    dense = args.n * args.k * 4
    load = os.getloadavg()[0]
    print(f"\nfeatures mode, CPU, N={args.n:,} K={args.k:,} D={args.d}, eps=0.05, fp32, "
          f"{torch.get_num_threads()} threads, load average {load:.1f}")  # fmt: skip
    print("| measure | value | target |")
    print("|---|---|---|")
    print(f"| bare matmul Z @ C.T | {matmul * 1e3:.0f} ms | |")
    print(f"| otlabel features, per iteration | {iteration * 1e3:.0f} ms | |")
    print(f"| ratio iteration / matmul | {iteration / matmul:.2f} | <= 1.5 |")
    print(f"| peak RSS growth of a solve | {peak / 2**20:.0f} MiB | <= {dense / 10 / 2**20:.0f} MiB (N·K·4 / 10) |")


if __name__ == "__main__":
    main()
