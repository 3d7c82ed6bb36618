// Depthwise block v2, channels_last backward (issue 22 part 2): the kernels besides the dgrad
// (cl_dgrad_kernel, the shared strip loop of dw_block_v2_cl.cuh with float32 dz as input and
// the flipped weights). Lanes along channels everywhere (4 channels per lane, 128 per block),
// no atomics: every reduction is a per-warp or per-block partial row, summed in row order in
// double by cl_colsum_kernel, so results are bitwise reproducible for a given launch shape.
//
// Passes (z: the saved pre-activation, or v1's recompute):
// - cl_elem_kernel<STATS, DZ>: per warp a run of NPB pixels of one channel group; STATS: the
//   run's sums of dy and dy * xhat (xhat = (act(z) - mean) * invstd); DZ: dz = act'(z) *
//   (dy * bn_w - mg - xhat * mgx) * invstd (training; eval: dy * bn_w * invstd) in float32,
//   v1's formula in v1's order, stored blocked by channel group, (N * H, groups, W, 128), so
//   that the dgrad's and the wgrad's column stride is a constant (immediate load offsets),
//   and the run's sum of dz (the bias gradient). Training runs it twice (the sums first: every dz needs them); eval once.
// - cl_dgrad_kernel (dw_block_v2_cl.cuh): dx = conv(dz, flipped weights) + dy.
// - cl_wgrad_kernel: the forward's strips again; per kernel row i, each warp walks its strips
//   with the strip's dz (16 pixels x 4 channels) in registers and the input row h + i - pad
//   streamed column by column, acc[j] += x[col o + j] * dz[o] (k x 4 accumulators); after the
//   row the block's 4 warps are summed in warp order through shared memory and written as one
//   partial row per block and tap.
// - cl_colsum_kernel: column sums of a (rows, cols) float32 matrix in row order, in double.
#pragma once

