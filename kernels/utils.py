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
# Multi-row tiles of 8192 lanes spill registers on sm_90 at any num_warps; the one-row tiles of ``row_tile``
# (MAX_ROW_TILE_K, below) hold up to 8192 without spilling.
MAX_ONE_CHUNK_K = 4096
# Rows per tile: at least this many, so the per-tile rescale of the K running sums (one exp2 per
# cluster per tile) stays a small fraction of the one-or-two exp2 per score.
MIN_BLOCK_N = 4
# ...and at most this many: per-row state (argmax, max, sum) spills registers beyond it at small K.
MAX_BLOCK_N = 64
# Chunked (large-K) path: tile shape and warps. Measured on an H100 (2026-11-23, N = 2^20, K = 16384, one pass):
# 4x2048 reads bf16 scores at 49% of copy bandwidth where 8x1024 reached 21% (fp32: 51% both).
CHUNK_BLOCK_N, CHUNK_BLOCK_K, CHUNK_WARPS = 4, 2048, 8
# One-chunk tiles get one warp per this many elements (32 per thread), clamped to [4, 16] warps. Measured on an
# H100 (2026-11-23, N = 2^20, K = 1000, 4x1024 tiles): 4 warps read fp32 at 94% of copy bandwidth and bf16 at 56%,
# 8 warps at 79% and 13%; at K = 3000 the 4x4096 tile at 16 warps (also 32 per thread) beat every other shape tried.
ONE_CHUNK_ELEMENTS_PER_WARP = 1024
# Scores stored (H, K, N), read through a transposed view (stride_n = 1): a tile's column is BLOCK_N contiguous
# elements, so rows per tile set how much of each 32-byte DRAM sector a load uses (the (N, K) layout's rows of K
# elements are always whole). The one-chunk tile above gives 4 rows at K > 512: 16 bytes per column in fp32, 8 in bf16,
# a half or a quarter of each sector. Transposed, a one-chunk tile takes rows up to a whole sector (SECTOR_BYTES /
# itemsize) while it stays within TRANSPOSED_ONE_CHUNK elements: 8x1024 (fp32 and 16-bit) and 16x512 (16-bit), at
# 32 elements per thread as in the (N, K) layout (sm_90 cubins checked by benchmarks/sm90_compile.py --check).
# At K > 2048 the 4xK_pad tile is already at the register limit (8x2048 spills 48 B, 8x4096 544 B): it keeps 4 rows;
# neighbouring row tiles go to neighbouring programs, which read the rest of each sector at
# about the same time, so DRAM traffic should stay near one read of S while L2-to-SM traffic is 2x (fp32) or 4x (16-bit)
# -- predicted, not measured. The chunked path (two reads of S anyway) is free in its shape: TRANSPOSED_CHUNK gives
# 128-byte (fp32) or 64-byte (16-bit) columns instead of 32 or 16 bytes, at about the same registers (64-128, no spill;
# the 8x1024 tile spilled 8 B in bf16 under Triton 3.6).
SECTOR_BYTES = 32
TRANSPOSED_ONE_CHUNK = 8192
TRANSPOSED_CHUNK_N, TRANSPOSED_CHUNK_K = 32, 256
# Programs per SM for the persistent cluster-LSE grid: enough to hide latency, few enough that the
# (H, P, K) partials stay small next to S. A grid larger than what fits runs in waves: the work per program is
# equal, so that costs little, but the partials and their merge grow with P. What fits is set by the registers of
# the compiled partials kernel, known only after compiling; sm_90 cubins (Triton 3.6 and 3.9, fp32/bf16/fp16, warm,
# both layouts) give: tiles of 32 elements per thread 116-128 registers, so one program of 16 warps per SM (4x4096 at
# K in (2048, 4096]), two of 8, four of 4; other 16-warp tiles 64-95, one or two; other 8-warp tiles 48-128, two to
# five. Hence ``programs_per_sm``: the register file over 128 per thread for the first, 2 and PROGRAMS_PER_SM for
# the others (up to 2x over, or one under at small K where five fit).
PROGRAMS_PER_SM = 4
REGISTERS_PER_SM = 65536  # sm_80 to sm_90
# A program should own at least this many rows, or its K partials cost more than its share of S.
MIN_ROWS_PER_PROGRAM = 32
# One-row tiles for passes that sum column masses (row-major scores, K_pad <= MAX_ROW_TILE_K): a row is held by
# K_pad / 32 threads (32 elements each; rows of K_pad < 1024 are packed ROW_TILE_ELEMENTS to a warp), so its two
# reductions take fewer shuffles and barriers, and the column sums need no cross-thread reduction at all. The
# log-domain column sums could not afford one-row tiles (one exp2 per cluster per tile for the rescale: the 1x4096
# tiles of the 2026-11-23 sweep lost, 57% against 60%); column masses have no rescale. sm_90 compile (Triton 3.9),
# instructions of the loop body per real score, fp32: K = 3000 1x4096 w4 14.3 against 32.1 for the measured 4x4096
# w16 log-domain tile (26.6 with masses), K = 1000 1x1024 w1 10.2 against 22.8; 117-124 registers, no spill, up to
# 8192 lanes (1x8192 w8: one read of S per iteration where the chunked path reads it twice). Predicted, not yet
# measured on a GPU (benchmarks/RESULTS.md). Small N keeps the multi-row tiles (below): one-row tiles would leave
# too few rows per program to fill the GPU.
ROW_TILE_ELEMENTS = 1024
MAX_ROW_TILE_K = 8192


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def as_float32(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a contiguous fp32 tensor for a kernel argument: ``x`` itself, without a call into torch, when it
    already is one (even a no-op ``.to()`` costs a few us of host time, and a small solve makes several per
    iteration; see benchmarks/op_count.py)."""
    if x.dtype == torch.float32 and x.is_contiguous():
        return x
    return x.to(torch.float32).contiguous()


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
    vector_loads: bool = True  # 16-byte loads along K where K and the strides allow (``vector_width``)
    # Warm passes sum the plan's column masses (linear: the row's exp2 reused, no running max to rescale) instead
    # of log-domain column sums; see ``_merge_masses_kernel`` for the exact fallback that keeps it safe.
    column_mass: bool = True

    def row_tiles(self, n: int) -> int:
        return -(-n // self.block_n)


def programs_per_sm(block_n: int, block_k: int, num_warps: int, one_chunk: bool) -> int:
    """Programs of the cluster-LSE kernel that fit one SM at once, from the register counts above PROGRAMS_PER_SM."""
    if one_chunk and block_n * block_k >= 32 * 32 * num_warps:  # 32 tile elements per thread: 116-128 registers
        return max(1, REGISTERS_PER_SM // (32 * num_warps * 128))  # 1 at 16 warps, 4 at 4 warps
    if num_warps >= 16:  # two programs of 512 threads need <= 64 registers each: none measured below 64
        return 2
    return PROGRAMS_PER_SM


def row_tile(n: int, k: int, h: int, device: torch.device) -> tuple[int, int, int] | None:
    """(BLOCK_N, BLOCK_K, num_warps) of the one-row tile for column-mass passes over (h, n, k) row-major scores, or
    None where K is too large for one or N too small to give every program MIN_ROWS_PER_PROGRAM rows of it."""
    k_pad = next_power_of_2(k)
    if k_pad > MAX_ROW_TILE_K:
        return None
    block_n = min(max(1, ROW_TILE_ELEMENTS // k_pad), MAX_BLOCK_N)
    warps = max(1, block_n * k_pad // ONE_CHUNK_ELEMENTS_PER_WARP)
    programs = -(-sm_count(device) * programs_per_sm(block_n, k_pad, warps, True) // h)
    if n < programs * MIN_ROWS_PER_PROGRAM:
        return None
    return block_n, k_pad, warps


def dense_launch(
    n: int,
    k: int,
    h: int,
    device: torch.device,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    num_warps: int | None = None,
    n_programs: int | None = None,
    vector_loads: bool = True,
    column_mass: bool = True,
    transposed: bool = False,
    itemsize: int = 4,
    row_tiles: bool = True,
) -> DenseLaunch:
    """Tile sizes and grid for scores of shape (h, n, k) on ``device``; keyword overrides for tests.

    One chunk (``K <= MAX_ONE_CHUNK_K``): the padded row, ``4096 / K_pad`` rows clamped to
    [MIN_BLOCK_N, MAX_BLOCK_N], one warp per ONE_CHUNK_ELEMENTS_PER_WARP tile elements clamped to [4, 16]
    (K = 1000: 4x1024 tile, 4 warps; K = 3000: 4x4096, 16 warps), from the H100 sweep of
    ``benchmarks/gpu_dense.py --sweep`` (2026-11-23) within register counts of sm_90 cubins compiled offline.
    ``transposed``: S contiguous along N (a view of an (H, K, N) tensor), ``itemsize`` its element size: more rows
    per tile where that fills DRAM sectors (see SECTOR_BYTES). With ``column_mass`` on row-major scores and
    ``row_tiles``, the one-row tiles of ``row_tile`` where they apply (``row_tiles=False``: the tiles above, which the
    read-out kernels keep: a grid of one program per one-row tile would be N programs).
    """
    k_pad = next_power_of_2(k)
    if row_tiles and column_mass and not transposed and block_n is None and block_k is None and num_warps is None:
        block_n, block_k, num_warps = row_tile(n, k, h, device) or (None, None, None)
    one_chunk = k_pad <= MAX_ONE_CHUNK_K if block_k is None else block_k >= k
    if block_k is None:
        block_k = k_pad if one_chunk else TRANSPOSED_CHUNK_K if transposed else CHUNK_BLOCK_K
    if block_n is None:
        if one_chunk:
            block_n = min(max(MIN_BLOCK_N, 4096 // block_k), MAX_BLOCK_N)
            if transposed:
                block_n = max(block_n, min(SECTOR_BYTES // itemsize, TRANSPOSED_ONE_CHUNK // block_k))
        else:
            block_n = TRANSPOSED_CHUNK_N if transposed else CHUNK_BLOCK_N
        block_n = min(block_n, next_power_of_2(n))
    if num_warps is None:
        num_warps = min(16, max(4, block_n * block_k // ONE_CHUNK_ELEMENTS_PER_WARP)) if one_chunk else CHUNK_WARPS
    n_tiles = -(-n // block_n)
    if n_programs is None:
        per_sm = programs_per_sm(block_n, block_k, num_warps, one_chunk)
        by_device = -(-sm_count(device) * per_sm // h)
        by_rows = -(-n // MIN_ROWS_PER_PROGRAM)
        n_programs = min(by_device, by_rows)
    n_programs = max(1, min(n_programs, n_tiles))
    return DenseLaunch(block_n, block_k, one_chunk, num_warps, n_programs, vector_loads, column_mass)


def _check_row_tiles(n_programs: int, row_tiles: int, n: int) -> None:
    """Every program of a cluster-LSE launch must own a row tile: one with none would leave its partials as the last
    call left them, and the merge would read them (a workspace made for more samples than these)."""
    if n == 0:
        raise ValueError("no samples (N = 0): the cluster LSE of an empty set is not defined")
    if n_programs > row_tiles:
        raise ValueError(
            f"this workspace runs {n_programs} programs but N = {n} makes {row_tiles} row tiles: a program with none "
            "would merge stale partials; make the workspace for these inputs"
        )
