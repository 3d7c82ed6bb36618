// Fused CPU kernels of the residual depthwise block
//   out = x + BN(act(dwconv_k(x) + b)),  k odd, 'same' zero padding
// registered as the CPU implementation of convmixer_kernels::dw_block_{forward,backward}_kernel
// (schemas in csrc/extension.cpp, semantics in convmixer_kernels/reference.py).
//
// Work unit: a tile of CB = 8 channels of one image. Each tile is read once, in the loop
// order its strides favour (8 contiguous channels per pixel for channels_last, rows for
// NCHW, float32 NCHW rows 8 pixels x 8 channels at a time through an in-register transpose;
// any strided view works), into a zero-padded, channel-interleaved float32 buffer
// that stays in L1/L2, so one AVX2 vector holds the 8 channels of a pixel. The k x k taps
// then run branch-free over it with 2 rows x 4 pixels of outputs in registers (taps
// unrolled for k = 3, 5, 7, 9; a run-time loop for other k).
// Where the CPU has AVX-512 (use_avx512(), activation.h; CONVMIXER_KERNELS_CPU_ISA=avx2
// forces the AVX2 code) the conv and the weight gradient run on 16-float vectors holding 2
// neighbouring pixels (2 rows x 8 pixels per register block); the conv gives the same bits
// as the AVX2 code, the weight gradient sums pixel pairs first (same to rounding).
// Training forward and backward run in channel-group order where there are enough channels
// (group_subs()): a thread takes a group of channels through all N images and keeps, in its
// own buffers, act(z) (forward; in L2) or act(z), act'(z) and dy (backward) between the
// statistics step and the normalise / gradient step, so z, dy and the activation are
// loaded or evaluated once per element. Otherwise (few channels, large planes) image
// order: training forward keeps act(z) of every tile in a float32 buffer of the
// activation's size between two passes; the backward's two passes each load z and dy.
// Each sub-block's act(z) is computed (and its statistics taken) right after its conv, while
// it is in L1. Results go back through the same layout-aware tile writer; for channels_last
// tiles the last step (x + act(z) * scale + shift, or dx = conv + dy) is fused with the
// write, one pixel at a time (write_tile_cl), with x taken from the input or the tile buffer
// instead of being read into a tile buffer again. Per-thread buffers come from a per-thread
// pool kept between calls (Buf: at most 8 MiB per thread), not from the system at every
// call. Statistics and weight gradients are reduced per (n, c) plane and then over n in a
// fixed order, so results do not depend on the number of threads (deterministic for a
// given input).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <type_traits>
#include <utility>
#include <vector>

#include "activation.h"
#include "../common/shape_str.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

constexpr int64_t CB = 8;  // channels per tile: one AVX2 vector of float32
constexpr int64_t PX = 4;  // output pixels per register block along W (AVX2)
constexpr int64_t PX512 = 8;  // the same for the AVX-512 code: 4 vectors of 2 pixels

// Tile buffers are channel-interleaved: element (h, w, cc) of a tile buffer with row
// stride `rs` pixels lives at ((h * rs) + w) * CB + cc, so one vector holds the CB
// channels of a pixel and every tap is an aligned load.
struct Plane {
  int64_t H, W, k, p;
  int64_t Wp;  // pixels per padded row: round_up(W, PX512) + 2p (register blocks may read past W)
  int64_t Hp;  // padded rows: H + 2p
  Plane(int64_t H_, int64_t W_, int64_t k_) : H(H_), W(W_), k(k_), p(k_ / 2) {
    Wp = (W + PX512 - 1) / PX512 * PX512 + 2 * p;
    Hp = H + 2 * p;
  }
  int64_t size() const { return Hp * Wp * CB; }                      // floats of a padded buffer
  // Strides between the sub-blocks of a tile's buffers (padded, and H x W x CB): 64 bytes more
  // than the data, so that sub-blocks sized in whole 4 KiB pages (32 x 32 x 8 floats is) do
  // not map a pixel of every sub-block to the same L1 set.
  int64_t sub() const { return size() + 16; }
  int64_t zsub() const { return H * W * CB + 16; }
  int64_t interior() const { return (p * Wp + p) * CB; }            // offset of element (0, 0)
};

