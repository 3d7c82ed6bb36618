// The vector wrapper of the CPU depthwise kernels' AVX2 code (csrc/cpu/dw_block_conv.cpp,
// dw_block_wgrad.cpp): V8, 8 float32 lanes (one pixel's 8 channels of a tile), with load,
// store, FMA and zero. AVX2 + FMA where the build has them, else a plain array that the
// compiler vectorises. The AVX-512 code of the same kernels uses the intrinsics directly.
#pragma once

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cstdint>

namespace convmixer_kernels {
namespace cpu {

constexpr int64_t kV8Lanes = 8;

// A vector of CB floats: AVX2 where the build has it, else a plain array the compiler vectorises.
#if defined(__AVX2__) && defined(__FMA__)
struct V8 {
  __m256 v;
};
inline V8 vload(const float* p) { return {_mm256_loadu_ps(p)}; }
inline void vstore(float* p, V8 a) { _mm256_storeu_ps(p, a.v); }
inline V8 vfma(V8 a, V8 b, V8 c) { return {_mm256_fmadd_ps(a.v, b.v, c.v)}; }
inline V8 vzero() { return {_mm256_setzero_ps()}; }
#else
struct V8 {
  float v[kV8Lanes];
};
inline V8 vload(const float* p) { V8 r; for (int i = 0; i < kV8Lanes; ++i) r.v[i] = p[i]; return r; }
inline void vstore(float* p, V8 a) { for (int i = 0; i < kV8Lanes; ++i) p[i] = a.v[i]; }
inline V8 vfma(V8 a, V8 b, V8 c) { V8 r; for (int i = 0; i < kV8Lanes; ++i) r.v[i] = a.v[i] * b.v[i] + c.v[i]; return r; }
inline V8 vzero() { V8 r; for (int i = 0; i < kV8Lanes; ++i) r.v[i] = 0.f; return r; }
#endif

}  // namespace cpu
}  // namespace convmixer_kernels
