// Scalar first version of the activation interface (correct, not yet vectorised).
#include "activation.h"

#include <c10/util/Exception.h>

#include <cmath>

namespace convmixer_kernels {
namespace cpu {

Act parse_act(const std::string& name) {
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  TORCH_CHECK_VALUE(false, "activation: expected one of 'gelu', 'gelu_tanh', 'relu', got '", name, "'");
}

namespace {
constexpr float kSqrt1_2 = 0.70710678118654752440f;
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;
constexpr float kSqrt2OverPi = 0.79788456080286535588f;
constexpr float kTanhCoef = 0.044715f;

inline void one(Act act, float z, float* a, float* d) {
  switch (act) {
    case Act::Relu:
      *a = z > 0.f ? z : 0.f;
      if (d) *d = z > 0.f ? 1.f : 0.f;
      break;
    case Act::Gelu: {
      const float cdf = 0.5f * (1.f + std::erf(z * kSqrt1_2));
      *a = z * cdf;
      if (d) *d = cdf + z * kInvSqrt2Pi * std::exp(-0.5f * z * z);
      break;
    }
    case Act::GeluTanh: {
      const float inner = kSqrt2OverPi * (z + kTanhCoef * z * z * z);
      const float t = std::tanh(inner);
      *a = 0.5f * z * (1.f + t);
      if (d) {
        const float dinner = kSqrt2OverPi * (1.f + 3.f * kTanhCoef * z * z);
        *d = 0.5f * (1.f + t) + 0.5f * z * (1.f - t * t) * dinner;
      }
      break;
    }
  }
}
}  // namespace

void act_forward(Act act, const float* z, float* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) one(act, z[i], &a[i], nullptr);
}

void act_forward_deriv(Act act, const float* z, float* a, float* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) one(act, z[i], &a[i], &d[i]);
}

}  // namespace cpu
}  // namespace convmixer_kernels
