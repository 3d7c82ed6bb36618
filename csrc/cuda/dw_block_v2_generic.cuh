// Depthwise block v2, generic kernels (issue 22), forward and the shared tile code:
// every call the templated v2 kernels (dw_block_v2.cuh: k in {3, 5, 7, 9}, W <= 32,
// contiguous; dw_block_v2_cl*.cuh) do not take, NCHW or channels_last outputs (the latter by
// element stores at stride C on a branch of the element path: the NCHW paths keep their
// instructions). The backward kernels: dw_block_v2_generic_backward.cuh.
//   forward:  out = x + BN(act(round(dwconv_k(x) + b)))      (eval; train: batch statistics)
//   backward: dz, dx = dwconv(dz, flipped) + dy, dW, db, dbn_w, dbn_b   (dw_block_v2_backward.cuh)
// Same semantics and numerics as the templated v2 kernels (and v1's formulas).
//
// Tiling. One warp owns a tile of TR = 32 rows x TC = 32 columns of one plane; lane
// (rg = lane / 4, q = lane % 4) owns rows rg * 4 .. rg * 4 + 3 and columns q * 8 .. q * 8 + 7 of
// the tile (4 x 8 float32 accumulators). Tiles go down the rows and along the columns, so W and
// H are unbounded; the tile's input window (TR + k - 1 rows x TC + k - 1 columns, the halo on
// all four sides) is staged in the warp's shared memory as float32, zero outside the image.
// k is a run-time value (KC = 0) or a template constant (KC > 0: the same code, loops with
// constant bounds). The weights of the warp's channel are in the warp's shared memory, rows
// padded to KP = k rounded up to 4 columns.
// Staging: units of 8 columns aligned in the image (one 16-byte load for 2-byte types, two for
// float32, when the view allows it: unit stride along W, 8-element aligned rows and a 16-byte
// aligned pointer; otherwise 8 element loads through the strides, int64 offsets; a unit wholly
// outside the image is zero without loads), converted once; lanes over (row, unit) pairs; each
// unit stored whole at its window columns (the row's margins take the columns outside the window).
// Taps: for each window row wr and each group of 4 kernel columns j0: 12 window floats (three
// 16-byte shared loads at a 16-byte aligned column: window column of output column o and tap j
// is o + j) feed the 4 taps of every output row r with kernel row i = wr - r (one 16-byte
// broadcast load of w[i][j0 .. j0 + 3]): 4 x 8 FFMAs per row. The last group holds k % 4 taps.
// Window rows 3 .. k - 1 feed all 4 output rows (no checks of i), the others are checked.
// Per output the taps are summed in the reference order (kernel row, then column, fmaf from 0),
// as v1's conv_kernel and the templated v2 kernels: the pre-activation is bitwise theirs.
// Offsets: int64 everywhere a plane base, a stride product or an output offset is formed.
// No atomics, no cross-warp communication.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dw_block_common.cuh"
#include "dw_block_v2_units.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace v2g {
namespace {  // one translation unit: only dw_block_v2_generic.cu includes this

using namespace v2_units;  // load8, store8, subwarp_sum

constexpr int WARPS = 4;  // warps per block (independent work items)
constexpr int THREADS_G = WARPS * 32;
constexpr int R = 4;    // rows per lane
constexpr int TR = 32;  // rows per tile (8 row groups x R)
constexpr int TC = 32;  // columns per tile (4 column groups x 8)
constexpr int WO = 8;   // the window row's column 0 (a margin of 8 floats before it)
constexpr int XS = 36;  // backward: floats per lane of the own-x slots (32 used; lane stride 36)

// Per-warp shared memory of a kernel size, in floats: weights (k x KP), then the window
// (SH = TR + k - 1 rows of pitch P = KP + 48). Window column s (0 .. TC + k - 2) of a row is at
// float WO + s of it: staging writes whole 8-column units, columns -7 .. TC + k + 6 (inside the
// row: no per-element range checks), and the taps' window reads end before float KP + 40 < P.
struct Geo {
  int k, pad, kp, sh, pitch, wfloats;
  __host__ __device__ static Geo of(int k) {
    Geo g;
    g.k = k;
    g.pad = k / 2;
    g.kp = (k + 3) & ~3;
    g.sh = TR + k - 1;
    g.pitch = g.kp + 48;  // the row's columns -7 .. TC + k + 6 at WO + s, and window reads (see Geo)
    g.wfloats = g.k * g.kp + g.sh * g.pitch;
    return g;
  }
};

// A strided 4-D view: element (n, c, h, w) at n * sn + c * sc + h * sh + w * sw.
struct View {
  int64_t sn, sc, sh, sw;
  bool vec;  // sw == 1, sn, sc, sh multiples of 8 and a 16-byte aligned pointer: 16-byte units
};

// 8 elements of one row starting at image column gc (any of them may be outside 0 .. W - 1:
// zeros there) through the view.
template <typename T>
__device__ __forceinline__ void load_row8(const T* __restrict__ row, const View& v, int gc, int W, float out[8]) {
  if (gc + 8 <= 0 || gc >= W) {  // a halo unit wholly outside the image (no loads, no checks)
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) out[cc] = 0.0f;
    return;
  }
  if (v.vec && gc >= 0 && gc + 8 <= W) {
    load8<T>(row + gc, out);
    return;
  }
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
    const int w = gc + cc;
    out[cc] = (w >= 0 && w < W) ? to_f(row[static_cast<int64_t>(w) * v.sw]) : 0.0f;
  }
}

