#!/usr/bin/env bash
# One GPU session (15 device-minutes, starts included) turned into measurement: the
# extension, wheels and test list are prepared here on the CPU (scripts/gpu_prep.sh ->
# gpu-carry/), and on the GPU machine this script only copies them into place and measures,
# in stages that each end inside their own wall-clock limit and write under $OUT as they go
# (a killed call still returns what was measured).
#
#   scripts/gpu_prep.sh                       # here, once: builds gpu-carry/ (see its header)
#   DRY_RUN=1 scripts/gpu_check.sh            # here: the whole script on the CPU, tiny shapes
#   scripts/gpu_check.sh --dry-run call1      # (same, one preset)
#   scripts/gpu_check.sh call1 | call2 | all  # on the GPU machine (presets below)
#   scripts/gpu_check.sh info test            # or stages by name, in the order given below
#
# THE RUN-TOOL CALLS (two calls, about 11 minutes of commands; the machine's start is counted
# in the 15 minutes, so keep the sum of both budgets under about 12 minutes):
#   call 1 = info + test + tune            (budget 290 s)
#     run(command="bash scripts/gpu_check.sh call1", carry=["gpu-carry"], timeout_s=360)
#   then, here: cp <files_at>/caches.tgz gpu-carry/   (Triton + Inductor caches of call 1;
#     the next machine is usually a fresh one: the 30 s warm window is easily missed)
#   call 2 = bench + models + paper        (budget 370 s)
#     run(command="bash scripts/gpu_check.sh call2", carry=["gpu-carry"], timeout_s=420)
#   one call instead (saves a start, measures less): command="bash scripts/gpu_check.sh all",
#     timeout_s=600 (budget 570 s; later stages get what is left).
#   Knobs go in front, e.g. command="TEST_TIMEOUT=120 MODELS_TIMEOUT=240 bash scripts/gpu_check.sh call2".
#   Give the machine back (give_back) after the last call.
#
# What comes back ($OUT: at most 8 files, 16 MiB each, no folders; checked at the end):
#   gpu-check.log   everything: info, each stage's command and output, the closing summary
#   stages.csv      stage,piece,status,rc,seconds,limit_s,note (one line per step)
#   pytest.log      every test piece's pytest output
#   tuning-<family>.json   the dispatch table (`tune --out`), family as tuning.family() says
#   ops.csv         the op benchmark at docs/design.md's shapes (`bench --full --suites ops`)
#   models.csv      the four ConvMixers, inference + training step, bf16, batch 64
#   paper.csv       `bench --paper`: the ConvMixers beside the timm models, same run
#   caches.tgz      Triton + Inductor caches (CACHES_OUT=0: none), to carry into the next call
#                   (left out when 8 files are already there)
#   validated-cuda.json   the GPU validation manifest with this run's entry, written only when
#                   every test of tests/test_cuda_dw_block_v2.py ran and passed in the `-m cuda`
#                   piece (convmixer_kernels/backends/validation.py: device, commit, tests
#                   passed, the sha256 of the v2 kernel sources the tested build was compiled
#                   from). To validate v2, commit it as convmixer_kernels/validated/cuda.json:
#                     cp <files_at>/validated-cuda.json convmixer_kernels/validated/cuda.json
#                     git commit -m "validated: dw_block_v2 on <device>" convmixer_kernels/validated/cuda.json
#                   It validates exactly that source: any later change of a listed file needs a
#                   new GPU run. Until then the cuda backend runs v1 (opt in: CONVMIXER_KERNELS_CUDA_DW_V2=1).
#
# Stages (in this order; each has a wall-clock limit, also capped by what is left of
# GPU_CHECK_BUDGET less 20 s kept for packing up):
#   setup   always: carried wheels -> pip --target (PYTHONPATH); the carried .so copied into
#           convmixer_kernels/ when gpu-carry/BUILD_INFO matches this python's EXT_SUFFIX,
#           torch version and the source hash of csrc/ + setup.py, else built here with
#           `pip install -e .` (about 1-2 min on 16 cores); caches.tgz unpacked
#   info    INFO_TIMEOUT=30     nvidia-smi, versions, `convmixer_kernels info`, triton_key check
#   test    TEST_TIMEOUT=170    pieces, in order: `-m cuda`; gpu-carry/changed-tests.txt (the
#           kernels changed since the last GPU run); the other files in TEST_PIECES=2 pieces;
#           `-m slow` last; then `validate` (the manifest above, from the `-m cuda` piece's JUnit
#           report). Each piece TEST_PIECE_TIMEOUT=110 at most; TEST_WORKERS=8 (xdist),
#           TEST_CASE_TIMEOUT=120 (pytest-timeout), TEST_FILES (restrict to these files)
#   tune    TUNE_TIMEOUT=70     `tune --device cuda --out $OUT/tuning-<family>.json` TUNE_ARGS
#   bench   BENCH_TIMEOUT=100   `bench --full --suites ops --dtypes bfloat16 --min-run-time 0.1
#           --baselines eager_nchw,eager_channels_last,compile` BENCH_ARGS
#   models  MODELS_TIMEOUT=180  one `bench --full --suites models --models M --batch 64 --dtypes bfloat16
#           --modes inference,forward_backward` per model and pass, MODELS_STEP_TIMEOUT=80 each:
#           pass 1 fused + eager NCHW + eager channels_last (all four models), pass 2 +compile,
#           pass 3 +compile_max_autotune (768/32 first), while time is left. MODELS, MODELS_ARGS
#   paper   PAPER_TIMEOUT=70    `bench --paper --dtypes bfloat16 --baselines
#           eager_nchw,eager_channels_last` PAPER_ARGS
# Presets: call1 = info test tune (GPU_CHECK_BUDGET=290), call2 = bench models paper (370),
#   all = everything (570). Default: all. STAGES="..." overrides the preset's stages.
#
# Dry run (DRY_RUN=1 or --dry-run), here on the CPU: everything but the GPU. The setup is
# real (wheels installed into a scratch --target, the carried .so and BUILD_INFO checked,
# and the carried .so loaded under build/gpu-py312's Python 3.12 + torch 2.11.0+cu130 from a
# scratch copy of the package; the local build is used to run), the stages run with
# --device cpu, float32 and tiny shapes (DRY_* knobs), test pieces run for real (restrict
# with TEST_FILES), compile passes are skipped, paper is cut by its limit on purpose (a
# killed stage keeps its rows), and the $OUT limits are checked. OUT defaults to gpu-out/.
# tests/test_gpu_script.py runs it.
#
# Triton cache, what was found (2026-12, triton 3.6.0): triton.compile(ASTSource(...),
# target=GPUTarget("cuda", 90, 32)) runs on this CPU-only machine (ptxas is in the wheel)
# and fills TRITON_CACHE_DIR with the cubin. But a GPU launch finds that entry only if the
# whole key matches: triton_key() hashes libtriton.so, so the build must use the GPU
# machine's Python 3.12 wheel (gpu_prep.sh's venv does; the info stage prints both hashes),
# and the source key holds each kernel's specialization (pointer alignment, integer
# divisibility by 16 and ==1, constexprs, num_warps/num_stages) as launched by the real
# call with real tensors, and autotuned kernels pick configs by timing on the GPU. Replaying
# every launch of the tests and benchmarks without a GPU is not done here, so the warm
# cache that carries is the GPU's own: each call packs .triton_cache and the Inductor cache
# into caches.tgz, and the next call unpacks what gpu-carry/caches.tgz holds.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