struct Strides4 {
  int64_t n, c, h, w;
  explicit Strides4(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// A tile: channels [c0, c0 + cb) of image n, held as subs() sub-blocks of CB channels, sub-block
// j in its own buffer (buffer j at offset j * sub floats); channels of a last, partial
// sub-block past cb are left as they are (every channel is computed on its own, so whatever
// they hold never reaches a real channel).
// Up to kMaxSubs sub-blocks per tile (tile_subs()): a channels_last tile then reads and writes
// runs of whole cache lines per pixel (64 float32 channels: 4 lines) instead of half a line,
// pixels lie C floats apart, and one tile's lines no longer compete with the next tile's.
constexpr int64_t kMaxSubs = 8;
constexpr int64_t kPrefetch = 16;  // pixels ahead that the channels_last reader/writer prefetch

// Sub-blocks per tile: for channels_last (interleaved) inputs the most (up to kMaxSubs) that
// still leave at least 4 tiles per thread and keep a tile's padded input within 4 MiB (large
// planes gain nothing from more); 1 for NCHW, whose planes are contiguous anyway. The result
// does not depend on it (channels are independent, reductions per (n, c) plane).
inline int64_t tile_subs(int64_t N, int64_t C, int64_t plane_floats, bool interleaved) {
  if (!interleaved) return 1;
  const int64_t blocks = (C + CB - 1) / CB, want = 4 * static_cast<int64_t>(at::get_num_threads());
  constexpr int64_t kTileFloats = int64_t(1) << 20;
  int64_t ns = kMaxSubs;
  while (ns > 1 && (N * ((blocks + ns - 1) / ns) < want || ns * plane_floats > kTileFloats)) ns /= 2;
  return ns;
}
// Sub-blocks per channel group of a channel-group order (training forward and backward), or 0
// where the image order runs instead: there must be at least 2 groups per thread, and a
// group's buffer for all N images (N * HW * CB float32 per sub-block) must fit budget_floats.
// channels_last inputs take up to max_subs sub-blocks (whole cache lines per pixel), NCHW 1.
inline int64_t group_subs(int64_t N, int64_t C, int64_t HW, bool interleaved, int64_t max_subs,
                          int64_t budget_floats) {
  const int64_t blocks = (C + CB - 1) / CB, want = 2 * static_cast<int64_t>(at::get_num_threads());
  for (int64_t ns = interleaved ? max_subs : 1; ns >= 1; ns /= 2)
    if (ns * CB * N * HW <= budget_floats && (blocks + ns - 1) / ns >= want) return ns;
  return 0;
}

struct Tile {
  int64_t n, c0, cb;
  int64_t subs() const { return (cb + CB - 1) / CB; }
  int64_t sub_channels(int64_t j) const { return std::min(CB, cb - j * CB); }
};
#if defined(__AVX2__) && defined(__FMA__)
// In-register transpose of an 8 x 8 float block (r[i][j] <-> r[j][i]).
inline void transpose8(__m256 (&r)[8]) {
  __m256 t[8], u[8];
  for (int i = 0; i < 8; i += 2) {
    t[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
    t[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
  }
  for (int i = 0; i < 8; i += 4) {
    u[i] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 1] = _mm256_shuffle_ps(t[i], t[i + 2], _MM_SHUFFLE(3, 2, 3, 2));
    u[i + 2] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(1, 0, 1, 0));
    u[i + 3] = _mm256_shuffle_ps(t[i + 1], t[i + 3], _MM_SHUFFLE(3, 2, 3, 2));
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
    r[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
  }
}

// Whether a float32 tile with strides s can take the 8 x 8 transposing NCHW paths of
// read_tile / write_tile (rows of W contiguous floats, whole 8-channel sub-blocks).
inline bool nchw_rows(const Strides4& s, const Tile& t) { return s.w == 1 && s.c != 1 && t.cb % CB == 0; }
#endif

template <typename scalar_t>
inline float round_to(float v) {  // the value a float32 has once stored in scalar_t
  return static_cast<float>(static_cast<scalar_t>(v));
}

// dst[j * sub + ((h * rs) + w) * CB + cc] = src[n, c0 + j * CB + cc, h, w].
template <typename scalar_t>
void read_tile(const scalar_t* src, const Strides4& s, const Tile& t, int64_t H, int64_t W, float* dst,
               int64_t rs, int64_t sub) {
  const scalar_t* base = src + t.n * s.n + t.c0 * s.c;
  if (s.c == 1 && t.cb % CB == 0) {  // channels_last: cb contiguous channels per pixel
    const int64_t nj = t.cb / CB, line_bytes = t.cb * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const scalar_t* px = base + h * s.h + w * s.w;
        // Pixels lie C channels apart, too far apart for the hardware prefetchers: fetch
        // ahead (a prefetch never faults, so running past the tensor is harmless).
        const char* ahead = reinterpret_cast<const char*>(px + kPrefetch * s.w);
        for (int64_t l = 0; l < line_bytes; l += 64) __builtin_prefetch(ahead + l);
        float* d = dst + (h * rs + w) * CB;
        for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
          for (int64_t cc = 0; cc < CB; ++cc) d[j * sub + cc] = static_cast<float>(px[j * CB + cc]);
      }
    return;
  }
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (nchw_rows(s, t)) {  // 8 pixels of the 8 channel rows at a time, transposed
      for (int64_t j = 0; j < t.cb / CB; ++j)
        for (int64_t h = 0; h < H; ++h) {
          const float* in = base + j * CB * s.c + h * s.h;
          float* d = dst + j * sub + h * rs * CB;
          int64_t w = 0;
          for (; w + 8 <= W; w += 8) {
            __m256 r[8];
            for (int cc = 0; cc < 8; ++cc) r[cc] = _mm256_loadu_ps(in + cc * s.c + w);
            transpose8(r);
            for (int i = 0; i < 8; ++i) _mm256_storeu_ps(d + (w + i) * CB, r[i]);
          }
          for (; w < W; ++w)
            for (int64_t cc = 0; cc < CB; ++cc) d[w * CB + cc] = in[cc * s.c + w];
        }
      return;
    }
  }
#endif
  for (int64_t c = 0; c < t.cb; ++c)
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* in = base + c * s.c + h * s.h;
      float* d = dst + (c / CB) * sub + h * rs * CB + c % CB;
      for (int64_t w = 0; w < W; ++w) d[w * CB] = static_cast<float>(in[w * s.w]);
    }
}

// The inverse of read_tile (rounding to scalar_t); only the tile's cb channels are written.
template <typename scalar_t>
void write_tile(scalar_t* dst, const Strides4& s, const Tile& t, int64_t H, int64_t W, const float* src,
                int64_t rs, int64_t sub) {
  scalar_t* base = dst + t.n * s.n + t.c0 * s.c;
  if (s.c == 1 && t.cb % CB == 0) {
    const int64_t nj = t.cb / CB, line_bytes = t.cb * static_cast<int64_t>(sizeof(scalar_t));
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        scalar_t* px = base + h * s.h + w * s.w;
        char* ahead = reinterpret_cast<char*>(px + kPrefetch * s.w);
        for (int64_t l = 0; l < line_bytes; l += 64) __builtin_prefetch(ahead + l, 1);
        const float* v = src + (h * rs + w) * CB;
        for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
          for (int64_t cc = 0; cc < CB; ++cc) px[j * CB + cc] = static_cast<scalar_t>(v[j * sub + cc]);
      }
    return;
  }
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same<scalar_t, float>::value) {
    if (nchw_rows(s, t)) {  // 8 pixels of the 8 channels at a time, transposed
      for (int64_t j = 0; j < t.cb / CB; ++j)
        for (int64_t h = 0; h < H; ++h) {
          float* out = base + j * CB * s.c + h * s.h;
          const float* v = src + j * sub + h * rs * CB;
          int64_t w = 0;
          for (; w + 8 <= W; w += 8) {
            __m256 r[8];
            for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(v + (w + i) * CB);
            transpose8(r);
            for (int cc = 0; cc < 8; ++cc) _mm256_storeu_ps(out + cc * s.c + w, r[cc]);
          }
          for (; w < W; ++w)
            for (int64_t cc = 0; cc < CB; ++cc) out[cc * s.c + w] = v[w * CB + cc];
        }
      return;
    }
  }
