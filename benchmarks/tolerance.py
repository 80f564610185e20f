"""Time to tolerance: wall-clock seconds until the marginal error is below 1e-3 and 1e-6, at
eps in {0.1, 0.05, 0.02, 0.01}, for otlabel with its accelerations on and off and for every baseline.

otlabel variants (torch backend): plain; the default (Anderson mixing); adaptive over-relaxation; a fixed
omega = 1.6; warm start from the previous labelling step's potentials (same features, prototypes drifted by
5%; that solve is untimed); the library's ``epsilon_scaling=0.5``; and warm start and eps-scaling each
combined with the default.
Each call gets a time budget; a method that has not converged within it is a TIMEOUT row (its time is a
lower bound); NaN/inf, or an error that stalls above the tolerance, is FAILED.
"""

from __future__ import annotations

import math

from . import harness
from .harness import Context, Row, fmt_time, markdown_table
from .methods import acceleration_variants, all_methods
from .problems import make_problem

NAME = "tolerance"
TITLE = "Time to tolerance (float32 scores)"
EPSILONS = (0.1, 0.05, 0.02, 0.01)
TOLERANCES = (1e-3, 1e-6)
QUICK_EPSILONS = (0.05, 0.01)
BASELINES = (
    "swav",
    "sela",
    "pot-sinkhorn-numpy",
    "pot-sinkhorn_log-numpy",
    "pot-sinkhorn-torch",
    "pot-sinkhorn_log-torch",
    "geomloss-tensorized",
    "ott-jax",
)


def size(ctx: Context) -> tuple[int, int]:
    return ctx.pick_size((2_000, 50), (100_000, 1_000))


def epsilons(ctx: Context) -> tuple[float, ...]:
    return QUICK_EPSILONS if ctx.quick else EPSILONS


def methods() -> dict:
    base = all_methods()
    return {**acceleration_variants(), **{name: base[name] for name in BASELINES}}


def run(ctx: Context) -> list[Row]:
    n, k = size(ctx)
    problem = make_problem(n, k, 0.05, device=ctx.device, warm=True)
    rows = []
    for eps in epsilons(ctx):
        at = problem.with_epsilon(eps)
        for tol in TOLERANCES:
            for method in ctx.selected(methods()).values():
                rows.append(harness.time_to_tolerance(method, at, tol, ctx, NAME))
    estimate_timeouts(rows)
    return rows


def estimate_timeouts(rows: list[Row]) -> None:
    """POT's ``sinkhorn_log`` makes the same iterates as plain otlabel (log-domain Sinkhorn from the same cold
    start), so where it timed out, its time to tolerance is about its per-iteration time times otlabel's count."""
    plain = {(r.eps, r.metric): r for r in rows if r.method == "otlabel" and r.ok}
    for r in rows:
        ref = plain.get((r.eps, r.metric))
        if r.status.startswith("TIMEOUT") and "sinkhorn_log" in r.method and ref and r.iterations:
            per_iter = r.median / r.iterations
            r.note = f"time is a lower bound; estimate ≈ {per_iter * ref.iterations:.3g} s ({ref.iterations} it)"


def cell(r: Row) -> str:
    if r.ok:
        it = f", {r.iterations} it" if r.iterations is not None else ""
        return f"{fmt_time(r.median)}{it}"
    word, _, reason = r.status.partition(": ")
    if word == "TIMEOUT":
        return f"**TIMEOUT** > {fmt_time(r.median)}"
    if word == "SKIPPED":
        return "skipped"
    return f"**FAILED** ({reason[:50]})"


def report(rows: list[Row], ctx: Context) -> str:
    n, k = size(ctx)
    text = (
        f"N = {n:,}, K = {k:,}. Cell: median time to reach the L1 marginal error (iterations). Stopping rules "
        "are each method's own, set so that it guarantees that L1 error (see `benchmarks/methods.py`). "
        f"Budget {ctx.budget_s:g} s per call.\n"
    )
    skipped = {}
    eps_list = epsilons(ctx)
    for tol in TOLERANCES:
        sel = [r for r in rows if r.metric == f"s to {tol:g}"]
        names = list(dict.fromkeys(r.method for r in sel))
        cells = {(r.method, r.eps): r for r in sel}
        lines = []
        for m in names:
            mine = [cells[(m, e)] for e in EPSILONS if (m, e) in cells]
            if all(r.status.startswith("SKIPPED") for r in mine):
                skipped[m] = mine[0].status.partition(": ")[2]
                continue
            lines.append([m] + [cell(cells[(m, e)]) if (m, e) in cells else "—" for e in eps_list])
        headers = ["method"] + [f"eps={e:g}" for e in eps_list]
        text += f"\n### marginal error ≤ {tol:g}\n\n" + markdown_table(headers, lines) + "\n"
    text += (
        "\n### Speed-up over plain otlabel (same eps, same tolerance; > 1 pays)\n\n"
        + speedup_table(rows, eps_list)
        + "\n"
    )
    text += "\n" + targets(rows)
    if skipped:
        text += "\nNot run here: " + "; ".join(f"{m} ({why})" for m, why in skipped.items()) + ".\n"
    notes = [f"{r.method} at eps={r.eps:g}, {r.metric}: {r.note}" for r in rows if r.note and "estimate" in r.note]
    if notes:
        text += "\nEstimates for timed-out runs: " + "; ".join(notes) + ".\n"
    return text