# -- arguments ---------------------------------------------------------------------------
DRY=${DRY_RUN:-0}
PRESET=""; NAMED=""
for a in "$@"; do
  case "$a" in
    --dry-run) DRY=1 ;;
    call1|call2|all) PRESET=$a ;;
    info|test|tune|bench|models|paper) NAMED+=" $a" ;;
    -h|--help) sed -n '2,/^set -uo/p' "$0" | sed 's/^# \{0,1\}//;$d'; exit 0 ;;
    *) echo "gpu_check: unknown argument $a (call1, call2, all, a stage name, --dry-run)"; exit 2 ;;
  esac
done
case "$PRESET" in
  call1) P_STAGES="info test tune"; P_BUDGET=290 ;;
  call2) P_STAGES="bench models paper"; P_BUDGET=370 ;;
  *) P_STAGES="info test tune bench models paper"; P_BUDGET=570 ;;
esac
[ -n "$NAMED" ] && P_STAGES=$NAMED
STAGES=${STAGES:-$P_STAGES}
BUDGET=${GPU_CHECK_BUDGET:-$P_BUDGET}
RESERVE=20

OUT=${OUT:-$ROOT/gpu-out}
mkdir -p "$OUT" || exit 1
OUT=$(cd "$OUT" && pwd)
CARRY=${GPU_CARRY:-$ROOT/gpu-carry}
LOG=$OUT/gpu-check.log
SCSV=$OUT/stages.csv
PYLOG=$OUT/pytest.log
SCRATCH=$(mktemp -d "${TMPDIR:-/tmp}/gpu-check.XXXXXX")
trap 'rm -rf "$SCRATCH"' EXIT
export PYTHONUNBUFFERED=1
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0}
export MAX_JOBS=${MAX_JOBS:-16}

