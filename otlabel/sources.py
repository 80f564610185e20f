"""Where the scores live: the chunked operators of ``otlabel.backends.torch_backend`` read them through this.

A source hands out the scores of a contiguous range of samples, ``chunk(rows) -> (H, T, K)``, on the compute
device. The dense source (here) slices a tensor already there; other sources (:mod:`otlabel.host_sources`:
streamed from the host or a file, computed from features and prototypes) produce each chunk on demand, so the
full ``(H, N, K)`` matrix never has to exist on the device. Operators must consume chunks in increasing row
order within one pass (streaming sources may prefetch the next chunk while the current one is used).
"""

from __future__ import annotations

import torch

# On the CPU, rows of fewer clusters than this are reduced as blocks of rows laid end to end (see column_max).
COLUMN_BLOCK_WIDTH = 4096
COLUMN_BLOCK_MIN_SCORES = 1 << 17  # below: a few more operations would cost more than they save


def column_max(scores: torch.Tensor) -> torch.Tensor:
    """``scores.amax(dim=1)`` of (H, N, K) scores: (H, K), exactly, with NaN propagated as there.

    On the CPU torch reduces over a strided axis slowly when rows are short: 26 ms at 1,000,000 x 10, 21 ms at
    4,000,000 x 2, against a 0.5 ms read. There, ``m`` consecutive rows of a contiguous tensor are taken as one row of
    ``m * K`` (up to ``COLUMN_BLOCK_WIDTH``), reduced over the blocks and then over the ``m`` copies of each column:
    1.4 and 0.7 ms (measured side by side; the same from K = 1,000 up)."""
    h, n, k = scores.shape
    per_block = COLUMN_BLOCK_WIDTH // max(k, 1)
    small = scores.numel() < COLUMN_BLOCK_MIN_SCORES
    if small or scores.device.type != "cpu" or per_block < 2 or n < 2 * per_block or not scores.is_contiguous():
        return scores.amax(dim=1)
    whole = n - n % per_block
    blocks = scores[:, :whole].reshape(h, whole // per_block, per_block * k).amax(dim=1)  # (H, m K)
    out = blocks.view(h, per_block, k).amax(dim=1)
    return out if whole == n else torch.maximum(out, scores[:, whole:].amax(dim=1))


class ScoreSource:
    """Interface: ``n_heads``, ``n_samples``, ``n_clusters``, ``device``, ``dtype`` and :meth:`chunk`."""

    n_heads: int
    n_samples: int
    n_clusters: int
    device: torch.device
    dtype: torch.dtype  # dtype of the chunks handed out (fp16/bf16/fp32/fp64)
    random_access: bool = False  # True: chunks may be requested in any order and from several threads
    rows_per_chunk: int | None = None  # streamed sources: the rows their buffers hold, which one pass reads at a time
    row_extra_bytes: int = 0  # device bytes a row takes beside its scores' working buffers (staging, features)

    def chunk(self, rows: slice) -> torch.Tensor:
        """Scores of samples ``rows`` for every head and cluster: (H, T, K) on ``self.device``."""
        raise NotImplementedError

    def chunk_in(self, rows: slice, spare: torch.Tensor) -> torch.Tensor:
        """:meth:`chunk`, for a caller that copies it at once: a source that computes its scores (features) forms
        them in ``spare``, a buffer at least as large, free until the copy is made. Held scores are a view anyway."""
        return self.chunk(rows)

    def column_max(self) -> torch.Tensor:
        """``max_j S[h, j, k]`` (H, K) in :func:`maxima_dtype`, one pass; ``-inf`` for a cluster no sample may reach."""
        out = torch.full((self.n_heads, self.n_clusters), float("-inf"), dtype=maxima_dtype(self.dtype),
                         device=self.device)  # fmt: skip
        for rows in self.column_max_chunks():
            out = torch.maximum(out, column_max(self.chunk(rows)).to(out.dtype))
        return out

    def column_max_chunks(self):
        """The row ranges :meth:`column_max` reads: a streamed source's own chunks, else ~4M scores each."""
        if self.rows_per_chunk is not None:
            return row_chunks(self.n_samples, 1, self.rows_per_chunk)
        return row_chunks(self.n_samples, self.n_heads * self.n_clusters, 1 << 22)


def maxima_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype column maxima are handed out in: float64 for float64 scores, else float32. A float64 maximum below
    float32's range (-4e38, solvable at epsilon 1e28) is finite, and rounded to float32 it read as -inf: a cluster no
    sample may reach, whose potential went to -inf ("potentials became non-finite")."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class DenseSource(ScoreSource):
    """Scores already in memory on the compute device (any strides: slicing never copies)."""

    random_access = True  # chunks may be read in any order, from several threads

    def __init__(self, scores: torch.Tensor, known_column_max: torch.Tensor | None = None):
        self.scores = scores  # (H, N, K)
        self.n_heads, self.n_samples, self.n_clusters = scores.shape
        self.device, self.dtype = scores.device, scores.dtype
        self.known_column_max = known_column_max  # (H, K), when validation has computed it

    def chunk(self, rows: slice) -> torch.Tensor:
        return self.scores[:, rows]

    def column_max(self) -> torch.Tensor:
        known = self.known_column_max
        return (column_max(self.scores) if known is None else known).to(maxima_dtype(self.dtype))


def row_chunks(n_rows: int, row_elements: int, chunk_elements: int):
    """Yield ``slice`` objects covering ``range(n_rows)`` with at most ``chunk_elements`` per chunk."""
    step = max(1, chunk_elements // max(1, row_elements))
    for start in range(0, n_rows, step):
        yield slice(start, min(start + step, n_rows))
