"""Entry point: ``python -m benchmarks [--quick] [--scenario NAME ...] [--out DIR] [--device cpu|cuda]``.

Full runs write into ``benchmarks/`` (``results.csv``, ``RESULTS_CPU.md``, ``plots/``); ``--quick`` runs (small
sizes, short budgets, under two minutes on a 2-core CPU) write into ``benchmarks/out/quick/`` unless ``--out``
says otherwise, so a smoke run never overwrites the published tables.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import time
from pathlib import Path

import torch

from . import SCENARIOS, harness


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="small sizes and budgets (< 2 min on a 2-core CPU)")
    p.add_argument("--scenario", action="append", choices=SCENARIOS, help="run only this scenario (repeatable)")
    p.add_argument("--out", type=Path, help="where results.csv, RESULTS_*.md and plots/ go")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    p.add_argument("--budget", type=float, help="seconds one method call may take before it is a TIMEOUT")
    p.add_argument("--repeats", type=int, help="timed repetitions per measurement")
    p.add_argument("--method", action="append", default=[], help="only methods whose name contains this")
    p.add_argument("--size", type=int, nargs=2, metavar=("N", "K"), help="one size for every scenario")
    p.add_argument("--no-plots", action="store_true")
    return p.parse_args(argv)


def context(args) -> harness.Context:
    out = args.out or (harness.HERE / "out" / "quick" if args.quick else harness.HERE)
    return harness.Context(
        quick=args.quick,
        device=torch.device(args.device),
        out=out,
        repeats=args.repeats or (3 if args.quick else 5),
        budget_s=args.budget or (0.5 if args.quick else 60.0),
        max_iter=3_000 if args.quick else 20_000,
        plots=not args.no_plots,
        only=tuple(args.method),
        size=tuple(args.size) if args.size else None,
    )


def run_scenario(name: str, ctx: harness.Context) -> list[harness.Row]:
    module = importlib.import_module(f"benchmarks.{name}")
    env = harness.environment(ctx.device)
    start = time.perf_counter()
    rows = module.run(ctx)
    harness.append_csv(rows, ctx.out / "results.csv", env, "quick" if ctx.quick else "full")
    body = module.report(rows, ctx)
    if ctx.plots:
        for path in module.plot(rows, ctx):
            rel = path.relative_to(ctx.out).as_posix()
            body += f"\n\n![{name}]({rel})"
    results_md = ctx.out / ("RESULTS_GPU.md" if ctx.device.type == "cuda" else "RESULTS_CPU.md")
    harness.write_section(results_md, name, body, env, module.TITLE)
    print(f"\n## {module.TITLE}  ({time.perf_counter() - start:.0f} s, load average {env['load_avg']})\n")
    print(body)
    return rows


def main(argv=None) -> int:
    args = parse(argv)
    ctx = context(args)
    ctx.out.mkdir(parents=True, exist_ok=True)
    for name in args.scenario or SCENARIOS:
        run_scenario(name, ctx)
    print(f"\nrows appended to {ctx.out / 'results.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
