#!/usr/bin/env bash
# GPU measurements on a lent GPU: set-up, then one or more stages, all inside one call (at most 600 s, a bare
# machine each time). Every log and CSV goes under $OUT, the only folder that comes back.
#
#   bash benchmarks/device_run.sh tests      # the GPU-only tests (pytest -m gpu)
#   bash benchmarks/device_run.sh suite      # the test suite on the GPU machine (kernel tests run compiled)
#   bash benchmarks/device_run.sh kernels    # the kernel and Triton-backend tests only, compiled
#   bash benchmarks/device_run.sh dense      # gpu_dense.py: per iteration, copy bandwidth, SwAV batch
#   bash benchmarks/device_run.sh features   # gpu_features.py: vs dense and flash-sinkhorn, the memory target
#   bash benchmarks/device_run.sh tolerance  # gpu_tolerance.py: Anderson vs plain steps, time to 1e-3
#   bash benchmarks/device_run.sh stream     # stream_features.py --gpu-only: vs pinned H2D bandwidth
#   bash benchmarks/device_run.sh profile    # gpu_profile.py + op_count.py: where a SwAV-batch call's time goes
#   bash benchmarks/device_run.sh sweep-dense      # tile sweep of the dense kernels (tuning data)
#   bash benchmarks/device_run.sh sweep-features   # tile sweep of the features kernels (tuning data)
#   DEADLINE_S=580 bash benchmarks/device_run.sh suite dense   # several stages share one call
#
# Several stages share DEADLINE_S seconds (default 580) counted from the script's start: each runs under
# `timeout` set to what is left, and the benchmark scripts are told (OTLABEL_GPU_BUDGET_S) to start nothing new
# past a little less, so a slow stage still returns its log and the rows written so far, and the call ends in time.
# Carry .whl/ (POT and flash-sinkhorn wheels, see benchmarks/RESULTS.md): the device image has neither and no
# network.
set -euo pipefail
[ $# -gt 0 ] || {
    echo "usage: bash benchmarks/device_run.sh STAGE... (tests suite kernels dense features tolerance stream profile sweep-dense sweep-features)" >&2
    exit 2
}
DEADLINE_S=${DEADLINE_S:-580}
# POT imports JAX when it finds it (the device image has it), and JAX then takes 75% of the GPU's memory.
export POT_BACKEND_DISABLE_JAX=1 POT_BACKEND_DISABLE_TENSORFLOW=1 POT_BACKEND_DISABLE_CUPY=1
START=$SECONDS
OUT=${OUT:-/tmp/otlabel-device-out}
mkdir -p "$OUT"

if compgen -G ".whl/*.whl" >/dev/null; then
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl >>"$OUT/setup.log" 2>&1
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -m pip install -q --no-deps --no-build-isolation -e . >>"$OUT/setup.log" 2>&1 || true
if ! python3 -c "import otlabel.kernels.sinkhorn_dense" 2>/dev/null; then
    # The editable install did not take (read-only site-packages, no setuptools...): run from the checkout, with
    # the top-level kernels/ visible as otlabel.kernels, as the installed package maps it.
    ln -sfn ../kernels otlabel/kernels
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
fi
python3 -c "import otlabel.kernels.sinkhorn_dense, torch, triton
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device'
print('torch', torch.__version__, 'triton', triton.__version__, gpu)" | tee "$OUT/versions.txt"

run() {  # run NAME COMMAND...: under the time left, output to the screen and to $OUT/NAME.log
    local name=$1 left=$((DEADLINE_S - (SECONDS - START)))
    shift
    if [ "$left" -lt 30 ]; then
        echo "skip stage $name: ${left} s left of DEADLINE_S=$DEADLINE_S" | tee "$OUT/$name.log"
        return 0
    fi
    echo "== stage $name (${left} s left)"
    # The scripts stop starting new work 60 s (a compile and a measurement) before the hard limit.
    OTLABEL_GPU_BUDGET_S=$((left > 120 ? left - 60 : left / 2)) timeout "$left" "$@" 2>&1 | tee "$OUT/$name.log" ||
        echo "stage $name ended with status ${PIPESTATUS[0]}" | tee -a "$OUT/$name.log"
}

# xdist spreads the compiling over the machine's cores (pytest-xdist is in the device image; plain runs elsewhere).
parallel=()
if python3 -c "import xdist" 2>/dev/null; then parallel=(-n 12); fi

for stage in "$@"; do
    case $stage in
        tests) run tests python3 -m pytest -q -m gpu -p no:cacheprovider "${parallel[@]}" -rfE tests/ ;;
        # The benchmark scripts' own tests run on the CPU in CI (dry runs under the interpreter): skipped here.
        suite) run suite python3 -m pytest -q -p no:cacheprovider "${parallel[@]}" -rfE --durations=15 --timeout=180 \
            --ignore=tests/test_benchmarks.py tests/ ;;
        kernels) run kernels python3 -m pytest -q -p no:cacheprovider "${parallel[@]}" -rfE \
            tests/test_kernels_dense.py tests/test_kernels_features.py tests/test_triton_backend.py tests/test_host_syncs.py ;;
        dense) run dense python3 benchmarks/gpu_dense.py --csv "$OUT/gpu_dense.csv" ;;
        features) run features python3 benchmarks/gpu_features.py --no-sweep --csv "$OUT/gpu_features.csv" ;;
        tolerance) run tolerance python3 benchmarks/gpu_tolerance.py --csv "$OUT/gpu_tolerance.csv" ;;
        stream) run stream python3 benchmarks/stream_features.py --gpu-only --csv "$OUT/stream_features.csv" ;;
        profile) run profile bash -c "python3 benchmarks/gpu_profile.py && python3 benchmarks/gpu_profile.py --cuda-graph \
            && python3 benchmarks/op_count.py --n 4096 --k 3000" ;;
        sweep-dense) run sweep-dense python3 benchmarks/gpu_dense.py --sweep-only --csv "$OUT/gpu_dense_sweep.csv" ;;
        sweep-features) run sweep-features python3 benchmarks/gpu_features.py --quick --csv "$OUT/gpu_features_sweep.csv" ;;
        *)
            echo "unknown stage '$stage'" >&2
            exit 2
            ;;
    esac
done
echo "device_run: $* done in $((SECONDS - START)) s"
