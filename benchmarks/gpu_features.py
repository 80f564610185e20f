"""GPU benchmark of features mode: one Sinkhorn iteration on S = Z Cᵀ that is never stored.

Run on a CUDA machine in one call (about 6-8 minutes on an H100, most of it compiling; flash-sinkhorn from the
wheel carried in ``.whl/``)::

    pip install --no-deps .whl/flash_sinkhorn-0.4.1-py3-none-any.whl   # if not installed
    python benchmarks/gpu_features.py              # rows appended to benchmarks/results_gpu.csv
    python benchmarks/gpu_features.py --quick      # N = 2**18 only
    python benchmarks/gpu_features.py --no-sweep   # skip the tile sweep at the end
    TRITON_INTERPRET=1 python benchmarks/gpu_features.py --dry-run --csv /tmp/r.csv   # CPU, tiny: checks the script

Order: (1) correctness of the features kernels vs float64 (abort if wrong), and a cross-check that
flash-sinkhorn solves the same problem (same potentials up to a constant, same labels); (2) device rates:
copy bandwidth, tensor-core matmul rate (bf16, tf32) and exp2 rate (a Triton kernel that only exponentiates);
(3) peak extra memory and time of features mode at the issue's target size (N = 1.28M, K = 3000, D = 128);
(4) time per warm iteration and peak extra device memory, D = 128, fp32 inputs (tf32 tensor cores) and bf16,
N in {2^18, 2^20}, K in {3000, 4096}, for

* ``otlabel-features`` — ``TritonFeaturesOperator.cluster_lse`` (this scale variant);
* ``otlabel-features-fp16`` — fp32 inputs with ``input_precision="fp16"`` (power-of-two scaled, rounded to fp16 in
  the kernel: tf32's mantissa at the fp16 tensor-core rate);
* ``otlabel-features-ieee`` — the same with exact fp32 products (fp32 rows, N = 2^18 only);
* ``otlabel-dense`` — ``TritonDenseOperator.cluster_lse`` on ``S = Z @ C.T`` materialised in fp32 once,
  outside the timing (its peak memory includes S);
* ``flash-sinkhorn`` — ``flash_sinkhorn.kernels.sinkhorn_flashstyle_alternating`` (v0.4.1, balanced, fixed
  eps, autotuned, tf32), the same problem: with L2-normalised Z and C, its cost ``0.5 ||z - c||^2`` (cost_scale
  0.5) is ``1 - <z, c>``, so at the same eps its plan is ours (DESIGN.md §2). One of its iterations is an
  f-update (LSE over the K prototypes per sample) and a g-update (LSE over the N samples per prototype): ours.
  It works in fp32 only (bf16 inputs are upcast inside the call, a cost it pays once per call). Timed over
  ``FLASH_ITERS`` iterations per call, divided.

(5) a sweep of tile shapes for the features kernel at N = 2^20, K = 3000 (tuning data, skipped past a time
budget). Medians and quartiles come from ``triton.testing.do_bench``. "Peak extra" is
``max_memory_allocated`` during operator construction plus one iteration, minus what was allocated before
(the inputs). The floor of a warm features iteration is ``max(4 N K D / matmul rate, 2 N K / exp2 rate,
bytes / copy bandwidth)`` from the rates measured in (2) (see ``otlabel/kernels/sinkhorn_features.py``); in the
CSV, ``frac_copy`` holds the achieved fraction of that floor for features rows, and of the copy bandwidth
(one read of S) for dense rows, as ``gpu_dense.py`` does. The peak extra memory is in the ``scenario`` field.
"""

from __future__ import annotations

import argparse
import functools
import importlib.util
import math
import os
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
EPS = 0.05  # SwAV's epsilon; S in [-1, 1] (cosine similarities)
D = 128
FLASH_ITERS = 10
QUANTILES = [0.25, 0.5, 0.75]
# No new main scenario starts past MAIN_BUDGET_S seconds (each may compile for a minute), nor a sweep configuration
# past TIME_BUDGET_S: one call fits a 10-minute device slot (less where OTLABEL_GPU_BUDGET_S says so).
TIME_BUDGET_S = min(420.0, float(os.environ.get("OTLABEL_GPU_BUDGET_S", 420)))
MAIN_BUDGET_S = min(300.0, 0.75 * TIME_BUDGET_S)
DEVICE = "cuda"  # "cpu" with --dry-run (Triton interpreter, tiny sizes, wall-clock timer)
WHEEL = ".whl/flash_sinkhorn-0.4.1-py3-none-any.whl"
# Datasheet rates of an H100 SXM, printed next to the measured ones: dense bf16 and tf32 tensor-core FLOP/s,
# exp2/s on the special-function units (16 per SM per clock, 132 SMs, 1.83 GHz), HBM3 bytes/s.
H100_SXM = {"bf16": 989e12, "tf32": 494e12, "exp2": 3.9e12, "hbm": 3.35e12}

