// The CPU GELU loop with AVX-512 (16 lanes), compiled for avx512f in its region only and
// used where use_avx512() says so (activation.cpp); the same bits as the AVX2 loop
// (activation_avx2.h), to which vectors out of the fast range fall back.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cstdint>

#include "activation_avx2.h"
#include "activation_elem.h"

namespace convmixer_kernels {
namespace cpu {
namespace {  // internal to activation.cpp, the only file that includes this

#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
// ---------------------------------------------------------------------------------------
// AVX-512 (16 lanes) version of the GELU fast path, compiled for avx512f in this region
// only and used when the CPU has it (run-time check, act_isa() below). The operations are
// those of gelu_fast8 in the same order (the sign step with lane masks, which rounds the
// same), so both give the same bits; vectors with a lane
// out of the fast range, and the last n % 16 elements, go through the AVX2 run_gelu.
#define CMK_HAVE_AVX512_PATH 1
#pragma GCC push_options
#pragma GCC target("avx512f")
// GCC 12 warns about its own avx512 intrinsics (their undefined upper parts) here.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
namespace avx512 {

CMK_INLINE __m512 set1(float x) { return _mm512_set1_ps(x); }
CMK_INLINE __m512d set1d(double x) { return _mm512_set1_pd(x); }
CMK_INLINE __m512 and_ps(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(_mm512_and_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}
CMK_INLINE __m512 xor_ps(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(_mm512_xor_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}
CMK_INLINE __m512 or_ps(__m512 a, __m512 b) {
  return _mm512_castsi512_ps(_mm512_or_epi32(_mm512_castps_si512(a), _mm512_castps_si512(b)));
}
CMK_INLINE __m256 lo8(__m512 v) { return _mm512_castps512_ps256(v); }
CMK_INLINE __m256 hi8(__m512 v) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)); }
CMK_INLINE __m512 join(__m256 lo, __m256 hi) {
  return _mm512_castpd_ps(_mm512_insertf64x4(_mm512_zextpd256_pd512(_mm256_castps_pd(lo)), _mm256_castps_pd(hi), 1));
}

// One half (8 lanes) of the double part. The sign handling of gelu_fast8 (a = sgn sp + base_a,
// d = sgn xe + base_d with sgn = +-1, base 0 or s / 1) is done with lane masks here: for
// z < 0 a = sp and d = xe, else a = s - sp and d = 1 - xe, each rounded once as the FMA
// does (sp > 0 and xe is never -0 there), so the same bits without converting sgn and bases.
template <bool kDeriv>
CMK_INLINE void gelu_fast_half(__m256 s8, __m256 rh8, __m256 tail8, __m256 scale8, __mmask8 neg, __m256& a8,
                               __m256& d8) {
  const __m512d scale = _mm512_cvtps_pd(scale8);
  const __m512d e = _mm512_fmadd_pd(_mm512_add_pd(_mm512_cvtps_pd(rh8), _mm512_cvtps_pd(tail8)), scale, scale);
  const __m512d sd = _mm512_cvtps_pd(s8);
  const __m512d v = _mm512_fmadd_pd(sd, set1d(0.5), set1d(-1.0));
  __m512d r = set1d(kR14);
  r = _mm512_fmadd_pd(r, v, set1d(kR13));
  r = _mm512_fmadd_pd(r, v, set1d(kR12));
  r = _mm512_fmadd_pd(r, v, set1d(kR11));
  r = _mm512_fmadd_pd(r, v, set1d(kR10));
  r = _mm512_fmadd_pd(r, v, set1d(kR9));
  r = _mm512_fmadd_pd(r, v, set1d(kR8));
  r = _mm512_fmadd_pd(r, v, set1d(kR7));
  r = _mm512_fmadd_pd(r, v, set1d(kR6));
  r = _mm512_fmadd_pd(r, v, set1d(kR5));
  r = _mm512_fmadd_pd(r, v, set1d(kR4));
  r = _mm512_fmadd_pd(r, v, set1d(kR3));
  r = _mm512_fmadd_pd(r, v, set1d(kR2));
  r = _mm512_fmadd_pd(r, v, set1d(kR1));
  r = _mm512_fmadd_pd(r, v, set1d(kR0));
  const __m512d sp = _mm512_mul_pd(sd, _mm512_mul_pd(r, e));
  a8 = _mm512_cvtpd_ps(_mm512_mask_blend_pd(neg, _mm512_sub_pd(sd, sp), sp));
  if (kDeriv) {
    const __m512d xe = _mm512_mul_pd(_mm512_fmadd_pd(set1d(-kC), sd, r), e);
    d8 = _mm512_cvtpd_ps(_mm512_mask_blend_pd(neg, _mm512_sub_pd(set1d(1.0), xe), xe));
  }
}

template <bool kDeriv>
CMK_INLINE void gelu_fast16(__m512 z, __m512& a, __m512& d) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  const __m512 s = and_ps(z, absmask);
  const __mmask16 neg = _mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_LT_OQ);
  const __m512 ss = _mm512_mul_ps(s, s);
  const __m512 ssl = _mm512_fmsub_ps(s, s, ss);
  const __m512 xh = _mm512_mul_ps(set1(-0.5f), ss);
  const __m512 kmag = _mm512_fmadd_ps(xh, set1(kLog2e), set1(kRoundMagic));
  const __m512 kf = _mm512_sub_ps(kmag, set1(kRoundMagic));
  const __m512i k = _mm512_sub_epi32(_mm512_castps_si512(kmag), _mm512_castps_si512(set1(kRoundMagic)));
  const __m512 rh = _mm512_fmadd_ps(xor_ps(kf, set1(-0.f)), set1(kLn2Hi), xh);
  const __m512 rl = _mm512_fmadd_ps(xor_ps(kf, set1(-0.f)), set1(kLn2Lo), _mm512_mul_ps(set1(-0.5f), ssl));
  __m512 q = set1(kExpQ5);
  q = _mm512_fmadd_ps(q, rh, set1(kExpQ4));
  q = _mm512_fmadd_ps(q, rh, set1(kExpQ3));
  q = _mm512_fmadd_ps(q, rh, set1(kExpQ2));
  q = _mm512_fmadd_ps(q, rh, set1(kExpQ1));
  q = _mm512_fmadd_ps(q, rh, set1(kExpQ0));
  const __m512 rh2 = _mm512_mul_ps(rh, rh);
  const __m512 expm1_rh = _mm512_fmadd_ps(rh2, q, rh);
  const __m512 tail = _mm512_fmadd_ps(rh2, q, _mm512_fmadd_ps(rl, expm1_rh, rl));
  const __m512 scale = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(k, _mm512_set1_epi32(127)), 23));
  __m256 alo, ahi, dlo, dhi;
  gelu_fast_half<kDeriv>(lo8(s), lo8(rh), lo8(tail), lo8(scale), static_cast<__mmask8>(neg), alo, dlo);
  gelu_fast_half<kDeriv>(hi8(s), hi8(rh), hi8(tail), hi8(scale), static_cast<__mmask8>(neg >> 8), ahi, dhi);
  a = or_ps(join(alo, ahi), _mm512_castsi512_ps(_mm512_andnot_epi32(_mm512_castps_si512(absmask),
                                                                      _mm512_castps_si512(z))));
  if (kDeriv) d = join(dlo, dhi);
}

