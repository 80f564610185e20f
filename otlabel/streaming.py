"""Streaming: scores (or features and prototypes) that live on the host or on disk, solved chunk by chunk.

The solver loop and the log-domain operator are the dense ones; only the :class:`~otlabel.sources.ScoreSource`
changes. Each iteration reads the data once, ``rows_per_chunk`` samples at a time:

    host / np.memmap ──(pinned staging, side stream)──▶ device chunk (H, T, K) ──▶ exp, row sums, K-partials
                       chunk i+1 copied while chunk i is computed (CUDA); a plain view on the CPU

* :class:`HostSource` — scores ``(N, K)`` or ``(H, N, K)``: a CPU torch tensor, a NumPy array or a ``np.memmap``
  (a ``.npy`` path is opened with ``np.load(mmap_mode="r")``, so the file may be larger than RAM).
* :class:`FeatureSource` — features ``Z`` ``(N, D)`` on the host (or the device) and prototypes ``C`` ``(K, D)`` or
  ``(H, K, D)``: each chunk is ``Z[rows] @ C^T (+ bias)`` computed on the device, so the ``K x N`` matrix never
  exists anywhere. Memory: ``(H·K + D)·T`` floats per chunk plus ``H·K·D`` for the prototypes — O((N + K)·D) for
  the data and O(memory_budget) for the work, independent of N·K. (This is the torch path; a fused Triton kernel
  for features on the GPU is a separate backend.)

Solver state stays O(K); labels (and codes, when asked) are written chunk by chunk, to a ``.npy`` memmap when
given a path. :func:`sinkhorn_assign_stream` is the entry point.
"""

from __future__ import annotations

import math
import numbers
import os
import types
import warnings
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait

import numpy as np
import torch

from .backends.torch_backend import (
    NEG_INF,
    LogDomainOperator,
    compute_dtype,
    exp_,
    in_callers_mode,
    split_rows,
    worker_pool,
)
from .feasibility import MaskPatterns, check_masks, collect_masks
from .features import check_bias, check_feature_shapes
from .inputs import open_host_array
from .outputs import AtomicNpy, OutputError, commit_all, refuse_overwriting_inputs
from .problem import (
    TRANSPOSE_FIX,
    autocast_off,
    check_columns,
    check_epsilon,
    check_rows,
    check_weights,
    weighted_clusters,
)
from .result import SinkhornResult
from .solver import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    check_init,
    check_solver_options,
    is_number,
    no_epsilon_scaling,
    package_result,
    run_sinkhorn,
    warn_if_not_converged,
)
from .sources import ScoreSource, row_chunks

__all__ = [
    "FeatureSource",
    "HostSource",
    "SmallChunksWarning",
    "StreamingOperator",
    "default_memory_budget",
    "sinkhorn_assign_stream",
]

MiB = 1 << 20
DEFAULT_MEMORY_BUDGET = {"cpu": 256 * MiB, "cuda": 2048 * MiB}
# Device bytes per score entry of a chunk: the chunk itself (fp32 once computed or converted), the shifted
# logits, the argmax/softmax temporaries and, on CUDA, two staging buffers. A budget of B bytes gives chunks of
# B / 16 entries (B / 16 / (H K) samples).
BYTES_PER_ENTRY = 16
CPU_CHUNK_BYTES = int(os.environ.get("OTLABEL_CPU_CHUNK_BYTES", 16 * MiB))  # per thread


def default_memory_budget(device: torch.device) -> int:
    """256 MiB on the CPU; on CUDA 2 GiB or a quarter of the free device memory, whichever is smaller."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(DEFAULT_MEMORY_BUDGET["cuda"], free // 4)
    return DEFAULT_MEMORY_BUDGET["cpu"]


def chunk_bytes(memory_budget: int | None, device: torch.device) -> int:
    """Bytes per chunk for a device working set of ``memory_budget`` (``None``: :func:`default_memory_budget`)."""
    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    check_memory_budget(memory_budget)
    memory_budget = int(memory_budget)
    if device.type == "cpu":  # one chunk in flight per thread; small chunks stay in cache, the budget caps them
        return max(1, min(memory_budget // max(1, torch.get_num_threads()), CPU_CHUNK_BYTES))
    return memory_budget


def check_device(device) -> torch.device:
    """Where the streamed chunks are computed: the CPU or a CUDA device that exists."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}.") from None
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}.")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r}: CUDA is not available on this machine; use device='cpu'.")
    return device


def check_memory_budget(memory_budget) -> None:
    if not is_number(memory_budget, numbers.Integral) or memory_budget <= 0:
        raise ValueError(
            f"memory_budget must be a positive number of bytes (an integer, e.g. 1 << 30), got {memory_budget!r}."
        )


