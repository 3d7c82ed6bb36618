// Depthwise block v2, generic NCHW kernels (issue 22): every NCHW call the templated v2 kernels
// (dw_block_v2.cuh: k in {3, 5, 7, 9}, W <= 32, contiguous) do not take.
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
// aligned pointer; otherwise 8 element loads through the strides, int64 offsets), converted once;
// each element stored at its window column (scalar shared stores).
// Taps: for each window row wr and each group of 4 kernel columns j0: 12 window floats (three
// 16-byte shared loads at a 16-byte aligned column: window column of output column o and tap j
// is o + j) feed the 4 taps of every output row r with kernel row i = wr - r (one 16-byte
// broadcast load of w[i][j0 .. j0 + 3]): 4 x 8 FFMAs per row. The last group holds k % 4 taps.
// Per output the taps are summed in the reference order (kernel row, then column, fmaf from 0),
// as v1's conv_kernel and the templated v2 kernels: the pre-activation is bitwise theirs.
// Offsets: int64 everywhere a plane base, a stride product or an output offset is formed.
// No atomics, no cross-warp communication.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "dw_block_common.cuh"
#include "dw_block_v2_backward.cuh"  // v2b::dz_of, Chan, chan_kernel, colsum_kernel
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
constexpr int XS = 36;  // backward: floats per lane of the own-x slots (32 used; lane stride 36)

// Per-warp shared memory of a kernel size, in floats: weights (k x KP), then the window
// (SH = TR + k - 1 rows of pitch P; window reads reach column q * 8 + KP - 4 + 11 <= KP + 31).
struct Geo {
  int k, pad, kp, sh, pitch, wfloats;
  __host__ __device__ static Geo of(int k) {
    Geo g;
    g.k = k;
    g.pad = k / 2;
    g.kp = (k + 3) & ~3;
    g.sh = TR + k - 1;
    g.pitch = g.kp + 36;  // >= KP + 32, and rows 4 banks apart
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
// zero in the padding columns.
template <int KC>
__device__ __forceinline__ void stage_weights(const float* __restrict__ wt, int64_t c, const Geo& g, bool flip,
                                              float* wsw, int lane) {
  const int k = KC > 0 ? KC : g.k, kp = KC > 0 ? ((KC + 3) & ~3) : g.kp;
  const float* wc = wt + c * (static_cast<int64_t>(k) * k);
  for (int t = lane; t < k * kp; t += 32) {
    const int i = t / kp, j = t - i * kp;
    float v = 0.0f;
    if (j < k) v = flip ? __ldg(wc + (k * k - 1 - (i * k + j))) : __ldg(wc + i * k + j);
    wsw[t] = v;
  }
}

// The taps of one lane: acc[r][cc] = sum_{i, j} wsw[i][j] * win[rg * R + r + i][q * 8 + cc + j].
template <int KC>
__device__ __forceinline__ void taps(const float* wsw, const float* ws, const Geo& g, int rg, int q,
                                     float (&acc)[R][8]) {
  const int k = KC > 0 ? KC : g.k, kp = KC > 0 ? ((KC + 3) & ~3) : g.kp;
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 36 : g.pitch;
  const int kfull = k & ~3, ktail = k - kfull;  // k odd: the tail holds 1 or 3 taps
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int cc = 0; cc < 8; ++cc) acc[r][cc] = 0.0f;
  const float* srow = ws + (rg * R) * pitch + q * 8;
#pragma unroll 1
  for (int wr = 0; wr < R + k - 1; ++wr) {
    const float* s = srow + wr * pitch;
    // kernel rows of the lane's 4 output rows from this window row (warp-uniform)
#pragma unroll 1
    for (int j0 = 0; j0 <= kfull; j0 += 4) {
      const int nt = j0 < kfull ? 4 : ktail;
      float win[12];
#pragma unroll
      for (int v4 = 0; v4 < 3; ++v4) {
        const float4 f = reinterpret_cast<const float4*>(s + j0)[v4];
        win[4 * v4] = f.x; win[4 * v4 + 1] = f.y; win[4 * v4 + 2] = f.z; win[4 * v4 + 3] = f.w;
      }
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const int i = wr - r;
        if (i < 0 || i >= k) continue;
        const float4 w4 = *reinterpret_cast<const float4*>(wsw + i * kp + j0);
        const float wj[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
        for (int jj = 0; jj < 4; ++jj) {
          if (jj >= nt) break;
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) acc[r][cc] = fmaf(win[cc + jj], wj[jj], acc[r][cc]);
        }
      }
    }
  }
}

// ---- forward: eval and train ----------------------------------------------------------------

