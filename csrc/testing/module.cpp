// convmixer_kernels._C_testing: test- and benchmark-only ops, built apart from the
// production module _C (setup.py) and loaded by convmixer_kernels._cpp_lib.load_testing():
//   _axpb(Tensor x, float a, float b) -> Tensor          (this file, axpb.cu)
//   _cpu_activation(Tensor z, str activation) -> (Tensor, Tensor)   (activation_test_op.cpp)
//   _cpu_activation_into(Tensor z, Tensor(a!) a, Tensor(b!)? d, str activation) -> ()  (the same)
//   _cpu_fma_chains(int iters) -> Tensor                  (fma_rate.cpp)
// The CPU activation code they exercise is the production csrc/cpu/activation.cpp, compiled
// into this module too (activation.cpp here).
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "axpb.h"

extern "C" {
// Importing convmixer_kernels._C_testing runs the static registrations of csrc/testing.
PyObject* PyInit__C_testing(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C_testing", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace convmixer_kernels {

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

TORCH_LIBRARY_FRAGMENT(convmixer_kernels, m) { m.def("_axpb(Tensor x, float a, float b) -> Tensor"); }

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) { m.impl("_axpb", &axpb_cpu); }

}  // namespace convmixer_kernels
