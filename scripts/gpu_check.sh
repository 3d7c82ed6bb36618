#!/usr/bin/env bash
# One call on a GPU machine: build against its torch, run the tests, run benchmarks.
# Everything it writes goes under $OUT (default ./gpu-out). Stages and their arguments:
#
#   STAGES="info build test sanitize profile ncu bench"
#                        (default: "info build test bench"; they run in this order)
#   TEST_ARGS="..."      pytest arguments (default: the whole suite, -n 12 workers)
#   TEST_TIMEOUT=420     wall seconds for the test stage (then SIGINT: pytest still prints its summary)
#   BENCH_ARGS="..."     arguments of `python -m convmixer_kernels bench` (default --quick;
#                        the CSV is written at the end of the run, so keep it inside BENCH_TIMEOUT)
#   BENCH_TIMEOUT=300    wall seconds for the bench stage
#   SANITIZE_TOOLS="memcheck racecheck"   compute-sanitizer tools run over scripts/cuda_sanitize.py
#   SANITIZE_ARGS="--quick"  arguments of scripts/cuda_sanitize.py; SANITIZE_TIMEOUT=150 per tool
#   PROFILE_ARGS="..."   one `python -m convmixer_kernels profile` run per ';'-separated argument list
#   NCU_ARGS="..."       arguments of ncu (kernel filter, sections) in front of NCU_CMD, the program
#                        it profiles; NCU_TIMEOUT=200
#   TORCH_CUDA_ARCH_LIST (default 9.0: the machine's own architecture only)
#
# The machine has no network: the build uses --no-build-isolation --no-deps --no-index.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
PY=${PYTHON:-python3}
STAGES=${STAGES:-info build test bench}
[[ -z "${TEST_ARGS:-}" && " $STAGES " == *" test "* ]] && TEST_ARGS="-n 12 --timeout 300"
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
  eval "targs=(${TEST_ARGS})"  # shell words: -k 'a or b' stays one argument
  timeout -s INT -k 30 "${TEST_TIMEOUT:-420}" "$PY" -m pytest "${targs[@]}" -q -rfE \
      --junitxml="$OUT/junit.xml" -p no:cacheprovider >"$OUT/test.log" 2>&1
  echo "pytest exit $?"
  grep -E "^(FAILED|ERROR)" "$OUT/test.log" | head -60
  tail -3 "$OUT/test.log"
  echo "== tested ($(elapsed))"
fi

if stage sanitize; then
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    echo "== compute-sanitizer $tool ($(elapsed))"
    timeout "${SANITIZE_TIMEOUT:-150}" compute-sanitizer --tool "$tool" --error-exitcode 99 \
        "$PY" scripts/cuda_sanitize.py ${SANITIZE_ARGS:---quick} >"$OUT/sanitize-$tool.txt" 2>&1
    echo "compute-sanitizer $tool exit $?"
    tail -4 "$OUT/sanitize-$tool.txt"
  done
fi

if stage profile; then
  IFS=';' read -ra plist <<<"${PROFILE_ARGS:---target convmixer_cifar_256_8 --mode forward_backward}"
  for p in "${plist[@]}"; do
    echo "== profile $p ($(elapsed))"
    eval "pargs=($p)"
    timeout 200 "$PY" -m convmixer_kernels profile "${pargs[@]}" 2>&1 | tee -a "$OUT/profile.txt" | tail -45
  done
fi

if stage ncu; then
  echo "== ncu ($(elapsed))"
  eval "nargs=(${NCU_ARGS:---kernel-name regex:conv_kernel --launch-skip 2 --launch-count 3 --section SpeedOfLight --section Occupancy --section LaunchStats --section MemoryWorkloadAnalysis})"
  eval "ncmd=(${NCU_CMD:-$PY -m convmixer_kernels profile --target dw_block --backend cuda --mode inference --steps 1})"
  timeout "${NCU_TIMEOUT:-200}" ncu "${nargs[@]}" "${ncmd[@]}" >"$OUT/ncu.txt" 2>&1
  echo "ncu exit $?"
  grep -E "conv_kernel|Duration|Compute \(SM\) Throughput|Memory Throughput|DRAM Throughput|Achieved Occupancy|Registers Per|Theoretical Occupancy|Block Limit" "$OUT/ncu.txt" | head -60
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
