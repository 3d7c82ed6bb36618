// Depthwise block v2: the register-blocked backward kernels (issue 22), NCHW.
//   block:     out = x + BN(act(z)),  z = round(dwconv_k(x) + b)
//   backward:  dz = act'(z) * (dy * bn_w - mg - xhat * mgx) * invstd   (training; eval: mg = mgx = 0)
//              dx = dwconv_k(dz, flipped kernel) + dy                  (the residual)
//              dW[i][j] = sum dz[h][w] * x[h + i - pad][w + j - pad],  db = sum dz
//              dbn_b = sum dy, dbn_w = sum dy * xhat                   (per channel, over N*H*W)
// the same semantics and formulas as v1's bwd_elem_kernel / conv_kernel(DGRAD) / wgrad_kernel
// (dw_block_kernels.cuh).
//
// Tiling: as the v2 eval forward (dw_block_v2.cuh). One warp owns a tile of TR = 8 * R rows x
// TC = 8 * QC columns (the whole plane width, W <= TC) of PPW = 4 / QC planes; in a sub-warp
// of 8 * QC lanes, lane sl = rg * QC + q owns rows rg * R .. rg * R + R - 1 and columns
// q * 8 .. q * 8 + 7 of its plane tile. 32 x 32 tiles (QC = R = 4) for W in 17..32, 16 x 16
// tiles with two planes per warp (QC = R = 2) for W <= 16; tiles go down the rows.
//
// bwd_kernel (one pass over x, dy, z; writes dx and per-tile partial sums):
//  1. staging: dz of the tile's rows and its K - 1 halo rows (the rows of the image in
//     h0 - pad .. h0 + TR + pad - 1; halo rows inside the image are recomputed from dy and z,
//     at a row-tile boundary only) into shared memory as float32, in units of 8 columns
//     (16-byte loads of dy and z), with zero rows outside the image and zero side columns.
//     The per-tile sums of dz (bias gradient) and, in eval, of dy and dy * xhat (BN
//     gradients) over the tile's own rows accumulate in registers on the way.
//  2. dgrad: exactly the forward's register-blocked taps on the staged dz with the flipped
//     kernel (all K x K weights in registers, each 16-float window row read once from shared
//     memory and used by every output row it feeds; per output the taps are summed in v1's
//     order), + dy (16-byte reload), rounded once, 16-byte stores.
//  3. wgrad: the lane's R x 8 x values in registers (16-byte loads, converted once); for each
//     group of G kernel rows, G x K accumulators: acc[i'][j'] += x[r][c] * dz_window(r + i')[c + j'],
//     (i' = K - 1 - i: the same window geometry as the dgrad), then a butterfly sum over the
//     sub-warp's lanes (fixed order) and one lane stores the tile's partial of each tap.
// Partial sums: part[(row * C + c) * S + s], row = n * tiles_h + tile, S = K*K + 3 (the taps in
// weight order, sum dz, sum dy, sum dy * xhat); a column-sum kernel in double adds the rows in
// order. No atomics: the results are bitwise reproducible run to run. Slots of gradients not
// asked for (the taps without dweight, the dy sums in training) are not written; their column
// sums are computed and ignored.
//
// stats_kernel (training only; the pass before bwd_kernel, since dz needs the batch sums):
// per-tile sums of dy and dy * xhat over the tile's rows, part[(row * C + c) * 2 + s].
//
// Offsets: int64 for the plane base, int32 inside a plane (the launcher checks H * W < 2^31).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dw_block_common.cuh"
#include "dw_block_v2_units.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace v2b {
namespace {  // one translation unit: only dw_block_v2_backward.cu includes this

using namespace v2_units;  // load8, store8, subwarp_sum

constexpr int WARPS = 4;  // warps per block (independent tiles)
constexpr int THREADS_B = WARPS * 32;

// ---- 8-element row units: dw_block_v2_units.cuh, plus the masked load of the scalar path ----

// The first n (< 8 allowed) elements, the rest zero: the scalar path (W % 8 != 0 or a
// misaligned pointer).
template <typename T>
__device__ __forceinline__ void load8_masked(const T* __restrict__ p, int n, float v[8]) {
#pragma unroll
  for (int c = 0; c < 8; ++c) v[c] = c < n ? to_f(p[c]) : 0.0f;
}

template <typename T>
__device__ __forceinline__ void load_unit(const T* __restrict__ p, bool vec, int n, float v[8]) {
  if (vec)
    load8<T>(p, v);
  else
    load8_masked<T>(p, n, v);
}

// ---- shapes -------------------------------------------------------------------------------

template <int K, int QC, int R>
struct Tile {
  static constexpr int PAD = K / 2;
  static constexpr int PPW = 4 / QC;        // planes per warp
  static constexpr int SUB = 32 / PPW;      // lanes per plane
  static constexpr int TR = 8 * R;          // rows per tile
  static constexpr int TC = 8 * QC;         // columns per tile (>= W)
  static constexpr int SH = TR + K - 1;     // staged dz rows
  static constexpr int P = TC + 16;         // shared row pitch (floats): 8 zero columns either side
  static constexpr int WARP_FLOATS = PPW * SH * P;
  static constexpr int KK = K * K;
  static constexpr int S = KK + 3;          // partial sums per (tile, plane)
  // kernel rows per wgrad group: G * K accumulators next to the R x 8 x values
  static constexpr int G = (32 / K) < K ? (32 / K) : K;
  static_assert(QC == 2 || QC == 4, "4 or 2 column groups of 8");
  static_assert(K >= 1 && K <= 9 && K % 2 == 1, "the 16-float window covers k <= 9");
  static_assert(SUB == 8 * QC, "8 row groups per plane");
};

template <typename T>
struct BwdArgs {
  const T* __restrict__ x;   // (N, C, H, W) contiguous
  const T* __restrict__ dy;  // grad_out, contiguous
  const T* __restrict__ z;   // pre-activation, contiguous
  T* __restrict__ dx;        // nullable (not asked for)
  const float* __restrict__ wt;    // (C, K*K) float32, not flipped
  const float* __restrict__ mean;  // (C,) the statistics normalised with
  const float* __restrict__ inv;   // (C,) 1 / sqrt(var + eps), chan_kernel
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ mg;   // training: mean of dy * bn_w per channel
  const float* __restrict__ mgx;  // training: mean of dy * bn_w * xhat per channel
  float* __restrict__ part;       // (N * tiles_h, C, S)
  int act;
  int C, H, W;
  int64_t planes;   // N * C
  int64_t tiles_h;  // row tiles per plane
  int64_t warps;    // work items: ceil(planes / PPW) * tiles_h
  bool vec;         // W % 8 == 0 and every pointer 16-byte aligned
  bool train;       // batch statistics: dz carries the mean terms
  bool need_dx, need_dw;
  bool need_stats;  // eval: write the tile sums of dy and dy * xhat
};

// The per-channel terms of dz.
struct Chan {
  float mean, inv, gw, mg, mgx;
};

// dz and xhat of one element, v1's formulas (bwd_elem_kernel) in the same order. Exact GELU:
// one erff and one expf for act(z) and act'(z) together (act_fwd / act_bwd of v1 each have
// their own); z * (0.5 (1 + erf)) is bitwise v1's 0.5 z (1 + erf) (scaling by 0.5 is exact).
template <int ACT>
__device__ __forceinline__ float dz_of(float z, float dy, const Chan& k, bool train, float& xhat) {
  float a, dadz;
  if constexpr (ACT == kGelu) {
    const float cdf = 0.5f * (1.0f + erff(z * 0.7071067811865476f));
    const float pdf = expf(-0.5f * z * z) * 0.3989422804014327f;
    a = z * cdf;
    dadz = cdf + z * pdf;
  }
  if constexpr (ACT == kGelu) {
    xhat = (a - k.mean) * k.inv;
  } else {
    xhat = (act_fwd(z, ACT) - k.mean) * k.inv;
  }
  const float gv = dy * k.gw;  // gw = 1 without a BN weight: dy * 1 == dy
  const float da = train ? (gv - k.mg - xhat * k.mgx) * k.inv : gv * k.inv;
  if constexpr (ACT == kGelu) {
    return da * dadz;
  } else {
    return act_bwd(z, da, ACT);
  }
}

// Stage 1: dz of the image rows h0 - PAD .. h0 + TR + PAD - 1 of the lane's plane into ws
// (zeroed before), and the lane's share of the tile sums over rows h0 .. h0 + TR - 1.
// VEC: 16-byte units, all 8 columns in the image (no per-element checks).
template <int ACT, bool VEC, typename T, int K, int QC, int R>
__device__ __forceinline__ void stage_dz(const BwdArgs<T>& a, float* ws, int64_t pbase, bool pvalid, int h0,
                                         int sl, const Chan& k, float& sdz, float& sdy, float& sdyx) {
  using S = Tile<K, QC, R>;
  const int lo = h0 - S::PAD > 0 ? h0 - S::PAD : 0;
  const int hi = h0 + S::TR + S::PAD < a.H ? h0 + S::TR + S::PAD : a.H;
  const int units = pvalid ? (hi - lo) * QC : 0;
#pragma unroll 1
  for (int e = sl; e < units; e += S::SUB) {
    const int u = e % QC, h = lo + e / QC, col = u * 8;
    if (col >= a.W) continue;
    const int off = h * a.W + col;
    float dyv[8], zv[8], d[8];
    load_unit<T>(a.dy + pbase + off, VEC, a.W - col, dyv);
    load_unit<T>(a.z + pbase + off, VEC, a.W - col, zv);
    const bool own = h >= h0 && h < h0 + S::TR;
    const int nvalid = VEC ? 8 : a.W - col;
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      float xhat = 0.0f;
      // past W (scalar path) dy = z = 0, but in training dz(0, 0) = act'(0) * (-mg + ...) != 0
      d[c] = c < nvalid ? dz_of<ACT>(zv[c], dyv[c], k, a.train, xhat) : 0.0f;
      if (own) {
        sdz += d[c];
        sdy += dyv[c];
        sdyx += dyv[c] * xhat;
      }
    }
    float4* dst = reinterpret_cast<float4*>(ws + (h - (h0 - S::PAD)) * S::P + 8 + col);
    dst[0] = make_float4(d[0], d[1], d[2], d[3]);
    dst[1] = make_float4(d[4], d[5], d[6], d[7]);
  }
}