// Stores the warp channel's weights (C, k*k) float32 at wsw[i * KP + j] (flipped: w[k-1-i][k-1-j]),
// zero in the padding columns: one kernel row per step, lane j its column (KP <= 32).
template <int KC>
__device__ __forceinline__ void stage_weights(const float* __restrict__ wt, int64_t c, const Geo& g, bool flip,
                                              float* wsw, int lane) {
  const int k = KC > 0 ? KC : g.k, kp = KC > 0 ? ((KC + 3) & ~3) : g.kp;
  const float* wc = wt + c * (static_cast<int64_t>(k) * k);
  const int j = lane, jf = flip ? k - 1 - j : j;
  if (j >= kp) return;
#pragma unroll 1
  for (int i = 0; i < k; ++i) {
    const int ir = flip ? k - 1 - i : i;
    wsw[i * kp + j] = j < k ? __ldg(wc + ir * k + jf) : 0.0f;
  }
}

// One group of NT kernel columns j0 .. j0 + NT - 1 of window row wr for the lane's 4 output
// rows: window columns q * 8 + j0 .. + 7 + NT - 1 (16-byte loads), the weights w[i][j0 ..] of
// each row's kernel row i = wr - r (one 16-byte broadcast load), NT x 8 FFMAs per row.
template <int NT, bool CHECK>
__device__ __forceinline__ void tap_group(const float* s, const float* wsw, int kp, int k, int wr, int j0,
                                          float (&acc)[R][8]) {
  constexpr int NV = (8 + NT - 1 + 3) / 4;  // 16-byte window loads
  float win[4 * NV];
#pragma unroll
  for (int v4 = 0; v4 < NV; ++v4) {
    const float4 f = reinterpret_cast<const float4*>(s + j0)[v4];
    win[4 * v4] = f.x; win[4 * v4 + 1] = f.y; win[4 * v4 + 2] = f.z; win[4 * v4 + 3] = f.w;
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int i = wr - r;
    if (CHECK && (i < 0 || i >= k)) continue;  // warp-uniform
    const float4 w4 = *reinterpret_cast<const float4*>(wsw + i * kp + j0);
    const float wj[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
    for (int jj = 0; jj < NT; ++jj)
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) acc[r][cc] = fmaf(win[cc + jj], wj[jj], acc[r][cc]);
  }
}

