"""Timing, evaluation, and output (CSV rows, markdown sections, plots) shared by every scenario.

Timings: wall-clock ``time.perf_counter`` around the method call only (inputs already converted; on CUDA the
device is synchronised before the clock stops), after one untimed warm-up call, repeated; rows carry the
median and quartiles. Per-iteration time is ``(t(n2) - t(n1)) / (n2 - n1)`` from interleaved pairs of runs
with a fixed iteration count, so one-off setup (validation, otlabel's single ``exp`` pass, POT's kernel)
cancels; whole-call time is reported next to it.

Peak memory (``peak_mb``): the growth of the process's peak resident set (Linux ``VmHWM``, reset through
``/proc/self/clear_refs`` before each call) above the resident set at the start of the call — it sees every
allocation, torch's and NumPy's alike, as pages actually touched. NumPy methods also get ``tracemalloc``'s
peak (NumPy reports its buffers to it; torch's CPU allocator does not, so tracemalloc is blind to torch).
On CUDA, ``torch.cuda.max_memory_allocated`` above the allocation at the start.
"""

from __future__ import annotations

import csv
import datetime as dt
import gc
import math
import os
import platform
import re
import time
import tracemalloc
import warnings
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch

from .methods import Method, Outcome, Unavailable
from .problems import Problem

HERE = Path(__file__).resolve().parent


# ---------------------------------------------------------------------------------------------------------------
# configuration and environment


@dataclass
class Context:
    quick: bool = False
    device: torch.device = torch.device("cpu")
    out: Path = HERE  # results.csv, RESULTS_<DEV>.md and plots/ go here
    repeats: int = 5
    budget_s: float = 60.0  # a single method call is given at most about this long (iteration cap from a probe)
    max_iter: int = 20_000  # the most iterations any time-to-tolerance call may run
    plots: bool = True
    only: tuple[str, ...] = ()  # run only methods whose name contains one of these
    size: tuple[int, int] | None = None  # (N, K) for every scenario instead of its own (smoke tests, --size)

    def pick_size(self, quick: tuple[int, int], full: tuple[int, int]) -> tuple[int, int]:
        return self.size or (quick if self.quick else full)

    def selected(self, methods: dict) -> dict:
        """``methods`` filtered by ``--method`` (all when none was given)."""
        return {k: m for k, m in methods.items() if not self.only or any(s in k for s in self.only)}

    @property
    def sync(self):
        return torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device) -> dict:
    try:
        from otlabel.exact import import_pot

        pot = import_pot().__version__
    except ImportError:
        pot = "absent"
    if device.type == "cuda":
        dev = torch.cuda.get_device_name(device)
    else:
        dev = f"cpu x{torch.get_num_threads()} threads"
    return {
        "date": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": f"{platform.node()} / {cpu_name()} / {os.cpu_count()} cores",
        "device": dev,
        "load_avg": f"{os.getloadavg()[0]:.2f}",
        "torch": torch.__version__,
        "numpy": np.__version__,
        "pot": pot,
        "otlabel": _otlabel_version(),
    }


def _otlabel_version() -> str:
    import otlabel

    return otlabel.__version__


# ---------------------------------------------------------------------------------------------------------------
# rows


@dataclass
class Row:
    scenario: str
    n: int
    k: int
    eps: float
    method: str
    metric: str  # what median/q1/q3 measure: "s/iter", "s/call", "s to 1e-3", "objective gap", "MB peak"
    median: float = math.nan
    q1: float = math.nan
    q3: float = math.nan
    iterations: int | None = None
    marginal_error: float = math.nan  # L1 error of both marginals of the returned plan, measured uniformly
    peak_mb: float = math.nan
    status: str = "ok"  # "ok", "FAILED: <reason>", "TIMEOUT: <reason>", "SKIPPED: <reason>"
    dtype: str = "float32"
    objective_gap: float = math.nan  # (LP optimum - <P, S>) / |LP optimum|
    label_imbalance: float = math.nan  # sum_k |n_k / N - r_k| of the hard labels (0 = balanced)
    note: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


CSV_FIELDS = ["date", "machine", "device", "load_avg", "torch", "numpy", "pot", "otlabel", "mode"] + [
    f.name for f in fields(Row)
]


