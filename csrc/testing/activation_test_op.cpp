// Test op for the CPU activation interface (csrc/cpu/activation.h; test-only, in _C_testing):
//   convmixer_kernels::_cpu_activation(Tensor z, str activation) -> (Tensor a, Tensor d)
// with a = act(z), d = act'(z) from act_forward_deriv. It also runs act_forward on the
// same input and checks that it gives the same `a` bit for bit, so both entry points are
// covered by tests/test_cpu_activation.py.
//   convmixer_kernels::_cpu_activation_into(Tensor z, Tensor(a!) a, Tensor(b!)? d, str activation) -> ()
// writes act(z) into a (and act'(z) into d when given) in chunks of kIntoChunk elements over
// at::parallel_for, as the kernels call it per tile: for timing the activation alone
// (convmixer_kernels/tools/gelu_cost.py).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
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

constexpr int64_t kIntoChunk = 16384;

void check_into_arg(const at::Tensor& t, const at::Tensor& z, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == z.numel(),
              "_cpu_activation_into: ", name, " must be a contiguous float32 CPU tensor of z's size");
}

void cpu_activation_into(const at::Tensor& z, const at::Tensor& a, const c10::optional<at::Tensor>& d,
                         c10::string_view activation) {
  const cpu::Act act = cpu::parse_act(std::string(activation));
  check_into_arg(z, z, "z");
  check_into_arg(a, z, "a");
  const bool deriv = d.has_value() && d->defined();
  if (deriv) check_into_arg(*d, z, "d");
  const float* zp = z.data_ptr<float>();
  float* ap = a.data_ptr<float>();
  float* dp = deriv ? d->data_ptr<float>() : nullptr;
  at::parallel_for(0, z.numel(), kIntoChunk, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; i += kIntoChunk) {
      const int64_t n = std::min(kIntoChunk, end - i);
      if (deriv) {
        cpu::act_forward_deriv(act, zp + i, ap + i, dp + i, n);
      } else {
        cpu::act_forward(act, zp + i, ap + i, n);
      }
    }
  });
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(convmixer_kernels, m) {
  m.def("_cpu_activation(Tensor z, str activation) -> (Tensor, Tensor)");
  m.def("_cpu_activation_into(Tensor z, Tensor(a!) a, Tensor(b!)? d, str activation) -> ()");
}

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("_cpu_activation", &cpu_activation);
  m.impl("_cpu_activation_into", &cpu_activation_into);
}

}  // namespace convmixer_kernels