// The taps of one lane: acc[r][cc] = sum_{i, j} wsw[i][j] * win[rg * R + r + i][q * 8 + cc + j],
// for each window row: the groups of 4 kernel columns, then the last k % 4 (1 or 3: k is odd).
template <int KC>
__device__ __forceinline__ void taps(const float* wsw, const float* ws, const Geo& g, int rg, int q,
                                     float (&acc)[R][8]) {
  const int k = KC > 0 ? KC : g.k, kp = KC > 0 ? ((KC + 3) & ~3) : g.kp;
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 48 : g.pitch;
  const int kfull = k & ~3;
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) acc[r][cc] = 0.0f;
  const float* srow = ws + (rg * R) * pitch + WO + q * 8;
  // Window rows R - 1 .. k - 1 feed all 4 output rows (no row checks); the first and last R - 1
  // feed some of them (checked). Per output the kernel rows still come in increasing order.
#pragma unroll 1
  for (int wr = 0; wr < k + R - 1; ++wr) {  // in order: the taps' order per output is v1's
    const bool edge = wr < R - 1 || wr >= k;
    const float* s = srow + wr * pitch;
    if (edge) {  // warp-uniform
#pragma unroll 1
      for (int j0 = 0; j0 < kfull; j0 += 4) tap_group<4, true>(s, wsw, kp, k, wr, j0, acc);
      if ((k & 3) == 3)
        tap_group<3, true>(s, wsw, kp, k, wr, kfull, acc);
      else
        tap_group<1, true>(s, wsw, kp, k, wr, kfull, acc);
    } else {
#pragma unroll 1
      for (int j0 = 0; j0 < kfull; j0 += 4) tap_group<4, false>(s, wsw, kp, k, wr, j0, acc);
      if ((k & 3) == 3)
        tap_group<3, false>(s, wsw, kp, k, wr, kfull, acc);
      else
        tap_group<1, false>(s, wsw, kp, k, wr, kfull, acc);
    }
  }
}

// ---- channels_last outputs ------------------------------------------------------------------
// The offset of element (n, c, hr, col) in a channels_last-contiguous (N, H, W, C) tensor.
__device__ __forceinline__ int64_t cl_off(int64_t n, int c, int C, int H, int W, int hr, int col) {
  return ((n * H + hr) * W + col) * C + c;
}

// Stores min(8, left) values of a row at off, off + C, ... (and of a second tensor when b is not
// null): channels_last, one element per pixel (2- or 4-byte stores, uncoalesced across the warp).
template <typename T>
__device__ __forceinline__ void cl_store8(T* a, T* b, int64_t off, int C, int left, const float (&va)[8],
                                          const float (&vb)[8]) {
#pragma unroll
  for (int cc = 0; cc < 8; ++cc) {
    if (cc >= left) break;
    const int64_t o = off + static_cast<int64_t>(cc) * C;
    a[o] = from_f<T>(va[cc]);
    if (b != nullptr) b[o] = from_f<T>(vb[cc]);
  }
}

// ---- forward: eval and train ----------------------------------------------------------------

template <typename T>
struct GenFwdArgs {
  const T* __restrict__ x;  // any strides (View)
  View vx;
  T* out;           // (N, C, H, W) contiguous NCHW, or channels_last-contiguous (ocl); eval only
  T* z;             // out's layout: eval: nullable saved pre-activation; train: z (preact or out)
  bool ovec;        // NCHW, W % 8 == 0 and out, z 16-byte aligned: 16-byte stores
  bool ocl;         // out and z channels_last-contiguous (N, H, W, C): element stores at stride C
  const float* __restrict__ wt;    // (C, k*k) float32
  const float* __restrict__ bias;  // nullable
  const float* __restrict__ mean;  // eval: running statistics
  const float* __restrict__ var;
  const float* __restrict__ bnw;   // nullable
  const float* __restrict__ bnb;   // nullable
  float* __restrict__ pmean;       // train: (N * tiles_h * tiles_w, C)
  float* __restrict__ pm2;
  float eps;
  int act;
  int k;
  int C, H, W;
  int tiles_h, tiles_w;
  int64_t planes, warps;  // warps = planes * tiles_h * tiles_w
};

