"""What a CPU solve leaves behind for the caller's next torch operations: the ops a trainer runs after
``sinkhorn_assign`` (a 256 x 128 by 128 x 3,000 matmul, a float32 ``exp`` of 64 x 10, a float64 ``exp`` of 100, a
small MLP's forward and backward on 256 samples, ``otlabel.baselines.swav_sinkhorn`` on 64 x 10), each timed alone,
right after something that may have changed the process's threading state.

Conditions, one timed op each, alternating round by round (the order rotated, so load from other processes falls on
all alike):

* ``fresh``: the op after a busy wait as long as a solve (MKL's dynamic-threads flag as the process began);
* ``set_num_threads``: the op after ``torch.set_num_threads(1); torch.set_num_threads(n)``, no solve;
* ``solve``: the op after a 64 x 10 ``sinkhorn_assign`` of this tree (labels read);
* ``solve, baseline``: the same through another version's package (``--baseline DIR``, see
  ``benchmarks.small_calls``).

Every condition first gives MKL back the flag the process began with (``set_mkl_dynamic``), so what one leaves does
not reach the next: ``torch.set_num_threads`` turns MKL's dynamic threads off for good, and MKL then opens an OpenMP
region for every call however small. The flag after each condition is printed. Ratios to ``fresh`` in the same run
are the figures to read on a shared machine; min and median of each.

    python -m benchmarks.threads_after_solve [--seconds 15] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import otlabel
from otlabel.backends.torch_backend import mkl_dynamic, set_mkl_dynamic
from otlabel.baselines import swav_sinkhorn

from .small_calls import cosine_scores, load_baseline

EPS = 0.05


def follow_up_ops() -> dict:
    g = torch.Generator().manual_seed(0)
    z, c = torch.randn(256, 128, generator=g), torch.randn(3000, 128, generator=g)
    small, small64 = torch.randn(64, 10, generator=g), torch.randn(100, generator=g, dtype=torch.float64)
    swav_scores = cosine_scores(64, 10, seed=1)
    torch.manual_seed(0)
    mlp = torch.nn.Sequential(torch.nn.Linear(128, 256), torch.nn.ReLU(), torch.nn.Linear(256, 3000))

    def mlp_step():
        mlp.zero_grad(set_to_none=True)
        mlp(z).square().mean().backward()

    return {
        "matmul 256x128 @ 128x3000": lambda: z @ c.T,
        "exp float32 64x10": small.exp,
        "exp float64 100": small64.exp,
        "MLP forward+backward": mlp_step,
        "SwAV loop 64x10, 3 it": lambda: swav_sinkhorn(swav_scores, EPS, 3),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="timing per op (all conditions together)")
    parser.add_argument("--baseline", metavar="DIR", help="a directory holding another version's otlabel package")
    args = parser.parse_args(argv)
    start_flag = mkl_dynamic()
    if start_flag is None:
        raise SystemExit("MKL's dynamic-threads flag cannot be read in this torch build: nothing to measure")
    threads = torch.get_num_threads()
    scores = cosine_scores(64, 10)
    packages = {"solve": otlabel}
    if args.baseline:
        packages["solve, baseline"] = load_baseline(args.baseline)

    def solver(package):
        return lambda: package.sinkhorn_assign(scores, EPS).labels

    solves = {name: solver(package) for name, package in packages.items()}
    for solve in solves.values():
        solve()  # compilation
    lengths = []
    for _ in range(30):
        t0 = time.perf_counter()
        solves["solve"]()
        lengths.append(time.perf_counter() - t0)
    wait = statistics.median(lengths)

    def busy_wait():
        end = time.perf_counter() + wait
        while time.perf_counter() < end:
            pass

    def switch():
        torch.set_num_threads(1)
        torch.set_num_threads(threads)

    before = {"fresh": busy_wait, "set_num_threads": switch, **solves}
    flags = {}
    for name, run in before.items():
        set_mkl_dynamic(start_flag)
        run()
        flags[name] = mkl_dynamic()
    set_mkl_dynamic(start_flag)
    print(f"torch {torch.__version__}, {threads} threads, MKL dynamic threads at start: {start_flag}; after each: "
          + ", ".join(f"{name} {flag}" for name, flag in flags.items()))  # fmt: skip
    print(f"a 64 x 10 solve: {wait * 1e3:.2f} ms (median; the busy wait before 'fresh')")
    names = list(before)
    header = "| op | " + " | ".join(f"{name}: min / median" for name in names) + " | "
    header += " | ".join(f"{name} / fresh: min, median" for name in names[1:]) + " |"
    lines = [header, "|---" * (2 * len(names)) + "|"]
    for op_name, op in follow_up_ops().items():
        times = {name: [] for name in names}
        for name in names:  # warm-up, not recorded
            set_mkl_dynamic(start_flag)
            before[name]()
            op()
        start, round_ = time.perf_counter(), 0
        while round_ < 7 or time.perf_counter() - start < args.seconds:
            shift = round_ % len(names)
            for name in names[shift:] + names[:shift]:
                set_mkl_dynamic(start_flag)
                before[name]()
                t0 = time.perf_counter()
                op()
                times[name].append(time.perf_counter() - t0)
            round_ += 1
        low = {name: min(t) for name, t in times.items()}
        mid = {name: statistics.median(t) for name, t in times.items()}
        line = f"| {op_name} | " + " | ".join(f"{low[n] * 1e6:.0f} / {mid[n] * 1e6:.0f} us" for n in names) + " | "
        line += " | ".join(f"{low[n] / low['fresh']:.2f}, {mid[n] / mid['fresh']:.2f}" for n in names[1:]) + " |"
        lines.append(line)
        print(line, f"({round_} rounds)", flush=True)
    set_mkl_dynamic(start_flag)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
