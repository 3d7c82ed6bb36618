// Tiles of the CPU depthwise kernels (csrc/cpu/dw_block*.cpp): the geometry of the padded,
// channel-interleaved tile buffers, how a call is cut into tiles, and the layout-aware tile
// reader and writers (any strides; fast paths for channels_last and float32 NCHW).
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cstdint>

namespace convmixer_kernels {
namespace cpu {
namespace dw {

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

// z rounded to scalar_t (as stored), in place.
template <typename scalar_t>
void round_tile(float* z, int64_t n) {
  for (int64_t i = 0; i < n; ++i) z[i] = round_to<scalar_t>(z[i]);
}

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
