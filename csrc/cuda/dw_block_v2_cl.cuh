// Depthwise block v2, channels_last (NHWC-contiguous) eval forward (issue 22 part 1):
//   out = x + BN(act(round(dwconv_k(x) + b)))  with the running statistics,
// the same semantics and activation numerics as the NCHW eval_kernel (dw_block_v2.cuh).
//
// Tiling. Lanes run along channels: lane l of a block owns the VC = 4 consecutive channels
// c0 + 4 l .. c0 + 4 l + 3 of the block's channel group (GC = 128 channels); a 4-channel
// vector is one 16-byte load for float32 and one 8-byte load for bfloat16/float16 (the
// 16-byte, 8-channel vector of a 2-byte type would need 8 x k weights of a kernel row plus
// 8 x 16 accumulators in registers: over 128). Each warp of the block works on a strip of
// TW = 16 output pixels along one row (n, h, w0 .. w0 + 15; warp-uniform, so every bounds
// test is a uniform branch or predicate), for its channel vectors: 16 x 4 float32
// accumulators per lane. A warp walks IPW strips (items) in turn, so that the block's
// shared weights serve several strips.
// Taps: per kernel row i (a uniform skip when the input row is outside the image), the row's
// k weights of the lane's 4 channels come from shared memory (k 16-byte loads), then the
// k - 1 + 16 input pixels of the row are loaded once each (one vector load, converted once)
// and feed every output o with j = p - o in [0, k): the k-wide window slides along the row
// in registers. The columns go in chunks of CH = 4 (2 for float32) behind a uniform test:
// a chunk inside the image takes plain loads, one partly outside takes predicated loads
// with zeros, one wholly outside is skipped (chunks keep the loads in flight few enough for
// 128 registers). Per output the taps are summed in the reference order (kernel row, then
// kernel column) with fmaf from 0, as conv_kernel and the NCHW eval_kernel do, so the
// pre-activation is bitwise theirs for finite weights (rows and column chunks wholly outside
// the image are skipped here, where the others add 0 * w: the same unless a weight is inf
// or NaN, where they give NaN and this kernel does not).
// Shared memory per block: the group's weights transposed to [tap][channel] (float32,
// k*k x 128) and the per-channel epilogue terms (bias, scale, shift), staged once per block
// (the only block barrier).
// Epilogue: bias, rounding of z to the storage type, act (the shared act_fwd), BN hoisted
// per channel: scale = bn_w / sqrt(var + eps) (correctly rounded steps), shift = bn_b -
// mean * scale, y = act * scale + shift (one FFMA, as the NCHW eval_kernel), the residual x
// reloaded as one vector per pixel, vector stores (16 bytes float32, 8 bytes 2-byte types).
// Offsets: int64 (image base and row base). No atomics.
#pragma once

