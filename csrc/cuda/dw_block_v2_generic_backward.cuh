// Depthwise block v2, generic NCHW kernels (issue 22): the backward (gen_stats_kernel,
// gen_dz_kernel, gen_bwd_kernel) on the tiles, staging and taps of dw_block_v2_generic.cuh (design there and
// in docs/cuda-depthwise.md, "v2 generic NCHW path"); dz with v1's formulas (v2b::dz_of of
// dw_block_v2_backward.cuh), the per-channel terms and column sums by that file's chan_kernel
// and colsum_kernel.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dw_block_common.cuh"
#include "dw_block_v2_backward.cuh"  // v2b::dz_of, Chan, chan_kernel, colsum_kernel
#include "dw_block_v2_generic.cuh"
#include "dw_block_v2_units.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace v2g {
namespace {  // one translation unit: only dw_block_v2_generic.cu includes this

using namespace v2_units;  // load8, store8, subwarp_sum
// ---- backward ------------------------------------------------------------------------------
// Two kernels after the training statistics (gen_stats_kernel, then v2b::chan_kernel):
// (1) gen_dz_kernel, one warp per (channel c, group of images): dz = v1's formulas (dz_of) once
//     per element, from dy and z read through their strides, stored as float32 into a scratch
//     (N, C, H, Wp) with rows of Wp = W rounded up to 8 (columns W .. Wp - 1 hold 0), and the
//     group's sums of dz (and, in eval, of dy and dy * xhat) in a fixed order: one partial row
//     psum[(g * C + c) * 3 + s] (s: sum dz, sum dy, sum dy xhat).
// (2) gen_bwd_kernel, one warp per (channel c, group of images): the warp walks its group's tiles
//     in order (n, th, tw): per tile the dz window (the tile and its halo on all sides, zero
//     outside the image) staged from the scratch (whole 8-column units, two 16-byte loads each,
//     no per-element checks: the padding columns are zero in memory); dgrad: the taps with the
//     flipped kernel + dy, rounded once, stored into dx (contiguous NCHW or channels_last);
//     wgrad: the lane's 4 x 8 own x values (zero outside the image; kept in the lane's slot of
//     shared memory, not registers: with them in registers the kernel spilled at sm_80) times
//     the dz window, per kernel row i' and group of 4 columns j0: 4 sums over the lane's 32
//     pixels, a fixed-order sum over the warp, added by one lane to the warp's accumulator of
//     that tap in shared memory (warp-private, tiles in order). After the last tile the warp
//     writes its partial row part[(g * C + c) * k*k + s] (the taps in weight order).
// The column sums in double over the groups in order give dweight, dbias and the BN sums. No
// atomics. dz once per element: staging it from dy and z inside the tile walk computed it for
// the halo too (about 1.8 times per element at 32 x 32 tiles), most of the dgrad's count.

template <typename T>
struct GenDzArgs {
  const T* __restrict__ dy;
  View vdy;
  const T* __restrict__ z;
  View vz;
  float* __restrict__ dz;  // (N, C, H, wp) float32; nullable (only the sums asked for)
  const float* __restrict__ mean;
  const float* __restrict__ inv;
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ mg;   // training
  const float* __restrict__ mgx;
  float* __restrict__ psum;  // (groups, C, 3)
  int C, H, W, wp;
  int64_t N, group, warps;  // images per group; warps = groups * C
  bool train, need_stats;
};

// ACT a template constant (as gen_stats_kernel: tanh GELU's division slow paths are calls). Launch
// bounds (128, 6): erf GELU at 80 registers, 6 blocks per SM (96 registers, 5 blocks, without).
template <typename T, int ACT>
__global__ void __launch_bounds__(THREADS_G, 6) gen_dz_kernel(const GenDzArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;
  const int grp = static_cast<int>(item) / a.C;  // the launcher keeps warps < 2^31
  const int c = static_cast<int>(item) - grp * a.C;
  const int64_t n0 = static_cast<int64_t>(grp) * a.group, n1 = n0 + a.group < a.N ? n0 + a.group : a.N;
  v2b::Chan ch;
  ch.mean = a.mean[c];
  ch.inv = a.inv[c];
  ch.gw = a.bnw != nullptr ? a.bnw[c] : 1.0f;
  ch.mg = a.train ? a.mg[c] : 0.0f;
  ch.mgx = a.train ? a.mgx[c] : 0.0f;
  float sdz = 0.0f, sdy = 0.0f, sdyx = 0.0f;
  // lanes over (row, 8-column unit) pairs as gen_stats_kernel: rows_it rows of upr units per
  // step when a row has at most 32 units, else one row at a time
  const int upr = (a.W + 7) / 8;
  const int rows_it = upr <= 32 ? 32 / upr : 1;
  const int ro = upr <= 32 ? lane / upr : 0, u0 = upr <= 32 ? lane - ro * upr : lane;
  const bool vec = a.vdy.vec && a.vz.vec;  // 16-byte loads of whole units
  const int h_first = ro < rows_it ? ro : a.H;
  // row pointers advanced by rows_it rows per step (no 64-bit products in the loop)
  const int64_t dystep = rows_it * a.vdy.sh, zstep = rows_it * a.vz.sh, dzstep = static_cast<int64_t>(rows_it) * a.wp;
#pragma unroll 1
  for (int64_t n = n0; n < n1; ++n) {
    const T* dyr = a.dy + (n * a.vdy.sn + c * a.vdy.sc + h_first * a.vdy.sh);
    const T* zr = a.z + (n * a.vz.sn + c * a.vz.sc + h_first * a.vz.sh);
    int64_t dzo = ((n * a.C + c) * a.H + h_first) * a.wp;  // an offset: dz may be null
#pragma unroll 1
    for (int h = h_first; h < a.H; h += rows_it, dyr += dystep, zr += zstep, dzo += dzstep) {
#pragma unroll 1
      for (int w0 = u0 * 8; w0 < a.W; w0 += 256) {
        float dyv[8], zv[8], d[8], xh[8];
        const bool full = w0 + 8 <= a.W;
        if (vec && full) {
          load8<T>(dyr + w0, dyv);
          load8<T>(zr + w0, zv);
        } else {
          load_row8<T>(dyr, a.vdy, w0, a.W, dyv);
          load_row8<T>(zr, a.vz, w0, a.W, zv);
        }
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) {
          xh[cc] = 0.0f;
          d[cc] = v2b::dz_of<ACT>(zv[cc], dyv[cc], ch, a.train, xh[cc]);
        }
        if (!full) {  // the row's last unit: dz of dy = z = 0 past W is finite, not 0: select
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) d[cc] = w0 + cc < a.W ? d[cc] : 0.0f;
        }
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) sdz += d[cc];
        if (a.need_stats) {  // eval: dy = 0 past W adds 0
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) {
            sdy += dyv[cc];
            sdyx += dyv[cc] * xh[cc];
          }
        }
        if (a.dz != nullptr) {
          float4* dst = reinterpret_cast<float4*>(a.dz) + ((dzo + w0) >> 2);  // dzo, w0 multiples of 8
          dst[0] = make_float4(d[0], d[1], d[2], d[3]);
          dst[1] = make_float4(d[4], d[5], d[6], d[7]);
        }
      }
    }
  }
  sdz = subwarp_sum<32>(sdz);
  if (a.need_stats) {
    sdy = subwarp_sum<32>(sdy);
    sdyx = subwarp_sum<32>(sdyx);
  }
  if (lane == 0) {
    float* out = a.psum + (static_cast<int64_t>(grp) * a.C + c) * 3;
    out[0] = sdz;
    out[1] = a.need_stats ? sdy : 0.0f;
    out[2] = a.need_stats ? sdyx : 0.0f;
  }
}

