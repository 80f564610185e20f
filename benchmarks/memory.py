"""Peak memory per method at one fixed size, each method's call measured on its own.

CPU: growth of the process's peak resident set during the call (``VmHWM``, reset before it, minus the
resident set at its start) — every page touched, by torch or NumPy — which includes the returned plan
(otlabel's lazy ``codes`` are read inside the measurement, so they count). NumPy methods also show
``tracemalloc``'s peak (NumPy buffers only; torch's CPU allocator is invisible to tracemalloc). On CUDA:
``torch.cuda.max_memory_allocated`` growth. Inputs in each method's native format exist before the call and
are not counted (the float64 cost matrix POT's NumPy path needs is 8·N·K bytes on top of the float32 scores).
"""

from __future__ import annotations

import math

from . import harness
from .harness import Context, Row, fmt_num, markdown_table, status_cell
from .methods import all_methods
from .problems import make_problem

NAME = "memory"
TITLE = "Peak memory per method"
N_ITER = 10


def size(ctx: Context) -> tuple[int, int]:
    return ctx.pick_size((10_000, 200), (100_000, 1_000))


def run(ctx: Context) -> list[Row]:
    n, k = size(ctx)
    problem = make_problem(n, k, 0.05, device=ctx.device)
    rows = []
    for method in ctx.selected(all_methods()).values():
        row = Row(NAME, n, k, 0.05, method.name, "MB peak", iterations=N_ITER)
        reason = method.available(problem.device)
        if reason:
            row.status = f"SKIPPED: {reason}"
        elif method.name == "otlabel-reference" and n * k > 10**7 and not ctx.quick:
            row.status = "SKIPPED: float64 specification, O(N·K) float64 temporaries; not meant for this size"
        else:
            try:
                rss, traced = harness.peak_memory(method, problem, N_ITER, ctx)
                row.median = row.peak_mb = rss
                row.note = f"tracemalloc {traced:.0f} MB" if traced >= 1 else ""
            except Exception as exc:  # noqa: BLE001
                row.status = harness.failure(exc)
        rows.append(row)
        problem.drop_caches()  # the next method's inputs are converted (and not counted) in its own turn
    return rows


def report(rows: list[Row], ctx: Context) -> str:
    n, k = size(ctx)
    scores_mb = n * k * 4 / 2**20
    lines = [
        [
            r.method,
            fmt_num(r.peak_mb, ".0f"),
            "—" if math.isnan(r.peak_mb) else f"{r.peak_mb / scores_mb:.1f}×",
            r.note or "—",
            status_cell(r),
        ]
        for r in rows
    ]
    what = "CUDA allocator peak" if ctx.device.type == "cuda" else "peak RSS growth (VmHWM)"
    return (
        f"N = {n:,}, K = {k:,}, {N_ITER} iterations, float32 scores ({scores_mb:.0f} MB, not counted). "
        f"Memory = {what} during the call, returned plan included.\n\n"
        + markdown_table(["method", "peak MB", "× scores", "NumPy (tracemalloc)", "status"], lines)
    )


def plot(rows: list[Row], ctx: Context) -> list:
    plt = harness.pyplot()
    ok = [r for r in rows if r.ok and math.isfinite(r.peak_mb)]
    if not ok:
        return []
    fig, ax = plt.subplots(figsize=(7, 3.4))
    ax.barh([r.method for r in ok], [max(r.peak_mb, 0.1) for r in ok], color="tab:orange")
    ax.set_xscale("log")
    n, k = size(ctx)
    ax.set_xlabel(f"peak memory during the call, MB (scores: {n * k * 4 / 2**20:.0f} MB)")
    ax.set_title(f"peak memory, N={n:,}, K={k:,}, {ctx.device.type}")
    ax.invert_yaxis()
    return harness.save_plot(fig, ctx, NAME)
