"""Streamed score sources: scores or features held on the host (or on disk), handed to the compute device in chunks.

* :class:`HostSource` — scores ``(N, K)`` or ``(H, N, K)``: a CPU torch tensor, a NumPy array or a ``np.memmap``
  (a ``.npy`` path is opened with ``np.load(mmap_mode="r")``, so the file may be larger than RAM).
* :class:`FeatureSource` — features ``Z`` ``(N, D)`` on the host (or the device) and prototypes ``C`` ``(K, D)`` or
  ``(H, K, D)``: each chunk is ``Z[rows] @ C^T (+ bias)`` computed on the device, so the ``K x N`` matrix never
  exists anywhere. Memory: ``(H·K + D)·T`` floats per chunk plus ``H·K·D`` for the prototypes — O((N + K)·D) for
  the data and O(memory_budget) for the work, independent of N·K. (This is the torch path; a fused Triton kernel
  for features on the GPU is a separate backend.)
* :class:`HostStream` — the rows of either, copied to a GPU through pinned staging buffers on a side stream
  (chunk i+1 copied while chunk i is computed); a plain view on the CPU.

A memory budget sets the samples per chunk (:func:`rows_for_budget`, :func:`default_memory_budget`).
:func:`otlabel.sinkhorn_assign_stream` solves over these sources (:mod:`otlabel.streaming`), as does a sharded
features solve that does not use the kernel. They are kept out of :mod:`otlabel.sources`, which the torch backend
imports: they are built on that backend's thread helpers and on the features checks.
"""

from __future__ import annotations

import numbers
from concurrent.futures import ThreadPoolExecutor

import torch

from .backends.torch_backend import compute_dtype, in_callers_mode, submit
from .features import check_bias, check_feature_shapes, not_finite_error
from .inputs import open_host_array
from .problem import autocast_off, described
from .sizes import parse_size
from .solver import is_number
from .sources import ScoreSource

__all__ = ["FeatureSource", "HostSource", "default_memory_budget"]

MiB = 1 << 20
DEFAULT_MEMORY_BUDGET = {"cpu": 256 * MiB, "cuda": 2048 * MiB}
# Device bytes per score entry of a chunk: its working buffers in the widest pass (the objective's two float64
# ones; the iterations and the read-out work in one buffer of the compute dtype). A budget of B bytes gives chunks of
# B / 16 entries (B / 16 / (H K) samples), less what the source stages besides (:func:`staging_bytes`).
BYTES_PER_ENTRY = 16