// Stages the window of tile (h0, w0) of plane (n, c) into ws (SH x pitch floats): window row rr,
// column s hold x[h0 - pad + rr][w0 - pad + s], zero outside the image.
template <typename T, int KC>
__device__ __forceinline__ void stage_x(const T* __restrict__ x, const View& v, int64_t xbase, int H, int W,
                                        const Geo& g, int h0, int w0, float* ws, int lane) {
  const int k = KC > 0 ? KC : g.k, pad = k / 2;
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 48 : g.pitch, sh = TR + k - 1;
  const int lead = (pad + 7) & ~7;  // w0 is a multiple of 32: units start at w0 - lead
  const int uc = (TC + 2 * lead) / 8, rows_it = 32 / uc;  // units per row (6 or 8), rows per step
  const int ro = lane / uc, u = lane - ro * uc;           // lanes ro >= rows_it idle
  const int gc = w0 - lead + u * 8;
#pragma unroll 1
  for (int rr = ro < rows_it ? ro : sh; rr < sh; rr += rows_it) {
    const int h = h0 - pad + rr;
    float val[8];
    if (h >= 0 && h < H) {
      load_row8<T>(x + xbase + static_cast<int64_t>(h) * v.sh, v, gc, W, val);
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) val[cc] = 0.0f;
    }
    float* dst = ws + rr * pitch + WO;
    const int s0 = gc - (w0 - pad);  // >= -7; s0 + 7 <= TC + k + 6 (inside the row's margins)
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) dst[s0 + cc] = val[cc];
  }
  __syncwarp();
}

// The work item of a forward warp: plane p = (n, c), tile (th, tw).
struct FwdItem {
  int64_t p, n;
  int c, th, tw;
};

template <typename A>
__device__ __forceinline__ FwdItem fwd_item(const A& a, int64_t item) {
  FwdItem it;
  const int64_t tiles = static_cast<int64_t>(a.tiles_h) * a.tiles_w;
  it.p = item / tiles;
  const int t = static_cast<int>(item - it.p * tiles);
  it.th = t / a.tiles_w;
  it.tw = t - it.th * a.tiles_w;
  it.n = it.p / a.C;
  it.c = static_cast<int>(it.p - it.n * a.C);
  return it;
}

template <int ACT, typename T>
__device__ __forceinline__ void gen_eval_epilogue(const GenFwdArgs<T>& a, const float (&acc)[R][8], const float* ws,
                                                  const Geo& g, const FwdItem& it, int64_t pbase, int h0, int w0, int rg, int q,
                                                  float b, float scale, float shift) {
  const int col0 = w0 + q * 8;
  if (col0 >= a.W) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int hr = h0 + rg * R + r;
    if (hr >= a.H) continue;
    const float* sx = ws + (rg * R + r + g.pad) * g.pitch + WO + q * 8 + g.pad;  // the residual, staged
    float o[8], zf[8];
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) {
      zf[cc] = acc[r][cc] + b;
      const float zs = to_f(from_f<T>(zf[cc]));  // the stored pre-activation, as conv_kernel
      o[cc] = sx[cc] + fmaf(act_fwd(zs, ACT), scale, shift);
    }
    const int64_t off = pbase + static_cast<int64_t>(hr) * a.W + col0;
    if (a.ovec && col0 + 8 <= a.W) {
      store8<T>(a.out + off, o);
      if (a.z != nullptr) store8<T>(a.z + off, zf);
    } else if (!a.ocl) {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        if (col0 + cc >= a.W) break;
        a.out[off + cc] = from_f<T>(o[cc]);
        if (a.z != nullptr) a.z[off + cc] = from_f<T>(zf[cc]);
      }
    } else {  // channels_last (ovec false): pixel (hr, col0 + cc) at stride C
      cl_store8<T>(a.out, a.z, cl_off(it.n, it.c, a.C, a.H, a.W, hr, col0), a.C, a.W - col0, o, zf);
    }
  }
}

