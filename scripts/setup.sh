#!/usr/bin/env bash
# Set-up for a fresh machine: a virtual environment with the pinned requirements
# (requirements.txt), then the compiled extension built against its torch.
#
#   scripts/setup.sh            # venv at $VENV (default .venv), deps + build
#
# Where python3 already has a CUDA build of torch (the GPU machines), the venv sees
# the system packages and the extension is built against that torch instead of
# replacing it; packages that cannot be installed there (no network) are reported.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}

system_cuda_torch() {
  "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null
}

step() { echo "setup [$(date +%H:%M:%S)] $*"; }

if [ ! -x "$VENV/bin/python" ]; then
  step "1/3 virtual environment in $VENV"
  if system_cuda_torch; then
    echo "setup: $PYTHON has a CUDA torch; building against it (venv with system site-packages)"
    "$PYTHON" -m venv --system-site-packages "$VENV"
  else
    "$PYTHON" -m venv "$VENV"
  fi
fi
PY="$VENV/bin/python"

if "$PY" -c 'import sys, torch; sys.exit(0 if torch.version.cuda else 1)' 2>/dev/null \
   && [ "$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')" != "2.11.0" ]; then
  # Keep the preinstalled CUDA torch: install everything else.
  echo "setup: keeping the installed torch $("$PY" -c 'import torch; print(torch.__version__)')"
  grep -vE '^(torch|torchvision|triton)([=<> ]|$)' requirements.txt > "$VENV/requirements-local.txt"
  REQ="$VENV/requirements-local.txt"
else
  REQ=requirements.txt
fi

step "2/3 pinned packages of $REQ (torch 2.11.0 and its CUDA 13.0 libraries, triton, timm, test tools): about 2-3 minutes and 5 GB on a fresh machine, seconds when already installed"
"$PY" -m pip install -q --disable-pip-version-check "pip>=25" \
  || echo "setup: could not upgrade pip (offline?); continuing"
if ! "$PY" -m pip install -q --disable-pip-version-check -r "$REQ"; then
  if system_cuda_torch; then
    echo "setup: some requirements could not be installed (offline machine?); building anyway"
  else
    exit 1
  fi
fi

export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-8.0;9.0}
step "3/3 the compiled extension (C++ CPU kernels; CUDA kernels for $TORCH_CUDA_ARCH_LIST when nvcc is found): about 2-8 minutes on 2 cores"
"$PY" -m pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
"$PY" -c 'import convmixer_kernels._cpp_lib as c; s = c.status(); print("setup: extension", s or "OK", c.build_info_of() if s is None else "")'
