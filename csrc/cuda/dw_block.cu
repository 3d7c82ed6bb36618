// CUDA kernels of the residual depthwise block
//   out = x + BN(act(dwconv_k(x) + b)),  k odd, 'same' zero padding
// registered as the CUDA implementation of convmixer_kernels::dw_block_{forward,backward}_kernel
// (schemas in convmixer_kernels/ops/schema.py, semantics in convmixer_kernels/reference.py, the CPU
// implementation of the same schema in csrc/cpu/dw_block.cpp).
//
// Tiling (every tiled kernel): a block of 256 threads owns CT = 8 channels x TH = 8 rows x
// TW = 16 columns of one image. Warp `ch` holds channel c0 + ch; in it, lane = row * 4 + q4
// and each thread owns PX = 4 consecutive pixels of its row (columns q4 * 4 .. q4 * 4 + 3),
// so a per-channel sum over the tile is one warp reduction (fixed butterfly order).
// The conv kernels stage the input tile with its halo, (TH + k - 1) x (TW + k - 1) per
// channel, in shared memory (float32), loaded in the order its strides favour (channels
// fastest for channels_last, columns fastest otherwise); the taps then run from shared
// memory with the 4 outputs of a thread in registers (the input row segment of a kernel
// row is loaded into registers once for all its taps).
//
// Kernels:
// - conv_kernel<in_t, out_t, K>: conv + epilogue, by mode:
//     EVAL   z = round(conv(x) + b); out = x + BN(act(z)) with the running statistics;
//     TRAIN  z stored; per-tile per-channel (mean, M2) of act(z) written (no atomics);
//     ZONLY  z stored (backward without a saved pre-activation);
//     DGRAD  dx = conv(dz, flipped weights) + dy (the residual).
// - finalize_stats_kernel: Chan's combination of the tile statistics in tile order, in
//   double: batch mean and biased variance.
// - norm_kernel: out = x + BN(act(z)) (training, second pass).
// - bwd_elem_kernel: per-tile sums of dy and dy * xhat, and/or
//   dz = act'(z) * (dy * bn_weight - mean_g - xhat * mean_gx) * invstd (float32) with its
//   per-tile sums (the conv bias gradient).
// - wgrad_kernel: per-split partial sums of dz * shifted x for every tap (a block walks its
//   split's tiles in order; each (channel, tap) accumulator belongs to one thread).
// - reduce_rows_kernel: column sums of a (rows x cols) float32 matrix, in row order, in
//   double (tile and split partials).
// No atomics anywhere: results are bitwise reproducible run to run on a given device.
// Global offsets are int64. Kernel sizes 3, 5, 7, 9, 13, 31 are template constants; other
// odd sizes go through the run-time-k instantiation (K = 0).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>
#include <string>
#include <type_traits>

#include "../common/checks.h"

