"""Quality vs eps: objective gap to the exact LP (POT ``ot.emd``) and balance of the hard labels.

What a user gets from each method *as it is used*: otlabel converged (tol 1e-6) and at its defaults (Anderson
mixing, tol 1e-4, at most 1,000 iterations), plain Sinkhorn steps under the same budget, otlabel
and the SwAV-style loop at SwAV's fixed 3 iterations, SeLa with its published stopping rule, POT ``sinkhorn``
at its defaults. The plot shows what 3 iterations leave on the table: a plan that is not balanced (its
cluster marginal is off), hard labels that are not either.

Objective gap = (LP optimum − <P, S>) / |LP optimum|; it can be negative for a plan that breaks the marginals
(an infeasible plan can score more than the best feasible one), so read it next to the marginal error.
Label imbalance = sum_k |n_k / N − 1/K| of the argmax labels: 0 is perfectly balanced, 2 is all in one cluster.
"""

from __future__ import annotations

import math
import warnings

import numpy as np

import otlabel

from . import harness
from .harness import Context, Row, fmt_num, markdown_table, status_cell
from .methods import Method, all_methods, otlabel_method, published_rule_methods
from .problems import make_problem

NAME = "quality"
TITLE = "Quality vs eps: objective gap to the exact LP and hard-label balance"
EPSILONS = (0.2, 0.1, 0.05, 0.02, 0.01, 0.005)
CONFIGS = (  # label, method, n_iter, tol
    ("otlabel (tol 1e-6)", "otlabel-default", 50_000, 1e-6),
    ("otlabel (defaults: tol 1e-4)", "otlabel-default", 1_000, 1e-4),
    ("otlabel plain steps (tol 1e-4)", "otlabel-torch", 1_000, 1e-4),
    ("otlabel (3 it)", "otlabel-torch", 3, None),
    ("swav (3 it)", "swav", 3, None),
    ("sela (its rule)", "sela-default", 100_000, None),  # its code has no cap: a guard only
    ("pot-sinkhorn-numpy (defaults)", "pot-sinkhorn-numpy", 1_000, 1e-9),
)


DEFAULTS = Method("otlabel-default", otlabel_method(acceleration="auto"), "otlabel")  # what sinkhorn_assign does


def size(ctx: Context) -> tuple[int, int]:
    return ctx.pick_size((1_000, 20), (5_000, 100))


def run(ctx: Context) -> list[Row]:
    n, k = size(ctx)
    problem = make_problem(n, k, EPSILONS[0], device=ctx.device)
    exact = otlabel.exact_plan(problem.scores.cpu())
    counts = np.bincount(exact.labels, minlength=k)
    rows = [
        Row(
            NAME,
            n,
            k,
            math.nan,
            "exact LP (ot.emd)",
            "objective gap",
            0.0,
            objective_gap=0.0,
            label_imbalance=float(np.abs(counts / n - 1 / k).sum()),
            marginal_error=0.0,
            dtype="float64",
        )
    ]
    methods = {**all_methods(), **published_rule_methods(), "otlabel-default": DEFAULTS}
    for eps in EPSILONS:
        at = problem.with_epsilon(eps)
        for label, name, n_iter, tol in CONFIGS:
            if not ctx.selected({label: None}):
                continue
            rows.append(measure(label, methods[name], at, n_iter, tol, exact.objective, ctx))
    return rows


def measure(label, method, problem, n_iter, tol, optimum, ctx) -> Row:
    row = Row(NAME, problem.n, problem.k, problem.epsilon, label, "objective gap")
    if harness.unavailable(method, problem, row):
        return row
    try:
        method.prepare_inputs(problem)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out, seconds = harness.call(method, problem, n_iter, tol, ctx)
        metrics = harness.evaluate(problem, out)
        row.status = harness.judge(out, metrics, None)  # fixed budgets: judged by the gap and error shown
        if tol is not None and out.converged is False and row.ok:
            row.note = f"not converged to {tol:g}"
        row.iterations = out.n_iter if out.n_iter >= 0 else None
        if metrics["finite"]:
            row.objective_gap = (optimum - metrics["objective"]) / abs(optimum)
            row.median = row.objective_gap
            row.label_imbalance = metrics["label_imbalance"]
            row.marginal_error = metrics["marginal_error"]
    except Exception as exc:  # noqa: BLE001
        row.status = harness.failure(exc)
    return row


def report(rows: list[Row], ctx: Context) -> str:
    n, k = size(ctx)
    lines = []
    for r in rows:
        lines.append(
            [
                r.method,
                "—" if math.isnan(r.eps) else f"{r.eps:g}",
                fmt_num(r.objective_gap, ".2e"),
                fmt_num(r.label_imbalance, ".3f"),
                fmt_num(r.marginal_error, ".1e"),
                "—" if r.iterations is None else r.iterations,
                status_cell(r) + (f" ({r.note})" if r.note else ""),
            ]
        )
    return (
        f"N = {n:,}, K = {k:,}, cosine scores. Gap = (LP − <P,S>)/|LP| (negative: the plan breaks the "
        "marginals); imbalance = Σ_k |n_k/N − 1/K| of the hard labels; marginal error = L1 of both marginals.\n\n"
        + markdown_table(
            ["method", "eps", "objective gap", "label imbalance", "marginal error", "iterations", "status"], lines
        )
    )


def plot(rows: list[Row], ctx: Context) -> list:
    plt = harness.pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    sel = [r for r in rows if r.ok and not math.isnan(r.eps)]
    exact = next((r for r in rows if r.method.startswith("exact")), None)
    for m in dict.fromkeys(r.method for r in sel):
        pts = sorted((r.eps, r.objective_gap, r.label_imbalance, r.marginal_error) for r in sel if r.method == m)
        eps, gap, imb, err = zip(*pts, strict=True)
        style = "-" if m.startswith("otlabel") else "--"
        axes[0].plot(eps, gap, style, marker="o", label=m)
        axes[1].plot(eps, imb, style, marker="o", label=m)
        axes[2].plot(eps, [max(e, 1e-12) for e in err], style, marker="o", label=m)
    if exact:
        axes[1].axhline(exact.label_imbalance, color="k", lw=0.8, ls=":", label="exact LP labels")
    axes[0].set(xscale="log", yscale="symlog", title="objective gap to the exact LP", xlabel="eps")
    axes[0].set_yscale("symlog", linthresh=1e-5)
    axes[1].set(xscale="log", title="hard-label imbalance Σ|n_k/N − 1/K|", xlabel="eps")
    axes[2].set(xscale="log", yscale="log", title="marginal error (L1) of the plan", xlabel="eps")
    for ax in axes:
        ax.grid(True, which="both", alpha=0.3)
    axes[2].legend(fontsize=7)
    n, k = size(ctx)
    fig.suptitle(f"what 3 iterations leave on the table — N={n:,}, K={k:,}")
    return harness.save_plot(fig, ctx, NAME)