#include <ATen/ATen.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "dw_block_common.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace v2cl {
namespace {  // per translation unit: dw_block_v2_cl.cu and dw_block_v2_cl_backward.cu include this

constexpr int WARPS = 4;  // warps per block: the same channel group, different strips
constexpr int THREADS_CL = WARPS * 32;
constexpr int VC = 4;         // channels per lane
constexpr int GC = 32 * VC;   // channels per block
constexpr int TW = 16;        // output pixels per strip (per lane: TW x VC accumulators)
constexpr int CH = 4;         // input columns per chunk of the tap loop (2-byte types)
static_assert(GC == THREADS_CL, "one thread per channel of the group while staging the terms");

template <typename T>
struct ClArgs {
  const T* __restrict__ x;         // (N, H, W, C) in memory (channels_last)
  T* __restrict__ out;             // channels_last
  T* __restrict__ z;               // pre-activation store (save_preact), channels_last, nullable
  const float* __restrict__ wt;    // (C, K*K) float32
  const float* __restrict__ bias;  // (C,) float32, nullable
  const float* __restrict__ mean;  // running statistics (C,) float32
  const float* __restrict__ var;
  const float* __restrict__ bnw;  // nullable
  const float* __restrict__ bnb;  // nullable
  float eps;
  int act;
  int C, H, W;
  int strips;         // ceil(W / TW)
  int ipw;            // items (strips) per warp
  int groups;         // ceil(C / GC)
  int items;          // N * H * strips (< 2^31)
  int per_block;      // WARPS * ipw
  // train forward (cl_train_kernel, dw_block_v2_cl_train.cuh): z is then the pre-activation
  // store (preact, or out as scratch); per block row r = blockIdx.x / groups the partial
  // statistics (mean, M2) of act(z) over the block's pixels, and their pixel count
  float* __restrict__ pmean;  // (blocks / groups, C)
  float* __restrict__ pm2;
  float* __restrict__ pcnt;  // (blocks / groups,)
  // dgrad (cl_dgrad_kernel, dw_block_v2_cl_backward.cuh): the input is dz (float32, blocked
  // by channel group: (N * H, groups, W, GC), see in_offset), wt the flipped weights,
  // out = dx = conv(dz) + dy
  const float* __restrict__ dz;
  const T* __restrict__ dy;
};

// Strips per warp (host): enough blocks for about 8 per SM, at most 16 strips per warp (the
// block's weight staging is shared by WARPS * ipw strips). Sets a.ipw, a.per_block; -> blocks
// (the partial rows of the train forward and the weight gradient are blocks / groups).
template <typename T>
int64_t plan_strips(ClArgs<T>& a, int64_t groups, int64_t sms) {
  const int64_t want_blocks = sms * 8 > 1 ? sms * 8 : 1;
  const int64_t warp_items = static_cast<int64_t>(a.items) * groups;
  int64_t ipw = warp_items / (WARPS * want_blocks);
  ipw = ipw < 1 ? 1 : (ipw > 16 ? 16 : ipw);
  a.ipw = static_cast<int>(ipw);
  a.per_block = WARPS * a.ipw;
  const int64_t blocks = (static_cast<int64_t>(a.items) + a.per_block - 1) / a.per_block * groups;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dw_block v2 channels_last (cuda): the problem needs ",
              blocks, " thread blocks, at most 2^31 - 1 are supported");
  return blocks;
}

// 4 consecutive channels as float32 (one vector load; the launcher checks C % 4 == 0 and a
// 16-byte aligned base, so the vector is aligned).
template <typename T>
__device__ __forceinline__ void load4(const T* __restrict__ p, float v[4]);

template <>
__device__ __forceinline__ void load4<float>(const float* __restrict__ p, float v[4]) {
  const float4 a = __ldg(reinterpret_cast<const float4*>(p));
  v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
}

template <>
__device__ __forceinline__ void load4<c10::BFloat16>(const c10::BFloat16* __restrict__ p, float v[4]) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
  v[0] = __uint_as_float(u.x << 16);  // bfloat16 -> float32 is exact: the high half of the word
  v[1] = __uint_as_float(u.x & 0xffff0000u);
  v[2] = __uint_as_float(u.y << 16);
  v[3] = __uint_as_float(u.y & 0xffff0000u);
}

template <>
__device__ __forceinline__ void load4<c10::Half>(const c10::Half* __restrict__ p, float v[4]) {
  const uint2 u = __ldg(reinterpret_cast<const uint2*>(p));
  __half2 h0, h1;
  memcpy(&h0, &u.x, 4);
  memcpy(&h1, &u.y, 4);
  const float2 f0 = __half22float2(h0), f1 = __half22float2(h1);
  v[0] = f0.x; v[1] = f0.y; v[2] = f1.x; v[3] = f1.y;
}

// The raw 4-channel vector (float4 for float32, two 32-bit words for the 2-byte types): loaded
// when `ok`, zero otherwise (one predicated load and one zeroing move), then converted
// unconditionally (zero converts to zero), so no conversion sits behind a predicate.
template <typename T>
struct Raw4 {
  using type = uint2;
};
template <>
struct Raw4<float> {
  using type = float4;
};

template <typename T>
__device__ __forceinline__ typename Raw4<T>::type load_raw4(const T* __restrict__ p, bool ok) {
  using R = typename Raw4<T>::type;
  R r;
  if constexpr (std::is_same<T, float>::value) {
    r = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  } else {
    r = make_uint2(0u, 0u);
  }
  if (ok) r = __ldg(reinterpret_cast<const R*>(p));
  return r;
}

__device__ __forceinline__ void cvt4(const float4 r, float v[4]) {
  v[0] = r.x; v[1] = r.y; v[2] = r.z; v[3] = r.w;
}

