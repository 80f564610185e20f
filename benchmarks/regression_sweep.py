"""Iterations to tolerance of the default acceleration over a broad set of problems, for comparing two versions.

``acceleration_sweep`` holds each acceleration against plain steps; this one holds a changed default against the
one before it, problem by problem, over what users pass and that sweep leaves out: float32 and float64, heads
(H, N, K), zero-weight clusters, -inf masks, skewed weights, eps 0.001-0.1 and tol 1e-3-1e-8 (float32 down to 1e-6,
above its floor). Each problem is built from its number (a fixed seed):

* scores: Gaussian logits (scale 1 or 3), cosines of noisy features near prototypes (dimension 4-64, noise
  0.1-3), or U(-1, 1); N 10-2,000 and K 2-100 (log-uniform); 1 or 3 heads;
* scores less each row's maximum (which changes nothing); float32 eps raised to keep |scores| / eps within 2,000;
* cluster weights uniform, skewed (logspace 1e-2..1, shuffled) or with 1-3 clusters of weight 0;
* a quarter with -inf masks (20% of the pairs, each sample keeping one cluster with weight); infeasible ones are
  refused before any iteration and counted apart.

    python -m benchmarks.regression_sweep --out old.jsonl                 # on the version before the change
    python -m benchmarks.regression_sweep --out new.jsonl                 # and after it
    python -m benchmarks.regression_sweep --compare old.jsonl new.jsonl   # per-problem ratios new / old
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import warnings

import numpy as np
import torch

import otlabel

PROBLEMS = 320
MAX_ITER = 5_000


def problem(i: int):
    """Problem ``i``: ``(description, scores, cluster_weights)``."""
    rng = np.random.default_rng(20_000 + i)
    dtype = torch.float64 if i % 2 else torch.float32
    heads = 3 if (i // 2) % 4 == 3 else 1
    n = int(round(math.exp(rng.uniform(math.log(10), math.log(2000)))))
    k = int(round(math.exp(rng.uniform(math.log(2), math.log(100)))))
    k = min(k, n)
    eps = float(math.exp(rng.uniform(math.log(1e-3), math.log(0.1))))
    tols = [1e-3, 1e-4, 1e-5, 1e-6] + ([1e-8] if dtype == torch.float64 else [])
    tol = float(rng.choice(tols))
    kind = str(rng.choice(["gauss", "cosine", "uniform"]))
    if kind == "gauss":
        s = float(rng.choice([1.0, 3.0])) * rng.standard_normal((heads, n, k))
    elif kind == "cosine":
        d, noise = int(rng.choice([4, 16, 64])), float(rng.choice([0.1, 0.4, 1.0, 3.0]))
        protos = rng.standard_normal((heads, k, d))
        protos /= np.linalg.norm(protos, axis=-1, keepdims=True)
        feats = protos[:, rng.integers(0, k, n)] + noise / math.sqrt(d) * rng.standard_normal((heads, n, d))
        feats /= np.linalg.norm(feats, axis=-1, keepdims=True)
        s = feats @ protos.transpose(0, 2, 1)
    else:
        s = rng.uniform(-1, 1, (heads, n, k))
    s -= s.max(axis=-1, keepdims=True)  # changes nothing, and keeps float32 within its span limit more often
    if dtype == torch.float32:  # float32 refuses scores / eps beyond 3e3 (ScoreSpanError): stay within 2e3
        eps = max(eps, float(np.abs(s).max()) / 2000)
    weighting = str(rng.choice(["uniform", "skewed", "zero"])) if k > 2 else "uniform"
    w = np.ones(k)
    if weighting == "skewed":
        w = rng.permutation(np.logspace(-2, 0, k))
    elif weighting == "zero":
        w[rng.choice(k, size=min(int(rng.integers(1, 4)), k - 1), replace=False)] = 0.0
    masked = rng.random() < 0.25 and k > 1
    if masked:
        mask = rng.random((heads, n, k)) < 0.2
        keep = rng.choice(np.flatnonzero(w > 0), size=(heads, n))  # each sample keeps one cluster with weight
        np.put_along_axis(mask, keep[..., None], False, axis=-1)
        s[mask] = -np.inf
    scores = torch.from_numpy(s).to(dtype)
    scores = scores if heads > 1 else scores[0]
    desc = dict(i=i, dtype=str(dtype).removeprefix("torch."), heads=heads, n=n, k=k, eps=eps, tol=tol, kind=kind,
                weights=weighting, masked=masked)  # fmt: skip
    return desc, scores, torch.from_numpy(w / w.sum()).to(dtype)


def solve(desc, scores, weights, max_iter: int) -> dict:
    try:
        res = otlabel.sinkhorn_assign(scores, desc["eps"], cluster_weights=weights, tol=desc["tol"], max_iter=max_iter,
                                      warn=False)  # fmt: skip
    except ValueError as err:  # an infeasible mask, refused before any iteration
        if "infeasible" not in str(err):
            raise
        return dict(desc, infeasible=True)
    return dict(desc, infeasible=False, n_iter=res.n_iter, converged=bool(res.converged),
                error=float(res.marginal_error))  # fmt: skip


def compare(old_rows: list[dict], new_rows: list[dict]) -> str:
    """Per-problem ratios new / old iterations: max, median, total, and the problems that moved most."""
    old = {r["i"]: r for r in old_rows if not r["infeasible"]}
    new = {r["i"]: r for r in new_rows if not r["infeasible"]}
    ids = sorted(old.keys() & new.keys())
    header = "| subset | problems | total old -> new | median / geometric mean ratio | max / min ratio | ratio > 1.25"
    lines = [header + " / < 0.8 | converged old -> new |", "|---|---|---|---|---|---|---|"]
    subsets = {"all": lambda r: True, "float32": lambda r: r["dtype"] == "float32",
               "float64": lambda r: r["dtype"] == "float64", "heads": lambda r: r["heads"] > 1,
               "zero weights": lambda r: r["weights"] == "zero", "skewed": lambda r: r["weights"] == "skewed",
               "masked": lambda r: r["masked"], "tol <= 1e-6": lambda r: r["tol"] <= 1e-6}  # fmt: skip
    for name, keep in subsets.items():
        sel = [i for i in ids if keep(old[i])]
        if not sel:
            continue
        ratios = [new[i]["n_iter"] / old[i]["n_iter"] for i in sel]
        geometric = math.exp(statistics.fmean(math.log(x) for x in ratios))
        lines.append(
            f"| {name} | {len(sel)} | {sum(old[i]['n_iter'] for i in sel):,} -> {sum(new[i]['n_iter'] for i in sel):,}"
            f" | {statistics.median(ratios):.3f} / {geometric:.3f} | {max(ratios):.2f} / {min(ratios):.3f} | "
            f"{sum(x > 1.25 for x in ratios)} / {sum(x < 0.8 for x in ratios)} | "
            f"{sum(old[i]['converged'] for i in sel)} -> {sum(new[i]['converged'] for i in sel)} |"
        )
    moved = sorted(ids, key=lambda i: new[i]["n_iter"] / old[i]["n_iter"])
    lines.append("\nLargest ratios (new / old):")
    for i in moved[::-1][:8]:
        r = old[i]
        what = f"{r['dtype']}, H={r['heads']}, {r['n']} x {r['k']}, eps {r['eps']:.3g}, tol {r['tol']:g}, {r['kind']}"
        lines.append(f"  {i}: {r['n_iter']} -> {new[i]['n_iter']}  ({what}, {r['weights']}, masked={r['masked']})")
    lines.append("Smallest ratios:")
    for i in moved[:5]:
        lines.append(f"  {i}: {old[i]['n_iter']} -> {new[i]['n_iter']}")
    return "\n".join(lines)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", help="write one JSON line per problem here")
    ap.add_argument("--problems", type=int, default=PROBLEMS)
    ap.add_argument("--max-iter", type=int, default=MAX_ITER)
    ap.add_argument("--compare", nargs=2, metavar=("OLD", "NEW"), help="compare two --out files instead of solving")
    args = ap.parse_args(argv)
    if args.compare:
        rows = [[json.loads(line) for line in open(path)] for path in args.compare]
        print(compare(*rows))
        return
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    rows = []
    for i in range(args.problems):
        rows.append(solve(*problem(i), args.max_iter))
        if sys.stderr.isatty():
            print(f"\r{i + 1} problems", end="", file=sys.stderr, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    done = [r for r in rows if not r["infeasible"]]
    print(f"otlabel {otlabel.__version__}: {len(done)} problems ({len(rows) - len(done)} infeasible), "
          f"{sum(r['n_iter'] for r in done):,} iterations, {sum(r['converged'] for r in done)} converged")  # fmt: skip


if __name__ == "__main__":
    main()
