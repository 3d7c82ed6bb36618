// convmixer_kernels._C: the Python module entry point and _build_info. The block kernels'
// schemas ({dw_block,pw_block,patch_embed}_{forward,backward}_kernel) are defined in Python
// from one table, convmixer_kernels/schema.py (KERNEL_SCHEMAS), by
// convmixer_kernels/_cpp_lib.py right before it imports this module; the C++ only registers
// their implementations: CPU in csrc/cpu/, CUDA in csrc/cuda/ (TORCH_LIBRARY_IMPL).
// Test- and benchmark-only ops are in another module, convmixer_kernels._C_testing
// (csrc/testing/).
#include <Python.h>

#include <ATen/Parallel.h>
#include <torch/library.h>

#include <string>

#ifndef CONVMIXER_TORCH_VERSION
#define CONVMIXER_TORCH_VERSION "unknown"
#endif
#ifndef CONVMIXER_CUDA_ARCH_LIST
#define CONVMIXER_CUDA_ARCH_LIST ""
#endif

extern "C" {
// Importing convmixer_kernels._C runs the static registrations of csrc/cpu and csrc/cuda.
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

TORCH_LIBRARY_FRAGMENT(convmixer_kernels, m) { m.def("_build_info() -> str", &build_info); }

}  // namespace convmixer_kernels
