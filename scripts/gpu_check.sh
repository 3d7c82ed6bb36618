#!/usr/bin/env bash
# One call on a GPU machine: build against its torch, run the tests, run benchmarks.
# Everything it writes goes under $OUT (default ./gpu-out). Stages and their arguments:
#
#   STAGES="info build test bench"   (default: all four; they run in this order)
#   TEST_ARGS="..."      pytest arguments (default: the whole suite, -n 12 workers)
#   TEST_TIMEOUT=420     wall seconds for the test stage (then SIGINT: pytest still prints its summary)
#   BENCH_ARGS="..."     arguments of `python -m convmixer_kernels bench` (default --quick;
#                        the CSV is written at the end of the run, so keep it inside BENCH_TIMEOUT)
#   BENCH_TIMEOUT=300    wall seconds for the bench stage
#   TORCH_CUDA_ARCH_LIST (default 9.0: the machine's own architecture only)
#
# The machine has no network: the build uses --no-build-isolation --no-deps --no-index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-info build test bench}
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}

stage() { [[ " $STAGES " == *" $1 "* ]]; }
t0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - t0 )) s"; }

if stage info; then
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version()); print("triton", triton.__version__); p = torch.cuda.get_device_properties(0); print(p)'
    nvcc --version | tail -2
    "$PY" -m pip list 2>/dev/null | grep -iE '^(timm|hypothesis|pytest|pytest-xdist|pytest-benchmark|pytest-timeout|numpy|scikit-learn|matplotlib) '
  } 2>&1 | tee "$OUT/info.txt"
fi

if stage build; then
  echo "== build ($(elapsed))"
  if ! "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . >"$OUT/build.log" 2>&1; then
    tail -40 "$OUT/build.log"; echo "BUILD FAILED"; exit 1
  fi
  "$PY" -c 'import convmixer_kernels as ck; print("backends cuda:", ck.available_backends("cuda"))' 2>&1 | tee -a "$OUT/build.log"
  echo "== built ($(elapsed))"
fi

if stage test; then
  echo "== test ($(elapsed))"
  eval "targs=(${TEST_ARGS:--n 12 --timeout 300})"  # shell words: -k 'a or b' stays one argument
  timeout -s INT -k 30 "${TEST_TIMEOUT:-420}" "$PY" -m pytest "${targs[@]}" -q -rfE \
      --junitxml="$OUT/junit.xml" -p no:cacheprovider >"$OUT/test.log" 2>&1
  echo "pytest exit $?"
  grep -E "^(FAILED|ERROR)" "$OUT/test.log" | head -60
  tail -3 "$OUT/test.log"
  echo "== tested ($(elapsed))"
fi

if stage bench; then
  echo "== bench ($(elapsed))"
  eval "bargs=(${BENCH_ARGS:---quick})"
  timeout "${BENCH_TIMEOUT:-300}" "$PY" -m convmixer_kernels bench "${bargs[@]}" \
      --csv "$OUT/bench.csv" >"$OUT/bench.log" 2>&1
  echo "bench exit $?"
  tail -60 "$OUT/bench.log"
  echo "== benched ($(elapsed))"
fi