def rows_for_budget(memory_budget: int, row_entries: int, row_extra_bytes: int = 0) -> int:
    """Samples per chunk so that a chunk's working set fits ``memory_budget`` bytes (at least one sample)."""
    check_memory_budget(memory_budget)
    return max(1, int(memory_budget) // (BYTES_PER_ENTRY * row_entries + row_extra_bytes))


class SmallChunksWarning(UserWarning):
    """``memory_budget`` so small that a streamed pass is mostly per-chunk overhead (the solve is still right)."""


# Chunks of fewer scores than this make a pass overhead-bound: every chunk costs a fixed ~30 us on the CPU (Python
# and op dispatch; on CUDA, kernel launches: not measured) besides its work. Streaming 20,000 x 50 scores on 2 CPU
# threads: 1-sample chunks (50 scores) took 664 ms per iteration, 64 samples (3,200) 11 ms, 256 (12,800) 5.8 ms, the
# default 5.1 ms; at K = 1,000, 16 samples (16,000 scores) 62 ms against 42 ms. A warning needs both few scores per
# chunk and many chunks per pass: a small problem cut into a few small chunks loses milliseconds (the tests do that
# on purpose).
MIN_CHUNK_ENTRIES, MANY_CHUNKS = 4096, 64
GOOD_CHUNK_ENTRIES = 16384  # within ~1.5x of the default's time per iteration in the measurements above


def warn_if_chunks_too_small(source: ScoreSource, memory_budget, device: torch.device, stacklevel: int = 3) -> None:
    """A :class:`SmallChunksWarning` when ``memory_budget`` cuts the samples into many chunks of few scores, with
    the budget that would give chunks of :data:`GOOD_CHUNK_ENTRIES` scores."""
    row_entries = source.n_heads * source.n_clusters
    rows, n = source.rows_per_chunk, source.n_samples
    n_chunks = -(-n // rows)
    if memory_budget is None or rows * row_entries >= MIN_CHUNK_ENTRIES or n_chunks <= MANY_CHUNKS:
        return
    row_bytes = BYTES_PER_ENTRY * row_entries + getattr(source, "row_extra_bytes", 0)
    good_rows = min(n, -(-GOOD_CHUNK_ENTRIES // row_entries))
    per_chunk = 1 if device.type != "cpu" else max(1, torch.get_num_threads())  # the CPU splits it over threads
    suggest = -(-good_rows * row_bytes * per_chunk // MiB)
    default = "256 MiB on the CPU" if device.type == "cpu" else "up to 2 GiB on CUDA"
    budget = f"{int(memory_budget):,} byte{'' if int(memory_budget) == 1 else 's'}"
    warnings.warn(
        f"a memory budget of {budget} cuts the {n:,} samples into {n_chunks:,} chunks of {rows:,} "
        f"({rows * row_entries:,} scores each): every chunk has a fixed cost of tens of microseconds that so little "
        f"work does not cover, and each pass can take 10-100x longer than with the default budget. Give a budget of "
        f"{suggest} MiB or more, or none at all (the default: {default}).",
        SmallChunksWarning,
        stacklevel=stacklevel,
    )


# ----------------------------------------------------------------------------------------------- host arrays


class HostStream:
    """Rows of a host array ``(H, N, F)`` handed to ``device`` in chunks of at most ``rows_per_chunk`` samples.

    On the CPU (or for an array already on the device) a chunk is a view: no copy. Otherwise the rows go through
    two pinned staging buffers: a worker thread copies chunk i+1 into pinned memory and launches its
    host-to-device copy on a side stream while the caller computes on chunk i; events order the reuse of each
    buffer. A source that is itself pinned (``tensor.pin_memory()``) skips the staging copy: the side stream
    copies straight from it, which is what reaches the bus's bandwidth (a pageable source is bounded by the host
    memcpy into the staging buffers). Chunks are expected in increasing row order (the next chunk is prefetched,
    wrapping to row 0 for the next pass); any other request is served too, just without the overlap. A returned
    chunk is valid until the next call.
    """

    def __init__(self, host: torch.Tensor, device: torch.device, rows_per_chunk: int):
        self.host = host  # (H, N, F)
        self.device = device
        self.n_rows = host.shape[1]
        self.rows_per_chunk = max(1, min(rows_per_chunk, self.n_rows))
        self.staged = device.type == "cuda" and host.device.type == "cpu"
        if self.staged:
            shape = (host.shape[0], self.rows_per_chunk, host.shape[2])
            # A pinned source whose row chunks are contiguous goes straight to the device: no staging copy.
            self.direct = host.is_pinned() and host[:, :2].is_contiguous()  # rows one after another
            n_pinned = 0 if self.direct else 2
            with torch.inference_mode(False):  # refilled on every pass, also by a read of codes outside inference mode
                self.pinned = [torch.empty(shape, dtype=host.dtype, pin_memory=True) for _ in range(n_pinned)]
                self.buffers = [torch.empty(shape, dtype=host.dtype, device=device) for _ in range(2)]
            self.copy_stream = torch.cuda.Stream(device)
            self.copied: list = [None, None]  # per buffer: event, host-to-device copy finished
            self.released: list = [None, None]  # per buffer: event, the consumer's work on it was enqueued before
            self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="otlabel-h2d")
            self.pending = None  # (rows, slot, future) of the prefetched chunk
            self.current = None  # slot handed out last
            self.next_slot = 0

    def get(self, rows: slice) -> torch.Tensor:
        if not self.staged:
            # non_blocking only towards a GPU: a non-blocking copy to the CPU may be read before it has landed
            return self.host[:, rows].to(self.device, non_blocking=self.device.type == "cuda")
        t = rows.stop - rows.start
        if t > self.rows_per_chunk:  # larger than the staging buffers: a plain blocking copy
            return self.host[:, rows].to(self.device)
        main = torch.cuda.current_stream(self.device)
        if self.current is not None:  # everything enqueued so far that reads this buffer precedes this event
            ev = torch.cuda.Event()
            ev.record(main)
            self.released[self.current] = ev
        if self.pending is None or self.pending[0] != rows:
            self._drain()
            self._submit(rows)
        _, slot, future = self.pending
        self.pending = None
        main.wait_event(future.result())  # the copy of this chunk is done before anything later on `main` runs
        self.current = slot
        stop = rows.stop if rows.stop < self.n_rows else 0  # prefetch the next chunk (the next pass starts at 0)
        self._submit(slice(stop, min(stop + self.rows_per_chunk, self.n_rows)))
        return self.buffers[slot][:, :t]

    def _submit(self, rows: slice) -> None:
        slot = self.next_slot
        self.next_slot ^= 1
        self.pending = (rows, slot, self.worker.submit(in_callers_mode(self._stage), rows, slot, self.released[slot]))

    def _drain(self) -> None:
        if self.pending is not None:
            self.pending[2].result()
            self.pending = None

    def _stage(self, rows: slice, slot: int, released) -> torch.cuda.Event:
        """Worker thread: host rows -> pinned buffer -> device buffer (on the side stream)."""
        t = rows.stop - rows.start
        if self.direct:
            src = self.host[:, rows]  # already pinned: DMA straight from it
        else:
            if self.copied[slot] is not None:
                self.copied[slot].synchronize()  # the pinned buffer's previous copy has left it
            src = self.pinned[slot][:, :t]
            src.copy_(self.host[:, rows])  # host memcpy (parallel over the intra-op threads)
        with torch.cuda.device(self.device), torch.cuda.stream(self.copy_stream):
            if released is not None:
                self.copy_stream.wait_event(released)  # the consumer of this buffer's previous chunk has run
            self.buffers[slot][:, :t].copy_(src, non_blocking=True)
            self.buffers[slot].record_stream(self.copy_stream)  # freed buffers wait for this copy, too
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        self.copied[slot] = done
        return done

    def close(self) -> None:
        """Wait for a prefetch in flight (the stream stays usable: a later pass restarts it).

        The prefetch's copy may still be running on the side stream when its launch returns: the device's current
        stream is made to wait for it, so nothing enqueued later (a free, a reuse of the memory) can overtake it.
        """
        if self.staged:
            self._drain()
            torch.cuda.current_stream(self.device).wait_stream(self.copy_stream)


class HostSource(ScoreSource):
    """Scores ``(N, K)`` or ``(H, N, K)`` on the host (tensor, array, memmap or ``.npy`` path), streamed to ``device``.

    ``rows_per_chunk`` samples per chunk (see :func:`rows_for_budget`); chunks keep the stored dtype on the way
    (fp16 on disk is copied as fp16) and are converted to fp32 by the operator's arithmetic.
    """

    def __init__(self, scores, device=None, rows_per_chunk: int | None = None, memory_budget: int | None = None):
        host = open_host_array(scores, "scores")
        if host.ndim not in (2, 3) or host.numel() == 0:
            raise ValueError(
                f"scores must have shape (N, K) or (H, N, K) — samples by clusters, optionally with a leading head "
                f"dimension — and be non-empty, got shape {tuple(host.shape)}."
            )
        self.batched = host.ndim == 3
        host = host if self.batched else host.unsqueeze(0)  # (H, N, K)
        self.n_heads, self.n_samples, self.n_clusters = host.shape
        self.device = torch.device(device) if device is not None else host.device
        self.dtype = host.dtype
        if rows_per_chunk is None:
            budget = default_memory_budget(self.device) if memory_budget is None else memory_budget
            rows_per_chunk = rows_for_budget(budget, self.n_heads * self.n_clusters)
        self.stream = HostStream(host, self.device, rows_per_chunk)
        self.rows_per_chunk = self.stream.rows_per_chunk
        self.random_access = not self.stream.staged  # views: any order, any thread

    def chunk(self, rows: slice) -> torch.Tensor:
        return self.stream.get(rows)  # (H, T, K)

    def column_max(self) -> torch.Tensor:
        out = torch.full((self.n_heads, self.n_clusters), NEG_INF, device=self.device)
        for rows in row_chunks(self.n_samples, 1, self.rows_per_chunk):
            out = torch.maximum(out, self.chunk(rows).amax(dim=1).float())
        return out


class FeatureSource(ScoreSource):
    """Scores computed on the fly: ``S[h, j, k] = <Z[j], C[h, k]> (+ bias[h, k])``, one chunk of samples at a time.

    Args:
        features: ``Z`` (N, D) — host tensor, NumPy array, memmap or ``.npy`` path (streamed like
            :class:`HostSource`), or a tensor already on ``device``.
        prototypes: ``C`` (K, D), or (H, K, D) for H heads sharing the features; moved to ``device`` in the compute
            dtype (fp32; float64 for float64 features).
        bias: optional (K,) or (H, K), added to every sample's scores (a per-cluster constant: it changes the
            potentials, not the plan — kept for completeness and for logits heads with a bias).
        device: the compute device (default: where ``features`` are).

    Memory on the device: ``H·K·D`` for the prototypes and, per chunk of T samples, a few ``T·H·K`` temporaries, in
    the compute dtype, plus ``T·D`` for the features (twice, when staged, as stored): set T with ``rows_per_chunk``
    or ``memory_budget``. The matmul runs in fp32 (fp16/bf16 features are upcast per chunk), or in float64 for
    float64 features.
    """

    def __init__(self, features, prototypes, bias=None, device=None, rows_per_chunk=None, memory_budget=None):
        host = open_host_array(features, "features")
        protos = open_host_array(prototypes, "prototypes", copy_reversed=True)  # (H, K, D): small, copied anyway
        bias = None if bias is None else open_host_array(bias, "bias", copy_reversed=True)
        check_feature_shapes(host.shape, protos.shape, None if bias is None else bias.shape)
        self.device = torch.device(device) if device is not None else host.device
        self.batched = protos.ndim == 3
        protos = protos if self.batched else protos.unsqueeze(0)  # (H, K, D)
        self.n_heads, self.n_clusters, dim = protos.shape
        self.n_samples = host.shape[0]
        # float64 features are multiplied in float64 (as float64 scores are solved in float64); the rest in fp32
        self.dtype = compute_dtype(host.dtype)
        self.proto_t = protos.to(self.device, self.dtype).transpose(1, 2).contiguous()  # (H, D, K)
        if not bool(torch.isfinite(self.proto_t).all()):
            raise ValueError("prototypes contain NaN or inf; they must be finite vectors.")
        self.bias = None
        if bias is not None:
            bias = bias.to(self.device, self.dtype)
            check_bias(bias)  # a -inf bias on a weighted cluster: the column check of the first pass finds it
            self.bias = bias.expand(self.n_heads, self.n_clusters)[:, None, :]  # (H, 1, K)
        self.row_extra_bytes = 3 * dim * host.element_size()  # a features row, staged twice and upcast
        if rows_per_chunk is None:
            budget = default_memory_budget(self.device) if memory_budget is None else memory_budget
            rows_per_chunk = rows_for_budget(budget, self.n_heads * self.n_clusters, self.row_extra_bytes)
        self.stream = HostStream(host[None], self.device, rows_per_chunk)  # (1, N, D)
        self.rows_per_chunk = self.stream.rows_per_chunk
        self.random_access = not self.stream.staged  # views and a matmul: any order, any thread

    def chunk(self, rows: slice) -> torch.Tensor:
        z = self.stream.get(rows)[0].to(self.dtype)  # (T, D)
        s = torch.matmul(z, self.proto_t)  # (H, T, K)
        return s if self.bias is None else s.add_(self.bias)

    def shifted(self, rows: slice, b: torch.Tensor, inv_eps: float, out=None) -> torch.Tensor:
        """``S / eps + b`` for a chunk, (H, T, K) in the compute dtype, in one fused matmul (``baddbmm``), into ``out``
        if given."""
        z = self.stream.get(rows)[0].to(self.dtype)  # (T, D)
        shift = b.to(self.dtype)[:, None, :]  # (H, 1, K)
        if self.bias is not None:
            shift = shift + self.bias * inv_eps
        h, t = self.n_heads, z.shape[0]
        return torch.baddbmm(shift.expand(h, t, -1), z.expand(h, -1, -1), self.proto_t, alpha=inv_eps, out=out)

    def column_max(self) -> torch.Tensor:
        out = torch.full((self.n_heads, self.n_clusters), NEG_INF, device=self.device)
        with autocast_off():  # on the caller's thread: the products in float32, as in the passes
            for rows in row_chunks(self.n_samples, 1, self.rows_per_chunk):
                out = torch.maximum(out, self.chunk(rows).amax(dim=1))
        return out


# ----------------------------------------------------------------------------------------------- operator


class StoppedEarly(Exception):
    """A worker's range of rows was abandoned mid-pass: the pass's outcome was already decided elsewhere."""


class StreamingOperator(LogDomainOperator):
    """:class:`LogDomainOperator` over a streamed source, with input checking and chunk-by-chunk outputs.

    * The cold-start pass also validates the scores (NaN, +inf, masks) and records which clusters are reachable:
      checking costs no extra pass. With a warm start, :meth:`validate` runs one pass first.
    * :meth:`assign` writes labels (and codes) chunk by chunk into host arrays (``labels_out``/``codes_out``,
      e.g. ``.npy`` memmaps) instead of device tensors of N rows.
    * On the CPU the rows are split into one contiguous range per thread (as in :class:`LogDomainOperator`), and
      for the duration of each pass torch and MKL run one intra-op thread per range (:class:`single_threaded_torch`):
      the features matmul would otherwise split every small product over OpenMP threads, which collapses on a
      loaded machine. Per-range partials are combined in range order: deterministic.
    """

    def __init__(self, source, epsilon, sample_weights, cluster_weights, labels_out=None, codes_out=None):
        elements = source.rows_per_chunk * source.n_heads * source.n_clusters  # chunks == the source's chunks
        super().__init__(source, epsilon, sample_weights, chunk_elements=elements)
        self.r = cluster_weights.to(self.device)
        self.weighted = weighted_clusters(self.r)
        # the mask check's masses, on the host and in float64 (float32 ones refused feasible problems: 0.7 rounds
        # to 0.699999988)
        self.sample_mass = sample_weights.detach().to("cpu", torch.float64).numpy()
        self.labels_out, self.codes_out = labels_out, codes_out
        self.validated = False
        self.stop_from = math.inf  # ranges starting at this row or later stop at their next chunk (map_ranges)

    def map_ranges(self, fn) -> list:
        if not self.parallel:
            return [in_callers_mode(fn)(0, self.n_samples)]
        pool, fn = worker_pool(), in_callers_mode(fn)
        self.stop_from = math.inf
        futures = {}  # future -> the end row of its range
        with single_threaded_torch():
            try:
                for lo, hi in split_rows(self.n_samples, pool._max_workers):
                    futures[pool.submit(fn, lo, hi)] = hi
                self._wait(futures)  # every range finishes inside the context, even when one fails
            except BaseException:
                # Ctrl-C or SIGTERM in the main thread: the workers would otherwise read on to the end of the pass
                # (on a file larger than RAM, minutes) and the process could not exit before they did.
                self.stop_from = 0
                wait(futures)
                raise
        return [f.result() for f in futures]  # the first range's error first: the first bad sample is reported

    def _wait(self, futures: dict) -> None:
        """Wait for every range; once one has failed, the ranges after it stop at their next chunk. Its error is the
        one reported (unless an earlier range fails too: those run on), so reading on would only delay it: by half a
        pass for a NaN in the first rows, on 2 threads."""
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_EXCEPTION)
            for f in done:
                if f.exception() is not None:
                    self.stop_from = min(self.stop_from, futures[f])

    def chunks(self, lo: int = 0, hi: int | None = None):
        for rows in super().chunks(lo, hi):
            if lo >= self.stop_from:
                raise StoppedEarly(f"rows {lo}-{hi}: the pass was abandoned")
            yield rows

    def shifted(self, rows, b, out=None):
        if hasattr(self.source, "shifted"):  # features: S / eps + b fused into the matmul
            return self.source.shifted(rows, b, self.inv_eps, out=out)
        return super().shifted(rows, b, out=out)

    def _checked_partials(self, lo, hi, with_lse):
        """Rows ``[lo, hi)``: the row checks, the column maxima (of ``S / eps``: only their ``-inf`` entries are
        used) and (cold start, ``a = log c``) the partial ``LSE_j(S / eps + log c_j)`` of every chunk. Works in
        place in one buffer per range, like the iterations."""
        col_max = torch.full((self.n_heads, self.n_clusters), NEG_INF, dtype=self.dtype, device=self.device)
        zeros = torch.zeros((self.n_heads, self.n_clusters), dtype=self.dtype, device=self.device)
        buffer = self.work_buffer(lo, hi)
        partials = []
        from_features = hasattr(self.source, "shifted")  # -inf only from a bias: whole columns, checked by the maxima
        patterns = None if from_features else [MaskPatterns(self.n_clusters) for _ in range(self.n_heads)]
        for rows in self.chunks(lo, hi):
            x = self.shifted(rows, zeros, out=buffer(rows))  # S / eps, (H, T, K): NaN and inf where S has them
            masked = check_rows(x, self.weighted, rows.start, inv_eps=1.0, compute_dtype=self.dtype,
                                batched=self.source.batched, from_features=from_features)  # x is S / eps  # fmt: skip
            if patterns is not None:
                collect_masks(patterns, x, masked, self.sample_mass[rows])  # for Hall's condition, decided at the end
            col_max = torch.maximum(col_max, x.amax(dim=1))
            if with_lse:
                x.add_(self.log_c[rows][None, :, None])
                top = x.amax(dim=1, keepdim=True)  # (H, 1, K)
                top = torch.where(torch.isneginf(top), 0.0, top)  # a column with nothing allowed stays -inf below
                partials.append(top[:, 0] + exp_(x.sub_(top)).sum(dim=1).log())  # (H, K)
        return col_max, partials, patterns

    def validate(self) -> None:
        """One pass of input checks (the cold start does them for free; a warm start needs this)."""
        self._finish_validation(self.map_ranges(lambda lo, hi: self._checked_partials(lo, hi, False)))

    def _finish_validation(self, parts) -> None:
        col_max, _, patterns = parts[0]
        for part, _, more in parts[1:]:
            col_max = torch.maximum(col_max, part)
            for head, other in zip(patterns or [], more or [], strict=True):
                head.merge(other)
        check_columns(col_max, self.r, self.dtype)  # col_max is of S / eps
        if patterns is not None:
            check_masks(patterns, self.r, self.source.batched)
        self._reachable = col_max > NEG_INF
        self.validated = True

    def cluster_lse(self, b):
        if b is not None or self.validated:
            return super().cluster_lse(b)
        parts = self.map_ranges(lambda lo, hi: self._checked_partials(lo, hi, True))  # cold start + checks
        self._finish_validation(parts)
        return torch.logsumexp(torch.stack(sum((p for _, p, _ in parts), [])), dim=0)  # fixed order: deterministic

    def assign(self, b, want_codes):
        h, n, k = self.n_heads, self.n_samples, self.n_clusters
        b = b.to(self.dtype)  # the loop's float64 potentials (see LogDomainOperator)
        labels = self.labels_out if self.labels_out is not None else torch.empty((h, n), dtype=torch.int64)
        codes = None
        if want_codes:
            # float32, or float64 for float64 input (as SinkhornResult says); a codes_out file is float32
            codes = self.codes_out if self.codes_out is not None else torch.empty((h, n, k), dtype=self.dtype)

        def write(lo, hi):  # disjoint rows per range: safe from several threads
            buffer = self.work_buffer(lo, hi)
            for rows in self.chunks(lo, hi):
                logits = self.shifted(rows, b, out=buffer(rows))  # (H, T, K)
                labels[:, rows] = logits.argmax(dim=2).cpu()
                if want_codes:  # softmax in place: no second chunk-sized temporary
                    exp_(logits.sub_(logits.amax(dim=2, keepdim=True)))
                    codes[:, rows] = logits.div_(logits.sum(dim=2, keepdim=True)).cpu()

        self.map_ranges(write)
        return labels, codes


def check_stream_backend(backend) -> None:
    """The streamed path runs PyTorch operations on each chunk: ``"auto"`` and ``"torch"`` name it."""
    if backend in ("auto", "torch"):
        return
    if backend == "triton":
        raise ValueError(
            "backend='triton' needs the data on the GPU: pass CUDA tensors to sinkhorn_assign (scores, or features= "
            "with prototypes=). Streamed chunks run PyTorch operations: backend='auto'."
        )
    if backend == "reference":
        raise ValueError(
            "backend='reference' (float64, for checking) holds the whole problem in memory: use "
            "sinkhorn_assign(scores, ..., backend='reference') on a problem small enough to load."
        )
    raise ValueError(f"backend must be 'auto' or 'torch' when streaming, got {backend!r}.")


class single_threaded_torch:
    """Context: torch (and MKL) use one intra-op thread; restored on exit. The chunk workers supply parallelism."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


def as_output(out, shape: tuple, dtype: np.dtype, name: str, batched: bool, files: list):
    """``labels_out``/``codes_out``: a path, or a writable array/tensor of the right shape and dtype. Returned as a
    CPU torch tensor sharing its memory. A path gets an :class:`~otlabel.outputs.AtomicNpy` (appended to ``files``):
    a temporary ``.npy`` that the caller commits (renames into place) on success or discards on failure."""
    if out is None:
        return None
    wanted = shape if batched else shape[1:]  # the caller's layout: (N,) / (N, K) for 2-d scores
    if isinstance(out, (str, os.PathLike)):
        try:
            atomic = AtomicNpy(os.fspath(out), dtype, wanted)
        except OutputError as err:
            raise ValueError(f"{name}: {err}") from None
        files.append(atomic)
        out = atomic.array
    if isinstance(out, np.ndarray):
        if not out.flags.writeable:
            raise ValueError(f"{name} is read-only; pass a writable array or a path.")
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a path, a numpy array or a torch tensor, got {type(out).__name__}.")
    # The layout it will be read in, the batched one, or flat: a (K, N) array has the right size but would be
    # filled in (N, K) order, which reads as garbage.
    if tuple(out.shape) not in (wanted, shape, (math.prod(wanted),)):
        raise ValueError(f"{name} must have shape {wanted} ({math.prod(wanted):,} elements), got shape "
                         f"{tuple(out.shape)}.")  # fmt: skip
    dtype = np.dtype(dtype)
    if out.dtype != torch.from_numpy(np.empty(0, dtype)).dtype:
        raise ValueError(
            f"{name} must be {dtype.name}, got {str(out.dtype).removeprefix('torch.')}: allocate it as "
            f"np.empty({wanted}, np.{dtype.name})."
        )
    if out.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (it is written chunk by chunk from the host).")
    return out.view(shape)


# ----------------------------------------------------------------------------------------------- entry point


def sinkhorn_assign_stream(
    scores=None,
    epsilon: float = 0.05,
    *,
    features=None,
    prototypes=None,
    bias=None,
    cluster_weights=None,
    sample_weights=None,
    max_iter: int = DEFAULT_MAX_ITER,
    tol: float | None = DEFAULT_TOL,
    init=None,
    backend: str = "auto",
    acceleration: str = "auto",
    over_relaxation: float | None = None,
    epsilon_scaling: float | None = None,
    device=None,
    memory_budget: int | None = None,
    labels_out=None,
    codes_out=None,
    callback=None,
    warn: bool = True,
) -> SinkhornResult:
    r""":func:`otlabel.sinkhorn_assign` for data that does not fit on the device: streamed in chunks.

    Give either ``scores`` (N, K) / (H, N, K), or ``features`` (N, D) with ``prototypes`` (K, D) / (H, K, D)
    (scores ``Z C^T + bias``, never materialised). Each may be a CPU torch tensor, a NumPy array, a ``np.memmap``
    or a path to a ``.npy`` (memory-mapped: the file may be larger than RAM). Every iteration streams the data
    through ``device`` once, in chunks sized so the device working set stays within ``memory_budget`` bytes.
    The problem, the solution and the result are exactly those of :func:`otlabel.sinkhorn_assign`
    (``max <P, S> + eps H(P)``, rows of ``P`` summing to ``c``, columns to ``r``), up to fp32 rounding.

    Args:
        scores / features, prototypes, bias: the data (see above); ``scores`` and ``features`` are exclusive.
        epsilon, cluster_weights, sample_weights, max_iter, tol, init, acceleration, over_relaxation, warn:
            as in :func:`otlabel.sinkhorn_assign`.
        backend: ``"auto"`` or ``"torch"``: the chunks go through PyTorch operations (the Triton kernels take
            device tensors: :func:`otlabel.sinkhorn_assign`). Accepted so that one set of options serves every
            entry point.
        epsilon_scaling: must be ``None`` here: on top of the default Anderson mixing it did not pay in memory.
        device: compute device, default ``"cuda"`` when available, else ``"cpu"``.
        memory_budget: bytes of device memory for chunk temporaries (default 256 MiB on the CPU, up to 2 GiB on
            CUDA). Memory use is O(budget + K·D + N) (labels and sample weights), never O(N·K). A chunk holds at
            least one sample whatever the budget; a budget that cuts a pass into many chunks of under 4,096 scores
            gets a :class:`SmallChunksWarning` (per-chunk overhead then dominates: 1-sample chunks ran ~100x slower).
        labels_out: where labels go: a path (a new int64 ``.npy`` is written chunk by chunk) or a writable int64
            array/tensor of N (H·N) elements. Default: a new CPU tensor.
        codes_out: same for the soft codes (float32, N·K (H·N·K) elements), written in the same final pass.
            Output paths are written to a temporary file renamed into place once complete, and may not be an input
            file (given as a path or a NumPy memmap; a torch tensor made from a memmap cannot be recognised).
            Without it, ``result.codes`` is computed on first access into an (N, K) CPU tensor.
        callback: ``callback(iteration, marginal_error)`` after every iteration (e.g. a progress bar).

    On the CPU each pass splits the rows over ``torch.get_num_threads()`` worker threads and, for the duration of
    the pass, sets torch's intra-op threads to 1 (restored afterwards): other torch work running concurrently in
    the same process would see one thread meanwhile.

    Returns:
        :class:`~otlabel.SinkhornResult`; ``labels`` (and ``codes``) are CPU tensors (views of the outputs when
        given), ``cluster_potentials`` on ``device``. ``codes``/``objective`` stream the data once more.
    """
    if (scores is None) == (features is None):
        raise ValueError("give either scores, or features with prototypes (not both, not neither).")
    if features is not None and prototypes is None:
        raise ValueError("features need prototypes: pass prototypes=(K, D) array (the cluster centres).")
    if scores is not None and (prototypes is not None or bias is not None):
        raise ValueError("prototypes and bias go with features=, not with scores.")
    epsilon = check_epsilon(epsilon)
    acceleration = check_solver_options(max_iter, tol, acceleration, over_relaxation)
    check_stream_backend(backend)
    no_epsilon_scaling(epsilon_scaling, "when streaming")
    if device is None:
        first = scores if scores is not None else features
        on_gpu = isinstance(first, torch.Tensor) and first.is_cuda
        device = first.device if on_gpu else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(device)
    chunk_budget = chunk_bytes(memory_budget, device)
    if scores is not None:
        source = HostSource(scores, device, memory_budget=chunk_budget)
    else:
        source = FeatureSource(features, prototypes, bias, device, memory_budget=chunk_budget)
    warn_if_chunks_too_small(source, memory_budget, device)
    h, n, k = source.n_heads, source.n_samples, source.n_clusters
    files = []  # output files given as paths: renamed into place only once everything has been written
    try:
        inputs = {"scores": scores, "features": features, "prototypes": prototypes, "bias": bias}
        refuse_overwriting_inputs({"labels_out": labels_out, "codes_out": codes_out}, inputs)
        as_read = (n, k) if scores is not None else None  # a wrong length that is the other one: transposed?
        fix = TRANSPOSE_FIX
        if isinstance(scores, (str, os.PathLike)):
            fix = 'pass np.load(path, mmap_mode="r").swapaxes(-1, -2) instead of the path (a view: nothing is copied)'
        r = check_weights(cluster_weights, k, "cluster_weights", "number of clusters K", device, as_read, fix)
        c = check_weights(sample_weights, n, "sample_weights", "number of samples N", device, as_read, fix)
        shape_only = types.SimpleNamespace(shape=(h, n, k), scores=torch.empty(0, device=device), cluster_weights=r)
        # In the compute dtype, which is what the operator adds to the scores: a float64 warm start measured 3-15x
        # worse first errors (1.6e-5 against 1.1e-6 at eps 4e-4), its rounding showing up as marginal error.
        b0 = check_init(init, shape_only, compute_dtype(source.dtype))
        labels = as_output(labels_out, (h, n), np.int64, "labels_out", source.batched, files)
        codes = as_output(codes_out, (h, n, k), np.float32, "codes_out", source.batched, files)
        operator = StreamingOperator(source, epsilon, c, r, labels, codes)
        if b0 is not None:
            operator.validate()
        out = run_sinkhorn(operator, r, b0, max_iter, tol, acceleration, callback=callback)
        labels, codes = operator.assign(out.potentials, want_codes=codes is not None)
        commit_all(files[::-1])  # fsynced, then renamed together (labels last)
    except BaseException:
        for f in files:
            f.discard()
        raise
    finally:
        source.stream.close()  # a speculative prefetch may be in flight
    if warn:
        warn_if_not_converged("sinkhorn_assign_stream", out, tol, epsilon)
    # labels and codes are the host outputs written above (CPU tensors, views of labels_out/codes_out when given)
    problem = types.SimpleNamespace(batched=source.batched, epsilon=epsilon, sample_weights=c.cpu())
    return package_result(problem, operator, out, labels, codes)