if [ "$DRY" = 1 ]; then
  PY=${PYTHON:-$ROOT/.venv/bin/python}; [ -x "$PY" ] || PY=python3
  DEV=cpu; DT=float32
  CACHE_ROOT=$SCRATCH/caches
  # tiny shapes on the CPU
  : "${DRY_OPS_ARGS:=--ops dw_block,pw_block --batch 1 --dim 8 --size 8 --image-size 32 --patch-size 4 --min-run-time 0.001 --no-memory --baselines eager_nchw}"
  : "${DRY_MODELS_ARGS:=--batch 1 --dim 8 --image-size 32 --patch-size 4 --min-run-time 0.001 --no-memory}"
  : "${DRY_PAPER_ARGS:=--batch 1 --dim 8 --min-run-time 0.001 --no-memory --baselines eager_nchw}"
  : "${DRY_TUNE_ARGS:=--repeats 1 --min-time 0.001}"
  : "${PAPER_TIMEOUT:=12}"   # cut on purpose: proves a killed stage keeps its rows
else
  PY=${PYTHON:-python3}
  DEV=cuda; DT=bfloat16
  CACHE_ROOT=${CACHE_ROOT:-$ROOT/build/gpu-caches}
fi
export TRITON_CACHE_DIR=$CACHE_ROOT/triton
export TORCHINDUCTOR_CACHE_DIR=$CACHE_ROOT/inductor
mkdir -p "$TRITON_CACHE_DIR" "$TORCHINDUCTOR_CACHE_DIR"