template <int ACT, typename T, int K, int QC, int R>
__device__ __forceinline__ void stage_dz_any(const BwdArgs<T>& a, float* ws, int64_t pbase, bool pvalid, int h0,
                                             int sl, const Chan& k, float& sdz, float& sdy, float& sdyx) {
  if (a.vec)
    stage_dz<ACT, true, T, K, QC, R>(a, ws, pbase, pvalid, h0, sl, k, sdz, sdy, sdyx);
  else
    stage_dz<ACT, false, T, K, QC, R>(a, ws, pbase, pvalid, h0, sl, k, sdz, sdy, sdyx);
}

template <typename T, int K, int QC, int R>
__global__ void __launch_bounds__(THREADS_B) bwd_kernel(const BwdArgs<T> a) {
  using S = Tile<K, QC, R>;
  __shared__ __align__(16) float smem[WARPS * S::WARP_FLOATS];
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;  // warp-uniform; no block-wide barrier below
  const int64_t pg = item / a.tiles_h;
  const int tile = static_cast<int>(item - pg * a.tiles_h);
  const int h0 = tile * S::TR;
  float* wbase = smem + warp * S::WARP_FLOATS;

  // ---- this lane: plane, rows, columns, channel terms ----
  const int pp = lane / S::SUB, sl = lane % S::SUB, q = sl % QC, rg = sl / QC;
  const int64_t p = pg * S::PPW + pp;
  const bool pvalid = p < a.planes;
  const int64_t pv = pvalid ? p : a.planes - 1;
  const int64_t n = pv / a.C;  // one 64-bit division for image and channel
  const int c = static_cast<int>(pv - n * a.C);
  const int64_t pbase = pv * a.H * a.W;
  float* ws = wbase + pp * S::SH * S::P;
  Chan k;
  k.mean = a.mean[c];
  k.inv = a.inv[c];
  k.gw = a.bnw != nullptr ? a.bnw[c] : 1.0f;
  k.mg = a.train ? a.mg[c] : 0.0f;
  k.mgx = a.train ? a.mgx[c] : 0.0f;

  // ---- stage 1: dz with its halo rows in shared memory ----
  constexpr int V4 = S::WARP_FLOATS / 4;
#pragma unroll 4
  for (int e = lane; e < V4; e += 32) reinterpret_cast<float4*>(wbase)[e] = make_float4(0.f, 0.f, 0.f, 0.f);
  __syncwarp();
  float sdz = 0.0f, sdy = 0.0f, sdyx = 0.0f;
  switch (a.act) {
    case kGelu:
      stage_dz_any<kGelu, T, K, QC, R>(a, ws, pbase, pvalid, h0, sl, k, sdz, sdy, sdyx);
      break;
    case kGeluTanh:
      stage_dz_any<kGeluTanh, T, K, QC, R>(a, ws, pbase, pvalid, h0, sl, k, sdz, sdy, sdyx);
      break;
    default:
      stage_dz_any<kRelu, T, K, QC, R>(a, ws, pbase, pvalid, h0, sl, k, sdz, sdy, sdyx);
      break;
  }
  __syncwarp();

  const int64_t prow = (n * a.tiles_h + tile) * a.C + c;  // partial row of (n, tile, c)
  float* part = a.part + prow * S::S;
  sdz = subwarp_sum<S::SUB>(sdz);
  if (a.need_stats) {
    sdy = subwarp_sum<S::SUB>(sdy);
    sdyx = subwarp_sum<S::SUB>(sdyx);
  }
  if (pvalid && sl == 0) {
    part[S::KK] = sdz;
    if (a.need_stats) {
      part[S::KK + 1] = sdy;
      part[S::KK + 2] = sdyx;
    }
  }

  const int h = h0 + rg * R, col0 = q * 8;
  const float* srow = ws + (rg * R) * S::P + q * 8 + 4;  // window of the lane's first dz row
  const float* wc = a.wt + static_cast<int64_t>(c) * S::KK;

  // ---- stage 2: dgrad, dx = conv(dz, flipped kernel) + dy ----
  if (a.need_dx) {
    float wv[S::KK];  // the flipped kernel: wv[i' * K + j'] = w[K - 1 - i'][K - 1 - j']
#pragma unroll
    for (int t = 0; t < S::KK; ++t) wv[t] = __ldg(wc + (S::KK - 1 - t));
    float acc[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) acc[r][cc] = 0.0f;
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
        const int i = wr - r;  // flipped kernel row feeding output row r from this dz row
        if (i < 0 || i >= K) continue;
#pragma unroll
        for (int j = 0; j < K; ++j)
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) acc[r][cc] = fmaf(win[cc + j + 4 - S::PAD], wv[i * K + j], acc[r][cc]);
      }
    }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const int hr = h + r;
      if (!pvalid || hr >= a.H || col0 >= a.W) continue;
      const int off = hr * a.W + col0;  // int32 inside the plane
      float dyv[8], o[8];
      load_unit<T>(a.dy + pbase + off, a.vec, a.W - col0, dyv);
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) o[cc] = acc[r][cc] + dyv[cc];
      if (a.vec) {
        store8<T>(a.dx + pbase + off, o);
      } else {
#pragma unroll
        for (int cc = 0; cc < 8; ++cc)
          if (col0 + cc < a.W) a.dx[pbase + off + cc] = from_f<T>(o[cc]);
      }
    }
  }

  // ---- stage 3: wgrad partials of this tile ----
  if (a.need_dw) {
    float xv[R][8];
#pragma unroll
    for (int r = 0; r < R; ++r) {
      if (pvalid && h + r < a.H && col0 < a.W) {
        load_unit<T>(a.x + pbase + (h + r) * a.W + col0, a.vec, a.W - col0, xv[r]);
      } else {
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) xv[r][cc] = 0.0f;
      }
    }