def append_csv(rows: list[Row], path: Path, env: dict, mode: str) -> None:
    """Append rows; a file with an older header is moved aside (``results.<date>.csv``), never mixed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        with path.open() as f:
            header = f.readline().strip().split(",")
        if header != CSV_FIELDS:
            path.rename(path.with_suffix(f".{dt.date.today().isoformat()}.csv"))
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        for row in rows:
            writer.writerow({**env, "mode": mode, **{k: _csv_value(v) for k, v in asdict(row).items()}})


def _csv_value(v):
    if isinstance(v, float):
        return "" if math.isnan(v) else f"{v:.6g}"
    return "" if v is None else v


# ---------------------------------------------------------------------------------------------------------------
# running and timing one method


def quartiles(xs) -> tuple[float, float, float]:
    if len(xs) == 0:
        return math.nan, math.nan, math.nan
    q1, med, q3 = np.percentile(np.asarray(xs, dtype=float), [25, 50, 75])
    return float(med), float(q1), float(q3)


def call(method: Method, problem: Problem, n_iter: int, tol: float | None, ctx: Context) -> tuple[Outcome, float]:
    """One timed call; returns the outcome and the seconds it took."""
    ctx.sync()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # divide-by-zero / overflow of the linear-domain methods: judged after
        out = method.run(problem, n_iter, tol)
    ctx.sync()
    return out, time.perf_counter() - start


def timed(method: Method, problem: Problem, n_iter: int, ctx: Context, number: int) -> tuple[Outcome, float]:
    """Mean seconds of ``number`` back-to-back fixed-iteration calls (``number > 1`` for calls too short to time)."""
    ctx.sync()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for _ in range(number):
            out = method.run(problem, n_iter, None)
    ctx.sync()
    return out, (time.perf_counter() - start) / number


def failure(exc: BaseException) -> str:
    if isinstance(exc, Unavailable):
        return f"SKIPPED: {exc}"
    message = str(exc).splitlines()[0] if str(exc) else ""
    return f"FAILED: {type(exc).__name__}: {message[:120]}"


def evaluate(problem: Problem, out: Outcome, rows_per_chunk_elements: int = 1 << 22) -> dict:
    """Uniform read-outs of a returned plan (float64, chunk by chunk so big plans need no big temporaries):
    L1 error of both marginals, ``<P, S>``, hard-label balance, and whether anything was NaN/inf."""
    values = out.values() if callable(out.values) else out.values
    if isinstance(values, np.ndarray):
        values = torch.from_numpy(values)
    n, k = problem.n, problem.k
    step = max(1, rows_per_chunk_elements // k)
    col = torch.zeros(k, dtype=torch.float64)
    row_err, objective, finite = 0.0, 0.0, True
    counts = torch.zeros(k, dtype=torch.float64)
    for lo in range(0, n, step):
        p = values[lo : lo + step].to("cpu", torch.float64) * out.scale  # (T, K)
        if not bool(torch.isfinite(p).all()):
            finite = False
            break
        s = problem.scores[lo : lo + step].to("cpu", torch.float64)
        col += p.sum(0)
        row_err += float((p.sum(1) - 1.0 / n).abs().sum())
        objective += float((p * s).sum())
        counts += torch.bincount(p.argmax(1), minlength=k).double()
    if not finite:
        return {"finite": False}
    return {
        "finite": True,
        "marginal_error": float((col - 1.0 / k).abs().sum()) + row_err,
        "objective": objective,
        "label_imbalance": float((counts / n - 1.0 / k).abs().sum()),
    }


def judge(out: Outcome, metrics: dict, tol: float | None) -> str:
    """Status of a finished call: NaN/inf anywhere, or no convergence to ``tol``, is a failure."""
    if not metrics["finite"]:
        return "FAILED: NaN/inf in the plan"
    if any("numerical" in w or "stalls" in w for w in out.warnings):
        return "FAILED: " + "; ".join(out.warnings)[:120]
    if tol is not None:
        converged = out.converged if out.converged is not None else metrics["marginal_error"] <= tol
        if not converged:
            return f"FAILED: no convergence to {tol:g} (L1 error {metrics['marginal_error']:.2g})"
    return "ok"


_PROBES: dict = {}


def iteration_cap(method: Method, problem: Problem, ctx: Context, hard_cap: int) -> int:
    """First guess at the most iterations that fit the time budget, from a 10-iteration probe call (its time
    includes setup, so the guess is low; :func:`time_to_tolerance` raises it when the call was quick). The probe
    doubles as the warm-up and is reused for every eps at one size."""
    key = (method.name, problem.n, problem.k, id(problem.scores))
    if key not in _PROBES:
        _, t = call(method, problem, 10, None, ctx)
        _PROBES[key] = t / 10
    return int(min(hard_cap, max(10, ctx.budget_s / max(_PROBES[key], 1e-9))))


def unavailable(method: Method, problem: Problem, *rows: Row) -> bool:
    """Mark ``rows`` SKIPPED (with the reason) when ``method`` cannot run here; True if so."""
    reason = method.available(problem.device)
    for row in rows if reason else ():
        row.status = f"SKIPPED: {reason}"
    return bool(reason)


def time_to_tolerance(
    method: Method, problem: Problem, tol: float, ctx: Context, scenario: str, hard_cap: int | None = None
) -> Row:
    """Wall-clock seconds for ``method`` to reach marginal error ``tol``, repeated when cheap enough.

    The iteration cap is the time budget: a call that used every allowed iteration in well under the budget is
    rerun with a cap scaled up to it, so only a method that really needs longer than the budget is a TIMEOUT."""
    row = Row(scenario, problem.n, problem.k, problem.epsilon, method.name, f"s to {tol:g}")
    hard_cap = hard_cap or ctx.max_iter
    if unavailable(method, problem, row):
        return row
    try:
        method.prepare_inputs(problem)
        if method.prepare:
            method.prepare(problem, tol)
        cap = iteration_cap(method, problem, ctx, hard_cap)
        while True:
            out, first = call(method, problem, cap, tol, ctx)
            metrics = evaluate(problem, out)
            row.status = judge(out, metrics, tol)
            exhausted = out.n_iter < 0 or out.n_iter >= cap  # SeLa does not say: assume it used them all
            unfinished = row.status.startswith("FAILED: no convergence") and exhausted and cap < hard_cap
            if not unfinished or first >= ctx.budget_s / 2:
                break
            cap = int(min(hard_cap, cap * min(10.0, max(2.0, ctx.budget_s / max(first, 1e-6)))))
        row.iterations = out.n_iter if out.n_iter >= 0 else None
        row.marginal_error = metrics.get("marginal_error", math.nan)
        if not row.ok:
            if unfinished:
                row.status = (
                    f"TIMEOUT: not converged in the {ctx.budget_s:g} s budget ({cap} iterations, "
                    f"L1 error {row.marginal_error:.2g})"
                )
                row.median = first
                row.note = "time is a lower bound"
            return row
        times = [first]
        repeats = min(ctx.repeats, max(0, int(ctx.budget_s / max(first, 1e-9))))
        for _ in range(repeats - 1):
            times.append(call(method, problem, cap, tol, ctx)[1])
        row.median, row.q1, row.q3 = quartiles(times)
    except Exception as exc:  # noqa: BLE001 - every failure becomes a row, never a crash or an omission
        row.status = failure(exc)
    return row


MIN_SAMPLE_S = 0.05  # a timing sample of short calls repeats them until it lasts about this long
MAX_EXTRA_ITERS = 400


def per_iteration(
    method: Method,
    problem: Problem,
    ctx: Context,
    scenario: str,
    n1: int = 2,
    n2: int = 12,
    repeats: int | None = None,
    adaptive: bool = False,
) -> list[Row]:
    """Per-iteration time from interleaved fixed-iteration calls, and the whole-call time at ``n2``.

    ``adaptive`` raises ``n2`` (up to ``n1 + MAX_EXTRA_ITERS``) until the iterations take about twice the
    setup, so the difference is not lost in the noise of the setup on a busy machine."""
    base = dict(scenario=scenario, n=problem.n, k=problem.k, eps=problem.epsilon, method=method.name)
    rows = [Row(**base, metric="s/iter"), Row(**base, metric="s/call")]
    if unavailable(method, problem, *rows):
        return rows
    repeats = repeats or ctx.repeats
    try:
        method.prepare_inputs(problem)
        _, t1 = call(method, problem, n1, None, ctx)  # warm-up (and a check that it runs)
        _, t2 = call(method, problem, n2, None, ctx)
        if adaptive:  # enough iterations that they, not the setup, dominate the difference
            per_iter = max((t2 - t1) / (n2 - n1), t2 / n2 / 20, 1e-7)
            n2 = n1 + int(min(MAX_EXTRA_ITERS, max(n2 - n1, 2 * t1 / per_iter)))
            _, t2 = call(method, problem, n2, None, ctx)
        number = max(
            1, math.ceil(MIN_SAMPLE_S * (0.4 if ctx.quick else 1) / max(t2, 1e-6))
        )  # calls per timing sample, like timeit
        diffs, wholes = [], []
        for _ in range(repeats):
            _, t1 = timed(method, problem, n1, ctx, number)
            out, t2 = timed(method, problem, n2, ctx, number)
            diffs.append((t2 - t1) / (n2 - n1))
            wholes.append(t2)
        metrics = evaluate(problem, out)
        status = judge(out, metrics, None)
        rows[1].iterations = n2
        rows[1].metric = f"s/call ({n2} it)"
        for r, xs in zip(rows, (diffs, wholes), strict=True):
            r.median, r.q1, r.q3 = quartiles(xs)
            r.status = status
            r.marginal_error = metrics.get("marginal_error", math.nan)
        rows[0].iterations = n2 - n1
    except Exception as exc:  # noqa: BLE001
        for r in rows:
            r.status = failure(exc)
    return rows


def peak_memory(method: Method, problem: Problem, n_iter: int, ctx: Context) -> tuple[float, float]:
    """(peak RSS growth in MB, tracemalloc peak in MB) of one call; on CUDA the first is the allocator's peak."""
    method.prepare_inputs(problem)
    gc.collect()
    _release_freed_heap()
    if ctx.device.type == "cuda":
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = _rss_kb()
        _reset_peak_rss()
    tracemalloc.start()
    try:
        out, _ = call(method, problem, n_iter, None, ctx)
        values = out.values() if callable(out.values) else out.values  # otlabel's codes (lazy) included
        _, traced = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    if ctx.device.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (_peak_rss_kb() - base) / 1024
    del values, out
    return peak, traced / 2**20