namespace convmixer_kernels {
namespace cuda {
namespace {

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

// ---- conv + epilogue --------------------------------------------------------------------

template <typename in_t, typename out_t>
struct ConvArgs {
  Geometry g;
  int mode, act;
  const in_t* in;  // x (EVAL/TRAIN/ZONLY) or dz (DGRAD)
  Strides4 s_in;
  const float* wt;    // (C, k*k) float32; flipped for DGRAD
  const float* bias;  // (C,) float32, nullable
  out_t* z;           // pre-activation store, nullable
  Strides4 s_z;
  out_t* out;  // out (EVAL) or dx (DGRAD)
  Strides4 s_out;
  const out_t* dy;  // DGRAD: the residual's gradient
  Strides4 s_dy;
  BnArgs bn;     // EVAL
  float* pmean;  // TRAIN: (tiles, C)
  float* pm2;
};

template <typename in_t, typename out_t, int K>
__global__ void __launch_bounds__(THREADS) conv_kernel(const ConvArgs<in_t, out_t> a) {
  extern __shared__ float smem[];
  const Geometry& g = a.g;
  const int k = K > 0 ? K : g.k;
  const int SH = TH + k - 1, SW = TW + k - 1;
  const TileIdx ti = tile_of(g, blockIdx.x);
  load_tile(smem, a.in, a.s_in, g, ti.n, ti.c0, ti.h0 - g.pad, ti.w0 - g.pad, SH, SW);
  __syncthreads();

  const Lane l = lane_of(threadIdx.x);
  const int64_t c = ti.c0 + l.ch;
  const bool cvalid = c < g.C;
  const int64_t cw = cvalid ? c : g.C - 1;  // a valid weight row for lanes past C (results unused)
  float acc[PX];
#pragma unroll
  for (int q = 0; q < PX; ++q) acc[q] = 0.0f;
  const float* s = smem + (l.ch * SH + l.row) * SW + l.col0;
  conv_taps<K>(s, SW, k, a.wt + cw * k * k, acc);

  const int64_t h = ti.h0 + l.row;
  const float b = (a.bias != nullptr && a.mode != kDgrad) ? a.bias[cw] : 0.0f;
  float sum = 0.0f, vals[PX];
#pragma unroll
  for (int q = 0; q < PX; ++q) {
    const int64_t w = ti.w0 + l.col0 + q;
    const bool valid = cvalid && h < g.H && w < g.W;
    vals[q] = 0.0f;
    if (!valid) continue;
    if (a.mode == kDgrad) {
      const float dx = acc[q] + to_f(a.dy[offset(a.s_dy, ti.n, c, h, w)]);
      a.out[offset(a.s_out, ti.n, c, h, w)] = from_f<out_t>(dx);
      continue;
    }
    const out_t zs = from_f<out_t>(acc[q] + b);  // the stored pre-activation
    if (a.z != nullptr) a.z[offset(a.s_z, ti.n, c, h, w)] = zs;
    if (a.mode == kZOnly) continue;
    const float act = act_fwd(to_f(zs), a.act);
    if (a.mode == kTrain) {
      vals[q] = act;
      sum += act;
      continue;
    }
    const float xv = s[g.pad * SW + g.pad + q];  // x at (h, w), from the staged tile
    a.out[offset(a.s_out, ti.n, c, h, w)] = from_f<out_t>(xv + bn_apply(a.bn, c, act));
  }
  if (a.mode != kTrain) return;
  // Per-tile (mean, M2) of this channel: one warp holds the channel's whole tile.
  const float n_tile = static_cast<float>(tile_count(g, ti.t));
  const float mean = warp_sum(sum) / n_tile;
  float m2 = 0.0f;
#pragma unroll
  for (int q = 0; q < PX; ++q) {
    const bool valid = cvalid && h < g.H && ti.w0 + l.col0 + q < g.W;
    const float d = vals[q] - mean;
    m2 += valid ? d * d : 0.0f;
  }
  m2 = warp_sum(m2);
  if (cvalid && (threadIdx.x & 31) == 0) {
    a.pmean[ti.t * g.C + c] = mean;
    a.pm2[ti.t * g.C + c] = m2;
  }
}

// ---- training statistics and normalisation -------------------------------------------------

struct FinalizeArgs {
  Geometry g;
  const float* pmean;
  const float* pm2;
  float* mean;
  float* var;
};

// Batch mean and biased variance per channel: Chan's combination of the tile partials in
// tile order, in double.
__global__ void __launch_bounds__(THREADS) finalize_stats_kernel(const FinalizeArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.g.C) return;
  double mu = 0.0, m2 = 0.0, n_acc = 0.0;
  for (int64_t t = 0; t < a.g.tiles; ++t) {
    const double nb = static_cast<double>(tile_count(a.g, t));
    const double mb = a.pmean[t * a.g.C + c], m2b = a.pm2[t * a.g.C + c];
    const double tot = n_acc + nb, delta = mb - mu;
    mu += delta * nb / tot;
    m2 += m2b + delta * delta * n_acc * nb / tot;
    n_acc = tot;
  }
  a.mean[c] = static_cast<float>(mu);
  a.var[c] = static_cast<float>(m2 / n_acc);
}

template <typename scalar_t>
struct NormArgs {
  Geometry g;
  int act;
  bool channels_last;  // memory order of out and z (both dense in it)
  const scalar_t* x;
  Strides4 s_x;
  const scalar_t* z;
  scalar_t* out;  // may alias z (same element read then written by one thread)
  BnArgs bn;
};

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) norm_kernel(const NormArgs<scalar_t> a) {
  const Geometry& g = a.g;
  const int64_t total = g.N * g.C * g.H * g.W;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t n, c, h, w;
    if (a.channels_last) {
      c = i % g.C;
      int64_t r = i / g.C;
      w = r % g.W;
      r /= g.W;
      h = r % g.H;
      n = r / g.H;
    } else {
      w = i % g.W;
      int64_t r = i / g.W;
      h = r % g.H;
      r /= g.H;
      c = r % g.C;
      n = r / g.C;
    }
    const float act = act_fwd(to_f(a.z[i]), a.act);
    const float xv = to_f(a.x[offset(a.s_x, n, c, h, w)]);
    a.out[i] = from_f<scalar_t>(xv + bn_apply(a.bn, c, act));
  }
}