template <typename T>
struct GenBwdArgs {
  const T* __restrict__ x;
  View vx;
  const T* __restrict__ dy;
  View vdy;
  const float* __restrict__ dz;  // gen_dz_kernel's scratch (N, C, H, wp)
  T* __restrict__ dx;  // contiguous NCHW, or channels_last-contiguous (dxcl); nullable
  bool dxvec;          // NCHW, W % 8 == 0 and dx 16-byte aligned
  bool dxcl;           // dx channels_last-contiguous: element stores at stride C
  const float* __restrict__ wt;  // (C, k*k)
  float* __restrict__ part;  // (groups, C, k*k)
  int k;
  int C, H, W, wp;
  int tiles_h, tiles_w;
  int64_t N, group;  // images per group
  int64_t warps;     // groups * C
  bool need_dx, need_dw;
};

// Stages the dz window of tile (h0, w0) from the plane's scratch dzp (rows of wp floats) into ws,
// as stage_x: window row rr, column s hold dz[h0 - pad + rr][w0 - pad + s], zero outside the
// image. The units start at multiples of 8, so a unit is wholly in 0 .. wp - 1 or wholly outside
// (wp a multiple of 8; the columns W .. wp - 1 are zero in the scratch): two 16-byte loads or zeros.
template <int KC>
__device__ __forceinline__ void stage_dzb(const float* __restrict__ dzp, int H, int wp, const Geo& g, int h0,
                                          int w0, float* ws, int lane) {
  const int k = KC > 0 ? KC : g.k, pad = k / 2;
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 48 : g.pitch, sh = TR + k - 1;
  const int lead = (pad + 7) & ~7;
  const int uc = (TC + 2 * lead) / 8, rows_it = 32 / uc;  // units per row (6 or 8), rows per step
  const int ro = lane / uc, u = lane - ro * uc;           // lanes ro >= rows_it idle
  const int gc = w0 - lead + u * 8;
  const bool cin = gc >= 0 && gc < wp;
  const int s0 = gc - (w0 - pad);  // whole units, inside the row's margins (stage_x)
#pragma unroll 1
  for (int rr = ro < rows_it ? ro : sh; rr < sh; rr += rows_it) {
    const int h = h0 - pad + rr;
    float4 v0 = make_float4(0.0f, 0.0f, 0.0f, 0.0f), v1 = v0;
    if (cin && h >= 0 && h < H) {
      const float4* src = reinterpret_cast<const float4*>(dzp + static_cast<int64_t>(h) * wp + gc);
      v0 = __ldg(src);
      v1 = __ldg(src + 1);
    }
    float* dst = ws + rr * pitch + WO + s0;
    dst[0] = v0.x; dst[1] = v0.y; dst[2] = v0.z; dst[3] = v0.w;
    dst[4] = v1.x; dst[5] = v1.y; dst[6] = v1.z; dst[7] = v1.w;
  }
  __syncwarp();
}