template <typename T, int KC>
__global__ void __launch_bounds__(THREADS_G) gen_eval_kernel(const GenFwdArgs<T> a) {
  extern __shared__ float4 smem_g[];
  const Geo g = Geo::of(KC > 0 ? KC : a.k);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;  // warp-uniform; no block-wide barrier below
  const FwdItem it = fwd_item(a, item);
  float* wsw = reinterpret_cast<float*>(smem_g) + warp * g.wfloats;
  float* ws = wsw + g.k * g.kp;
  const int h0 = it.th * TR, w0 = it.tw * TC;
  stage_weights<KC>(a.wt, it.c, g, false, wsw, lane);
  stage_x<T, KC>(a.x, a.vx, it.n * a.vx.sn + it.c * a.vx.sc, a.H, a.W, g, h0, w0, ws, lane);
  const int rg = lane >> 2, q = lane & 3;
  float acc[R][8];
  taps<KC>(wsw, ws, g, rg, q, acc);

  const int c = it.c;
  const float b = a.bias != nullptr ? a.bias[c] : 0.0f;
  const float bw = a.bnw != nullptr ? a.bnw[c] : 1.0f, bb = a.bnb != nullptr ? a.bnb[c] : 0.0f;
  const float scale = inv_std(a.var[c], a.eps) * bw;
  const float shift = fmaf(-a.mean[c], scale, bb);
  const int64_t pbase = it.p * a.H * a.W;
  switch (a.act) {
    case kGelu: gen_eval_epilogue<kGelu, T>(a, acc, ws, g, it, pbase, h0, w0, rg, q, b, scale, shift); break;
    case kGeluTanh: gen_eval_epilogue<kGeluTanh, T>(a, acc, ws, g, it, pbase, h0, w0, rg, q, b, scale, shift); break;
    default: gen_eval_epilogue<kRelu, T>(a, acc, ws, g, it, pbase, h0, w0, rg, q, b, scale, shift); break;
  }
}

// Train: z stored, the tile's (mean, M2) of act(z) over its pixels in the image (two passes over
// the values in registers, butterfly sums in a fixed order) at row t = (n * tiles_h + th) *
// tiles_w + tw of the (N * tiles_h * tiles_w, C) partial matrices.
template <int ACT, typename T>
__device__ __forceinline__ void gen_train_epilogue(const GenFwdArgs<T>& a, float (&acc)[R][8], const FwdItem& it,
                                                   int h0, int w0, int rg, int q, int lane) {
  const int c = it.c;
  const float b = a.bias != nullptr ? a.bias[c] : 0.0f;
  const int64_t pbase = it.p * a.H * a.W;
  const int col0 = w0 + q * 8;
  float sum = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int hr = h0 + rg * R + r;
    const bool rvalid = hr < a.H && col0 < a.W;
    float zf[8];
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) {
      zf[cc] = acc[r][cc] + b;
      const float zs = to_f(from_f<T>(zf[cc]));
      const bool valid = rvalid && col0 + cc < a.W;
      if constexpr (ACT == kGeluTanh) {
        acc[r][cc] = valid ? act_fwd(zs, ACT) : 0.0f;
      } else {
        const float av = act_fwd(zs, ACT);
        acc[r][cc] = valid ? av : 0.0f;
      }
      sum += acc[r][cc];
    }
    if (!rvalid) continue;
    const int64_t off = pbase + static_cast<int64_t>(hr) * a.W + col0;
    if (a.ovec && col0 + 8 <= a.W) {
      store8<T>(a.z + off, zf);
    } else if (!a.ocl) {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        if (col0 + cc >= a.W) break;
        a.z[off + cc] = from_f<T>(zf[cc]);
      }
    } else {
      cl_store8<T>(a.z, nullptr, cl_off(it.n, it.c, a.C, a.H, a.W, hr, col0), a.C, a.W - col0, zf, zf);
    }
  }
  const int rows = a.H - h0 < TR ? a.H - h0 : TR, cols = a.W - w0 < TC ? a.W - w0 : TC;
  const float n_tile = static_cast<float>(rows * cols);
  const float mean = subwarp_sum<32>(sum) / n_tile;
  float m2 = 0.0f;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const bool rvalid = h0 + rg * R + r < a.H;
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) {
      const float d = acc[r][cc] - mean;
      m2 += (rvalid && col0 + cc < a.W) ? d * d : 0.0f;
    }
  }
  m2 = subwarp_sum<32>(m2);
  if (lane == 0) {
    const int64_t t = (it.n * a.tiles_h + it.th) * a.tiles_w + it.tw;
    a.pmean[t * a.C + c] = mean;
    a.pm2[t * a.C + c] = m2;
  }
}

