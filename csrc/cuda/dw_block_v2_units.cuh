// The 8-element row units and the sub-warp sum shared by the v2 depthwise kernels
// (dw_block_v2.cuh, dw_block_v2_backward.cuh; docs/cuda-depthwise.md): 16-byte loads
// converted to float32 once, stores rounded to the storage type, a fixed-order butterfly sum;
// and the per-channel body of the training forwards' finalize kernels (finalize_kernel,
// cl_finalize_kernel, gen_finalize_kernel): Chan's combination of partial statistics in double
// and the batch mean, variance and normalisation terms.
// Each kernel file includes it into its own translation unit (an unnamed namespace).
#pragma once

#include <ATen/ATen.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <cstring>

#include "dw_block_common.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace v2_units {
namespace {

// 8 consecutive elements as float32; `vec`: one 16-byte row unit (aligned, all in range).
template <typename T>
__device__ __forceinline__ void load8(const T* __restrict__ p, float v[8]);

template <>
__device__ __forceinline__ void load8<float>(const float* __restrict__ p, float v[8]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  const float4 b = __ldg(reinterpret_cast<const float4*>(p) + 1);
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
  v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
}

template <>
__device__ __forceinline__ void load8<c10::BFloat16>(const c10::BFloat16* __restrict__ p, float v[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {  // bfloat16 -> float32 is exact: the high half of the word
    v[2 * i] = __uint_as_float(w[i] << 16);
    v[2 * i + 1] = __uint_as_float(w[i] & 0xffff0000u);
  }
}

template <>
__device__ __forceinline__ void load8<c10::Half>(const c10::Half* __restrict__ p, float v[8]) {
  const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
  const uint32_t w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    __half2 h;
    memcpy(&h, &w[i], 4);
    const float2 f = __half22float2(h);
    v[2 * i] = f.x;
    v[2 * i + 1] = f.y;
  }
}

// Stores 8 float32 values rounded to T (round to nearest even, as from_f): 16-byte stores.
template <typename T>
__device__ __forceinline__ void store8(T* __restrict__ p, const float v[8]);

template <>
__device__ __forceinline__ void store8<float>(float* __restrict__ p, const float v[8]) {
  reinterpret_cast<float4*>(p)[0] = make_float4(v[0], v[1], v[2], v[3]);
  reinterpret_cast<float4*>(p)[1] = make_float4(v[4], v[5], v[6], v[7]);
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  const T lo = from_f<T>(a), hi = from_f<T>(b);
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

template <>
__device__ __forceinline__ void store8<c10::BFloat16>(c10::BFloat16* __restrict__ p, const float v[8]) {
  uint4 u;
  u.x = pack2<c10::BFloat16>(v[0], v[1]);
  u.y = pack2<c10::BFloat16>(v[2], v[3]);
  u.z = pack2<c10::BFloat16>(v[4], v[5]);
  u.w = pack2<c10::BFloat16>(v[6], v[7]);
  *reinterpret_cast<uint4*>(p) = u;
}

template <>
__device__ __forceinline__ void store8<c10::Half>(c10::Half* __restrict__ p, const float v[8]) {
  uint4 u;
  u.x = pack2<c10::Half>(v[0], v[1]);
  u.y = pack2<c10::Half>(v[2], v[3]);
  u.z = pack2<c10::Half>(v[4], v[5]);
  u.w = pack2<c10::Half>(v[6], v[7]);
  *reinterpret_cast<uint4*>(p) = u;
}

// Sum over the SUB lanes of a sub-warp (SUB = 32 or 16), the same value in each of them.
template <int SUB>
__device__ __forceinline__ float subwarp_sum(float v) {
#pragma unroll
  for (int m = SUB / 2; m > 0; m >>= 1) v += __shfl_xor_sync(0xffffffffu, v, m);
  return v;
}

// Chan's parallel combination, in double, of one channel's partial statistics: the running
// (count n, mean mu, M2 m2) absorbs a partial of nb values with mean mb and M2 m2b. The three
// finalize kernels combine their partials (tiles of rows, 2-D tiles, block rows: each kernel
// its own counts and order) through it, so the arithmetic and its order are one.
struct ChanStats {
  double mu = 0.0, m2 = 0.0, n = 0.0;
  __device__ __forceinline__ void add(double nb, double mb, double m2b) {
    const double tot = n + nb, delta = mb - mu;
    mu += delta * nb / tot;
    m2 += m2b + delta * delta * n * nb / tot;
    n = tot;
  }
};

// Channel c's batch mean and biased variance from its combined statistics, stored with the
// normalisation's per-channel terms, as the eval kernels hoist them: scale = bn_w / sqrt(var +
// eps) (correctly rounded steps), shift = bn_b - mean * scale (bn_w, bn_b nullable: 1 and 0).
// A template (Stats = ChanStats): as a plain function it was compiled into every file that
// includes this header, and that alone changed the register allocation of bwd_kernel
// (dw_block_v2_backward.cu) in one instantiation; as a template only its users get it.
template <typename Stats>
__device__ __forceinline__ void finalize_channel(const Stats& s, int64_t c, const float* bnw, const float* bnb,
                                                 float eps, float* mean_out, float* var_out, float* scale_out,
                                                 float* shift_out) {
  const float mean = static_cast<float>(s.mu), var = static_cast<float>(s.m2 / s.n);
  mean_out[c] = mean;
  var_out[c] = var;
  const float bw = bnw != nullptr ? bnw[c] : 1.0f, bb = bnb != nullptr ? bnb[c] : 0.0f;
  const float scale = inv_std(var, eps) * bw;
  scale_out[c] = scale;
  shift_out[c] = fmaf(-mean, scale, bb);
}

}  // namespace
}  // namespace v2_units
}  // namespace cuda
}  // namespace convmixer_kernels