#pragma unroll
    for (int i0 = 0; i0 < K; i0 += S::G) {
      float acc[S::G][K];
#pragma unroll
      for (int gi = 0; gi < S::G; ++gi)
#pragma unroll
        for (int j = 0; j < K; ++j) acc[gi][j] = 0.0f;
      // window rows r + i' for r < R and i' in i0 .. i0 + G - 1
#pragma unroll
      for (int wr = i0; wr < i0 + R + S::G - 1; ++wr) {
        if (wr >= R + K - 1) continue;
        float win[16];
#pragma unroll
        for (int v4 = 0; v4 < 4; ++v4) {
          const float4 f = reinterpret_cast<const float4*>(srow + wr * S::P)[v4];
          win[4 * v4] = f.x; win[4 * v4 + 1] = f.y; win[4 * v4 + 2] = f.z; win[4 * v4 + 3] = f.w;
        }
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const int i = wr - r;  // i' = K - 1 - i of the kernel row
          if (i < i0 || i >= i0 + S::G || i >= K) continue;
#pragma unroll
          for (int j = 0; j < K; ++j)
#pragma unroll
            for (int cc = 0; cc < 8; ++cc)
              acc[i - i0][j] = fmaf(xv[r][cc], win[cc + j + 4 - S::PAD], acc[i - i0][j]);
        }
      }
