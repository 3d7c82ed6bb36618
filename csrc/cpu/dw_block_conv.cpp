// The 'same' depthwise convolution of a tile (dw_block_conv.h): register blocks of 2 rows x
// PX pixels x CB channels (AVX2), or 2 rows x PX512 pixels with 2 pixels per vector
// (AVX-512); taps unrolled for k = 3, 5, 7, 9, a run-time loop for other k.
#include "dw_block_conv.h"

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>

#include "activation.h"
#include "simd.h"

namespace convmixer_kernels {
namespace cpu {
namespace dw {
namespace {

static_assert(kV8Lanes == CB, "one V8 holds the CB channels of a pixel");

// Register block: 2 output rows x PX pixels x CB channels (8 independent FMA chains).
// out(h + r, w0 + q) = bias + sum_{i,j} P(h + r + i, w0 + q + j) * wt(i, j); K > 0 is the
// kernel size as a compile-time constant (taps fully unrolled, so overlapping loads of
// neighbouring taps are shared), K == 0 the generic run-time loop.
template <int K, int ROWS>
inline void conv_block(const float* P, int64_t Wp, int64_t k, const float* wt, V8 bias, int64_t h,
                       int64_t w0, float* out, int64_t out_rs, int64_t nw) {
  const int64_t kk = K > 0 ? K : k;
  V8 acc[ROWS][PX];
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < PX; ++q) acc[r][q] = bias;
  for (int64_t i = 0; i < kk; ++i) {
    const float* wrow = wt + i * kk * CB;
    for (int64_t j = 0; j < kk; ++j) {
      const V8 wv = vload(wrow + j * CB);
      for (int r = 0; r < ROWS; ++r) {
        const float* in = P + ((h + r + i) * Wp + w0 + j) * CB;
        for (int q = 0; q < PX; ++q) acc[r][q] = vfma(vload(in + q * CB), wv, acc[r][q]);
      }
    }
  }
  // The constant count with a test (GCC turns a loop to nw into a memcpy call from acc
  // spilled to the stack).
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < PX; ++q)
      if (q < nw) vstore(out + ((h + r) * out_rs + w0 + q) * CB, acc[r][q]);
}

// out (H x W x CB, row stride out_rs) = 'same' conv of the padded tile buffer P with the
// packed weights wt (k*k x CB) plus bias.
template <int K>
void conv_tile_k(const float* P, const Plane& g, const float* wt, const float* bias, float* out, int64_t out_rs) {
  const V8 b = vload(bias);
  // Row pairs outer, pixels inner: the k + 1 input rows a pair reads stay in L1 while it
  // sweeps W, and k - 1 of them are reused by the next pair.
  int64_t h = 0;
  for (; h + 2 <= g.H; h += 2)
    for (int64_t w0 = 0; w0 < g.W; w0 += PX)
      conv_block<K, 2>(P, g.Wp, g.k, wt, b, h, w0, out, out_rs, std::min(PX, g.W - w0));
  if (h < g.H)
    for (int64_t w0 = 0; w0 < g.W; w0 += PX)
      conv_block<K, 1>(P, g.Wp, g.k, wt, b, h, w0, out, out_rs, std::min(PX, g.W - w0));
}

#if defined(__GNUC__) && defined(__x86_64__) && defined(__AVX2__) && defined(__FMA__)
// AVX-512 version of conv_tile_k (used where use_avx512() says so): one vector holds the CB
// channels of 2 neighbouring pixels, a register block is ROWS rows x PX512 pixels. Each
// output is bias + the taps in the same order with the same FMAs as the AVX2 code: the
// same bits.
#define CMK_DW_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12, its own avx512 intrinsics
#pragma GCC diagnostic ignored "-Wuninitialized"
namespace avx512 {

constexpr int NV = PX512 / 2;  // vectors per row of a register block

inline __m512 dup8(const float* p) {  // the CB floats at p, in both halves
  return _mm512_castpd_ps(_mm512_broadcast_f64x4(_mm256_castps_pd(_mm256_loadu_ps(p))));
}

// Stores a register block's ROWS x NV vectors (2 pixels each), only the nw pixels inside W.
template <int ROWS>
inline void store_block(const __m512 (&acc)[ROWS][NV], float* out, int64_t out_rs, int64_t h, int64_t w0,
                        int64_t nw) {
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < NV; ++q) {
      float* o = out + ((h + r) * out_rs + w0 + 2 * q) * CB;
      if (2 * q + 2 <= nw) {
        _mm512_storeu_ps(o, acc[r][q]);
      } else if (2 * q < nw) {
        _mm512_mask_storeu_ps(o, static_cast<__mmask16>(0x00ff), acc[r][q]);
      }
    }
}

// The same sums for a compile-time K, one padded input row at a time. A row's vectors at
// the even pixel offsets (aligned) and the odd ones are loaded once and serve every tap j and
// every output row r of the block (tap row i = row - r), instead of one load per (tap,
// pixel) with half of them splitting cache lines. Each accumulator still gets its taps in (i, j) order: the
// same bits as conv_block's run-time loop.
template <int K, int ROWS>
inline void conv_block_rows(const float* P, int64_t Wp, const float* wt, __m512 bias, int64_t h,
                            int64_t w0, float* out, int64_t out_rs, int64_t nw) {
  constexpr int NE = (K - 1) / 2 + NV;  // even offsets 0, 2, .., K - 1 + 2 (NV - 1)
  constexpr int NO = (K - 1) / 2 + NV - 1;  // odd offsets 1, 3, .., K - 2 + 2 (NV - 1)
  __m512 acc[ROWS][NV];
  for (int r = 0; r < ROWS; ++r)
    for (int q = 0; q < NV; ++q) acc[r][q] = bias;
  for (int ii = 0; ii < K + ROWS - 1; ++ii) {
    const float* in = P + ((h + ii) * Wp + w0) * CB;
    __m512 E[NE], O[NO > 0 ? NO : 1];
    for (int m = 0; m < NE; ++m) E[m] = _mm512_loadu_ps(in + 2 * m * CB);
    for (int m = 0; m < NO; ++m) O[m] = _mm512_loadu_ps(in + (2 * m + 1) * CB);
    for (int r = 0; r < ROWS; ++r) {
      const int i = ii - r;
      if (i < 0 || i >= K) continue;
      const float* wrow = wt + i * K * CB;
      for (int j = 0; j < K; ++j) {
        const __m512 wv = dup8(wrow + j * CB);
        for (int q = 0; q < NV; ++q)
          acc[r][q] = _mm512_fmadd_ps((j % 2 == 0) ? E[j / 2 + q] : O[j / 2 + q], wv, acc[r][q]);
      }
    }
  }
  store_block<ROWS>(acc, out, out_rs, h, w0, nw);
}

// Register block of ROWS rows x NV vectors: conv_block_rows for K > 0, else a run-time
// loop over the k x k taps (one load per tap and pixel pair).
template <int K, int ROWS>
inline void conv_block(const float* P, int64_t Wp, int64_t k, const float* wt, __m512 bias, int64_t h,
                       int64_t w0, float* out, int64_t out_rs, int64_t nw) {
  if constexpr (K > 0) {
    conv_block_rows<K, ROWS>(P, Wp, wt, bias, h, w0, out, out_rs, nw);
  } else {
    __m512 acc[ROWS][NV];
    for (int r = 0; r < ROWS; ++r)
      for (int q = 0; q < NV; ++q) acc[r][q] = bias;
    for (int64_t i = 0; i < k; ++i) {
      const float* wrow = wt + i * k * CB;
      for (int64_t j = 0; j < k; ++j) {
        const __m512 wv = dup8(wrow + j * CB);
        for (int r = 0; r < ROWS; ++r) {
          const float* in = P + ((h + r + i) * Wp + w0 + j) * CB;
          for (int q = 0; q < NV; ++q)
            acc[r][q] = _mm512_fmadd_ps(_mm512_loadu_ps(in + q * 2 * CB), wv, acc[r][q]);
        }
      }
    }
    store_block<ROWS>(acc, out, out_rs, h, w0, nw);
  }
}

template <int K>
void conv_tile_k(const float* P, const Plane& g, const float* wt, const float* bias, float* out, int64_t out_rs) {
  const __m512 b = dup8(bias);
  int64_t h = 0;
  for (; h + 2 <= g.H; h += 2)
    for (int64_t w0 = 0; w0 < g.W; w0 += PX512)
      conv_block<K, 2>(P, g.Wp, g.k, wt, b, h, w0, out, out_rs, std::min(PX512, g.W - w0));
  if (h < g.H)
    for (int64_t w0 = 0; w0 < g.W; w0 += PX512)
      conv_block<K, 1>(P, g.Wp, g.k, wt, b, h, w0, out, out_rs, std::min(PX512, g.W - w0));
}

void conv_tile(const float* P, const Plane& g, const float* wt, const float* bias, float* out, int64_t out_rs) {
  switch (g.k) {
    case 3: return avx512::conv_tile_k<3>(P, g, wt, bias, out, out_rs);
    case 5: return avx512::conv_tile_k<5>(P, g, wt, bias, out, out_rs);
    case 7: return avx512::conv_tile_k<7>(P, g, wt, bias, out, out_rs);
    case 9: return avx512::conv_tile_k<9>(P, g, wt, bias, out, out_rs);
    default: return avx512::conv_tile_k<0>(P, g, wt, bias, out, out_rs);
  }
}

}  // namespace avx512
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif

}  // namespace

void conv_tile(const float* P, const Plane& g, const float* wt, const float* bias, float* out, int64_t out_rs) {
#ifdef CMK_DW_AVX512
  if (use_avx512()) return avx512::conv_tile(P, g, wt, bias, out, out_rs);
#endif
  switch (g.k) {  // common kernel sizes unrolled; the rest through the generic loop
    case 3: return conv_tile_k<3>(P, g, wt, bias, out, out_rs);
    case 5: return conv_tile_k<5>(P, g, wt, bias, out, out_rs);
    case 7: return conv_tile_k<7>(P, g, wt, bias, out, out_rs);
    case 9: return conv_tile_k<9>(P, g, wt, bias, out, out_rs);
    default: return conv_tile_k<0>(P, g, wt, bias, out, out_rs);
  }
}

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