#endif
  for (int64_t c = 0; c < t.cb; ++c)
    for (int64_t h = 0; h < H; ++h) {
      scalar_t* out = base + c * s.c + h * s.h;
      const float* v = src + (c / CB) * sub + h * rs * CB + c % CB;
      for (int64_t w = 0; w < W; ++w) out[w * s.w] = static_cast<scalar_t>(v[w * CB]);
    }
}

// write_tile for a channels_last tile (dst's channel stride 1, cb a multiple of CB) whose
// values come from pixel(h, w, v), which leaves the tile's cb floats of pixel (h, w) in v
// (sub-block j at v + j * CB): the last step of a tile (residual, normalise) fused with the
// write, one pixel at a time, instead of a pass through a tile buffer.
template <typename scalar_t, typename PixelFn>
void write_tile_cl(scalar_t* dst, const Strides4& s, const Tile& t, int64_t H, int64_t W, PixelFn&& pixel) {
  scalar_t* base = dst + t.n * s.n + t.c0 * s.c;
  const int64_t line_bytes = t.cb * static_cast<int64_t>(sizeof(scalar_t));
  alignas(64) float v[kMaxSubs * CB];
  for (int64_t h = 0; h < H; ++h)
    for (int64_t w = 0; w < W; ++w) {
      scalar_t* px = base + h * s.h + w * s.w;
      char* ahead = reinterpret_cast<char*>(px + kPrefetch * s.w);
      for (int64_t l = 0; l < line_bytes; l += 64) __builtin_prefetch(ahead + l, 1);
      if constexpr (std::is_same<scalar_t, float>::value) {
        pixel(h, w, px);  // straight into the output (a copy from v would become a memcpy call)
      } else {
        pixel(h, w, v);
#pragma omp simd
        for (int64_t c = 0; c < t.cb; ++c) px[c] = static_cast<scalar_t>(v[c]);
      }
    }
}

// Whether write_tile_cl can write tile t of a tensor with strides s.
inline bool cl_tile(const Strides4& s, const Tile& t) { return s.c == 1 && t.cb % CB == 0; }

// A vector of CB floats: AVX2 where the build has it, else a plain array the compiler vectorises.
#if defined(__AVX2__) && defined(__FMA__)
struct V8 {
  __m256 v;
};
inline V8 vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline V8 vfma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline V8 vzero() { return {_mm256_setzero_ps()}; }
#else
struct V8 {
  float v[CB];
};
inline V8 vload(const float* p) { V8 r; for (int i = 0; i < CB; ++i) r.v[i] = p[i]; return r; }
inline void vstore(float* p, V8 a) { for (int i = 0; i < CB; ++i) p[i] = a.v[i]; }
inline V8 vfma(V8 a, V8 b, V8 c) { V8 r; for (int i = 0; i < CB; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r; }
inline V8 vzero() { V8 r; for (int i = 0; i < CB; ++i) r.v[i] = 0.f; return r; }
#endif

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

// Per-channel vectors padded to whole tiles (blocks * CB entries, zeros past C).
struct Affine {
  std::vector<float> scale, shift, invstd, gamma, mean;
};

// Channel c's entries from its mean, variance, BN weight (gamma) and bias (beta).
inline void set_affine(Affine& a, int64_t c, float mean, float var, float gamma, float beta, double eps) {
  const float invstd = 1.0f / std::sqrt(var + static_cast<float>(eps));
  a.invstd[c] = invstd;
  a.gamma[c] = gamma;
  a.mean[c] = mean;
  a.scale[c] = invstd * gamma;
  a.shift[c] = beta - mean * invstd * gamma;
}

Affine make_affine(const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_w,
                   const c10::optional<at::Tensor>& bn_b, double eps, int64_t padded) {
  const int64_t C = mean.numel();
  Affine a;
  a.scale.assign(padded, 0.f);
  a.shift.assign(padded, 0.f);
  a.invstd.assign(padded, 0.f);
  a.gamma.assign(padded, 0.f);
  a.mean.assign(padded, 0.f);
  const at::Tensor mf = mean.to(at::kFloat).contiguous(), vf = var.to(at::kFloat).contiguous();
  const float* m = mf.data_ptr<float>();
  const float* v = vf.data_ptr<float>();
  at::Tensor wf = bn_w.has_value() ? bn_w->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bf = bn_b.has_value() ? bn_b->to(at::kFloat).contiguous() : at::Tensor();
  for (int64_t c = 0; c < C; ++c)
    set_affine(a, c, m[c], v[c], wf.defined() ? wf.data_ptr<float>()[c] : 1.0f,
               bf.defined() ? bf.data_ptr<float>()[c] : 0.0f, eps);
  return a;
}

// Weights packed per tile: (blocks, k*k, CB) float32, zeros for missing channels; `flip`
// rotates the kernel by 180 degrees (the input gradient is a 'same' conv with it).
at::Tensor pack_weights(const at::Tensor& weight, int64_t C, int64_t k, bool flip) {
  const int64_t blocks = (C + CB - 1) / CB, kk = k * k;
  at::Tensor wf = weight.to(at::kFloat).reshape({C, kk});
  if (flip) wf = wf.flip({1});
  at::Tensor full = at::zeros({blocks * CB, kk}, wf.options());
  full.narrow(0, 0, C).copy_(wf);
  return full.view({blocks, CB, kk}).transpose(1, 2).contiguous();
}

// Each thread buffers whole padded planes of CB channels (float32); refuse planes whose
// buffers would not fit in memory with a message saying so, instead of std::bad_alloc.
void check_plane_fits(const Plane& g) {
  constexpr int64_t kMaxBufferFloats = int64_t(1) << 28;  // 1 GiB per buffer
  TORCH_CHECK_VALUE(g.size() <= kMaxBufferFloats, "x: planes of ", g.H, "x", g.W,
                    " are too large for the cpu depthwise kernel, which buffers a padded plane of ", CB,
                    " channels per thread (", g.size() * 4 / (1 << 20), " MiB per buffer, limit ",
                    kMaxBufferFloats * 4 / (1 << 20), " MiB); use backend='reference' for them");
}

std::vector<float> pad_channels(const c10::optional<at::Tensor>& t, int64_t C, int64_t padded) {
  std::vector<float> out(padded, 0.f);
  if (t.has_value()) {
    const at::Tensor f = t->to(at::kFloat).contiguous();
    std::copy(f.data_ptr<float>(), f.data_ptr<float>() + C, out.begin());
  }
  return out;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* where) {
  TORCH_CHECK(x.device().is_cpu(), where, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, where, ": x must be 4-D (N, C, H, W), got ", shape_str(x.sizes()));
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, where,
              ": x must be float32, bfloat16 or float16 (float64 runs on the reference backend), got ", st);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              where, ": weight must be (C, 1, k, k) with k odd and C = x.size(1), got ", shape_str(weight.sizes()));
}

