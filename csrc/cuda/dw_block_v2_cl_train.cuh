// Depthwise block v2, channels_last train forward (batch statistics; issue 22 part 1): the
// pieces after the shared strip loop of dw_block_v2_cl.cuh (cl_body<T, K, kClTrain>, launched
// as cl_train_kernel), in three passes, no atomics, deterministic for a given launch shape:
// 1. cl_train_kernel: the eval kernel's tiles, staging and taps (so z = round(conv(x) + b) is
//    bitwise the eval kernel's pre-activation); per strip the lane stores z (into the saved
//    pre-activation, or into out as scratch, as v1), turns its 16 x 4 accumulators into act(z)
//    and takes the strip's (mean, M2) per channel in two passes over the registers, then folds
//    them into its running (count, mean, M2) in shared memory by Chan's formula (float32).
//    After the strip loop the block combines its 4 warps in warp order (cl_block_stats) and
//    writes one row r = blockIdx.x / groups of two (rows, C) float32 matrices, and the row's
//    pixel count.
// 2. cl_finalize_kernel: per channel, Chan's combination of the rows in row order, in double
//    (as the NCHW finalize_kernel of dw_block_v2.cuh, whose tile counts are NCHW tiles; here
//    each row carries its own count): batch mean, biased variance, and the per-channel scale =
//    bn_w / sqrt(var + eps) (correctly rounded steps) and shift = bn_b - mean * scale.
// 3. cl_norm_kernel: out = x + act(z) * scale + shift; lanes along channels (4 per lane, one
//    vector load of z and x, one vector store per pixel), a warp walks NP consecutive pixels of
//    its channel group with the per-channel terms in registers.
// The rows partition the pixels by launch shape (strips per warp, from the SM count), so the
// statistics are bitwise reproducible run to run on one device; they differ from v1's and the
// NCHW kernel's by the order of the float32 partial sums.
#pragma once

#include "dw_block_v2_cl.cuh"
#include "dw_block_v2_units.cuh"  // ChanStats, finalize_channel

