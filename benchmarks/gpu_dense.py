"""GPU benchmark of the dense Triton backend: one Sinkhorn iteration, and a SwAV batch end to end.

Run on a CUDA machine in one call (about 5 minutes on an H100; no new size or sweep setting starts after
``TIME_BUDGET_S``, so a call fits a lent GPU's 10-minute slot, and every row reaches the CSV as it is measured)::

    python benchmarks/gpu_dense.py            # all sizes, rows appended to benchmarks/results_gpu.csv
    python benchmarks/gpu_dense.py --quick    # N = 2**16 only
    python benchmarks/gpu_dense.py --sweep    # also try a few tile shapes at N = 2**20, K = 3000
    python benchmarks/gpu_dense.py --sweep-only --csv $OUT/sweep.csv   # the tile shapes alone
    TRITON_INTERPRET=1 python benchmarks/gpu_dense.py --dry-run --csv /tmp/r.csv   # CPU, tiny: checks the script

Order: (1) correctness of the kernels vs a float64 reference (abort if wrong); (2) the device's copy bandwidth (one
large device-to-device copy, bytes read + written); (3) SwAV-batch latency (N = 4096, K = 3000, 3 iterations, whole
call) with and without a CUDA graph; (4) time per iteration, fp32 and bf16, N in {2^20, 2^18, 2^16}, K in {3000,
1000, 65536} (headline first: the budget cuts the tail), for the triton backend, a plain torch log-domain
iteration, the SwAV-style linear-domain iteration and POT ``sinkhorn_log`` (torch, if installed). Per-iteration
medians and quartiles come from ``triton.testing.do_bench`` (it flushes L2 before each run). The SwAV batch is
timed by the wall clock around each synchronised call instead, rotating over several input copies: ``do_bench``
clears L2 on the stream before its start event, and a call that never waits for the GPU would enqueue its launches
during that clearing and hide its host time. The floor of one iteration is one read of S, ``N * K * itemsize``
bytes; "% copy" is the achieved rate over the measured copy bandwidth.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EPS = 0.05  # SwAV's epsilon; S in [-1, 1] like cosine similarities
MEMORY_LIMIT = 70e9  # bytes we allow one scenario to hold on the device
QUANTILES = [0.25, 0.5, 0.75]
ITERS_POT = 10


def call_budget_s(default: float) -> float:
    """A script's time budget: ``default``, or less where ``OTLABEL_GPU_BUDGET_S`` says so (device_run.sh sets it
    when several stages share one call of a lent GPU)."""
    return min(default, float(os.environ.get("OTLABEL_GPU_BUDGET_S", default)))


TIME_BUDGET_S = call_budget_s(480)  # no new size, batch or sweep setting starts past this: one 10-minute call
_T0 = time.monotonic()
DEVICE = "cuda"  # "cpu" with --dry-run (Triton interpreter, tiny sizes, wall-clock timer, no CUDA graphs)


# --------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------


def _import_otlabel():
    """Import otlabel and its kernels, from an install or straight from this checkout (a bare machine)."""
    try:
        import otlabel.kernels.sinkhorn_dense  # noqa: F401
    except ImportError:
        sys.path.insert(0, str(ROOT))
        import otlabel

        spec = importlib.util.spec_from_file_location(
            "otlabel.kernels", ROOT / "kernels" / "__init__.py", submodule_search_locations=[str(ROOT / "kernels")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules["otlabel.kernels"] = module
        spec.loader.exec_module(module)
        otlabel.kernels = module
    from otlabel.kernels import sinkhorn_dense

    from otlabel.backends.triton import TritonDenseOperator

    return TritonDenseOperator, sinkhorn_dense


def choose_device(dry_run: bool, what: str) -> tuple[str, str] | None:
    """``(device, its name)`` for a GPU script: the CPU under the Triton interpreter with ``--dry-run`` (which
    needs ``TRITON_INTERPRET=1``), else the GPU; ``None``, after saying so, when there is none to measure."""
    if dry_run:
        if os.environ.get("TRITON_INTERPRET") != "1":
            sys.exit("--dry-run runs the kernels on the CPU: set TRITON_INTERPRET=1")
        return "cpu", "cpu (dry run, interpreter)"
    if not torch.cuda.is_available():
        print(f"no CUDA device: this benchmark times {what} and needs one; nothing measured, nothing written.")
        return None
    return "cuda", torch.cuda.get_device_name()


def _versions() -> dict:
    import triton

    try:
        from otlabel.exact import import_pot

        pot = import_pot().__version__
    except ImportError:
        pot = "-"
    return {"torch": torch.__version__, "triton": triton.__version__, "pot": pot, "cuda": torch.version.cuda}


def _dry() -> bool:
    return DEVICE != "cuda"


def _bench(fn) -> list[float]:
    """[q25, median, q75] in ms."""
    if _dry():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return sorted(times)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=200, quantiles=QUANTILES)


def wall_clock(fn, reps: int = 200, warmup: int = 5) -> list[float]:
    """[q25, median, q75] in ms of whole calls, each from a synchronised start to a synchronised end (the device is
    synchronised when CUDA is in use; a CPU run, e.g. a dry run, times the calls as they are)."""
    sync = torch.cuda.synchronize if torch.cuda.is_initialized() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(1e3 * (time.perf_counter() - t0))
    return torch.tensor(times).quantile(torch.tensor(QUANTILES)).tolist()


def past_budget(what: str, budget_s: float = TIME_BUDGET_S, since: float = _T0) -> bool:
    """Whether ``budget_s`` seconds have passed since ``since`` (the script's start), saying what is skipped: the
    GPU scripts start nothing new past their budget, so that one call fits a lent GPU's 10-minute slot."""
    if time.monotonic() - since <= budget_s:
        return False
    print(f"skip {what}: past the {budget_s} s budget of one call")
    return True


def _scores(n: int, k: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    s = torch.empty((n, k), device=DEVICE, dtype=dtype)
    return s.uniform_(-1.0, 1.0, generator=g)  # (N, K), in place: no fp32 temporary for bf16


def _release() -> None:
    """Hand cached blocks back, so the next size does not trip over fragments of the last one."""
    if not _dry():
        torch.cuda.empty_cache()


def _free_bytes() -> float:
    return 1e12 if _dry() else torch.cuda.mem_get_info()[0]


# --------------------------------------------------------------------------------------------------
# baselines, written from their published algorithms
# --------------------------------------------------------------------------------------------------


def swav_iteration(q: torch.Tensor) -> None:
    """One SwAV Sinkhorn iteration on Q (K, N) = exp(S / eps).T, in place (Caron et al. 2020, Alg. 1)."""
    k, n = q.shape
    q /= q.sum(dim=1, keepdim=True)
    q /= k
    q /= q.sum(dim=0, keepdim=True)
    q /= n


def swav_call(s: torch.Tensor, eps: float, iters: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole SwAV ``distributed_sinkhorn`` on one GPU: labels (N,) and codes (N, K)."""
    q = torch.exp(s.float() / eps).t()  # (K, N)
    q /= q.sum()
    for _ in range(iters):
        swav_iteration(q)
    q *= q.shape[1]
    codes = q.t()  # (N, K)
    return codes.argmax(dim=1), codes


def torch_log_iteration(x: torch.Tensor, b: torch.Tensor, log_c: torch.Tensor, log_r: torch.Tensor) -> torch.Tensor:
    """Plain log-domain iteration on x = S / eps (N, K), precomputed: two logsumexp calls."""
    a = log_c - torch.logsumexp(x + b[None, :], dim=1)  # (N,)
    return log_r - torch.logsumexp(x + a[:, None], dim=0)  # (K,)


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------


def check_correctness(op_cls, kernels) -> None:
    """Kernels vs float64 on one-chunk and multi-chunk shapes, fp32 and bf16; exit 1 if wrong."""
    for n, k in [(40, 30), (9, 1100)] if _dry() else [(4096, 3000), (1000, 65536)]:
        for dtype in (torch.float32, torch.bfloat16):
            s = _scores(n, k, dtype, seed=1)
            c = torch.full((n,), 1.0 / n, device=DEVICE)
            b = torch.randn(1, k, device=DEVICE)
            op = op_cls(s[None], EPS, c)
            x = s.double() / EPS  # (N, K)
            a = c.double().log() - torch.logsumexp(x + b.double(), dim=1)
            ref = torch.logsumexp(x + a[:, None], dim=0)
            err = (op.cluster_lse(b)[0].double() - ref).abs().max().item()
            labels, _ = op.assign(b, want_codes=False)
            agree = (labels[0] == (x + b.double()).argmax(1)).float().mean().item()
            ok = err < 1e-3 and agree > 0.999
            print(
                f"check N={n} K={k} {dtype}: max |lse - ref| = {err:.2e}, "
                f"labels agree {agree:.5f} {'ok' if ok else 'FAIL'}"
            )
            if not ok:
                sys.exit("correctness check failed: not timing a wrong kernel")


def copy_bandwidth(rows: list) -> float:
    """Bytes read + written per second by a 4 GiB device-to-device copy."""
    src = torch.empty(2**20 if _dry() else 2**30, dtype=torch.float32, device=DEVICE).fill_(1.0)
    dst = torch.empty_like(src)
    q25, med, q75 = _bench(lambda: dst.copy_(src))
    bw = 2 * src.numel() * 4 / (med * 1e-3)
    rows.append(dict(scenario=f"copy {src.numel() * 4 >> 20} MiB", n=0, k=0, dtype="float32", method="copy",
                     median_ms=med, q25_ms=q25, q75_ms=q75, frac_copy=1.0))  # fmt: skip
    print(f"copy bandwidth (read + write): {bw / 1e9:.1f} GB/s")
    return bw


def time_iteration(op_cls, n: int, k: int, dtype: torch.dtype, rows: list, copy_bw: float, args) -> None:
    """Per-iteration times of every method that fits in memory, at one (N, K, dtype)."""
    item = torch.finfo(dtype).bits // 8
    nk = n * k
    _release()
    budget = min(MEMORY_LIMIT, 0.9 * _free_bytes())
    args.transposed = args.transposed_view and 2 * nk * item <= budget
    if nk * item > budget:
        print(f"skip N={n} K={k} {dtype}: scores alone need {nk * item / 1e9:.0f} GB")
        return
    s = _scores(n, k, dtype)
    c = torch.full((n,), 1.0 / n, device=DEVICE)
    log_c, log_r = c.log(), torch.full((k,), -math.log(k), device=DEVICE)
    b = torch.zeros(k, device=DEVICE)
    floor_bytes = nk * item

    def record(method, fn, per=1):
        q25, med, q75 = (t / per for t in _bench(fn))
        frac = floor_bytes / (med * 1e-3) / copy_bw
        rows.append(dict(scenario="iteration", n=n, k=k, dtype=str(dtype).replace("torch.", ""), method=method,
                         median_ms=med, q25_ms=q25, q75_ms=q75, frac_copy=frac))  # fmt: skip
        print(f"  {method:>12}: {med:9.3f} ms/iter  ({100 * frac:5.1f}% of copy bandwidth)")

    print(f"N={n} K={k} {dtype}")
    op = op_cls(s[None], EPS, c)
    b_h = b[None]
    record("otlabel", lambda: log_r - op.cluster_lse(b_h))
    op = None  # free before the next method allocates
    if args.transposed:
        # The same scores stored (K, N), read through a transposed view: no copy, other access pattern.
        s_t = s.t().contiguous().t()  # (N, K) view, stride (1, N)
        op = op_cls(s_t[None], EPS, c)
        record("otlabel-KxN", lambda: log_r - op.cluster_lse(b_h))
        op = s_t = None
        _release()
    _release()
    if floor_bytes + 4 * nk * 4 <= budget:
        x = s.float() / EPS  # (N, K), once, outside the loop: a user would do the same
        record("torch-log", lambda: torch_log_iteration(x, b, log_c, log_r))
        x = None
        _release()
    if floor_bytes + 2 * nk * 4 <= budget:
        q = torch.exp(s.float() / EPS).t()  # (K, N), once, outside the loop
        q /= q.sum()
        record("swav", lambda: swav_iteration(q))
        q = None
        _release()
    if not args.no_pot and importlib.util.find_spec("ot") is not None and floor_bytes + 5 * nk * 4 <= budget:
        from otlabel.exact import import_pot

        ot = import_pot()
        m = -s.float()  # POT minimises <P, M>: cost = -score
        record("pot-log", lambda: ot.bregman.sinkhorn_log(c, torch.exp(log_r), m, EPS, numItermax=ITERS_POT,
                                                          stopThr=0.0, warn=False), per=ITERS_POT)  # fmt: skip
        m = None


def time_swav_batch(op_cls, rows: list) -> None:
    """Whole call, N = 4096, K = 3000, 3 iterations, labels + codes; eager and CUDA graph, inputs rotated.

    "sinkhorn_assign" is what a user runs (input validation, the loop, labels, codes): the issue-3 latency target
    is judged on it. "otlabel" is the operator loop alone (no validation) and "+graph" its CUDA-graph replay: they
    show what the validation costs and what a captured solve could reach.
    """
    import otlabel

    n, k, iters, copies = (64, 30, 3, 2) if _dry() else (4096, 3000, 3, 4)
    inputs = [_scores(n, k, torch.float32, seed=i) for i in range(copies)]
    c = torch.full((n,), 1.0 / n, device=DEVICE)
    log_r = torch.full((1, k), -math.log(k), device=DEVICE)

    def otlabel_call(s, op=None):
        op = op or op_cls(s[None], EPS, c)
        b = None
        for _ in range(iters):
            b = log_r - op.cluster_lse(b)
        return op.assign(b, want_codes=True)

    def rotate(fns):
        state = {"i": 0}

        def run():
            state["i"] = (state["i"] + 1) % len(fns)
            return fns[state["i"]]()

        return run

    def graphs(make):
        out = []
        for s in inputs:
            fn = make(s)
            fn()  # compile and warm the allocator outside the capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g):
                fn()
            # A graph holds no reference to the tensors it reads and writes: keep fn (its operator and workspace)
            # alive with the replay, or the replay writes into freed memory.
            out.append(lambda g=g, fn=fn: g.replay())
        return out

    def make_otlabel(s):
        op = op_cls(s[None], EPS, c)  # workspace allocated once, outside the graph
        return lambda: otlabel_call(s, op)

    def user_call(s, **options):
        res = otlabel.sinkhorn_assign(s, EPS, max_iter=iters, tol=None, backend="triton", **options)
        return res.labels, res.codes

    candidates = {
        "sinkhorn_assign": rotate([lambda s=s: user_call(s) for s in inputs]),
        "otlabel": rotate([lambda s=s: otlabel_call(s) for s in inputs]),
        "swav": rotate([lambda s=s: swav_call(s, EPS, iters) for s in inputs]),
    }
    if not _dry():
        candidates["sinkhorn_assign cuda_graph"] = rotate([lambda s=s: user_call(s, cuda_graph=True) for s in inputs])
        candidates["otlabel+graph"] = rotate(graphs(make_otlabel))
        candidates["swav+graph"] = rotate(graphs(lambda s: lambda: swav_call(s, EPS, iters)))
    print(f"SwAV batch: N={n} K={k}, {iters} iterations, whole call (labels + codes)")
    for method, fn in candidates.items():
        q25, med, q75 = wall_clock(fn, reps=3 if _dry() else 200)
        rows.append(dict(scenario="swav-batch", n=n, k=k, dtype="float32", method=method,
                         median_ms=med, q25_ms=q25, q75_ms=q75, frac_copy=float("nan")))  # fmt: skip
        print(f"  {method:>14}: {1e3 * med:8.1f} us")


# (K, BLOCK_N, BLOCK_K, num_warps, programs per SM, extra) tried by --sweep at N = 2**20, each with the warm pass
# summing column masses (the default since the second session of 2026-11-23, not yet measured) and, where marked
# "+lse", also log-domain column sums (the only way before). The first of each K is what kernels/utils.py picks today
# (one-row tiles, ``row_tile``); "measured" marks what it picked when last measured on a GPU (2026-11-23, the first GPU
# session). sm_90 (Triton 3.9), instructions of the loop body per real score, fp32 (bf16 within 10%), with masses /
# log-domain: K = 3000 1x4096 w4 14.3 / 26.2 (121 registers, four programs per SM), 4x4096 w16 26.6 / 32.1 (85 / 116,
# one), 1x4096 w8 18.8 / 30.3 (64 / 97, four / two); K = 1000 1x1024 w1 10.2 / 19.1 (117, sixteen), 4x1024 w4 18.8 /
# 22.8 (79 / 115, six / four), 2x1024 w2 13.8 / 19.2.
SWEEP = [
    (3000, 1, 4096, 4, 4, "+lse"), (3000, 4, 4096, 16, 4, "+lse measured"), (3000, 1, 4096, 8, 4, ""),
    (3000, 2, 4096, 16, 2, ""), (3000, 2, 4096, 8, 4, ""),
    (1000, 1, 1024, 1, 16, "+lse"), (1000, 4, 1024, 4, 4, "+lse measured"), (1000, 2, 1024, 2, 8, ""),
    (1000, 1, 1024, 2, 8, ""), (1000, 4, 1024, 4, 8, ""),
    (16384, 4, 2048, 8, 4, "+lse measured"), (16384, 8, 1024, 8, 4, ""), (16384, 2, 4096, 8, 4, ""),
    # K in (4096, 8192]: the one-row tile reads S once (1x8192 w8: 120 registers, no spill); the chunked path of
    # 2026-11-23 reads it twice.
    (6000, 1, 8192, 8, 2, "+lse"), (6000, 4, 2048, 8, 4, "+lse measured"), (6000, 1, 8192, 16, 2, ""),
]  # fmt: skip


def sweep_launches(n: int, k: int, device, sms: int) -> dict:
    """name -> launch for the SWEEP settings at this K, the default launch with and without 16-byte loads, and
    the default with half the clusters 200 nats below the rest (their masses underflow: the merge's exact
    fallback recomputes them, the worst case of the column-mass path)."""
    from otlabel.kernels.utils import dense_launch

    launches = {}
    for _, block_n, block_k, warps, per_sm, extra in [cfg for cfg in SWEEP if cfg[0] == k]:
        for column_mass in (True, False) if extra.startswith("+lse") else (True,):
            name = f"sweep {block_n}x{block_k} w{warps} p{per_sm}/SM {'mass' if column_mass else 'lse'}"
            launches[name] = dense_launch(n, k, 1, device, block_n=block_n, block_k=block_k, num_warps=warps,
                                          n_programs=sms * per_sm, column_mass=column_mass)  # fmt: skip
    # K = 1000, 3000 are multiples of 8 but not 16, so only otlabel's VEC hint gives them vector loads: keep it only
    # if it pays.
    for vector_loads in (True, False):
        launches[f"default launch, vector loads {'on' if vector_loads else 'off'}"] = dense_launch(
            n, k, 1, device, vector_loads=vector_loads
        )
    launches["default launch, half the clusters light"] = dense_launch(n, k, 1, device)
    return launches


def tile_sweep(kernels, rows: list, copy_bw: float) -> None:
    """Time cluster_lse for the SWEEP launch settings: data for tuning kernels/utils.py."""
    n = 2**20
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    for dtype in (torch.float32, torch.bfloat16):
        for k in sorted({cfg[0] for cfg in SWEEP}):
            _release()
            if n * k * s_item(dtype) > 0.9 * _free_bytes() or past_budget(f"the sweep at K={k} {dtype}"):
                continue
            s = _scores(n, k, dtype)[None]  # (1, N, K)
            log_c = torch.full((n,), -math.log(n), device=DEVICE)
            b = torch.zeros(1, k, device=DEVICE)
            light = b.clone()
            light[:, ::2] = -200.0
            for name, launch in sweep_launches(n, k, s.device, sms).items():
                if past_budget(f"sweep {name} K={k} {dtype}"):
                    break
                ws = kernels.DenseWorkspace.for_scores(s, launch)
                bb = light if "light" in name else b
                med = _bench(
                    lambda ws=ws, s=s, b=bb, c=log_c: kernels.dense_cluster_lse(s, b, c, 1 / EPS, workspace=ws)
                )[1]
                frac = n * k * s.element_size() / (med * 1e-3) / copy_bw
                print(f"  {name} {dtype} K={k}: {med:.3f} ms ({100 * frac:.1f}% of copy)")
                rows.append(dict(scenario=name, n=n, k=k, dtype=str(dtype).replace("torch.", ""), method="otlabel",
                                 median_ms=med, q25_ms=float("nan"), q75_ms=float("nan"), frac_copy=frac))  # fmt: skip
            s = None
            _release()


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def s_item(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


class CsvRows(list):
    """The result rows, each appended to the CSV as soon as it is measured: a run cut short keeps what it got."""

    def __init__(self, path: Path, device: str, versions: dict):
        super().__init__()
        self.path, self.device, self.versions = path, device, versions

    def append(self, row: dict) -> None:
        super().append(row)
        write_csv(self.path, [row], self.device, self.versions)


def write_csv(path: Path, rows: list, device: str, versions: dict) -> None:
    """Append GPU rows to their own CSV (``results_gpu.csv``: its columns differ from the suite's results.csv)."""
    fields = ["date", "device", "torch", "triton", "pot", "cuda", "scenario", "n", "k", "dtype", "method",
              "median_ms", "q25_ms", "q75_ms", "frac_copy"]  # fmt: skip
    if path.exists():  # never mix headers: a file started by other columns is moved aside
        with path.open() as f:
            if f.readline().strip().split(",") != fields:
                path.rename(path.with_suffix(f".{datetime.date.today().isoformat()}.csv"))
    new = not path.exists()
    date = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({"date": date, "device": device, **versions, **r})
    print(f"appended {len(rows)} rows to {path}")


def markdown_table(rows: list, device: str) -> str:
    """One line per (dtype, N, K): ms per iteration per method, otlabel's % of copy bandwidth, speed-up."""
    methods = ["otlabel", "otlabel-KxN", "torch-log", "swav", "pot-log"]
    out = [f"Device: {device}. Per iteration, median ms (otlabel: % of measured copy bandwidth).", "",
           "| dtype | N | K | " + " | ".join(methods) + " | swav / otlabel |",
           "|---|---|---|" + "---|" * (len(methods) + 1)]  # fmt: skip
    keys = sorted({(r["dtype"], r["n"], r["k"]) for r in rows if r["scenario"] == "iteration"})
    for dtype, n, k in keys:
        got = {
            r["method"]: r
            for r in rows
            if r["scenario"] == "iteration" and (r["dtype"], r["n"], r["k"]) == (dtype, n, k)
        }
        cells = []
        for m in methods:
            r = got.get(m)
            cells.append(
                "-"
                if r is None
                else f"{r['median_ms']:.3f}" + (f" ({100 * r['frac_copy']:.0f}%)" if m.startswith("otlabel") else "")
            )
        ratio = got["swav"]["median_ms"] / got["otlabel"]["median_ms"] if "swav" in got and "otlabel" in got else None
        out.append(
            f"| {dtype} | 2^{int(math.log2(n))} | {k} | "
            + " | ".join(cells)
            + f" | {'-' if ratio is None else f'{ratio:.1f}x'} |"
        )
    batch = [r for r in rows if r["scenario"] == "swav-batch"]
    if batch:
        out += [
            "",
            f"SwAV batch (N={batch[0]['n']}, K={batch[0]['k']}, 3 iterations, whole call), median us:",
            "",
            "| method | us |",
            "|---|---|",
        ]
        out += [f"| {r['method']} | {1e3 * r['median_ms']:.1f} |" for r in batch]
        us = {r["method"]: r["median_ms"] for r in batch}
        for method in ("sinkhorn_assign", "sinkhorn_assign cuda_graph"):
            if method in us and "swav" in us:
                ratio = us[method] / us["swav"]
                verdict = "met" if ratio <= 0.5 else "NOT met"
                out.append(f"| {method} / swav (eager), target <= 0.5 | {ratio:.2f} ({verdict}) |")
    sweep = [r for r in rows if r["scenario"].startswith(("sweep", "default launch"))]
    if sweep:
        out += ["", "Launch settings at N = 2^20 (one cluster_lse pass), median ms (% of copy bandwidth):", "",
                "| setting | dtype | K | ms |", "|---|---|---|---|"]  # fmt: skip
        out += [f"| {r['scenario']} | {r['dtype']} | {r['k']} | {r['median_ms']:.3f} ({100 * r['frac_copy']:.0f}%) |"
                for r in sweep]  # fmt: skip
        out += sweep_verdicts(sweep)
    return "\n".join(out)


def _measured_tile_name(k: int) -> str:
    """The sweep's name for the tile and column sums the default launch used when last measured (2026-11-23): the
    SWEEP entry of that K marked "measured", with log-domain sums."""
    _, block_n, block_k, warps, per_sm, _ = next(cfg for cfg in SWEEP if cfg[0] == k and "measured" in cfg[5])
    return f"sweep {block_n}x{block_k} w{warps} p{per_sm}/SM lse"


def sweep_verdicts(sweep: list) -> list[str]:
    """Per dtype and K: today's default launch against the one last measured (2026-11-23; time ratio > 1: today's is
    faster), and the fastest setting tried (if it is not the default, kernels/utils.py should follow it)."""
    out = ["", "Default launch against the last measured one (2026-11-23) and the fastest, one pass at N = 2^20:",
           "",
           "| dtype | K | default | measured launch | measured / default | fastest |",
           "|---|---|---|---|---|---|"]  # fmt: skip
    for dtype, k in sorted({(r["dtype"], r["k"]) for r in sweep}):
        rows = {r["scenario"]: r for r in sweep if (r["dtype"], r["k"]) == (dtype, k) and "light" not in r["scenario"]}
        new, old = rows.get("default launch, vector loads on"), rows.get(_measured_tile_name(k))
        fastest = min(rows.values(), key=lambda r: r["median_ms"])

        def cell(r):
            return "-" if r is None else f"{r['median_ms']:.3f} ({100 * r['frac_copy']:.0f}%)"

        ratio = f"{old['median_ms'] / new['median_ms']:.2f}" if new and old else "-"
        out.append(f"| {dtype} | {k} | {cell(new)} | {cell(old)} | {ratio} | {fastest['scenario']} {cell(fastest)} |")
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results_gpu.csv")
    parser.add_argument("--quick", action="store_true", help="N = 2**16 only")
    parser.add_argument("--no-pot", action="store_true", help="skip POT even if installed")
    parser.add_argument("--sweep", action="store_true", help="also time a few tile shapes (tuning data)")
    parser.add_argument("--sweep-only", action="store_true", help="only the tile shapes (after the correctness check)")
    parser.add_argument("--no-transposed", dest="transposed_view", action="store_false",
                        help="skip the (K, N)-stored input read through a transposed view")  # fmt: skip
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes: test the script")
    args = parser.parse_args(argv)
    global DEVICE
    chosen = choose_device(args.dry_run, "GPU kernels")
    if chosen is None:
        return 0
    DEVICE, device = chosen
    op_cls, kernels = _import_otlabel()
    versions = _versions()
    print(f"{device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    check_correctness(op_cls, kernels)
    rows = CsvRows(args.csv, device, versions)
    copy_bw = copy_bandwidth(rows)
    if not args.sweep_only:
        time_swav_batch(op_cls, rows)  # a target of its own, and quick: before the sizes that may run out of time
    sizes = [2**16] if args.quick else [2**20, 2**18, 2**16]  # the headline size first
    clusters = (3000, 1000, 65536)
    if args.dry_run:
        sizes, clusters = [64], (300,)
    if args.sweep_only:
        sizes = []
    for n in sizes:
        for k in clusters:
            for dtype in (torch.float32, torch.bfloat16):
                if not past_budget(f"N={n} K={k} {dtype}"):
                    time_iteration(op_cls, n, k, dtype, rows, copy_bw, args)
    if (args.sweep or args.sweep_only) and not args.dry_run:
        tile_sweep(kernels, rows, copy_bw)
    print(f"total {time.monotonic() - _T0:.0f} s; rows appended to {args.csv}")
    print()
    print(markdown_table(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
