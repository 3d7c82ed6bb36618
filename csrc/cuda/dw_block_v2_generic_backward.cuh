// Depthwise block v2, generic NCHW kernels (issue 22): the backward (gen_bwd_kernel,
// gen_stats_kernel) on the tiles, staging and taps of dw_block_v2_generic.cuh (design there and
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
// Work item of a warp: one channel c and a group of images n0 .. n1 - 1; the warp walks their
// tiles in order (n, th, tw): per tile (1) dz of the tile's window (the tile and its halo on
// all sides, zero outside the image) staged from dy and z (dz_of: v1's formulas), the tile's
// sums of dz (and, in eval, of dy and dy * xhat) over its own pixels in per-lane registers;
// (2) dgrad: the taps with the flipped kernel + dy, rounded once, stored into dx (contiguous NCHW or channels_last);
// (3) wgrad: the lane's 4 x 8 own x values (zero outside the image; kept in the lane's slot of
// shared memory, not registers: with them in registers the kernel spilled at sm_80) times the dz window, per
// kernel row i' and group of 4 columns j0: 4 sums over the lane's 32 pixels, a butterfly sum
// over the warp (fixed order), added by lane 0 to the warp's accumulator of that tap in shared
// memory (warp-private, tiles in order). After the last tile the warp writes its partial row
// part[(g * C + c) * S + s] (S = k*k + 3: the taps in weight order, sum dz, sum dy, sum dy xhat);
// the column sums in double over the groups in order give the gradients. No atomics.

__device__ __forceinline__ int64_t opaque64(int64_t v) {
  int64_t r;
  asm volatile("mov.b64 %0, %1;" : "=l"(r) : "l"(v));
  return r;
}

template <typename T>
struct GenBwdArgs {
  const T* __restrict__ x;
  View vx;
  const T* __restrict__ dy;
  View vdy;
  const T* __restrict__ z;
  View vz;
  T* __restrict__ dx;  // contiguous NCHW, or channels_last-contiguous (dxcl); nullable
  bool dxvec;          // NCHW, W % 8 == 0 and dx 16-byte aligned
  bool dxcl;           // dx channels_last-contiguous: element stores at stride C
  const float* __restrict__ wt;  // (C, k*k)
  const float* __restrict__ mean;
  const float* __restrict__ inv;
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ mg;   // training
  const float* __restrict__ mgx;
  float* __restrict__ part;  // (groups, C, S)
  int act;
  int k;
  int C, H, W;
  int tiles_h, tiles_w;
  int64_t N, group;  // images per group
  int64_t warps;     // groups * C
  bool train, need_dx, need_dw, need_stats;
};

template <int ACT, typename T, int KC>
__device__ __forceinline__ void stage_dz_g(const GenBwdArgs<T>& a, const Geo& g, int64_t dybase, int64_t zbase,
                                           int h0, int w0, float* ws, int lane, const v2b::Chan& ch, float& sdz,
                                           float& sdy, float& sdyx) {
  const int k = KC > 0 ? KC : g.k, pad = k / 2;
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 48 : g.pitch, sh = TR + k - 1;
  const int lead = (pad + 7) & ~7;
  const int uc = (TC + 2 * lead) / 8, rows_it = 32 / uc;  // units per row (6 or 8), rows per step
  const int ro = lane / uc, u = lane - ro * uc;           // lanes ro >= rows_it idle
  const int gc = w0 - lead + u * 8;
  // per lane, fixed for the tile: columns of the unit inside the image, and inside the tile
  unsigned in_mask = 0, own_mask = 0;
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
    const int w = gc + cc;
    if (w >= 0 && w < a.W) in_mask |= 1u << cc;
    if (w >= 0 && w < a.W && w >= w0 && w < w0 + TC) own_mask |= 1u << cc;
  }
#pragma unroll 1
  for (int rr = ro < rows_it ? ro : sh; rr < sh; rr += rows_it) {
    const int h = h0 - pad + rr;
    float* dst = ws + rr * pitch + WO;
    const int s0 = gc - (w0 - pad);  // whole units, inside the row's margins (stage_x)
    if constexpr (ACT == kGeluTanh) {
      // element by element, no arrays: its divisions' slow paths are calls, and the 8-wide
      // form kept too many values live across them (spills)
      const bool hin = h >= 0 && h < a.H, own_row = h >= h0 && h < h0 + TR;
      const T* dyr = a.dy + dybase + static_cast<int64_t>(h) * a.vdy.sh;
      const T* zr = a.z + zbase + static_cast<int64_t>(h) * a.vz.sh;
#pragma unroll 1
      for (int cc = 0; cc < 8; ++cc) {
        const int w = gc + cc;
        float dv = 0.0f;
        if (hin && w >= 0 && w < a.W) {
          const float dyv = to_f(dyr[static_cast<int64_t>(w) * a.vdy.sw]);
          const float zv = to_f(zr[static_cast<int64_t>(w) * a.vz.sw]);
          float xhat = 0.0f;
          dv = v2b::dz_of<ACT>(zv, dyv, ch, a.train, xhat);
          if (own_row && w >= w0 && w < w0 + TC) {
            sdz += dv;
            sdy += dyv;
            sdyx += dyv * xhat;
          }
        }
        dst[s0 + cc] = dv;
      }
      continue;
    }
    float d[8];
    if (h >= 0 && h < a.H) {
      float dyv[8], zv[8], xh[8];
      load_row8<T>(a.dy + dybase + static_cast<int64_t>(h) * a.vdy.sh, a.vdy, gc, a.W, dyv);
      load_row8<T>(a.z + zbase + static_cast<int64_t>(h) * a.vz.sh, a.vz, gc, a.W, zv);
      // dz for all 8 (dy = z = 0 outside the image: finite), then a select: no branch per element
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        xh[cc] = 0.0f;
        const float dv = v2b::dz_of<ACT>(zv[cc], dyv[cc], ch, a.train, xh[cc]);
        d[cc] = (in_mask >> cc) & 1u ? dv : 0.0f;
      }
      if (h >= h0 && h < h0 + TR) {  // the tile's own rows: its sums
#pragma unroll
        for (int cc = 0; cc < 8; ++cc) {
          const bool own = (own_mask >> cc) & 1u;
          sdz += own ? d[cc] : 0.0f;
          sdy += own ? dyv[cc] : 0.0f;
          sdyx += own ? dyv[cc] * xh[cc] : 0.0f;
        }
      }
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) d[cc] = 0.0f;
    }