template <bool kDeriv>
void run_gelu(const float* z, float* a, float* d, int64_t n) {
  const __m512 absmask = _mm512_castsi512_ps(_mm512_set1_epi32(0x7fffffff));
  auto fast_lanes = [&](__m512 zv) {
    return _mm512_cmp_ps_mask(and_ps(zv, absmask), set1(kGeluFastMax), _CMP_LE_OQ);
  };
  // One vector: the fast path, or all 16 lanes through the AVX2 code if any is out of range.
  auto one = [&](int64_t i, __m512 zv, __mmask16 fast) {
    if (fast != 0xffff) {
      ::convmixer_kernels::cpu::run_gelu<kDeriv>(z + i, a + i, kDeriv ? d + i : nullptr, 16);
      return;
    }
    __m512 av, dv;
    gelu_fast16<kDeriv>(zv, av, dv);
    _mm512_storeu_ps(a + i, av);
    if (kDeriv) _mm512_storeu_ps(d + i, dv);
  };
  int64_t i = 0;
  // Two vectors per step where both are in the fast range: their four independent
  // polynomial chains (latency-bound one at a time) interleave. Same bits either way.
  for (; i + 32 <= n; i += 32) {
    const __m512 z0 = _mm512_loadu_ps(z + i), z1 = _mm512_loadu_ps(z + i + 16);
    const __mmask16 f0 = fast_lanes(z0), f1 = fast_lanes(z1);
    if ((f0 & f1) != 0xffff) {
      one(i, z0, f0);
      one(i + 16, z1, f1);
      continue;
    }
    __m512 a0, d0, a1, d1;
    gelu_fast16<kDeriv>(z0, a0, d0);
    gelu_fast16<kDeriv>(z1, a1, d1);
    _mm512_storeu_ps(a + i, a0);
    _mm512_storeu_ps(a + i + 16, a1);
    if (kDeriv) {
      _mm512_storeu_ps(d + i, d0);
      _mm512_storeu_ps(d + i + 16, d1);
    }
  }
  for (; i + 16 <= n; i += 16) {
    const __m512 zv = _mm512_loadu_ps(z + i);
    one(i, zv, fast_lanes(zv));
  }
  if (i < n) ::convmixer_kernels::cpu::run_gelu<kDeriv>(z + i, a + i, kDeriv ? d + i : nullptr, n - i);
}

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

}  // namespace
}  // namespace cpu
}  // namespace convmixer_kernels