t0=$(date +%s)
now() { echo $(( $(date +%s) - t0 )); }
left() { echo $(( BUDGET - RESERVE - $(now) )); }
say() { echo "[$(now)s] $*" | tee -a "$LOG"; }
has_stage() { [[ " $STAGES " == *" $1 "* ]]; }
[ -f "$SCSV" ] || echo "stage,piece,status,rc,seconds,limit_s,note" > "$SCSV"
record() { # stage piece status rc seconds limit note
  local note=${7//,/;}; note=${note//$'\n'/ }
  echo "$1,$2,$3,$4,$5,$6,${note:0:200}" >> "$SCSV"
}

# run_step STAGE PIECE LIMIT FILE CMD...: runs CMD with `timeout -s INT` at the smaller of
# LIMIT and what is left, output appended to FILE; records the step; returns its rc.
run_step() {
  local stage=$1 piece=$2 limit=$3 file=$4; shift 4
  local l; l=$(left); [ "$l" -lt "$limit" ] && limit=$l
  if [ "$limit" -lt 5 ]; then
    say "  $stage/$piece: skipped (no time left in GPU_CHECK_BUDGET=$BUDGET)"
    record "$stage" "$piece" no-time "" 0 "$limit" "not run"; return 99
  fi
  { echo; echo "=== $stage/$piece  limit ${limit}s  $(date -u +%H:%M:%S)"; printf '%q ' "$@"; echo; } >> "$file"
  local s; s=$(date +%s)
  timeout -s INT -k 20 "$limit" "$@" >> "$file" 2>&1
  local rc=$? secs=$(( $(date +%s) - s )) status
  case $rc in
    0) status=ok ;; 124|137) status=timeout ;; 5) status=none ;; *) status=failed ;;
  esac
  local note=""; [ -n "$STEP_NOTE_CMD" ] && note=$(eval "$STEP_NOTE_CMD" 2>/dev/null)
  say "  $stage/$piece: $status (rc $rc, ${secs}s of ${limit}s)${note:+ $note}"
  record "$stage" "$piece" "$status" "$rc" "$secs" "$limit" "$note"
  return $rc
}
STEP_NOTE_CMD=""

say "gpu_check: stages '$STAGES', budget ${BUDGET}s, dry run $DRY, OUT $OUT, python $PY"
say "suggested split: call 1 = info+test+tune (call1), call 2 = bench+models+paper (call2); see the header"