def default_memory_budget(device: torch.device) -> int:
    """256 MiB on the CPU; on CUDA 2 GiB or a quarter of the free device memory, whichever is smaller."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return min(DEFAULT_MEMORY_BUDGET["cuda"], free // 4)
    return DEFAULT_MEMORY_BUDGET["cpu"]


def check_memory_budget(memory_budget) -> int:
    """The budget in bytes: a positive integer, or a size such as ``"512M"``, ``"2G"``, ``"1.5GiB"`` (as the
    command line's ``--memory-budget`` takes it; powers of 1024)."""
    if isinstance(memory_budget, str):
        try:
            return parse_size(memory_budget)
        except ValueError as e:
            raise ValueError(f"memory_budget: {e}.") from None
    if not is_number(memory_budget, numbers.Integral) or memory_budget <= 0:
        raise ValueError(
            "memory_budget must be a positive number of bytes (an integer, e.g. 1 << 30, or a size such as '512M'), "
            f"got {described(memory_budget)}."
        )
    return int(memory_budget)


def staged(host: torch.Tensor, device: torch.device) -> bool:
    """Whether :class:`HostStream` copies the rows of ``host`` to ``device`` through its staging buffers."""
    return device.type == "cuda" and host.device.type == "cpu"


def staging_bytes(host: torch.Tensor, device: torch.device) -> int:
    """Device bytes per sample of :class:`HostStream`'s two staging buffers for ``host`` (H, N, F), in its stored
    dtype (0 unless staged). A chunk's budget counts them besides its working buffers: not counted, float32 scores
    streamed to CUDA took 24 bytes a score reading the objective, float64 ones 24 in the iterations and 32 there,
    against the 16 a budget allows."""
    return 2 * host.shape[0] * host.shape[2] * host.element_size() if staged(host, device) else 0


def rows_for_budget(memory_budget: int, row_entries: int, row_extra_bytes: int = 0) -> int:
    """Samples per chunk so that a chunk's working set fits ``memory_budget`` bytes (at least one sample)."""
    check_memory_budget(memory_budget)
    return max(1, int(memory_budget) // (BYTES_PER_ENTRY * row_entries + row_extra_bytes))


def h2d_worker() -> ThreadPoolExecutor:
    """:class:`HostStream`'s thread for the staging copies (started by its first prefetch)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="otlabel-h2d")


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
        self.staged = staged(host, device)
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
            self.worker = h2d_worker()
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
        try:
            future = submit(self.worker, in_callers_mode(self._stage), rows, slot, self.released[slot])
        except BaseException:
            # an interrupt while the worker's thread started: submit shut the worker down (its stray thread would
            # have hung the interpreter's exit); a later pass gets a new one
            self.worker = h2d_worker()
            raise
        self.pending = (rows, slot, future)

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
        self.row_extra_bytes = staging_bytes(host, self.device)  # on CUDA: a row in each staging buffer
        if rows_per_chunk is None:
            budget = default_memory_budget(self.device) if memory_budget is None else memory_budget
            rows_per_chunk = rows_for_budget(budget, self.n_heads * self.n_clusters, self.row_extra_bytes)
        self.stream = HostStream(host, self.device, rows_per_chunk)
        self.rows_per_chunk = self.stream.rows_per_chunk
        self.random_access = not self.stream.staged  # views: any order, any thread

    def chunk(self, rows: slice) -> torch.Tensor:
        return self.stream.get(rows)  # (H, T, K)


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
        protos = open_host_array(prototypes, "prototypes", copied_anyway=True)  # (H, K, D): small, copied anyway
        bias = None if bias is None else open_host_array(bias, "bias", copied_anyway=True)
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
            raise not_finite_error("prototypes")
        self.bias = None
        if bias is not None:
            bias = bias.to(self.device, self.dtype)
            check_bias(bias)  # a -inf bias on a weighted cluster: checked with the weights by the callers
            self.bias = bias.expand(self.n_heads, self.n_clusters)[:, None, :]  # (H, 1, K)
        self.row_extra_bytes = 3 * dim * host.element_size()  # a features row, staged twice and upcast
        if rows_per_chunk is None:
            budget = default_memory_budget(self.device) if memory_budget is None else memory_budget
            rows_per_chunk = rows_for_budget(budget, self.n_heads * self.n_clusters, self.row_extra_bytes)
        self.stream = HostStream(host.unsqueeze(0), self.device, rows_per_chunk)  # (1, N, D)
        self.features = host  # as given, for an error to read one row of: a bad row, or products that overflow?
        self.rows_per_chunk = self.stream.rows_per_chunk
        self.random_access = not self.stream.staged  # views and a matmul: any order, any thread

    def chunk(self, rows: slice, out=None) -> torch.Tensor:
        """The scores of a chunk, (H, T, K), into ``out`` if given."""
        z = self.stream.get(rows)[0].to(self.dtype)  # (T, D)
        s = torch.matmul(z, self.proto_t, out=out)  # (H, T, K)
        return s if self.bias is None else s.add_(self.bias)

    def chunk_in(self, rows: slice, spare: torch.Tensor) -> torch.Tensor:
        """:meth:`chunk` formed in ``spare``, read as the compute dtype (the objective's float64 plan buffer): a fresh
        product took 4 (float64 features: 8) bytes a score more than the 16 a chunk's budget counts, 20-24 in all, a
        quarter to a half over ``memory_budget`` on as many threads as fill it."""
        h, t, k = spare.shape
        return self.chunk(rows, out=spare.view(-1).view(self.dtype)[: h * t * k].view(h, t, k))

    def scaled(self, rows: slice, inv_eps: float, out=None) -> torch.Tensor:
        """``S / eps`` for a chunk, (H, T, K), into ``out`` if given: the products formed first, so that scores beyond
        the compute dtype show as inf (the check pass reads this). :meth:`shifted` scales inside the matmul, where
        products of 1e40 in float32 times a subnormal or zero ``1 / eps`` came out finite and wrong."""
        return self.chunk(rows, out=out).mul_(inv_eps)

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
        with autocast_off():  # on the caller's thread: the products in float32, as in the passes
            return super().column_max()
