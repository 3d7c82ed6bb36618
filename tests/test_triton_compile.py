"""Ahead-of-time GPU compile check of the Triton kernels (no GPU needed).

Every kernel variant the package launches for the benchmark shapes is compiled for
sm_90 (and the headline shapes for sm_80) by ``python -m convmixer_kernels.tools.triton_variants``;
a kernel that does not compile for the GPU fails this test. Runs in subprocesses because the
compile needs the real kernels, while this test session runs them under
``TRITON_INTERPRET=1``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")


def _env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")  # a real compile, not a cache hit
    return env


def _run(args, tmp_path, timeout=1500) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], env=_env(tmp_path), capture_output=True,
                          text=True, timeout=timeout)


# CI compiles the headline shape of each op in every dtype, layout and mode for both
# architectures (the whole suite stays under 30 minutes on a 2-core machine);
# CONVMIXER_KERNELS_COMPILE_ALL=1 compiles every variant of every benchmark shape and of
# the kernel-size sweep for sm_90 instead (about 3-4 minutes more on 2 cores).
SM90_SCOPE = [] if os.environ.get("CONVMIXER_KERNELS_COMPILE_ALL") == "1" else ["--quick"]


@pytest.mark.parametrize("arch,scope", [("90", SM90_SCOPE), ("80", ["--quick"])],
                         ids=["sm90", "sm80"])
def test_launched_variants_compile(arch, scope, tmp_path):
    """sm_90 (the H100/H200 the package targets) and sm_80: the headline shape of each op
    in every dtype, layout and mode (every variant with CONVMIXER_KERNELS_COMPILE_ALL=1);
    ``python -m convmixer_kernels.tools.triton_variants --arch 90,80`` checks everything."""
    proc = _run(["-m", "convmixer_kernels.tools.triton_variants", "--arch", arch, "--jobs", "2",
                 *scope], tmp_path)
    print(proc.stdout[-4000:], proc.stderr[-4000:])
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    n_variants = int(proc.stdout.splitlines()[0].split()[0])
    assert n_variants > 0
    assert f"{n_variants}/{n_variants} compiled" in proc.stdout


def test_collector_sees_every_depthwise_kernel(tmp_path):
    code = textwrap.dedent("""
        from convmixer_kernels.tools import triton_variants as variants
        print(sorted({v.name for v in variants.collect(quick=True)}))
    """)
    proc = _run(["-c", code], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    names = eval(proc.stdout.strip().splitlines()[-1])
    assert {"_fwd", "_norm", "_bwd_elem", "_dgrad", "_wgrad"} <= set(names)
    code = textwrap.dedent("""
        from convmixer_kernels.tools import triton_variants as variants
        print(sorted({v.kernel.fn.__module__ for v in variants.collect(quick=True)}))
    """)
    proc = _run(["-c", code], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    modules = eval(proc.stdout.strip().splitlines()[-1])
    assert {"convmixer_kernels.backends.triton.dw_block", "convmixer_kernels.backends.triton._gemm",
            "convmixer_kernels.backends.triton.layer"} <= set(modules)


def test_collector_sees_the_fused_layer_in_both_layouts(tmp_path):
    """The fused eval layer at the headline shape (C = C_out = 1536, k = 9): bf16 in NCHW and
    channels_last, and fp16, fp32 (the --quick set that sm_80 compiles)."""
    code = textwrap.dedent("""
        from convmixer_kernels.tools import triton_variants as variants
        vs = [v for v in variants.collect(quick=True)
              if v.kernel.fn.__module__.endswith(".backends.triton.layer")]
        print([(dict(v.signature)["x_ptr"], dict(v.constexprs).get("sxc") == 1,
                dict(v.constexprs)["K"]) for v in vs])
    """)
    proc = _run(["-c", code], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    found = eval(proc.stdout.strip().splitlines()[-1])
    assert {("*bf16", False, 9), ("*bf16", True, 9), ("*fp16", False, 9),
            ("*fp32", False, 9)} <= set(found), found


def test_a_kernel_that_does_not_compile_is_reported(tmp_path):
    (tmp_path / "broken_kernel.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def broken(x_ptr, BLOCK: tl.constexpr):
            offs = tl.arange(0, BLOCK)
            tl.store(x_ptr + offs, tl.load(x_ptr + offs) + undefined_name)
    """))
    code = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        import torch
        from broken_kernel import broken
        from convmixer_kernels.tools import triton_variants as variants
        v = variants._variant(broken, (torch.empty(4, device="meta"),), {{"BLOCK": 4}})
        variants._VARIANTS[:] = [v]
        index, arch, res = variants._compile_job((0, 90))
        print("ERROR" if isinstance(res, str) else "COMPILED", res)
    """)
    proc = _run(["-c", code], tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "ERROR" in proc.stdout and "undefined_name" in proc.stdout, proc.stdout
