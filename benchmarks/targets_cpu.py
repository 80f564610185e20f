"""Issue-6 targets in one short run: time to marginal error 1e-3 at N = 100,000, K = 1,000 (float32).

    python -m benchmarks.targets_cpu [--budget 40]

Uses the suite's own harness and methods (``benchmarks/methods.py``), one repeat per cell so it finishes in
minutes; prints one line per cell. The full ``--scenario tolerance`` (all accelerations, four eps, two
tolerances, five repeats) covers the same ground at length.
"""

from __future__ import annotations

import argparse

from benchmarks import harness
from benchmarks.methods import acceleration_variants, all_methods
from benchmarks.problems import make_problem

CELLS = {  # eps -> methods
    0.05: ["otlabel", "otlabel default", "otlabel warm", "pot-sinkhorn-numpy", "pot-sinkhorn_log-numpy", "swav"],
    0.01: ["otlabel", "otlabel default", "otlabel warm", "pot-sinkhorn-numpy", "swav"],
}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=40.0, help="seconds per call before TIMEOUT")
    args = ap.parse_args(argv)
    ctx = harness.Context(repeats=1, budget_s=args.budget, max_iter=20_000, plots=False)
    methods = {**acceleration_variants(), **all_methods()}
    problem = make_problem(100_000, 1000, 0.05, warm=True)
    print("| eps | method | time to 1e-3 | iterations | status |\n|---|---|---|---|---|")
    for eps, names in CELLS.items():
        at = problem.with_epsilon(eps)
        for name in names:
            r = harness.time_to_tolerance(methods[name], at, 1e-3, ctx, "targets")
            print(f"| {eps:g} | {name} | {r.median:.2f} s | {r.iterations} | {r.status} |", flush=True)


if __name__ == "__main__":
    main()