template <typename T>
__device__ __forceinline__ void cvt4(const uint2 u, float v[4]) {
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    v[0] = __uint_as_float(u.x << 16);
    v[1] = __uint_as_float(u.x & 0xffff0000u);
    v[2] = __uint_as_float(u.y << 16);
    v[3] = __uint_as_float(u.y & 0xffff0000u);
  } else {
    __half2 h0, h1;
    memcpy(&h0, &u.x, 4);
    memcpy(&h1, &u.y, 4);
    const float2 f0 = __half22float2(h0), f1 = __half22float2(h1);
    v[0] = f0.x; v[1] = f0.y; v[2] = f1.x; v[3] = f1.y;
  }
}

template <typename T>
__device__ __forceinline__ void load4z(const T* __restrict__ p, bool ok, float v[4]) {
  const auto r = load_raw4<T>(p, ok);
  if constexpr (std::is_same<T, float>::value) {
    cvt4(r, v);
  } else {
    cvt4<T>(r, v);
  }
}

template <typename T>
__device__ __forceinline__ uint32_t pack2(float a, float b) {
  const T lo = from_f<T>(a), hi = from_f<T>(b);
  return static_cast<uint32_t>(lo.x) | (static_cast<uint32_t>(hi.x) << 16);
}

// 4 float32 values rounded to T (round to nearest even, as from_f): one vector store.
template <typename T>
__device__ __forceinline__ void store4(T* __restrict__ p, const float v[4]) {
  if constexpr (std::is_same<T, float>::value) {
    *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
  } else {
    *reinterpret_cast<uint2*>(p) = make_uint2(pack2<T>(v[0], v[1]), pack2<T>(v[2], v[3]));
  }
}

// The epilogue of one lane for one strip: TW pixels x 4 channels.
template <int ACT, typename T>
__device__ __forceinline__ void cl_epilogue(const ClArgs<T>& a, const float (&acc)[TW][VC], int64_t pix0,
                                            int npix, int c, const float4 b, const float4 scale,
                                            const float4 shift) {
  const float bv[VC] = {b.x, b.y, b.z, b.w};
  const float sc[VC] = {scale.x, scale.y, scale.z, scale.w};
  const float sh[VC] = {shift.x, shift.y, shift.z, shift.w};
#pragma unroll
  for (int o = 0; o < TW; ++o) {
    if (o >= npix) break;  // warp-uniform: past the row's end
    const int64_t off = (pix0 + o) * a.C + c;
    float xv[VC], ov[VC], zf[VC];
    load4<T>(a.x + off, xv);
#pragma unroll
    for (int v = 0; v < VC; ++v) {
      zf[v] = acc[o][v] + bv[v];
      const float zs = to_f(from_f<T>(zf[v]));  // the stored pre-activation, as conv_kernel
      const float y = act_fwd(zs, ACT);
      ov[v] = xv[v] + fmaf(y, sc[v], sh[v]);
    }
    store4<T>(a.out + off, ov);
    if (a.z != nullptr) store4<T>(a.z + off, zf);
  }
}

// One chunk of CHT input columns p0 .. of a kernel row: load each column's 4-channel vector
// once (CHECK: zero where outside the image) and feed every output it reaches.
template <typename T, int K, int CHT, bool CHECK>
__device__ __forceinline__ void taps_chunk(int p0, const char* q, int cb, uint32_t cmask, const float (&wr)[K][VC],
                                           float (&acc)[TW][VC]) {
#pragma unroll
  for (int p = p0; p < p0 + CHT && p < TW + K - 1; ++p) {
    float v[VC];
    if (CHECK) {
      load4z<T>(reinterpret_cast<const T*>(q + p * cb), (cmask >> p) & 1u, v);
    } else {
      load4z<T>(reinterpret_cast<const T*>(q + p * cb), true, v);
    }
#pragma unroll
    for (int j = 0; j < K; ++j) {
      const int o = p - j;  // the output this input feeds through kernel column j
      if (o < 0 || o >= TW) continue;
#pragma unroll
      for (int vv = 0; vv < VC; ++vv) acc[o][vv] = fmaf(v[vv], wr[j][vv], acc[o][vv]);
    }
  }
}