def speedup_table(rows: list[Row], eps_list) -> str:
    plain = {(r.eps, r.metric): r for r in rows if r.method == "otlabel" and r.ok}
    variants = [m for m in acceleration_variants() if m != "otlabel"]
    lines = []
    for m in variants:
        line = [m]
        for tol in TOLERANCES:
            for e in eps_list:
                r = next((x for x in rows if x.method == m and x.eps == e and x.metric == f"s to {tol:g}"), None)
                ref = plain.get((e, f"s to {tol:g}"))
                slow = next(
                    (
                        x
                        for x in rows
                        if x.method == "otlabel"
                        and x.eps == e
                        and x.metric == f"s to {tol:g}"
                        and x.status.startswith("TIMEOUT")
                    ),
                    None,
                )
                if r is None or r.status.startswith("SKIPPED"):
                    line.append("—")
                elif r.ok and ref:
                    line.append(f"{ref.median / r.median:.2f}×")
                elif r.ok and slow:
                    line.append(f"≥ {slow.median / r.median:.1f}× (plain timed out)")
                else:
                    line.append(r.status.partition(":")[0])
        lines.append(line)
    headers = ["variant"] + [f"{e:g} @{tol:g}" for tol in TOLERANCES for e in eps_list]
    return markdown_table(headers, lines)


def targets(rows: list[Row]) -> str:
    """The issue's targets: at eps=0.05 to 1e-3, otlabel (as a user calls it: the default) ≥ 10× POT sinkhorn
    (NumPy) and ≥ 100× POT sinkhorn_log; at eps=0.01, the default acceleration ≥ 2× plain Sinkhorn."""

    def find(m, e=0.05, metric="s to 0.001"):
        return next((r for r in rows if r.method == m and r.eps == e and r.metric == metric), None)

    ours = find("otlabel default")
    out = []
    for metric in ("s to 0.001", "s to 1e-06"):
        plain, default = find("otlabel", 0.01, metric), find("otlabel default", 0.01, metric)
        if plain and default and default.ok and (plain.ok or plain.status.startswith("TIMEOUT")):
            ratio = plain.median / default.median
            bound = "≥ " if not plain.ok else ""
            verdict = "met" if ratio >= 2 else "**not met**"
            out.append(f"- eps=0.01 {metric}: time(plain) / time(default) = {bound}{ratio:.1f} (target ≥ 2: {verdict})")
    for other, goal in (("pot-sinkhorn-numpy", 10), ("pot-sinkhorn_log-numpy", 100)):
        r = find(other)
        if not (ours and ours.ok and r) or not math.isfinite(r.median):
            why = f"otlabel: {ours.status if ours else 'absent'}; {other}: {r.status if r else 'absent'}"
            out.append(f"- otlabel vs {other} at eps=0.05 to 1e-3: not measured ({why})")
            continue
        ratio = r.median / ours.median
        bound = "≥ " if r.status.startswith("TIMEOUT") else ""
        verdict = "met" if ratio >= goal else ("not shown (lower bound only)" if bound else "**not met**")
        out.append(
            f"- eps=0.05 to 1e-3: time({other}) / time(otlabel default) = {bound}{ratio:.1f} "
            f"(target ≥ {goal}: {verdict})"
        )
    return "Targets (issue 6):\n\n" + "\n".join(out) + "\n"


def plot(rows: list[Row], ctx: Context) -> list:
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, len(TOLERANCES), figsize=(11, 4), squeeze=False)
    # one colour per method in both panels: the default cycle's 10 colours gave two methods the same one
    colours = {m: plt.cm.tab20(i % 20) for i, m in enumerate(dict.fromkeys(r.method for r in rows))}
    for ax, tol in zip(axes[0], TOLERANCES, strict=True):
        sel = [r for r in rows if r.metric == f"s to {tol:g}" and r.ok]
        for m in dict.fromkeys(r.method for r in sel):
            pts = sorted((r.eps, r.median) for r in sel if r.method == m)
            style = "-" if m.startswith("otlabel") else "--"
            ax.plot(*zip(*pts, strict=True), style, marker="o", label=m, color=colours[m])
        ax.set(xscale="log", yscale="log", xlabel="eps", ylabel="seconds", title=f"marginal error ≤ {tol:g}")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][-1].legend(fontsize=6, ncol=2)
    n, k = size(ctx)
    fig.suptitle(f"time to tolerance, N={n:,}, K={k:,} (failed/timed-out runs: see the table)")
    return harness.save_plot(fig, ctx, NAME)