#pragma unroll
      for (int gi = 0; gi < S::G; ++gi) {
        if (i0 + gi >= K) continue;
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const float v = subwarp_sum<S::SUB>(acc[gi][j]);
          // acc[i'][j'] is the gradient of w[K - 1 - i'][K - 1 - j']
          if (pvalid && sl == 0) part[S::KK - 1 - ((i0 + gi) * K + j)] = v;
        }
      }
    }
  }
}

// ---- training: the tile sums of dy and dy * xhat before the main pass ----

template <typename T>
struct StatsArgs {
  const T* __restrict__ dy;
  const T* __restrict__ z;
  const float* __restrict__ mean;
  const float* __restrict__ inv;  // 1 / sqrt(var + eps), chan_kernel
  float* __restrict__ part;  // (N * tiles_h, C, 2): sum dy, sum dy * xhat
  int act;
  int C, H, W;
  int64_t planes, tiles_h, warps;
  bool vec;
};

template <int ACT, typename T, int QC, int R>
__device__ __forceinline__ void stats_rows(const StatsArgs<T>& a, int64_t pbase, bool pvalid, int h0, int sl,
                                           float mean, float inv, float& sdy, float& sdyx) {
  constexpr int SUB = 8 * QC, TR = 8 * R;
  const int hi = h0 + TR < a.H ? h0 + TR : a.H;
  const int units = pvalid ? (hi - h0) * QC : 0;
#pragma unroll 1
  for (int e = sl; e < units; e += SUB) {
    const int u = e % QC, h = h0 + e / QC, col = u * 8;
    if (col >= a.W) continue;
    const int off = h * a.W + col;
    float dyv[8], zv[8];
    load_unit<T>(a.dy + pbase + off, a.vec, a.W - col, dyv);
    load_unit<T>(a.z + pbase + off, a.vec, a.W - col, zv);
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      const float xhat = (act_fwd(zv[c], ACT) - mean) * inv;
      sdy += dyv[c];
      sdyx += dyv[c] * xhat;
    }
  }
}