template <typename T>
struct GenFwdArgs {
  const T* __restrict__ x;  // any strides (View)
  View vx;
  T* out;           // (N, C, H, W) contiguous; eval only
  T* z;             // contiguous: eval: nullable saved pre-activation; train: z (preact or out)
  bool ovec;        // W % 8 == 0 and out, z 16-byte aligned: 16-byte stores
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
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 36 : g.pitch, sh = TR + k - 1, sw = TC + k - 1;
  const int lead = (pad + 7) & ~7;  // w0 is a multiple of 32: units start at w0 - lead
  const int uc = (TC + 2 * lead) / 8;
  const int u = lane & 7;
#pragma unroll 1
  for (int rr = lane >> 3; rr < sh; rr += 4) {
    if (u >= uc) continue;
    const int h = h0 - pad + rr, gc = w0 - lead + u * 8;
    float val[8];
    if (h >= 0 && h < H) {
      load_row8<T>(x + xbase + static_cast<int64_t>(h) * v.sh, v, gc, W, val);
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) val[cc] = 0.0f;
    }
    float* dst = ws + rr * pitch;
    const int s0 = gc - (w0 - pad);
#pragma unroll
    for (int cc = 0; cc < 8; ++cc)
      if (s0 + cc >= 0 && s0 + cc < sw) dst[s0 + cc] = val[cc];
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
                                                  const Geo& g, int64_t pbase, int h0, int w0, int rg, int q,
                                                  float b, float scale, float shift) {
  const int col0 = w0 + q * 8;
  if (col0 >= a.W) return;
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int hr = h0 + rg * R + r;
    if (hr >= a.H) continue;
    const float* sx = ws + (rg * R + r + g.pad) * g.pitch + q * 8 + g.pad;  // the residual, staged
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
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        if (col0 + cc >= a.W) break;
        a.out[off + cc] = from_f<T>(o[cc]);
        if (a.z != nullptr) a.z[off + cc] = from_f<T>(zf[cc]);
      }
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
    case kGelu: gen_eval_epilogue<kGelu, T>(a, acc, ws, g, pbase, h0, w0, rg, q, b, scale, shift); break;
    case kGeluTanh: gen_eval_epilogue<kGeluTanh, T>(a, acc, ws, g, pbase, h0, w0, rg, q, b, scale, shift); break;
    default: gen_eval_epilogue<kRelu, T>(a, acc, ws, g, pbase, h0, w0, rg, q, b, scale, shift); break;
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
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        if (col0 + cc >= a.W) break;
        a.z[off + cc] = from_f<T>(zf[cc]);
      }
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
  double mu = 0.0, m2 = 0.0, n_acc = 0.0;
  for (int64_t n = 0; n < a.N; ++n) {
    for (int th = 0; th < a.tiles_h; ++th) {
      const int rows = a.H - th * TR < TR ? a.H - th * TR : TR;
      for (int tw = 0; tw < a.tiles_w; ++tw) {
        const int cols = a.W - tw * TC < TC ? a.W - tw * TC : TC;
        const int64_t t = (n * a.tiles_h + th) * a.tiles_w + tw;
        const double nb = static_cast<double>(rows) * cols;
        const double mb = a.pmean[t * a.C + c], m2b = a.pm2[t * a.C + c];
        const double tot = n_acc + nb, delta = mb - mu;
        mu += delta * nb / tot;
        m2 += m2b + delta * delta * n_acc * nb / tot;
        n_acc = tot;
      }
    }
  }
  const float mean = static_cast<float>(mu), var = static_cast<float>(m2 / n_acc);
  a.mean[c] = mean;
  a.var[c] = var;
  const float bw = a.bnw != nullptr ? a.bnw[c] : 1.0f, bb = a.bnb != nullptr ? a.bnb[c] : 0.0f;
  const float scale = inv_std(var, a.eps) * bw;
  a.scale[c] = scale;
  a.shift[c] = fmaf(-mean, scale, bb);
}

// out = x + act(z) * scale + shift; z, out contiguous (z may alias out: each element read, then
// written, by one lane), x through its strides. 256 elements of one plane per warp, 8 per lane.
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
  bool vec;        // HW % 8 == 0, z and out 16-byte aligned (and xplane)
};

template <int ACT, typename T>
__device__ __forceinline__ void gen_norm8(const GenNormArgs<T>& a, int64_t zbase, int64_t xbase, int64_t i0,
                                          float scale, float shift) {
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
    case kGelu: gen_norm8<kGelu, T>(a, zbase, xbase, i0, scale, shift); break;
    case kGeluTanh: gen_norm8<kGeluTanh, T>(a, zbase, xbase, i0, scale, shift); break;
    default: gen_norm8<kRelu, T>(a, zbase, xbase, i0, scale, shift); break;
  }
}