_T0 = time.monotonic()


# --------------------------------------------------------------------------------------------------
# setup
# --------------------------------------------------------------------------------------------------


@functools.cache
def _gpu_dense():
    """The dense benchmark module (loaded once): its importer (works on a bare checkout), versions, CSV writer and
    time budget."""
    spec = importlib.util.spec_from_file_location("gpu_dense", ROOT / "benchmarks" / "gpu_dense.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dry() -> bool:
    return DEVICE != "cuda"


def _bench(fn, rep: int = 200) -> list[float]:
    """[q25, median, q75] in ms."""
    if _dry():
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(1e3 * (time.perf_counter() - t0))
        return sorted(times)
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=rep, quantiles=QUANTILES)


def _sync() -> None:
    if not _dry():
        torch.cuda.synchronize()


def _release() -> None:
    if not _dry():
        torch.cuda.empty_cache()


def peak_extra_bytes(fn) -> tuple[float, object]:
    """(bytes allocated on the device by ``fn()`` at its peak beyond what was allocated before, its result).

    NaN on the CPU (dry run): torch has no allocator statistics there.
    """
    if _dry():
        return float("nan"), fn()
    _sync()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    _sync()
    return torch.cuda.max_memory_allocated() - base, out


def unit_inputs(n: int, k: int, d: int, dtype: torch.dtype, seed: int = 0):
    """L2-normalised features Z (N, D) and prototypes C (K, D), rounded to ``dtype`` (SwAV's setting)."""
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    z = torch.randn((n, d), device=DEVICE, generator=g)
    z = torch.nn.functional.normalize(z, dim=1).to(dtype)
    c = torch.nn.functional.normalize(torch.randn((k, d), device=DEVICE, generator=g), dim=1).to(dtype)
    return z, c


def flash_module():
    """``flash_sinkhorn`` if importable, else None with a message saying how to install it."""
    if _dry():
        print("flash-sinkhorn: skipped in a dry run (it needs CUDA tensors)")
        return None
    try:
        import flash_sinkhorn  # noqa: F401
        from flash_sinkhorn.kernels import sinkhorn_flashstyle_alternating
    except ImportError as exc:
        where = ROOT / WHEEL
        hint = (
            f"pip install --no-deps {where}"
            if where.exists()
            else "pip download --no-deps -d .whl flash-sinkhorn==0.4.1"
        )
        print(f"flash-sinkhorn NOT AVAILABLE ({exc}); its rows are missing. Install it with: {hint}")
        return None
    print(f"flash-sinkhorn {flash_sinkhorn.__version__} from {Path(flash_sinkhorn.__file__).parent}")
    return sinkhorn_flashstyle_alternating


def flash_solve(solve, z, c, w, r, iters: int):
    """flash-sinkhorn's balanced alternating solver on our problem; returns its target potential g (K,)."""
    _, g = solve(z, c, w, r, eps=EPS, n_iters=iters, cost_scale=0.5, allow_tf32=True, autotune=True)
    return g


# --------------------------------------------------------------------------------------------------
# measurements
# --------------------------------------------------------------------------------------------------