template <typename T, int KC>
__global__ void __launch_bounds__(THREADS_G) gen_train_kernel(const GenFwdArgs<T> a) {
  extern __shared__ float4 smem_g[];
  const Geo g = Geo::of(KC > 0 ? KC : a.k);
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;
  const FwdItem it = fwd_item(a, item);
  float* wsw = reinterpret_cast<float*>(smem_g) + warp * g.wfloats;
  float* ws = wsw + g.k * g.kp;
  const int h0 = it.th * TR, w0 = it.tw * TC;
  stage_weights<KC>(a.wt, it.c, g, false, wsw, lane);
  stage_x<T, KC>(a.x, a.vx, it.n * a.vx.sn + it.c * a.vx.sc, a.H, a.W, g, h0, w0, ws, lane);
  const int rg = lane >> 2, q = lane & 3;
  float acc[R][8];
  taps<KC>(wsw, ws, g, rg, q, acc);
  switch (a.act) {
    case kGelu: gen_train_epilogue<kGelu, T>(a, acc, it, h0, w0, rg, q, lane); break;
    case kGeluTanh: gen_train_epilogue<kGeluTanh, T>(a, acc, it, h0, w0, rg, q, lane); break;
    default: gen_train_epilogue<kRelu, T>(a, acc, it, h0, w0, rg, q, lane); break;
  }
}

struct GenFinalizeArgs {
  const float* __restrict__ pmean;  // (N * tiles_h * tiles_w, C)
  const float* __restrict__ pm2;
  float* __restrict__ mean;  // (C,)
  float* __restrict__ var;
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ bnb;  // nullable
  float* __restrict__ scale;      // (C,)
  float* __restrict__ shift;
  float eps;
  int64_t N, C;
  int H, W, tiles_h, tiles_w;
};

// Batch mean and biased variance per channel: Chan's combination of the tile partials in tile
// order (n, th, tw), in double (as v2's finalize_kernel and v1's finalize_stats_kernel).
__global__ void __launch_bounds__(256) gen_finalize_kernel(const GenFinalizeArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  ChanStats s;
  for (int64_t n = 0; n < a.N; ++n) {
    for (int th = 0; th < a.tiles_h; ++th) {
      const int rows = a.H - th * TR < TR ? a.H - th * TR : TR;
      for (int tw = 0; tw < a.tiles_w; ++tw) {
        const int cols = a.W - tw * TC < TC ? a.W - tw * TC : TC;
        const int64_t t = (n * a.tiles_h + th) * a.tiles_w + tw;
        s.add(static_cast<double>(rows) * cols, a.pmean[t * a.C + c], a.pm2[t * a.C + c]);
      }
    }
  }
  finalize_channel(s, c, a.bnw, a.bnb, a.eps, a.mean, a.var, a.scale, a.shift);
}

