// The CPU GELU loop over n elements (activation.cpp): the fast path with AVX2 intrinsics, 8
// lanes, where the build has AVX2 and FMA; else blocks of the element code
// (activation_elem.h) that the compiler vectorises. Same bits either way.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "activation_elem.h"

namespace convmixer_kernels {
namespace cpu {
namespace {  // internal to activation.cpp, the only file that includes this

#if defined(__AVX2__) && defined(__FMA__)
// The same fast path written with AVX2 intrinsics (GCC's vectorisation of the element code
// above, with its float -> double halves, spills registers and runs at about a third of
// this speed). Identical operations in the same order, so the results are the same bits.
CMK_INLINE __m256 set1(float x) { return _mm256_set1_ps(x); }
CMK_INLINE __m256d set1d(double x) { return _mm256_set1_pd(x); }

// One half (4 lanes) of the double part: a and d from s, the exp pieces and the sign.
template <bool kDeriv>
CMK_INLINE void gelu_fast_half(__m128 s4, __m128 rh4, __m128 tail4, __m128 scale4, __m128 sgn4, __m128 base_a4,
                               __m128 base_d4, __m128& a4, __m128& d4) {
  const __m256d scale = _mm256_cvtps_pd(scale4);
  const __m256d e = _mm256_fmadd_pd(_mm256_add_pd(_mm256_cvtps_pd(rh4), _mm256_cvtps_pd(tail4)), scale, scale);
  const __m256d sd = _mm256_cvtps_pd(s4);
  const __m256d v = _mm256_fmadd_pd(sd, set1d(0.5), set1d(-1.0));
  __m256d r = set1d(kR14);
  r = _mm256_fmadd_pd(r, v, set1d(kR13));
  r = _mm256_fmadd_pd(r, v, set1d(kR12));
  r = _mm256_fmadd_pd(r, v, set1d(kR11));
  r = _mm256_fmadd_pd(r, v, set1d(kR10));
  r = _mm256_fmadd_pd(r, v, set1d(kR9));
  r = _mm256_fmadd_pd(r, v, set1d(kR8));
  r = _mm256_fmadd_pd(r, v, set1d(kR7));
  r = _mm256_fmadd_pd(r, v, set1d(kR6));
  r = _mm256_fmadd_pd(r, v, set1d(kR5));
  r = _mm256_fmadd_pd(r, v, set1d(kR4));
  r = _mm256_fmadd_pd(r, v, set1d(kR3));
  r = _mm256_fmadd_pd(r, v, set1d(kR2));
  r = _mm256_fmadd_pd(r, v, set1d(kR1));
  r = _mm256_fmadd_pd(r, v, set1d(kR0));
  const __m256d sgn = _mm256_cvtps_pd(sgn4);
  const __m256d sp = _mm256_mul_pd(sd, _mm256_mul_pd(r, e));
  a4 = _mm256_cvtpd_ps(_mm256_fmadd_pd(sgn, sp, _mm256_cvtps_pd(base_a4)));
  if (kDeriv) {
    const __m256d xe = _mm256_mul_pd(_mm256_fmadd_pd(set1d(-kC), sd, r), e);
    d4 = _mm256_cvtpd_ps(_mm256_fmadd_pd(sgn, xe, _mm256_cvtps_pd(base_d4)));
  }
}

// gelu_fast_one on 8 lanes (lanes with |z| > kGeluFastMax: unspecified results).
template <bool kDeriv>
CMK_INLINE void gelu_fast8(__m256 z, __m256& a, __m256& d) {
  const __m256 absmask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
  const __m256 s = _mm256_and_ps(z, absmask);
  const __m256 neg = _mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_LT_OQ);
  const __m256 ss = _mm256_mul_ps(s, s);
  const __m256 ssl = _mm256_fmsub_ps(s, s, ss);
  const __m256 xh = _mm256_mul_ps(set1(-0.5f), ss);
  const __m256 kmag = _mm256_fmadd_ps(xh, set1(kLog2e), set1(kRoundMagic));
  const __m256 kf = _mm256_sub_ps(kmag, set1(kRoundMagic));
  const __m256i k = _mm256_sub_epi32(_mm256_castps_si256(kmag), _mm256_castps_si256(set1(kRoundMagic)));
  const __m256 rh = _mm256_fmadd_ps(_mm256_xor_ps(kf, set1(-0.f)), set1(kLn2Hi), xh);
  const __m256 rl = _mm256_fmadd_ps(_mm256_xor_ps(kf, set1(-0.f)), set1(kLn2Lo), _mm256_mul_ps(set1(-0.5f), ssl));
  __m256 q = set1(kExpQ5);
  q = _mm256_fmadd_ps(q, rh, set1(kExpQ4));
  q = _mm256_fmadd_ps(q, rh, set1(kExpQ3));
  q = _mm256_fmadd_ps(q, rh, set1(kExpQ2));
  q = _mm256_fmadd_ps(q, rh, set1(kExpQ1));
  q = _mm256_fmadd_ps(q, rh, set1(kExpQ0));
  const __m256 rh2 = _mm256_mul_ps(rh, rh);
  const __m256 expm1_rh = _mm256_fmadd_ps(rh2, q, rh);
  const __m256 tail = _mm256_fmadd_ps(rh2, q, _mm256_fmadd_ps(rl, expm1_rh, rl));
  const __m256 scale = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(k, _mm256_set1_epi32(127)), 23));
  const __m256 sgn = _mm256_blendv_ps(set1(-1.f), set1(1.f), neg);
  const __m256 base_a = _mm256_andnot_ps(neg, s);
  const __m256 base_d = _mm256_andnot_ps(neg, set1(1.f));
  __m128 alo, ahi, dlo, dhi;
  gelu_fast_half<kDeriv>(_mm256_castps256_ps128(s), _mm256_castps256_ps128(rh), _mm256_castps256_ps128(tail),
                         _mm256_castps256_ps128(scale), _mm256_castps256_ps128(sgn), _mm256_castps256_ps128(base_a),
                         _mm256_castps256_ps128(base_d), alo, dlo);
  gelu_fast_half<kDeriv>(_mm256_extractf128_ps(s, 1), _mm256_extractf128_ps(rh, 1), _mm256_extractf128_ps(tail, 1),
                         _mm256_extractf128_ps(scale, 1), _mm256_extractf128_ps(sgn, 1),
                         _mm256_extractf128_ps(base_a, 1), _mm256_extractf128_ps(base_d, 1), ahi, dhi);
  const __m256 mag = _mm256_insertf128_ps(_mm256_castps128_ps256(alo), ahi, 1);
  a = _mm256_or_ps(mag, _mm256_andnot_ps(absmask, z));  // z's sign: gelu(-0) = -0
  if (kDeriv) d = _mm256_insertf128_ps(_mm256_castps128_ps256(dlo), dhi, 1);
}

