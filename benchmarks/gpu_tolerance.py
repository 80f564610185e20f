"""GPU time to tolerance: otlabel's default acceleration (Anderson mixing) against plain Sinkhorn steps.

On the CPU the default needs 3-10x fewer iterations to a marginal error of 1e-3 and is as many times faster
(``benchmarks/RESULTS_CPU.md``). On a GPU a mixing step is ~30 small launches and a synchronisation, which a
large problem (milliseconds per pass) does not notice and a small one (tens of microseconds per pass) may:
this script measures both, with the triton backend, as a user calls it::

    python benchmarks/gpu_tolerance.py --csv $OUT/gpu_tolerance.csv          # a few minutes on an H100
    TRITON_INTERPRET=1 python benchmarks/gpu_tolerance.py --dry-run --csv /tmp/t.csv   # CPU, tiny: the script

Per (N, K, dtype, eps): the wall time of ``sinkhorn_assign(..., tol=1e-3)`` from a synchronised start to a
synchronised end (labels computed; codes not read), median of ``REPEATS`` calls after one warm-up, for
``acceleration="auto"`` (the default), ``"none"`` (plain steps) and the default warm-started from the solution
of the same features against prototypes that drifted by 5% (one labelling step earlier). Scores are cosine
similarities of noisy clusters (``benchmarks/problems.py``). Rows go to the CSV as they are measured; the
markdown table comes last.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.gpu_dense import call_budget_s, choose_device, past_budget, wall_clock  # noqa: E402
from benchmarks.problems import make_scores  # noqa: E402

TOL = 1e-3
REPEATS = 5
MAX_ITER = 5000
TIME_BUDGET_S = call_budget_s(360)  # no new case starts past this (a case may take ~150 s): one 10-minute call
CASES = [  # (N, K, dtype, eps)
    (4096, 3000, torch.float32, 0.05), (4096, 3000, torch.float32, 0.01),
    (2**20, 3000, torch.float32, 0.05), (2**20, 3000, torch.float32, 0.01),
    (2**20, 3000, torch.bfloat16, 0.05), (2**20, 3000, torch.bfloat16, 0.01),
]  # fmt: skip
DRY_CASES = [(48, 10, torch.float32, 0.05)]
FIELDS = ["date", "device", "torch", "n", "k", "dtype", "eps", "method", "median_s", "iterations", "converged"]


def measure(n: int, k: int, dtype: torch.dtype, eps: float, device: str) -> list[dict]:
    import otlabel

    scores = make_scores(n, k, device=device).to(dtype)
    previous = make_scores(n, k, drift=0.05, device=device).to(dtype)
    call = dict(tol=TOL, max_iter=MAX_ITER, backend="triton", warn=False)
    warm = otlabel.sinkhorn_assign(previous, eps, **call)  # the last labelling step's solution
    methods = {
        "default (anderson)": lambda: otlabel.sinkhorn_assign(scores, eps, **call),
        "plain steps": lambda: otlabel.sinkhorn_assign(scores, eps, acceleration="none", **call),
        "default, warm start": lambda: otlabel.sinkhorn_assign(scores, eps, init=warm, **call),
    }
    rows = []
    for method, solve in methods.items():
        res = solve()  # compiles the kernels for this shape; every timed call runs the same iterations
        seconds = 1e-3 * wall_clock(solve, reps=1 if device == "cpu" else REPEATS, warmup=0)[1]
        rows.append(dict(n=n, k=k, dtype=str(dtype).replace("torch.", ""), eps=eps, method=method, median_s=seconds,
                         iterations=res.n_iter, converged=res.converged))  # fmt: skip
        print(f"  {method:>20}: {1e3 * seconds:9.2f} ms, {res.n_iter} iterations, converged {res.converged}")
    return rows


def append_csv(path: Path, row: dict, device: str) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        writer.writerow(dict(row, date=date, device=device, torch=torch.__version__))


def markdown_table(rows: list[dict], device: str) -> str:
    out = [f"Device: {device}. Time to marginal error {TOL:g} (whole `sinkhorn_assign` call), median.", "",
           "| N | K | dtype | eps | default | plain steps | plain / default | warm default |",
           "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    keys = sorted({(r["n"], r["k"], r["dtype"], r["eps"]) for r in rows}, key=lambda t: (t[0], t[2], -t[3]))
    for key in keys:
        got = {r["method"]: r for r in rows if (r["n"], r["k"], r["dtype"], r["eps"]) == key}
        cells = {m: f"{1e3 * r['median_s']:.1f} ms ({r['iterations']} it)" for m, r in got.items()}
        d, p = got.get("default (anderson)"), got.get("plain steps")
        ratio = f"{p['median_s'] / d['median_s']:.2f}x" if d and p else "-"
        n, k, dtype, eps = key
        default, plain, warm = (cells.get(m, "-") for m in ("default (anderson)", "plain steps", "default, warm start"))
        out.append(f"| {n} | {k} | {dtype} | {eps:g} | {default} | {plain} | {ratio} | {warm} |")
    return "\n".join(out)


def main(argv=None) -> int:
    t0 = time.monotonic()
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results_gpu_tolerance.csv")
    ap.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes: test the script")
    args = ap.parse_args(argv)
    chosen = choose_device(args.dry_run, "GPU solves")
    if chosen is None:
        return 0
    device, name = chosen
    cases = DRY_CASES if args.dry_run else CASES
    print(f"{name}; torch {torch.__version__}")
    rows = []
    for n, k, dtype, eps in cases:
        if past_budget(f"N={n} K={k} {dtype} eps={eps}", TIME_BUDGET_S, t0):
            continue
        print(f"N={n} K={k} {dtype} eps={eps}")
        for row in measure(n, k, dtype, eps, device):
            rows.append(row)
            append_csv(args.csv, row, name)
        if device == "cuda":
            torch.cuda.empty_cache()
    print(f"total {time.monotonic() - t0:.0f} s; rows appended to {args.csv}\n")
    print(markdown_table(rows, name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