at::MemoryFormat output_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// Batch mean and biased variance of channel c from its per-(n, c) means and M2s (entry
// n * stride + c, planes of `count` pixels), combined over n in a fixed order (Chan et al.).
inline std::pair<float, float> channel_stats(const double* pmean, const double* pm2, int64_t N, int64_t stride,
                                             int64_t c, int64_t count) {
  double mu = 0.0, M2 = 0.0, n_acc = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const double nb = static_cast<double>(count), mb = pmean[n * stride + c], m2b = pm2[n * stride + c];
    const double tot = n_acc + nb, delta = mb - mu;
    mu += delta * nb / tot;
    M2 += m2b + delta * delta * n_acc * nb / tot;
    n_acc = tot;
  }
  return {static_cast<float>(mu), static_cast<float>(M2 / n_acc)};
}

// A float buffer of one thread, taken from (and given back to) that thread's pool, so that
// buffers of MiBs are not taken from the system at every call: fresh memory costs a page
// fault per 4 KiB page when first written (about 1700 per forward + backward at N=8, C=256,
// 32 x 32, several % of its time). A pool keeps at most kPoolKeep floats (8 MiB) between
// calls; larger buffers go back to the system. Contents are unspecified unless `zero`.
constexpr size_t kPoolKeep = size_t(1) << 21;

class Buf {
 public:
  Buf(int64_t n, bool zero) {
    if (n == 0) return;
    auto& pool = thread_pool();
    size_t best = pool.size();  // the smallest pooled buffer that is large enough
    for (size_t i = 0; i < pool.size(); ++i)
      if (pool[i].size() >= static_cast<size_t>(n) && (best == pool.size() || pool[i].size() < pool[best].size()))
        best = i;
    if (best < pool.size()) {
      v_.swap(pool[best]);
      pool.erase(pool.begin() + static_cast<std::ptrdiff_t>(best));
    } else {
      v_.resize(static_cast<size_t>(n));
    }
    if (zero) std::fill_n(v_.data(), n, 0.f);
  }
  ~Buf() {
    if (v_.empty()) return;
    auto& pool = thread_pool();
    pool.push_back(std::move(v_));
    // keep the largest buffers within kPoolKeep floats
    std::sort(pool.begin(), pool.end(), [](const auto& a, const auto& b) { return a.size() > b.size(); });
    size_t kept = 0, i = 0;
    for (; i < pool.size() && kept + pool[i].size() <= kPoolKeep; ++i) kept += pool[i].size();
    pool.resize(i);
  }
  Buf(const Buf&) = delete;
  Buf& operator=(const Buf&) = delete;
  float* data() { return v_.data(); }

 private:
  static std::vector<std::vector<float>>& thread_pool() {
    thread_local std::vector<std::vector<float>> pool;
    return pool;
  }
  std::vector<float> v_;
};

// Scratch buffers of one thread for one parallel chunk. The padded ones (P, DZ) are zeroed
// and their borders stay zero, because tiles only ever write their interiors. Every buffer
// holds ns sub-blocks: padded ones at a stride of g.sub() floats, the others (H x W x CB
// each) at a stride of g.zsub().
struct Workspace {
  Buf P, Z, A, D, DY, DZ, OUT;
  Workspace(const Plane& g, bool backward, int64_t ns)
      : P(ns * g.sub(), true), Z(ns * g.zsub(), false), A(ns * g.zsub(), false),
        D(backward ? ns * g.zsub() : 0, false), DY(backward ? ns * g.zsub() : 0, false),
        DZ(backward ? ns * g.sub() : 0, true), OUT(ns * g.zsub(), false) {}
};

// Runs fn(tile, block, workspace) for every tile (image n, tile_subs() channel blocks), in
// parallel; block is the index of the tile's first CB-channel block.
template <typename Fn>
void for_each_tile(int64_t N, int64_t C, const Plane& g, bool backward, bool interleaved, Fn fn) {
  const int64_t ns = tile_subs(N, C, g.sub(), interleaved), tc = ns * CB, tiles = (C + tc - 1) / tc;
  at::parallel_for(0, N * tiles, 1, [&](int64_t begin, int64_t end) {
    Workspace ws(g, backward, ns);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / tiles, c0 = (t % tiles) * tc;
      fn(Tile{n, c0, std::min(tc, C - c0)}, c0 / CB, ws);
    }
  });
}

// Per-channel mean and M2 of an interleaved tile buffer of n pixels (double, fixed order).
inline void tile_moments(const float* a, int64_t n, double* mean, double* m2) {
  double s[CB] = {0.0}, q[CB] = {0.0};
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t cc = 0; cc < CB; ++cc) s[cc] += a[i * CB + cc];
  for (int64_t cc = 0; cc < CB; ++cc) mean[cc] = s[cc] / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t cc = 0; cc < CB; ++cc) {
      const double d = a[i * CB + cc] - mean[cc];
      q[cc] += d * d;
    }
  for (int64_t cc = 0; cc < CB; ++cc) m2[cc] = q[cc];
}

