#!/usr/bin/env bash
# Prepares gpu-carry/ (gitignored) on this CPU machine, so that scripts/gpu_check.sh spends
# no GPU minute on building or installing. Run once before a GPU session (the extension
# build takes several minutes on 2 cores; later runs rebuild only what changed):
#
#   scripts/gpu_prep.sh                   # venv + extension + wheels + test list + BUILD_INFO
#   GPU_CACHES=/path/caches.tgz scripts/gpu_prep.sh   # also carry a previous call's caches
#
# What it makes (all of it travels with the `run` call as carry: ["gpu-carry"]):
#   gpu-carry/so/_C*.cpython-312-x86_64-linux-gnu.so    the extension, sm_90 only, built
#                        against torch 2.11.0+cu130 under Python 3.12 (the GPU machine's
#                        python3 is 3.12.3: a cp311 build from .venv would not load there)
#   gpu-carry/wheels/    wheels of what the GPU machine lacks or has in another version
#                        (default: timm==1.0.29, pure Python; GPU_WHEELS adds more)
#   gpu-carry/changed-tests.txt   test files touching code changed since the last GPU run
#                        (the git_commit of the newest row of benchmarks/results/nvidia-*.csv)
#   gpu-carry/BUILD_INFO          key=value lines: python tag, torch, triton, triton_key hash,
#                        the source hash (csrc/ + setup.py) the .so was built from, commit
#   gpu-carry/caches.tgz (only with GPU_CACHES) Triton + Inductor caches of an earlier call
#
# The build environment: a Python 3.12 venv at build/gpu-py312 (build/ is ignored) with
# torch==2.11.0 and triton==3.6.0 installed --no-deps; the CUDA wheels (nvidia/*, 2.7 GB)
# are not downloaded again: a .pth file points at .venv's nvidia/ folder (scripts/setup.sh
# made it); without one, torch is installed with its dependencies. nvcc: $CUDA_HOME
# (default /usr/local/cuda, 13.0 here and on the GPU machine).
#
# Triton cache: see the header of scripts/gpu_check.sh (what was found about warming it
# here). This script checks that triton.compile for GPUTarget("cuda", 90, 32) runs on this
# CPU-only machine and records triton_key()'s hash, which gpu_check.sh's info stage compares
# with the GPU machine's.
#
# Knobs: GPU_PY (a python3.12; default: python3.12 on PATH, else ~/.pyenv/versions/3.12*),
# GPU_VENV (build/gpu-py312), GPU_WHEELS (extra "name==version" specs), GPU_CARRY (gpu-carry),
# SKIP_BUILD=1 (keep the .so already in gpu-carry/so), FORCE_BUILD=1 (rebuild even when
# BUILD_INFO's source hash matches), MAX_JOBS (2).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CARRY=${GPU_CARRY:-gpu-carry}
VENV=${GPU_VENV:-build/gpu-py312}
TORCH_VERSION=2.11.0
TRITON_VERSION=3.6.0
WHEELS="timm==1.0.29 ${GPU_WHEELS:-}"
LIMIT_MIB=60
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=9.0
export MAX_JOBS=${MAX_JOBS:-2}
say() { echo "gpu_prep: $*"; }

# The source hash: the same function as in scripts/gpu_check.sh (keep the two in step).
source_hash() { find csrc setup.py -type f \( -name '*.cpp' -o -name '*.h' -o -name '*.cu' -o -name '*.cuh' -o -name '*.py' \) \
                  | LC_ALL=C sort | xargs sha256sum | sha256sum | cut -c1-16; }