// wgrad of kernel row i' and columns j0 .. j0 + NT - 1 of one tile: wacc[i' * KP + j'] += the
// sum over the tile's pixels p of x[p] * dzwin(p + (i', j')) (the gradient of w[k-1-i'][k-1-j']).
// Per lane: NT sums over its 32 pixels (x from its shared-memory slot, two 16-byte loads per
// row); then the NT sums over the 32 lanes in a fixed order through shared memory (red: 32 x 4
// floats, then 8 partials of 4 lanes each): no shuffles in the loop.
template <int NT>
__device__ __forceinline__ void wgrad_group(const float* srow, int pitch, const float* xs, int lane, int i, int j0,
                                            float* wacc_row, float* red) {
  constexpr int NV = (8 + NT - 1 + 3) / 4;
  float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const float* s = srow + (r + i) * pitch + j0;
    float win[4 * NV], xr[8];
#pragma unroll
    for (int v4 = 0; v4 < NV; ++v4) {
      const float4 f = reinterpret_cast<const float4*>(s)[v4];
      win[4 * v4] = f.x; win[4 * v4 + 1] = f.y; win[4 * v4 + 2] = f.z; win[4 * v4 + 3] = f.w;
    }
#pragma unroll
    for (int v4 = 0; v4 < 2; ++v4) {
      const float4 f = reinterpret_cast<const float4*>(xs + r * 8)[v4];
      xr[4 * v4] = f.x; xr[4 * v4 + 1] = f.y; xr[4 * v4 + 2] = f.z; xr[4 * v4 + 3] = f.w;
    }
#pragma unroll
    for (int jj = 0; jj < NT; ++jj)
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) acc[jj] = fmaf(xr[cc], win[cc + jj], acc[jj]);
  }
  reinterpret_cast<float4*>(red)[lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
  __syncwarp();
  const int jj = lane & 3, part8 = lane >> 2;  // this lane: lanes part8 * 4 .. + 3 of column jj
  const float p4 = ((red[(part8 * 4) * 4 + jj] + red[(part8 * 4 + 1) * 4 + jj]) + red[(part8 * 4 + 2) * 4 + jj]) +
                   red[(part8 * 4 + 3) * 4 + jj];
  __syncwarp();
  red[lane] = p4;  // red[part8 * 4 + jj]
  __syncwarp();
  if (lane < NT) {
    float v = red[lane];
#pragma unroll
    for (int pp = 1; pp < 8; ++pp) v += red[pp * 4 + lane];
    wacc_row[j0 + lane] += v;
  }
  __syncwarp();
}