#pragma unroll
    for (int cc = 0; cc < 8; ++cc)
      dst[s0 + cc] = d[cc];
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

// ACT a template constant: only tanh GELU's kernel has calls (the slow paths of its correctly
// rounded divisions), so the others are not held to the registers the call convention leaves.
template <typename T, int KC, int ACT>
__global__ void __launch_bounds__(THREADS_G, 4) gen_bwd_kernel(const GenBwdArgs<T> a) {
  extern __shared__ float4 smem_g[];
  const Geo g = Geo::of(KC > 0 ? KC : a.k);
  const int k = g.k, kk = k * k, S = kk + 3;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;
  // the launcher keeps warps < 2^31: 32-bit division (a 64-bit one is a call, and values live
  // across it spilled)
  const int grp = static_cast<int>(item) / a.C;
  const int c = static_cast<int>(item) - grp * a.C;
  const int64_t n0 = static_cast<int64_t>(grp) * a.group, n1 = n0 + a.group < a.N ? n0 + a.group : a.N;
  // per warp: flipped weights (k x KP), the wgrad accumulators (k x KP), the dz window, and
  // each lane's 4 x 8 own x values (XS floats per lane: 16-byte reads without bank conflicts)
  float* wsw = reinterpret_cast<float*>(smem_g) + warp * (g.wfloats + k * g.kp + 32 * XS + 8 + 128);
  float* wacc = wsw + k * g.kp;
  float* ws = wacc + k * g.kp;
  float* xs = ws + g.sh * g.pitch + lane * XS;
  stage_weights<KC>(a.wt, c, g, true, wsw, lane);
  for (int t = lane; t < k * g.kp; t += 32) wacc[t] = 0.0f;
  __syncwarp();

  // The channel terms of dz, kept in shared memory and read at each tile's staging (in
  // registers across the whole tile walk, with the image bases, the kernel needed 140 registers).
  float* cs = xs - lane * XS + 32 * XS;  // 8 floats after the lanes' x slots, then 128 for wgrad sums
  if (lane == 0) {
    cs[0] = a.mean[c];
    cs[1] = a.inv[c];
    cs[2] = a.bnw != nullptr ? a.bnw[c] : 1.0f;
    cs[3] = a.train ? a.mg[c] : 0.0f;
    cs[4] = a.train ? a.mgx[c] : 0.0f;
    reinterpret_cast<int*>(cs)[5] = grp;  // read back after the walk (it spilled across it)
  }
  __syncwarp();
  const int rg = lane >> 2, q = lane & 3;
  float sdz = 0.0f, sdy = 0.0f, sdyx = 0.0f;

  // One flat loop over the group's tiles in order (n, th, tw): few values live across the tile
  // (the slow paths of tanh GELU's divisions are calls; values live across them spill when
  // they outnumber the callee-saved registers).
  const int64_t tiles_img = static_cast<int64_t>(a.tiles_h) * a.tiles_w;
  const int64_t t_end = (n1 - n0) * tiles_img;
  int64_t nn = n0;
  int th = 0, tw = 0;  // the tile (nn, th, tw), advanced at the end of each step (no division)
#pragma unroll 1
  for (int64_t t = 0; t < t_end; ++t) {
    {
      {
        const int h0 = th * TR, w0 = tw * TC;
        const int64_t dybase = nn * a.vdy.sn + c * a.vdy.sc, zbase = nn * a.vz.sn + c * a.vz.sc;
        const int64_t xbase = nn * a.vx.sn + c * a.vx.sc, obase = (nn * a.C + c) * a.H * a.W;
        v2b::Chan ch;
        ch.mean = cs[0];
        ch.inv = cs[1];
        ch.gw = cs[2];
        ch.mg = cs[3];
        ch.mgx = cs[4];
        stage_dz_g<ACT, T, KC>(a, g, dybase, zbase, h0, w0, ws, lane, ch, sdz, sdy, sdyx);
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
          wgrad_tile<KC>(ws, g, xs, rg, q, lane, wacc, cs + 8);
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
    }
  }

  const int grp_end = reinterpret_cast<const int*>(cs)[5];
  float* part = a.part + (static_cast<int64_t>(grp_end) * a.C + c) * S;
  sdz = subwarp_sum<32>(sdz);
  if (a.need_stats) {
    sdy = subwarp_sum<32>(sdy);
    sdyx = subwarp_sum<32>(sdyx);
  }
  if (lane == 0) {
    part[kk] = sdz;
    if (a.need_stats) {
      part[kk + 1] = sdy;
      part[kk + 2] = sdyx;
    }
  }
  if (a.need_dw) {
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
