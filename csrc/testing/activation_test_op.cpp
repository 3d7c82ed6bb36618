// Test op for the CPU activation interface (csrc/cpu/activation.h; test-only, in _C_testing):
//   convmixer_kernels::_cpu_activation(Tensor z, str activation) -> (Tensor a, Tensor d)
// with a = act(z), d = act'(z) from act_forward_deriv. It also runs act_forward on the
// same input and checks that it gives the same `a` bit for bit, so both entry points are
// covered by tests/test_cpu_activation.py.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <string>
#include <tuple>

#include "../cpu/activation.h"

namespace convmixer_kernels {
namespace {

std::tuple<at::Tensor, at::Tensor> cpu_activation(const at::Tensor& z, c10::string_view activation) {
  const cpu::Act act = cpu::parse_act(std::string(activation));
  TORCH_CHECK(z.defined(), "_cpu_activation: z is an undefined tensor");
  TORCH_CHECK(z.device().is_cpu(), "_cpu_activation: z must be a CPU tensor, got device ", z.device());
  TORCH_CHECK(z.scalar_type() == at::kFloat, "_cpu_activation: z must be float32, got ", z.scalar_type());
  TORCH_CHECK(z.layout() == at::kStrided, "_cpu_activation: z must be a dense (strided) tensor, got layout ",
              z.layout());
  const at::Tensor zc = z.contiguous();
  at::Tensor a = at::empty_like(zc, at::MemoryFormat::Contiguous);
  at::Tensor d = at::empty_like(zc, at::MemoryFormat::Contiguous);
  const int64_t n = zc.numel();
  if (n == 0) return {a, d};
  cpu::act_forward_deriv(act, zc.data_ptr<float>(), a.data_ptr<float>(), d.data_ptr<float>(), n);

  // act_forward must agree with act_forward_deriv bit for bit (NaN payloads included).
  at::Tensor a2 = at::empty_like(zc, at::MemoryFormat::Contiguous);
  cpu::act_forward(act, zc.data_ptr<float>(), a2.data_ptr<float>(), n);
  TORCH_CHECK(std::memcmp(a.data_ptr<float>(), a2.data_ptr<float>(), sizeof(float) * n) == 0,
              "_cpu_activation: act_forward and act_forward_deriv disagree for activation '",
              std::string(activation), "'");
  // In place (a aliases z) must give the same result too.
  at::Tensor a3 = zc.clone();
  cpu::act_forward(act, a3.data_ptr<float>(), a3.data_ptr<float>(), n);
  TORCH_CHECK(std::memcmp(a.data_ptr<float>(), a3.data_ptr<float>(), sizeof(float) * n) == 0,
              "_cpu_activation: in-place act_forward differs from out-of-place for activation '",
              std::string(activation), "'");
  return {a, d};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(convmixer_kernels, m) {
  m.def("_cpu_activation(Tensor z, str activation) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) { m.impl("_cpu_activation", &cpu_activation); }

}  // namespace convmixer_kernels
