"""CPU read-out of labels and soft codes (``res.codes``): the compiled one-pass softmax against the PyTorch ops it
replaced, and a whole SwAV-batch call (3 iterations, labels and codes) against the SwAV-style loop.

Cosine scores of unit vectors in 64 dimensions, float32. Per problem, alternating, ``--repeats`` times each
(medians): ``res.codes`` alone (the solve before it not timed) and the whole call (``sinkhorn_assign(max_iter=3,
tol=None)`` then ``.codes``), each with the compiled pass and with torch's chunked ``argmax``/``softmax`` (the
compiled read-out switched off), and the SwAV loop (3 iterations of ``otlabel.baselines.swav_loop``:
``swav_sinkhorn`` without its input checks). The two read-outs must agree (labels equal, codes within 1e-5), and
the whole call's codes must match the SwAV loop's within 1e-4, or the script fails.

    python -m benchmarks.cpu_readout [--repeats 7] [--sizes 4096x3000 1000000x10 ...]
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

import otlabel
from otlabel.backends.torch_backend import LogDomainOperator
from otlabel.baselines import swav_loop

DEFAULT_SIZES = ["4096x3000", "256x3000", "4096x300", "1000000x10"]
EPSILONS = (0.05, 0.01)  # at 0.01 most entries of a row underflow, where torch's float32 exp is slow


def cosine_scores(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, 64, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 64, generator=g), dim=1)
    return z @ c.T


@contextlib.contextmanager
def torch_read_out():
    """The read-out (``LogDomainOperator.assign``) as before the compiled pass: PyTorch's chunked ``argmax`` and
    ``softmax``. Only there: the cached kernel keeps its compiled exponential and matrix-vector passes."""
    compiled_assign = LogDomainOperator.assign

    def assign(self, b, want_codes):
        self.compiled_loops = lambda: False  # on the instance, for this call
        try:
            return compiled_assign(self, b, want_codes)
        finally:
            del self.compiled_loops

    LogDomainOperator.assign = assign
    try:
        yield
    finally:
        LogDomainOperator.assign = compiled_assign


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def measure(scores: torch.Tensor, eps: float, repeats: int) -> dict[str, float]:
    """Medians (ms), alternating: ``res.codes`` alone (after a solve, not timed) and the whole SwAV-batch call
    (3 iterations, labels and codes) with each read-out, and the SwAV loop. Checks the read-outs agree."""
    times = {"codes": [], "codes, torch": [], "call": [], "call, torch": [], "swav": []}

    def solve():
        return otlabel.sinkhorn_assign(scores, eps, max_iter=3, tol=None)

    for round_ in range(repeats + 1):  # round 0 warms up (compilation, allocations) and is not recorded
        for torch_ops in (False, True):
            with torch_read_out() if torch_ops else contextlib.nullcontext():
                res = solve()
                seconds, codes = timed(lambda res=res: res.codes)
                times["codes, torch" if torch_ops else "codes"].append(seconds)
                seconds, call_codes = timed(lambda: solve().codes)
                times["call, torch" if torch_ops else "call"].append(seconds)
            if torch_ops:
                slow = codes
            else:
                fast = codes
        seconds, theirs = timed(lambda: swav_loop(scores, eps, 3))
        times["swav"].append(seconds)
        if round_ == 0:
            times = {name: [] for name in times}
    worst = float((fast - slow).abs().max())
    if not torch.equal(fast.argmax(dim=1), slow.argmax(dim=1)) or worst > 1e-5:
        raise AssertionError(f"compiled and torch codes disagree: largest difference {worst:.2e}")
    # SwAV's loop is linear-domain float32: rows of codes that underflow there differ; 1e-4 holds at these eps
    apart = float((call_codes - theirs).abs().max())
    if apart > 1e-4:
        raise AssertionError(f"otlabel's codes differ from the SwAV loop's by {apart:.2e}")
    return {name: 1e3 * statistics.median(values) for name, values in times.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, metavar="NxK")
    args = parser.parse_args(argv)
    print(f"CPU read-out, medians of {args.repeats} alternating calls (ms), torch threads: {torch.get_num_threads()}")
    print("| N x K | eps | codes: compiled | codes: torch ops | torch / compiled | whole call: compiled | "
          "whole call: torch ops | SwAV loop |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for size in args.sizes:
        n, k = (int(x) for x in size.lower().split("x"))
        scores = cosine_scores(n, k)
        for eps in EPSILONS:
            t = measure(scores, eps, args.repeats)
            print(f"| {n:,} x {k:,} | {eps:g} | {t['codes']:.2f} | {t['codes, torch']:.2f} | "
                  f"{t['codes, torch'] / t['codes']:.1f}x | {t['call']:.2f} | {t['call, torch']:.2f} | "
                  f"{t['swav']:.2f} |")  # fmt: skip
    print("compiled and torch read-outs agree (labels equal, codes within 1e-5); codes match the SwAV loop within 1e-4")


if __name__ == "__main__":
    main()
