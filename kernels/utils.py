"""Launch heuristics for the dense kernels, in one place (tile sizes, warps, number of programs).

Nothing here imports Triton: the numbers are plain Python so the backend can size its workspaces
before the first launch, and tests can force small tiles to reach every masking edge under the
interpreter.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2):   log(x) == log2(x) * LN2

# A whole row of K clusters stays in registers (one read of S per iteration) while the padded row
# fits this many lanes; beyond it the kernel streams K in chunks and reads each row tile twice.
MAX_ONE_CHUNK_K = 8192
# Elements of one (BLOCK_N, BLOCK_K) score tile held in registers at a time.
TILE_ELEMENTS = 16384
# Programs per SM for the persistent cluster-LSE grid: enough to hide latency, few enough that the
# (H, P, K) partials stay small next to S.
PROGRAMS_PER_SM = 4
# A program should own at least this many rows, or its K partials cost more than its share of S.
MIN_ROWS_PER_PROGRAM = 32


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def next_power_of_2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device``; a small stand-in (2) for CPU tensors in the interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 2


@dataclass(frozen=True)
class DenseLaunch:
    """How the dense kernels tile an (H, N, K) score tensor.

    ``one_chunk``: ``BLOCK_K >= K``, a row tile is loaded once and reused for both the sample step and
    the cluster partials. ``n_programs`` (P): programs per head of the persistent cluster-LSE grid.
    """

    block_n: int
    block_k: int
    one_chunk: bool
    num_warps: int
    n_programs: int

    def row_tiles(self, n: int) -> int:
        return -(-n // self.block_n)


def dense_launch(
    n: int,
    k: int,
    h: int,
    device: torch.device,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    n_programs: int | None = None,
) -> DenseLaunch:
    """Tile sizes and grid for scores of shape (h, n, k) on ``device``; keyword overrides for tests.

    Heuristic (to be tuned on a GPU, see benchmarks/gpu_dense.py): the whole padded row in one tile
    when it fits ``MAX_ONE_CHUNK_K``, as many rows as fit ``TILE_ELEMENTS``; otherwise 1024-wide chunks
    of 16 rows. P programs per head so that all heads together make ``PROGRAMS_PER_SM`` per SM.
    """
    if block_k is None:
        k_pad = next_power_of_2(k)
        block_k = k_pad if k_pad <= MAX_ONE_CHUNK_K else 1024
    if block_n is None:
        block_n = max(1, min(TILE_ELEMENTS // block_k, 16, next_power_of_2(n)))
    num_warps = 8 if block_n * block_k >= 8192 else 4
    n_tiles = -(-n // block_n)
    if n_programs is None:
        by_device = -(-sm_count(device) * PROGRAMS_PER_SM // h)
        by_rows = -(-n // MIN_ROWS_PER_PROGRAM)
        n_programs = min(by_device, by_rows)
    n_programs = max(1, min(n_programs, n_tiles))
    return DenseLaunch(block_n, block_k, block_k >= k, num_warps, n_programs)