// The group's weights, transposed to [tap][channel of the group] in shared memory: thread t
// stages channel c0 + t (GC == THREADS_CL), its K*K contiguous weights, one load and one store
// per tap at immediate offsets (zeros past C).
template <int K>
__device__ __forceinline__ void stage_weights(const float* __restrict__ wt, int C, int c0, float* sw) {
  constexpr int KK = K * K;
  const int cs = c0 + static_cast<int>(threadIdx.x);
  const float* src = wt + static_cast<int64_t>(cs < C ? cs : 0) * KK;
  const bool ok = cs < C;
#pragma unroll 9
  for (int t = 0; t < KK; ++t) sw[t * GC + threadIdx.x] = ok ? __ldg(src + t) : 0.0f;
}

enum ClMode : int { kClEval = 0, kClTrain = 1, kClDgrad = 2 };

// The element offset of input pixel (row r = n * H + h, column w) for the lane's channels:
// NHWC (x), or for the dgrad the group-blocked dz of the backward, (N * H, groups, W, GC)
// (dw_block_v2_cl_backward.cuh), whose column stride GC is a compile-time constant.
template <int MODE>
__device__ __forceinline__ int64_t in_offset(int r, int w, int W, int C, int groups, int grp, int c, int lane) {
  if constexpr (MODE == kClDgrad) {
    return ((static_cast<int64_t>(r) * groups + grp) * W + w) * GC + lane * VC;
  } else {
    return (static_cast<int64_t>(r) * W + w) * C + c;
  }
}

// The train forward's strip epilogue (dw_block_v2_cl_train.cuh): z stored, act(z) into acc,
// the strip's statistics combined into the warp's running ones (sstat).
template <int ACT, typename T>
__device__ __forceinline__ void cl_train_epilogue(const ClArgs<T>& a, float (&acc)[TW][VC], int64_t pix0, int npix,
                                                  int c, float4 b, float* sstat);

// The train forward's partial statistics of this block (dw_block_v2_cl_train.cuh).
template <typename T>
__device__ __forceinline__ void cl_block_stats(const ClArgs<T>& a, const float* sstat, unsigned blk, int c0);