// ---- backward ------------------------------------------------------------------------------
// Work item of a warp: one channel c and a group of images n0 .. n1 - 1; the warp walks their
// tiles in order (n, th, tw): per tile (1) dz of the tile's window (the tile and its halo on
// all sides, zero outside the image) staged from dy and z (dz_of: v1's formulas), the tile's
// sums of dz (and, in eval, of dy and dy * xhat) over its own pixels in per-lane registers;
// (2) dgrad: the taps with the flipped kernel + dy, rounded once, stored into dx (contiguous);
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
  T* __restrict__ dx;  // contiguous, nullable
  bool dxvec;          // W % 8 == 0 and dx 16-byte aligned
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
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 36 : g.pitch, sh = TR + k - 1, sw = TC + k - 1;
  const int lead = (pad + 7) & ~7;
  const int uc = (TC + 2 * lead) / 8;
  const int u = lane & 7;
#pragma unroll 1
  for (int rr = lane >> 3; rr < sh; rr += 4) {
    if (u >= uc) continue;
    const int h = h0 - pad + rr, gc = w0 - lead + u * 8;
    float* dst = ws + rr * pitch;
    const int s0 = gc - (w0 - pad);
    if constexpr (ACT == kGeluTanh) {
      // element by element, no arrays: its divisions' slow paths are calls, and the 8-wide
      // form kept too many values live across them (spills)
      const bool hin = h >= 0 && h < a.H, own_row = h >= h0 && h < h0 + TR;
      const T* dyr = a.dy + dybase + static_cast<int64_t>(h) * a.vdy.sh;
      const T* zr = a.z + zbase + static_cast<int64_t>(h) * a.vz.sh;
#pragma unroll 1
      for (int cc = 0; cc < 8; ++cc) {
        const int w = gc + cc;
        if (s0 + cc < 0 || s0 + cc >= sw) continue;
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
      float dyv[8], zv[8];
      load_row8<T>(a.dy + dybase + static_cast<int64_t>(h) * a.vdy.sh, a.vdy, gc, a.W, dyv);
      load_row8<T>(a.z + zbase + static_cast<int64_t>(h) * a.vz.sh, a.vz, gc, a.W, zv);
      const bool own_row = h >= h0 && h < h0 + TR;
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) {
        const int w = gc + cc;
        const bool in = w >= 0 && w < a.W;
        float xhat = 0.0f;
        d[cc] = in ? v2b::dz_of<ACT>(zv[cc], dyv[cc], ch, a.train, xhat) : 0.0f;
        if (own_row && in && w >= w0 && w < w0 + TC) {
          sdz += d[cc];
          sdy += dyv[cc];
          sdyx += dyv[cc] * xhat;
        }
      }
    } else {
#pragma unroll
      for (int cc = 0; cc < 8; ++cc) d[cc] = 0.0f;
    }
#pragma unroll
    for (int cc = 0; cc < 8; ++cc)
      if (s0 + cc >= 0 && s0 + cc < sw) dst[s0 + cc] = d[cc];
  }
  __syncwarp();
}

// wgrad of one tile: wacc[i' * KP + j'] += sum over the tile's pixels of x[p] * dzwin(p + (i', j')),
// the gradient of w[k - 1 - i'][k - 1 - j'].
template <int KC>
__device__ __forceinline__ void wgrad_tile(const float* ws, const Geo& g, const float* xs, int rg, int q, int lane,
                                           float* wacc, float* red) {
  const int k = KC > 0 ? KC : g.k, kp = KC > 0 ? ((KC + 3) & ~3) : g.kp;
  const int pitch = KC > 0 ? ((KC + 3) & ~3) + 36 : g.pitch;
  const float* srow = ws + (rg * R) * pitch + q * 8;
#pragma unroll 1
  for (int i = 0; i < k; ++i) {
#pragma unroll 1
    for (int j0 = 0; j0 < k; j0 += 4) {
      float acc[4] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float* s = srow + (r + i) * pitch + j0;
        float win[12], xr[8];
#pragma unroll
        for (int v4 = 0; v4 < 3; ++v4) {
          const float4 f = reinterpret_cast<const float4*>(s)[v4];
          win[4 * v4] = f.x; win[4 * v4 + 1] = f.y; win[4 * v4 + 2] = f.z; win[4 * v4 + 3] = f.w;
        }
#pragma unroll
        for (int v4 = 0; v4 < 2; ++v4) {
          const float4 f = reinterpret_cast<const float4*>(xs + r * 8)[v4];
          xr[4 * v4] = f.x; xr[4 * v4 + 1] = f.y; xr[4 * v4 + 2] = f.z; xr[4 * v4 + 3] = f.w;
        }
#pragma unroll
        for (int jj = 0; jj < 4; ++jj)
#pragma unroll
          for (int cc = 0; cc < 8; ++cc) acc[jj] = fmaf(xr[cc], win[cc + jj], acc[jj]);
      }
      // the 4 sums over the warp's 32 lanes in a fixed order, through shared memory (red: 32 x 4
      // floats, then 8 x 4 partials of 4 lanes each): no shuffles in the loop
      reinterpret_cast<float4*>(red)[lane] = make_float4(acc[0], acc[1], acc[2], acc[3]);
      __syncwarp();
      const int jj = lane & 3, part8 = lane >> 2;  // lane sums lanes part8 * 4 .. + 3 of tap jj
      const float p4 = ((red[(part8 * 4) * 4 + jj] + red[(part8 * 4 + 1) * 4 + jj]) + red[(part8 * 4 + 2) * 4 + jj]) +
                       red[(part8 * 4 + 3) * 4 + jj];
      __syncwarp();
      red[lane] = p4;  // red[part8 * 4 + jj]
      __syncwarp();
      if (lane < 4 && j0 + lane < k) {
        float v = red[lane];
#pragma unroll
        for (int pp = 1; pp < 8; ++pp) v += red[pp * 4 + lane];
        wacc[i * kp + j0 + lane] += v;
      }
      __syncwarp();
    }
  }
}

