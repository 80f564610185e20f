"""Compile every Triton kernel for an H100 (sm_90) on a machine without a GPU, and report what the GPU would run.

The Triton interpreter (how CI runs the kernels) checks their arithmetic but not whether they compile for a real
GPU, nor how they use it. This script specialises each kernel the way Triton's JIT would for the default launches
(``dense_launch``, ``features_launch``) at benchmark sizes, compiles it to a cubin with the ``ptxas`` that ships in
the Triton wheel, and prints per kernel: registers, spilled bytes, shared memory, programs per SM (the tighter of
the register and shared-memory limits), and counts of tensor-core (wgmma), async-copy and 16-byte load
instructions in the PTX. Nothing is timed: these are the compiler's numbers, not the GPU's.

    python benchmarks/sm90_compile.py            # every case, a table
    python benchmarks/sm90_compile.py --check    # exit 1 if a kernel fails to compile or an iteration kernel spills
    python benchmarks/sm90_compile.py --only dense_partials

``tests/test_benchmarks.py`` runs ``--check`` on a few cases, so a kernel change that would not compile for the GPU
fails CI even though the interpreter accepts it.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)  # compiled kernels, not interpreted ones: before triton is imported

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import importlib.util  # noqa: E402

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
from otlabel.kernels import sinkhorn_dense as kd  # noqa: E402
from otlabel.kernels import sinkhorn_features as kf  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)  # H100: sm_90, warp size 32
REGISTERS_PER_SM, SHARED_PER_SM, PROGRAMS_ON_H100 = 65536, 233472, 132
SHARED_PER_PROGRAM = 232448  # the most shared memory one program may use on sm_90 (227 KB): more fails at launch
CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
PTX_COUNTS = {  # instruction -> column name
    r"wgmma\.mma_async": "wgmma",
    r"mma\.sync": "mma.sync",
    r"cp\.async\.cg": "cp.async",
    r"ld\.global(\.[a-z]+)*\.v4": "ld.v4",
    r"atom\.": "atomics",
}


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
        per_sm = min(per_sm, SHARED_PER_SM // shared)
    ptx = kernel.asm["ptx"]
    counts = {name: len(re.findall(pattern, ptx)) for pattern, name in PTX_COUNTS.items()}
    return dict(registers=registers, spilled=spilled, shared_kb=shared / 1024, per_sm=per_sm, warps=warps, **counts)


def dense_cases() -> dict:
    """(kernel, args, constexprs, options, hot) per case; ``hot``: runs every iteration (must not spill)."""
    cases = {}
    for dtype, item in (("fp32", 4), ("bf16", 2)):
        for k in (1000, 3000, 65536):
            n = 2**20 if k <= 3000 else 2**16
            launch = kd.dense_launch(n, k, 1, "cpu", n_programs=PROGRAMS_ON_H100 * 4)
            vec = 16 // item if k % (16 // item) == 0 else 1  # contiguous (N, K): what vector_width gives
            base = dict(S=Pointer(dtype), N=n, K=k, stride_h=n * k, stride_n=k, stride_k=1)
            tiles = dict(BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, VEC=vec)
            fused = dict(num_warps=launch.num_warps, enable_fp_fusion=True)
            exact = dict(fused, enable_fp_fusion=False)
            for warm in (True, False):
                args = dict(base, B=Pointer("fp32"), LOGC=Pointer("fp32"), A_WS=Pointer("fp32"), PMAX=Pointer("fp32"),
                            PSUM=Pointer("fp32"), P=launch.n_programs, scale2=1.5)  # fmt: skip
                constants = dict(tiles, HAS_B=warm, ONE_CHUNK=launch.one_chunk)
                cases[f"dense_partials {dtype} K={k} {'warm' if warm else 'cold'}"] = (
                    kd._cluster_partials_kernel, args, constants, fused, True)
            args = dict(base, B=Pointer("fp32"), LABELS=Pointer("i64"), CODES=Pointer("fp32"), inv_eps=20.0)
            cases[f"dense_assign {dtype} K={k} codes"] = (
                kd._assign_kernel, args, dict(tiles, WANT_CODES=True), exact, False)
            args = dict(base, B=Pointer("fp32"), OUT=Pointer("fp32"), inv_eps=20.0)
            cases[f"dense_transport {dtype} K={k}"] = (kd._row_transport_kernel, args, tiles, exact, False)
    return cases


def features_cases() -> dict:
    cases = {}
    combos = [  # (features dtype, prototypes dtype, input precision)
        ("bf16", "bf16", "tf32"), ("fp16", "fp16", "tf32"), ("fp32", "fp32", "tf32"),
        ("fp32", "fp32", "ieee"), ("fp32", "fp32", "tf32x3"), ("fp32", "fp16", "tf32"),
    ]  # fmt: skip
    n, k = 2**20, 3000
    for z_dtype, c_dtype, precision in combos:
        for d in (128, 256, 512):
            if (d == 256 and precision in ("ieee", "tf32x3")) or (d == 512 and z_dtype != "bf16"):
                continue
            item = 4 if c_dtype == "fp32" else 2
            mixed = z_dtype != c_dtype
            launch = kf.features_launch(n, k, d, 1, item, "cpu", n_programs=PROGRAMS_ON_H100 * 2,
                                        z_fp32_to_fp16=mixed, precision=precision)  # fmt: skip
            base = dict(Z=Pointer(z_dtype), C=Pointer(c_dtype), N=n, K=k, D=d, stride_zn=d, stride_zd=1,
                        stride_ch=k * d, stride_ck=d, stride_cd=1)  # fmt: skip
            common = dict(ONE_D=launch.one_d(d), PRECISION=precision, UPCAST=False, Z_F16=mixed,
                          BLOCK_N=launch.block_n, BLOCK_K=launch.block_k, BLOCK_D=launch.block_d)  # fmt: skip
            options = dict(num_warps=launch.num_warps, num_stages=launch.num_stages, enable_fp_fusion=True)
            name = f"{z_dtype}{'>' + c_dtype if mixed else ''} {precision} D={d}"
            for warm in (True, False):
                args = dict(base, BIAS2=Pointer("fp32"), B=Pointer("fp32"), LOGC=Pointer("fp32"), PMAX=Pointer("fp32"),
                            PSUM=Pointer("fp32"), P=launch.n_programs, scale2=1.5, z_scale=1.0)  # fmt: skip
                constants = dict(common, HAS_B=warm, HAS_BIAS=True)
                cases[f"features_partials {name} {'warm' if warm else 'cold'}"] = (
                    kf._features_partials_kernel, args, constants, options, warm)  # the cold start runs once
            args = dict(base, BIAS=Pointer("fp32"), B=Pointer("fp32"), LABELS=Pointer("i64"), CODES=Pointer("fp32"),
                        ROWSCORE=Pointer("fp32"), inv_eps=20.0, z_scale=1.0, dot_scale=1.0)  # fmt: skip
            constants = dict(common, HAS_BIAS=True, WANT_CODES=True, WANT_SCORE=False)
            cases[f"features_readout {name} codes"] = (kf._features_readout_kernel, args, constants, options, False)
    return cases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--check", action="store_true", help="exit 1 on a compile failure, atomics, too much shared memory or a "
        "spilling hot kernel"
    )  # fmt: skip
    parser.add_argument("--only", default="", help="only the cases whose name contains this text")
    opts = parser.parse_args(argv)
    cases = {name: case for name, case in {**dense_cases(), **features_cases()}.items() if opts.only in name}
    print(f"Triton {triton.__version__}, target sm_90; {len(cases)} kernels\n")
    print("| kernel | registers | spilled (B) | shared (KB) | programs/SM | warps | wgmma | cp.async | ld.v4 |")
    print("|---|---|---|---|---|---|---|---|---|")
    problems = []
    for name, (fn, args, constants, options, hot) in cases.items():
        try:
            r = compile_case(fn, args, constants, options)
        except Exception as err:  # noqa: BLE001 — a compile failure is the finding; report it and go on
            problems.append(f"{name}: does not compile: {type(err).__name__}: {str(err).splitlines()[0][:300]}")
            print(f"| {name} | COMPILE FAILED | | | | | | | |", flush=True)
            continue
        print(f"| {name} | {r['registers']} | {r['spilled']} | {r['shared_kb']:.1f} | {r['per_sm']} | {r['warps']} | "
              f"{r['wgmma']} | {r['cp.async']} | {r['ld.v4']} |", flush=True)  # fmt: skip
        if r["atomics"]:
            problems.append(f"{name}: uses atomics (the design promises fixed-order reductions)")
        if r["shared_kb"] * 1024 > SHARED_PER_PROGRAM:
            problems.append(f"{name}: needs {r['shared_kb']:.0f} KB of shared memory, more than sm_90 allows")
        if hot and r["spilled"]:
            problems.append(f"{name}: runs every iteration and spills {r['spilled']} bytes of registers")
    for problem in problems:
        print("PROBLEM:", problem)
    return 1 if opts.check and problems else 0


if __name__ == "__main__":
    sys.exit(main())
