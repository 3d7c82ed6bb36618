// Depthwise block v2: the register-blocked eval forward kernel (issue 22), NCHW.
//   out = x + BN(act(round(dwconv_k(x) + b)))  with the running statistics,
// the same semantics and activation numerics as conv_kernel's EVAL mode (dw_block_kernels.cuh).
//
// Tiling. One warp owns a tile of TR = 8 * R rows x TC = 8 * QC columns of PPW = 4 / QC planes
// (sub-warps of 8 * QC lanes, one plane each). In a sub-warp, lane sl = rg * QC + q owns the
// R consecutive rows rg * R .. rg * R + R - 1 and the 8 columns q * 8 .. q * 8 + 7 of its plane
// tile: R x 8 float32 accumulators in registers. The tile spans the whole plane width (the
// launcher takes W <= TC), so its left and right halos are zero; tiles go down the rows.
//   - big planes  (QC = 4, R = 4): 32 x 32 tile, one plane per warp (ConvMixer's 32x32 tokens);
//   - small planes (QC = 2, R = 2): 16 x 16 tile, two planes per warp (CIFAR's 16x16 planes),
//     so that no lane idles on a 16-wide plane.
// Staging: the warp copies its (TR + K - 1) halo rows into shared memory as float32, in
// units of 8 columns (one 16-byte load for 2-byte types, two for float32, converted once),
// interior column w at shared column w + 8 (16-byte aligned), zero columns on both sides.
// Taps: all K x K weights of the channel in registers; input row wr of the lane's window is
// read once from shared memory (four 16-byte loads: 16 floats from column q * 8 + 4) and
// feeds every output row r with 0 <= wr - r < K. Per output the taps are accumulated in the
// reference order (kernel row, then kernel column), as conv_kernel does.
// Epilogue: bias, act, BN hoisted per channel (scale = bn_w / sqrt(var + eps) with correctly
// rounded steps, shift = bn_b - mean * scale: y = act * scale + shift), residual x from the
// staged tile, 16-byte stores where the rows allow them (W % 8 == 0 and aligned pointers).
// Offsets: int64 for the plane base, int32 inside a plane (the launcher checks H * W < 2^31).
//
// No atomics, no cross-warp communication: each warp writes only its tile.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dw_block_common.cuh"
#include "dw_block_v2_units.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace v2 {
namespace {  // one translation unit: only dw_block_v2.cu includes this

using namespace v2_units;  // load8, store8, subwarp_sum

constexpr int WARPS = 4;  // warps per block (independent tiles)
constexpr int THREADS_V2 = WARPS * 32;

template <typename T>
struct V2EvalArgs {
  const T* __restrict__ x;     // (N, C, H, W) contiguous
  T* __restrict__ out;         // (N, C, H, W) contiguous
  T* __restrict__ z;           // pre-activation store (save_preact), nullable
  const float* __restrict__ wt;    // (C, K*K) float32
  const float* __restrict__ bias;  // (C,) float32, nullable
  const float* __restrict__ mean;  // running statistics (C,) float32
  const float* __restrict__ var;
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ bnb;  // nullable
  float eps;
  int act;
  int C, H, W;
  int64_t planes;   // N * C
  int64_t tiles_h;  // row tiles per plane
  int64_t warps;    // work items: ceil(planes / PPW) * tiles_h
  bool vec;         // W % 8 == 0 and x, out, z 16-byte aligned: 16-byte loads and stores
};

// Shape of a tile configuration.
template <int K, int QC, int R>
struct Tile {
  static constexpr int PAD = K / 2;
  static constexpr int PPW = 4 / QC;        // planes per warp
  static constexpr int SUB = 32 / PPW;      // lanes per plane
  static constexpr int TR = 8 * R;          // rows per tile
  static constexpr int TC = 8 * QC;         // columns per tile (>= W)
  static constexpr int SH = TR + K - 1;     // staged rows
  static constexpr int P = TC + 16;         // shared row pitch (floats): 8 zero columns either side
  static constexpr int WARP_FLOATS = PPW * SH * P;
  static_assert(QC == 2 || QC == 4, "4 or 2 column groups of 8");
  static_assert(K >= 1 && K <= 9 && K % 2 == 1, "the 16-float window covers k <= 9");
  static_assert(SUB == 8 * QC, "8 row groups per plane");
};

// The epilogue of one lane for activation ACT: R x 8 outputs.
template <int ACT, typename T, int K, int QC, int R>
__device__ __forceinline__ void epilogue(const V2EvalArgs<T>& a, const float (&acc)[R][8], const float* srow_x,
                                         int64_t pbase, int h, int col0, bool pvalid, float b, float scale,
                                         float shift) {
  using S = Tile<K, QC, R>;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int hr = h + r;
    if (!pvalid || hr >= a.H || col0 >= a.W) continue;
    float xv[8], o[8], zf[8];
    const float4 x0 = reinterpret_cast<const float4*>(srow_x + r * S::P)[0];
    const float4 x1 = reinterpret_cast<const float4*>(srow_x + r * S::P)[1];
    xv[0] = x0.x; xv[1] = x0.y; xv[2] = x0.z; xv[3] = x0.w;
    xv[4] = x1.x; xv[5] = x1.y; xv[6] = x1.z; xv[7] = x1.w;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      zf[c] = acc[r][c] + b;
      const float zs = to_f(from_f<T>(zf[c]));  // the stored pre-activation, as conv_kernel
      const float y = act_fwd(zs, ACT);
      o[c] = xv[c] + fmaf(y, scale, shift);
    }
    const int off = hr * a.W + col0;  // int32 inside the plane
    if (a.vec) {
      store8<T>(a.out + pbase + off, o);
      if (a.z != nullptr) store8<T>(a.z + pbase + off, zf);
    } else {
#pragma unroll
      for (int c = 0; c < 8; ++c) {
        if (col0 + c >= a.W) break;
        a.out[pbase + off + c] = from_f<T>(o[c]);
        if (a.z != nullptr) a.z[pbase + off + c] = from_f<T>(zf[c]);
      }
    }
  }
}