def check_correctness(features_op, flash) -> None:
    """Features kernels vs float64 (exact fp32, tf32, bf16); flash-sinkhorn vs ours on the same problem."""
    n, k = (48, 40) if _dry() else (4096, 3000)
    for dtype, tf32 in ((torch.float32, False), (torch.float32, True), (torch.bfloat16, True)):
        z, c = unit_inputs(n, k, D, dtype, seed=1)
        w = torch.full((n,), 1.0 / n, device=DEVICE)
        b = 0.3 * torch.randn(1, k, device=DEVICE)
        op = features_op(z, c[None], None, EPS, w, allow_tf32=tf32)
        x = (z.double() @ c.double().T) / EPS  # (N, K)
        a = w.double().log() - torch.logsumexp(x + b.double(), dim=1)
        ref = torch.logsumexp(x + a[:, None], dim=0)
        err = (op.cluster_lse(b)[0].double() - ref).abs().max().item()
        labels, _ = op.assign(b, want_codes=False)
        agree = (labels[0] == (x + b.double()).argmax(1)).double().mean().item()
        limit, need = (1e-3, 0.999) if dtype != torch.float32 or not tf32 else (5e-2, 0.99)
        ok = err < limit and agree >= need
        name = f"{dtype}{'-tf32' if tf32 else '-ieee' if dtype == torch.float32 else ''}"
        print(f"check N={n} K={k} D={D} {name}: max |lse - ref| = {err:.2e}, labels agree {agree:.5f} "
              f"{'ok' if ok else 'FAIL'}")  # fmt: skip
        if not ok:
            sys.exit("correctness check failed: not timing a wrong kernel")
    if flash is None:
        return
    # Same problem, same eps, same iterations: flash's g maps to our b = log r + (g - |c|^2 / 2) / eps (+ const).
    z, c = unit_inputs(n, k, D, torch.float32, seed=2)
    w = torch.full((n,), 1.0 / n, device=DEVICE)
    r = torch.full((k,), 1.0 / k, device=DEVICE)
    iters = 10
    op = features_op(z, c[None], None, EPS, w, allow_tf32=True)
    b = r.log()[None].clone()  # flash starts from g = 0, i.e. b = log r
    for _ in range(iters):
        b = r.log() - op.cluster_lse(b)
    g = flash_solve(flash, z, c, w, r, iters)
    b_flash = r.log() + (g - 0.5 * c.float().pow(2).sum(1)) / EPS
    gap = ((b[0] - b[0].mean()) - (b_flash - b_flash.mean())).abs().max().item()
    same = (op.assign(b, False)[0] == op.assign(b_flash[None], False)[0]).double().mean().item()
    verdict = "ok" if gap < 0.05 and same > 0.99 else "MISMATCH: the flash-sinkhorn rows do not solve our problem"
    print(f"check flash-sinkhorn, {iters} iterations: max |b - b_flash| (centred) = {gap:.2e}, "
          f"same labels {same:.5f} {verdict}")  # fmt: skip


def device_rates(rows: list) -> dict:
    """Measured copy bandwidth (read + write), matmul FLOP/s (bf16, tf32) and exp2/s; raw times go to the CSV."""
    from otlabel.kernels.utils import sm_count

    def record(scenario, method, ms):
        rows.append(dict(scenario=scenario, n=0, k=0, dtype="-", method=method, median_ms=ms[1], q25_ms=ms[0],
                         q75_ms=ms[2], frac_copy=float("nan")))  # fmt: skip
        return ms[1] * 1e-3

    size = 2**20 if _dry() else 2**30
    src = torch.ones(size, dtype=torch.float32, device=DEVICE)
    dst = torch.empty_like(src)
    rates = {"copy": 2 * size * 4 / record(f"copy {size * 4 >> 20} MiB", "copy", _bench(lambda: dst.copy_(src)))}
    src = dst = None
    m = 64 if _dry() else 8192
    old = torch.backends.cuda.matmul.allow_tf32
    for name, dtype in (("bf16", torch.bfloat16), ("tf32", torch.float32)):
        a = torch.randn(m, m, device=DEVICE).to(dtype)
        torch.backends.cuda.matmul.allow_tf32 = True
        ms = _bench(lambda a=a: a @ a)
        torch.backends.cuda.matmul.allow_tf32 = old
        rates[name] = 2 * m**3 / record(f"matmul {m}^3 {name}", "torch.mm", ms)
    a = None
    programs, reps = (2, 4) if _dry() else (sm_count(torch.device(DEVICE)) * 16, 2048)
    x = -torch.rand(programs * 1024, device=DEVICE)
    ms = _bench(lambda: _exp2_only(x, reps))
    rates["exp2"] = x.numel() * reps / record(f"exp2 {x.numel()}x{reps}", "triton-exp2", ms)
    print("measured: copy {:.0f} GB/s, bf16 {:.0f} TFLOP/s, tf32 {:.0f} TFLOP/s, exp2 {:.2f} T/s".format(
        rates["copy"] / 1e9, rates["bf16"] / 1e12, rates["tf32"] / 1e12, rates["exp2"] / 1e12))  # fmt: skip
    sheet = H100_SXM
    print(
        f"H100 SXM datasheet: HBM {sheet['hbm'] / 1e9:.0f} GB/s, bf16 {sheet['bf16'] / 1e12:.0f} TFLOP/s, "
        f"tf32 {sheet['tf32'] / 1e12:.0f} TFLOP/s, exp2 {sheet['exp2'] / 1e12:.1f} T/s"
    )
    return rates