template <int KC>
__device__ __forceinline__ void wgrad_tile(const float* ws, const Geo& g, const float* xs, int rg, int q, int lane,
                                           float* wacc, float* red) {
  const int k = KC > 0 ? KC : g.k, kp = KC > 0 ? ((KC + 3) & ~3) : g.kp;
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 48 : g.pitch;
  const int kfull = k & ~3;
  const float* srow = ws + (rg * R) * pitch + WO + q * 8;
#pragma unroll 1
  for (int i = 0; i < k; ++i) {
#pragma unroll 1
    for (int j0 = 0; j0 < kfull; j0 += 4) wgrad_group<4>(srow, pitch, xs, lane, i, j0, wacc + i * kp, red);
    if ((k & 3) == 3)
      wgrad_group<3>(srow, pitch, xs, lane, i, kfull, wacc + i * kp, red);
    else
      wgrad_group<1>(srow, pitch, xs, lane, i, kfull, wacc + i * kp, red);
  }
}

template <typename T, int KC>
__global__ void __launch_bounds__(THREADS_G, 4) gen_bwd_kernel(const GenBwdArgs<T> a) {
  extern __shared__ float4 smem_g[];
  const Geo g = Geo::of(KC > 0 ? KC : a.k);
  const int k = g.k, kk = k * k;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;
  // the launcher keeps warps < 2^31: 32-bit division
  const int grp = static_cast<int>(item) / a.C;
  const int c = static_cast<int>(item) - grp * a.C;
  const int64_t n0 = static_cast<int64_t>(grp) * a.group, n1 = n0 + a.group < a.N ? n0 + a.group : a.N;
  // per warp: flipped weights (k x KP), the wgrad accumulators (k x KP), the dz window, each
  // lane's 4 x 8 own x values (XS floats per lane: 16-byte reads without bank conflicts), then
  // the wgrad's 128-float reduction buffer
  float* wsw = reinterpret_cast<float*>(smem_g) + warp * (g.wfloats + k * g.kp + 32 * XS + 128);
  float* wacc = wsw + k * g.kp;
  float* ws = wacc + k * g.kp;
  float* xs = ws + g.sh * g.pitch + lane * XS;
  float* red = xs - lane * XS + 32 * XS;
  stage_weights<KC>(a.wt, c, g, true, wsw, lane);
  for (int t = lane; t < k * g.kp; t += 32) wacc[t] = 0.0f;
  __syncwarp();
  const int rg = lane >> 2, q = lane & 3;

  // One flat loop over the group's tiles in order (n, th, tw).
  const int64_t tiles_img = static_cast<int64_t>(a.tiles_h) * a.tiles_w;
  const int64_t t_end = (n1 - n0) * tiles_img;
  int64_t nn = n0;
  int th = 0, tw = 0;  // the tile (nn, th, tw), advanced at the end of each step (no division)
#pragma unroll 1
  for (int64_t t = 0; t < t_end; ++t) {
    const int h0 = th * TR, w0 = tw * TC;
    const int64_t dybase = nn * a.vdy.sn + c * a.vdy.sc, xbase = nn * a.vx.sn + c * a.vx.sc;
    const int64_t obase = (nn * a.C + c) * a.H * a.W;
    stage_dzb<KC>(a.dz + (nn * a.C + c) * a.H * a.wp, a.H, a.wp, g, h0, w0, ws, lane);
    const int col0 = w0 + q * 8;
    if (a.need_dx) {
      float acc[R][8];
      taps<KC>(wsw, ws, g, rg, q, acc);
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int hr = h0 + rg * R + r;
        if (hr >= a.H || col0 >= a.W) continue;
        float dyv[8], o[8];
        load_row8<T>(a.dy + dybase + static_cast<int64_t>(hr) * a.vdy.sh, a.vdy, col0, a.W, dyv);
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) o[cc] = acc[r][cc] + dyv[cc];
        const int64_t off = obase + static_cast<int64_t>(hr) * a.W + col0;
        if (a.dxvec && col0 + 8 <= a.W) {
          store8<T>(a.dx + off, o);
        } else if (!a.dxcl) {
#pragma unroll
          for (int cc = 0; cc < 8; ++cc)
            if (col0 + cc < a.W) a.dx[off + cc] = from_f<T>(o[cc]);
        } else {  // channels_last (dxvec false): pixel (hr, col0 + cc) at stride C
          cl_store8<T>(a.dx, nullptr, cl_off(nn, c, a.C, a.H, a.W, hr, col0), a.C, a.W - col0, o, o);
        }
      }
    }
    if (a.need_dw) {
#pragma unroll
      for (int r = 0; r < R; ++r) {  // own x values into the lane's slot (read back by it alone)
        const int hr = h0 + rg * R + r;
        float xv[8];
        if (hr < a.H) {
          load_row8<T>(a.x + xbase + static_cast<int64_t>(hr) * a.vx.sh, a.vx, col0, a.W, xv);
        } else {
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) xv[cc] = 0.0f;
        }
        reinterpret_cast<float4*>(xs + r * 8)[0] = make_float4(xv[0], xv[1], xv[2], xv[3]);
        reinterpret_cast<float4*>(xs + r * 8)[1] = make_float4(xv[4], xv[5], xv[6], xv[7]);
      }
      wgrad_tile<KC>(ws, g, xs, rg, q, lane, wacc, red);
    }
    __syncwarp();  // the window is rewritten by the next tile
    if (++tw == a.tiles_w) {
      tw = 0;
      if (++th == a.tiles_h) {
        th = 0;
        ++nn;
      }
    }
  }

  if (a.need_dw) {
    float* part = a.part + (static_cast<int64_t>(grp) * a.C + c) * kk;
    for (int t = lane; t < kk; t += 32) {
      const int i = t / k, j = t - i * k;  // weight tap (i, j) = accumulator (k-1-i, k-1-j)
      part[t] = wacc[(k - 1 - i) * g.kp + (k - 1 - j)];
    }
  }
}

