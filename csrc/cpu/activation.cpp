// Vectorised float32 activations of the fused CPU kernels (interface: activation.h).
//
// Every loop over n is one `#pragma omp simd` loop over branch-free, force-inlined element
// code (activation_elem.h), which GCC turns into AVX2 code (8 floats per instruction) when
// built with -mavx2 -mfma (SSE2 otherwise) and, compiled a second time for avx512f, into
// AVX-512 code (16 floats) that runs where the CPU has it (use_avx512(), chosen at run
// time). The element code calls no libm function (std::erf / exp / tanh do not
// vectorise): exp, the normal CDF and the logistic function are computed here in float32
// arithmetic. No -ffast-math: IEEE results, the same bits from the AVX-512 and AVX2 code,
// the scalar remainder, act_forward and act_forward_deriv.
//
// gelu (the decision, issue 20: docs/design.md "CPU GELU"): at least as accurate as
// PyTorch's own float32 GELU and gelu_backward on the same machine (max ulp and max
// absolute error against float64, overall, in the negative tail z <= -3 and on -3 < z < 0
// and z >= 0; tests/test_cpu_activation.py measures both at run time), at the least cost:
// one float32 evaluation, two branch-free regions, no double or double-float steps.
// Measured over every 257th float32 bit pattern and dense windows (23 million inputs;
// torch float32 in brackets; d in ulps of the larger of its two terms):
//   z >= 0 (below 2^127, where torch's overflows)  a 1.5 ulp [5.0]   d 1.0 ulp [5.1]
//   -3 < z < 0                                   a 7.3 ulp [2168]  d 5.5 ulp [112]
//   z <= -3 (torch cancels to 0 below -5.5)      a 70 ulp  [1.7e7] d 69 ulp  [1.7e7]
//   absolute, everywhere                         a 2.4e-7 [1.2e-6] d 1.1e-7 [3.1e-7]
// gelu_tanh, measured against a long double reference over every float32 z with
// |z| <= 16 (beyond, the results are z or -0 and the derivatives 1 or -0): a 0.77 ulp,
// d 1.81 ulp of the larger of its two terms, the negative tail included (double-float
// steps where cancellation or argument precision would cost accuracy). The derivatives
// are measured against their terms (Phi and z phi for gelu) because they have a zero near
// z = -0.75 where no float32 evaluation of the sum has a small relative error. relu is exact.
// Special values as torch: NaN -> NaN (one canonical quiet NaN), gelu(+inf) = +inf,
// gelu(-inf) = NaN, gelu'(+-inf) = NaN (inf * 0), signed zeros with z's sign; relu keeps
// NaN and -0, relu'(z) = z <= 0 ? 0 : 1 (so relu'(NaN) = 1, as threshold_backward).
//
// How (details at each function):
//  * gelu: for |z| <= 1, Phi(z) = 1/2 + z P(z^2) and gelu'(z) = 1/2 + z D(z^2) (degree-5
//    polynomials); beyond, Phi(-|z|) = R(t) exp(-z^2/2) with R a degree-8 polynomial in
//    t = 1 / (1 + |z|/4) and exp from a Cody-Waite reduction and a degree-6 polynomial,
//    scaled by 2^k in two steps so that results in the subnormals round once.
//  * exp of a double-float argument (gelu_tanh): Cody-Waite reduction with an exact FMA
//    step, a degree-5 minimax polynomial, the result as (ph + pl) * 2^k1 * 2^k2 so that
//    products with it round once, also into the subnormals; clamps give 0 / inf.
//  * gelu_tanh: 0.5 (1 + tanh(u)) = sigmoid(2u); 2u = z (C1 + C2 z^2) in double-float,
//    e = exp(-|2u|) in (0, 1], sigmoid = 1 / (1 + e) or e / (1 + e) in double-float.
// Polynomial coefficients: fitted in double (least squares iterated to minimax, Lawson),
// rounded to float32 one at a time with a refit of the rest.
//
// Files: activation.cpp (this: parse_act, use_avx512, the loops, the entry points) and
// activation_elem.h (the element code), a part of this translation unit (internal
// linkage), included nowhere else.
#include "activation.h"

#include <c10/util/Exception.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace convmixer_kernels {
namespace cpu {

Act parse_act(const std::string& name) {
  if (name == "gelu") return Act::Gelu;
  if (name == "gelu_tanh") return Act::GeluTanh;
  if (name == "relu") return Act::Relu;
  TORCH_CHECK_VALUE(false, "activation: expected one of 'gelu', 'gelu_tanh', 'relu', got '", name, "'");
}

// A getenv per call (calls cover thousands of elements) costs nothing.
bool use_avx512() {
#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
  static const bool hw = __builtin_cpu_supports("avx512f");
  if (!hw) return false;
  const char* isa = std::getenv("CONVMIXER_KERNELS_CPU_ISA");
  return isa == nullptr || std::strcmp(isa, "avx2") != 0;
#else
  return false;
#endif
}

}  // namespace cpu
}  // namespace convmixer_kernels

#include "activation_elem.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

// The loop over n elements: GCC vectorises it for the build's ISA (AVX2 + FMA with
// -mavx2 -mfma: 8 lanes) and, in the region below, for AVX-512 (16 lanes); the scalar
// remainder runs the same element code. The same IEEE operations in the same order in
// every lane and code path, so the same bits.
template <Act kAct, bool kDeriv>
CMK_INLINE void run_loop(const float* z, float* a, float* d, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float ai, di;
    one<kAct, kDeriv>(z[i], ai, di);
    a[i] = ai;
    if (kDeriv) d[i] = di;
  }
}

#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
// The same loop compiled for avx512f (in this region only), run where use_avx512() says so.
#define CMK_HAVE_AVX512_PATH 1
#pragma GCC push_options
#pragma GCC target("avx512f")
template <Act kAct, bool kDeriv>
void run_loop_avx512(const float* z, float* a, float* d, int64_t n) {
  run_loop<kAct, kDeriv>(z, a, d, n);
}
#pragma GCC pop_options
#endif

template <Act kAct, bool kDeriv>
void run(const float* z, float* a, float* d, int64_t n) {
#ifdef CMK_HAVE_AVX512_PATH
  if (use_avx512()) return run_loop_avx512<kAct, kDeriv>(z, a, d, n);
#endif
  run_loop<kAct, kDeriv>(z, a, d, n);
}

[[noreturn]] void bad_act(Act act) {
  TORCH_CHECK(false, "act_forward: unknown activation code ", static_cast<int>(act));
  std::abort();
}

}  // namespace

void act_forward(Act act, const float* z, float* a, int64_t n) {
  switch (act) {
    case Act::Gelu: return run<Act::Gelu, false>(z, a, nullptr, n);
    case Act::GeluTanh: return run<Act::GeluTanh, false>(z, a, nullptr, n);
    case Act::Relu: return run<Act::Relu, false>(z, a, nullptr, n);
  }
  bad_act(act);
}

void act_forward_deriv(Act act, const float* z, float* a, float* d, int64_t n) {
  switch (act) {
    case Act::Gelu: return run<Act::Gelu, true>(z, a, d, n);
    case Act::GeluTanh: return run<Act::GeluTanh, true>(z, a, d, n);
    case Act::Relu: return run<Act::Relu, true>(z, a, d, n);
  }
  bad_act(act);
}

}  // namespace cpu
}  // namespace convmixer_kernels