template <typename scalar_t>
void round_tile(float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = round_to<scalar_t>(z[i]);
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, Act act, bool save_preact) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const Plane g(H, W, weight.size(2));
  check_plane_fits(g);
  const int64_t kk = g.k * g.k, Cpad = (C + CB - 1) / CB * CB;
  const auto fmt = output_format(x);
  const at::Tensor wpack = pack_weights(weight, C, g.k, false);
  const std::vector<float> bpack = pad_channels(bias, C, Cpad);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  // The saved pre-activation is read only by backward_impl, which takes any strides: float32
  // keeps it NCHW whatever x's layout (its rows go through the 8 x 8 transposing writer and
  // reader; channels_last planes of C floats per pixel cost more to write and read back);
  // other dtypes keep x's layout. The fake of dw_block_forward (ops/_block.py) says the same.
  const auto zfmt = std::is_same<scalar_t, float>::value ? at::MemoryFormat::Contiguous : fmt;
  at::Tensor preact = save_preact ? at::empty(x.sizes(), x.options().memory_format(zfmt)) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  const int64_t blocks = Cpad / CB, HWC = HW * CB, gs = g.sub(), zs = g.zsub();
  const Strides4 sx(x), so(out), sz(save_preact ? preact : out);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const float* wp = wpack.data_ptr<float>();
  Affine aff;
  if (!use_batch_stats) {
    mean.copy_(running_mean->to(at::kFloat));
    var.copy_(running_var->to(at::kFloat));
    aff = make_affine(mean, var, bn_weight, bn_bias, eps, Cpad);
  }
  std::vector<double> pmean(N * Cpad), pm2(N * Cpad);

  // Reads the tile (padded, into P), and leaves act(z) of its sub-block j at A + j * as
  // (z also to preact when saved); post(j) runs as soon as sub-block j's act(z) is there,
  // while it is still in L1.
  auto conv_act = [&](const Tile& t, int64_t b, Workspace& ws, float* A, int64_t as, auto&& post) {
    float *P = ws.P.data(), *Z = ws.Z.data();
    const int64_t nj = t.subs();
    read_tile(xp, sx, t, H, W, P + g.interior(), g.Wp, gs);
    for (int64_t j = 0; j < nj; ++j) {
      conv_tile(P + j * gs, g, wp + (b + j) * kk * CB, bpack.data() + t.c0 + j * CB, Z + j * zs, W);
      round_tile<scalar_t>(Z + j * zs, HWC);
      act_forward(act, Z + j * zs, A + j * as, HWC);
      post(j);
    }
    if (save_preact) write_tile(preact.data_ptr<scalar_t>(), sz, t, H, W, Z, W, zs);
  };
  // Per-(n, c) plane statistics of sub-block j's act(z) (at A + j * as) into pmean / pm2.
  auto plane_moments = [&](const Tile& t, int64_t j, const float* A, int64_t as) {
    double m[CB], q[CB];
    tile_moments(A + j * as, HW, m, q);
    for (int64_t cc = 0; cc < t.sub_channels(j); ++cc) {
      pmean[t.n * Cpad + t.c0 + j * CB + cc] = m[cc];
      pm2[t.n * Cpad + t.c0 + j * CB + cc] = q[cc];
    }
  };
  // OUT's sub-block j = x + act(z) * scale + shift (act(z) at A + j * as, x in P).
  auto normalise_sub = [&](const Tile& t, int64_t j, const float* P, const float* A, int64_t as, float* OUT) {
    const int64_t c0 = t.c0 + j * CB;
    const float* sc = aff.scale.data() + c0;
    const float* sh = aff.shift.data() + c0;
    const float *Pj = P + j * gs + g.interior(), *Aj = A + j * as;
    float* Yj = OUT + j * zs;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const float* xin = Pj + (h * g.Wp + w) * CB;
        const int64_t o = (h * W + w) * CB;
#pragma omp simd
        for (int64_t cc = 0; cc < CB; ++cc) Yj[o + cc] = xin[cc] + Aj[o + cc] * sc[cc] + sh[cc];
      }
  };
  // out = x + act(z) * scale + shift for a channels_last tile straight from x(h, w, j, cc) =
  // xb[h * xh + w * xw + j * xj + cc] (the tensor or the padded tile buffer) and act(z) at A
  // + j * as: normalise_sub and write_tile in one pass, the same arithmetic (same bits).
  auto residual_out = [&](const Tile& t, const auto* xb, int64_t xh, int64_t xw, int64_t xj, const float* A,
                          int64_t as) {
    const int64_t nj = t.subs(), xbytes = t.cb * static_cast<int64_t>(sizeof(*xb));
    const float *sc = aff.scale.data() + t.c0, *sh = aff.shift.data() + t.c0;
    write_tile_cl(out.data_ptr<scalar_t>(), so, t, H, W, [&](int64_t h, int64_t w, float* v) {
      const auto* xq = xb + h * xh + w * xw;
      if (xj == CB) {  // x read from the tensor: prefetch it as read_tile does
        const char* xa = reinterpret_cast<const char*>(xq + kPrefetch * xw);
        for (int64_t l = 0; l < xbytes; l += 64) __builtin_prefetch(xa + l);
      }
      const float* a = A + (h * W + w) * CB;
      for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
        for (int64_t cc = 0; cc < CB; ++cc)
          v[j * CB + cc] = static_cast<float>(xq[j * xj + cc]) + a[j * as + cc] * sc[j * CB + cc] + sh[j * CB + cc];
    });
  };
  // out = x + act(z) * scale + shift over the tile, x read again (from the input directly
  // where both are channels_last).
  auto normalise = [&](const Tile& t, Workspace& ws, const float* A, int64_t as) {
    if (cl_tile(sx, t) && cl_tile(so, t))
      return residual_out(t, xp + t.n * sx.n + t.c0, sx.h, sx.w, int64_t(CB), A, as);
    read_tile(xp, sx, t, H, W, ws.P.data() + g.interior(), g.Wp, gs);
    for (int64_t j = 0; j < t.subs(); ++j) normalise_sub(t, j, ws.P.data(), A, as, ws.OUT.data());
    write_tile(out.data_ptr<scalar_t>(), so, t, H, W, ws.OUT.data(), W, zs);
  };

  if (!use_batch_stats) {  // eval: one pass
    for_each_tile(N, C, g, false, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
      if (cl_tile(so, t)) {  // x from the padded tile buffer
        conv_act(t, b, ws, ws.A.data(), zs, [](int64_t) {});
        return residual_out(t, static_cast<const float*>(ws.P.data() + g.interior()), g.Wp * CB, int64_t(CB), gs,
                            ws.A.data(), zs);
      }
      conv_act(t, b, ws, ws.A.data(), zs,
               [&](int64_t j) { normalise_sub(t, j, ws.P.data(), ws.A.data(), zs, ws.OUT.data()); });
      write_tile(out.data_ptr<scalar_t>(), so, t, H, W, ws.OUT.data(), W, zs);
    });
    return {out, mean, var, preact};
  }

  // Training: the normalisation needs every image's statistics, so act(z) is kept in float32
  // between the statistics step and the normalise step (act is not evaluated twice, z not
  // read through the layout-aware reader again).
  float* const mp = mean.data_ptr<float>();
  float* const vp = var.data_ptr<float>();
  // Channel c's batch statistics (to mean / var) and affine, once its planes' are known.
  const std::vector<float> gamma = bn_weight.has_value() ? pad_channels(bn_weight, C, Cpad)
                                                         : std::vector<float>(Cpad, 1.f);
  const std::vector<float> beta = pad_channels(bn_bias, C, Cpad);
  for (auto* v : {&aff.scale, &aff.shift, &aff.invstd, &aff.gamma, &aff.mean}) v->assign(Cpad, 0.f);
  auto finish_channel = [&](int64_t c) {
    const auto [m, v] = channel_stats(pmean.data(), pm2.data(), N, Cpad, c, HW);
    mp[c] = m;
    vp[c] = v;
    set_affine(aff, c, m, v, gamma[c], beta[c], eps);
  };
  // Channel-group order where there are enough channels: a thread takes a group of channels
  // (32 for channels_last: a pair of cache lines per pixel; 8 for NCHW) through all N
  // images, act(z) into its own buffer of at most 1 MiB (in L2), then the group's statistics
  // and affine, then the normalise step of each image from that buffer, instead of a round
  // trip of act(z) through memory. The arithmetic per plane and per channel is the image
  // order's below: the same bits.
  const int64_t gns = group_subs(N, C, HW, sx.c == 1, 4, int64_t(1) << 18);
  if (gns > 0) {
    const int64_t tc = gns * CB, groups = (C + tc - 1) / tc;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      Workspace ws(g, false, gns);
      Buf G(N * gns * HWC, false);  // act(z): image n, sub-block j at (n * gns + j) * HWC
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t c0 = gi * tc, cb = std::min(tc, C - c0);
        for (int64_t n = 0; n < N; ++n) {
          const Tile t{n, c0, cb};
          float* Gn = G.data() + n * gns * HWC;
          conv_act(t, c0 / CB, ws, Gn, HWC, [&](int64_t j) { plane_moments(t, j, Gn, HWC); });
        }
        for (int64_t c = c0; c < c0 + cb; ++c) finish_channel(c);
        for (int64_t n = 0; n < N; ++n) normalise(Tile{n, c0, cb}, ws, G.data() + n * gns * HWC, HWC);
      }
    });
    return {out, mean, var, preact};
  }
  // Image order (few channels, or large planes): act(z) of every tile in a cache of the
  // activation's size (tile order, contiguous) between two passes.
  at::Tensor acache = at::empty({N * blocks * HWC}, x.options().dtype(at::kFloat));
  float* const acp = acache.data_ptr<float>();
  for_each_tile(N, C, g, false, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
    float* A = acp + (t.n * blocks + b) * HWC;
    conv_act(t, b, ws, A, HWC, [&](int64_t j) { plane_moments(t, j, A, HWC); });
  });
  for (int64_t c = 0; c < C; ++c) finish_channel(c);
  for_each_tile(N, C, g, false, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
    normalise(t, ws, acp + (t.n * blocks + b) * HWC, HWC);
  });
  return {out, mean, var, preact};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact_in, bool use_batch_stats, double eps, Act act, const std::vector<bool>& mask) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const Plane g(H, W, weight.size(2));
  check_plane_fits(g);
  const int64_t k = g.k, kk = k * k, blocks = (C + CB - 1) / CB, Cpad = blocks * CB, HWC = HW * CB, gs = g.sub(),
                zs = g.zsub();
  const Affine aff = make_affine(mean, var, bn_weight, c10::nullopt, eps, Cpad);
  const at::Tensor wpack = pack_weights(weight, C, k, false), wflip = pack_weights(weight, C, k, true);
  const std::vector<float> bpack = pad_channels(bias, C, Cpad), zeros(Cpad, 0.f);
  const bool need_dx = mask[0], need_dw = mask[1], need_db = mask[2], need_dbnw = mask[3], need_dbnb = mask[4];
  const auto fmt = output_format(x);
  const auto fopt = x.options().dtype(at::kFloat);
  const Strides4 sx(x), sg(grad_out);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = grad_out.data_ptr<scalar_t>();
  const bool have_z = preact_in.numel() > 0;

  // Loads the tile's x (padded; only where needed: z needs it unless saved) and z.
  auto load_xz = [&](const Tile& t, int64_t b, float* P, float* Z, bool need_x) {
    if (need_x || !have_z) read_tile(xp, sx, t, H, W, P + g.interior(), g.Wp, gs);
    if (have_z) {
      read_tile(preact_in.data_ptr<scalar_t>(), Strides4(preact_in), t, H, W, Z, W, zs);
      return;
    }
    for (int64_t j = 0; j < t.subs(); ++j)
      conv_tile(P + j * gs, g, wpack.data_ptr<float>() + (b + j) * kk * CB, bpack.data() + t.c0 + j * CB,
                Z + j * zs, W);
    for (int64_t j = 0; j < t.subs(); ++j) round_tile<scalar_t>(Z + j * zs, HWC);
  };

  // Per-(n, c) sums of dy and dy * xhat over the tile (act(z) of sub-block j at A + j * zs,
  // dy at DY + j * zs).
  std::vector<double> psum_dy(N * Cpad), psum_dyx(N * Cpad);
  auto plane_sums = [&](const Tile& t, const float* A, const float* DY) {
    for (int64_t j = 0; j < t.subs(); ++j) {
      const int64_t c0 = t.c0 + j * CB;
      const float* mu = aff.mean.data() + c0;
      const float* is = aff.invstd.data() + c0;
      const float *dyj = DY + j * zs, *aj = A + j * zs;
      double s[CB] = {0.0}, sx2[CB] = {0.0};
      for (int64_t i = 0; i < HW; ++i)
#pragma omp simd
        for (int64_t cc = 0; cc < CB; ++cc) {
          const float dy = dyj[i * CB + cc];
          s[cc] += dy;
          sx2[cc] += static_cast<double>(dy * ((aj[i * CB + cc] - mu[cc]) * is[cc]));
        }
      for (int64_t cc = 0; cc < CB; ++cc) {
        psum_dy[t.n * Cpad + c0 + cc] = s[cc];
        psum_dyx[t.n * Cpad + c0 + cc] = sx2[cc];
      }
    }
  };
  // Channel c's sums over n (in order) and the per-channel factors of dz.
  std::vector<double> sum_dy(Cpad, 0.0), sum_dyx(Cpad, 0.0);
  const double count = static_cast<double>(N * HW);
  std::vector<float> mdy(Cpad, 0.f), mdyx(Cpad, 0.f), s1(Cpad, 0.f);
  auto channel_sums = [&](int64_t c) {
    for (int64_t n = 0; n < N; ++n) {
      sum_dy[c] += psum_dy[n * Cpad + c];
      sum_dyx[c] += psum_dyx[n * Cpad + c];
    }
    if (use_batch_stats) {
      mdy[c] = static_cast<float>(sum_dy[c] / count);
      mdyx[c] = static_cast<float>(sum_dyx[c] / count);
    }
    s1[c] = aff.gamma[c] * aff.invstd[c];
  };

  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  std::vector<double> pdw(need_dw ? N * Cpad * kk : 0, 0.0), pdb(N * Cpad, 0.0);
  const Strides4 sdx(need_dx ? dx : x);
  // dz = act'(z) * gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) over the tile
  // (sub-block j's act(z), act'(z) and dy at A, D, DY + j * zs; D is overwritten with dz),
  // then the bias and weight gradient partial sums and dx = conv(dz, flipped w) + dy. P holds
  // the padded x where the weight gradient is needed.
  auto grad_tile = [&](const Tile& t, int64_t b, Workspace& ws, const float* A, float* D, const float* DY) {
    float *P = ws.P.data(), *DZ = ws.DZ.data(), *OUT = ws.OUT.data();
    const int64_t nj = t.subs();
    for (int64_t j = 0; j < nj; ++j) {
      const int64_t c0 = t.c0 + j * CB;
      const float *mu = aff.mean.data() + c0, *is = aff.invstd.data() + c0, *sc = s1.data() + c0,
                  *m1 = mdy.data() + c0, *m2 = mdyx.data() + c0;
      const float *Aj = A + j * zs, *DYj = DY + j * zs;
      float *Dj = D + j * zs, *DZj = DZ + j * gs;
      double db[CB] = {0.0};
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const int64_t i = (h * W + w) * CB;
          float* dzp = DZj + g.interior() + (h * g.Wp + w) * CB;
#pragma omp simd
          for (int64_t cc = 0; cc < CB; ++cc) {
            const float xhat = (Aj[i + cc] - mu[cc]) * is[cc];
            const float dz = Dj[i + cc] * sc[cc] * (DYj[i + cc] - m1[cc] - xhat * m2[cc]);
            Dj[i + cc] = dz;
            dzp[cc] = dz;
            db[cc] += dz;
          }
        }
      for (int64_t cc = 0; cc < CB; ++cc) pdb[t.n * Cpad + c0 + cc] = db[cc];
      if (need_dw) wgrad_tile(P + j * gs, g, Dj, pdw.data() + (t.n * blocks + b + j) * kk * CB);
      if (need_dx) conv_tile(DZj, g, wflip.data_ptr<float>() + (b + j) * kk * CB, zeros.data(), OUT + j * zs, W);
    }
    if (need_dx && cl_tile(sdx, t)) {  // dx = conv + dy, written straight from the two
      write_tile_cl(dx.data_ptr<scalar_t>(), sdx, t, H, W, [&](int64_t h, int64_t w, float* v) {
        const int64_t i = (h * W + w) * CB;
        for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
          for (int64_t cc = 0; cc < CB; ++cc) v[j * CB + cc] = OUT[j * zs + i + cc] + DY[j * zs + i + cc];
      });
    } else if (need_dx) {
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t i = 0; i < HWC; ++i) OUT[j * zs + i] += DY[j * zs + i];
      write_tile(dx.data_ptr<scalar_t>(), sdx, t, H, W, OUT, W, zs);
    }
  };
  const bool grads = need_dx || need_dw || need_db;

  // Three buffers of up to 4 MiB per thread; channels_last groups of up to 32 channels (a
  // pair of cache lines per pixel; 64 and 16 measured slower).
  const int64_t gns = group_subs(N, C, HW, sx.c == 1, 4, int64_t(1) << 20);
  if (gns > 0) {
    // Channel-group order: a thread takes a group of channels through all N images, keeping
    // their act(z), act'(z) and dy in its own buffers between the two steps, so that z is
    // read (or recomputed), dy read and the activation evaluated once per element instead of
    // twice. The arithmetic per plane and per channel is the image order's: the same bits.
    const int64_t tc = gns * CB, groups = (C + tc - 1) / tc, per_n = gns * zs;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      Workspace ws(g, true, gns);
      Buf GA(N * per_n, false), GD(N * per_n, false), GDY(N * per_n, false);
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t c0 = gi * tc, cb = std::min(tc, C - c0), b = c0 / CB;
        for (int64_t n = 0; n < N; ++n) {
          const Tile t{n, c0, cb};
          float *A = GA.data() + n * per_n, *D = GD.data() + n * per_n, *DY = GDY.data() + n * per_n;
          load_xz(t, b, ws.P.data(), ws.Z.data(), false);
          read_tile(gp, sg, t, H, W, DY, W, zs);
          for (int64_t j = 0; j < t.subs(); ++j) act_forward_deriv(act, ws.Z.data() + j * zs, A + j * zs, D + j * zs, HWC);
          plane_sums(t, A, DY);
        }
        for (int64_t c = c0; c < std::min(c0 + tc, Cpad); ++c) channel_sums(c);
        if (!grads) continue;
        for (int64_t n = 0; n < N; ++n) {
          const Tile t{n, c0, cb};
          if (need_dw) read_tile(xp, sx, t, H, W, ws.P.data() + g.interior(), g.Wp, gs);
          grad_tile(t, b, ws, GA.data() + n * per_n, GD.data() + n * per_n, GDY.data() + n * per_n);
        }
      }
    });
  } else {
    // Image order (too few channel groups to share among the threads, or large planes): pass 1
    // the sums, pass 2 the gradients, each loading z and dy and evaluating the activation.
    for_each_tile(N, C, g, true, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
      float *Z = ws.Z.data(), *DY = ws.DY.data();
      load_xz(t, b, ws.P.data(), Z, false);
      read_tile(gp, sg, t, H, W, DY, W, zs);
      for (int64_t j = 0; j < t.subs(); ++j) act_forward(act, Z + j * zs, Z + j * zs, HWC);
      plane_sums(t, Z, DY);
    });
    for (int64_t c = 0; c < Cpad; ++c) channel_sums(c);
    if (grads)
      for_each_tile(N, C, g, true, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
        float *A = ws.A.data(), *D = ws.D.data(), *DY = ws.DY.data();
        load_xz(t, b, ws.P.data(), ws.Z.data(), need_dw);
        read_tile(gp, sg, t, H, W, DY, W, zs);
        for (int64_t j = 0; j < t.subs(); ++j) act_forward_deriv(act, ws.Z.data() + j * zs, A + j * zs, D + j * zs, HWC);
        grad_tile(t, b, ws, A, D, DY);
      });
  }

  auto empty = [&]() { return at::empty({0}, x.options()); };
  at::Tensor dweight = empty(), dbias = empty(), dbnw = at::empty({0}, fopt), dbnb = at::empty({0}, fopt);
  if (need_dw) {  // pdw: (N, blocks, k*k, CB) -> (C, 1, k, k), summed over n in order
    at::Tensor acc = at::zeros({blocks, kk, CB}, x.options().dtype(at::kDouble));
    double* a = acc.data_ptr<double>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < blocks * kk * CB; ++i) a[i] += pdw[n * blocks * kk * CB + i];
    dweight = acc.transpose(1, 2).reshape({Cpad, kk}).narrow(0, 0, C).reshape({C, 1, k, k})
                  .to(weight.scalar_type()).contiguous();
  }
  auto per_channel = [&](const std::vector<double>& v, at::ScalarType st) {
    at::Tensor t = at::empty({C}, x.options().dtype(at::kDouble));
    std::copy(v.begin(), v.begin() + C, t.data_ptr<double>());
    return t.to(st);
  };
  if (need_db) {
    std::vector<double> acc(Cpad, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < Cpad; ++c) acc[c] += pdb[n * Cpad + c];
    dbias = per_channel(acc, weight.scalar_type());
  }
  if (need_dbnw) dbnw = per_channel(sum_dyx, at::kFloat);
  if (need_dbnb) dbnb = per_channel(sum_dy, at::kFloat);
  if (!need_dx) dx = empty();
  return {dx, dweight, dbias, dbnw, dbnb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, c10::string_view activation, bool save_preact) {
  check_inputs(x, weight, "dw_block_forward_kernel (cpu)");
  TORCH_CHECK(use_batch_stats || (running_mean.has_value() && running_var.has_value()),
              "dw_block_forward_kernel (cpu): running_mean and running_var are required without batch statistics");
  const Act act = parse_act(std::string(activation));
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_forward_cpu", [&] {
    return forward_impl<scalar_t>(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                  use_batch_stats, eps, act, save_preact);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact, bool use_batch_stats, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  check_inputs(x, weight, "dw_block_backward_kernel (cpu)");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "dw_block_backward_kernel (cpu): grad_out must match x in shape and dtype, got ", shape_str(grad_out.sizes()),
              " ", grad_out.scalar_type());
  TORCH_CHECK(output_mask.size() == 5, "dw_block_backward_kernel (cpu): output_mask must have 5 entries");
  TORCH_CHECK(preact.numel() == 0 || (preact.sizes() == x.sizes() && preact.scalar_type() == x.scalar_type()),
              "dw_block_backward_kernel (cpu): preact must be empty or match x");
  const Act act = parse_act(std::string(activation));
  std::vector<bool> mask;
  for (const bool m : output_mask) mask.push_back(m);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_backward_cpu", [&] {
    return backward_impl<scalar_t>(grad_out, x, weight, bias, bn_weight, mean, var, preact, use_batch_stats, eps,
                                   act, mask);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("dw_block_forward_kernel", &dw_block_forward_cpu);
  m.impl("dw_block_backward_kernel", &dw_block_backward_cpu);
}

}  // namespace cpu
}  // namespace convmixer_kernels
