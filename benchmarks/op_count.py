"""How many torch operations one ``sinkhorn_assign`` call issues on the triton path, besides its Triton kernels.

A small solve on a GPU (a SwAV batch: 3 iterations, ``tol=None``) is host-bound: every torch operation costs
~10-25 us of host time to dispatch and launch, and the profile of 2026-11-23 saw ~114 of them per call around
~8 Triton launches. This counts them with ``torch.profiler`` (CPU activity only), so the count can be checked on
a machine without a GPU, where the kernels run in Triton's interpreter::

    TRITON_INTERPRET=1 python benchmarks/op_count.py     # CPU, kernels interpreted
    python benchmarks/op_count.py                        # on a CUDA machine

Counted: profiler events named ``aten::...``, except those the Triton interpreter makes inside a kernel launch
(each launch is wrapped in a ``triton::<kernel>`` range and what runs inside it is left out). ``top-level`` are
the operations otlabel itself calls (an ``aten::to`` that copies also runs ``aten::_to_copy``, ``aten::copy_``
and an ``aten::empty_strided``: four events, one top-level operation); on a GPU each top-level operation that
computes something is about one kernel launch.

Scenarios: ``swav`` (the SwAV batch scaled down for the interpreter: N = 256, K = 300, 3 iterations, ``tol=None``,
labels and codes read) and ``tolerance`` (the same scores solved to ``tol=1e-3`` with the default acceleration,
Anderson mixing; labels read).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import functools
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

EPS = 0.05
TRITON_RANGE = "triton::"


def scenarios(n: int, k: int, device: str) -> dict:
    """name -> a function making one call (and reading what a caller reads), returning the result."""
    import otlabel

    gen = torch.Generator().manual_seed(0)
    s = (torch.rand(n, k, generator=gen) * 2 - 1).to(device)  # (N, K) uniform in [-1, 1), like cosine scores

    def swav():
        res = otlabel.sinkhorn_assign(s, EPS, max_iter=3, tol=None, backend="triton")
        res.labels, res.codes  # noqa: B018 (read as a caller would)
        return res

    def tolerance():
        res = otlabel.sinkhorn_assign(s, EPS, max_iter=200, tol=1e-3, backend="triton")
        res.labels  # noqa: B018
        return res

    return {"swav": swav, "tolerance": tolerance}


@contextlib.contextmanager
def triton_launches_marked():
    """Wrap every Triton kernel launch of otlabel's kernel modules in a ``triton::<name>`` profiler range."""
    from otlabel.kernels import sinkhorn_dense, sinkhorn_features

    kernel_types = {
        type(obj)
        for module in (sinkhorn_dense, sinkhorn_features)
        for obj in vars(module).values()
        if hasattr(obj, "run") and hasattr(obj, "fn")  # JITFunction, or InterpretedFunction under the interpreter
    }
    originals = {cls: cls.run for cls in kernel_types}

    def marked(run):
        @functools.wraps(run)
        def wrapper(self, *args, **kwargs):
            with torch.profiler.record_function(TRITON_RANGE + getattr(self.fn, "__name__", "kernel")):
                return run(self, *args, **kwargs)

        return wrapper

    for cls, run in originals.items():
        cls.run = marked(run)
    try:
        yield
    finally:
        for cls, run in originals.items():
            cls.run = run


def inside(event, prefix: str) -> bool:
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith(prefix):
            return True
        parent = parent.cpu_parent
    return False


def count_ops(call, calls: int) -> tuple[collections.Counter, collections.Counter, collections.Counter, int]:
    """Per-call counts: (every aten event, top-level aten operations, Triton launches) by name, and n_iter."""
    from torch.profiler import ProfilerActivity, profile

    res = call()  # warm-up: compiles (or loads) the kernels, fills caches
    with triton_launches_marked(), profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            call()
    every, top, launches = collections.Counter(), collections.Counter(), collections.Counter()
    for event in prof.events():
        if event.name.startswith(TRITON_RANGE):
            launches[event.name] += 1
        elif event.name.startswith("aten::") and not inside(event, TRITON_RANGE):
            every[event.name] += 1
            if not inside(event, "aten::"):
                top[event.name] += 1
    per_call = lambda c: collections.Counter({name: n / calls for name, n in c.items()})  # noqa: E731
    return per_call(every), per_call(top), per_call(launches), res.n_iter


def fmt(x: float) -> str:
    return f"{x:g}"


def report(name: str, every, top, launches, n_iter: int) -> str:
    lines = [
        f"== {name}: {n_iter} iterations; per call: {fmt(sum(top.values()))} top-level aten operations, "
        f"{fmt(sum(every.values()))} aten events in all, {fmt(sum(launches.values()))} Triton launches",
        f"{'operation':<28}{'top-level':>10}{'all':>8}",
    ]
    for op, n in sorted(every.items(), key=lambda item: (-top[item[0]], -item[1], item[0])):
        lines.append(f"{op:<28}{fmt(top[op]):>10}{fmt(n):>8}")
    lines.append("Triton launches: " + ", ".join(f"{k.removeprefix(TRITON_RANGE)} {fmt(v)}" for k, v in
                                                 sorted(launches.items())))  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=256)
    ap.add_argument("--k", type=int, default=300)
    ap.add_argument("--calls", type=int, default=3, help="profiled calls per scenario (counts are per call)")
    ap.add_argument("--scenario", action="append", choices=("swav", "tolerance"))
    args = ap.parse_args(argv)
    if torch.cuda.is_available():
        device = "cuda"
    elif os.environ.get("TRITON_INTERPRET") == "1":
        device = "cpu"
    else:
        sys.exit("no CUDA device: set TRITON_INTERPRET=1 to count on the CPU (the kernels then run interpreted)")
    calls = scenarios(args.n, args.k, device)
    for name in args.scenario or list(calls):
        print(report(f"{name} N={args.n} K={args.k} on {device}", *count_ops(calls[name], args.calls)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
