// Vectorised float32 activations of the fused CPU kernels (interface: activation.h).
//
// Every loop over n is a `#pragma omp simd` loop over branch-free, force-inlined element
// code, which GCC turns into AVX2 code (8 floats per instruction) when built with
// -mavx2 -mfma (SSE2 otherwise). The element code calls no libm function (std::erf / exp /
// tanh do not vectorise): exp, the normal CDF and the logistic function are computed here
// in float32 arithmetic, with double-float (hi + lo) steps where cancellation or argument
// precision would cost accuracy. No -ffast-math: IEEE results, the same bits from the
// vector body and the scalar remainder, from act_forward and act_forward_deriv.
//
// Accuracy, measured against a long double reference over every float32 z with |z| <= 16
// (beyond, the results are z or -0 and the derivatives 1 or -0):
//   gelu       a: 0.97 ulp   d: 1.57 ulp of the larger of its two terms
//   gelu_tanh  a: 0.77 ulp   d: 1.81 ulp of the larger of its two terms
// including the negative tails, where torch's float32 GELU (0.5 z (1 + erf(z / sqrt 2)))
// cancels to 0 below z ~ -5.5. The derivatives are measured against their terms
// (Phi and z phi for gelu) because they have a zero near z = -0.75 where no float32
// evaluation of the sum has a small relative error. relu is exact.
// Special values as torch: NaN -> NaN (one canonical quiet NaN), gelu(+inf) = +inf,
// gelu(-inf) = NaN, gelu'(+-inf) = NaN (inf * 0), signed zeros with z's sign; relu keeps
// NaN and -0, relu'(z) = z <= 0 ? 0 : 1 (so relu'(NaN) = 1, as threshold_backward).
//
// gelu's fast path (every |z| <= 4, where nearly all inputs lie) measures 0.64 ulp (a) and
// 0.58 ulp (d) on the test sweep; the figures above are the general code's, used for the
// lanes of a vector that has an element beyond |z| = 4 (or NaN).
//
// How (details at each function):
//  * gelu, |z| <= 4: Phi(-|z|) = R(|z|) exp(-z^2/2), exp's reduction and polynomial in
//    float32, R (degree 14) and the products in double, one rounding at the end; AVX2
//    intrinsics (8 lanes, a per-vector test for the range) or, where the CPU has it,
//    AVX-512 (16 lanes, chosen at run time by use_avx512(), the same bits); the element
//    code in builds without AVX2. About 2x faster (single thread) than the general code, which
//    still computes the lanes beyond |z| = 4 (the general gelu bullet).
//  * exp of a double-float argument: Cody-Waite reduction with an exact FMA step, a
//    degree-5 minimax polynomial, the result as (ph + pl) * 2^k1 * 2^k2 so that products
//    with it round once, also into the subnormals; clamps give 0 / inf, NaN propagates.
//  * gelu: for |z| <= 1.25, Phi(z) = 1/2 + z (c + z^2 Q(z^2)) in double-float after Q;
//    beyond, z Phi(-|z|) = M(|z|) exp(-z^2/2) with M a polynomial in 1 / (1 + |z|/2) (its
//    last steps and the reciprocal's rounding error in double-float) and z^2 split exactly.
//  * gelu_tanh: 0.5 (1 + tanh(u)) = sigmoid(2u); 2u = z (C1 + C2 z^2) in double-float,
//    e = exp(-|2u|) in (0, 1], sigmoid = 1 / (1 + e) or e / (1 + e) in double-float.
// Polynomial coefficients: fitted in double (least squares iterated to minimax, Lawson),
// rounded to float32 one at a time with a refit of the rest.
//
// Files: activation.cpp (this: parse_act, use_avx512, the entry points), activation_elem.h
// (the element code), activation_avx2.h and activation_avx512.h (the GELU loops); the three
// headers are parts of this translation unit (internal linkage), included nowhere else.
// The AVX2 and AVX-512 GELU fast paths stay two intrinsic versions rather than one code
// over a vector type: they reach the same bits through different steps (the AVX2 code
// converts to double in 4-lane halves and applies the sign with a +-1 FMA, the AVX-512
// code works in 8-lane halves with lane masks), which a common abstraction would have to
// reproduce operation for operation to keep the results and the speed.
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
