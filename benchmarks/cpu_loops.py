"""The compiled CPU loops (``otlabel.backends.cpu_kernels``) one at a time, on one thread, optionally side by side
with another version of that module: the way a change to them is measured (RESULTS_CPU.md, session 22).

Per size, random normal scores (float32, a fixed seed) and outputs allocated once (so page faults are not timed):
the kernel build (``exp_kernel_rows``), the codes and labels from the scores (``softmax_rows``), the labels from the
kernel (``argmax_rows``) and one fused iteration pass (``fused_matvec_rows``). With ``--baseline PATH`` (a copy of
``cpu_kernels.py`` from an earlier commit, e.g. ``git show 49b01f7:otlabel/backends/cpu_kernels.py > /tmp/old.py``)
the two versions alternate call by call, every output must be bitwise the same (else the script fails, exit 1), and
the table gives new / old. Medians of ``--repeats`` calls; the table is printed last.

    python -m benchmarks.cpu_loops [--sizes 1000000x10 100000x1000 ...] [--repeats 9] [--baseline PATH]
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time

import torch

from otlabel.backends import cpu_kernels

DEFAULT_SIZES = ["1000000x10", "4000000x2", "300000x32", "100000x1000", "4096x3000"]
INV_EPS = 20.0


def load_baseline(path: str):
    """The module at ``path`` under a name of its own, registered so that Numba's cache can import it again."""
    name = "otlabel_cpu_kernels_baseline"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    if not module.available():
        raise SystemExit(f"{path}: Numba is not available to it")
    return module


def passes(n: int, k: int, seed: int = 0) -> dict:
    """name -> (function of a module that runs the pass into its own outputs, the outputs to compare)."""
    g = torch.Generator().manual_seed(seed)
    s, b = torch.randn(n, k, generator=g), torch.randn(k, generator=g)
    kernel = torch.rand(n, k, generator=g)
    v, w = torch.rand(k, generator=g), torch.full((n,), 1.0 / n)

    kern, shift, q = torch.empty(n, k), torch.empty(n), torch.empty(n, k)  # outputs, shared by the two versions
    labels = torch.empty(n, dtype=torch.int64)

    def build(mod):
        mod.exp_kernel_rows(s, INV_EPS, b, 0, n, kern, shift)
        return kern, shift

    def codes(mod):
        mod.softmax_rows(s, INV_EPS, b, 0, n, labels, q)
        return labels, q

    def labels_from_scores(mod):
        mod.softmax_rows(s, INV_EPS, b, 0, n, labels)
        return (labels,)

    def labels_from_kernel(mod):
        mod.argmax_rows(kernel, v, 0, n, labels)
        return (labels,)

    def fused_pass(mod):
        return (mod.fused_matvec_rows(kernel, v, w, 0, n),)

    return {"kernel build": build, "codes": codes, "labels from the scores": labels_from_scores,
            "labels from the kernel": labels_from_kernel, "fused pass": fused_pass}  # fmt: skip


def timed(fn, module) -> float:
    start = time.perf_counter()
    fn(module)
    return time.perf_counter() - start


def outputs_equal(fn, new, old) -> bool:
    """The two versions' outputs (copied: they write into the same buffers) are bitwise the same."""
    mine = [t.clone() for t in fn(new)]
    theirs = [t.clone() for t in fn(old)]
    return all(torch.equal(a, b) for a, b in zip(mine, theirs, strict=True))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, metavar="NxK")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--baseline", metavar="PATH", help="another cpu_kernels.py to compare with, side by side")
    args = parser.parse_args(argv)
    if not cpu_kernels.available():
        print("Numba is not installed: there are no compiled loops to time.")
        return 1
    torch.set_num_threads(1)  # each compiled call runs on the calling thread
    old = load_baseline(args.baseline) if args.baseline else None
    rows, failed = [], []
    for size in args.sizes:
        n, k = (int(x) for x in size.lower().split("x"))
        for name, fn in passes(n, k).items():
            versions = [cpu_kernels] if old is None else [cpu_kernels, old]
            if old is not None and not outputs_equal(fn, cpu_kernels, old):
                failed.append(f"{size} {name}")
            for module in versions:
                fn(module)  # compiled and warm before timing
            new_t, old_t = [], []
            for _ in range(args.repeats):  # alternating: the machine's drift hits both alike
                new_t.append(timed(fn, cpu_kernels))
                if old is not None:
                    old_t.append(timed(fn, old))
            new_ms = statistics.median(new_t) * 1e3
            old_ms = statistics.median(old_t) * 1e3 if old is not None else None
            rows.append((size, name, old_ms, new_ms))
    print(f"\nCompiled CPU loops, one thread, medians of {args.repeats} calls (ms)")
    if old is None:
        print("| N x K | pass | ms |\n|---|---|---|")
        for size, name, _, new_ms in rows:
            print(f"| {size} | {name} | {new_ms:.2f} |")
    else:
        print("| N x K | pass | baseline | this tree | this / baseline |\n|---|---|---|---|---|")
        for size, name, old_ms, new_ms in rows:
            print(f"| {size} | {name} | {old_ms:.2f} | {new_ms:.2f} | {new_ms / old_ms:.2f}x |")
    if failed:
        print(f"outputs differ from the baseline's: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