// ---- backward ---------------------------------------------------------------------------

template <typename scalar_t>
struct ElemArgs {
  Geometry g;
  int act;
  bool train;     // batch statistics: dz carries the mean terms
  bool stats;     // write per-tile sums of dy and dy * xhat
  bool dz_pass;   // write dz (and per-tile sums of dz when pdb is set)
  const scalar_t* dy;
  Strides4 s_dy;
  const scalar_t* z;
  Strides4 s_z;
  const float* mean;
  const float* var;
  float eps;
  const float* bn_weight;  // nullable
  const float* mean_g;     // train: mean of dy * bn_weight per channel
  const float* mean_gx;    // train: mean of dy * bn_weight * xhat per channel
  float* psum;             // (tiles, C)
  float* pdot;
  float* pdb;  // nullable
  float* dz;   // float32, strides s_dz
  Strides4 s_dz;
};

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) bwd_elem_kernel(const ElemArgs<scalar_t> a) {
  const Geometry& g = a.g;
  const TileIdx ti = tile_of(g, blockIdx.x);
  const Lane l = lane_of(threadIdx.x);
  const int64_t c = ti.c0 + l.ch, h = ti.h0 + l.row;
  const bool cvalid = c < g.C;
  float sdy = 0.0f, sdyx = 0.0f, sdz = 0.0f;
  if (cvalid) {
    const float mean = a.mean[c], inv = inv_std(a.var[c], a.eps);
    const float gw = a.bn_weight != nullptr ? a.bn_weight[c] : 1.0f;
    const float mg = a.train ? a.mean_g[c] : 0.0f, mgx = a.train ? a.mean_gx[c] : 0.0f;
#pragma unroll
    for (int q = 0; q < PX; ++q) {
      const int64_t w = ti.w0 + l.col0 + q;
      if (h >= g.H || w >= g.W) continue;
      const float z = to_f(a.z[offset(a.s_z, ti.n, c, h, w)]);
      const float dy = to_f(a.dy[offset(a.s_dy, ti.n, c, h, w)]);
      const float xhat = (act_fwd(z, a.act) - mean) * inv;
      sdy += dy;
      sdyx += dy * xhat;
      if (!a.dz_pass) continue;
      const float gv = a.bn_weight != nullptr ? dy * gw : dy;
      const float da = a.train ? (gv - mg - xhat * mgx) * inv : gv * inv;
      const float dz = act_bwd(z, da, a.act);
      a.dz[offset(a.s_dz, ti.n, c, h, w)] = dz;
      sdz += dz;
    }
  }
  // Warp-uniform from here: a warp is one channel.
  if (a.stats) {
    sdy = warp_sum(sdy);
    sdyx = warp_sum(sdyx);
    if (cvalid && (threadIdx.x & 31) == 0) {
      a.psum[ti.t * g.C + c] = sdy;
      a.pdot[ti.t * g.C + c] = sdyx;
    }
  }
  if (a.dz_pass && a.pdb != nullptr) {
    sdz = warp_sum(sdz);
    if (cvalid && (threadIdx.x & 31) == 0) a.pdb[ti.t * g.C + c] = sdz;
  }
}

template <typename scalar_t>
struct WgradArgs {
  Geometry g;
  const scalar_t* x;
  Strides4 s_x;
  const float* dz;
  Strides4 s_dz;
  int64_t tiles_per_split;
  float* pw;  // (splits, k*k, C)
};