// GELU over n elements, 8 at a time: the fast path where |z| <= kGeluFastMax, the general
// element code (vectorised by the compiler over the 8 lanes) for the other lanes of a
// vector that has any; the last n % 8 elements through a zero-padded copy, so every element
// gets the same bits wherever it sits.
template <bool kDeriv>
void run_gelu(const float* z, float* a, float* d, int64_t n) {
  alignas(32) float zb[8], ab[8], db[8], ag[8], dg[8];
  for (int64_t i = 0; i < n; i += 8) {
    const int64_t m = std::min<int64_t>(8, n - i);
    __m256 zv;
    if (m == 8) {
      zv = _mm256_loadu_ps(z + i);
    } else {
      for (int64_t j = 0; j < 8; ++j) zb[j] = j < m ? z[i + j] : 0.f;
      zv = _mm256_load_ps(zb);
    }
    const __m256 fast =
        _mm256_cmp_ps(_mm256_and_ps(zv, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))), set1(kGeluFastMax),
                      _CMP_LE_OQ);  // false for NaN
    __m256 av, dv = _mm256_setzero_ps();
    if (_mm256_movemask_ps(fast) == 0xff) {
      gelu_fast8<kDeriv>(zv, av, dv);
    } else {
      gelu_fast8<kDeriv>(_mm256_and_ps(zv, fast), av, dv);
      _mm256_store_ps(zb, zv);
#pragma omp simd
      for (int64_t j = 0; j < 8; ++j) gelu_one<kDeriv>(zb[j], ag[j], dg[j]);
      av = _mm256_blendv_ps(_mm256_load_ps(ag), av, fast);
      if (kDeriv) dv = _mm256_blendv_ps(_mm256_load_ps(dg), dv, fast);
    }
    if (m == 8) {
      _mm256_storeu_ps(a + i, av);
      if (kDeriv) _mm256_storeu_ps(d + i, dv);
    } else {
      _mm256_store_ps(ab, av);
      _mm256_store_ps(db, dv);
      for (int64_t j = 0; j < m; ++j) {
        a[i + j] = ab[j];
        if (kDeriv) d[i + j] = db[j];
      }
    }
  }
}
#else
// GELU: blocks of kGeluBlock elements take the fast path when all are in its range (one
// test per block); otherwise each element is computed both ways and the result chosen per
// element, so every element gets the same bits wherever it sits (block or remainder).
constexpr int64_t kGeluBlock = 16;

template <bool kDeriv>
CMK_INLINE void gelu_either_one(float z, float& a, float& d) {
  float af, df, ag, dg;
  const bool fast = std::fabs(z) <= kGeluFastMax;  // false for NaN
  gelu_fast_one<kDeriv>(select(fast, z, 0.f), af, df);
  gelu_one<kDeriv>(z, ag, dg);
  a = select(fast, af, ag);
  if (kDeriv) d = select(fast, df, dg);
}

template <bool kDeriv>
void run_gelu(const float* z, float* a, float* d, int64_t n) {
  float unused[kGeluBlock];
  int64_t i = 0;
  for (; i + kGeluBlock <= n; i += kGeluBlock) {
    const float* zi = z + i;
    float* ai = a + i;
    float* di = kDeriv ? d + i : unused;
    int slow = 0;
#pragma omp simd reduction(| : slow)
    for (int64_t j = 0; j < kGeluBlock; ++j) slow |= static_cast<int>(!(std::fabs(zi[j]) <= kGeluFastMax));
    if (!slow) {
#pragma omp simd
      for (int64_t j = 0; j < kGeluBlock; ++j) {
        float aj, dj;
        gelu_fast_one<kDeriv>(zi[j], aj, dj);
        ai[j] = aj;
        if (kDeriv) di[j] = dj;
      }
    } else {
#pragma omp simd
      for (int64_t j = 0; j < kGeluBlock; ++j) {
        float aj, dj;
        gelu_either_one<kDeriv>(zi[j], aj, dj);
        ai[j] = aj;
        if (kDeriv) di[j] = dj;
      }
    }
  }
#pragma omp simd
  for (int64_t j = i; j < n; ++j) {
    float aj, dj;
    gelu_either_one<kDeriv>(z[j], aj, dj);
    a[j] = aj;
    if (kDeriv) d[j] = dj;
  }
}
#endif

}  // namespace
}  // namespace cpu
}  // namespace convmixer_kernels