// out = x + act(z) * scale + shift; z, out contiguous NCHW or both channels_last-contiguous (ocl)
// (z may alias out: each element read, then written, by one lane), x through its strides. 256 elements of one plane per warp, 8 per lane.
template <typename T>
struct GenNormArgs {
  const T* __restrict__ x;
  View vx;
  bool xplane;  // x's planes contiguous (sw == 1, sh == W) and vx.vec: 16-byte loads
  const T* z;
  T* out;
  const float* __restrict__ scale;
  const float* __restrict__ shift;
  int act;
  int C, W;
  int64_t HW;
  int64_t chunks;  // ceil(HW / 256)
  int64_t items;   // planes * chunks
  bool vec;        // HW % 8 == 0, z and out 16-byte aligned (and xplane); false when ocl
  bool ocl;        // z and out channels_last-contiguous: pixel i of plane (n, c) at (n * HW + i) * C + c
};

template <int ACT, typename T>
__device__ __forceinline__ void gen_norm8(const GenNormArgs<T>& a, int64_t zbase, int64_t xbase, int64_t i0,
                                          float scale, float shift, int64_t n, int c) {
  if (a.vec && i0 + 8 <= a.HW) {
    float xv[8], zv[8];
    load8<T>(a.z + zbase + i0, zv);
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) zv[cc] = fmaf(act_fwd(zv[cc], ACT), scale, shift);
    load8<T>(a.x + xbase + i0, xv);
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) zv[cc] += xv[cc];
    store8<T>(a.out + zbase + i0, zv);
    return;
  }
  if (a.ocl) {  // element accesses at stride C (uncoalesced across the warp)
#pragma unroll 1
    for (int cc = 0; cc < 8; ++cc) {
      const int64_t i = i0 + cc;
      if (i >= a.HW) break;
      const int64_t h = i / a.W, w = i - h * a.W, o = (n * a.HW + i) * a.C + c;
      const float y = fmaf(act_fwd(to_f(a.z[o]), ACT), scale, shift);
      a.out[o] = from_f<T>(to_f(a.x[xbase + h * a.vx.sh + w * a.vx.sw]) + y);
    }
    return;
  }
#pragma unroll 1
  for (int cc = 0; cc < 8; ++cc) {
    const int64_t i = i0 + cc;
    if (i >= a.HW) break;
    const int64_t h = i / a.W, w = i - h * a.W;
    const float y = fmaf(act_fwd(to_f(a.z[zbase + i]), ACT), scale, shift);
    a.out[zbase + i] = from_f<T>(to_f(a.x[xbase + h * a.vx.sh + w * a.vx.sw]) + y);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS_G) gen_norm_kernel(const GenNormArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.items) return;
  const int64_t p = item / a.chunks;
  const int64_t i0 = (item - p * a.chunks) * 256 + lane * 8;
  if (i0 >= a.HW) return;
  const int64_t n = p / a.C;
  const int c = static_cast<int>(p - n * a.C);
  const float scale = a.scale[c], shift = a.shift[c];
  const int64_t zbase = p * a.HW, xbase = n * a.vx.sn + c * a.vx.sc;
  switch (a.act) {
    case kGelu: gen_norm8<kGelu, T>(a, zbase, xbase, i0, scale, shift, n, c); break;
    case kGeluTanh: gen_norm8<kGeluTanh, T>(a, zbase, xbase, i0, scale, shift, n, c); break;
    default: gen_norm8<kRelu, T>(a, zbase, xbase, i0, scale, shift, n, c); break;
  }
}

}  // namespace
}  // namespace v2g
}  // namespace cuda
}  // namespace convmixer_kernels
