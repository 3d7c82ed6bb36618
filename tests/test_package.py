"""Packaging: import hygiene, the backend registry, the compiled extension."""
from __future__ import annotations

import json
import logging
import subprocess
import sys

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import _cpp_lib, backends

from conftest import has_cuda


def run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_import_loads_neither_triton_nor_extension():
    r = run_python("import sys, convmixer_kernels; "
                   "print(sorted(m for m in ('triton', 'convmixer_kernels._C', 'torch._dynamo') "
                   "if m in sys.modules))")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"


def test_works_without_the_extension():
    """With _C unimportable the package still imports and runs; asking for 'cpu' says why not."""
    code = """
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "convmixer_kernels._C":
            raise ImportError("blocked for the test")
sys.meta_path.insert(0, Block())
import torch, convmixer_kernels as ck
x = torch.randn(2, 4, 5, 5)
out = ck.DepthwiseBlock(4, 3)(x)
print("ran", tuple(out.shape))
try:
    ck.DepthwiseBlock(4, 3, backend="cpu")(x)
except ck.BackendUnavailable as e:
    print("raised", e)
"""
    r = run_python(code)
    assert r.returncode == 0, r.stderr
    assert "ran (2, 4, 5, 5)" in r.stdout
    assert "raised backend 'cpu' cannot run dw_block" in r.stdout
    assert "could not be imported" in r.stdout


def test_auto_logs_fallback_once(caplog):
    backends._logged.clear()
    # float64: no compiled CPU kernel takes it, so auto falls back to reference
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    w = torch.randn(3, 1, 3, 3, dtype=torch.float64)
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        for _ in range(3):
            ck.dw_block(x, w, training=True, backend="auto")
    skipped = [n for n in backends.AUTO_ORDER["cpu"] if n != "reference"]
    lines = [r for r in caplog.records if "skipped" in r.getMessage()]
    assert len(lines) == len(skipped) and len(lines) >= 1


def test_env_var_selects_backend(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve(None, "dw_block", x) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(ck.BackendUnavailable, match="cuda"):
        backends.resolve(None, "dw_block", x)
    assert backends.resolve("reference", "dw_block", x) == "reference"  # argument wins


def test_explain_lists_every_backend():
    status = backends.explain("cpu")
    assert set(status) == set(ck.BACKEND_NAMES)
    assert status["reference"] == "available"
    assert all(v == "available" or len(v) > 10 for v in status.values())


def test_extension_built_against_this_torch():
    assert _cpp_lib.status() is None, _cpp_lib.status()
    info = _cpp_lib.build_info_of()
    assert info["torch_version"] == torch.__version__
    json.dumps(info)


def test_extension_cpu_kernel_and_opcheck():
    _cpp_lib.load()
    x = torch.randn(1000)
    torch.testing.assert_close(torch.ops.convmixer_kernels._axpb(x, 2.5, -1.0), 2.5 * x - 1.0)
    torch.library.opcheck(torch.ops.convmixer_kernels._axpb.default, (x, 2.0, 1.0),
                          test_utils=("test_schema", "test_faketensor"))
    with pytest.raises(RuntimeError, match="float32"):
        torch.ops.convmixer_kernels._axpb(x.double(), 1.0, 0.0)


def test_cuda_sources_were_compiled_when_toolkit_present():
    """CI builds the CUDA sources (torch 2.11 CUDA build + nvcc): they must be in the binary."""
    import os
    import shutil
    nvcc = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    toolkit = torch.version.cuda is not None and (os.path.exists(nvcc) or shutil.which("nvcc"))
    if not toolkit or os.environ.get("CONVMIXER_KERNELS_SKIP_CUDA") == "1":
        pytest.skip("no CUDA toolkit / CUDA torch here: CPU-only build expected")
    assert _cpp_lib.has_cuda_kernels()
    assert "9.0" in _cpp_lib.build_info_of()["cuda_arch_list"]


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
def test_extension_cuda_kernel():
    x = torch.randn(100_000, device="cuda")
    torch.testing.assert_close(torch.ops.convmixer_kernels._axpb(x, 2.5, -1.0), 2.5 * x - 1.0)