// The strips of one warp (items blk * per_block + s * WARPS + warp, s < ipw): the taps of each
// strip into acc (float32, the reference order), then the MODE's epilogue for the lanes whose
// channels are in range (pix0: the strip's first pixel n * H * W + h * W + w0; npix: its pixels
// inside the row; c: the lane's first channel). sw: the staged weights; sterm: the staged
// per-channel terms (eval: bias, scale, shift; train: bias); sstat: train only, the warp's
// running statistics.
template <typename T, int K, int MODE>
__device__ __forceinline__ void cl_body(const ClArgs<T> a) {
  constexpr int PAD = K / 2;
  constexpr int KK = K * K;
  // the conv's input type: T, or float32 dz for the dgrad
  using TI = typename std::conditional<MODE == kClDgrad, float, T>::type;
  // columns per chunk: 2 for float32 (its raw vectors are 4 registers, not 2)
  constexpr int CHT = std::is_same<TI, float>::value ? 2 : CH;
  const TI* __restrict__ xin;
  if constexpr (MODE == kClDgrad) {
    xin = a.dz;
  } else {
    xin = a.x;
  }
  __shared__ __align__(16) float sw[KK * GC];  // [tap][channel of the group]
  __shared__ __align__(16) float sterm[3 * GC];  // bias, scale, shift per channel of the group
  const int grp = static_cast<int>(blockIdx.x % static_cast<unsigned>(a.groups));
  const unsigned blk = blockIdx.x / static_cast<unsigned>(a.groups);
  const int c0 = grp * GC;

  // ---- per block: the group's weights, transposed, and the per-channel terms ----
  stage_weights<K>(a.wt, a.C, c0, sw);
  if constexpr (MODE != kClDgrad) {
    const int c = c0 + static_cast<int>(threadIdx.x);
    float b = 0.0f, scale = 0.0f, shift = 0.0f;
    if (c < a.C) {
      b = a.bias != nullptr ? a.bias[c] : 0.0f;
      if constexpr (MODE == kClEval) {
        const float bw = a.bnw != nullptr ? a.bnw[c] : 1.0f, bb = a.bnb != nullptr ? a.bnb[c] : 0.0f;
        scale = inv_std(a.var[c], a.eps) * bw;
        shift = fmaf(-a.mean[c], scale, bb);
      }
    }
    sterm[threadIdx.x] = b;
    sterm[GC + threadIdx.x] = scale;
    sterm[2 * GC + threadIdx.x] = shift;
  }
  // train: the running statistics of each thread's 4 channels over its warp's strips so far
  // (mean, M2 as two float4 per thread, then one count per thread)
  __shared__ __align__(16) float sstat[MODE == kClTrain ? (2 * VC + 1) * THREADS_CL : 4];
  if constexpr (MODE == kClTrain) {
    reinterpret_cast<float4*>(sstat)[2 * threadIdx.x] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    reinterpret_cast<float4*>(sstat)[2 * threadIdx.x + 1] = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
    sstat[2 * VC * THREADS_CL + threadIdx.x] = 0.0f;
  }
  __syncthreads();  // eval: the only block barrier; below, warps are independent

  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int c = c0 + lane * VC;
  const bool cvalid = c < a.C;  // C % 4 == 0: the lane's 4 channels are all in or all out
  const float* wl = sw + lane * VC;
  // bytes per input pixel: NHWC x (C channels), or the dgrad's group-blocked dz (GC channels:
  // a compile-time column stride, so the column loads take immediate offsets)
  const int cb = MODE == kClDgrad ? GC * static_cast<int>(sizeof(float)) : a.C * static_cast<int>(sizeof(TI));

  for (int s = 0; s < a.ipw; ++s) {
    // item = (n * H + h) * strips + strip (int32: the launcher checks N * H * strips < 2^31)
    const int item = static_cast<int>(blk) * a.per_block + s * WARPS + warp;
    if (item >= a.items) break;  // warp-uniform
    int prow = item / a.strips;  // n * H + h
    const int h = prow % a.H;
    // bit p: input column w0 - PAD + p is inside the image (and the lane's channels are)
    const int wc0 = (item - prow * a.strips) * TW - PAD;
    const int plo = wc0 < 0 ? -wc0 : 0, phi = a.W - wc0 < TW + K - 1 ? a.W - wc0 : TW + K - 1;
    uint32_t cmask = cvalid ? ((1u << phi) - 1u) & ~((1u << plo) - 1u) : 0u;  // phi > plo >= 0, phi < 32
    float acc[TW][VC];
#pragma unroll
    for (int o = 0; o < TW; ++o)
#pragma unroll
      for (int v = 0; v < VC; ++v) acc[o][v] = 0.0f;

#if __CUDA_ARCH__ >= 900
    // the kernel rows whose input row is inside the image: i in [ilo, ihi) (uniform)
    const int ilo = PAD - h > 0 ? PAD - h : 0;
    const int ihi = a.H - h + PAD < K ? a.H - h + PAD : K;
    // pixel (n, h - PAD + ilo, wc0) of the lane's channels, then one image row (rb bytes) per
    // kernel row and one pixel (cb bytes) per column; the row's weights at wi (sm_90: about
    // 150 instructions per strip fewer than recomputing both per row, below)
    const char* q = reinterpret_cast<const char*>(
        xin + in_offset<MODE>(prow - h + (h - PAD + ilo), wc0, a.W, a.C, a.groups, grp, c, lane));
    const int64_t rb = (MODE == kClDgrad ? static_cast<int64_t>(a.groups) : int64_t{1}) * a.W * cb;
    const float* wi = wl + ilo * K * GC;
#pragma unroll 1
    for (int i = ilo; i < ihi; ++i, q += rb, wi += K * GC) {
      asm("" : "+l"(q));  // opaque: column addresses are built from q, not re-derived from indices
#else
    // sm_80: the row's address and weights recomputed per row (the form above spills there)
#pragma unroll 1
    for (int i = 0; i < K; ++i) {
      const int hr = h + i - PAD;
      if (hr < 0 || hr >= a.H) continue;  // warp-uniform: the row is outside the image
      const float* wi = wl + i * K * GC;
      const int prow_r = prow - h + hr;  // n * H + hr
      const char* q =
          reinterpret_cast<const char*>(xin + in_offset<MODE>(prow_r, wc0, a.W, a.C, a.groups, grp, c, lane));
      asm("" : "+l"(q));  // opaque: column addresses are built from q, not re-derived from indices
#endif
      float wr[K][VC];
#pragma unroll
      for (int j = 0; j < K; ++j) {
        const float4 f = *reinterpret_cast<const float4*>(wi + j * GC);
        wr[j][0] = f.x; wr[j][1] = f.y; wr[j][2] = f.z; wr[j][3] = f.w;
      }
      // the row's columns in chunks of CHT behind a uniform test (a chunk wholly outside the
      // image adds nothing; one wholly inside needs no per-column test): the scheduler keeps
      // a chunk's loads near their taps, so the loads in flight fit beside the 64
      // accumulators and the row's weights
#pragma unroll
      for (int p0 = 0; p0 < TW + K - 1; p0 += CHT) {
        const int np = TW + K - 1 - p0 < CHT ? TW + K - 1 - p0 : CHT;  // columns in this chunk
        const uint32_t m = (cmask >> p0) & ((1u << np) - 1u);
        if (m == (1u << np) - 1u) {
          // every column of the chunk in the image: plain loads
          taps_chunk<TI, K, CHT, false>(p0, q, cb, cmask, wr, acc);
        } else if (m) {
          taps_chunk<TI, K, CHT, true>(p0, q, cb, cmask, wr, acc);
        }
      }
    }
    if (!cvalid) continue;
    prow = item / a.strips;  // recomputed: fewer values live across the taps
    const int w0 = (item - prow * a.strips) * TW;
    const int64_t pix0 = static_cast<int64_t>(prow) * a.W + w0;
    const int npix = a.W - w0 < TW ? a.W - w0 : TW;
    if constexpr (MODE == kClDgrad) {
      // dx = conv(dz, flipped weights) + dy (the residual), rounded once
#pragma unroll
      for (int o = 0; o < TW; ++o) {
        if (o >= npix) break;  // warp-uniform: past the row's end
        const int64_t off = (pix0 + o) * a.C + c;
        float dyv[VC];
        load4<T>(a.dy + off, dyv);
#pragma unroll
        for (int v = 0; v < VC; ++v) dyv[v] += acc[o][v];
        store4<T>(a.out + off, dyv);
      }
      continue;
    }
    // the per-channel terms, reloaded per strip (not held in registers across the taps)
    const float4 b4 = reinterpret_cast<const float4*>(sterm)[lane];
    if constexpr (MODE == kClEval) {
      const float4 sc4 = reinterpret_cast<const float4*>(sterm + GC)[lane];
      const float4 sh4 = reinterpret_cast<const float4*>(sterm + 2 * GC)[lane];
      switch (a.act) {
        case kGelu: cl_epilogue<kGelu, T>(a, acc, pix0, npix, c, b4, sc4, sh4); break;
        case kGeluTanh: cl_epilogue<kGeluTanh, T>(a, acc, pix0, npix, c, b4, sc4, sh4); break;
        default: cl_epilogue<kRelu, T>(a, acc, pix0, npix, c, b4, sc4, sh4); break;
      }
    } else if constexpr (MODE == kClTrain) {
      switch (a.act) {
        case kGelu: cl_train_epilogue<kGelu, T>(a, acc, pix0, npix, c, b4, sstat); break;
        case kGeluTanh: cl_train_epilogue<kGeluTanh, T>(a, acc, pix0, npix, c, b4, sstat); break;
        default: cl_train_epilogue<kRelu, T>(a, acc, pix0, npix, c, b4, sstat); break;
      }
    }
  }
  if constexpr (MODE == kClTrain) cl_block_stats(a, sstat, blk, c0);
}

template <typename T, int K>
__global__ void __launch_bounds__(THREADS_CL, 4) cl_eval_kernel(const ClArgs<T> a) {
  cl_body<T, K, kClEval>(a);
}

// The backward's dgrad (dw_block_v2_cl_backward.cuh): dx = conv(dz, flipped weights) + dy.
template <typename T, int K>
__global__ void __launch_bounds__(THREADS_CL, 4) cl_dgrad_kernel(const ClArgs<T> a) {
  cl_body<T, K, kClDgrad>(a);
}

// The train forward's first pass (dw_block_v2_cl_train.cuh): z = round(conv(x) + b) stored,
// the block's partial statistics of act(z) written.
template <typename T, int K>
__global__ void __launch_bounds__(THREADS_CL, 4) cl_train_kernel(const ClArgs<T> a) {
  cl_body<T, K, kClTrain>(a);
}

}  // namespace
}  // namespace v2cl
}  // namespace cuda
}  // namespace convmixer_kernels