_LIBC = None


def _release_freed_heap() -> None:
    """Make freed memory visible to the RSS measurement: glibc keeps freed blocks in its heap (and, after a large
    free, raises its mmap threshold so later large blocks come from that heap too), so a call could reuse memory
    an earlier one freed without the resident set growing. Fix the mmap threshold at 128 KiB (large buffers are
    mapped and unmapped, as a fresh process would) and trim the heap before each measurement."""
    global _LIBC
    try:
        import ctypes

        if _LIBC is None:
            _LIBC = ctypes.CDLL("libc.so.6")
            _LIBC.mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD: a fixed value also turns off its dynamic growth
        _LIBC.malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: the measurement may under-count reused memory
        pass


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1])
    return 0


def _rss_kb() -> int:
    return _status_kb("VmRSS:")


def _peak_rss_kb() -> int:
    return _status_kb("VmHWM:")


def _reset_peak_rss() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:  # not Linux: VmHWM is then the process peak so far (an over-estimate)
        pass


def memory_method_supported() -> bool:
    return Path("/proc/self/status").exists()


# ---------------------------------------------------------------------------------------------------------------
# markdown and plots


def fmt_time(x: float) -> str:
    if not math.isfinite(x):
        return "—"
    if x >= 1:
        return f"{x:.2f} s"
    if x >= 1e-3:
        return f"{x * 1e3:.1f} ms"
    return f"{x * 1e6:.0f} µs"


