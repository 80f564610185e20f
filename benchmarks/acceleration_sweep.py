"""Iterations to tolerance over many small hard problems: each acceleration against plain Sinkhorn steps.

Timings say little here (the problems are small); what a change to the accelerations must not do is need more
iterations than plain steps, or fail where they converge. Two families, built from fixed seeds:

* ``cosine`` (256): cosine scores of L2-normalised features near random prototypes (dimension 4-64, noise 0.1-3),
  N 200-4,000, K 2-300, eps 0.002-0.05 (log-uniform), uniform or skewed cluster weights (logspace 1e-3..1), a
  quarter with -inf masks (20% or 50% of the pairs; every sample keeps its own prototype), tol 1e-3 and 1e-5.
* ``tiny`` (128): U(-1, 1) scores with 25% of the pairs masked, N 5-59, K 2-7, eps 1e-3..1e-2, uniform or skewed
  weights (0.1..1): hard-plan plateaus, where the error stays put for thousands of plain steps.

Masks with skewed weights make some problems infeasible (13 of the 384): ``otlabel`` refuses them before any
iteration (``otlabel.feasibility``), and the summary counts them apart. Plain steps that stop at ``--max-iter`` count
as that many in the ratios.

    python -m benchmarks.acceleration_sweep                          # auto vs none, torch backend (~4 min, 2 cores)
    python -m benchmarks.acceleration_sweep --path stream --quick    # 24 + 12 problems, streamed
    python -m benchmarks.acceleration_sweep --methods auto,over-relaxation,none --out sweep.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
import warnings

import numpy as np
import torch

import otlabel

COSINE, TINY = 256, 128  # problems per family
QUICK_COSINE, QUICK_TINY = 24, 12
TINY_IDS = 1000  # tiny problems are numbered from here (their seed)


def cosine_problem(i: int):
    rng = np.random.default_rng(1000 + i)
    n = int(round(math.exp(rng.uniform(math.log(200), math.log(4000)))))
    k = int(round(math.exp(rng.uniform(math.log(2), math.log(300)))))
    eps = float(math.exp(rng.uniform(math.log(0.002), math.log(0.05))))
    d = int(rng.choice([4, 16, 64]))
    noise = float(rng.choice([0.1, 0.4, 1.0, 3.0]))
    skewed, masked = i % 2 == 1, (i // 2) % 4 == 3
    tol = 1e-3 if (i // 8) % 2 == 0 else 1e-5
    protos = rng.standard_normal((k, d))
    protos /= np.linalg.norm(protos, axis=1, keepdims=True)
    owner = rng.integers(0, k, n)
    feats = protos[owner] + noise / math.sqrt(d) * rng.standard_normal((n, d))
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    scores = torch.from_numpy((feats @ protos.T).astype(np.float32))  # (N, K)
    weights = None
    if skewed:
        w = torch.from_numpy(rng.permutation(np.logspace(-3, 0, k)))
        weights = (w / w.sum()).float()
    if masked and k > 1:
        fraction = float(rng.choice([0.2, 0.5]))
        mask = torch.from_numpy(rng.random((n, k)) < fraction)
        mask[torch.arange(n), torch.from_numpy(owner)] = False
        scores[mask] = float("-inf")
    return dict(i=i, family="cosine", n=n, k=k, eps=eps, skewed=skewed, masked=masked, tol=tol), scores, weights


def tiny_problem(i: int):
    rng = np.random.default_rng(i)
    n, k = int(rng.integers(5, 60)), int(rng.integers(2, 8))
    eps = float(math.exp(rng.uniform(math.log(1e-3), math.log(1e-2))))
    scores = torch.from_numpy(rng.uniform(-1, 1, (n, k)).astype(np.float32))  # (N, K)
    mask = torch.from_numpy(rng.random((n, k)) < 0.25)
    mask[torch.arange(n), torch.from_numpy(rng.integers(0, k, n))] = False  # no sample loses every cluster
    scores[mask] = float("-inf")
    skewed, weights = i % 2 == 1, None
    if skewed:
        w = torch.from_numpy(rng.permutation(np.logspace(-1, 0, k)))
        weights = (w / w.sum()).float()
    tol = 1e-3 if (i // 2) % 2 == 0 else 1e-5
    return dict(i=i, family="tiny", n=n, k=k, eps=eps, skewed=skewed, masked=True, tol=tol), scores, weights


def problems(quick: bool):
    cosine, tiny = (QUICK_COSINE, QUICK_TINY) if quick else (COSINE, TINY)
    for i in range(cosine):
        yield cosine_problem(i)
    for i in range(TINY_IDS, TINY_IDS + tiny):
        yield tiny_problem(i)


def solve(scores, weights, desc, method: str, path: str, max_iter: int) -> dict:
    kwargs = dict(cluster_weights=weights, tol=desc["tol"], max_iter=max_iter, acceleration=method, warn=False)
    start = time.perf_counter()
    try:
        if path == "stream":
            res = otlabel.sinkhorn_assign_stream(scores, desc["eps"], **kwargs)
        else:
            res = otlabel.sinkhorn_assign(scores, desc["eps"], backend=path, **kwargs)
    except ValueError as err:  # no balanced plan: refused before any iteration, whatever the acceleration
        if not str(err).startswith("infeasible mask"):
            raise
        return dict(desc, method=method, path=path, infeasible=True)
    return dict(desc, method=method, path=path, infeasible=False, n_iter=res.n_iter, converged=bool(res.converged),
                error=float(res.marginal_error), seconds=round(time.perf_counter() - start, 3))  # fmt: skip


def summary(rows: list[dict], baseline: str = "none") -> str:
    """Markdown: per family and method, how often it needed more iterations than ``baseline`` and the ratios."""
    by = {(r["i"], r["method"]): r for r in rows}
    refused = {r["i"] for r in rows if r["infeasible"]}  # infeasible masks: no iterations to compare
    ids = sorted({r["i"] for r in rows} - refused)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != baseline]
    lines = [
        f"| family | method | problems | more iterations than {baseline} | median / max ratio | "
        f"not converged (where {baseline} did) | both not converged |",
        "|---|---|---|---|---|---|---|",
    ]
    for family in ("cosine", "tiny", "all"):
        fam = [i for i in ids if family in ("all", by[i, baseline]["family"])]
        for m in methods:
            pairs = [(by[i, m], by[i, baseline]) for i in fam if (i, m) in by]
            if not pairs:
                continue
            both_failed = sum(not a["converged"] and not b["converged"] for a, b in pairs)
            ratios = [a["n_iter"] / b["n_iter"] for a, b in pairs if a["converged"] or b["converged"]]
            more = sum(a["n_iter"] > b["n_iter"] for a, b in pairs)
            lost = sum(b["converged"] and not a["converged"] for a, b in pairs)
            lines.append(
                f"| {family} | {m} | {len(pairs)} | {more} | {statistics.median(ratios):.3f} / {max(ratios):.2f} | "
                f"{lost} | {both_failed} |"
            )
    if refused:
        lines.append(
            f"\nRefused as infeasible masks before any iteration (not counted above): {len(refused)} problems "
            f"({', '.join(map(str, sorted(refused)))})."
        )
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default="auto,none", help="comma-separated acceleration= values; 'none' is the base")
    ap.add_argument("--path", default="torch", choices=["torch", "reference", "stream"])
    ap.add_argument("--max-iter", type=int, default=10_000)
    ap.add_argument("--quick", action="store_true", help=f"{QUICK_COSINE} + {QUICK_TINY} problems")
    ap.add_argument("--out", help="also write one JSON line per solve here")
    args = ap.parse_args(argv)
    methods = args.methods.split(",")
    if "none" not in methods:
        ap.error("--methods must include 'none' (plain steps): every ratio is taken against it")
    torch.set_num_threads(1)  # small problems: threads cost more than they bring
    warnings.simplefilter("ignore", otlabel.ConvergenceWarning)
    rows = []
    for desc, scores, weights in problems(args.quick):
        for method in methods:
            rows.append(solve(scores, weights, desc, method, args.path, args.max_iter))
        if sys.stderr.isatty():
            print(f"\r{len(rows) // len(methods)} problems", end="", file=sys.stderr, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    print(f"otlabel {otlabel.__version__}, path {args.path}, max_iter {args.max_iter}\n")
    print(summary(rows))


if __name__ == "__main__":
    main()