template <typename T, int QC, int R>
__global__ void __launch_bounds__(THREADS_B) stats_kernel(const StatsArgs<T> a) {
  constexpr int PPW = 4 / QC, SUB = 8 * QC, TR = 8 * R;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;
  const int64_t pg = item / a.tiles_h;
  const int tile = static_cast<int>(item - pg * a.tiles_h);
  const int h0 = tile * TR;
  const int pp = lane / SUB, sl = lane % SUB;
  const int64_t p = pg * PPW + pp;
  const bool pvalid = p < a.planes;
  const int64_t pv = pvalid ? p : a.planes - 1;
  const int64_t n = pv / a.C;  // one 64-bit division for image and channel
  const int c = static_cast<int>(pv - n * a.C);
  const int64_t pbase = pv * a.H * a.W;
  const float mean = a.mean[c], inv = a.inv[c];
  float sdy = 0.0f, sdyx = 0.0f;
  switch (a.act) {
    case kGelu:
      stats_rows<kGelu, T, QC, R>(a, pbase, pvalid, h0, sl, mean, inv, sdy, sdyx);
      break;
    case kGeluTanh:
      stats_rows<kGeluTanh, T, QC, R>(a, pbase, pvalid, h0, sl, mean, inv, sdy, sdyx);
      break;
    default:
      stats_rows<kRelu, T, QC, R>(a, pbase, pvalid, h0, sl, mean, inv, sdy, sdyx);
      break;
  }
  sdy = subwarp_sum<SUB>(sdy);
  sdyx = subwarp_sum<SUB>(sdyx);
  if (pvalid && sl == 0) {
    float* out = a.part + ((n * a.tiles_h + tile) * a.C + c) * 2;
    out[0] = sdy;
    out[1] = sdyx;
  }
}

