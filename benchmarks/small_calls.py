"""The fixed cost of a whole CPU call, against the SwAV loop users copy: ``sinkhorn_assign`` then ``res.labels`` and
``res.codes`` (what a trainer reads), side by side with ``otlabel.baselines.swav_sinkhorn`` (3 iterations, its input
checks included: the function a user would call instead).

Per size, cosine scores of unit vectors in 64 dimensions (float32, a fixed seed), eps 0.05, two modes: SwAV's
``max_iter=3, tol=None`` and the default ``tol`` (1e-4; the SwAV loop still runs its 3 iterations there, as users
run it). The calls alternate round by round (the order rotated), so load from other processes falls on all alike;
the table gives the min and median of each, and their ratios to the SwAV loop. Only ratios mean something on a
shared machine.

With ``--baseline DIR`` (a directory holding another version's ``otlabel`` package, e.g. ``mkdir /tmp/old &&
git archive HEAD otlabel kernels | tar -x -C /tmp/old``) that version is imported as a second package and timed in
the same rounds; its labels and codes must be bitwise those of this tree (else the script fails, exit 1), and the
table adds this / baseline. The package is imported from a temporary copy (Numba compiles its loops there once, in
the warm-up).

With ``--pot``, POT's ``ot.sinkhorn`` (NumPy, float64: the cost ``-S`` as a user would pass it, ``stopThr=1e-4``,
then the argmax of its plan) is timed in the same rounds too, in the ``tol 1e-4`` mode, and the table adds
otlabel / POT. ``--labels-only`` reads ``res.labels`` alone (no codes). ``--expect-changes``: a baseline whose outputs
differ does not fail the run; the rows say how much they differ (labels that differ, largest difference of codes).

    python -m benchmarks.small_calls [--sizes 64x10 256x3000 4096x3000] [--seconds 20] [--baseline DIR] [--pot]
        [--labels-only] [--expect-changes]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import otlabel
from otlabel.baselines import swav_sinkhorn

DEFAULT_SIZES = ["64x10", "256x3000", "4096x3000"]
EPS = 0.05
MODES = {"3 it": dict(max_iter=3, tol=None), "tol 1e-4": {}}


def cosine_scores(n: int, k: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    z = torch.nn.functional.normalize(torch.randn(n, 64, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 64, generator=g), dim=1)
    return z @ c.T


def load_baseline(directory: str):
    """A copy of the ``otlabel`` package under ``directory``, imported as ``otlabel_baseline`` (its relative imports
    follow). A copy: Numba's on-disk cache records the module name, and entries written under ``otlabel_baseline``
    beside the original would break its later imports as ``otlabel`` (No module named 'otlabel_baseline')."""
    source = Path(directory) / "otlabel"
    if not (source / "__init__.py").is_file():
        raise SystemExit(f"{directory}: no otlabel/__init__.py there")
    copy = Path(tempfile.mkdtemp(prefix="otlabel_baseline_")) / "otlabel"
    shutil.copytree(source, copy, ignore=shutil.ignore_patterns("__pycache__"), ignore_dangling_symlinks=True)
    kernels = Path(directory) / "kernels"  # installed as otlabel.kernels (a link in a checkout, absent in an archive)
    if not (copy / "kernels").exists() and kernels.is_dir():
        shutil.copytree(kernels, copy / "kernels", ignore=shutil.ignore_patterns("__pycache__"))
    init = copy / "__init__.py"
    name = "otlabel_baseline"
    for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:  # an earlier baseline's modules
        del sys.modules[loaded]
    spec = importlib.util.spec_from_file_location(name, init, submodule_search_locations=[str(init.parent)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def caller(package, scores: torch.Tensor, options: dict, codes: bool = True):
    """One call as a trainer makes it: solve, then read labels and codes (``codes=False``: labels alone); returns
    them."""

    def call():
        res = package.sinkhorn_assign(scores, EPS, **options)
        return (res.labels, res.codes) if codes else (res.labels,)

    return call


def pot_caller(scores: torch.Tensor):
    """POT's ``ot.sinkhorn`` to 1e-4 on the same problem (uniform weights, cost ``-S`` in float64 as a user passes it;
    its ``stopThr`` bounds the same column-marginal L1 error), then the labels: the argmax of its plan per sample."""
    import numpy as np
    import ot

    n, k = scores.shape

    def call():
        a, b = np.full(n, 1.0 / n), np.full(k, 1.0 / k)
        plan = ot.sinkhorn(a, b, -scores.double().numpy(), EPS, stopThr=1e-4)
        return (torch.from_numpy(plan.argmax(axis=1)),)

    return call


def measure(calls: dict, seconds: float, min_rounds: int = 7, max_rounds: int = 2000) -> dict[str, list[float]]:
    """Seconds per call of each of ``calls`` (name -> function), alternating, the order rotated every round; a warm-up
    round first (compilation, allocations), not recorded. Rounds until ``seconds`` have passed (at least
    ``min_rounds``)."""
    names = list(calls)
    for name in names:
        calls[name]()
    times = {name: [] for name in names}
    start = time.perf_counter()
    for round_ in range(max_rounds):
        if round_ >= min_rounds and time.perf_counter() - start > seconds:
            break
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            t0 = time.perf_counter()
            calls[name]()
            times[name].append(time.perf_counter() - t0)
    return times


def same_outputs(ours, theirs) -> bool:
    return all(torch.equal(a, b) for a, b in zip(ours, theirs, strict=True))


def difference(ours, theirs) -> str:
    """How far this tree's outputs are from the baseline's: labels that differ, and the largest codes difference."""
    words = [f"{int((ours[0] != theirs[0]).sum())} labels differ"]
    if len(ours) > 1:
        words.append(f"codes up to {float((ours[1].double() - theirs[1].double()).abs().max()):.1e} apart")
    return ", ".join(words)


def fmt(seconds: float) -> str:
    return f"{seconds * 1e3:.3f} ms" if seconds < 0.1 else f"{seconds * 1e3:.1f} ms"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", nargs="+", default=DEFAULT_SIZES, metavar="NxK")
    parser.add_argument("--seconds", type=float, default=20.0, help="timing per size and mode (all calls together)")
    parser.add_argument("--baseline", metavar="DIR", help="a directory holding another version's otlabel package")
    parser.add_argument("--pot", action="store_true", help="time POT's ot.sinkhorn to 1e-4 too (tol mode)")
    parser.add_argument("--labels-only", action="store_true", help="read res.labels alone, not res.codes")
    parser.add_argument("--expect-changes", action="store_true",
                        help="report, rather than fail on, outputs that differ from the baseline's")  # fmt: skip
    args = parser.parse_args(argv)
    old = load_baseline(args.baseline) if args.baseline else None
    reads = "labels" if args.labels_only else "labels and codes"
    print(f"CPU whole calls ({reads}), eps {EPS}, cosine scores, torch threads {torch.get_num_threads()}: min / median")
    header = "| N x K | mode | iterations | otlabel | SwAV loop (3 it) | otlabel / SwAV: min, median |"
    rule = "|---|---|---|---|---|---|"
    if old is not None:
        header += " baseline | baseline / SwAV: min, median | this / baseline: min, median |"
        rule += "---|---|---|"
    if args.pot:
        header += " POT (1e-4) | otlabel / POT: min, median |"
        rule += "---|---|"
    lines, failed, changes = [header, rule], [], []
    for size in args.sizes:
        n, k = (int(x) for x in size.lower().split("x"))
        scores = cosine_scores(n, k)
        for mode, options in MODES.items():
            codes = not args.labels_only
            calls = {
                "otlabel": caller(otlabel, scores, options, codes),
                "swav": lambda s=scores: swav_sinkhorn(s, EPS, 3),
            }
            if old is not None:
                calls["baseline"] = caller(old, scores, options, codes)
                ours, theirs = calls["otlabel"](), calls["baseline"]()
                if not same_outputs(ours, theirs):
                    failed.append(f"{size} {mode}")
                    changes.append(f"{size} {mode}: {difference(ours, theirs)}")
            with_pot = args.pot and mode == "tol 1e-4"
            if with_pot:
                calls["pot"] = pot_caller(scores)
            n_iter = otlabel.sinkhorn_assign(scores, EPS, **options).n_iter
            times = measure(calls, args.seconds)
            low = {name: min(t) for name, t in times.items()}
            mid = {name: statistics.median(t) for name, t in times.items()}
            line = (
                f"| {n:,} x {k:,} | {mode} | {n_iter} | {fmt(low['otlabel'])} / {fmt(mid['otlabel'])} | "
                f"{fmt(low['swav'])} / {fmt(mid['swav'])} | "
                f"{low['otlabel'] / low['swav']:.2f}, {mid['otlabel'] / mid['swav']:.2f} |"
            )
            if old is not None:
                line += (
                    f" {fmt(low['baseline'])} / {fmt(mid['baseline'])} | "
                    f"{low['baseline'] / low['swav']:.2f}, {mid['baseline'] / mid['swav']:.2f} | "
                    f"{low['otlabel'] / low['baseline']:.2f}, {mid['otlabel'] / mid['baseline']:.2f} |"
                )
            if with_pot:
                line += (
                    f" {fmt(low['pot'])} / {fmt(mid['pot'])} | "
                    f"{low['otlabel'] / low['pot']:.2f}, {mid['otlabel'] / mid['pot']:.2f} |"
                )
            elif args.pot:
                line += " - | - |"
            lines.append(line)
            print(line, f"({len(times['otlabel'])} rounds)", flush=True)
    print("\n" + "\n".join(lines))
    if changes:
        print("\n".join(["outputs that differ from the baseline's:", *changes]))
    if failed and not args.expect_changes:
        print(f"{reads} differ from the baseline's: {', '.join(failed)}", file=sys.stderr)
        raise SystemExit(1)
    if old is not None and not failed:
        print(f"{reads} bitwise equal to the baseline's in every row")


if __name__ == "__main__":
    main()