// Training: per (image group, channel) sums of dy and dy * xhat, part[(g * C + c) * 2 + s], the
// warp walking its images' rows in order (dy, z through their strides). ACT a template constant
// (as gen_bwd_kernel: the tanh GELU division's call stays out of the other kernels).
template <typename T>
struct GenStatsArgs {
  const T* __restrict__ dy;
  View vdy;
  const T* __restrict__ z;
  View vz;
  const float* __restrict__ mean;
  const float* __restrict__ inv;
  float* __restrict__ part;
  int act;
  int C, H, W;
  int64_t N, group, warps;
};

template <typename T, int ACT>
__global__ void __launch_bounds__(THREADS_G, 4) gen_stats_kernel(const GenStatsArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;
  const int grp = static_cast<int>(item) / a.C;  // the launcher keeps warps < 2^31
  const int c = static_cast<int>(item) - grp * a.C;
  const int64_t n0 = static_cast<int64_t>(grp) * a.group, n1 = n0 + a.group < a.N ? n0 + a.group : a.N;
  const float mean = a.mean[c], inv = a.inv[c];
  float sdy = 0.0f, sdyx = 0.0f;
  // the group's images in order; lanes over (row, 8-column unit) pairs: rows_it rows of upr
  // units per step when a row has at most 32 units, else one row at a time (16-byte loads
  // where the views allow them, element loads through the strides otherwise)
  const int upr = (a.W + 7) / 8;
  const int rows_it = upr <= 32 ? 32 / upr : 1;
  const int ro = upr <= 32 ? lane / upr : 0, u0 = upr <= 32 ? lane - ro * upr : lane;
#pragma unroll 1
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t dybase = n * a.vdy.sn + c * a.vdy.sc, zbase = n * a.vz.sn + c * a.vz.sc;
#pragma unroll 1
    for (int h = ro < rows_it ? ro : a.H; h < a.H; h += rows_it) {
      const T* dyr = a.dy + dybase + static_cast<int64_t>(h) * a.vdy.sh;
      const T* zr = a.z + zbase + static_cast<int64_t>(h) * a.vz.sh;
#pragma unroll 1
      for (int w0 = u0 * 8; w0 < a.W; w0 += 256) {
        float dyv[8], zv[8];
        load_row8<T>(dyr, a.vdy, w0, a.W, dyv);
        load_row8<T>(zr, a.vz, w0, a.W, zv);
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) {  // dy = 0 past W: adds 0 (z = 0 there: finite act)
          const float xhat = (act_fwd(zv[cc], ACT) - mean) * inv;
          sdy += dyv[cc];
          sdyx += dyv[cc] * xhat;
        }
      }
    }
  }
  sdy = subwarp_sum<32>(sdy);
  sdyx = subwarp_sum<32>(sdyx);
  if (lane == 0) {
    float* out = a.part + (static_cast<int64_t>(grp) * a.C + c) * 2;
    out[0] = sdy;
    out[1] = sdyx;
  }
}

}  // namespace
}  // namespace v2g
}  // namespace cuda
}  // namespace convmixer_kernels
