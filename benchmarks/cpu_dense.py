"""CPU speed of one dense problem (issue 2, item 6): per-iteration time, side by side, in one run.

N = 100,000 samples, K = 1,000 clusters, eps = 0.05, float32 scores. Methods: otlabel's torch backend, the
SwAV-style loop, POT ``sinkhorn_log`` (NumPy, float64; seconds per iteration, so timed from 1 and 2 iterations
with ``stopThr=0``), POT ``sinkhorn`` and SeLa for context, and one plain read of the scores
(``scores.sum()``), all timed in the same run. Targets: torch ≤ 1/5 of SwAV, ≤ 1/100 of POT-log, ≤ 3× a read.

    python -m benchmarks.cpu_dense [--quick]
"""

from __future__ import annotations

import math
import sys
import time

from . import harness
from .harness import Context, Row, fmt_time, markdown_table, status_cell
from .methods import all_methods
from .problems import make_problem

NAME = "cpu_dense"
TITLE = "CPU dense: per-iteration time side by side (eps = 0.05, float32)"
METHODS = {  # name: (n1, n2) iterations of the two timed calls (otlabel's first iteration is the cold start)
    "otlabel-torch": (2, 22),
    "swav": (1, 6),
    "sela": (1, 11),
    "pot-sinkhorn-numpy": (1, 11),
    "pot-sinkhorn_log-numpy": (1, 3),
}
SLOW = {"pot-sinkhorn_log-numpy"}
RATIOS = [  # (label, numerator, denominator, target)
    ("otlabel-torch / swav", "otlabel-torch", "swav", 1 / 5),
    ("otlabel-torch / pot-sinkhorn_log-numpy", "otlabel-torch", "pot-sinkhorn_log-numpy", 1 / 100),
    ("otlabel-torch / pot-sinkhorn-numpy", "otlabel-torch", "pot-sinkhorn-numpy", None),
    ("otlabel-torch / read (scores.sum())", "otlabel-torch", "read", 3.0),
]


def size(ctx: Context) -> tuple[int, int]:
    return ctx.pick_size((10_000, 200), (100_000, 1_000))


def run(ctx: Context) -> list[Row]:
    n, k = size(ctx)
    problem = make_problem(n, k, 0.05, device=ctx.device)
    rows = [time_read(problem, ctx)]
    methods = all_methods()
    for name, (n1, n2) in METHODS.items():
        if name not in ctx.selected(methods):
            continue
        repeats = 2 if name in SLOW else ctx.repeats
        rows += harness.per_iteration(methods[name], problem, ctx, NAME, n1=n1, n2=n2, repeats=repeats)
        problem.drop_caches() if name == "sela" else None
    return rows


def time_read(problem, ctx: Context, repeats: int = 21) -> Row:
    """One plain read of the score matrix: ``scores.sum()`` — the memory-bound floor of one pass."""
    problem.scores.sum()
    times = []
    for _ in range(repeats):
        ctx.sync()
        start = time.perf_counter()
        problem.scores.sum()
        ctx.sync()
        times.append(time.perf_counter() - start)
    med, q1, q3 = harness.quartiles(times)
    return Row(NAME, problem.n, problem.k, problem.epsilon, "read", "s/read", med, q1, q3, note="scores.sum()")


def per_iter_of(rows: list[Row]) -> dict[str, Row]:
    return {r.method: r for r in rows if r.metric in ("s/iter", "s/read")}


def report(rows: list[Row], ctx: Context) -> str:
    lines = []
    calls = {r.method: r for r in rows if r.metric.startswith("s/call")}
    for r in per_iter_of(rows).values():
        whole = calls.get(r.method)
        lines.append(
            [
                r.method,
                fmt_time(r.median),
                f"{fmt_time(r.q1)} – {fmt_time(r.q3)}",
                f"{fmt_time(whole.median)} ({whole.iterations} it)" if whole else "—",
                status_cell(r),
            ]
        )
    table = markdown_table(["method", "per iteration (median)", "q1 – q3", "whole call", "status"], lines)
    n, k = size(ctx)
    intro = (
        f"N = {n:,}, K = {k:,}. Per iteration = (t(n2) − t(n1)) / (n2 − n1) from interleaved calls with a "
        "fixed iteration count (setup cancels); whole call = t(n2) including setup (otlabel: validation and "
        "its one exp pass).\n\n"
    )
    return (
        intro
        + table
        + "\n\n"
        + markdown_table(["ratio (per iteration)", "measured", "target", "met"], ratio_lines(rows))
    )


def ratio_lines(rows: list[Row]) -> list[list[str]]:
    per = per_iter_of(rows)
    lines = []
    for label, num, den, target in RATIOS:
        a, b = per.get(num), per.get(den)
        value = a.median / b.median if a and b and a.ok and b.ok else math.nan
        shown = "—" if math.isnan(value) else (f"1/{1 / value:.1f}" if value < 1 else f"{value:.2f}")
        goal = "—" if target is None else (f"≤ 1/{1 / target:.0f}" if target < 1 else f"≤ {target:g}")
        met = "—" if target is None or math.isnan(value) else ("yes" if value <= target else "**no**")
        lines.append([label, shown, goal, met])
    return lines


def plot(rows: list[Row], ctx: Context) -> list:
    plt = harness.pyplot()
    per = [r for r in per_iter_of(rows).values() if r.ok]
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.barh([r.method for r in per], [r.median for r in per], color="tab:blue")
    ax.set_xscale("log")
    ax.set_xlabel("seconds per iteration (log scale; read = one scores.sum())")
    n, k = size(ctx)
    ax.set_title(f"CPU, N={n:,}, K={k:,}, eps=0.05, float32")
    ax.invert_yaxis()
    return harness.save_plot(fig, ctx, NAME)


if __name__ == "__main__":
    from .__main__ import main

    main(["--scenario", NAME, *sys.argv[1:]])
