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


def test_explain_says_what_runs_and_why():
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    e = backends.explain(x, "dw_block", mode="train", k=3)
    assert e["chosen"] in backends.names() and e["why"]
    # no compiled CPU kernel takes float64: the cpu backend says why
    assert "float64" in e["backends"]["cpu"]
    assert e["backends"]["reference"] == "available"
    with pytest.raises(TypeError, match="x: expected an input tensor"):
        backends.explain("cpu", "dw_block")
    with pytest.raises(ValueError, match="op:"):
        backends.explain(x, "nope")


def test_env_var_selects_backend(monkeypatch):
    x = torch.randn(2, 3, 4, 4)
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.resolve(None, "dw_block", x) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(ck.BackendUnavailable, match="cuda"):
        backends.resolve(None, "dw_block", x)
    assert backends.resolve("reference", "dw_block", x) == "reference"  # argument wins


def test_explain_lists_every_backend():
    status = backends.explain(torch.randn(1, 2, 3, 3))["backends"]
    assert set(status) == set(ck.BACKEND_NAMES)
    assert status["reference"] == "available"
    assert all(v == "available" or len(v) > 10 for v in status.values())


def test_extension_built_against_this_torch():
    assert _cpp_lib.status() is None, _cpp_lib.status()
    info = _cpp_lib.build_info_of()
    assert info["torch_version"] == torch.__version__
    json.dumps(info)


def test_extension_cpu_kernel_and_opcheck():
    _cpp_lib.load_testing()  # _axpb is a test op, in convmixer_kernels._C_testing
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
    _cpp_lib.load_testing()
    x = torch.randn(100_000, device="cuda")
    torch.testing.assert_close(torch.ops.convmixer_kernels._axpb(x, 2.5, -1.0), 2.5 * x - 1.0)


def test_library_never_imports_tools():
    """The tools (bench, tune, profile, info) sit above the library: no module outside
    convmixer_kernels/tools imports from it."""
    import ast
    import pathlib
    root = pathlib.Path(ck.__file__).parent
    offenders = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if rel.parts[0] in ("tools",) or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.ImportFrom):
                mod = node.module or ""
                names = [mod] + [f"{mod}.{a.name}" for a in node.names]
                if node.level:  # relative: resolve against the file's package
                    base = ".".join(("convmixer_kernels",) + rel.parts[:-1][:len(rel.parts) - node.level])
                    names = [f"{base}.{n}".rstrip(".") for n in names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            if any(n.startswith("convmixer_kernels.tools") or ".tools" in n.split("convmixer_kernels", 1)[-1][:7]
                   for n in names):
                offenders.append(f"{rel}: {ast.dump(node)[:80]}")
    assert not offenders, offenders


def test_registry_is_open():
    """A backend object registered under a new name runs the ops when asked for."""
    from convmixer_kernels.backends.reference import ReferenceBackend

    class Mine(ReferenceBackend):
        name = "mine"
        priority = 10_000
        calls = 0

        def block_forward(self, spec, *args):
            Mine.calls += 1
            return super().block_forward(spec, *args)

    backends.register(Mine())
    try:
        x = torch.randn(2, 3, 5, 5)
        w = torch.randn(3, 1, 3, 3)
        out = ck.dw_block(x, w, training=True, backend="mine")
        torch.testing.assert_close(out, ck.dw_block(x, w, training=True, backend="reference"))
        assert Mine.calls == 1
        assert "mine" in backends.names()
    finally:
        backends.unregister("mine")
    with pytest.raises(ValueError, match="backend"):
        ck.dw_block(torch.randn(2, 3, 5, 5), torch.randn(3, 1, 3, 3), training=True, backend="mine")
