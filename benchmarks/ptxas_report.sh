#!/usr/bin/env bash
# Register / spill / shared-memory report of the CUDA depthwise-block kernels
# (csrc/cuda/dw_block.cu), compiled with the extension's nvcc flags and -Xptxas -v for
# each architecture (default: sm_80 and sm_90). No GPU needed.
#
#   benchmarks/ptxas_report.sh            # summary table per architecture
#   benchmarks/ptxas_report.sh --raw      # also the raw ptxas output
#   ARCHS="80 90" PYTHON=.venv/bin/python CUDA_HOME=/usr/local/cuda benchmarks/ptxas_report.sh
#
# Exit status 1 when a kernel of kernel size k <= 9 (or one of the k-independent kernels)
# spills registers.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON="${PYTHON:-$ROOT/.venv/bin/python}"
CUDA_HOME="${CUDA_HOME:-/usr/local/cuda}"
ARCHS="${ARCHS:-80 90}"
SRC="${SRC:-$ROOT/csrc/cuda/dw_block.cu}"
RAW=0
[[ "${1:-}" == "--raw" ]] && RAW=1

INCLUDES="$("$PYTHON" - <<'PY'
import glob, os, sys
from torch.utils import cpp_extension as ce
dirs = ce.include_paths(device_type="cuda")
for p in sys.path:
    dirs += glob.glob(os.path.join(p, "nvidia", "cu*", "include"))
print(" ".join("-I" + d for d in dict.fromkeys(dirs) if os.path.isdir(d)))
PY
)"
ABI="$("$PYTHON" -c 'import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))')"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
status=0
for arch in $ARCHS; do
  log="$TMP/ptxas_sm$arch.log"
  "$CUDA_HOME/bin/nvcc" -c "$SRC" -o "$TMP/dw_block_sm$arch.o" $INCLUDES \
    -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__ -D__CUDA_NO_BFLOAT16_CONVERSIONS__ \
    -D__CUDA_NO_HALF2_OPERATORS__ -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C \
    -D_GLIBCXX_USE_CXX11_ABI="$ABI" -O3 -std=c++17 --expt-relaxed-constexpr -Xcompiler=-fPIC \
    -gencode "arch=compute_$arch,code=sm_$arch" -Xptxas -v 2>"$log" || { cat "$log"; exit 2; }
  [[ $RAW == 1 ]] && cat "$log"
  echo "== sm_$arch =="
  "$PYTHON" - "$log" <<'PY' || status=1
import re, subprocess, sys
lines = open(sys.argv[1]).read().splitlines()
rows, name, bad = [], None, []
for i, line in enumerate(lines):
    m = re.search(r"Compiling entry function '([^']+)'", line)
    if m:
        name = m.group(1)
        spill = regs = smem = stack = None
        continue
    m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
    if m and name:
        stack, st, ld = map(int, m.groups())
        spill = (st, ld)
    m = re.search(r"Used (\d+) registers", line)
    if m and name:
        regs = int(m.group(1))
        sm = re.search(r"(\d+) bytes smem", line)
        smem = int(sm.group(1)) if sm else 0
        rows.append((name, regs, stack, spill, smem))
        name = None
demangled = subprocess.run(["c++filt"], input="\n".join(r[0] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() if rows else []
print(f"{'kernel':<78} {'regs':>5} {'stack':>6} {'spill st/ld':>12}")
for (mangled, regs, stack, spill, smem), pretty in zip(rows, demangled or [r[0] for r in rows]):
    pretty = re.sub(r"\(convmixer_kernels::.*$", "", pretty.replace("convmixer_kernels::cuda::(anonymous namespace)::", ""))
    pretty = pretty.replace("c10::", "")
    spills = f"{spill[0]}/{spill[1]}" if spill else "?"
    print(f"{pretty:<78} {regs:>5} {stack if stack is not None else '?':>6} {spills:>12}")
    m = re.search(r"conv_kernel<[^,]+, [^,]+, (\d+)>", pretty)
    small_k = m is None or 0 < int(m.group(1)) <= 9
    if spill and (spill[0] or spill[1]) and small_k:
        bad.append(pretty)
if bad:
    print("SPILLS in kernels that must not spill:", *bad, sep="\n  ")
    sys.exit(1)
print(f"{len(rows)} kernels; no spills where required (k <= 9 and the k-independent kernels)")
PY
done
exit $status