// Staging and taps of one warp's tile (the part eval_kernel and train_kernel share): stages
// the warp's halo rows of planes pg * PPW .. into ws, then accumulates this lane's R x 8
// outputs into acc. A: V2EvalArgs<T> or V2TrainArgs<T> (x, wt, C, H, W, planes, vec).
template <typename T, int K, int QC, int R, typename A>
__device__ __forceinline__ void conv_tile(const A& a, float* ws, int64_t pg, int h0, int lane, float (&acc)[R][8]) {
  using S = Tile<K, QC, R>;
  // ---- staging: interior units of 8 columns, then the zero side columns ----
  constexpr int UNITS = S::PPW * S::SH * QC;
#pragma unroll 2
  for (int e = lane; e < UNITS; e += 32) {
    const int u = e % QC, rr = (e / QC) % S::SH, pp = e / (QC * S::SH);
    const int64_t p = pg * S::PPW + pp;
    const int h = h0 - S::PAD + rr, col = u * 8;
    float v[8];
#pragma unroll
    for (int c = 0; c < 8; ++c) v[c] = 0.0f;
    if (p < a.planes && h >= 0 && h < a.H && col < a.W) {
      const T* src = a.x + p * a.H * a.W + (h * a.W + col);
      if (a.vec) {
        load8<T>(src, v);
      } else {
#pragma unroll
        for (int c = 0; c < 8; ++c)
          if (col + c < a.W) v[c] = to_f(src[c]);
      }
    }
    float4* dst = reinterpret_cast<float4*>(ws + (pp * S::SH + rr) * S::P + 8 + col);
    dst[0] = make_float4(v[0], v[1], v[2], v[3]);
    dst[1] = make_float4(v[4], v[5], v[6], v[7]);
  }
  constexpr int SIDES = S::PPW * S::SH * 2;
  for (int e = lane; e < SIDES; e += 32) {
    const int row = e >> 1;
    *reinterpret_cast<float4*>(ws + row * S::P + ((e & 1) ? S::TC + 8 : 4)) = make_float4(0.f, 0.f, 0.f, 0.f);
  }
  __syncwarp();

  // ---- this lane: plane, rows, columns; the channel's weights ----
  const int pp = lane / S::SUB, sl = lane % S::SUB, q = sl % QC, rg = sl / QC;
  const int64_t p = pg * S::PPW + pp;
  const bool pvalid = p < a.planes;
  const int c = static_cast<int>((pvalid ? p : a.planes - 1) % a.C);
  float wv[K * K];
  const float* wc = a.wt + static_cast<int64_t>(c) * (K * K);
#pragma unroll
  for (int t = 0; t < K * K; ++t) wv[t] = __ldg(wc + t);

#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) acc[r][cc] = 0.0f;

  const float* srow = ws + (pp * S::SH + rg * R) * S::P + q * 8 + 4;
#pragma unroll
  for (int wr = 0; wr < R + K - 1; ++wr) {
    float win[16];
#pragma unroll
    for (int v4 = 0; v4 < 4; ++v4) {
      const float4 f = reinterpret_cast<const float4*>(srow + wr * S::P)[v4];
      win[4 * v4] = f.x; win[4 * v4 + 1] = f.y; win[4 * v4 + 2] = f.z; win[4 * v4 + 3] = f.w;
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int i = wr - r;  // kernel row feeding output row r from this input row
      if (i < 0 || i >= K) continue;
#pragma unroll
      for (int j = 0; j < K; ++j)
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) acc[r][cc] = fmaf(win[cc + j + 4 - S::PAD], wv[i * K + j], acc[r][cc]);
    }
  }
}

