"""Ahead-of-time compile check of the CUDA depthwise kernels (no GPU needed).

csrc/cuda/dw_block.cu (the first kernels), csrc/cuda/dw_block_v2.cu (the register-blocked
eval and train forwards: eval_kernel, train_kernel, finalize_kernel, norm_kernel) and
csrc/cuda/dw_block_v2_backward.cu (the v2 backward: bwd_kernel, stats_kernel) and
csrc/cuda/dw_block_v2_cl.cu (the channels_last eval and train forwards: cl_eval_kernel,
cl_train_kernel, cl_finalize_kernel, cl_norm_kernel), csrc/cuda/dw_block_v2_cl_backward.cu
(the channels_last backward: cl_elem_kernel, cl_dgrad_kernel, cl_wgrad_kernel, cl_colsum_kernel)
and csrc/cuda/dw_block_v2_generic.cu (the generic NCHW path: gen_eval_kernel, gen_train_kernel,
gen_bwd_kernel, gen_stats_kernel, gen_dz_kernel, gen_norm_kernel, gen_finalize_kernel; all in
docs/cuda-depthwise.md) are compiled to cubins for sm_80 and sm_90 with ``nvcc -Xptxas -v``;
the test fails on a compile error, on any register spill (ptxas' "spill stores" / "spill
loads" not zero), when a v2 tile kernel needs more than 128 registers (the occupancy the
static estimates in docs/cuda-depthwise.md assume), and when a v2 kernel is missing from the
cubin. Skipped only where nvcc is absent. The files compile in parallel; about 2-4 minutes
on 2 cores (about 205 CPU-seconds of nvcc).
"""
from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ["csrc/cuda/dw_block.cu", "csrc/cuda/dw_block_v2.cu", "csrc/cuda/dw_block_v2_backward.cu",
           "csrc/cuda/dw_block_v2_cl.cu", "csrc/cuda/dw_block_v2_cl_backward.cu",
           "csrc/cuda/dw_block_v2_generic.cu"]
V2_MAX_REGS = 128
V2_CAPPED = ("eval_kernel", "train_kernel", "bwd_kernel", "stats_kernel", "cl_dgrad_kernel",
             "cl_wgrad_kernel")  # held to V2_MAX_REGS
# (the names also match the channels_last cl_eval_kernel, cl_train_kernel, ...)


def _nvcc():
    home = os.environ.get("CUDA_HOME", "/usr/local/cuda")
    cand = os.path.join(home, "bin", "nvcc")
    return cand if os.path.exists(cand) else shutil.which("nvcc")


def _includes():
    torch = pytest.importorskip("torch")
    from torch.utils import cpp_extension

    if torch.version.cuda is None:
        pytest.skip(f"torch {torch.__version__} is a CPU-only build (no CUDA headers)")
    try:
        dirs = cpp_extension.include_paths(device_type="cuda")
    except TypeError:  # older torch
        dirs = cpp_extension.include_paths(cuda=True)
    # /usr/local/cuda may lack the cuBLAS/cuSPARSE headers ATen/cuda includes (as setup.py)
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
    return [d for d in dict.fromkeys(dirs) if os.path.isdir(d)]


def _ptxas_report(log: str):
    """-> [(function, registers, spill_store_bytes, spill_load_bytes)] from ptxas -v output."""
    out, fn, spills = [], None, None
    for line in log.splitlines():
        m = re.search(r"Compiling entry function '(\S+)'", line)
        if m:
            fn, spills = m.group(1), None
            continue
        m = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m and fn is not None:
            spills = (int(m.group(1)), int(m.group(2)))
            continue
        m = re.search(r"Used (\d+) registers", line)
        if m and fn is not None and spills is not None:
            out.append((fn, int(m.group(1)), *spills))
            fn = None
    return out