def _exp2_only(x: torch.Tensor, reps: int) -> torch.Tensor:
    import triton
    from otlabel.kernels.utils import interpreting

    _exp2_kernel = _exp2_kernel_factory()
    out = torch.empty_like(x)
    _exp2_kernel[(triton.cdiv(x.numel(), 1024),)](
        x, out, reps, BLOCK=1024, **({} if interpreting() else {"num_warps": 4})
    )
    return out


_EXP2_KERNEL = None


def _exp2_kernel_factory():
    """A kernel that only exponentiates: x <- -exp2(x) stays in [-1, -0.5], 8 independent chains per thread."""
    global _EXP2_KERNEL
    if _EXP2_KERNEL is None:
        import triton
        import triton.language as tl

        @triton.jit
        def _exp2_kernel(X, OUT, REPS, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            x = tl.load(X + offs)
            for _ in range(REPS):
                x = -tl.exp2(x)
            tl.store(OUT + offs, x)

        _EXP2_KERNEL = _exp2_kernel
    return _EXP2_KERNEL


def floor_ms(n: int, k: int, d: int, dtype: torch.dtype, rates: dict, n_programs: int) -> float:
    """max(matmul, exp2, HBM) time of one warm features iteration (two sweeps) at the measured rates."""
    item = torch.finfo(dtype).bits // 8
    flops = 4 * n * k * d
    exps = 2 * n * k
    nbytes = n * d * item + 2 * 2 * n_programs * k * 4
    mm = rates["bf16" if item == 2 else "tf32"]
    return 1e3 * max(flops / mm, exps / rates["exp2"], nbytes / rates["copy"])


def time_iteration(ops, flash, n: int, k: int, dtype: torch.dtype, rows: list, rates: dict, args) -> None:
    """Per-iteration time and peak extra memory of features mode, the dense kernel and flash-sinkhorn."""
    features_op, dense_op = ops
    dname = str(dtype).replace("torch.", "")
    _release()
    z, c = unit_inputs(n, k, D, dtype)
    w = torch.full((n,), 1.0 / n, device=DEVICE)
    r = torch.full((k,), 1.0 / k, device=DEVICE)
    log_r = r.log()
    b = 0.1 * torch.randn(1, k, device=DEVICE)

    def record(method, ms, peak, frac, per=1):
        q25, med, q75 = (t / per for t in ms)
        rows.append(dict(scenario=f"features D={D} peak_extra_MB={peak / 2**20:.1f}", n=n, k=k, dtype=dname,
                         method=method, median_ms=med, q25_ms=q25, q75_ms=q75, frac_copy=frac(med)))  # fmt: skip
        print(f"  {method:>22}: {med:9.3f} ms/iter  peak extra {peak / 2**20:9.1f} MB  ({100 * frac(med):5.1f}%)")

    print(f"N={n} K={k} D={D} {dname}")
    for method, precision in (("otlabel-features", "tf32"), ("otlabel-features-fp16", "fp16"),
                              ("otlabel-features-ieee", "ieee")):  # fmt: skip
        if precision != "tf32" and dtype != torch.float32 or precision == "ieee" and n > 2**18:
            continue

        def build(precision=precision):
            return _first_iteration(features_op(z, c[None], None, EPS, w, input_precision=precision), b)

        peak, op = peak_extra_bytes(build)
        floor = floor_ms(
            n, k, D, torch.float16 if precision == "fp16" else dtype, rates, op._workspace.launch.n_programs
        )
        record(method, _bench(lambda op=op: log_r - op.cluster_lse(b)), peak, lambda med, f=floor: f / med)
        op = None
    _release()

    def dense():
        s = (z.float() @ c.float().T)[None]  # (1, N, K) fp32, once: what a user of the dense path holds
        return _first_iteration(dense_op(s, EPS, w), b)

    if n * k * 4 * 1.2 < _free_bytes():
        peak, op = peak_extra_bytes(dense)
        copy_frac = lambda med: n * k * 4 / (med * 1e-3) / rates["copy"]  # noqa: E731
        record("otlabel-dense", _bench(lambda: log_r - op.cluster_lse(b)), peak, copy_frac)
        op = None
        _release()
    if flash is not None:
        flash_solve(flash, z, c, w, r, 1)  # compile and autotune outside the timing
        peak, _ = peak_extra_bytes(lambda: flash_solve(flash, z, c, w, r, FLASH_ITERS))
        floor = floor_ms(n, k, D, torch.float32, rates, 0)  # it works in fp32 with tf32
        ms = _bench(lambda: flash_solve(flash, z, c, w, r, FLASH_ITERS), rep=500)
        record("flash-sinkhorn", ms, peak, lambda med: floor / med, per=FLASH_ITERS)
        _release()


def _first_iteration(op, b):
    op.cluster_lse(b)  # allocates whatever the operator allocates lazily, compiles the kernels
    return op


def _free_bytes() -> float:
    return 1e12 if _dry() else torch.cuda.mem_get_info()[0]


def target_size(features_op, rows: list, rates: dict) -> None:
    """The issue's memory target: N = 1.28M, K = 3000, D = 128, peak extra < 64 MB."""
    n, k = (100, 30) if _dry() else (1_281_167, 3000)
    for dtype in (torch.float32, torch.bfloat16):
        z, c = unit_inputs(n, k, D, dtype)
        w = torch.full((n,), 1.0 / n, device=DEVICE)
        b = torch.zeros(1, k, device=DEVICE)
        peak, op = peak_extra_bytes(
            lambda z=z, c=c, w=w, b=b: _first_iteration(features_op(z, c[None], None, EPS, w), b)
        )
        ms = _bench(lambda op=op, b=b: op.cluster_lse(b))
        floor = floor_ms(n, k, D, dtype, rates, op._workspace.launch.n_programs)
        dname = str(dtype).replace("torch.", "")
        rows.append(dict(scenario=f"target D={D} peak_extra_MB={peak / 2**20:.1f}", n=n, k=k, dtype=dname,
                         method="otlabel-features", median_ms=ms[1], q25_ms=ms[0], q75_ms=ms[2],
                         frac_copy=floor / ms[1]))  # fmt: skip
        ws = op._workspace
        planned = (ws.pmax.nbytes + ws.psum.nbytes + ws.v2.nbytes + ws.a.nbytes + op.log_c.nbytes) / 2**20
        verdict = "n/a" if math.isnan(peak) else "<" if peak < 64 * 2**20 else "NOT <"
        print(
            f"target N={n} K={k} D={D} {dname}: {ms[1]:.3f} ms/iter, peak extra {peak / 2**20:.1f} MB ({verdict} "
            f"64 MB; workspace + log c: {planned:.1f} MB); a dense fp32 S would be {n * k * 4 / 2**30:.1f} GiB"
        )
        op = z = c = None
        _release()


# (BLOCK_N, BLOCK_K, num_warps, num_stages, programs per SM) tried by the sweep at N = 2**20, K = 3000, D = 128;
# the first line per itemsize is the default (GPU_TILES in kernels/utils.py), timed twice: summing column masses
# (the default since 2026-11-23, untimed when written) and with log-domain sums (the pass measured on 2026-11-23).
# 64x64 w4 s2 at 3 per SM tests whether the tensor cores and the exp2 work overlap better across more independent
# programs: Triton waits for each wgmma right after issuing it (its result is used in the same iteration), so a
# program never overlaps its own matmul with its own exp2; only other programs on the SM can fill that time. sm_90
# (Triton 3.9): 133 registers, 48 KB shared, 3 per SM, 22.1 loop instructions per score against the default's 19.4.
SWEEP = {
    2: [(128, 64, 8, 3, 2), (128, 64, 8, 2, 2), (128, 128, 8, 3, 1), (64, 64, 4, 3, 2), (64, 64, 4, 2, 3),
        (256, 64, 8, 3, 1), (128, 32, 4, 3, 2), (128, 64, 4, 3, 2), (128, 64, 8, 3, 1)],
    4: [(64, 64, 8, 2, 2), (64, 32, 8, 3, 2), (128, 32, 8, 2, 2), (64, 64, 4, 2, 2), (64, 64, 8, 3, 1),
        (128, 64, 8, 2, 1)],
    "fp32>fp16": [(128, 32, 8, 3, 2), (128, 64, 16, 3, 1), (128, 64, 8, 3, 1), (64, 64, 8, 3, 1), (128, 32, 4, 3, 2)],
}  # fmt: skip
DRY_SWEEP = {key: [(16, 16, 1, 1, 1), (32, 16, 1, 1, 1)] for key in SWEEP}  # --dry-run: the interpreter's sizes


def _setting_name(setting: tuple) -> str:
    mass, block_n, block_k, warps, stages, per_sm = setting
    return f"{block_n}x{block_k} w{warps} s{stages} p{per_sm}/SM {'masses' if mass else 'lse'}"


def tile_sweep(rows: list, rates: dict) -> None:
    """Time the features cluster LSE for the SWEEP launch settings: data for tuning GPU_TILES."""
    from otlabel.kernels import sinkhorn_features as kf
    from otlabel.kernels.utils import sm_count

    n, k = (64, 40) if _dry() else (2**20, 3000)
    sweep = DRY_SWEEP if _dry() else SWEEP
    sms = sm_count(torch.device(DEVICE))
    for mode in ("bf16", "fp32", "fp32>fp16"):
        dtype = torch.bfloat16 if mode == "bf16" else torch.float32
        z, c = unit_inputs(n, k, D, dtype)
        c, scales = kf.prepare_fp16(z, c[None]) if mode == "fp32>fp16" else (c[None], (1.0, 1.0))
        log_c = torch.full((n,), -math.log(n), device=DEVICE)
        b = torch.zeros(1, k, device=DEVICE)
        key = mode if mode == "fp32>fp16" else z.element_size()
        settings = [(*sweep[key][0], False), *((*tile, True) for tile in sweep[key])]
        timed = {}
        for block_n, block_k, warps, stages, per_sm, mass in settings:
            if _gpu_dense().past_budget("the rest of the sweep", TIME_BUDGET_S, _T0):
                return
            launch = kf.features_launch(n, k, D, 1, c.element_size(), z.device, block_n=block_n, block_k=block_k,
                                        num_warps=warps, num_stages=stages, n_programs=sms * per_sm,
                                        column_mass=mass)  # fmt: skip
            ws = kf.FeaturesWorkspace.for_inputs(z, c, launch)
            try:
                args, kw = (z, c, None, b, log_c, 1 / EPS), dict(scales=scales, workspace=ws)
                med = _bench(lambda args=args, kw=kw: kf.features_cluster_lse(*args, **kw))[1]
            except Exception as exc:  # out of shared memory or registers: a tuning datum too
                print(f"  sweep {block_n}x{block_k} w{warps} s{stages} p{per_sm}/SM {mode}: failed ({exc})"[:200])
                continue
            frac = floor_ms(n, k, D, c.dtype, rates, launch.n_programs) / med
            name = f"sweep {mode} {_setting_name((mass, block_n, block_k, warps, stages, per_sm))}"
            print(f"  {name}: {med:.3f} ms ({100 * frac:.1f}% of floor)")
            timed[(mass, block_n, block_k, warps, stages, per_sm)] = med
            rows.append(dict(scenario=name, n=n, k=k, dtype=str(dtype).replace("torch.", ""),
                             method="otlabel-features", median_ms=med, q25_ms=float("nan"), q75_ms=float("nan"),
                             frac_copy=frac))  # fmt: skip
        masses, lse = (True, *sweep[key][0]), (False, *sweep[key][0])
        if masses in timed and lse in timed:
            ratio = timed[lse] / timed[masses]
            best = min(timed, key=timed.get)
            print(f"  verdict {mode}: default tile, log-domain / masses = {ratio:.2f}x; fastest "
                  f"{_setting_name(best)} {timed[best]:.3f} ms")  # fmt: skip
        z = c = None
        _release()


# --------------------------------------------------------------------------------------------------
# report
# --------------------------------------------------------------------------------------------------


def markdown_table(rows: list, device: str) -> str:
    """One line per (dtype, N, K): ms per iteration and peak extra MB per method, and the speed-ups."""
    methods = ["otlabel-features", "otlabel-features-fp16", "otlabel-features-ieee", "otlabel-dense", "flash-sinkhorn"]
    out = [f"Device: {device}. D = {D}, eps = {EPS}. Per warm iteration: median ms / peak extra device MB "
           "(features: % of the measured floor).", "",
           "| dtype | N | K | " + " | ".join(methods) + " | dense / features | flash / features |",
           "|---|---|---|" + "---|" * (len(methods) + 2)]  # fmt: skip
    table = [r for r in rows if r["scenario"].startswith("features ")]
    for dtype, n, k in sorted({(r["dtype"], r["n"], r["k"]) for r in table}):
        got = {r["method"]: r for r in table if (r["dtype"], r["n"], r["k"]) == (dtype, n, k)}
        cells = []
        for m in methods:
            r = got.get(m)
            if r is None:
                cells.append("-")
                continue
            mb = r["scenario"].split("peak_extra_MB=")[1]
            pct = f" ({100 * r['frac_copy']:.0f}%)" if m.startswith("otlabel-features") else ""
            cells.append(f"{r['median_ms']:.3f} / {mb}{pct}")
        ratios = []
        for other in ("otlabel-dense", "flash-sinkhorn"):
            ok = other in got and "otlabel-features" in got
            ratios.append(f"{got[other]['median_ms'] / got['otlabel-features']['median_ms']:.2f}x" if ok else "-")
        out.append(f"| {dtype} | 2^{int(math.log2(n))} | {k} | " + " | ".join(cells + ratios) + " |")
    target = [r for r in rows if r["scenario"].startswith("target ")]
    if target:
        out += ["", "Issue target (peak extra < 64 MB):", "", "| dtype | N | K | ms/iter | peak extra MB |",
                "|---|---|---|---|---|"]  # fmt: skip
        for r in target:
            mb = r["scenario"].split("peak_extra_MB=")[1]
            out.append(f"| {r['dtype']} | {r['n']} | {r['k']} | {r['median_ms']:.3f} | {mb} |")
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results_gpu.csv")
    parser.add_argument("--quick", action="store_true", help="N = 2**18 only")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false", help="skip the tile sweep")
    parser.add_argument("--no-flash", action="store_true", help="skip flash-sinkhorn even if installed")
    parser.add_argument("--dry-run", action="store_true", help="CPU, TRITON_INTERPRET=1, tiny sizes: test the script")
    args = parser.parse_args(argv)
    global DEVICE
    dense_bench = _gpu_dense()
    chosen = dense_bench.choose_device(args.dry_run, "GPU kernels")
    if chosen is None:
        return 0
    DEVICE, device = chosen
    dense_op, _ = dense_bench._import_otlabel()
    from otlabel.backends.triton import TritonFeaturesOperator

    versions = dense_bench._versions()
    print(f"{device}; " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    flash = None if args.no_flash else flash_module()
    check_correctness(TritonFeaturesOperator, flash)
    rows = dense_bench.CsvRows(args.csv, device, versions)  # each row reaches the CSV as it is measured
    rates = device_rates(rows)
    target_size(TritonFeaturesOperator, rows, rates)  # the memory target first: it must not be cut off
    sizes = [2**18] if args.quick else [2**18, 2**20]
    clusters = (3000, 4096)
    if args.dry_run:
        sizes, clusters = [64], (40,)
    for n in sorted(sizes, reverse=True):  # the headline size first: later ones are skipped past the budget
        for k in clusters:
            for dtype in (torch.bfloat16, torch.float32):
                if dense_bench.past_budget(f"N={n} K={k} {dtype} (run again with --quick)", MAIN_BUDGET_S, _T0):
                    continue
                time_iteration((TritonFeaturesOperator, dense_op), flash, n, k, dtype, rows, rates, args)
    if args.sweep:
        tile_sweep(rows, rates)
    print(f"total {time.monotonic() - _T0:.0f} s; rows appended to {args.csv}")
    print()
    print(markdown_table(rows, device))
    return 0


if __name__ == "__main__":
    sys.exit(main())