// ---- per-channel terms ----
// inv = 1 / sqrt(var + eps) with correctly rounded steps (v1's inv_std), once per channel
// rather than once per warp (its slow path is a call that made ptxas spill around it).
// With `sums` (training, after stats_kernel; (C, 2) float64: sum dy, sum dy * xhat), also
// v1's mean terms of dz, mg = bn_w * sum dy / count and mgx = bn_w * sum dy * xhat / count
// in double rounded to float32, and the BN gradients dbnb = sum dy, dbnw = sum dy * xhat.
struct ChanArgs {
  int64_t C;
  const float* __restrict__ var;
  float eps;
  float* __restrict__ inv;
  const double* __restrict__ sums;  // nullable: then only inv
  const float* __restrict__ bnw;    // nullable
  double count;
  float* __restrict__ mg;
  float* __restrict__ mgx;
  float* __restrict__ dbnb;  // nullable
  float* __restrict__ dbnw;  // nullable
};

__global__ void __launch_bounds__(256) chan_kernel(const ChanArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  if (a.sums == nullptr) {
    a.inv[c] = inv_std(a.var[c], a.eps);
    return;
  }
  const double sdy = a.sums[2 * c], sdyx = a.sums[2 * c + 1];
  const double gw = a.bnw != nullptr ? static_cast<double>(a.bnw[c]) : 1.0;
  a.mg[c] = static_cast<float>(gw * sdy / a.count);
  a.mgx[c] = static_cast<float>(gw * sdyx / a.count);
  if (a.dbnb != nullptr) a.dbnb[c] = static_cast<float>(sdy);
  if (a.dbnw != nullptr) a.dbnw[c] = static_cast<float>(sdyx);
}

// ---- column sums of the partials, rows in order, in double ----

struct ColSumArgs {
  const float* __restrict__ in;  // (rows, cols)
  int64_t rows, cols;
  double* __restrict__ out;  // (cols,)
};

__global__ void __launch_bounds__(256) colsum_kernel(const ColSumArgs a) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= a.cols) return;
  double s = 0.0;
  for (int64_t r = 0; r < a.rows; ++r) s += a.in[r * a.cols + col];
  a.out[col] = s;
}

}  // namespace
}  // namespace v2b
}  // namespace cuda
}  // namespace convmixer_kernels
