// The depthwise CUDA kernels' shared pieces (dw_block.cu; design there): tiling constants,
// call geometry, tile indexing, and the device helpers of every kernel (activations, BN,
// warp sums, the shared-memory tile loader, the conv taps).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>

namespace convmixer_kernels {
namespace cuda {
namespace {  // one translation unit: only dw_block.cu includes this

constexpr int THREADS = 256;
constexpr int CT = 8;   // channels per tile (one warp each)
constexpr int TH = 8;   // rows per tile
constexpr int TW = 16;  // columns per tile
constexpr int PX = 4;   // consecutive pixels per thread
static_assert(CT * TH * (TW / PX) == THREADS, "one thread per PX pixels of the tile");
static_assert(TH * (TW / PX) == 32, "one warp per channel of the tile");

enum Act : int { kGelu = 0, kGeluTanh = 1, kRelu = 2 };
enum Mode : int { kEval = 0, kTrain = 1, kZOnly = 2, kDgrad = 3 };

int parse_act(c10::string_view name, const char* where) {
  if (name == "gelu") return kGelu;
  if (name == "gelu_tanh") return kGeluTanh;
  if (name == "relu") return kRelu;
  TORCH_CHECK(false, where, ": activation must be one of 'gelu', 'gelu_tanh', 'relu', got '",
              std::string(name), "'");
  return kGelu;
}

struct Strides4 {
  int64_t n, c, h, w;
};

Strides4 strides_of(const at::Tensor& t) { return {t.stride(0), t.stride(1), t.stride(2), t.stride(3)}; }

__host__ __device__ __forceinline__ int64_t offset(const Strides4& s, int64_t n, int64_t c, int64_t h,
                                                   int64_t w) {
  return n * s.n + c * s.c + h * s.h + w * s.w;
}

// Shape and tiling of one call, filled in one place (make_geometry).
struct Geometry {
  int64_t N, C, H, W;
  int k, pad;
  int64_t tiles_h, tiles_w, tiles_hw;  // spatial tiles per image
  int64_t tiles;                       // N * tiles_hw: rows of the per-tile partials
  int64_t groups;                      // channel groups of CT
  int64_t blocks;                      // tiles * groups: grid of the tiled kernels
};

Geometry make_geometry(const at::Tensor& x, int64_t k) {
  Geometry g;
  g.N = x.size(0);
  g.C = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.k = static_cast<int>(k);
  g.pad = g.k / 2;
  g.tiles_h = (g.H + TH - 1) / TH;
  g.tiles_w = (g.W + TW - 1) / TW;
  g.tiles_hw = g.tiles_h * g.tiles_w;
  g.tiles = g.N * g.tiles_hw;
  g.groups = (g.C + CT - 1) / CT;
  g.blocks = g.tiles * g.groups;
  return g;
}

// The tile a block owns: image n, spatial tile t (row of the partials), rows from h0,
// columns from w0, channels from c0.
struct TileIdx {
  int64_t t, n, h0, w0, c0;
};

__device__ __forceinline__ TileIdx tile_of(const Geometry& g, int64_t b) {
  TileIdx ti;
  const int64_t grp = b % g.groups;
  ti.t = b / g.groups;
  ti.n = ti.t / g.tiles_hw;
  const int64_t s = ti.t % g.tiles_hw;
  ti.h0 = (s / g.tiles_w) * TH;
  ti.w0 = (s % g.tiles_w) * TW;
  ti.c0 = grp * CT;
  return ti;
}

// Valid pixels of spatial tile t (the count its partial statistics are over).
__host__ __device__ __forceinline__ int64_t tile_count(const Geometry& g, int64_t t) {
  const int64_t s = t % g.tiles_hw;
  const int64_t h0 = (s / g.tiles_w) * TH, w0 = (s % g.tiles_w) * TW;
  const int64_t rh = g.H - h0 < TH ? g.H - h0 : TH;
  const int64_t rw = g.W - w0 < TW ? g.W - w0 : TW;
  return rh * rw;
}

// ---- device helpers -------------------------------------------------------------------

template <typename T>
__device__ __forceinline__ float to_f(T v) {
  return static_cast<float>(v);
}

template <typename T>
__device__ __forceinline__ T from_f(float v) {
  return static_cast<T>(v);
}

// act(z) in float32: exact (erf) GELU, tanh GELU, ReLU (NaN propagates).
__device__ __forceinline__ float act_fwd(float z, int act) {
  if (act == kGelu) return 0.5f * z * (1.0f + erff(z * 0.7071067811865476f));
  if (act == kGeluTanh) {
    // 0.5 z (1 + tanh(u)) == z * sigmoid(2u): no cancellation near u = 0.
    const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
    return z / (1.0f + expf(-2.0f * u));
  }
  return z < 0.0f ? 0.0f : z;
}

// g * act'(z) in float32 (ReLU: the gradient passes where z > 0 or z is NaN, as
// aten.threshold_backward).
__device__ __forceinline__ float act_bwd(float z, float g, int act) {
  if (act == kGelu) {
    const float cdf = 0.5f * (1.0f + erff(z * 0.7071067811865476f));
    const float pdf = expf(-0.5f * z * z) * 0.3989422804014327f;
    return g * (cdf + z * pdf);
  }
  if (act == kGeluTanh) {
    const float u = 0.7978845608028654f * (z + 0.044715f * z * z * z);
    const float s = 1.0f / (1.0f + expf(-2.0f * u));
    const float du = 0.7978845608028654f * (1.0f + 0.134145f * z * z);
    return g * (s + 2.0f * z * s * (1.0f - s) * du);
  }
  return z <= 0.0f ? 0.0f : g;
}

// 1 / sqrt(var + eps) with correctly rounded steps (the reference's rsqrt).
__device__ __forceinline__ float inv_std(float var, float eps) { return __fdiv_rn(1.0f, __fsqrt_rn(var + eps)); }

// BN affine in the reference's order: (a - mean) * invstd, * bn_weight, + bn_bias.
struct BnArgs {
  const float* mean;
  const float* var;
  const float* weight;  // nullable
  const float* bias;    // nullable
  float eps;
};

__device__ __forceinline__ float bn_apply(const BnArgs& bn, int64_t c, float a) {
  float y = (a - bn.mean[c]) * inv_std(bn.var[c], bn.eps);
  if (bn.weight != nullptr) y = y * bn.weight[c];
  if (bn.bias != nullptr) y = y + bn.bias[c];
  return y;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int m = 16; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;  // the same value in every lane (fixed butterfly order)
}

// Thread coordinates inside a tile.
struct Lane {
  int ch, row, col0;  // channel in the tile, row in the tile, first of its PX columns
};

__device__ __forceinline__ Lane lane_of(int tid) { return {tid >> 5, (tid >> 2) & 7, (tid & 3) * PX}; }

// s[(cc * SH + r) * SW + q] = src[n, c0 + cc, h0 + r, w0 + q] for cc < CT, r < SH, q < SW,
// zero outside the image or past C. Loads go channels-fastest when channels are the unit
// stride (channels_last) and columns-fastest otherwise.
template <typename in_t>
__device__ void load_tile(float* s, const in_t* __restrict__ src, const Strides4& st, const Geometry& g, int64_t n,
                          int64_t c0, int64_t h0, int64_t w0, int SH, int SW) {
  const int total = CT * SH * SW;
  const bool chan_fast = st.c == 1;
  for (int e = threadIdx.x; e < total; e += THREADS) {
    int cc, r, q;
    if (chan_fast) {
      cc = e % CT;
      const int rest = e / CT;
      q = rest % SW;
      r = rest / SW;
    } else {
      q = e % SW;
      const int rest = e / SW;
      r = rest % SH;
      cc = rest / SH;
    }
    const int64_t c = c0 + cc, h = h0 + r, w = w0 + q;
    float v = 0.0f;
    if (c < g.C && h >= 0 && h < g.H && w >= 0 && w < g.W) v = to_f(src[offset(st, n, c, h, w)]);
    s[(cc * SH + r) * SW + q] = v;
  }
}

// acc[q] += sum_{i,j} s[(i) * SW + q + j] * wc[i * k + j] for the PX outputs of a thread;
// s points at the thread's first input (its row and column in the halo tile).
// K > 0: kernel size as a compile-time constant (columns unrolled; rows too up to 7);
// K == 0: run-time k.
template <int K>
__device__ __forceinline__ void conv_taps(const float* s, int SW, int k, const float* __restrict__ wc, float acc[PX]) {
  if constexpr (K > 0) {
    constexpr int UNROLL_ROWS = K <= 7 ? K : 1;
#pragma unroll UNROLL_ROWS
    for (int i = 0; i < K; ++i) {
      float seg[PX + K - 1];
#pragma unroll
      for (int t = 0; t < PX + K - 1; ++t) seg[t] = s[i * SW + t];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float wv = __ldg(wc + i * K + j);
#pragma unroll
        for (int q = 0; q < PX; ++q) acc[q] = fmaf(seg[q + j], wv, acc[q]);
      }
    }
  } else {
    for (int i = 0; i < k; ++i) {
      const float* row = s + i * SW;
      for (int j = 0; j < k; ++j) {
        const float wv = __ldg(wc + i * k + j);
#pragma unroll
        for (int q = 0; q < PX; ++q) acc[q] = fmaf(row[q + j], wv, acc[q]);
      }
    }
  }
}

}  // namespace
}  // namespace cuda
}  // namespace convmixer_kernels