# -- setup (always) ------------------------------------------------------------------------
setup() {
  local s; s=$(date +%s)
  if [ "$DRY" != 1 ] && ! "$PY" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
    say "no CUDA device for $PY: use DRY_RUN=1 on a machine without a GPU"; record setup gpu failed 1 0 0 "no CUDA device"; exit 1
  fi
  # wheels
  local site=$SCRATCH/site
  if ls "$CARRY"/wheels/*.whl >/dev/null 2>&1; then
    if "$PY" -m pip install -q --disable-pip-version-check --no-index --no-deps --no-compile --no-cache-dir \
         --upgrade --target "$site" "$CARRY"/wheels/*.whl >> "$LOG" 2>&1; then
      say "setup: wheels installed: $(cd "$CARRY/wheels" && ls *.whl | tr '\n' ' ')"
    else
      say "setup: wheel install FAILED (see the log); going on without them"
    fi
  else
    say "setup: no wheels in $CARRY/wheels"
  fi
  export PYTHONPATH=$ROOT${site:+:$site}${PYTHONPATH:+:$PYTHONPATH}

  # the extension
  local want_tag want_torch hash reason=""
  want_tag=$("$PY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
  want_torch=$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)
  hash=$(find csrc setup.py -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \) \
           | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16)
  binfo() { sed -n "s/^$1=//p" "$CARRY/BUILD_INFO" 2>/dev/null; }
  if [ ! -f "$CARRY/BUILD_INFO" ]; then reason="no $CARRY/BUILD_INFO (run scripts/gpu_prep.sh)"
  elif [ "$(binfo python_tag)" != "$want_tag" ]; then reason="carried $(binfo python_tag), this python wants $want_tag"
  elif [ "$(binfo torch)" != "$want_torch" ]; then reason="carried for torch $(binfo torch), this is $want_torch"
  elif [ "$(binfo source_hash)" != "$hash" ]; then reason="sources changed since gpu_prep.sh ($(binfo source_hash) -> $hash)"
  fi
  local pkg=$ROOT/convmixer_kernels
  if [ "$DRY" = 1 ]; then  # never touch the checkout's own build here
    pkg=$SCRATCH/pkg/convmixer_kernels; mkdir -p "$SCRATCH/pkg"; cp -r "$ROOT/convmixer_kernels" "$SCRATCH/pkg/"
    find "$pkg" -name '*.so' -delete
  fi
  if [ -z "$reason" ]; then
    cp "$CARRY"/so/_C*"$want_tag" "$pkg/" && say "setup: carried extension copied ($(binfo commit), source $hash)"
  fi
  if [ "$DRY" = 1 ]; then
    local vpy=$ROOT/build/gpu-py312/bin/python
    if [ -x "$vpy" ] && [ -f "$CARRY/BUILD_INFO" ] && [ "$(binfo source_hash)" = "$hash" ]; then
      cp "$CARRY"/so/_C*.so "$pkg/"
      if (cd "$SCRATCH/pkg" && PYTHONPATH= "$vpy" -c 'import json, convmixer_kernels._cpp_lib as c
s = c.status() or c.testing_status(); assert s is None, s; assert c.has_cuda_kernels()
print("setup: dry run: the carried .so loads under", __import__("sys").version.split()[0], json.dumps(c.build_info_of()))' \
           2>&1 | grep -v 'No CUDA runtime' | tee -a "$LOG"; exit "${PIPESTATUS[0]}"); then
        record setup carried-so ok 0 0 0 "loads under build/gpu-py312"
      else
        record setup carried-so failed 1 0 0 "the carried .so does not load under build/gpu-py312"
      fi
    else
      say "setup: dry run: carried .so not checked (no build/gpu-py312, no BUILD_INFO, or stale: ${reason:-})"
      record setup carried-so none "" 0 0 "not checked"
    fi
    [ -n "$reason" ] && say "setup: dry run: on the GPU this would build the extension ($reason); here the local build runs"
  elif [ -n "$reason" ] || ! "$PY" -c 'import convmixer_kernels._cpp_lib as c, sys; s = c.status(); print(s or "", end=""); sys.exit(0 if s is None else 1)' >> "$LOG" 2>&1; then
    say "setup: building the extension here (${reason:-the carried one does not load})"
    if ! timeout 400 "$PY" -m pip install --no-build-isolation --no-deps --no-index -e . > "$SCRATCH/build.log" 2>&1; then
      tail -40 "$SCRATCH/build.log" | tee -a "$LOG"; say "BUILD FAILED"; record setup build failed 1 "$(( $(date +%s) - s ))" 400 "$reason"; exit 1
    fi
    tail -3 "$SCRATCH/build.log" >> "$LOG"
  fi
  "$PY" -c 'import convmixer_kernels as ck, convmixer_kernels._cpp_lib as c; print("setup: extension", c.status() or "OK", c.build_info_of() if c.status() is None else "", "| backends on '"$DEV"':", ck.available_backends("'"$DEV"'"))' 2>&1 \
    | grep -v 'No CUDA runtime' | tee -a "$LOG"

  # caches of an earlier call
  if [ -f "$CARRY/caches.tgz" ]; then
    tar -xzf "$CARRY/caches.tgz" -C "$CACHE_ROOT" 2>>"$LOG" && say "setup: caches unpacked ($(du -sh "$CACHE_ROOT" | cut -f1))"
  fi
  FAMILY=$("$PY" -c "from convmixer_kernels.backends.tuning import family; print(family('$DEV'))" 2>>"$LOG" | tail -1)
  FAMILY=${FAMILY//[^A-Za-z0-9._-]/-}; FAMILY=${FAMILY:-unknown}
  record setup all ok 0 "$(( $(date +%s) - s ))" "" "family $FAMILY; PYTHONPATH $PYTHONPATH"
}
setup

# -- info ----------------------------------------------------------------------------------
if has_stage info; then
  say "== info"
  cat > "$SCRATCH/info.sh" <<'INFO'
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm --format=csv
    command -v nvcc >/dev/null && nvcc --version | tail -2
    "$PY" -c 'import sys, hashlib, torch, triton
from triton.runtime.cache import triton_key
print(sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version(), "triton", triton.__version__)
print("triton_key_sha", hashlib.sha256(triton_key().encode()).hexdigest()[:16])
if torch.cuda.is_available(): print(torch.cuda.get_device_properties(0))'
    echo "carried: $(tr '\n' ' ' < "$CARRY/BUILD_INFO" 2>/dev/null)"
    "$PY" -m pip list 2>/dev/null | grep -iE '^(timm|hypothesis|pytest|pytest-xdist|pytest-benchmark|pytest-timeout|numpy|onnx|onnxruntime|onnxscript|scikit-learn|matplotlib|torchvision) '
    "$PY" -c 'import timm; print("timm in use", timm.__version__, timm.__file__)'
    "$PY" -m convmixer_kernels info --device "$DEV"
INFO
  export PY CARRY DEV; run_step info all "${INFO_TIMEOUT:-30}" "$LOG" bash "$SCRATCH/info.sh"
  here=$(sed -n 's/^triton_key_sha //p' "$LOG" | tail -1)
  say "  triton_key: this machine $here, gpu_prep's $(sed -n 's/^triton_key_sha=//p' "$CARRY/BUILD_INFO" 2>/dev/null)"
fi

# -- test ----------------------------------------------------------------------------------
if has_stage test; then
  say "== test"
  tdeadline=$(( $(now) + ${TEST_TIMEOUT:-170} ))
  targs=(-q -rfE -p no:cacheprovider -o addopts="")
  "$PY" -c 'import xdist' 2>/dev/null && targs+=(-n "${TEST_WORKERS:-8}")
  "$PY" -c 'import pytest_timeout' 2>/dev/null && targs+=(--timeout "${TEST_CASE_TIMEOUT:-120}")
  if [ -n "${TEST_FILES:-}" ]; then read -ra all_files <<<"$TEST_FILES"
  else mapfile -t all_files < <(ls tests/test_*.py | grep -v 'tests/test_gpu_script.py'); fi
  changed=()
  if [ -f "$CARRY/changed-tests.txt" ]; then
    while read -r f; do [[ " ${all_files[*]} " == *" $f "* ]] && changed+=("$f"); done < "$CARRY/changed-tests.txt"
  fi
  rest=(); for f in "${all_files[@]}"; do [[ " ${changed[*]} " == *" $f "* ]] || rest+=("$f"); done
  npieces=${TEST_PIECES:-2}; per=$(( (${#rest[@]} + npieces - 1) / npieces )); [ "$per" -lt 1 ] && per=1
  # piece specs: name|marker|files
  pieces=("cuda|cuda|${all_files[*]}")
  [ ${#changed[@]} -gt 0 ] && pieces+=("changed|not cuda and not slow|${changed[*]}")
  for ((i = 0; i < ${#rest[@]}; i += per)); do pieces+=("rest$(( i / per + 1 ))|not cuda and not slow|${rest[*]:i:per}"); done
  pieces+=("slow|slow and not cuda|${all_files[*]}")
  for p in "${pieces[@]}"; do
    IFS='|' read -r name marker files <<<"$p"
    tl=$(( tdeadline - $(now) )); [ "$tl" -gt "${TEST_PIECE_TIMEOUT:-110}" ] && tl=${TEST_PIECE_TIMEOUT:-110}
    [ "$tl" -lt 0 ] && tl=0
    STEP_NOTE_CMD='tail -4 "$PYLOG" | grep -E "passed|failed|skipped|error|no tests ran|deselected" | tail -1 | tr -d "="'
    junit=(); [ "$name" = cuda ] && junit=(--junitxml "$SCRATCH/junit-cuda.xml")
    # shellcheck disable=SC2086
    run_step test "$name" "$tl" "$PYLOG" "$PY" -m pytest "${targs[@]}" "${junit[@]}" -m "$marker" $files
    STEP_NOTE_CMD=""
  done
  grep -E "^(FAILED|ERROR)" "$PYLOG" | head -40 | tee -a "$LOG"
  # The validation manifest: written only when the v2 family's GPU tests all ran and passed
  # (rc 5, "none": none of them ran, e.g. a dry run; rc 1: some failed or skipped, not written).
  vcommit=$(sed -n 's/^commit=//p' "$CARRY/BUILD_INFO" 2>/dev/null | head -1)
  run_step test validate 30 "$LOG" "$PY" -m convmixer_kernels.tools.validate record \
      --junit "$SCRATCH/junit-cuda.xml" --out "$OUT/validated-cuda.json" ${vcommit:+--commit "$vcommit"}
fi

# -- tune ----------------------------------------------------------------------------------
if has_stage tune; then
  say "== tune"
  eval "extra=(${TUNE_ARGS:-} ${DRY_TUNE_ARGS:-})"
  run_step tune "$FAMILY" "${TUNE_TIMEOUT:-70}" "$LOG" "$PY" -m convmixer_kernels tune --device "$DEV" \
      --dtypes "$DT" --out "$OUT/tuning-$FAMILY.json" "${extra[@]}"
fi

# -- bench (ops) ---------------------------------------------------------------------------
bench_step() { # STAGE PIECE LIMIT CSV ARGS...: one bench run; its note says how many rows it added
  local stage=$1 piece=$2 limit=$3 csv=$4; shift 4
  BEFORE=$(cat "$csv" 2>/dev/null | wc -l); BCSV=$csv
  STEP_NOTE_CMD='n=$(( $(cat "$BCSV" 2>/dev/null | wc -l) - BEFORE )); [ "$BEFORE" = 0 ] && [ "$n" -gt 0 ] && n=$((n - 1)); echo "+$n rows"'
  run_step "$stage" "$piece" "$limit" "$LOG" "$PY" -m convmixer_kernels bench --device "$DEV" --dtypes "$DT" \
      --csv "$csv" "$@"
  local rc=$?; STEP_NOTE_CMD=""
  if [ "$rc" = 0 ] && [ "$(cat "$csv" 2>/dev/null | wc -l)" = "$BEFORE" ]; then
    say "  $stage/$piece: ran but wrote no row"; record "$stage" "$piece" failed 0 0 0 "ran but wrote no row"
  fi
  return $rc
}
if has_stage bench; then
  say "== bench (ops)"
  if [ "$DRY" = 1 ]; then eval "extra=(${DRY_OPS_ARGS})"
  else eval "extra=(${BENCH_ARGS:---min-run-time 0.1 --baselines eager_nchw,eager_channels_last,compile})"; fi
  bench_step bench ops "${BENCH_TIMEOUT:-100}" "$OUT/ops.csv" --full --suites ops "${extra[@]}"
fi

# -- models --------------------------------------------------------------------------------
if has_stage models; then
  say "== models"
  mdeadline=$(( $(now) + ${MODELS_TIMEOUT:-180} ))
  read -ra models <<<"${MODELS:-convmixer_1536_20 convmixer_768_32 convmixer_1024_20_ks9_p14 convmixer_cifar_256_8}"
  if [ "$DRY" = 1 ]; then eval "margs=(${DRY_MODELS_ARGS})"
  else eval "margs=(--batch 64 --min-run-time 0.1 ${MODELS_ARGS:-})"; fi
  passes=("eager|--baselines eager_nchw,eager_channels_last")
  if [ "$DRY" != 1 ] || [ "${DRY_COMPILE:-0}" = 1 ]; then
    passes+=("compile|--backends auto --baselines compile" "max-autotune|--backends auto --baselines compile_max_autotune")
  else
    record models compile skipped "" 0 0 "dry run: compile passes skipped (DRY_COMPILE=1 runs them)"
  fi
  for p in "${passes[@]}"; do
    IFS='|' read -r pname pargs <<<"$p"
    order=("${models[@]}")
    # max-autotune: 768/32 first (its target is against torch.compile)
    [ "$pname" = max-autotune ] && [[ " ${models[*]} " == *" convmixer_768_32 "* ]] \
      && order=(convmixer_768_32 $(printf '%s\n' "${models[@]}" | grep -v '^convmixer_768_32$'))
    for m in "${order[@]}"; do
      ml=$(( mdeadline - $(now) )); [ "$ml" -gt "${MODELS_STEP_TIMEOUT:-80}" ] && ml=${MODELS_STEP_TIMEOUT:-80}
      [ "$ml" -lt 0 ] && ml=0
      # shellcheck disable=SC2086
      bench_step models "$pname:$m" "$ml" "$OUT/models.csv" --full --suites models --models "$m" \
          --modes inference,forward_backward $pargs "${margs[@]}"
    done
  done
fi

# -- paper ---------------------------------------------------------------------------------
if has_stage paper; then
  say "== paper"
  if [ "$DRY" = 1 ]; then eval "extra=(${DRY_PAPER_ARGS})"
  else eval "extra=(${PAPER_ARGS:---min-run-time 0.1 --baselines eager_nchw,eager_channels_last})"; fi
  bench_step paper all "${PAPER_TIMEOUT:-70}" "$OUT/paper.csv" --paper "${extra[@]}"
  [ -f "$OUT/paper.csv" ] && say "  paper.csv: $(( $(wc -l < "$OUT/paper.csv") - 1 )) rows"
fi

# -- pack up: caches, limits, summary ------------------------------------------------------
if [ "${CACHES_OUT:-1}" = 1 ] && [ "$(find "$OUT" -type f ! -name caches.tgz | wc -l)" -ge 8 ]; then
  rm -f "$OUT/caches.tgz"; say "caches.tgz: left out (8 files already under OUT)"
elif [ "${CACHES_OUT:-1}" = 1 ]; then
  rm -f "$OUT/caches.tgz"
  for what in "triton inductor" "triton"; do
    # shellcheck disable=SC2086
    tar -czf "$OUT/caches.tgz" -C "$CACHE_ROOT" $what 2>>"$LOG" || true
    [ "$(stat -c %s "$OUT/caches.tgz" 2>/dev/null || echo 0)" -le $(( 15 * 1024 * 1024 )) ] && break
    rm -f "$OUT/caches.tgz"
  done
  [ -f "$OUT/caches.tgz" ] && say "caches.tgz: $(du -h "$OUT/caches.tgz" | cut -f1) ($what)" || say "caches.tgz: over 15 MiB, left out"
fi

limits_ok=1
nfiles=$(find "$OUT" -type f | wc -l)
[ "$nfiles" -le 8 ] || { say "LIMIT: $nfiles files under OUT (at most 8 come back)"; limits_ok=0; }
while IFS= read -r f; do
  rel=${f#"$OUT"/}
  [ "$(stat -c %s "$f")" -le $(( 16 * 1024 * 1024 )) ] || { say "LIMIT: $rel is over 16 MiB"; limits_ok=0; }
  [ "$(tr -cd / <<<"$rel" | wc -c)" -le 2 ] || { say "LIMIT: $rel is more than 2 folders down"; limits_ok=0; }
  [[ "$rel" =~ ^[A-Za-z0-9._/-]+$ ]] || { say "LIMIT: $rel has characters that do not come back"; limits_ok=0; }
done < <(find "$OUT" -type f)
[ "$(du -sm "$OUT" | cut -f1)" -le 64 ] || { say "LIMIT: OUT is over 64 MiB"; limits_ok=0; }
say "OUT: $nfiles files, $(du -sh "$OUT" | cut -f1): $(cd "$OUT" && ls | tr '\n' ' ')"

# the closing tables the bench runs printed (fused_auto vs the best baseline; the paper's table)
tables=$(awk '/^summary on |^The paper.s comparison/{p=1} p{print} /^$/{p=0}' "$LOG" | cut -c1-150 | tail -50)
{
  echo; echo "$tables"
  echo; echo "== summary ($(now)s of ${BUDGET}s)"
  column -s, -t < "$SCSV" 2>/dev/null | cut -c1-160 || cat "$SCSV"
  for c in ops models; do
    [ -f "$OUT/$c.csv" ] && echo "$c.csv: $(( $(wc -l < "$OUT/$c.csv") - 1 )) rows"
  done
} | tee -a "$LOG"
[ "$limits_ok" = 1 ] || exit 3
if grep -q ',failed,' "$SCSV"; then exit 1; fi
exit 0
