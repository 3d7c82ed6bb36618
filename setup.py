"""Builds the compiled extensions with torch.utils.cpp_extension (ninja):

  convmixer_kernels._C          the kernels: csrc/extension.cpp, csrc/cpu/*.cpp, csrc/cuda/*.cu
                                (headers shared by CPU and CUDA code in csrc/common/)
  convmixer_kernels._C_testing  test- and benchmark-only ops: csrc/testing/*.cpp, *.cu
                                (loaded by convmixer_kernels._cpp_lib.load_testing())

Both get the same flags and the same CUDA choice.

Install with ``pip install --no-build-isolation -e .`` so the extension is built
against the torch already installed (build isolation would fetch another torch).

Environment knobs:
  CONVMIXER_KERNELS_SKIP_CUDA=1  build only the C++ CPU kernels
  TORCH_CUDA_ARCH_LIST           CUDA architectures (default "8.0;9.0")
  CUDA_HOME                      CUDA toolkit (default /usr/local/cuda)
  MAX_JOBS                       parallel compile jobs (ninja)
  DEBUG=1                        -O0 -g (and -lineinfo for CUDA) instead of -O3 -g0
  CONVMIXER_KERNELS_PORTABLE=1   no -mavx2 -mfma even where the build machine has them
"""
import glob
import logging
import os
import shutil
import sys

from setuptools import find_packages, setup

os.environ.setdefault("CUDA_HOME", "/usr/local/cuda")
os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")

# On a machine without a GPU, torch's build helper warns "No CUDA runtime is found" at
# import: expected here (the CUDA sources compile without a GPU), so not shown.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

try:
    import torch
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("setup.py: torch is not installed in this environment. Install the pinned "
             "requirements first (scripts/setup.sh), then `pip install --no-build-isolation -e .`.")

ROOT = os.path.dirname(os.path.abspath(__file__))
DEBUG = os.environ.get("DEBUG") == "1"


def cuda_build_reason():
    """None if the CUDA sources should be built, else why not."""
    if os.environ.get("CONVMIXER_KERNELS_SKIP_CUDA") == "1":
        return "CONVMIXER_KERNELS_SKIP_CUDA=1"
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build"
    nvcc = os.path.join(os.environ["CUDA_HOME"], "bin", "nvcc")
    if not os.path.exists(nvcc) and shutil.which("nvcc") is None:
        return f"nvcc not found (looked for {nvcc})"
    return None


def cuda_include_dirs():
    # /usr/local/cuda may lack the cuBLAS/cuSPARSE headers that ATen/cuda/CUDAContext.h
    # includes; the CUDA wheels that torch depends on carry them.
    dirs = []
    for path in sys.path:
        dirs += glob.glob(os.path.join(path, "nvidia", "cu*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def cpu_arch_flags():
    """AVX2 + FMA when the build machine has them (the extension is built where it runs:
    `pip install -e .` on each machine). No flag that changes IEEE results (no -ffast-math)."""
    if os.environ.get("CONVMIXER_KERNELS_PORTABLE") == "1":
        return []
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    except OSError:
        return []
    return ["-mavx2", "-mfma"] if {"avx2", "fma"} <= set(flags) else []


def kernel_source_hash(family="dw_block_v2"):
    """The sha256 of a GPU kernel family's sources (the list in
    convmixer_kernels/backends/validation.py, loaded by path: no package import), compiled
    into the extension so that the validation manifest is compared with what was built."""
    import importlib.util
    path = os.path.join(ROOT, "convmixer_kernels", "backends", "validation.py")
    spec = importlib.util.spec_from_file_location("_convmixer_validation", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.source_hash(family, ROOT)


def sources_of(*patterns):
    return sorted(f for p in patterns for f in glob.glob(os.path.join(*p.split("/"))))


def extension(name, cpp_patterns, cu_patterns):
    """One extension module from the sources matching the patterns (relative to the root);
    the .cu ones only when the CUDA sources are built."""
    skip = cuda_build_reason()
    opt = ["-O0", "-g"] if DEBUG else ["-O3", "-g0"]
    cxx = opt + ["-std=c++17", "-fopenmp", f'-DCONVMIXER_TORCH_VERSION="{torch.__version__}"']
    cxx += cpu_arch_flags()
    sources = sources_of(*cpp_patterns)
    if skip is not None:
        print(f"convmixer_kernels: building {name} without CUDA kernels ({skip})")
        return CppExtension(name, sources, extra_compile_args={"cxx": cxx},
                            extra_link_args=["-fopenmp"])
    arch = os.environ["TORCH_CUDA_ARCH_LIST"]
    cxx += ["-DCONVMIXER_WITH_CUDA", f'-DCONVMIXER_CUDA_ARCH_LIST="{arch}"']
    nvcc = ["-O0", "-lineinfo"] if DEBUG else ["-O3"]
    nvcc += ["-std=c++17", "--expt-relaxed-constexpr", "-Xcompiler=-g0" if not DEBUG else "-g"]
    nvcc += [f'-DCONVMIXER_DW_V2_SOURCE_HASH="{kernel_source_hash()}"']  # the validation gate
    sources += sources_of(*cu_patterns)
    return CUDAExtension(name, sources, include_dirs=cuda_include_dirs(),
                         extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                         extra_link_args=["-fopenmp"])


def extensions():
    return [
        extension("convmixer_kernels._C", ["csrc/*.cpp", "csrc/cpu/*.cpp"], ["csrc/cuda/*.cu"]),
        extension("convmixer_kernels._C_testing", ["csrc/testing/*.cpp"], ["csrc/testing/*.cu"]),
    ]


setup(
    name="convmixer-kernels",
    version="0.1.0",
    description="Fused GPU and CPU kernels for ConvMixer layers",
    packages=find_packages(include=["convmixer_kernels", "convmixer_kernels.*"]),
    # the shipped tuning tables and the GPU validation manifest (backends/validation.py)
    package_data={"convmixer_kernels": ["tuning/*.json", "validated/*.json"]},
    python_requires=">=3.9",
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension},
    entry_points={"console_scripts": ["convmixer-bench=convmixer_kernels.tools.cli:bench_entry"]},
    zip_safe=False,
)
