"""Streamed CPU solve on N(0,1) logits at eps 0.02, where most entries of ``S / eps`` less its row maximum fall
below -87 and underflow: otlabel's ``exp_`` (``exp2`` for float32 on the CPU) against torch's own ``exp``, whose
float32 CPU kernel takes a slow path for every underflowing result. Side by side in one run, alternating, twice
each; the labels must be equal.

    python -m benchmarks.stream_exp [--n 400000] [--k 100]
"""

from __future__ import annotations

import argparse
import time
import warnings

import numpy as np
import torch

import otlabel.backends.torch_backend as torch_backend
import otlabel.streaming as streaming
from otlabel.streaming import sinkhorn_assign_stream


def torch_exp_(x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """What ``exp_`` replaced: torch's exp, in place or into ``out``."""
    return x.exp_() if out is None else torch.exp(x, out=out)


def per_iteration(scores: np.ndarray, exp_fn, iterations: int = 6) -> tuple[float, torch.Tensor]:
    torch_backend.exp_ = streaming.exp_ = exp_fn  # both modules call it by their own name
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # not converged at tol 1e-12: intended, a fixed count of passes
        start = time.perf_counter()
        res = sinkhorn_assign_stream(scores, 0.02, max_iter=iterations, tol=1e-12)
    return (time.perf_counter() - start) / res.n_iter, res.labels


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=400_000)
    parser.add_argument("--k", type=int, default=100)
    args = parser.parse_args(argv)
    scores = np.random.default_rng(0).standard_normal((args.n, args.k)).astype(np.float32)
    fast = torch_backend.exp_
    times, labels = {"exp2 (otlabel)": [], "torch exp": []}, {}
    try:
        for _ in range(2):
            for name, fn in (("exp2 (otlabel)", fast), ("torch exp", torch_exp_)):
                seconds, labels[name] = per_iteration(scores, fn)
                times[name].append(seconds)
    finally:
        torch_backend.exp_ = streaming.exp_ = fast
    assert torch.equal(*labels.values()), "the two exponentials gave different labels"
    print(f"streamed {args.n:,} x {args.k} N(0,1) scores, eps 0.02, s per iteration (two runs each):")
    for name, values in times.items():
        print(f"  {name:15s} " + " / ".join(f"{v:.3f}" for v in values))
    print(f"  exp2 is {min(times['torch exp']) / min(times['exp2 (otlabel)']):.1f}x faster (best runs); labels equal")


if __name__ == "__main__":
    main()
