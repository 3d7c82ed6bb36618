// convmixer_kernels._C: op schemas of the compiled kernels, their CPU implementations,
// and the Python module entry point. CUDA implementations live in csrc/cuda/*.cu and
// register under TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#include "axpb.h"

#ifndef CONVMIXER_TORCH_VERSION
#define CONVMIXER_TORCH_VERSION "unknown"
#endif
#ifndef CONVMIXER_CUDA_ARCH_LIST
#define CONVMIXER_CUDA_ARCH_LIST ""
#endif

extern "C" {
// Importing convmixer_kernels._C runs the static registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace convmixer_kernels {

// JSON describing what this binary was built against (read by _cpp_lib.py).
std::string build_info() {
#ifdef CONVMIXER_WITH_CUDA
  const char* cuda = "true";
#else
  const char* cuda = "false";
#endif
  return std::string("{\"torch_version\": \"") + CONVMIXER_TORCH_VERSION + "\", \"cuda\": " +
         cuda + ", \"cuda_arch_list\": \"" + CONVMIXER_CUDA_ARCH_LIST + "\", \"openmp\": " +
         (at::get_parallel_info().find("OpenMP") != std::string::npos ? "true" : "false") + "}";
}

// out = a * x + b, elementwise: the smallest kernel that exercises the whole build,
// registration and launch path on both devices.
at::Tensor axpb_cpu(const at::Tensor& x, double a, double b) {
  check_axpb_input(x, at::kCPU);
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const float* in = xc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float fa = static_cast<float>(a), fb = static_cast<float>(b);
  at::parallel_for(0, xc.numel(), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) o[i] = fa * in[i] + fb;
  });
  return out;
}

// Kernel-level ops behind the `cpu` and `cuda` backends: one schema per block, the
// CPU implementation in csrc/cpu/, the CUDA one in csrc/cuda/ (dispatch by device).
// Arguments and results are those of the Python block ops (convmixer_kernels/ops/_block.py)
// without the `backend` argument; see convmixer_kernels/reference.py for their meaning.
// The GEMM blocks' forward (pw_block, patch_embed) also takes `str out_format`
// ('channels_last' or 'contiguous'): the layout the kernel writes out and preact in.
// dw_block's output follows x's layout (no such argument).
#define CONVMIXER_BLOCK_FORWARD_ARGS                                                          \
  "(Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "              \
  "Tensor? running_mean, Tensor? running_var, bool use_batch_stats, float eps, "              \
  "str activation, bool save_preact"
#define CONVMIXER_BLOCK_BACKWARD_SCHEMA(m, name)                                                  \
  m.def(name "_backward_kernel(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, "          \
             "Tensor? bn_weight, Tensor mean, Tensor var, Tensor preact, bool use_batch_stats, "  \
             "float eps, str activation, bool[] output_mask) "                                     \
             "-> (Tensor, Tensor, Tensor, Tensor, Tensor)")
#define CONVMIXER_BLOCK_KERNEL_SCHEMAS(m, name)                                                  \
  m.def(name "_forward_kernel" CONVMIXER_BLOCK_FORWARD_ARGS                                      \
             ") -> (Tensor, Tensor, Tensor, Tensor)");                                           \
  CONVMIXER_BLOCK_BACKWARD_SCHEMA(m, name)
#define CONVMIXER_GEMM_BLOCK_KERNEL_SCHEMAS(m, name)                                             \
  m.def(name "_forward_kernel" CONVMIXER_BLOCK_FORWARD_ARGS                                      \
             ", str out_format) -> (Tensor, Tensor, Tensor, Tensor)");                           \
  CONVMIXER_BLOCK_BACKWARD_SCHEMA(m, name)

TORCH_LIBRARY_FRAGMENT(convmixer_kernels, m) {
  m.def("_build_info() -> str", &build_info);
  m.def("_axpb(Tensor x, float a, float b) -> Tensor");
  CONVMIXER_BLOCK_KERNEL_SCHEMAS(m, "dw_block");
  CONVMIXER_GEMM_BLOCK_KERNEL_SCHEMAS(m, "pw_block");
  CONVMIXER_GEMM_BLOCK_KERNEL_SCHEMAS(m, "patch_embed");
}

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) { m.impl("_axpb", &axpb_cpu); }

}  // namespace convmixer_kernels
