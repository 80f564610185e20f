"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU, and report what the GPU would run.

The Triton interpreter (how CI runs the kernels) checks their arithmetic but not whether they compile for a real
GPU, nor how they use it. This script specialises each kernel the way Triton's JIT would for the default launches
(``dense_launch``, ``features_launch``) at benchmark sizes, compiles it to a cubin with the ``ptxas`` that ships in
the Triton wheel, and prints per kernel: registers, spilled bytes, shared memory, programs per SM (the tighter of
the register and shared-memory limits), counts of tensor-core (wgmma, mma.sync), async-copy and 16-byte load
instructions in the PTX, and static SASS counts from the cubin (``cuobjdump``, also in the wheel): ``MUFU.EX2``
(exp2), barriers, shuffles and all instructions. Nothing is timed: these are the compiler's numbers, not the GPU's.

    python benchmarks/sm90_compile.py            # every case, a table
    python benchmarks/sm90_compile.py --check    # exit 1 if a kernel fails to compile or an iteration kernel spills
    python benchmarks/sm90_compile.py --only dense_partials
    python benchmarks/sm90_compile.py --arch 86  # an A10 / RTX 30xx (99 KB of shared memory per program): the
                                                 # launches ``features_launch`` chooses for that limit, checked to fit

With ``--arch`` other than 90 the check is about launching at all: compile, atomics, shared memory within the
device's limit and within the heuristic's bound. Spills are shown but not failed: the tiles' register budgets are
tuned for sm_90 (under Triton 3.6, sm_86 caps the streamed fp32 D = 136/200 partials kernel at 128 registers and
spills 8 bytes).

``tests/test_benchmarks.py`` runs ``--check`` on every case (and ``--arch 86`` on the D = 256 ones), so a kernel
change that would not compile for the GPU fails CI even though the interpreter accepts it.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import NamedTuple

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones: before triton is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import importlib.util  # noqa: E402

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import BaseBackend, GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import native_specialize_impl  # noqa: E402


def _load_gpu_dense():
    """benchmarks/gpu_dense.py, whose importer finds otlabel.kernels installed or in a bare checkout."""
    spec = importlib.util.spec_from_file_location("gpu_dense", ROOT / "benchmarks" / "gpu_dense.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


_load_gpu_dense()._import_otlabel()
from otlabel.kernels import merge as km  # noqa: E402
from otlabel.kernels import sinkhorn_dense as kd  # noqa: E402
from otlabel.kernels import sinkhorn_features as kf  # noqa: E402
from otlabel.kernels.utils import programs_per_sm  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100: sm_90, warp size 32 (``--arch`` changes it)
REGISTERS_PER_SM, PROGRAMS_ON_H100 = 65536, 132
# The most shared memory one program may use (the driver's opt-in limit, what Triton checks at launch: more fails
# with OutOfResources), per compute capability: A100 163 KB, A10/A40/RTX 30xx and L4/L40/RTX 40xx 99 KB, H100 227 KB.
SHARED_PER_PROGRAM_BY_ARCH = {80: 166912, 86: 101376, 89: 101376, 90: 232448}
SHARED_PER_PROGRAM = SHARED_PER_PROGRAM_BY_ARCH[90]
SHARED_RESERVED = 1024  # per resident program, by the driver: an SM has SHARED_PER_PROGRAM + 1 KB
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
PTX_COUNTS = {  # instruction -> column name
    r"wgmma\.mma_async": "wgmma",
    r"mma\.sync": "mma.sync",
    r"cp\.async\.cg": "cp.async",
    r"ld\.global(\.[a-z]+)*\.v4": "ld.v4",
    r"atom\.": "atomics",
}


class Case(NamedTuple):
    """One kernel to compile and what ``--check`` requires of it."""

    fn: object
    args: dict
    constants: dict
    options: dict
    max_spill: int | None = None  # bytes of spilled registers allowed: 0 for a kernel that runs every iteration
    max_shared: int | None = None  # the launch heuristic's bound on its shared memory (``shared_memory_bound``)


class Pointer:
    """A tensor argument: Triton specialises pointers as 16-byte aligned (what the caching allocator gives)."""

    def __init__(self, dtype: str):
        self.dtype = dtype


def source(fn, args: dict, constants: dict) -> ASTSource:
    """The kernel as the JIT would specialise it for these argument values."""
    signature, constexprs, attrs = {}, dict(constants), {}
    for i, name in enumerate(fn.arg_names):
        if name in constants:
            signature[name] = "constexpr"
            continue
        value = args[name]  # a KeyError here: the case below misses an argument the kernel now takes
        if isinstance(value, Pointer):
            signature[name], attrs[(i,)] = "*" + value.dtype, [["tt.divisibility", 16]]
            continue
        kind, spec = native_specialize_impl(BaseBackend, value, False, True, True)
        if kind == "constexpr":  # e.g. an integer argument equal to 1
            signature[name], constexprs[name] = "constexpr", value
        else:
            signature[name] = kind
            if spec == "D":  # divisible by 16
                attrs[(i,)] = [["tt.divisibility", 16]]
    return ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)


