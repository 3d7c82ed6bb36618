// Activations of the fused CPU kernels, applied to arrays of float32 (the kernels'
// compute type). One interface for every kernel; the implementation (activation.cpp)
// is vectorised and accurate to float32 precision (gelu: at least as accurate as PyTorch's
// own float32 GELU, at the least cost; see activation.cpp).
#pragma once

#include <c10/util/string_view.h>

#include <cstdint>
#include <string>

namespace convmixer_kernels {
namespace cpu {

enum class Act : int { Gelu = 0, GeluTanh = 1, Relu = 2 };

// "gelu" (exact erf), "gelu_tanh", "relu"; anything else raises a c10::Error naming `activation`.
Act parse_act(const std::string& name);

// a[i] = act(z[i]) for i < n. a may alias z.
void act_forward(Act act, const float* z, float* a, int64_t n);

// a[i] = act(z[i]) and d[i] = act'(z[i]) for i < n (for backward: xhat needs a, dz needs act').
void act_forward_deriv(Act act, const float* z, float* a, float* d, int64_t n);

// true when the CPU kernels use their AVX-512 code: the CPU has avx512f and the build has
// the AVX-512 paths, unless CONVMIXER_KERNELS_CPU_ISA=avx2 (read at each call) asks for the
// AVX2 code. Both give the same bits.
bool use_avx512();

}  // namespace cpu
}  // namespace convmixer_kernels