# sm_90: every instantiation; sm_80: v2's headline instantiations only (bfloat16, k = 9, both
# tiles, of eval_kernel, train_kernel and bwd_kernel; norm_kernel per dtype; finalize_kernel;
# the backward's small stats kernels in all dtypes; CONVMIXER_DW_V2_ONLY_K9_BF16) to keep the
# test near 2-3 minutes on 2 cores.
V2_KERNELS = {  # kernel -> (count at sm_90, count with CONVMIXER_DW_V2_ONLY_K9_BF16)
    "eval_kernel": (24, 2),   # 3 dtypes x 4 k x 2 tiles
    "train_kernel": (24, 2),
    "norm_kernel": (3, 3),
    "finalize_kernel": (1, 1),
}
V2_CL_KERNELS = {  # channels_last (dw_block_v2_cl.cu): kernel -> (count at sm_90, sm_80 headline build)
    "cl_eval_kernel": (12, 1),   # 3 dtypes x k 3/5/7/9; sm_80: bfloat16, k = 9
    "cl_train_kernel": (12, 1),
    "cl_norm_kernel": (3, 3),    # per dtype
    "cl_finalize_kernel": (1, 1),
}
V2_CLB_KERNELS = {  # channels_last backward (dw_block_v2_cl_backward.cu), as V2_CL_KERNELS
    "cl_dgrad_kernel": (12, 1),
    "cl_wgrad_kernel": (12, 1),
    "cl_elem_kernel": (12, 12),  # 3 dtypes x {stats, dz, both} x {train, eval} as launched: 4 per dtype
    "cl_colsum_kernel": (1, 1),
}
# dw_block_v2_generic.cu: run-time k (one instantiation per dtype; gen_stats_kernel and
# gen_dz_kernel also per activation; sm_80: bfloat16 only)
V2_GENERIC_KERNELS = {  # kernel -> (count at sm_90, count with CONVMIXER_DW_V2_ONLY_K9_BF16)
    "gen_eval_kernel": (3, 1),
    "gen_train_kernel": (3, 1),
    "gen_bwd_kernel": (3, 1),
    "gen_stats_kernel": (9, 3),  # x 3 activations (template constant)
    "gen_dz_kernel": (9, 3),  # x 3 activations
    "gen_norm_kernel": (3, 1),
    "gen_finalize_kernel": (1, 1),
}


@pytest.mark.parametrize("arch,defines", [("90", []), ("80", ["-DCONVMIXER_DW_V2_ONLY_K9_BF16"])],
                         ids=["sm90", "sm80"])
def test_cuda_kernels_compile_without_spills(arch, defines, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found (CUDA_HOME/bin/nvcc or PATH): the CUDA sources cannot be compiled here")
    flags = ["-cubin", f"-arch=sm_{arch}", "-O3", "-std=c++17", "--expt-relaxed-constexpr", "-Xptxas", "-v"]
    flags += defines + [f"-I{d}" for d in _includes()]
    procs = []
    for src in SOURCES:
        out = tmp_path / (os.path.basename(src) + ".cubin")
        procs.append((src, subprocess.Popen([nvcc, *flags, os.path.join(ROOT, src), "-o", str(out)],
                                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)))
    problems = []
    for src, p in procs:
        log, _ = p.communicate(timeout=900)
        assert p.returncode == 0, f"{src} does not compile for sm_{arch}:\n{log[-6000:]}"
        report = _ptxas_report(log)
        assert report, f"{src}: no ptxas resource report in the output:\n{log[-3000:]}"
        for fn, regs, st, ld in report:
            if st or ld:
                problems.append(f"{src} sm_{arch} {fn}: {st} bytes spill stores, {ld} bytes spill loads")
            if any(name in fn for name in V2_CAPPED) and regs > V2_MAX_REGS:
                problems.append(f"{src} sm_{arch} {fn}: {regs} registers > {V2_MAX_REGS}")
        if src.endswith("dw_block_v2.cu"):
            for name, counts in V2_KERNELS.items():
                want = counts[1] if defines else counts[0]
                got = sum(name in fn for fn, *_ in report)
                assert got == want, f"sm_{arch}: expected {want} v2 {name} instantiations, found {got}"
        if src.endswith("dw_block_v2_backward.cu"):
            want = 2 if defines else 24  # 3 dtypes x 4 k x 2 tiles
            got = sum("bwd_kernel" in fn for fn, *_ in report)
            assert got == want, f"expected {want} v2 backward kernels, got {got}"
            assert sum("stats_kernel" in fn for fn, *_ in report) == 6, "expected 6 v2 stats kernels"
        if src.endswith("dw_block_v2_generic.cu"):
            for name, counts in V2_GENERIC_KERNELS.items():
                want = counts[1] if defines else counts[0]
                got = sum(name in fn for fn, *_ in report)
                assert got == want, f"sm_{arch}: expected {want} generic {name} instantiations, found {got}"
        if src.endswith("dw_block_v2_cl.cu"):
            for name, counts in V2_CL_KERNELS.items():
                want = counts[1] if defines else counts[0]
                got = sum(name in fn for fn, *_ in report)
                assert got == want, f"sm_{arch}: expected {want} channels_last {name} kernels, got {got}"
        if src.endswith("dw_block_v2_cl_backward.cu"):
            for name, counts in V2_CLB_KERNELS.items():
                want = counts[1] if defines else counts[0]
                got = sum(name in fn for fn, *_ in report)
                assert got == want, f"sm_{arch}: expected {want} channels_last {name} kernels, got {got}"
    assert not problems, "\n".join(problems)