def compile_case(fn, args: dict, constants: dict, options: dict) -> dict:
    kernel = triton.compile(source(fn, args, constants), target=TARGET, options=options)
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([str(CUOBJDUMP), "-res-usage", f.name], capture_output=True, text=True).stdout
    registers = int(re.search(r"REG:(\d+)", usage).group(1))
    spilled = int(re.search(r"STACK:(\d+)", usage).group(1)) + int(re.search(r"LOCAL:(\d+)", usage).group(1))
    shared = kernel.metadata.shared
    warps = options.get("num_warps", 4)
    per_sm = REGISTERS_PER_SM // max(1, registers * 32 * warps)
    if shared:
        per_sm = min(per_sm, (SHARED_PER_PROGRAM + SHARED_RESERVED) // (shared + SHARED_RESERVED))
    ptx = kernel.asm["ptx"]
    counts = {name: len(re.findall(pattern, ptx)) for pattern, name in PTX_COUNTS.items()}
    counts.update(sass_counts(kernel.asm["cubin"]))
    return dict(registers=registers, spilled=spilled, shared_kb=shared / 1024, per_sm=per_sm, warps=warps, **counts)


SASS_COUNTS = {  # opcode (start of the mnemonic) -> column name
    "MUFU.EX2": "ex2",
    "BAR": "bar",
    "SHFL": "shfl",
}


def sass_counts(cubin: bytes) -> dict:
    """Static SASS instruction counts of a cubin (``cuobjdump -sass``): the whole kernel, every branch once, so a
    proxy for the work of its loop body, not a cycle count: exp2 on the special-function units, block barriers
    (a cross-warp reduction through shared memory has one or two), warp shuffles, and all instructions."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True).stdout
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)
    counts = {name: sum(op.startswith(prefix) for op in opcodes) for prefix, name in SASS_COUNTS.items()}
    counts["sass"] = len(opcodes)
    return counts


def dense_cases() -> dict:
    """A ``Case`` per kernel and launch; the partials kernels run every iteration (no spill allowed). Scores (N, K)
    contiguous, and (``KxN``) the transposed view of a (K, N) tensor, whose launch ``dense_launch`` picks apart."""
    cases = {}
    for dtype, layout, k in itertools.product(("fp32", "bf16"), ("", " KxN"), (1000, 3000, 6000, 65536)):
        n = 2**20 if k <= 3000 else 2**16
        s = _meta(dtype, 1, k, n).transpose(1, 2) if layout else _meta(dtype, 1, n, k)  # (1, N, K)
        # The host helpers the launchers use, on these shapes and strides: the iteration's launch (one-row tiles
        # where they apply), the log-domain one (``column_mass=False``) and the read-outs'.
        launch = _on_h100(kd.default_launch(s))
        stride_h, stride_n, stride_k = s.stride()
        base = dict(S=Pointer(dtype), N=n, K=k, stride_h=stride_h, stride_n=stride_n, stride_k=stride_k)
        variants = {"warm mass": (True, True, launch), "cold": (False, False, launch),
                    "warm lse": (True, False, _on_h100(dataclasses.replace(kd.default_launch(s, readout=True),
                                                                           column_mass=False)))}  # fmt: skip
        for variant, (warm, column_mass, cfg) in variants.items():
            # Transposed at K in (2048, 4096]: 4 rows of 4096 at 16 warps sit at the 128-register cap and spill up to
            # 32 B under Triton 3.9 (none under 3.6 at K = 3000, 8 B at 4096); the alternatives read S twice or spill
            # more (see TRANSPOSED_ONE_CHUNK in kernels/utils.py). A few bytes, allowed; anything more fails the check.
            max_spill = 32 if layout and cfg.one_chunk and cfg.block_k == 4096 else 0
            args = dict(base, B=Pointer("fp32"), LOGC=Pointer("fp32"), A_WS=Pointer("fp32"), PMAX=Pointer("fp32"),
                        PSUM=Pointer("fp32"), P=cfg.n_programs, scale2=1.5)  # fmt: skip
            constants = dict(_tiles(s, cfg), HAS_B=warm, COLUMN_MASS=column_mass, ONE_CHUNK=cfg.one_chunk)
            cases[f"dense_partials {dtype}{layout} K={k} {variant} {cfg.block_n}x{cfg.block_k}"] = Case(
                kd._cluster_partials_kernel, args, constants, _fused(cfg), max_spill=max_spill
            )
        if not layout and dtype == "fp32":  # the merge reads fp32 partials; only its fallback reads S
            args = dict(base, PSUM=Pointer("fp32"), B=Pointer("fp32"), OUT=Pointer("fp32"), A_WS=Pointer("fp32"),
                        P=launch.n_programs, scale2=1.5, mass_floor=1e-24)  # fmt: skip
            constants = dict(BLOCK_P=km.MERGE_BLOCK_P, BLOCK=km.MERGE_BLOCK_K, EXACT_ROWS=km.EXACT_FALLBACK_ROWS)
            cases[f"dense_merge_masses K={k}"] = Case(kd._merge_masses_kernel, args, constants, km.merge_options())
            # the log-domain merge: cold passes, and the features kernel's log-domain partials
            args = dict(PMAX=Pointer("fp32"), PSUM=Pointer("fp32"), OUT=Pointer("fp32"), P=launch.n_programs, K=k,
                        row_stride=k)  # fmt: skip
            constants = dict(BLOCK_P=km.MERGE_BLOCK_P, BLOCK=km.MERGE_BLOCK_K)
            cases[f"merge_partials K={k}"] = Case(km._merge_partials_kernel, args, constants, km.merge_options())
        readout = kd.default_launch(s, readout=True)
        tiles, exact = _tiles(s, readout), dict(_fused(readout), enable_fp_fusion=False)
        args = dict(base, B=Pointer("fp32"), LABELS=Pointer("i64"), CODES=Pointer("fp32"), inv_eps=20.0)
        cases[f"dense_assign {dtype}{layout} K={k} codes"] = Case(
            kd._assign_kernel, args, dict(tiles, WANT_CODES=True), exact
        )
        if not layout:  # the transposed read-outs load S like the assign kernel: that one case covers them
            args = dict(base, B=Pointer("fp32"), OUT=Pointer("fp32"), inv_eps=20.0)
            cases[f"dense_transport {dtype} K={k}"] = Case(kd._row_transport_kernel, args, tiles, exact)
    return cases


def _on_h100(launch):
    """The launch with the grid it would get on an H100 (the helpers above ran on a meta tensor: two stand-in SMs)."""
    per_sm = programs_per_sm(launch.block_n, launch.block_k, launch.num_warps, launch.one_chunk)
    return dataclasses.replace(launch, n_programs=PROGRAMS_ON_H100 * per_sm)


def _tiles(s, launch) -> dict:
    return dict(BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, VEC=kd.vector_width(s, launch))


def _fused(launch) -> dict:
    return dict(num_warps=launch.num_warps, enable_fp_fusion=True)


# D values beyond the powers of two, and the precisions that run them: multiples of 8 (not 16), whose rows are
# 16-byte aligned only through the kernels' VEC_D hint (fp32 at D = 136 and 200 spilled 208-672 B without it), and
# D = 201, whose fp32 rows cannot be aligned: streamed in chunks of 32 instead of a spilling 256-wide tile.
ODD_D = {
    136: [("fp32", "fp32", "tf32")],
    200: [("bf16", "bf16", "tf32"), ("fp32", "fp32", "tf32"), ("fp32", "fp16", "tf32")],
    201: [("fp32", "fp32", "tf32")],
}


def _meta(dtype: str, *shape: int) -> torch.Tensor:
    """A contiguous tensor without storage (data_ptr 0: aligned, like the caching allocator's) for the host helpers."""
    return torch.empty(shape, dtype={"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype],
                       device="meta")  # fmt: skip


def features_cases() -> dict:
    cases = {}
    combos = [  # (features dtype, prototypes dtype, input precision)
        ("bf16", "bf16", "tf32"), ("fp16", "fp16", "tf32"), ("fp32", "fp32", "tf32"),
        ("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32x3"), ("fp32", "fp16", "tf32"),
    ]  # fmt: skip
    n, k = 2**20, 3000
    shapes = [
        (d, combo)
        for combo in combos
        for d in (128, 256, 512)
        if not ((d == 256 and combo[2] in ("ieee", "tf32x3")) or (d == 512 and combo[0] != "bf16"))
    ]
    shapes += [(d, combo) for d, combos_d in ODD_D.items() for combo in combos_d]  # fmt: skip
    for d, (z_dtype, c_dtype, precision) in shapes:
        item = 4 if c_dtype == "fp32" else 2
        mixed = z_dtype != c_dtype
        z, c = _meta(z_dtype, n, d), _meta(c_dtype, 1, k, d)  # the launchers' host helpers, on these shapes
        aligned = kf.d_vector_width(z, c) * z.element_size() >= 16
        launch = kf.features_launch(
            n, k, d, 1, item, "cpu", n_programs=PROGRAMS_ON_H100 * 2, z_fp32_to_fp16=mixed, precision=precision,
            z_rows_aligned=aligned, max_shared=SHARED_PER_PROGRAM,
        )  # fmt: skip
        base = dict(Z=Pointer(z_dtype), C=Pointer(c_dtype), N=n, K=k, D=d, stride_zn=d, stride_zd=1,
                    stride_ch=k * d, stride_ck=d, stride_cd=1)  # fmt: skip
        common = dict(ONE_D=launch.one_d(d), PRECISION=precision, UPCAST=False, Z_F16=mixed, BLOCK_N=launch.block_n,
                      BLOCK_K=launch.block_k, BLOCK_D=launch.block_d, VEC_D=kf._vec_d(z, c))  # fmt: skip
        options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages, enable_fp_fusion=True)
        bound = kf.shared_memory_bound(launch, d, item, z_fp32_to_fp16=mixed)
        name = f"{z_dtype}{'>' + c_dtype if mixed else ''} {precision} D={d}"
        for variant, warm, mass in (("warm", True, True), ("warm-lse", True, False), ("cold", False, False)):
            args = dict(base, BIAS2=Pointer("fp32"), V2=Pointer("fp32"), LOGC=Pointer("fp32"), A_WS=Pointer("fp32"),
                        PMAX=Pointer("fp32"), PSUM=Pointer("fp32"), P=launch.n_programs, scale2=1.5,
                        z_scale=1.0)  # fmt: skip
            constants = dict(common, HAS_B=warm, COLUMN_MASS=mass, HAS_BIAS=True)
            cases[f"features_partials {name} {variant}"] = Case(  # the cold start runs once
                kf._features_partials_kernel, args, constants, options, 0 if warm else None, bound
            )
        if d in (128, 201):  # the merge reads fp32 partials; only its fallback reads Z and C (D streamed)
            args = dict(base, PSUM=Pointer("fp32"), B=Pointer("fp32"), BIAS2=Pointer("fp32"), OUT=Pointer("fp32"),
                        A_WS=Pointer("fp32"), P=launch.n_programs, K_PAD=launch.padded_k(k), scale2=1.5, z_scale=1.0,
                        mass_floor=1e-24)  # fmt: skip
            constants = dict(HAS_BIAS=True, PRECISION=precision, UPCAST=False, Z_F16=mixed, BLOCK_P=km.MERGE_BLOCK_P,
                             BLOCK=km.MERGE_BLOCK_K, EXACT_ROWS=km.EXACT_FALLBACK_ROWS,
                             BLOCK_D=min(launch.block_d, kf.EXACT_STREAM_D), VEC_D=kf._vec_d(z, c))  # fmt: skip
            cases[f"features_merge_masses {name}"] = Case(kf._features_merge_masses_kernel, args, constants,
                                                          km.merge_options())  # fmt: skip
        args = dict(base, BIAS=Pointer("fp32"), B=Pointer("fp32"), LABELS=Pointer("i64"), CODES=Pointer("fp32"),
                    ROWSCORE=Pointer("fp32"), inv_eps=20.0, z_scale=1.0, dot_scale=1.0)  # fmt: skip
        constants = dict(common, HAS_BIAS=True, WANT_CODES=True, WANT_SCORE=False)
        readout = Case(kf._features_readout_kernel, args, constants, options, max_shared=bound)
        cases[f"features_readout {name} codes"] = readout
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 on a compile failure, atomics, too much shared memory (for the "
        "device, or than the launch heuristic counts on) or a spilling hot kernel"
    )  # fmt: skip
    parser.add_argument("--only", default="", help="only the cases whose name contains this text")
    parser.add_argument("--arch", type=int, default=90, choices=sorted(SHARED_PER_PROGRAM_BY_ARCH),
                        help="compute capability to compile for (default 90, an H100)")  # fmt: skip
    opts = parser.parse_args(argv)
    global TARGET, SHARED_PER_PROGRAM  # the launches and the checks follow the chosen device
    TARGET, SHARED_PER_PROGRAM = GPUTarget("cuda", opts.arch, 32), SHARED_PER_PROGRAM_BY_ARCH[opts.arch]
    cases = {name: case for name, case in {**dense_cases(), **features_cases()}.items() if opts.only in name}
    print(f"Triton {triton.__version__}, target sm_{opts.arch} (shared memory per program at most "
          f"{SHARED_PER_PROGRAM / 1024:.0f} KB); {len(cases)} kernels\n")  # fmt: skip
    print("| kernel | registers | spilled (B) | shared (KB) | programs/SM | warps | wgmma | mma.sync | cp.async | "
          "ld.v4 | SASS: MUFU.EX2 | BAR | SHFL | all |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    problems = []
    for name, case in cases.items():
        try:
            r = compile_case(case.fn, case.args, case.constants, case.options)
        except Exception as err:  # noqa: BLE001 — a compile failure is the finding; report it and go on
            problems.append(f"{name}: does not compile: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            print(f"| {name} | COMPILE FAILED | | | | | | | | | | | | |", flush=True)
            continue
        print(f"| {name} | {r['registers']} | {r['spilled']} | {r['shared_kb']:.1f} | {r['per_sm']} | {r['warps']} | "
              f"{r['wgmma']} | {r['mma.sync']} | {r['cp.async']} | {r['ld.v4']} | {r['ex2']} | {r['bar']} | "
              f"{r['shfl']} | {r['sass']} |", flush=True)  # fmt: skip
        if r["atomics"]:
            problems.append(f"{name}: uses atomics (the design promises fixed-order reductions)")
        if r["shared_kb"] * 1024 > SHARED_PER_PROGRAM:
            problems.append(f"{name}: needs {r['shared_kb']:.0f} KB of shared memory, more than sm_{opts.arch} allows")
        if case.max_spill is not None and r["spilled"] > case.max_spill and opts.arch == 90:
            problems.append(f"{name}: runs every iteration and spills {r['spilled']} bytes of registers")
        if case.max_shared is not None and r["shared_kb"] * 1024 > case.max_shared:
            bound = case.max_shared / 1024
            problems.append(f"{name}: needs {r['shared_kb']:.1f} KB of shared memory, more than the {bound:.1f} KB "
                            "features_launch counts on (shared_memory_bound)")  # fmt: skip
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if opts.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