def fmt_num(x: float, spec: str = ".2g") -> str:
    return "—" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def markdown_table(headers: list[str], lines: list[list[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in line) + " |" for line in lines]
    return "\n".join(out)


def status_cell(row: Row) -> str:
    if row.ok:
        return "ok"
    word, _, reason = row.status.partition(": ")
    return f"**{word}** ({reason})" if word in ("FAILED", "TIMEOUT") else f"{word.lower()} ({reason})"


def write_section(path: Path, name: str, body: str, env: dict, title: str) -> None:
    """Replace (or add) the section of scenario ``name`` in the markdown results file, keeping the others."""
    start, end = f"<!-- scenario:{name} -->", f"<!-- /scenario:{name} -->"
    header = (
        f"{start}\n## {title}\n\n*{env['date']} — {env['machine']} — {env['device']} — load average "
        f"{env['load_avg']} — torch {env['torch']}, NumPy {env['numpy']}, POT {env['pot']}, "
        f"otlabel {env['otlabel']}*\n\n"
    )
    block = header + body.strip() + "\n" + end
    text = path.read_text() if path.exists() else RESULTS_PREAMBLE
    pattern = re.compile(re.escape(start) + r".*?" + re.escape(end), re.S)
    text = pattern.sub(lambda _: block, text) if pattern.search(text) else text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text)


RESULTS_PREAMBLE = """# otlabel benchmark results

Written by `python -m benchmarks` (one section per scenario, replaced when that scenario is rerun; every run also
appends its rows to `results.csv`). On a CPU an absolute time means little: compare the methods *within* a
table — they were measured side by side in one run, on the same inputs. FAILED and TIMEOUT rows are runs that
produced NaN/inf, did not converge, or did not finish in the time budget; they are kept, never dropped.
"""


def plot_path(ctx: Context, name: str) -> Path:
    path = ctx.out / "plots" / f"{name}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def save_plot(fig, ctx: Context, name: str) -> list[Path]:
    """Lay out, write ``plots/<name>.png`` and close ``fig``; returns the paths a scenario reports."""
    fig.tight_layout()
    path = plot_path(ctx, name)
    fig.savefig(path, dpi=110)
    pyplot().close(fig)
    return [path]


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