template <typename T, int K, int QC, int R>
__global__ void __launch_bounds__(THREADS_V2) eval_kernel(const V2EvalArgs<T> a) {
  using S = Tile<K, QC, R>;
  __shared__ __align__(16) float smem[WARPS * S::WARP_FLOATS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;  // warp-uniform; no block-wide barrier below
  const int64_t pg = item / a.tiles_h;
  const int h0 = static_cast<int>(item - pg * a.tiles_h) * S::TR;
  float* ws = smem + warp * S::WARP_FLOATS;
  float acc[R][8];
  conv_tile<T, K, QC, R>(a, ws, pg, h0, lane, acc);

  // Per-channel terms, once per lane.
  const int pp = lane / S::SUB, sl = lane % S::SUB, q = sl % QC, rg = sl / QC;
  const int64_t p = pg * S::PPW + pp;
  const bool pvalid = p < a.planes;
  const int c = static_cast<int>((pvalid ? p : a.planes - 1) % a.C);
  const float b = a.bias != nullptr ? a.bias[c] : 0.0f;
  const float bw = a.bnw != nullptr ? a.bnw[c] : 1.0f, bb = a.bnb != nullptr ? a.bnb[c] : 0.0f;
  const float scale = inv_std(a.var[c], a.eps) * bw;
  const float shift = fmaf(-a.mean[c], scale, bb);
  const int64_t pbase = (pvalid ? p : 0) * a.H * a.W;
  const int h = h0 + rg * R, col0 = q * 8;
  const float* srow_x = ws + (pp * S::SH + rg * R + S::PAD) * S::P + 8 + col0;
  switch (a.act) {
    case kGelu:
      epilogue<kGelu, T, K, QC, R>(a, acc, srow_x, pbase, h, col0, pvalid, b, scale, shift);
      break;
    case kGeluTanh:
      epilogue<kGeluTanh, T, K, QC, R>(a, acc, srow_x, pbase, h, col0, pvalid, b, scale, shift);
      break;
    default:
      epilogue<kRelu, T, K, QC, R>(a, acc, srow_x, pbase, h, col0, pvalid, b, scale, shift);
      break;
  }
}

// ---- training forward (batch statistics) ------------------------------------------------
// Pass 1, train_kernel: the same staging and taps as eval_kernel; the epilogue stores the
// rounded pre-activation z = round(conv(x) + b) (into the saved pre-activation, or into out as
// scratch, as conv_kernel's TRAIN mode), and writes this tile's per-plane partial statistics
// of act(z): the tile mean and M2 = sum (act - mean)^2 (two passes over the values held in
// registers; sums over the sub-warp in a fixed butterfly order), at row t = n * tiles_h + th
// of (N * tiles_h, C) float32 matrices. No atomics.
// Pass 2, finalize_kernel: per channel, Chan's combination of the tile partials in t order, in
// double (as finalize_stats_kernel of v1): batch mean and biased variance, and the per-channel
// scale and shift of the normalisation.
// Pass 3, norm_kernel: out = x + act(z) * scale + shift (scale = bn_w / sqrt(var + eps),
// shift = bn_b - mean * scale, per channel from finalize_kernel, as eval_kernel hoists them;
// v1's norm_kernel computes (act - mean) * invstd * w + b per element), 8 consecutive elements
// per lane, 16-byte loads and stores where the plane allows them.

template <typename T>
struct V2TrainArgs {
  const T* __restrict__ x;         // (N, C, H, W) contiguous
  T* __restrict__ z;               // pre-activation store (preact, or out as scratch)
  const float* __restrict__ wt;    // (C, K*K) float32
  const float* __restrict__ bias;  // (C,) float32, nullable
  float* __restrict__ pmean;       // (N * tiles_h, C) float32
  float* __restrict__ pm2;
  int act;
  int C, H, W;
  int64_t planes;   // N * C
  int64_t tiles_h;  // row tiles per plane
  int64_t warps;    // ceil(planes / PPW) * tiles_h
  bool vec;         // W % 8 == 0 and x, z 16-byte aligned
};

template <int ACT, typename T, int K, int QC, int R>
__device__ __forceinline__ void train_epilogue(const V2TrainArgs<T>& a, float (&acc)[R][8], int64_t p, bool pvalid,
                                               int c, int h0, int h, int col0, bool leader) {
  using S = Tile<K, QC, R>;
  const float b = a.bias != nullptr ? a.bias[c] : 0.0f;
  const int64_t pbase = (pvalid ? p : 0) * a.H * a.W;
  float sum = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int hr = h + r;
    const bool rvalid = pvalid && hr < a.H && col0 < a.W;
    float zf[8];
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) {
      zf[cc] = acc[r][cc] + b;
      const float zs = to_f(from_f<T>(zf[cc]));  // the stored pre-activation, as conv_kernel
      const bool valid = rvalid && col0 + cc < a.W;
      if constexpr (ACT == kGeluTanh) {
        // its division has a slow-path call: keep it behind the branch (fewer values live
        // across the calls; computing it for every element spilled for float16, k = 3 and 5)
        acc[r][cc] = valid ? act_fwd(zs, ACT) : 0.0f;
      } else {
        // act for every element (outside the plane it acts on the zero-padded conv), then a
        // select: no branch per element around the activation
        const float av = act_fwd(zs, ACT);
        acc[r][cc] = valid ? av : 0.0f;
      }
      sum += acc[r][cc];
    }
    if (!rvalid) continue;
    const int off = hr * a.W + col0;  // int32 inside the plane
    if (a.vec) {
      store8<T>(a.z + pbase + off, zf);
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        if (col0 + cc >= a.W) break;
        a.z[pbase + off + cc] = from_f<T>(zf[cc]);
      }
    }
  }
  // Partial statistics of this tile of plane p: rows h0 .. h0 + TR - 1 (those in the plane), all W.
  const int rows = a.H - h0 < S::TR ? a.H - h0 : S::TR;
  const float n_tile = static_cast<float>(rows * a.W);
  const float mean = subwarp_sum<S::SUB>(sum) / n_tile;
  float m2 = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool rvalid = h + r < a.H;
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) {
      const float d = acc[r][cc] - mean;
      m2 += (rvalid && col0 + cc < a.W) ? d * d : 0.0f;
    }
  }
  m2 = subwarp_sum<S::SUB>(m2);
  if (leader && pvalid) {
    const int64_t n = p / a.C;
    const int64_t t = n * a.tiles_h + h0 / S::TR;
    a.pmean[t * a.C + c] = mean;
    a.pm2[t * a.C + c] = m2;
  }
}