// Block (split, channel group): pw[split, tap, c] = sum over the split's tiles, in order, of
// sum over the tile of dz[p, c] * x[p + offset(tap), c].
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) wgrad_kernel(const WgradArgs<scalar_t> a) {
  extern __shared__ float smem[];
  const Geometry& g = a.g;
  const int k = g.k, kk = k * k, SH = TH + k - 1, SW = TW + k - 1;
  float* xs = smem;                    // CT x SH x SW
  float* dzs = xs + CT * SH * SW;      // CT x TH x TW
  float* accs = dzs + CT * TH * TW;    // CT x kk, entry p owned by thread p % THREADS
  const int64_t grp = blockIdx.x % g.groups, split = blockIdx.x / g.groups;
  const int64_t c0 = grp * CT;
  for (int p = threadIdx.x; p < CT * kk; p += THREADS) accs[p] = 0.0f;
  const int64_t t_lo = split * a.tiles_per_split;
  const int64_t t_hi = t_lo + a.tiles_per_split < g.tiles ? t_lo + a.tiles_per_split : g.tiles;
  const bool dz_chan_fast = a.s_dz.c == 1;
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const TileIdx ti = tile_of(g, t * g.groups + grp);
    __syncthreads();  // the previous tile's shared data has been read
    load_tile(xs, a.x, a.s_x, g, ti.n, c0, ti.h0 - g.pad, ti.w0 - g.pad, SH, SW);
    for (int e = threadIdx.x; e < CT * TH * TW; e += THREADS) {
      int cc, r, q;
      if (dz_chan_fast) {
        cc = e % CT;
        q = (e / CT) % TW;
        r = e / (CT * TW);
      } else {
        q = e % TW;
        r = (e / TW) % TH;
        cc = e / (TW * TH);
      }
      const int64_t c = c0 + cc, h = ti.h0 + r, w = ti.w0 + q;
      float v = 0.0f;
      if (c < g.C && h < g.H && w < g.W) v = a.dz[offset(a.s_dz, ti.n, c, h, w)];
      dzs[(cc * TH + r) * TW + q] = v;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < CT * kk; p += THREADS) {
      const int cc = p / kk, tap = p % kk, i = tap / k, j = tap % k;
      const float* xr = xs + (cc * SH + i) * SW + j;
      const float* dr = dzs + cc * TH * TW;
      float s = 0.0f;
      for (int r = 0; r < TH; ++r)
#pragma unroll
        for (int q = 0; q < TW; ++q) s = fmaf(dr[r * TW + q], xr[r * SW + q], s);
      accs[p] += s;
    }
  }
  for (int p = threadIdx.x; p < CT * kk; p += THREADS) {  // each thread reads its own entries
    const int cc = p / kk, tap = p % kk;
    const int64_t c = c0 + cc;
    if (c < g.C) a.pw[(split * kk + tap) * g.C + c] = accs[p];
  }
}

struct ReduceArgs {
  const float* in;  // (rows, cols)
  int64_t rows, cols;
  double* out;  // (cols,)
};

__global__ void __launch_bounds__(THREADS) reduce_rows_kernel(const ReduceArgs a) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= a.cols) return;
  double s = 0.0;
  for (int64_t r = 0; r < a.rows; ++r) s += a.in[r * a.cols + col];
  a.out[col] = s;
}

// ---- host side ---------------------------------------------------------------------------

constexpr size_t kDefaultSmem = 48 * 1024;

template <typename A>
void launch(void (*kernel)(const A), int64_t blocks, size_t smem, const A& args) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "dw_block (cuda): the problem needs ", blocks, " thread blocks, at most 2^31 - 1 are supported");
  if (smem > kDefaultSmem) {
    const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem <= static_cast<size_t>(optin), "dw_block (cuda): this kernel size needs ", smem,
                " bytes of shared memory per block, the device allows ", optin,
                "; use a smaller kernel size (3..31 are supported) or another backend");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), THREADS, smem, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

size_t conv_smem(const Geometry& g) { return sizeof(float) * CT * (TH + g.k - 1) * (TW + g.k - 1); }

size_t wgrad_smem(const Geometry& g) {
  return sizeof(float) * (CT * (TH + g.k - 1) * (TW + g.k - 1) + CT * TH * TW + CT * g.k * g.k);
}

// Calls fn(std::integral_constant<int, K>{}) with K = k for the unrolled sizes, K = 0 otherwise.
template <typename Fn>
void with_kernel_size(int k, Fn&& fn) {
#define CONVMIXER_DW_K_CASE(KV) \
  case KV:                      \
    return fn(std::integral_constant<int, KV>{});
  switch (k) {
    CONVMIXER_DW_K_CASE(3)
    CONVMIXER_DW_K_CASE(5)
    CONVMIXER_DW_K_CASE(7)
    CONVMIXER_DW_K_CASE(9)
    CONVMIXER_DW_K_CASE(13)
    CONVMIXER_DW_K_CASE(31)
    default:
      return fn(std::integral_constant<int, 0>{});
  }
#undef CONVMIXER_DW_K_CASE
}

