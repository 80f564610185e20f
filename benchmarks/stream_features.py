"""Streaming benchmark: label a features ``.npy`` on disk through the ``otlabel`` command line.

(a) CPU: features (N, D) = (1,000,000, 64) float32 on disk (256 MB), K = 1,000 prototypes, eps = 0.05, to tol 1e-3.
    The K x N score matrix would be 4 GB; the streaming path never builds it. Reported: total wall time of the
    ``otlabel assign`` process (imports, validation, iterations, writing the labels) and its peak RSS, with the
    machine's load average (this 2-core machine is shared, so absolute times move with the load).
(c) GPU (only when CUDA is present): a scores stream (N, K) from host memory, throughput in bytes per second as a
    fraction of the measured pinned host-to-device bandwidth, for a pinned and a pageable source.

The data (clustered: features drawn around K random unit centres, prototypes near the centres, everything
L2-normalised) is generated once into ``--data-dir`` (default: a folder in the temp dir) and reused.

    python benchmarks/stream_features.py                       # (a), plain Sinkhorn and the default (Anderson)
    python benchmarks/stream_features.py --n 100000 --quick    # a smaller run
    python benchmarks/stream_features.py --gpu-only            # (c)

Rows are appended to ``benchmarks/out/stream_features.csv`` (or ``--csv PATH``) with the machine, versions and date.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
CSV_PATH = os.path.join(HERE, "out", "stream_features.csv")


def generate(data_dir: str, n: int, k: int, d: int, noise: float = 0.1, seed: int = 0) -> tuple[str, str]:
    """Clustered unit features (written 100k rows at a time, low memory) and prototypes near the centres."""
    feats = os.path.join(data_dir, f"features_{n}x{d}_s{seed}.npy")
    protos = os.path.join(data_dir, f"prototypes_{k}x{d}_s{seed}.npy")
    if os.path.exists(feats) and os.path.exists(protos):
        return feats, protos
    os.makedirs(data_dir, exist_ok=True)
    g = torch.Generator().manual_seed(seed)
    centres = torch.nn.functional.normalize(torch.randn(k, d, generator=g), dim=1)  # (K, D)
    out = np.lib.format.open_memmap(feats + ".tmp", mode="w+", dtype=np.float32, shape=(n, d))
    for lo in range(0, n, 100_000):
        hi = min(lo + 100_000, n)
        z = centres[torch.randint(k, (hi - lo,), generator=g)] + noise * torch.randn(hi - lo, d, generator=g)
        out[lo:hi] = torch.nn.functional.normalize(z, dim=1).numpy()
    out.flush()
    del out
    os.replace(feats + ".tmp", feats)
    p = torch.nn.functional.normalize(centres + 0.05 * torch.randn(k, d, generator=g), dim=1)
    np.save(protos, p.numpy())
    return feats, protos


def run_cli(args: list[str]) -> dict:
    """Run ``python -m otlabel`` in a child process: wall time, peak RSS (wait4) and the parsed summary."""
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-m", "otlabel", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    stdout, stderr = proc.stdout.read(), proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    text = stdout.decode()
    if proc.returncode != 0:
        raise RuntimeError(f"otlabel failed ({proc.returncode}):\n{text}\n{stderr.decode()[-2000:]}")
    iters = re.search(r"iterations\s+(\d+) \((\w+)", text)
    err = re.search(r"marginal error ([0-9.e+-]+)", text)
    sizes = re.search(r"smallest ([\d,]+) .*largest ([\d,]+)", text)
    return dict(
        wall_s=wall,
        peak_rss_mb=usage.ru_maxrss / 1024,  # Linux: KiB
        iterations=int(iters.group(1)),
        converged=iters.group(2) == "converged",
        marginal_error=float(err.group(1)),
        smallest=int(sizes.group(1).replace(",", "")),
        largest=int(sizes.group(2).replace(",", "")),
        summary=text,
    )


def append_csv(row: dict) -> None:
    os.makedirs(os.path.dirname(CSV_PATH) or ".", exist_ok=True)
    base = dict(
        date=datetime.datetime.now().isoformat(timespec="seconds"),
        machine=f"{platform.node()} {platform.processor() or platform.machine()} {os.cpu_count()} cpus",
        python=platform.python_version(),
        torch=torch.__version__,
        numpy=np.__version__,
    )
    row = {**base, **row}
    if os.path.exists(CSV_PATH):
        with open(CSV_PATH, newline="") as f:
            header = next(csv.reader(f), None)
        if header != list(row):  # columns changed since that file was started: keep it aside, start afresh
            os.replace(CSV_PATH, CSV_PATH + ".old")
    new = not os.path.exists(CSV_PATH)
    with open(CSV_PATH, "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(row))
        if new:
            w.writeheader()
        w.writerow(row)


def bench_cpu(opts) -> None:
    feats, protos = generate(opts.data_dir, opts.n, opts.k, opts.d)
    labels = os.path.join(opts.data_dir, "labels.npy")
    print(f"features {feats} ({os.path.getsize(feats) / 1e6:.0f} MB), prototypes {protos}")
    print(f"scores would be N x K x 4 = {opts.n * opts.k * 4 / 1e9:.1f} GB; streamed instead\n")
    table = []
    for acceleration in opts.acceleration:
        load0 = os.getloadavg()[0]
        cmd = ["assign", "--features", feats, "--prototypes", protos, "--epsilon", str(opts.epsilon)]
        cmd += ["--tol", str(opts.tol), "--acceleration", acceleration, "--device", "cpu", "--out", labels]
        res = run_cli(cmd)
        load1 = os.getloadavg()[0]
        print(res["summary"])
        row = dict(
            scenario="stream_features_cpu",
            n=opts.n,
            k=opts.k,
            d=opts.d,
            epsilon=opts.epsilon,
            tol=opts.tol,
            acceleration=acceleration,
            threads=torch.get_num_threads(),
            load_before=round(load0, 2),
            load_after=round(load1, 2),
            **{key: res[key] for key in ("wall_s", "peak_rss_mb", "iterations", "converged", "marginal_error")},
            smallest=res["smallest"],
            largest=res["largest"],
        )
        append_csv(row)
        table.append(row)
    print("| N | K | D | acceleration | iterations | converged | wall (s) | s/iter | peak RSS (MB) | load (1 min) |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['n']:,} | {r['k']:,} | {r['d']} | {r['acceleration']} | {r['iterations']} | {r['converged']} | "
            f"{r['wall_s']:.1f} | {r['wall_s'] / r['iterations']:.2f} | {r['peak_rss_mb']:.0f} | "
            f"{r['load_before']}-{r['load_after']} |"
        )
    print(f"\ntarget: wall < 300 s, peak RSS < 1536 MB; rows appended to {CSV_PATH}")


def pinned_h2d_bandwidth(nbytes: int, device: torch.device, repeats: int = 5) -> float:
    """Median bytes/s of one large pinned-host-to-device copy."""
    host = torch.empty(nbytes // 4, dtype=torch.float32, pin_memory=True)
    dev = torch.empty_like(host, device=device)
    times = []
    for _ in range(repeats + 1):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dev.copy_(host, non_blocking=True)
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)
    return nbytes / float(np.median(times[1:]))


def bench_gpu(opts) -> None:
    from otlabel.streaming import sinkhorn_assign_stream

    device = torch.device("cuda")
    n, k, iters = opts.gpu_n, opts.k, opts.gpu_iters
    bw = pinned_h2d_bandwidth(1 << 30, device)
    print(f"{torch.cuda.get_device_name(device)}: pinned host-to-device copy {bw / 1e9:.1f} GB/s")
    g = torch.Generator().manual_seed(0)
    pageable = torch.randn(n, k, generator=g)  # (N, K) fp32 host scores
    for name, scores in (("pinned", pageable.pin_memory()), ("pageable", pageable)):
        for budget in opts.gpu_budgets:
            sinkhorn_assign_stream(scores, 0.5, tol=None, max_iter=1, device=device, memory_budget=budget << 20)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            res = sinkhorn_assign_stream(
                scores, 0.5, tol=None, max_iter=iters, device=device, memory_budget=budget << 20
            )
            torch.cuda.synchronize()
            dt = time.perf_counter() - t0
            passes = res.n_iter + 1  # iterations (the first fused with validation) + the labels pass
            rate = passes * scores.numel() * scores.element_size() / dt
            print(
                f"{name:8s} source, budget {budget:5d} MiB: {passes} passes over {scores.numel() * 4 / 1e9:.1f} GB "
                f"in {dt:.2f} s = {rate / 1e9:.1f} GB/s = {rate / bw:.0%} of pinned H2D"
            )
            append_csv(
                dict(
                    scenario=f"stream_scores_gpu_{name}",
                    n=n,
                    k=k,
                    memory_budget_mib=budget,
                    passes=passes,
                    wall_s=dt,
                    stream_gb_s=rate / 1e9,
                    h2d_pinned_gb_s=bw / 1e9,
                    fraction=rate / bw,
                    gpu=torch.cuda.get_device_name(device),
                )
            )


def main() -> None:
    global CSV_PATH
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=1_000_000)
    p.add_argument("--k", type=int, default=1000)
    p.add_argument("--d", type=int, default=64)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--tol", type=float, default=1e-3)
    p.add_argument("--acceleration", nargs="+", default=["none", "auto"], help="otlabel assign --acceleration values")
    p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "otlabel-bench-stream"))
    p.add_argument("--quick", action="store_true", help="one run: the first --acceleration only")
    p.add_argument("--gpu-only", action="store_true", help="only the GPU throughput mode (c)")
    p.add_argument("--gpu-n", type=int, default=2_000_000)
    p.add_argument("--gpu-iters", type=int, default=10)
    p.add_argument("--gpu-budgets", type=int, nargs="+", default=[256, 1024], help="MiB")
    p.add_argument("--csv", default=CSV_PATH, help="where rows are appended")
    opts = p.parse_args()
    CSV_PATH = opts.csv
    if opts.quick:
        opts.acceleration = opts.acceleration[:1]
    if not opts.gpu_only:
        bench_cpu(opts)
    if torch.cuda.is_available():
        bench_gpu(opts)
    elif opts.gpu_only:
        print("no CUDA device: the GPU streaming-throughput mode (c) did not run")


if __name__ == "__main__":
    main()