namespace convmixer_kernels {
namespace cuda {
namespace v2cl {
namespace {

// Per strip: z stored, acc <- act(z), the strip's (mean, M2) folded into this thread's running
// statistics (sstat: mean and M2 as float4 at [2 t] and [2 t + 1], the count at [2 VC THREADS + t]).
template <int ACT, typename T>
__device__ __forceinline__ void cl_train_epilogue(const ClArgs<T>& a, float (&acc)[TW][VC], int64_t pix0, int npix,
                                                  int c, float4 b, float* sstat) {
  const float bv[VC] = {b.x, b.y, b.z, b.w};
  float sum[VC] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int o = 0; o < TW; ++o) {
    if (o >= npix) break;  // warp-uniform: past the row's end
    const int64_t off = (pix0 + o) * a.C + c;
    float zf[VC];
#pragma unroll
    for (int v = 0; v < VC; ++v) {
      zf[v] = acc[o][v] + bv[v];
      const float zs = to_f(from_f<T>(zf[v]));  // the stored pre-activation, as conv_kernel
      acc[o][v] = act_fwd(zs, ACT);
      sum[v] += acc[o][v];
    }
    store4<T>(a.z + off, zf);
  }
  const float ns = static_cast<float>(npix), rn = 1.0f / ns;
  float mean[VC], m2[VC] = {0.0f, 0.0f, 0.0f, 0.0f};
#pragma unroll
  for (int v = 0; v < VC; ++v) mean[v] = sum[v] * rn;
#pragma unroll
  for (int o = 0; o < TW; ++o) {
    if (o >= npix) break;
#pragma unroll
    for (int v = 0; v < VC; ++v) {
      const float d = acc[o][v] - mean[v];
      m2[v] = fmaf(d, d, m2[v]);
    }
  }
  // Chan: (nw, mw, Mw) + (ns, ms, Ms) -> (nw + ns, mw + d ns / n, Mw + Ms + d^2 nw ns / n)
  float4* st = reinterpret_cast<float4*>(sstat) + 2 * threadIdx.x;
  float* stn = sstat + 2 * VC * THREADS_CL + threadIdx.x;
  const float nw = *stn, n = nw + ns, f = ns / n;
  float4 mw = st[0], mm = st[1];
  float* pm = &mw.x;
  float* pq = &mm.x;
#pragma unroll
  for (int v = 0; v < VC; ++v) {
    const float d = mean[v] - pm[v];
    pm[v] = fmaf(d, f, pm[v]);
    pq[v] = pq[v] + m2[v] + d * d * nw * f;
  }
  st[0] = mw;
  st[1] = mm;
  *stn = n;
}

// After the strip loop: the block's statistics per channel, its 4 warps combined in warp order
// (Chan, float32), into row blk of pmean / pm2 and the row's count into pcnt[blk].
template <typename T>
__device__ __forceinline__ void cl_block_stats(const ClArgs<T>& a, const float* sstat, unsigned blk, int c0) {
  __syncthreads();  // every warp's running statistics are final
  const int t = static_cast<int>(threadIdx.x);  // channel c0 + t of the group (GC == THREADS_CL)
  float n = 0.0f, mean = 0.0f, m2 = 0.0f;
#pragma unroll
  for (int w = 0; w < WARPS; ++w) {
    const int th = w * 32 + t / VC;  // the thread of warp w that holds channel c0 + t
    const float nb = sstat[2 * VC * THREADS_CL + th];
    if (nb == 0.0f) continue;  // a warp without strips
    const float mb = sstat[2 * VC * th + t % VC], m2b = sstat[2 * VC * th + VC + t % VC];
    const float tot = n + nb, d = mb - mean, f = nb / tot;
    mean = fmaf(d, f, mean);
    m2 = m2 + m2b + d * d * n * f;
    n = tot;
  }
  if (c0 + t < a.C) {
    a.pmean[static_cast<int64_t>(blk) * a.C + c0 + t] = mean;
    a.pm2[static_cast<int64_t>(blk) * a.C + c0 + t] = m2;
  }
  if (c0 == 0 && t == 0) a.pcnt[blk] = n;
}

struct ClFinalizeArgs {
  const float* __restrict__ pmean;  // (rows, C)
  const float* __restrict__ pm2;
  const float* __restrict__ pcnt;  // (rows,)
  float* __restrict__ mean;        // (C,)
  float* __restrict__ var;
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ bnb;  // nullable
  float* __restrict__ scale;      // (C,): the normalisation's per-channel terms, for cl_norm_kernel
  float* __restrict__ shift;
  float eps;
  int64_t rows, C;
};

// Batch mean and biased variance per channel: Chan's combination of the block rows in row
// order, in double.
__global__ void __launch_bounds__(256) cl_finalize_kernel(const ClFinalizeArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.C) return;
  v2_units::ChanStats s;
  for (int64_t r = 0; r < a.rows; ++r) s.add(a.pcnt[r], a.pmean[r * a.C + c], a.pm2[r * a.C + c]);
  // As the eval kernels: scale = bn_w / sqrt(var + eps) (correctly rounded steps), shift = bn_b - mean * scale.
  v2_units::finalize_channel(s, c, a.bnw, a.bnb, a.eps, a.mean, a.var, a.scale, a.shift);
}

constexpr int NP = 16;  // pixels per warp item of cl_norm_kernel

template <typename T>
struct ClNormArgs {
  const T* __restrict__ x;  // channels_last
  const T* z;               // channels_last; may alias out (each element read, then written, by one lane)
  T* out;
  const float* __restrict__ scale;  // (C,) from cl_finalize_kernel
  const float* __restrict__ shift;
  int act;
  int C;
  int groups;     // ceil(C / GC)
  int64_t npix;   // N * H * W
  int64_t items;  // ceil(npix / NP) * groups: one per warp
};

template <int ACT, typename T>
__device__ __forceinline__ void norm_run(const ClNormArgs<T>& a, int64_t p0, int np, int c) {
  const float4 sc4 = __ldg(reinterpret_cast<const float4*>(a.scale + c));
  const float4 sh4 = __ldg(reinterpret_cast<const float4*>(a.shift + c));
  const float sc[VC] = {sc4.x, sc4.y, sc4.z, sc4.w}, sh[VC] = {sh4.x, sh4.y, sh4.z, sh4.w};
  int64_t off = p0 * a.C + c;
#pragma unroll 4
  for (int p = 0; p < np; ++p, off += a.C) {
    float zv[VC], xv[VC];
    load4<T>(a.z + off, zv);
#pragma unroll
    for (int v = 0; v < VC; ++v) zv[v] = fmaf(act_fwd(zv[v], ACT), sc[v], sh[v]);
    load4<T>(a.x + off, xv);  // after the activations: fewer live registers across them
#pragma unroll
    for (int v = 0; v < VC; ++v) zv[v] += xv[v];
    store4<T>(a.out + off, zv);
  }
}

template <typename T>
__global__ void __launch_bounds__(THREADS_CL) cl_norm_kernel(const ClNormArgs<T> a) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int64_t item = static_cast<int64_t>(blockIdx.x) * WARPS + warp;
  if (item >= a.items) return;
  const int64_t run = item / a.groups;
  const int c = static_cast<int>(item - run * a.groups) * GC + lane * VC;
  if (c >= a.C) return;
  const int64_t p0 = run * NP;
  const int np = a.npix - p0 < NP ? static_cast<int>(a.npix - p0) : NP;
  switch (a.act) {
    case kGelu: norm_run<kGelu, T>(a, p0, np, c); break;
    case kGeluTanh: norm_run<kGeluTanh, T>(a, p0, np, c); break;
    default: norm_run<kRelu, T>(a, p0, np, c); break;
  }
}

}  // namespace
}  // namespace v2cl
}  // namespace cuda
}  // namespace convmixer_kernels
