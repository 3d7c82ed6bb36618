// The depthwise weight gradient of a tile (dw_block_conv.h): per tap, sums over the tile
// of dz times the shifted padded input, in registers (float32) and then float64. AVX-512
// (2 pixels per vector, pixel pairs summed first: the same to rounding) where use_avx512()
// says so, else AVX2.
#include "dw_block_conv.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "activation.h"
#include "simd.h"

namespace convmixer_kernels {
namespace cpu {
namespace dw {
namespace {

#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
// AVX-512 version of wgrad_tile (used where use_avx512() says so).
#define CMK_DW_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, its own avx512 intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace avx512 {

// acc[j] += D(w) P(w + j) for the pixel pairs from w on (prow: the padded input row at tap
// offset 0, drow: the dy row); an odd last pixel with a masked FMA (no 0 * inf). P has at
// least k - 1 padding pixels after W, so the full loads stay inside it.
template <int J>
inline void wgrad_pairs(const float* prow, const float* drow, int64_t w, int64_t W, __m512 (&acc)[J]) {
  for (; w + 2 <= W; w += 2) {
    const __m512 d = _mm512_loadu_ps(drow + w * CB);
    for (int j = 0; j < J; ++j) acc[j] = _mm512_fmadd_ps(d, _mm512_loadu_ps(prow + (w + j) * CB), acc[j]);
  }
  if (w < W) {
    const __mmask16 lo = 0x00ff;
    const __m512 d = _mm512_maskz_loadu_ps(lo, drow + w * CB);
    for (int j = 0; j < J; ++j) acc[j] = _mm512_mask3_fmadd_ps(d, _mm512_loadu_ps(prow + (w + j) * CB), acc[j], lo);
  }
}

// dw[j * CB + cc] += the two halves of acc[j] summed.
template <int J>
inline void wgrad_flush(const __m512 (&acc)[J], double* dw) {
  for (int j = 0; j < J; ++j) {
    float tmp[CB];
    const __m256 lo = _mm512_castps512_ps256(acc[j]);
    const __m256 hi = _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(acc[j]), 1));
    _mm256_storeu_ps(tmp, _mm256_add_ps(lo, hi));
    for (int cc = 0; cc < CB; ++cc) dw[j * CB + cc] += tmp[cc];
  }
}

// The AVX2 wgrad_taps (below) on 2 pixels per vector: dw(i, j) += sum_{h,w} D(h, w) P(h + i,
// w + j) for taps j in [j0, j0 + J), the two halves summed at the end.
template <int J>
void wgrad_taps(const float* P, const Plane& g, const float* D, int64_t i, int64_t j0, double* dw) {
  __m512 acc[J];
  for (int j = 0; j < J; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < g.H; ++h) wgrad_pairs<J>(P + ((h + i) * g.Wp + j0) * CB, D + h * g.W * CB, 0, g.W, acc);
  wgrad_flush<J>(acc, dw + ((i * g.k) + j0) * CB);
}

// wgrad_taps<K> over all K taps of tap row i for a compile-time K, 4 pixel pairs (8 pixels)
// at a time: the pairs' dy vectors and the padded input row's vectors at the even (aligned)
// and odd pixel offsets are loaded once and serve every tap, instead of one load per (tap,
// pair) with half of them splitting cache lines. Each tap still gets its pairs in order:
// the same bits as wgrad_taps.
template <int K>
void wgrad_row(const float* P, const Plane& g, const float* D, int64_t i, double* dw) {
  constexpr int M = 4;                     // pixel pairs per step
  constexpr int NE = M + (K - 1) / 2;      // even offsets 0, 2, .., 2 (NE - 1)
  constexpr int NO = M + (K - 1) / 2 - 1;  // odd offsets 1, 3, .., 2 NO - 1
  __m512 acc[K];
  for (int j = 0; j < K; ++j) acc[j] = _mm512_setzero_ps();
  for (int64_t h = 0; h < g.H; ++h) {
    const float* prow = P + (h + i) * g.Wp * CB;
    const float* drow = D + h * g.W * CB;
    int64_t w = 0;
    for (; w + 2 * M <= g.W; w += 2 * M) {
      __m512 d[M], E[NE], O[NO];
      for (int m = 0; m < M; ++m) d[m] = _mm512_loadu_ps(drow + (w + 2 * m) * CB);
      for (int q = 0; q < NE; ++q) E[q] = _mm512_loadu_ps(prow + (w + 2 * q) * CB);
      for (int q = 0; q < NO; ++q) O[q] = _mm512_loadu_ps(prow + (w + 2 * q + 1) * CB);
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < K; ++j)
          acc[j] = _mm512_fmadd_ps(d[m], (j % 2 == 0) ? E[m + j / 2] : O[m + j / 2], acc[j]);
    }
    wgrad_pairs<K>(prow, drow, w, g.W, acc);
  }
  wgrad_flush<K>(acc, dw + i * g.k * CB);
}

void wgrad_tile(const float* P, const Plane& g, const float* D, double* dw) {
  for (int64_t i = 0; i < g.k; ++i) {
    switch (g.k) {
      case 3: wgrad_row<3>(P, g, D, i, dw); continue;
      case 5: wgrad_row<5>(P, g, D, i, dw); continue;
      case 7: wgrad_row<7>(P, g, D, i, dw); continue;
      case 9: wgrad_row<9>(P, g, D, i, dw); continue;
      default: break;
    }
    int64_t j0 = 0;
    for (; j0 + 8 <= g.k; j0 += 8) avx512::wgrad_taps<8>(P, g, D, i, j0, dw);
    for (; j0 + 4 <= g.k; j0 += 4) avx512::wgrad_taps<4>(P, g, D, i, j0, dw);
    for (; j0 < g.k; ++j0) avx512::wgrad_taps<1>(P, g, D, i, j0, dw);
  }
}

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

// dw(i, j) += sum_{h,w} D(h, w) * P(h + i, w + j) per channel, for taps j in [j0, j0 + J),
// J accumulators in registers; D is H x W x CB (row stride W), P the padded input.
template <int J>
void wgrad_taps(const float* P, const Plane& g, const float* D, int64_t i, int64_t j0, double* dw) {
  V8 acc[J];
  for (int j = 0; j < J; ++j) acc[j] = vzero();
  for (int64_t h = 0; h < g.H; ++h) {
    const float* prow = P + ((h + i) * g.Wp + j0) * CB;
    const float* drow = D + h * g.W * CB;
    for (int64_t w = 0; w < g.W; ++w) {
      const V8 d = vload(drow + w * CB);
      for (int j = 0; j < J; ++j) acc[j] = vfma(d, vload(prow + (w + j) * CB), acc[j]);
    }
  }
  for (int j = 0; j < J; ++j) {
    float tmp[CB];
    vstore(tmp, acc[j]);
    for (int cc = 0; cc < CB; ++cc) dw[((i * g.k) + j0 + j) * CB + cc] += tmp[cc];
  }
}

}  // namespace

void wgrad_tile(const float* P, const Plane& g, const float* D, double* dw) {
#ifdef CMK_DW_AVX512
  if (use_avx512()) return avx512::wgrad_tile(P, g, D, dw);
#endif
  for (int64_t i = 0; i < g.k; ++i) {
    int64_t j0 = 0;
    for (; j0 + 8 <= g.k; j0 += 8) wgrad_taps<8>(P, g, D, i, j0, dw);
    for (; j0 + 4 <= g.k; j0 += 4) wgrad_taps<4>(P, g, D, i, j0, dw);
    for (; j0 < g.k; ++j0) wgrad_taps<1>(P, g, D, i, j0, dw);
  }
}

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