#include "dw_block_v2_cl.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace v2cl {
namespace {

constexpr int NPB = 64;  // pixels per warp item of cl_elem_kernel (one partial row each)

template <typename T>
struct ClElemArgs {
  const T* __restrict__ dy;  // channels_last
  const T* __restrict__ z;
  const float* __restrict__ mean;  // (C,) the statistics the forward normalised with
  const float* __restrict__ var;
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ mg;   // training: bn_w * sum dy / count, (C,)
  const float* __restrict__ mgx;  // training: bn_w * sum dy xhat / count
  float* __restrict__ dz;         // float32, blocked by channel group: (N * H, groups, W, GC)
  int W;
  float* __restrict__ psum;       // (runs, C): sums of dy
  float* __restrict__ pdot;       // sums of dy * xhat
  float* __restrict__ pdb;        // sums of dz (nullable)
  float eps;
  int act;
  int C;
  int groups;
  int64_t npix;   // N * H * W
  int64_t items;  // runs * groups
};

template <int ACT, bool STATS, bool DZ, bool TRAIN, typename T>
__device__ __forceinline__ void elem_run(const ClElemArgs<T>& a, int64_t run, int np, int c, int grp, int lane) {
  float mean[VC], inv[VC], gw[VC], mg[VC], mgx[VC];
#pragma unroll
  for (int v = 0; v < VC; ++v) {
    mean[v] = a.mean[c + v];
    inv[v] = inv_std(a.var[c + v], a.eps);
    gw[v] = a.bnw != nullptr ? a.bnw[c + v] : 1.0f;
    mg[v] = TRAIN ? a.mg[c + v] : 0.0f;
    mgx[v] = TRAIN ? a.mgx[c + v] : 0.0f;
  }
  float sdy[VC] = {0.0f, 0.0f, 0.0f, 0.0f}, sdyx[VC] = {0.0f, 0.0f, 0.0f, 0.0f}, sdz[VC] = {0.0f, 0.0f, 0.0f, 0.0f};
  int64_t off = run * NPB * a.C + c;
  // dz is stored blocked by channel group, (N * H, groups, W, GC) (the dgrad's and the wgrad's
  // column stride is then the constant GC): the run's first pixel as (row, column), then one
  // column per pixel, wrapping to the next row
  const int64_t pix0 = run * NPB;
  int64_t prow = pix0 / a.W;
  int w = static_cast<int>(pix0 - prow * a.W);
  int64_t doff = ((prow * a.groups + grp) * a.W + w) * GC + lane * VC;
  const int64_t wrap = static_cast<int64_t>(a.groups - 1) * a.W * GC;  // row end -> next row, column 0
  for (int p = 0; p < np; ++p, off += a.C) {
    float zv[VC], dyv[VC], dzv[VC];
    load4<T>(a.z + off, zv);
    load4<T>(a.dy + off, dyv);
#pragma unroll
    for (int v = 0; v < VC; ++v) {
      const float xhat = (act_fwd(zv[v], ACT) - mean[v]) * inv[v];
      if (STATS) {
        sdy[v] += dyv[v];
        sdyx[v] += dyv[v] * xhat;
      }
      if (DZ) {
        const float gv = a.bnw != nullptr ? dyv[v] * gw[v] : dyv[v];
        const float da = TRAIN ? (gv - mg[v] - xhat * mgx[v]) * inv[v] : gv * inv[v];
        dzv[v] = act_bwd(zv[v], da, ACT);
        sdz[v] += dzv[v];
      }
    }
    if (DZ) {
      *reinterpret_cast<float4*>(a.dz + doff) = make_float4(dzv[0], dzv[1], dzv[2], dzv[3]);
      doff += GC;
      if (++w == a.W) {
        w = 0;
        doff += wrap;
      }
    }
  }
  const int64_t row = run * a.C + c;
  if (STATS) {
    *reinterpret_cast<float4*>(a.psum + row) = make_float4(sdy[0], sdy[1], sdy[2], sdy[3]);
    *reinterpret_cast<float4*>(a.pdot + row) = make_float4(sdyx[0], sdyx[1], sdyx[2], sdyx[3]);
  }
  if (DZ && a.pdb != nullptr) *reinterpret_cast<float4*>(a.pdb + row) = make_float4(sdz[0], sdz[1], sdz[2], sdz[3]);
}

template <typename T, bool STATS, bool DZ, bool TRAIN>
__global__ void __launch_bounds__(THREADS_CL, 4) cl_elem_kernel(const ClElemArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.items) return;
  const int64_t run = item / a.groups;
  const int grp = static_cast<int>(item - run * a.groups);
  const int c = grp * GC + lane * VC;
  if (c >= a.C) return;
  const int64_t p0 = run * NPB;
  const int np = a.npix - p0 < NPB ? static_cast<int>(a.npix - p0) : NPB;
  switch (a.act) {
    case kGelu: elem_run<kGelu, STATS, DZ, TRAIN, T>(a, run, np, c, grp, lane); break;
    case kGeluTanh: elem_run<kGeluTanh, STATS, DZ, TRAIN, T>(a, run, np, c, grp, lane); break;
    default: elem_run<kRelu, STATS, DZ, TRAIN, T>(a, run, np, c, grp, lane); break;
  }
}

// Column sums of a (rows, cols) float32 matrix, rows in order, in double.
__global__ void __launch_bounds__(256) cl_colsum_kernel(const float* __restrict__ m, int64_t rows, int64_t cols,
                                                        double* __restrict__ out) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= cols) return;
  double s = 0.0;
  for (int64_t r = 0; r < rows; ++r) s += m[r * cols + c];
  out[c] = s;
}

