"""Per-iteration time vs size: N from 10^3 to 10^6, K in {10, 100, 1,000, 3,000}, as memory allows.

Every method at eps = 0.05 on the same float32 scores, timed with a fixed iteration count (per-iteration time by
difference of two counts, so setup cancels). Methods whose cost makes a size pointless on this machine are
skipped above a size cap, and the row says so.
"""

from __future__ import annotations

from . import harness
from .harness import Context, Row, fmt_time, markdown_table
from .methods import all_methods
from .problems import make_problem, sizes_within

NAME = "per_iteration"
TITLE = "Per-iteration time vs size (eps = 0.05, float32)"
FULL_N = (1_000, 10_000, 100_000, 1_000_000)
FULL_K = (10, 100, 1_000, 3_000)
MAX_ELEMENTS = 100_000_000  # 400 MB of float32 scores
CAPS = {  # largest N·K per method (time on a small CPU), default MAX_ELEMENTS
    "otlabel-reference": 10_000_000,
    "pot-sinkhorn_log-numpy": 10_000_000,
    "pot-sinkhorn_log-torch": 10_000_000,
    "pot-sinkhorn-numpy": 30_000_000,
    "pot-sinkhorn-torch": 30_000_000,
    "sela": 30_000_000,
    "geomloss-tensorized": 10_000_000,
    "ott-jax": 10_000_000,
}
ITERS = {"pot-sinkhorn_log-numpy": (1, 3), "pot-sinkhorn_log-torch": (1, 3), "otlabel-reference": (2, 4)}


def grid(ctx: Context) -> list[tuple[int, int]]:
    if ctx.size:
        return [ctx.size]
    if ctx.quick:
        return [(1_000, 10), (1_000, 100), (10_000, 100)]
    return sizes_within(FULL_N, FULL_K, MAX_ELEMENTS)


def run(ctx: Context) -> list[Row]:
    rows = []
    methods = all_methods()
    for n, k in grid(ctx):
        problem = make_problem(n, k, 0.05, device=ctx.device)
        for method in ctx.selected(methods).values():
            if n * k > CAPS.get(method.name, MAX_ELEMENTS):
                rows.append(
                    Row(
                        NAME,
                        n,
                        k,
                        0.05,
                        method.name,
                        "s/iter",
                        status=f"SKIPPED: N·K above this scenario's cap {CAPS[method.name]:.0e}",
                    )
                )
                continue
            n1, n2 = ITERS.get(method.name, (2, 7))
            repeats = 3 if ctx.quick or n * k >= 10**7 else 5
            rows += harness.per_iteration(
                method, problem, ctx, NAME, n1=n1, n2=n2, repeats=repeats, adaptive=method.name not in ITERS
            )
        del problem
    return rows


def report(rows: list[Row], ctx: Context) -> str:
    per = [r for r in rows if r.metric == "s/iter"]
    methods = [m for m in dict.fromkeys(r.method for r in per) if any(r.ok for r in per if r.method == m)]
    absent = {}
    for r in per:  # the reason a method never ran: prefer "not installed" over "above the size cap"
        if r.method not in methods and (r.method not in absent or "cap" in absent[r.method]):
            absent[r.method] = r.status
    absent = sorted(absent.items())
    cells = {(r.n, r.k, r.method): r for r in per}
    lines = []
    for n, k in dict.fromkeys((r.n, r.k) for r in per):
        line = [f"{n:,}", f"{k:,}"]
        for m in methods:
            r = cells.get((n, k, m))
            line.append("—" if r is None else time_cell(r) if r.ok else short_status(r))
        lines.append(line)
    text = (
        "Median seconds per iteration (one pass over the scores for otlabel); lower is better. Below ~1 ms the "
        "difference of two timed calls is at the mercy of the machine's load: read the small sizes loosely.\n\n"
    )
    text += markdown_table(["N", "K", *methods], lines)
    if absent:
        text += "\n\nNot run here: " + "; ".join(f"{m} ({s.partition(': ')[2]})" for m, s in absent) + "."
    return text


def time_cell(r: Row) -> str:
    """A per-iteration time; a difference lost in timing noise (median ≤ 0: tiny sizes, busy machine) says so."""
    return fmt_time(r.median) if r.median > 0 else "noise (≤ 0)"


def short_status(r: Row) -> str:
    word, _, reason = r.status.partition(": ")
    return "skipped" if word == "SKIPPED" else f"**{word}** ({reason[:60]})"


def plot(rows: list[Row], ctx: Context) -> list:
    plt = harness.pyplot()
    per = [r for r in rows if r.metric == "s/iter" and r.ok]
    ks = sorted({r.k for r in per})
    if not ks:
        return []
    fig, axes = plt.subplots(1, len(ks), figsize=(3.6 * len(ks), 3.4), squeeze=False, sharey=True)
    for ax, k in zip(axes[0], ks, strict=True):
        for m in dict.fromkeys(r.method for r in per):
            pts = sorted((r.n, r.median) for r in per if r.k == k and r.method == m)
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", label=m)
        ax.set(xscale="log", yscale="log", title=f"K = {k:,}", xlabel="N")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].set_ylabel("seconds per iteration")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"per-iteration time, eps=0.05, float32, {ctx.device.type}")
    return harness.save_plot(fig, ctx, NAME)
