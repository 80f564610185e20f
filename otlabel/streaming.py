"""Streaming: scores (or features and prototypes) that live on the host or on disk, solved chunk by chunk.

The solver loop and the log-domain operator are the dense ones; only the :class:`~otlabel.sources.ScoreSource`
changes. Each iteration reads the data once, ``rows_per_chunk`` samples at a time:

    host / np.memmap ──(pinned staging, side stream)──▶ device chunk (H, T, K) ──▶ exp, row sums, K-partials
                       chunk i+1 copied while chunk i is computed (CUDA); a plain view on the CPU

The sources, :class:`~otlabel.host_sources.HostSource` (scores) and :class:`~otlabel.host_sources.FeatureSource`
(features and prototypes, scores computed per chunk), are in :mod:`otlabel.host_sources`. This module holds:

* the device memory for chunks, :func:`chunk_bytes`, and the :class:`SmallChunksWarning` for a budget that cuts a
  pass into many chunks of few scores;
* :class:`StreamingOperator` — :class:`~otlabel.backends.torch_backend.LogDomainOperator` over a streamed source,
  which checks the input as the first pass reads it and writes the outputs chunk by chunk;
* :func:`as_output` — ``labels_out``/``codes_out`` (a path or a writable array) as a host tensor to write into;
* :func:`sinkhorn_assign_stream`, the entry point.

Solver state stays O(K); labels (and codes, when asked) are written chunk by chunk, to a ``.npy`` memmap when
given a path.
"""

from __future__ import annotations

import math
import os
import warnings
from concurrent.futures import FIRST_EXCEPTION, wait

import numpy as np
import torch

from .advice import checked_rows_summary, features_chunk_summary, merge_all, warn_about_scores
from .backends.torch_backend import (
    NEG_INF,
    LogDomainOperator,
    available_memory_bytes,
    caller_on_one_thread,
    compute_dtype,
    exp_,
    solve_threads,
    split_rows,
    submit,
)
from .entry import entry_point, user_stacklevel
from .feasibility import MaskPatterns, check_masks, collect_masks
from .features import refuse_closed_clusters
from .host_sources import (
    BYTES_PER_ENTRY,
    FeatureSource,
    HostSource,
    MiB,
    check_memory_budget,
    default_memory_budget,
)
from .outputs import AtomicNpy, OutputError, commit_all, refuse_overwriting_inputs
from .problem import (
    TRANSPOSE_FIX,
    TRANSPOSE_PATH_FIX,
    check_columns,
    check_epsilon,
    check_rows,
    check_weights,
    hidden_entries,
    marginals_rounding,
    masked_entries,
    weighted_clusters,
)
from .result import SinkhornResult
from .solver import (
    DEFAULT_MAX_ITER,
    DEFAULT_TOL,
    check_flags,
    check_init,
    check_solver_options,
    check_tol,
    no_epsilon_scaling,
    package_result,
    run_sinkhorn,
    warn_if_not_converged,
)
from .sources import ScoreSource, column_max

__all__ = [
    "SmallChunksWarning",
    "StreamingOperator",
    "sinkhorn_assign_stream",
]

CPU_CHUNK_BYTES = int(os.environ.get("OTLABEL_CPU_CHUNK_BYTES", 16 * MiB))  # per thread