// The weight gradient: per block (strips of the forward's plan) and tap, the partial
// sum over the block's output pixels of dz[p, c] * x[p + tap offset, c], into
// pw[(blk * K*K + tap) * C + c]. a: the forward's strip arguments (x, C, H, W, strips, ipw,
// groups, items, per_block) and dz.
template <typename T, int K>
__global__ void __launch_bounds__(THREADS_CL, 4) cl_wgrad_kernel(const ClArgs<T> a, float* __restrict__ pw) {
  constexpr int PAD = K / 2;
  constexpr int NW = TW + K - 1;  // input columns of a strip's window
  __shared__ __align__(16) float sred[WARPS * K * GC];  // [warp][j][channel of the group]
  const int grp = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.groups));
  const unsigned blk = blockIdx.x / static_cast<unsigned>(a.groups);
  const int c0 = grp * GC;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = c0 + lane * VC;
  const bool cvalid = c < a.C;
  const int cb = a.C * static_cast<int>(sizeof(T));

#pragma unroll 1
  for (int i = 0; i < K; ++i) {
    float acc[K][VC];
#pragma unroll
    for (int j = 0; j < K; ++j)
#pragma unroll
      for (int v = 0; v < VC; ++v) acc[j][v] = 0.0f;
#pragma unroll 1
    for (int s = 0; s < a.ipw; ++s) {
      const int item = static_cast<int>(blk) * a.per_block + s * WARPS + warp;
      if (item >= a.items) break;  // warp-uniform
      const int prow = item / a.strips;  // n * H + h
      const int h = prow % a.H;
      const int hr = h + i - PAD;
      if (hr < 0 || hr >= a.H || !cvalid) continue;  // uniform (cvalid: per lane, no shuffles below)
      const int w0 = (item - prow * a.strips) * TW, wc0 = w0 - PAD;
      const int npix = a.W - w0 < TW ? a.W - w0 : TW;
      // the strip's dz in registers (zeros past the row's end)
      float d[TW][VC];
      const float* dzp = a.dz + ((static_cast<int64_t>(prow) * a.groups + grp) * a.W + w0) * GC + lane * VC;
#pragma unroll
      for (int o = 0; o < TW; ++o) {
        float4 f = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
        if (o < npix) f = __ldg(reinterpret_cast<const float4*>(dzp + o * GC));
        d[o][0] = f.x; d[o][1] = f.y; d[o][2] = f.z; d[o][3] = f.w;
      }
      // the input row hr, columns wc0 .. wc0 + NW - 1 (zeros outside the image)
      const int plo = wc0 < 0 ? -wc0 : 0, phi = a.W - wc0 < NW ? a.W - wc0 : NW;
      const char* q = reinterpret_cast<const char*>(a.x + (static_cast<int64_t>(prow - h + hr) * a.W + wc0) * a.C + c);
      asm("" : "+l"(q));
#pragma unroll
      for (int p = 0; p < NW; ++p) {
        if (p < plo || p >= phi) continue;  // uniform
        float xv[VC];
        load4<T>(reinterpret_cast<const T*>(q + p * cb), xv);
#pragma unroll
        for (int j = 0; j < K; ++j) {
          const int o = p - j;
          if (o < 0 || o >= TW) continue;
#pragma unroll
          for (int v = 0; v < VC; ++v) acc[j][v] = fmaf(xv[v], d[o][v], acc[j][v]);
        }
      }
    }
    // the block's sum over its 4 warps, in warp order
#pragma unroll
    for (int j = 0; j < K; ++j)
      reinterpret_cast<float4*>(sred + (warp * K + j) * GC)[lane] =
          make_float4(acc[j][0], acc[j][1], acc[j][2], acc[j][3]);
    __syncthreads();
    const int t = static_cast<int>(threadIdx.x);
    if (c0 + t < a.C) {
      for (int j = 0; j < K; ++j) {
        float sum = 0.0f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += sred[(w * K + j) * GC + t];
        pw[(static_cast<int64_t>(blk) * K * K + i * K + j) * a.C + c0 + t] = sum;
      }
    }
    __syncthreads();
  }
}

}  // namespace
}  // namespace v2cl
}  // namespace cuda
}  // namespace convmixer_kernels
