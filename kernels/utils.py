"""Launch heuristics for the dense and the features kernels, in one place (tile sizes, warps, stages, number of
programs), and the host helpers both kernel families use.

Nothing here imports Triton (``max_shared_memory`` asks Triton's driver, on a CUDA device only): the numbers are
plain Python so the backend can size its workspaces before the first launch, and tests can force small tiles to
reach every masking edge under the interpreter.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass

import torch

LOG2E = 1.4426950408889634  # log2(e): exp(x) == exp2(x * LOG2E)
LN2 = 0.6931471805599453  # ln(2):   log(x) == log2(x) * LN2
# The dtypes the kernels read (scores, features, prototypes); they compute in fp32 whatever the input (DESIGN.md §4).
# The one definition: the triton backend and features mode route and check with it too.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def compile_options(**options) -> dict:
    """Triton compile options for a launch (``num_warps``, ``enable_fp_fusion``, ...); none under the interpreter,
    which takes none."""
    return {} if interpreting() else options


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


# ----------------------------------------------------------------------------------------------------
# Dense kernels (kernels/sinkhorn_dense.py): S (H, N, K) on the device
# ----------------------------------------------------------------------------------------------------

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


# ----------------------------------------------------------------------------------------------------
# Features kernels (kernels/sinkhorn_features.py): Z (N, D) and C (H, K, D), the scores never stored
# ----------------------------------------------------------------------------------------------------

# Tiles of the GPU launch, (BLOCK_N, BLOCK_K, num_warps, num_stages) per input itemsize, at D <= 128. Chosen from
# sm_90 cubins compiled offline (Triton 3.9, contiguous inputs): bf16/fp16 128x64, 8 warps, 3 stages: 112
# registers, 82 KB shared memory; fp32 64x64, 8 warps, 2 stages: 101 registers, 99 KB. No spills, two programs per
# SM, wgmma with the Z tile in shared memory for both sweeps and the prototype chunks prefetched by cp.async.
# (fp32 with 4 warps needs 245 registers; 3 stages need 131 KB, one program per SM.) A row tile of 128 samples
# gives each prototype chunk read from L2 128 FLOPs per byte (16-bit). Not yet timed on a GPU:
# ``benchmarks/gpu_features.py`` sweeps the alternatives.
# fp32 features rounded to fp16 in the kernel ("fp16" precision): the fp32 Z tile costs registers while it is
# converted; 128x64 needs 191-199 registers at 8 warps (one program per SM), 128x32 needs 128 (two).
GPU_TILES = {2: (128, 64, 8, 3), 4: (64, 64, 8, 2), "fp32>fp16": (128, 32, 8, 3)}
# Largest D kept whole in shared memory for a row tile (and one stage fewer past 128, to fit: bf16 D = 256 needs
# 131 KB, fp32 198 KB); beyond it D is streamed in chunks of STREAM_D and Z is re-read per prototype chunk.
MAX_ONE_D = 256
STREAM_D = 64
# Exact fp32 products ("ieee" on CUDA cores, "tf32x3" as three tf32 dots) hold more per D element: with D = 128 whole
# they need 255 registers and spill 0.6-4.4 KB (sm_90 cubins, Triton 3.9); chunks of 32 along D spill nothing
# (114-162 registers), at the price of re-reading the Z tile per prototype chunk (from L2).
EXACT_STREAM_D = 32
EXACT_PRECISIONS = ("ieee", "tf32x3")
# fp32 features whose rows do not start on 16-byte boundaries (D not a multiple of 4, or a view with such a row
# stride; see ``d_vector_width``) cannot be copied into shared memory by cp.async: the tile is loaded 4 bytes at a
# time through registers. Kept whole past D = 128 (a 256-wide tile) that needs 255 registers and spills in the
# iteration kernel (D = 201: 208 B with Triton 3.9, 672 B with 3.6); chunks of EXACT_STREAM_D spill nothing (128-138
# registers, sm_90 cubins, both versions). Aligned rows (D = 136, 200: multiples of 4) keep D whole: with the
# kernels' alignment hint (``VEC_D``) they compile like D = 256 (171-210 registers, no spill, cp.async).
UNALIGNED_FP32_MAX_ONE_D = 128
# Programs per SM of the persistent cluster-LSE grid. The default tiles at D <= 128 fit two (registers and shared
# memory, sm_90 cubins with Triton 3.9); one fits at D in (128, 256] (129-193 KB of shared memory), with exact fp32
# products (tf32x3: 163-174 registers) and, under Triton 3.6, fp32 features rounded to fp16 (142 registers at
# D = 128). There the grid runs in two waves: equal work per program, so little lost, but (H, P, K) partials and a
# merge twice the size they need. Not derived per launch: registers are known only after compiling (and differ
# between Triton versions), and ``shared_memory_bound`` is exact on sm_90 only -- on sm_80/86/89 it over-states the
# shared memory and would under-fill the GPU, the costlier mistake.
FEATURES_PROGRAMS_PER_SM = 2
# Shared memory: an H100 lets a program use 227 KB, and every default tile fits (at most 208 KB: fp32, D = 256). GPUs
# of compute capability 8.6/8.9 (A10, A40, L4, L40, RTX 30xx/40xx) allow 99 KB, an A100 163 KB: there Triton would
# refuse the launch (OutOfResources), so ``features_launch`` shrinks the tiles until ``shared_memory_bound`` fits the
# device's limit. Each step roughly halves a large term of the bound, cheapest first: one pipeline stage fewer (down
# to 2), BLOCK_K down to SHRINK_K (shorter prototype chunks, same traffic), BLOCK_N down to SHRINK_N (each prototype
# chunk read from L2 for fewer samples), D streamed in chunks of STREAM_D (Z re-read from L2 per prototype chunk),
# then BLOCK_N and BLOCK_K down to 16. At 99 KB: 16-bit D = 128 and D = 512 keep their tiles with 2 stages, bf16,
# fp32>fp16 D = 256 and fp32 D = 128 run 64x32 tiles, fp32 D = 256 streams D through 64x32 tiles; at 163 KB (A100)
# only fp32 D = 256 changes (64x32); at 227 KB (H100) nothing does. The bound is loose on sm_80/86/89, so some of
# these shrink further than those GPUs need (bf16 D = 128 would fit 3 stages there). Predicted, not timed: smaller
# tiles cost L2 traffic and shorter tensor-core instructions, not DRAM traffic; a launch that fails costs more.
# ``benchmarks/sm90_compile.py --arch 86`` compiles these choices and checks that they fit.
SHRINK_K, SHRINK_N = 32, 64


@dataclass(frozen=True)
class FeaturesLaunch:
    """How the features kernels tile Z (N, D) and C (H, K, D); ``n_programs``: P per head."""

    block_n: int
    block_k: int
    block_d: int
    num_warps: int
    num_stages: int
    n_programs: int
    # Warm passes sum the plan's column masses in sweep 2 (no running max, no rescale; see
    # ``_features_merge_masses_kernel`` for the exact fallback that keeps it safe); False: log-domain sums.
    column_mass: bool = True

    def one_d(self, d: int) -> bool:
        return self.block_d >= d

    def padded_k(self, k: int) -> int:
        """K rounded up to whole chunks: the row length of the kernel's per-cluster buffers, loaded unmasked."""
        return -(-k // self.block_k) * self.block_k

    def row_tiles(self, n: int) -> int:
        return -(-n // self.block_n)


def shared_memory_bound(launch: FeaturesLaunch, d: int, itemsize: int, *, z_fp32_to_fp16: bool = False) -> int:
    """Bytes of shared memory a program of ``launch`` asks for, an upper bound; ``itemsize`` as in ``features_launch``.

    The terms of Triton's sm_90 layout: ``num_stages`` buffers of each (BLOCK_K, BLOCK_D) prototype chunk (filled by
    cp.async); the (BLOCK_N, BLOCK_D) Z tile kept for both sweeps in the dtype the dot reads, next to an fp32
    (BLOCK_N, BLOCK_K) buffer where the read-out kernel converts the layout of its score tile -- or, for fp32
    features rounded to fp16 in the kernel, the tile staged in fp32 (Triton 3.6's partials kernel at BLOCK_K = 64),
    whichever is larger; one Z buffer per stage, in Z's own dtype, when D is streamed; 1 KB of reduction scratch.
    It is within 1 KB of the read-out's shared memory for the default sm_90 launches of 16-bit and fp32 inputs, and
    bounds both kernels, compiled for sm_86 and sm_90 with Triton 3.6 and 3.9, over 432 tile shapes (BLOCK_N 32-128,
    BLOCK_K 32-64, 2-3 stages, D = 128 and 256 whole, 512 streamed; bf16, fp32, fp32>fp16); ``sm90_compile.py
    --check`` keeps checking it. The mma code of sm_80/86/89 mostly needs less (it reads Z from registers): there
    the bound is loose, not wrong.
    """
    z_itemsize = 4 if z_fp32_to_fp16 or itemsize >= 4 else 2  # Z as stored
    c_bytes = launch.num_stages * launch.block_k * launch.block_d * itemsize
    scratch = launch.block_n * launch.block_k * 4
    z_tile = launch.block_n * launch.block_d
    if launch.block_d >= d:
        z_bytes = max(z_tile * z_itemsize, z_tile * (2 if z_fp32_to_fp16 else z_itemsize) + scratch)
    else:
        z_bytes = launch.num_stages * z_tile * z_itemsize + scratch
    return c_bytes + z_bytes + 1024


@functools.cache
def _cuda_max_shared(index: int) -> int:
    from triton.runtime.driver import driver

    return driver.active.utils.get_device_properties(index)["max_shared_mem"]


def max_shared_memory(device: torch.device) -> int | None:
    """Shared memory one program may use on ``device`` (bytes; the number Triton checks at launch); None on a CPU."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    return _cuda_max_shared(device.index if device.index is not None else torch.cuda.current_device())


def features_launch(
    n: int,
    k: int,
    d: int,
    h: int,
    itemsize: int,
    device: torch.device,
    *,
    block_n: int | None = None,
    block_k: int | None = None,
    block_d: int | None = None,
    num_warps: int | None = None,
    num_stages: int | None = None,
    n_programs: int | None = None,
    z_fp32_to_fp16: bool = False,
    precision: str = "tf32",
    z_rows_aligned: bool = True,
    max_shared: int | None = None,
    column_mass: bool = True,
) -> FeaturesLaunch:
    """Tile sizes and grid for N samples, K clusters, D features, H heads; keyword overrides for tests and sweeps.

    Tiles are never below 16 (``tl.dot``); under the interpreter they are 16 (fast, and every mask is hit).
    ``itemsize``: of the tensor-core operands (the prototypes'); ``z_fp32_to_fp16``: fp32 features rounded to fp16
    in the kernel (``prepare_fp16``); ``precision``: the ``input_precision`` of fp32 inputs (exact ones stream D);
    ``z_rows_aligned``: every row of Z starts on a 16-byte boundary (``d_vector_width``; unaligned fp32 rows stream
    D past 128); ``max_shared``: bytes of shared memory one program may use (``max_shared_memory``; None: the
    device's, no limit on a CPU): tiles not given explicitly shrink until ``shared_memory_bound`` fits;
    ``column_mass``: warm passes sum plan masses (``FeaturesLaunch.column_mass``).
    """
    gpu_n, gpu_k, gpu_warps, gpu_stages = GPU_TILES["fp32>fp16" if z_fp32_to_fp16 else 4 if itemsize >= 4 else 2]
    small = interpreting()
    fixed = dict(n=block_n is not None, k=block_k is not None, d=block_d is not None, stages=num_stages is not None)
    if block_n is None:
        block_n = 16 if small else min(gpu_n, max(16, next_power_of_2(n)))
    if block_k is None:
        block_k = 16 if small else min(gpu_k, max(16, next_power_of_2(k)))
    exact_fp32 = itemsize >= 4 and precision in EXACT_PRECISIONS and not small
    if block_d is None and exact_fp32 and d > EXACT_STREAM_D:
        block_d = EXACT_STREAM_D
    unaligned_fp32 = itemsize >= 4 and not z_rows_aligned and not small
    if block_d is None and unaligned_fp32 and d > UNALIGNED_FP32_MAX_ONE_D:
        block_d = EXACT_STREAM_D
    if block_d is None:
        block_d = max(16, next_power_of_2(d)) if d <= MAX_ONE_D else STREAM_D
    if block_d > 128 and not small:
        gpu_stages = 2
    launch = FeaturesLaunch(
        block_n, block_k, block_d, num_warps or gpu_warps, num_stages or gpu_stages, 1, column_mass=column_mass
    )
    if max_shared is None:
        max_shared = max_shared_memory(device)
    bound = functools.partial(shared_memory_bound, d=d, itemsize=itemsize, z_fp32_to_fp16=z_fp32_to_fp16)
    while max_shared is not None and bound(launch) > max_shared:
        smaller = _shrink(launch, d, fixed)
        if smaller is None:
            break  # nothing left to shrink (explicit tiles): Triton reports the shortfall at launch
        launch = smaller
    if n_programs is None:
        n_programs = -(-sm_count(device) * FEATURES_PROGRAMS_PER_SM // h)
    n_programs = max(1, min(n_programs, launch.row_tiles(n)))
    return dataclasses.replace(launch, n_programs=n_programs)


def _shrink(launch: FeaturesLaunch, d: int, fixed: dict) -> FeaturesLaunch | None:
    """One step down the ladder described above SHRINK_N, skipping the sizes the caller fixed; None at the bottom."""
    steps = (  # (which size, whether it can shrink, the smaller launch's change)
        ("stages", launch.num_stages > 2, dict(num_stages=launch.num_stages - 1)),
        ("k", launch.block_k > SHRINK_K, dict(block_k=launch.block_k // 2)),
        ("n", launch.block_n > SHRINK_N, dict(block_n=launch.block_n // 2)),
        ("d", launch.one_d(d) and launch.block_d > STREAM_D, dict(block_d=STREAM_D)),
        ("n", launch.block_n > 16, dict(block_n=launch.block_n // 2)),
        ("k", launch.block_k > 16, dict(block_k=launch.block_k // 2)),
    )
    for size, possible, change in steps:
        if possible and not fixed[size]:
            return dataclasses.replace(launch, **change)
    return None
