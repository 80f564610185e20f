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

ACCELERATIONS = ["otlabel", "otlabel default", "otlabel adaptive omega", "otlabel warm default"]
CELLS = {  # eps -> methods
    0.05: ACCELERATIONS + ["pot-sinkhorn-numpy", "pot-sinkhorn_log-numpy", "swav"],
    0.01: ACCELERATIONS + ["pot-sinkhorn-numpy", "swav"],
}
RATIOS = [  # (eps, slower method, faster method, target)
    (0.05, "pot-sinkhorn-numpy", "otlabel default", 10),
    (0.05, "pot-sinkhorn_log-numpy", "otlabel default", 100),
    (0.01, "otlabel", "otlabel default", 2),
]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget", type=float, default=40.0, help="seconds per call before TIMEOUT")
    ap.add_argument("--log-budget", type=float, default=40.0, help="the budget for POT's sinkhorn_log (~2 min here)")
    args = ap.parse_args(argv)
    methods = {**acceleration_variants(), **all_methods()}
    problem = make_problem(100_000, 1000, 0.05, warm=True)
    print("| eps | method | time to 1e-3 | iterations | status |\n|---|---|---|---|---|")
    found = {}
    for eps, names in CELLS.items():
        at = problem.with_epsilon(eps)
        for name in names:
            budget = args.log_budget if "sinkhorn_log" in name else args.budget
            ctx = harness.Context(repeats=1, budget_s=budget, max_iter=20_000, plots=False)
            r = found[eps, name] = harness.time_to_tolerance(methods[name], at, 1e-3, ctx, "targets")
            print(f"| {eps:g} | {name} | {r.median:.2f} s | {r.iterations} | {r.status} |", flush=True)
    print()
    for eps, slow, fast, goal in RATIOS:
        a, b = found[eps, slow], found[eps, fast]
        if not (b.ok and (a.ok or a.status.startswith("TIMEOUT"))):
            print(f"- eps={eps:g}: {slow} / {fast}: not measured ({a.status}; {b.status})")
            continue
        ratio, bound = a.median / b.median, "" if a.ok else "≥ "
        verdict = "met" if ratio >= goal else ("lower bound only" if bound else "NOT met")
        print(f"- eps={eps:g}: time({slow}) / time({fast}) = {bound}{ratio:.1f} (target ≥ {goal}: {verdict})")


if __name__ == "__main__":
    main()