# -- 1. the Python 3.12 build environment -------------------------------------------------
find_py312() {
  if [ -n "${GPU_PY:-}" ]; then echo "$GPU_PY"; return; fi
  if command -v python3.12 >/dev/null && python3.12 -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null; then
    command -v python3.12; return
  fi
  local p
  for p in "$HOME"/.pyenv/versions/3.12*/bin/python3.12 /usr/bin/python3.12 /usr/local/bin/python3.12; do
    [ -x "$p" ] && { echo "$p"; return; }
  done
  return 1
}
case "$VENV" in /*) ;; *) VENV=$ROOT/$VENV ;; esac
if [ ! -x "$VENV/bin/python" ]; then
  PY312=$(find_py312) || { say "no Python 3.12 found (set GPU_PY): the GPU machine runs 3.12"; exit 1; }
  say "venv $VENV from $PY312"
  "$PY312" -m venv "$VENV"
fi
case "$VENV" in /*) ;; *) VENV=$ROOT/$VENV ;; esac
VPY=$VENV/bin/python
SITE=$("$VPY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if ! "$VPY" -c "import torch, triton; assert torch.__version__.startswith('$TORCH_VERSION') and triton.__version__ == '$TRITON_VERSION'" 2>/dev/null; then
  NVIDIA=$(.venv/bin/python -c 'import nvidia, os; print(os.path.realpath(list(nvidia.__path__)[0]))' 2>/dev/null || true)
  if [ -n "$NVIDIA" ] && [ -d "$NVIDIA/cu13" ]; then
    say "torch $TORCH_VERSION, triton $TRITON_VERSION (--no-deps; CUDA wheels from $NVIDIA)"
    "$VPY" -m pip install -q --disable-pip-version-check --no-deps "torch==$TORCH_VERSION" "triton==$TRITON_VERSION"
    "$VPY" -m pip install -q --disable-pip-version-check typing_extensions sympy filelock networkx jinja2 fsspec \
        "setuptools>=70,<82" wheel ninja "numpy<2.4"
    mkdir -p "$VENV/nvidia-link"
    ln -sfn "$NVIDIA" "$VENV/nvidia-link/nvidia"
    echo "$VENV/nvidia-link" > "$SITE/zz-nvidia-link.pth"
  else
    say "torch $TORCH_VERSION with its CUDA wheels (no .venv/nvidia to reuse; a few GB)"
    "$VPY" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" "triton==$TRITON_VERSION" \
        "setuptools>=70,<82" wheel ninja "numpy<2.4"
  fi
fi
"$VPY" -c 'import sys, torch, triton; print("gpu_prep: build env: python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)' 2>&1 | grep -v 'No CUDA runtime'

mkdir -p "$CARRY/so" "$CARRY/wheels"

# -- 2. the extension, sm_90 only ---------------------------------------------------------
HASH=$(source_hash)
if [ "${SKIP_BUILD:-0}" != 1 ] && { [ "${FORCE_BUILD:-0}" = 1 ] || [ "$(sed -n 's/^source_hash=//p' "$CARRY/BUILD_INFO" 2>/dev/null)" != "$HASH" ] \
     || ! ls "$CARRY"/so/_C.cpython-312-*.so "$CARRY"/so/_C_testing.cpython-312-*.so >/dev/null 2>&1; }; then
  say "building the extension for sm_90 (source hash $HASH, MAX_JOBS=$MAX_JOBS)"
  t=$(date +%s)
  "$VPY" setup.py -q build_ext --build-temp build/gpu-sm90/temp --build-lib build/gpu-sm90/lib \
      > build/gpu-sm90.log 2>&1 || { tail -30 build/gpu-sm90.log; say "BUILD FAILED (build/gpu-sm90.log)"; exit 1; }
  rm -f "$CARRY"/so/*.so
  cp build/gpu-sm90/lib/convmixer_kernels/_C*.so "$CARRY/so/"
  say "built in $(( $(date +%s) - t )) s: $(cd "$CARRY/so" && ls | tr '\n' ' ')"
else
  say "extension for source hash $HASH already in $CARRY/so (FORCE_BUILD=1 rebuilds)"
fi
ls "$CARRY"/so/_C.cpython-312-*.so "$CARRY"/so/_C_testing.cpython-312-*.so >/dev/null

# Does it load? A scratch copy of the package with the carried .so, under the 3.12 venv.
CHECK=build/gpu-sm90/check
rm -rf "$CHECK"; mkdir -p "$CHECK"
cp -r convmixer_kernels "$CHECK/"; find "$CHECK" -name '*.so' -delete; cp "$CARRY"/so/*.so "$CHECK/convmixer_kernels/"
(cd "$CHECK" && "$VPY" -c '
import json, convmixer_kernels._cpp_lib as c
s = c.status() or c.testing_status()
assert s is None, s
info = c.build_info_of(); print("gpu_prep: carried build loads:", json.dumps(info))
assert c.has_cuda_kernels(), "built without the CUDA kernels"
' 2>&1 | grep -v 'No CUDA runtime')

# -- 3. wheels ----------------------------------------------------------------------------
rm -f "$CARRY"/wheels/*.whl
for spec in $WHEELS; do
  python3 -m pip download -q --disable-pip-version-check --no-deps --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any \
      -d "$CARRY/wheels" "$spec" 2>&1 | grep -v '^WARNING: Location' || true
done
say "wheels: $(cd "$CARRY/wheels" && ls *.whl 2>/dev/null | tr '\n' ' ')"

# -- 4. the tests that touch what changed since the last GPU run ---------------------------
last=""
for f in benchmarks/results/nvidia-*.csv; do
  [ -f "$f" ] || continue
  c=$(tail -1 "$f" | awk -F, '{print $(NF-1)}' | sed 's/-dirty$//')
  git cat-file -e "$c^{commit}" 2>/dev/null || continue
  if [ -z "$last" ] || git merge-base --is-ancestor "$last" "$c" 2>/dev/null; then last=$c; fi
done
: > "$CARRY/changed-tests.txt"
if [ -n "$last" ]; then
  changed=$( (git diff --name-only "$last" -- csrc convmixer_kernels; git ls-files -o --exclude-standard -- csrc convmixer_kernels) | sort -u)
  pats=""
  grep -q '^csrc/cuda/\|^csrc/common/\|^csrc/extension.cpp\|backends/native.py\|_cpp_lib.py' <<<"$changed" \
      && pats+=" test_cuda_backend.py test_blocks.py test_large_tensors.py test_determinism.py"
  grep -q '^convmixer_kernels/backends/triton/' <<<"$changed" && pats+=" test_triton_*.py"
  grep -q '^convmixer_kernels/backends/tuning.py\|^convmixer_kernels/tuning/' <<<"$changed" && pats+=" test_bench_tools.py"
  grep -q '^convmixer_kernels/ops/\|^convmixer_kernels/functional.py\|^convmixer_kernels/modules.py' <<<"$changed" \
      && pats+=" test_blocks.py test_autocast.py test_output_layout.py test_memory_saving.py"
  grep -q '^convmixer_kernels/tools/' <<<"$changed" && pats+=" test_bench.py test_bench_tools.py"
  for p in $pats; do (cd tests && ls $p 2>/dev/null | sed 's|^|tests/|'); done | sort -u > "$CARRY/changed-tests.txt"
  say "changed since the last GPU run ($last): $(wc -l <<<"$changed") files -> $(wc -l < "$CARRY/changed-tests.txt") test files"
else
  say "no last GPU run found in benchmarks/results/nvidia-*.csv: no changed-tests list"
fi

# -- 5. Triton: compiling for sm_90 here, and triton_key() ----------------------------------
# (from a file: @triton.jit reads the kernel's source, which a script on stdin has not)
cat > "$VENV/triton_probe.py" <<'EOF'
import hashlib, os, tempfile
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp()
import triton, triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.cache import triton_key

@triton.jit
def _probe(x, y, n, B: tl.constexpr):
    o = tl.program_id(0) * B + tl.arange(0, B)
    tl.store(y + o, tl.load(x + o, mask=o < n) * 2, mask=o < n)

src = ASTSource(_probe, signature={"x": "*fp32", "y": "*fp32", "n": "i32", "B": "constexpr"}, constexprs={"B": 128})
k = triton.compile(src, target=GPUTarget("cuda", 90, 32))
files = sum(len(f) for _, _, f in os.walk(os.environ["TRITON_CACHE_DIR"]))
ok = "cubin" in k.asm and files > 0
print(("ok" if ok else "no") + f":{files}:" + hashlib.sha256(triton_key().encode()).hexdigest()[:16])
EOF
TK=$("$VPY" "$VENV/triton_probe.py" 2>/dev/null | tail -1) || TK="failed::"
say "triton.compile for sm_90 on this CPU: ${TK%%:*} (cache files: $(cut -d: -f2 <<<"$TK")); triton_key hash $(cut -d: -f3 <<<"$TK")"

# -- 6. caches of an earlier call -----------------------------------------------------------
if [ -n "${GPU_CACHES:-}" ]; then cp "$GPU_CACHES" "$CARRY/caches.tgz"; say "carrying $GPU_CACHES"; fi

# -- 7. BUILD_INFO, and the size ------------------------------------------------------------
{
  echo "python_tag=$("$VPY" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')"
  echo "torch=$("$VPY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
  echo "triton=$TRITON_VERSION"
  echo "triton_key_sha=$(cut -d: -f3 <<<"$TK")"
  echo "triton_compile_sm90_on_cpu=${TK%%:*}"
  echo "source_hash=$HASH"
  echo "arch=$TORCH_CUDA_ARCH_LIST"
  echo "commit=$(git rev-parse --short=12 HEAD)$(git diff --quiet HEAD -- csrc setup.py || echo -dirty)"
  echo "last_gpu_commit=$last"
  echo "created=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
} > "$CARRY/BUILD_INFO"
size=$(du -sm "$CARRY" | cut -f1)
say "$CARRY: ${size} MiB ($(find "$CARRY" -type f | wc -l) files)"
if [ "$size" -gt "$LIMIT_MIB" ]; then say "over ${LIMIT_MIB} MiB: the run call carries at most 64 MiB with the tree"; exit 1; fi
cat "$CARRY/BUILD_INFO"
