// The CPU's vector FMA rate, for the benchmark's roofline (convmixer_kernels/tools/roofline.py):
//   convmixer_kernels::_cpu_fma_chains(int iters) -> Tensor
// Every thread of ATen's pool runs `iters` rounds of kChains independent FMA chains on
// whole vectors (16 floats where use_avx512() says the kernels run AVX-512, 8 with AVX2
// and FMA, 1 otherwise): the same units the depthwise kernels' conv runs on, kept busy
// without loads or stores. Returns a float64 tensor (2,): the FLOPs executed (2 per FMA
// lane) and a checksum of the chains' values (so that no chain can be dropped).
// The caller times the call; FLOPs / time is the rate. An fp32 GEMM is not a substitute:
// the BLAS that torch uses may not run the widest vectors a CPU has (seen on an AMD EPYC
// with AVX-512: torch.mm at 0.2 TFLOP/s on 2 threads, these chains at 0.47).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#include <cmath>
#include <vector>

#include "../cpu/activation.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

// Independent chains per thread: at least FMA latency x FMA ports (4 x 2 on the CPUs seen),
// with room to spare, and few enough to stay in registers (16 AVX2 registers).
constexpr int kChains = 12;
// a <- a * m + c converges to c / (1 - m) = 1e-3 without overflow or subnormals.
constexpr float kMul = 0.999f, kAdd = 1e-6f;

double chains_scalar(int64_t iters, int thread) {
  float a[kChains];
  for (int i = 0; i < kChains; ++i) a[i] = static_cast<float>(i + thread);
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) a[i] = std::fma(a[i], kMul, kAdd);
  double s = 0.0;
  for (int i = 0; i < kChains; ++i) s += a[i];
  return s;
}

#if defined(__AVX2__) && defined(__FMA__)
double chains_avx2(int64_t iters, int thread) {
  __m256 a[kChains];
  const __m256 m = _mm256_set1_ps(kMul), c = _mm256_set1_ps(kAdd);
  for (int i = 0; i < kChains; ++i) a[i] = _mm256_set1_ps(static_cast<float>(i + thread));
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) a[i] = _mm256_fmadd_ps(a[i], m, c);
  alignas(32) float out[8];
  double s = 0.0;
  for (int i = 0; i < kChains; ++i) {
    _mm256_store_ps(out, a[i]);
    for (float v : out) s += v;
  }
  return s;
}

#if defined(__GNUC__) && defined(__x86_64__)
#define CMK_FMA_AVX512 1
#pragma GCC push_options
#pragma GCC target("avx512f")
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12, its own _mm512_reduce_add_ps
double chains_avx512(int64_t iters, int thread) {
  __m512 a[kChains];
  const __m512 m = _mm512_set1_ps(kMul), c = _mm512_set1_ps(kAdd);
  for (int i = 0; i < kChains; ++i) a[i] = _mm512_set1_ps(static_cast<float>(i + thread));
  for (int64_t it = 0; it < iters; ++it)
    for (int i = 0; i < kChains; ++i) a[i] = _mm512_fmadd_ps(a[i], m, c);
  double s = 0.0;
  for (int i = 0; i < kChains; ++i) s += _mm512_reduce_add_ps(a[i]);
  return s;
}
#pragma GCC diagnostic pop
#pragma GCC pop_options
#endif
#endif

at::Tensor fma_chains(int64_t iters) {
  TORCH_CHECK_VALUE(iters >= 1, "_cpu_fma_chains: iters must be >= 1, got ", iters);
  int lanes = 1;
  double (*run)(int64_t, int) = chains_scalar;
#if defined(__AVX2__) && defined(__FMA__)
  lanes = 8;
  run = chains_avx2;
#ifdef CMK_FMA_AVX512
  if (use_avx512()) {
    lanes = 16;
    run = chains_avx512;
  }
#endif
#endif
  // One set of chains per pool thread (parallel_for covers every index, so all of them run).
  const int64_t threads = at::get_num_threads();
  std::vector<double> sums(threads, 0.0);
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t) sums[t] = run(iters, static_cast<int>(t));
  });
  const double flops = 2.0 * static_cast<double>(iters) * kChains * lanes * static_cast<double>(threads);
  double checksum = 0.0;
  for (double v : sums) checksum += v;
  at::Tensor out = at::empty({2}, at::TensorOptions().dtype(at::kDouble));
  out[0] = flops;
  out[1] = checksum;
  return out;
}

}  // namespace
}  // namespace cpu

// No tensor arguments: a catch-all kernel (as _build_info in csrc/extension.cpp).
TORCH_LIBRARY_FRAGMENT(convmixer_kernels, m) { m.def("_cpu_fma_chains(int iters) -> Tensor", &cpu::fma_chains); }

}  // namespace convmixer_kernels