template <typename T, int K, int QC, int R>
__global__ void __launch_bounds__(THREADS_V2) train_kernel(const V2TrainArgs<T> a) {
  using S = Tile<K, QC, R>;
  __shared__ __align__(16) float smem[WARPS * S::WARP_FLOATS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;  // warp-uniform; no block-wide barrier below
  const int64_t pg = item / a.tiles_h;
  const int h0 = static_cast<int>(item - pg * a.tiles_h) * S::TR;
  float* ws = smem + warp * S::WARP_FLOATS;
  float acc[R][8];
  conv_tile<T, K, QC, R>(a, ws, pg, h0, lane, acc);

  const int pp = lane / S::SUB, sl = lane % S::SUB, q = sl % QC, rg = sl / QC;
  const int64_t p = pg * S::PPW + pp;
  const bool pvalid = p < a.planes;
  const int c = static_cast<int>((pvalid ? p : a.planes - 1) % a.C);
  const int h = h0 + rg * R, col0 = q * 8;
  switch (a.act) {
    case kGelu:
      train_epilogue<kGelu, T, K, QC, R>(a, acc, p, pvalid, c, h0, h, col0, sl == 0);
      break;
    case kGeluTanh:
      train_epilogue<kGeluTanh, T, K, QC, R>(a, acc, p, pvalid, c, h0, h, col0, sl == 0);
      break;
    default:
      train_epilogue<kRelu, T, K, QC, R>(a, acc, p, pvalid, c, h0, h, col0, sl == 0);
      break;
  }
}

struct V2FinalizeArgs {
  const float* __restrict__ pmean;  // (N * tiles_h, C)
  const float* __restrict__ pm2;
  float* __restrict__ mean;  // (C,)
  float* __restrict__ var;
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ bnb;  // nullable
  float* __restrict__ scale;      // (C,): the normalisation's per-channel terms, for norm_kernel
  float* __restrict__ shift;
  float eps;
  int64_t N, C;
  int H, W, TR;
  int64_t tiles_h;
};

// Batch mean and biased variance per channel: Chan's combination of the tile partials in
// tile order (n, then th), in double.
__global__ void __launch_bounds__(256) finalize_kernel(const V2FinalizeArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  ChanStats s;
  const int64_t tiles = a.N * a.tiles_h;
  for (int64_t t = 0; t < tiles; ++t) {
    const int64_t th = t % a.tiles_h;
    const int64_t rows = a.H - th * a.TR < a.TR ? a.H - th * a.TR : a.TR;
    s.add(static_cast<double>(rows * a.W), a.pmean[t * a.C + c], a.pm2[t * a.C + c]);
  }
  // As eval_kernel: scale = bn_w / sqrt(var + eps) (correctly rounded steps), shift = bn_b - mean * scale.
  finalize_channel(s, c, a.bnw, a.bnb, a.eps, a.mean, a.var, a.scale, a.shift);
}

template <typename T>
struct V2NormArgs {
  const T* __restrict__ x;  // (N, C, H, W) contiguous
  const T* z;               // contiguous; may alias out (each element read, then written, by one lane)
  T* out;
  const float* __restrict__ scale;  // (C,) from finalize_kernel
  const float* __restrict__ shift;
  int act;
  int C;
  int HW;              // elements per plane
  int chunks;          // ceil(HW / 256): chunks of 256 elements (32 lanes x 8) per plane
  int64_t items;       // planes * chunks: one per warp
  bool vec;            // HW % 8 == 0 and x, z, out 16-byte aligned
};

template <int ACT, typename T>
__device__ __forceinline__ void norm8(const V2NormArgs<T>& a, int64_t base, int i0, float scale, float shift) {
  if (a.vec && i0 + 8 <= a.HW) {
    float xv[8], zv[8];
    load8<T>(a.z + base + i0, zv);
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) zv[cc] = fmaf(act_fwd(zv[cc], ACT), scale, shift);
    load8<T>(a.x + base + i0, xv);  // after the activations: fewer live registers across them
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) zv[cc] += xv[cc];
    store8<T>(a.out + base + i0, zv);
    return;
  }
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
    const int i = i0 + cc;
    if (i >= a.HW) break;
    const float y = fmaf(act_fwd(to_f(a.z[base + i]), ACT), scale, shift);
    a.out[base + i] = from_f<T>(to_f(a.x[base + i]) + y);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS_V2) norm_kernel(const V2NormArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.items) return;
  const int64_t p = item / a.chunks;
  const int i0 = static_cast<int>(item - p * a.chunks) * 256 + lane * 8;
  if (i0 >= a.HW) return;
  const int c = static_cast<int>(p % a.C);
  const float scale = a.scale[c], shift = a.shift[c];
  const int64_t base = p * a.HW;
  switch (a.act) {
    case kGelu: norm8<kGelu, T>(a, base, i0, scale, shift); break;
    case kGeluTanh: norm8<kGeluTanh, T>(a, base, i0, scale, shift); break;
    default: norm8<kRelu, T>(a, base, i0, scale, shift); break;
  }
}

}  // namespace
}  // namespace v2
}  // namespace cuda
}  // namespace convmixer_kernels