def chunk_bytes(memory_budget: int | None, device: torch.device) -> int:
    """Bytes per chunk for a device working set of ``memory_budget`` (``None``:
    :func:`~otlabel.host_sources.default_memory_budget`)."""
    if memory_budget is None:
        memory_budget = default_memory_budget(device)
    memory_budget = check_memory_budget(memory_budget)
    if device.type == "cpu":  # one chunk in flight per thread; small chunks stay in cache, the budget caps them
        return max(1, min(memory_budget // max(1, solve_threads()), CPU_CHUNK_BYTES))
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


def budget_ranges(source: ScoreSource, memory_budget: int | None) -> int:
    """How many ranges of rows a streamed pass may work on at once, each with its chunk-sized buffers: as many chunks
    as ``memory_budget`` holds (``None``: the default budget), and at least the threads the chunks were sized for
    (:func:`chunk_bytes`; a budget below one sample per thread is overrun by every chunk anyway). A read-out after
    ``torch.set_num_threads`` raised the count made a range per thread, each of the chunks sized for fewer: 4-6x
    the budget reading ``res.objective`` at 8 and 16 threads after a solve on 1 or 2."""
    if source.device.type != "cpu":  # a pass is one range there (and the default budget would ask the device)
        return 1
    budget = default_memory_budget(source.device) if memory_budget is None else int(memory_budget)
    row_bytes = BYTES_PER_ENTRY * source.n_heads * source.n_clusters + source.row_extra_bytes
    return max(solve_threads(), budget // (source.rows_per_chunk * row_bytes))


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


def warn_if_chunks_too_small(source: ScoreSource, memory_budget, device: torch.device) -> None:
    """A :class:`SmallChunksWarning` when ``memory_budget`` cuts the samples into many chunks of few scores, with
    the budget that would give chunks of :data:`GOOD_CHUNK_ENTRIES` scores."""
    row_entries = source.n_heads * source.n_clusters
    rows, n = source.rows_per_chunk, source.n_samples
    n_chunks = -(-n // rows)
    if memory_budget is None or rows * row_entries >= MIN_CHUNK_ENTRIES or n_chunks <= MANY_CHUNKS:
        return
    row_bytes = BYTES_PER_ENTRY * row_entries + source.row_extra_bytes
    good_rows = min(n, -(-GOOD_CHUNK_ENTRIES // row_entries))
    per_chunk = 1 if device.type != "cpu" else max(1, solve_threads())  # the CPU splits it over threads
    suggest = -(-good_rows * row_bytes * per_chunk // MiB)
    default = "256 MiB on the CPU" if device.type == "cpu" else "up to 2 GiB on CUDA"
    budget = f"{int(memory_budget):,} byte{'' if int(memory_budget) == 1 else 's'}"
    warnings.warn(
        f"a memory budget of {budget} cuts the {n:,} samples into {n_chunks:,} chunks of {rows:,} "
        f"({rows * row_entries:,} scores each): every chunk has a fixed cost of tens of microseconds that so little "
        f"work does not cover, and each pass can take 10-100x longer than with the default budget. Give a budget of "
        f"{suggest} MiB or more, or none at all (the default: {default}).",
        SmallChunksWarning,
        stacklevel=user_stacklevel(),
    )


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
      for the duration of each pass torch and MKL run one intra-op thread per range (:func:`caller_on_one_thread`):
      the features matmul would otherwise split every small product over OpenMP threads, which collapses on a
      loaded machine. Per-range partials are combined in range order: deterministic.
    """

    def __init__(self, source, epsilon, sample_weights, cluster_weights, labels_out=None, codes_out=None,
                 mass_rounding: float = 0.0, memory_budget: int | None = None):  # fmt: skip
        elements = source.rows_per_chunk * source.n_heads * source.n_clusters  # chunks == the source's chunks
        super().__init__(source, epsilon, sample_weights, chunk_elements=elements)
        self.epsilon = epsilon  # for the input checks' messages (the passes use inv_eps)
        self.max_ranges = budget_ranges(source, memory_budget)
        self.r = cluster_weights.to(self.device)
        self.weighted = weighted_clusters(self.r)
        # the mask check's masses, on the host and in float64 (float32 ones refused feasible problems: 0.7 rounds
        # to 0.699999988)
        self.sample_mass = sample_weights.detach().to("cpu", torch.float64).numpy()
        self.mass_rounding = mass_rounding  # what rounding the weights as given may have moved (weight_rounding)
        self.labels_out, self.codes_out = labels_out, codes_out
        self.validated = False
        self.summary = None  # of the scores' values, once validated (otlabel.advice)
        self.stop_from = math.inf  # ranges starting at this row or later stop at their next chunk (map_parallel)

    def map_parallel(self, pool, fn) -> list:
        self.stop_from = math.inf
        futures = {}  # future -> the end row of its range
        with caller_on_one_thread(self.device):
            try:
                for lo, hi in split_rows(self.n_samples, min(pool._max_workers, self.max_ranges)):
                    futures[submit(pool, fn, lo, hi)] = hi
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

    def _checked_partials(self, lo, hi, log_c):
        """Rows ``[lo, hi)``: the row checks, the column maxima (of ``S / eps``: only their ``-inf`` entries are
        used) and, given ``log c`` (N,) (cold start, ``a = log c``), the partial ``LSE_j(S / eps + log c_j)`` of
        every chunk. Works in place in one buffer per range, like the iterations."""
        col_max = torch.full((self.n_heads, self.n_clusters), NEG_INF, dtype=self.dtype, device=self.device)
        zeros = torch.zeros((self.n_heads, self.n_clusters), dtype=self.dtype, device=self.device)
        buffer = self.work_buffer(lo, hi)
        partials, summaries = [], []
        from_features = hasattr(self.source, "shifted")  # -inf only from a bias: whole columns, checked by the maxima
        patterns = None if from_features else [MaskPatterns(self.n_clusters) for _ in range(self.n_heads)]
        for rows in self.chunks(lo, hi):
            # S / eps, (H, T, K): NaN and inf where S has them (features: products beyond the compute dtype too)
            if from_features:
                x = self.source.scaled(rows, self.inv_eps, out=buffer(rows))
            else:
                x = self.shifted(rows, zeros, out=buffer(rows))
            # x is S / eps: inv_eps 1, and the solve's epsilon for a message to say the size of S
            extremes = []  # the rows' smallest and largest minimum and maximum, for otlabel.advice
            masked = check_rows(x, self.weighted, rows.start, inv_eps=1.0, compute_dtype=self.dtype,
                                batched=self.source.batched, from_features=from_features,
                                features=getattr(self.source, "features", None), epsilon=self.epsilon,
                                given_rows=lambda rows=rows: self.source.chunk(rows), extremes=extremes)  # fmt: skip
            if from_features:  # its one row, if any, is the features' (the products' may differ in the last bit)
                summaries.append(features_chunk_summary(x, extremes, self.source.dtype, self.epsilon,
                                                        lambda rows=rows: self.source.features[rows]))  # fmt: skip
            else:
                summaries.append(checked_rows_summary(x, extremes, self.source.dtype, scale=self.epsilon))
            if patterns is not None:
                collect_masks(patterns, x, masked, self.sample_mass[rows])  # for Hall's condition, decided at the end
            col_max = torch.maximum(col_max, column_max(x))
            if log_c is not None:
                x.add_(log_c[rows][None, :, None])
                top = x.amax(dim=1, keepdim=True)  # (H, 1, K)
                top = torch.where(torch.isneginf(top), 0.0, top)  # a column with nothing allowed stays -inf below
                partials.append(top[:, 0] + exp_(x.sub_(top)).sum(dim=1).log())  # (H, K)
        return col_max, partials, patterns, merge_all(summaries)

    def validate(self) -> None:
        """One pass of input checks (the cold start does them for free; a warm start needs this)."""
        self._finish_validation(self.map_ranges(lambda lo, hi: self._checked_partials(lo, hi, None)))

    def _finish_validation(self, parts) -> None:
        self.summary = merge_all(summary for *_, summary in parts)  # what the checks read, for otlabel.advice
        col_max, _, patterns, _ = parts[0]
        for part, _, more, _ in parts[1:]:
            col_max = torch.maximum(col_max, part)
            for head, other in zip(patterns or [], more or [], strict=True):
                head.merge(other)
        # col_max is of S / eps; the source's own column maxima (as given) are read on failure only
        check_columns(col_max, self.r, self.dtype, isinstance(self.source, FeatureSource), self.epsilon,
                      given_col_max=self.source.column_max)  # fmt: skip
        if patterns is not None:
            check_masks(patterns, self.r, self.source.batched, self.mass_rounding)
        self._reachable = col_max > NEG_INF
        self.validated = True

    def cluster_lse(self, b):
        if b is not None or self.validated:
            return super().cluster_lse(b)
        log_c = self.log_c  # on this thread: read first in the workers, each of them computed it
        parts = self.map_ranges(lambda lo, hi: self._checked_partials(lo, hi, log_c))  # cold start + checks
        self._finish_validation(parts)
        return torch.logsumexp(torch.stack(sum((p for _, p, _, _ in parts), [])), dim=0)  # fixed order: deterministic

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
    if not isinstance(backend, str):  # an array: NumPy's "truth value ... is ambiguous" from the comparisons below
        raise ValueError(f"backend must be 'auto' or 'torch' when streaming, got {backend!r}.")
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


# Outputs with more entries than this, in a layout whose overlap the strides alone do not settle, count as
# overlapping (their offsets are not compared: 8 bytes an entry)
MAX_COMPARED_OFFSETS = 1 << 22


def overlaps_itself(out: torch.Tensor) -> bool:
    """Whether two entries of ``out`` (strides >= 0) share memory. Where each stride, smallest first, goes beyond
    the reach of the smaller ones, none do: every layout torch and NumPy allocate, and their slices, transposes and
    the like. Other layouts (interleaved strides, ``as_strided`` rows that overlap) have their entries' offsets
    compared, up to :data:`MAX_COMPARED_OFFSETS` entries; beyond, they count as overlapping."""
    reach = 0  # the largest offset the smaller strides reach
    for step, size in sorted((step, size) for step, size in zip(out.stride(), out.shape, strict=True) if size > 1):
        if step <= reach:
            break
        reach += step * (size - 1)
    else:
        return False
    if out.numel() > MAX_COMPARED_OFFSETS:
        return True
    offsets = torch.zeros((), dtype=torch.int64)
    for step, size in zip(out.stride(), out.shape, strict=True):
        offsets = offsets[..., None] + step * torch.arange(size, dtype=torch.int64)  # (*sizes so far)
    return torch.unique(offsets).numel() < out.numel()


def as_output(out, shape: tuple, dtype: np.dtype, name: str, batched: bool, files: list):
    """``labels_out``/``codes_out``: a path, or a writable array/tensor of the right shape and dtype. Returned as a
    CPU torch tensor sharing its memory. A path gets an :class:`~otlabel.outputs.AtomicNpy` (appended to ``files``):
    a temporary ``.npy`` that the caller commits (renames into place) on success or discards on failure."""
    if out is None:
        return None
    wanted = shape if batched else shape[1:]  # the caller's layout: (N,) / (N, K) for 2-d scores
    dtype = np.dtype(dtype)
    allocate = f"np.empty({wanted}, np.{dtype.name})"
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
        # What torch cannot write into (its errors named no output, and advised a copy, which would be written instead
        # of the caller's array), or what would hide the results (a mask).
        if isinstance(out, np.ma.MaskedArray):  # written through its data: what its mask hides would stay hidden
            hidden = hidden_entries(out)
            if hidden:
                clear = f"{name}.soften_mask(), then " * out.hardmask + f"{name}.mask = np.ma.nomask"
                raise TypeError(f"{name} is a NumPy masked array with {masked_entries(hidden)}: what is written "
                                f"under its mask would stay hidden. Pass a plain array ({allocate}) or a path, or "
                                f"clear its mask first ({clear}).")  # fmt: skip
            out = np.ma.getdata(out)  # nothing masked: every result shows
        if not out.dtype.isnative:
            raise TypeError(f"{name} is {out.dtype.name} in non-native byte order ({out.dtype.str}), which torch "
                            f"cannot write into: allocate it as {allocate}, or pass a path.")  # fmt: skip
        if any(stride < 0 for stride in out.strides):
            raise ValueError(f"{name} is a NumPy view with a negative stride (such as x[::-1]), which torch cannot "
                             "write into: pass the array unreversed (results come in the samples' order), or a "
                             "path.")  # fmt: skip
        out = torch.from_numpy(out)
    if not isinstance(out, torch.Tensor):
        raise TypeError(f"{name} must be a path, a numpy array or a torch tensor, got {type(out).__name__}.")
    # Written in place, into strided memory: torch's own errors (aten::view for a sparse one, "Internal error" for a
    # nested one) named no fix. A dense copy would be written instead of the caller's tensor: the fix is theirs.
    if out.is_nested or out.layout != torch.strided:
        what = "nested" if out.is_nested else str(out.layout).removeprefix("torch.")
        raise TypeError(f"{name} is a {what} tensor: outputs are written in place, into dense memory. Pass a dense "
                        f"tensor or array ({allocate}) or a path, and convert the result afterwards.")  # fmt: skip
    # The layout it will be read in, the batched one, or flat: a (K, N) array has the right size but would be
    # filled in (N, K) order, which reads as garbage.
    if tuple(out.shape) not in (wanted, shape, (math.prod(wanted),)):
        raise ValueError(f"{name} must have shape {wanted} ({math.prod(wanted):,} elements), got shape "
                         f"{tuple(out.shape)}.")  # fmt: skip
    if out.dtype != torch.from_numpy(np.empty(0, dtype)).dtype:
        raise ValueError(
            f"{name} must be {dtype.name}, got {str(out.dtype).removeprefix('torch.')}: allocate it as {allocate}."
        )
    if out.device.type != "cpu":
        raise ValueError(f"{name} must be on the CPU (it is written chunk by chunk from the host).")
    if out.requires_grad:  # a leaf (or a view of one): torch's "leaf Variable ... used in an in-place operation"
        raise TypeError(f"{name} requires grad: the codes are written into it in place, outside autograd (a target, "
                        f"not differentiated through). Pass one that does not ({allocate}), or {name}.detach() to "
                        "write into this one's memory.")  # fmt: skip
    # What torch refuses to write in place, once the solve is over, advising a clone (which would be written instead)
    if any(step == 0 and size > 1 for step, size in zip(out.stride(), out.shape, strict=True)):
        raise ValueError(f"{name} has entries that share memory (a stride of 0, as expand or broadcast_to make), so "
                         f"each would overwrite the last: pass {allocate} or a path.")  # fmt: skip
    if overlaps_itself(out):  # torch writes these without a word (it settles stride 0 alone), results overwritten
        verdict = "may have" if out.numel() > MAX_COMPARED_OFFSETS else "has"
        raise ValueError(f"{name} {verdict} entries that share memory (strides of {tuple(out.stride())} entries for "
                         f"shape {tuple(out.shape)}: rows that overlap, as as_strided can make), so results would "
                         f"overwrite each other: pass {allocate} or a path.")  # fmt: skip
    if out.is_inference() and not torch.is_inference_mode_enabled():
        raise ValueError(f"{name} is an inference tensor (made under torch.inference_mode()), which torch allows no "
                         "in-place writes to outside that mode: allocate it outside, or call sinkhorn_assign_stream "
                         "inside torch.inference_mode().")  # fmt: skip
    return out.view(shape)


# ----------------------------------------------------------------------------------------------- entry point


def labels_copy_fits(labels: torch.Tensor) -> bool:
    """Whether a copy of streamed labels takes at most an eighth of the memory available (or that is not known):
    labels are written to a path when memory is short, and a copy that does not fit would fail after the solve."""
    free = available_memory_bytes()
    return free is None or labels.numel() * labels.element_size() <= free // 8


@entry_point
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
    memory_budget: int | str | None = None,
    labels_out=None,
    codes_out=None,
    callback=None,
    warn: bool = True,
) -> SinkhornResult:
    r""":func:`otlabel.sinkhorn_assign` for data that does not fit on the device: streamed in chunks.

    Give either ``scores`` (N, K) / (H, N, K), or ``features`` (N, D) with ``prototypes`` (K, D) / (H, K, D)
    (scores ``Z C^T + bias``, never materialised). Each may be a CPU torch tensor, a NumPy array, a ``np.memmap``
    or a path to a ``.npy`` (memory-mapped: the file may be larger than RAM; one in non-native byte order, such as
    big-endian ``'>f4'``, is converted chunk by chunk as it is read). Every iteration streams the data
    through ``device`` once, in chunks sized so the device working set stays within ``memory_budget`` bytes.
    The problem, the solution and the result are exactly those of :func:`otlabel.sinkhorn_assign`
    (``max <P, S> + eps H(P)``, rows of ``P`` summing to ``c``, columns to ``r``), up to fp32 rounding.

    Args:
        scores, features, prototypes, bias: the data (see above); ``scores`` and ``features`` are exclusive.
        epsilon, cluster_weights, sample_weights, max_iter, tol, init, acceleration, over_relaxation, warn:
            as in :func:`otlabel.sinkhorn_assign`.
        backend: ``"auto"`` or ``"torch"``: the chunks go through PyTorch operations (the Triton kernels take
            device tensors: :func:`otlabel.sinkhorn_assign`). Accepted so that one set of options serves every
            entry point.
        epsilon_scaling: must be ``None`` here: on top of the default Anderson mixing it did not pay on in-memory
            scores (the tolerance benchmark, ``benchmarks/RESULTS_CPU.md``).
        device: compute device, default ``"cuda"`` when available, else ``"cpu"``.
        memory_budget: bytes of device memory for chunk temporaries, or a size as ``"512M"`` or ``"2G"`` (powers
            of 1024, as ``--memory-budget`` on the command line); default 256 MiB on the CPU, up to 2 GiB on CUDA.
            Memory use is O(budget + K·D + N) (labels and sample weights), never O(N·K), plus for scores
            with -inf the mask check's distinct rows on the host, whatever the budget: at most
            ``otlabel.feasibility.MAX_PATTERN_EDGES`` = 2·10^7 row-cluster pairs a head and CPU thread (20 MB as
            booleans; 10-60 MiB in all, measured on 2 threads), beyond which the check is skipped, and for a mask
            that forbids most pairs the max-flow network that decides it (680 MiB at 19,000 x 1,000 with 60% -inf,
            as in memory). A chunk holds at least one sample whatever the budget; a budget that cuts a pass into many
            chunks of under 4,096 scores gets a :class:`SmallChunksWarning` (per-chunk overhead then dominates:
            1-sample chunks ran ~100x slower).
        labels_out: where labels go: a path (a new int64 ``.npy`` is written chunk by chunk) or a writable int64
            array/tensor shaped like the labels ((N,) or (H, N)) or flat. Default: a new CPU tensor.
        codes_out: same for the soft codes (float32, (N, K) or (H, N, K), or flat), written in the same final pass.
            Output paths are written to a temporary file renamed into place once complete, and may not be an input
            file (given as a path or a NumPy memmap; a torch tensor made from a memmap cannot be recognised).
            Without it, ``result.codes`` is computed on first access into an (N, K) CPU tensor.
        callback: ``callback(iteration, marginal_error)`` after every iteration (e.g. a progress bar).

    On the CPU each pass splits the rows over ``torch.get_num_threads()`` worker threads (the chunks are sized for
    the count at the call: a later read-out of ``codes``/``objective`` uses no more threads than the budget holds
    chunks) and, for the duration of the pass, sets torch's intra-op threads to 1 (restored afterwards): other torch
    work running concurrently in the same process would see one thread meanwhile.

    Returns:
        :class:`~otlabel.SinkhornResult`; ``labels`` (and ``codes``) are CPU tensors (views of the output arrays when
        given; labels written to a path are a copy in memory, unless that would take more than an eighth of the
        available memory, codes written to a path a view of that file),
        ``cluster_potentials`` on ``device``. ``codes``/``objective`` stream the data once more.
    """
    check_flags(warn=warn)
    if (scores is None) == (features is None):
        raise ValueError("give either scores, or features with prototypes (not both, not neither).")
    if features is not None and prototypes is None:
        raise ValueError("features need prototypes: pass prototypes=(K, D) array (the cluster centres).")
    if scores is not None and (prototypes is not None or bias is not None):
        raise ValueError("prototypes and bias go with features=, not with scores.")
    epsilon, tol = check_epsilon(epsilon), check_tol(tol)
    acceleration = check_solver_options(max_iter, tol, acceleration, over_relaxation, callback)
    check_stream_backend(backend)
    no_epsilon_scaling(epsilon_scaling, "when streaming")
    if device is None:
        first = scores if scores is not None else features
        on_gpu = isinstance(first, torch.Tensor) and first.is_cuda
        device = first.device if on_gpu else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = check_device(device)
    if memory_budget is not None:  # bytes, or a size such as "512M"
        memory_budget = check_memory_budget(memory_budget)
    chunk_budget = chunk_bytes(memory_budget, device)
    if scores is not None:
        source = HostSource(scores, device, memory_budget=chunk_budget)
    else:
        source = FeatureSource(features, prototypes, bias, device, memory_budget=chunk_budget)
    warn_if_chunks_too_small(source, memory_budget, device)
    h, n, k = source.n_heads, source.n_samples, source.n_clusters
    files = []  # output files given as paths: renamed into place only once everything has been written
    try:
        inputs = {"scores": scores, "features": features, "prototypes": prototypes, "bias": bias,
                  "cluster_weights": cluster_weights, "sample_weights": sample_weights, "init": init}  # fmt: skip
        refuse_overwriting_inputs({"labels_out": labels_out, "codes_out": codes_out}, inputs)
        as_read = (n, k) if scores is not None else None  # a wrong length that is the other one: transposed?
        fix = TRANSPOSE_PATH_FIX if isinstance(scores, (str, os.PathLike)) else TRANSPOSE_FIX
        r = check_weights(cluster_weights, k, "cluster_weights", "number of clusters K", device, as_read, fix)
        c = check_weights(sample_weights, n, "sample_weights", "number of samples N", device, as_read, fix)
        # A weighted cluster closed by a -inf bias: said of the bias, as the kernel paths say it (the rows' checks
        # would read a row -inf on every weighted cluster as products that overflow). One read of the device.
        if scores is None and source.bias is not None:
            refuse_closed_clusters(source.bias[:, 0], r)
        # In the compute dtype, which is what the operator adds to the scores: a float64 warm start measured 3-15x
        # worse first errors (1.6e-5 against 1.1e-6 at eps 4e-4), its rounding showing up as marginal error.
        b0 = check_init(init, h, r, compute_dtype(source.dtype), epsilon=epsilon)
        labels = as_output(labels_out, (h, n), np.int64, "labels_out", source.batched, files)
        codes = as_output(codes_out, (h, n, k), np.float32, "codes_out", source.batched, files)
        rounding = marginals_rounding(cluster_weights, sample_weights, k, n)
        operator = StreamingOperator(source, epsilon, c, r, labels, codes, mass_rounding=rounding,
                                     memory_budget=memory_budget)  # fmt: skip
        if b0 is not None:
            operator.validate()
        out = run_sinkhorn(operator, r, b0, max_iter, tol, acceleration, callback=callback)
        # from what validation read (the weights only for a collapse's message)
        warn_about_scores(operator.summary, epsilon, k, None if cluster_weights is None else r, features=scores is None)
        labels, codes = operator.assign(out.potentials, want_codes=codes is not None)
        commit_all(files[::-1])  # fsynced, then renamed together (labels last)
        if isinstance(labels_out, (str, os.PathLike)) and labels_copy_fits(labels):
            # Labels written to a path come back as a copy in memory (8 bytes a sample): a view of the file kept it
            # mapped, with a descriptor open and, once a later solve renamed a new file over it, the old file's disk
            # space, for as long as the labels were kept (a training run keeping each epoch's labels ran out of
            # descriptors).
            labels = labels.clone()
        # A later read of codes writes its labels elsewhere: by then the caller's labels_out may hold a newer solve's
        # labels (a buffer reused every epoch), or be the published file, or an inference tensor outside the mode
        operator.labels_out = None
    except BaseException:
        for f in files:
            f.discard()
        raise
    finally:
        source.stream.close()  # a speculative prefetch may be in flight
    if warn:
        warn_if_not_converged("sinkhorn_assign_stream", out, tol, epsilon, operator.dtype)
    # labels and codes are the host outputs written above (CPU tensors, views of labels_out/codes_out when given)
    return package_result(operator, out, epsilon=epsilon, batched=source.batched, sample_weights=c.cpu(),
                          labels=labels, codes=codes)  # fmt: skip
