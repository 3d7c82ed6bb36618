"""One schema source: the compiled block kernels carry exactly the schemas of
``convmixer_kernels.schema.KERNEL_SCHEMAS`` (defined by ``_cpp_lib`` before it imports
``_C``, whose C++ only registers implementations), the C++ kernels' own signatures have the
table's types, and the test-only ops live in ``_C_testing``, not in ``_C``.

A table schema whose types differ from a C++ kernel's makes the dispatcher abort the
process that imports ``_C``; the first check therefore loads it in a subprocess, so that
it fails with the dispatcher's message, and the in-process checks run only after it.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import subprocess
import sys

import pytest
import torch

from convmixer_kernels import _cpp_lib
from convmixer_kernels.schema import KERNEL_SCHEMAS, NAMESPACE

if importlib.util.find_spec("convmixer_kernels._C") is None:
    pytest.skip("compiled extension convmixer_kernels._C not built", allow_module_level=True)

BLOCKS = ("dw_block", "pw_block", "patch_embed")

# In a subprocess: load _C, then per kernel the C++ CPU kernel's signature as the
# dispatcher inferred it from the function type (argument and result types, no names).
_PROBE = r"""
import json, re, sys, torch
from convmixer_kernels import _cpp_lib
from convmixer_kernels.schema import KERNEL_SCHEMAS, NAMESPACE
reason = _cpp_lib.status()
if reason is not None:
    print(json.dumps({"unavailable": reason}))
    sys.exit(0)
inferred = {}
for name in KERNEL_SCHEMAS:
    dump = torch._C._dispatch_dump(f"{NAMESPACE}::{name}")
    m = re.search(r"^CPU: registered at .* :: (\(.*\) -> .*?) \[", dump, re.M)
    inferred[name] = m.group(1) if m else None
print(json.dumps({"inferred": inferred}))
"""


@functools.lru_cache(maxsize=None)
def probe() -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=300)


def _types(schema: torch._C.FunctionSchema) -> tuple[list[str], list[str]]:
    return [str(a.type) for a in schema.arguments], [str(r.type) for r in schema.returns]


@pytest.fixture
def loaded():
    if probe().returncode != 0:
        pytest.fail("loading convmixer_kernels._C failed: see test_table_matches_the_cpp_kernels")
    if _cpp_lib.status() is not None:
        pytest.skip(f"compiled extension unavailable: {_cpp_lib.status()}")
    _cpp_lib.load()


def test_table_covers_the_six_kernels():
    assert set(KERNEL_SCHEMAS) == {f"{b}_{d}_kernel" for b in BLOCKS for d in ("forward", "backward")}


def test_table_matches_the_cpp_kernels():
    """_C loads with the table's schemas, and each C++ CPU kernel's signature (inferred by the
    dispatcher from its function type) has the table's argument and result types."""
    r = probe()
    assert r.returncode == 0, ("importing convmixer_kernels._C with the table's schemas failed "
                               f"(exit {r.returncode}):\n{r.stderr[-4000:]}")
    out = json.loads(r.stdout.strip().splitlines()[-1])
    if "unavailable" in out:
        pytest.skip(f"compiled extension unavailable: {out['unavailable']}")
    for name, table in KERNEL_SCHEMAS.items():
        cpp = out["inferred"][name]
        assert cpp is not None, f"{name}: no CPU kernel registered"
        want = _types(torch._C.parse_schema(f"{NAMESPACE}::{name}{table}"))
        got = _types(torch._C.parse_schema(f"{NAMESPACE}::{name}{cpp}"))
        assert got == want, f"{name}: C++ kernel {cpp} vs table {table}"


@pytest.mark.parametrize("name", sorted(KERNEL_SCHEMAS))
def test_loaded_kernel_has_the_table_schema_and_a_cpu_kernel(loaded, name):
    qualname = f"{NAMESPACE}::{name}"
    got = getattr(torch.ops.convmixer_kernels, name).default._schema
    want = torch._C.parse_schema(qualname + KERNEL_SCHEMAS[name])
    assert str(got) == str(want)
    assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CPU")
    if _cpp_lib.has_cuda_kernels() and name.startswith("dw_block"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(qualname, "CUDA")


def test_test_ops_are_only_in_the_testing_module(loaded):
    """load() gives the kernels and _build_info, not the test ops; load_testing() adds them."""
    code = """
import torch
from convmixer_kernels import _cpp_lib
_cpp_lib.load()
ops = ("_axpb", "_cpu_activation", "_cpu_fma_chains")
def has(op):
    try:
        torch._C._dispatch_find_schema_or_throw("convmixer_kernels::" + op, "")
        return True
    except RuntimeError:
        return False
print("C", [has(op) for op in ops], has("_build_info"))
_cpp_lib.load_testing()
print("T", [has(op) for op in ops])
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert "C [False, False, False] True" in r.stdout
    assert "T [True, True, True]" in r.stdout