template <typename in_t, typename out_t>
void launch_conv(const ConvArgs<in_t, out_t>& args) {
  with_kernel_size(args.g.k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    launch(conv_kernel<in_t, out_t, K>, args.g.blocks, conv_smem(args.g), args);
  });
}

// The storage dtypes of the kernels: float32, float16, bfloat16 (float32 arithmetic).
#define CONVMIXER_DW_DISPATCH(st, name, ...)                \
  AT_DISPATCH_SWITCH(st, name,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Per-channel float32 copies (contiguous) of optional parameters.
at::Tensor f32(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, c10::string_view activation, bool save_preact) {
  const char* where = "dw_block_forward_kernel (cuda)";
  check_dw_block_inputs(x, weight, where, at::kCUDA);
  check_dw_block_forward_args(use_batch_stats, running_mean, running_var, where);
  check_same_device(bias, x, "bias", where);
  check_same_device(bn_weight, x, "bn_weight", where);
  check_same_device(bn_bias, x, "bn_bias", where);
  check_same_device(running_mean, x, "running_mean", where);
  check_same_device(running_var, x, "running_var", where);
  const int act = parse_act(activation, where);
  const c10::cuda::CUDAGuard guard(x.device());

  const Geometry g = make_geometry(x, weight.size(2));
  const auto fmt = output_format(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor preact = save_preact ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({g.C}, fopt), var = at::empty({g.C}, fopt);
  if (!use_batch_stats) {
    mean.copy_(running_mean->to(at::kFloat));
    var.copy_(running_var->to(at::kFloat));
  }
  if (x.numel() == 0) {
    if (use_batch_stats) {
      mean.fill_(std::numeric_limits<float>::quiet_NaN());
      var.fill_(std::numeric_limits<float>::quiet_NaN());
    }
    return {out, mean, var, preact};
  }
  const at::Tensor wt = dw_weight_matrix(weight, false), b = f32(bias), bnw = f32(bn_weight), bnb = f32(bn_bias);
  // Training stores z in preact, or in out as scratch until the statistics are known.
  at::Tensor zbuf = save_preact ? preact : (use_batch_stats ? out : at::Tensor());
  at::Tensor pmean, pm2;
  if (use_batch_stats) {
    pmean = at::empty({g.tiles, g.C}, fopt);
    pm2 = at::empty({g.tiles, g.C}, fopt);
  }
  const BnArgs bn{mean.data_ptr<float>(), var.data_ptr<float>(), ptr_or_null(bnw), ptr_or_null(bnb),
                  static_cast<float>(eps)};

  CONVMIXER_DW_DISPATCH(x.scalar_type(), "dw_block_forward_cuda", [&] {
    ConvArgs<scalar_t, scalar_t> ca{};
    ca.g = g;
    ca.mode = use_batch_stats ? kTrain : kEval;
    ca.act = act;
    ca.in = x.data_ptr<scalar_t>();
    ca.s_in = strides_of(x);
    ca.wt = wt.data_ptr<float>();
    ca.bias = ptr_or_null(b);
    ca.z = zbuf.defined() ? zbuf.data_ptr<scalar_t>() : nullptr;
    ca.s_z = strides_of(out);  // preact and out share the output layout
    ca.out = out.data_ptr<scalar_t>();
    ca.s_out = strides_of(out);
    ca.bn = bn;
    ca.pmean = use_batch_stats ? pmean.data_ptr<float>() : nullptr;
    ca.pm2 = use_batch_stats ? pm2.data_ptr<float>() : nullptr;
    launch_conv(ca);
    if (!use_batch_stats) return;

    launch(finalize_stats_kernel, cdiv(g.C, THREADS), 0,
           FinalizeArgs{g, pmean.data_ptr<float>(), pm2.data_ptr<float>(), mean.data_ptr<float>(),
                        var.data_ptr<float>()});
    NormArgs<scalar_t> na{};
    na.g = g;
    na.act = act;
    na.channels_last = fmt == at::MemoryFormat::ChannelsLast;
    na.x = x.data_ptr<scalar_t>();
    na.s_x = strides_of(x);
    na.z = zbuf.data_ptr<scalar_t>();
    na.out = out.data_ptr<scalar_t>();
    na.bn = bn;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    launch(norm_kernel<scalar_t>, std::min<int64_t>(cdiv(x.numel(), THREADS), sms * 32), 0, na);
  });
  return {out, mean, var, preact};
}

// Column sums (double, row order) of a (rows, cols) float32 matrix.
at::Tensor reduce_rows(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = m.numel() / std::max<int64_t>(rows, 1);
  at::Tensor out = at::empty({cols}, m.options().dtype(at::kDouble));
  launch(reduce_rows_kernel, cdiv(cols, THREADS), 0, ReduceArgs{m.data_ptr<float>(), rows, cols, out.data_ptr<double>()});
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact, bool use_batch_stats, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  const char* where = "dw_block_backward_kernel (cuda)";
  check_dw_block_inputs(x, weight, where, at::kCUDA);
  check_dw_block_backward_args(grad_out, x, preact, output_mask, where);
  TORCH_CHECK(grad_out.device() == x.device(), where, ": grad_out must be on ", x.device(), " like x");
  TORCH_CHECK(mean.numel() == x.size(1) && var.numel() == x.size(1), where,
              ": mean and var must have C = ", x.size(1), " entries, got ", mean.numel(), " and ", var.numel());
  TORCH_CHECK(mean.device() == x.device() && var.device() == x.device(), where, ": mean and var must be on ",
              x.device(), " like x");
  TORCH_CHECK(preact.numel() == 0 || preact.device() == x.device(), where, ": preact must be on ", x.device());
  check_same_device(bias, x, "bias", where);
  check_same_device(bn_weight, x, "bn_weight", where);
  const int act = parse_act(activation, where);
  const c10::cuda::CUDAGuard guard(x.device());

  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2],
             need_dbnw = output_mask[3], need_dbnb = output_mask[4];
  const Geometry g = make_geometry(x, weight.size(2));
  const auto fmt = output_format(x);
  const auto fopt = x.options().dtype(at::kFloat);
  auto empty = [&]() { return at::empty({0}, x.options()); };
  const bool need_conv = need_dx || need_dw || need_db;
  const bool need_stats = need_dbnw || need_dbnb || (use_batch_stats && need_conv);
  at::Tensor dx = empty(), dweight = empty(), dbias = empty(), dbnw = at::empty({0}, fopt), dbnb = at::empty({0}, fopt);
  if (x.numel() == 0) {
    if (need_dx) dx = at::empty(x.sizes(), x.options().memory_format(fmt));
    if (need_dw) dweight = at::zeros(weight.sizes(), weight.options());
    if (need_db) dbias = at::zeros({g.C}, weight.options());
    if (need_dbnw) dbnw = at::zeros({g.C}, fopt);
    if (need_dbnb) dbnb = at::zeros({g.C}, fopt);
    return {dx, dweight, dbias, dbnw, dbnb};
  }
  if (!need_conv && !need_stats) return {dx, dweight, dbias, dbnw, dbnb};

  const at::Tensor mean32 = mean.to(at::kFloat).contiguous(), var32 = var.to(at::kFloat).contiguous();
  const at::Tensor bnw = f32(bn_weight);
  const double count = static_cast<double>(g.N * g.H * g.W);

  CONVMIXER_DW_DISPATCH(x.scalar_type(), "dw_block_backward_cuda", [&] {
    // The pre-activation: the saved one, or recomputed from x.
    at::Tensor z = preact;
    if (preact.numel() == 0) {
      z = at::empty(x.sizes(), x.options().memory_format(fmt));
      const at::Tensor wt = dw_weight_matrix(weight, false), b = f32(bias);
      ConvArgs<scalar_t, scalar_t> ca{};
      ca.g = g;
      ca.mode = kZOnly;
      ca.act = act;
      ca.in = x.data_ptr<scalar_t>();
      ca.s_in = strides_of(x);
      ca.wt = wt.data_ptr<float>();
      ca.bias = ptr_or_null(b);
      ca.z = z.data_ptr<scalar_t>();
      ca.s_z = strides_of(z);
      launch_conv(ca);
    }

    at::Tensor dz = need_conv ? at::empty(x.sizes(), fopt.memory_format(fmt)) : at::Tensor();
    at::Tensor pdb = need_db ? at::empty({g.tiles, g.C}, fopt) : at::Tensor();
    at::Tensor psum = at::empty({g.tiles, g.C}, fopt), pdot = at::empty({g.tiles, g.C}, fopt);
    ElemArgs<scalar_t> ea{};
    ea.g = g;
    ea.act = act;
    ea.train = false;
    ea.dy = grad_out.data_ptr<scalar_t>();
    ea.s_dy = strides_of(grad_out);
    ea.z = z.data_ptr<scalar_t>();
    ea.s_z = strides_of(z);
    ea.mean = mean32.data_ptr<float>();
    ea.var = var32.data_ptr<float>();
    ea.eps = static_cast<float>(eps);
    ea.bn_weight = ptr_or_null(bnw);
    ea.psum = psum.data_ptr<float>();
    ea.pdot = pdot.data_ptr<float>();
    ea.pdb = need_db ? pdb.data_ptr<float>() : nullptr;
    ea.dz = need_conv ? dz.data_ptr<float>() : nullptr;
    ea.s_dz = need_conv ? strides_of(dz) : Strides4{0, 0, 0, 0};

    if (need_stats) {
      // Eval: dz needs no statistics, so it comes out of the same pass.
      ea.stats = true;
      ea.dz_pass = need_conv && !use_batch_stats;
      launch(bwd_elem_kernel<scalar_t>, g.blocks, 0, ea);
      const at::Tensor sdy = reduce_rows(psum), sdyx = reduce_rows(pdot);
      if (need_dbnw) dbnw = sdyx.to(at::kFloat);
      if (need_dbnb) dbnb = sdy.to(at::kFloat);
      if (need_conv && use_batch_stats) {
        const at::Tensor gw = bnw.defined() ? bnw.to(at::kDouble) : at::ones({g.C}, sdy.options());
        const at::Tensor mg = (gw * sdy / count).to(at::kFloat), mgx = (gw * sdyx / count).to(at::kFloat);
        ea.stats = false;
        ea.dz_pass = true;
        ea.train = true;
        ea.mean_g = mg.data_ptr<float>();
        ea.mean_gx = mgx.data_ptr<float>();
        launch(bwd_elem_kernel<scalar_t>, g.blocks, 0, ea);
      }
    } else if (need_conv) {
      ea.stats = false;
      ea.dz_pass = true;
      launch(bwd_elem_kernel<scalar_t>, g.blocks, 0, ea);
    }
    if (!need_conv) return;

    if (need_dx) {
      dx = at::empty(x.sizes(), x.options().memory_format(fmt));
      const at::Tensor wflip = dw_weight_matrix(weight, true);
      ConvArgs<float, scalar_t> da{};
      da.g = g;
      da.mode = kDgrad;
      da.act = act;
      da.in = dz.data_ptr<float>();
      da.s_in = strides_of(dz);
      da.wt = wflip.data_ptr<float>();
      da.out = dx.data_ptr<scalar_t>();
      da.s_out = strides_of(dx);
      da.dy = grad_out.data_ptr<scalar_t>();
      da.s_dy = strides_of(grad_out);
      launch_conv(da);
    }
    if (need_dw) {
      // Splits of the tile sequence: about 4 blocks per SM in all, each split's tiles in order.
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const int64_t want = std::max<int64_t>(1, std::min<int64_t>(g.tiles, 4 * sms / g.groups));
      const int64_t per_split = cdiv(g.tiles, want), splits = cdiv(g.tiles, per_split);
      const int64_t kk = static_cast<int64_t>(g.k) * g.k;
      at::Tensor pw = at::empty({splits, kk, g.C}, fopt);
      WgradArgs<scalar_t> wa{};
      wa.g = g;
      wa.x = x.data_ptr<scalar_t>();
      wa.s_x = strides_of(x);
      wa.dz = dz.data_ptr<float>();
      wa.s_dz = strides_of(dz);
      wa.tiles_per_split = per_split;
      wa.pw = pw.data_ptr<float>();
      launch(wgrad_kernel<scalar_t>, splits * g.groups, wgrad_smem(g), wa);
      dweight = reduce_rows(pw).view({kk, g.C}).t().reshape(weight.sizes()).to(weight.scalar_type()).contiguous();
    }
    if (need_db) dbias = reduce_rows(pdb).to(weight.scalar_type());
  });
  return {dx, dweight, dbias, dbnw, dbnb};
}

}  // namespace

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("dw_block_forward_kernel", &dw_block_forward_cuda);
  m.impl("dw_block_backward_kernel", &dw_block_backward_cuda);
}

}  // namespace cuda
}  // namespace convmixer_kernels