template <typename T, int KC>
__global__ void __launch_bounds__(THREADS_G) gen_bwd_kernel(const GenBwdArgs<T> a) {
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
        switch (a.act) {
          case kGelu:
            stage_dz_g<kGelu, T, KC>(a, g, dybase, zbase, h0, w0, ws, lane, ch, sdz, sdy, sdyx);
            break;
          case kGeluTanh:
            stage_dz_g<kGeluTanh, T, KC>(a, g, dybase, zbase, h0, w0, ws, lane, ch, sdz, sdy, sdyx);
            break;
          default:
            stage_dz_g<kRelu, T, KC>(a, g, dybase, zbase, h0, w0, ws, lane, ch, sdz, sdy, sdyx);
            break;
        }
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
            } else {
#pragma unroll
              for (int cc = 0; cc < 8; ++cc)
                if (col0 + cc < a.W) a.dx[off + cc] = from_f<T>(o[cc]);
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
// warp walking its images' rows in order, lanes along the columns (dy, z through their strides).
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

template <int ACT, typename T>
__device__ __forceinline__ void gen_stats_rows(const GenStatsArgs<T>& a, int c, int64_t n0, int64_t n1, int lane,
                                               float mean, float inv, float& sdy, float& sdyx) {
#pragma unroll 1
  for (int64_t n = n0; n < n1; ++n) {
    const int64_t dybase = n * a.vdy.sn + c * a.vdy.sc, zbase = n * a.vz.sn + c * a.vz.sc;
#pragma unroll 1
    for (int h = 0; h < a.H; ++h) {
      const T* dyr = a.dy + dybase + static_cast<int64_t>(h) * a.vdy.sh;
      const T* zr = a.z + zbase + static_cast<int64_t>(h) * a.vz.sh;
#pragma unroll 1
      for (int w = lane; w < a.W; w += 32) {  // one element per lane: coalesced along W
        const float dyv = to_f(dyr[static_cast<int64_t>(w) * a.vdy.sw]);
        const float xhat = (act_fwd(to_f(zr[static_cast<int64_t>(w) * a.vz.sw]), ACT) - mean) * inv;
        sdy += dyv;
        sdyx += dyv * xhat;
      }
    }
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS_G) gen_stats_kernel(const GenStatsArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.warps) return;
  // the launcher keeps warps < 2^31: 32-bit division (a 64-bit one is a call, and values live
  // across it spilled)
  const int grp = static_cast<int>(item) / a.C;
  const int c = static_cast<int>(item) - grp * a.C;
  const int64_t n0 = static_cast<int64_t>(grp) * a.group, n1 = n0 + a.group < a.N ? n0 + a.group : a.N;
  const float mean = a.mean[c], inv = a.inv[c];
  float sdy = 0.0f, sdyx = 0.0f;
  switch (a.act) {
    case kGelu: gen_stats_rows<kGelu, T>(a, c, n0, n1, lane, mean, inv, sdy, sdyx); break;
    case kGeluTanh: gen_stats_rows<kGeluTanh, T>(a, c, n0, n1, lane, mean, inv, sdy, sdyx); break;
    default: gen_stats_rows<kRelu, T>(a, c, n0, n1, lane, mean, inv, sdy, sdyx); break;
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
