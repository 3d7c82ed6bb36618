// Depthwise block v2: host launch of the register-blocked eval and train forwards
// (dw_block_v2.cuh, design there; interface in dw_block_v2.h), and the v2 gate
// (dw_block_v2_enabled: validated source or explicit opt-in). dw_block.cu's forward calls them
// for the calls they cover and runs the first kernels (conv_kernel) for everything else.
//
// Instantiations: float32 / bfloat16 / float16 x k in {3, 5, 7, 9} x {32x32 tile, 16x16 tile
// with two planes per warp}, for eval_kernel and train_kernel; norm_kernel per dtype.
// -DCONVMIXER_DW_V2_ONLY_K9_BF16 (compile checks only) keeps the headline ones (bfloat16,
// k = 9, both tiles).
//
// -DCONVMIXER_DW_V2_SOURCE_HASH="<sha256>" (setup.py, computed from the kernel sources listed in
// convmixer_kernels/backends/validation.py) is the hash this binary was built from; Python
// compares it with the validation manifest and sets the default with _cuda_dw_v2_set_validated.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <torch/library.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "dw_block_v2.cuh"
#include "dw_block_v2.h"

namespace convmixer_kernels {
namespace cuda {
namespace {

template <typename T, int K, int QC, int R>
void launch_eval(v2::V2EvalArgs<T> a) {
  using S = v2::Tile<K, QC, R>;
  a.tiles_h = (a.H + S::TR - 1) / S::TR;
  a.warps = (a.planes + S::PPW - 1) / S::PPW * a.tiles_h;
  const int64_t blocks = (a.warps + v2::WARPS - 1) / v2::WARPS;
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dw_block v2 (cuda): the problem needs ", blocks,
              " thread blocks, at most 2^31 - 1 are supported");
  v2::eval_kernel<T, K, QC, R>
      <<<static_cast<unsigned>(blocks), v2::THREADS_V2, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int K>
void launch_eval_k(const v2::V2EvalArgs<T>& a) {
  if (a.W <= 16)
    launch_eval<T, K, 2, 2>(a);  // 16x16 tiles, two planes per warp
  else
    launch_eval<T, K, 4, 4>(a);  // 32x32 tiles
}

template <typename T>
void launch_eval_dispatch_k(int k, const v2::V2EvalArgs<T>& a) {
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (k == 9) return launch_eval_k<T, 9>(a);
  }
  TORCH_CHECK(false, "dw_block v2: built with CONVMIXER_DW_V2_ONLY_K9_BF16");
#else
  switch (k) {
    case 3: return launch_eval_k<T, 3>(a);
    case 5: return launch_eval_k<T, 5>(a);
    case 7: return launch_eval_k<T, 7>(a);
    case 9: return launch_eval_k<T, 9>(a);
    default: TORCH_CHECK(false, "dw_block v2: k = ", k, " is not covered (3, 5, 7, 9)");
  }
#endif
}

template <typename T, int K, int QC, int R>
void launch_train(v2::V2TrainArgs<T> a) {
  using S = v2::Tile<K, QC, R>;
  a.tiles_h = (a.H + S::TR - 1) / S::TR;
  a.warps = (a.planes + S::PPW - 1) / S::PPW * a.tiles_h;
  const int64_t blocks = (a.warps + v2::WARPS - 1) / v2::WARPS;
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dw_block v2 (cuda): the problem needs ", blocks,
              " thread blocks, at most 2^31 - 1 are supported");
  v2::train_kernel<T, K, QC, R>
      <<<static_cast<unsigned>(blocks), v2::THREADS_V2, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Rows per tile of the configuration launch_train_k picks (the partials' tile height).
int train_tile_rows(int64_t W) { return W <= 16 ? 16 : 32; }

template <typename T, int K>
void launch_train_k(const v2::V2TrainArgs<T>& a) {
  if (a.W <= 16)
    launch_train<T, K, 2, 2>(a);  // 16x16 tiles, two planes per warp
  else
    launch_train<T, K, 4, 4>(a);  // 32x32 tiles
}

template <typename T>
void launch_train_dispatch_k(int k, const v2::V2TrainArgs<T>& a) {
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (k == 9) return launch_train_k<T, 9>(a);
  }
  TORCH_CHECK(false, "dw_block v2: built with CONVMIXER_DW_V2_ONLY_K9_BF16");
#else
  switch (k) {
    case 3: return launch_train_k<T, 3>(a);
    case 5: return launch_train_k<T, 5>(a);
    case 7: return launch_train_k<T, 7>(a);
    case 9: return launch_train_k<T, 9>(a);
    default: TORCH_CHECK(false, "dw_block v2: k = ", k, " is not covered (3, 5, 7, 9)");
  }
#endif
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

template <typename T>
void run_eval(const at::Tensor& x, int k, const at::Tensor& wt, const at::Tensor& b, const at::Tensor& bnw,
              const at::Tensor& bnb, const at::Tensor& mean, const at::Tensor& var, double eps, int act,
              const at::Tensor& out, const at::Tensor& z) {
  v2::V2EvalArgs<T> a{};
  a.x = x.data_ptr<T>();
  a.out = out.data_ptr<T>();
  a.z = z.defined() ? z.data_ptr<T>() : nullptr;
  a.wt = wt.data_ptr<float>();
  a.bias = ptr_or_null(b);
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  a.bnw = ptr_or_null(bnw);
  a.bnb = ptr_or_null(bnb);
  a.eps = static_cast<float>(eps);
  a.act = act;
  a.C = static_cast<int>(x.size(1));
  a.H = static_cast<int>(x.size(2));
  a.W = static_cast<int>(x.size(3));
  a.planes = x.size(0) * x.size(1);
  a.vec = a.W % 8 == 0 && aligned16(a.x) && aligned16(a.out) && (a.z == nullptr || aligned16(a.z));
  launch_eval_dispatch_k<T>(k, a);
}

template <typename T>
void run_train(const at::Tensor& x, int k, const at::Tensor& wt, const at::Tensor& b, const at::Tensor& bnw,
               const at::Tensor& bnb, double eps, int act, const at::Tensor& out, const at::Tensor& z,
               const at::Tensor& mean, const at::Tensor& var) {
  const int64_t N = x.size(0), C = x.size(1);
  const int H = static_cast<int>(x.size(2)), W = static_cast<int>(x.size(3));
  const int TR = train_tile_rows(W);
  const int64_t tiles_h = (H + TR - 1) / TR;
  const auto fopt = x.options().dtype(at::kFloat);
  const at::Tensor pmean = at::empty({N * tiles_h, C}, fopt), pm2 = at::empty({N * tiles_h, C}, fopt);
  auto stream = at::cuda::getCurrentCUDAStream();

  v2::V2TrainArgs<T> a{};
  a.x = x.data_ptr<T>();
  a.z = z.data_ptr<T>();
  a.wt = wt.data_ptr<float>();
  a.bias = ptr_or_null(b);
  a.pmean = pmean.data_ptr<float>();
  a.pm2 = pm2.data_ptr<float>();
  a.act = act;
  a.C = static_cast<int>(C);
  a.H = H;
  a.W = W;
  a.planes = N * C;
  a.vec = W % 8 == 0 && aligned16(a.x) && aligned16(a.z);
  launch_train_dispatch_k<T>(k, a);

  const at::Tensor terms = at::empty({2, C}, fopt);  // scale, shift
  v2::V2FinalizeArgs f{pmean.data_ptr<float>(), pm2.data_ptr<float>(), mean.data_ptr<float>(),
                       var.data_ptr<float>(), ptr_or_null(bnw), ptr_or_null(bnb), terms.data_ptr<float>(),
                       terms.data_ptr<float>() + C, static_cast<float>(eps), N, C, H, W, TR, tiles_h};
  v2::finalize_kernel<<<static_cast<unsigned>((C + 255) / 256), 256, 0, stream>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  v2::V2NormArgs<T> na{};
  na.x = a.x;
  na.z = a.z;
  na.out = out.data_ptr<T>();
  na.scale = f.scale;
  na.shift = f.shift;
  na.act = act;
  na.C = a.C;
  na.HW = H * W;
  na.chunks = (na.HW + 255) / 256;
  na.items = N * C * na.chunks;
  na.vec = na.HW % 8 == 0 && aligned16(na.x) && aligned16(na.z) && aligned16(na.out);
  const int64_t blocks = (na.items + v2::WARPS - 1) / v2::WARPS;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dw_block v2 (cuda): the problem needs ", blocks,
              " thread blocks, at most 2^31 - 1 are supported");
  v2::norm_kernel<T><<<static_cast<unsigned>(blocks), v2::THREADS_V2, 0, stream>>>(na);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#ifndef CONVMIXER_DW_V2_SOURCE_HASH
#define CONVMIXER_DW_V2_SOURCE_HASH "unknown"
#endif

// Set from Python (convmixer_kernels.backends.validation) when the extension loads: true only
// when the validation manifest records a passing GPU run of this binary's source hash.
std::atomic<bool> g_validated{false};

bool set_validated(bool v) { return g_validated.exchange(v); }

std::string source_hash() { return CONVMIXER_DW_V2_SOURCE_HASH; }

#define CONVMIXER_DW_V2_DISPATCH(st, name, ...)                \
  AT_DISPATCH_SWITCH(st, name,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

bool dw_block_v2_enabled() {
  const char* v = std::getenv("CONVMIXER_KERNELS_CUDA_DW_V2");
  if (v != nullptr && std::string(v) == "0") return false;  // v1 everywhere
  if (v != nullptr && std::string(v) == "1") return true;   // explicit opt-in (unvalidated allowed)
  return g_validated.load();
}

bool dw_block_v2_eval_covers(const at::Tensor& x, int64_t k) {
  if (x.dim() != 4 || x.numel() == 0 || !x.is_contiguous()) return false;
  const auto st = x.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) return false;
  if (k != 3 && k != 5 && k != 7 && k != 9) return false;
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if (k != 9 || st != at::kBFloat16) return false;
#endif
  return x.size(3) <= 32 && x.size(2) * x.size(3) < std::numeric_limits<int32_t>::max() &&
         x.size(1) < std::numeric_limits<int32_t>::max();
}

void dw_block_v2_eval_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                              const at::Tensor& bnw, const at::Tensor& bnb, const at::Tensor& mean,
                              const at::Tensor& var, double eps, int act, const at::Tensor& out,
                              const at::Tensor& z) {
  TORCH_CHECK(dw_block_v2_eval_covers(x, k) && wt.size(1) == k * k, "dw_block v2: call not covered");
  TORCH_CHECK(out.is_contiguous() && (!z.defined() || z.is_contiguous()), "dw_block v2: out and z must be NCHW");
  CONVMIXER_DW_V2_DISPATCH(x.scalar_type(), "dw_block_v2_eval_forward", [&] {
    run_eval<scalar_t>(x, static_cast<int>(k), wt, b, bnw, bnb, mean, var, eps, act, out, z);
  });
}

bool dw_block_v2_train_covers(const at::Tensor& x, int64_t k) { return dw_block_v2_eval_covers(x, k); }

void dw_block_v2_train_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                               const at::Tensor& bnw, const at::Tensor& bnb, double eps, int act,
                               const at::Tensor& out, const at::Tensor& z, const at::Tensor& mean,
                               const at::Tensor& var) {
  TORCH_CHECK(dw_block_v2_train_covers(x, k) && wt.size(1) == k * k, "dw_block v2: call not covered");
  TORCH_CHECK(out.is_contiguous() && z.is_contiguous(), "dw_block v2: out and z must be NCHW");
  CONVMIXER_DW_V2_DISPATCH(x.scalar_type(), "dw_block_v2_train_forward", [&] {
    run_train<scalar_t>(x, static_cast<int>(k), wt, b, bnw, bnb, eps, act, out, z, mean, var);
  });
}

// The gate's two hooks for Python: the build's source hash and the validated default.
TORCH_LIBRARY_FRAGMENT(convmixer_kernels, m) {
  m.def("_cuda_dw_v2_source_hash() -> str", &source_hash);
  m.def("_cuda_dw_v2_set_validated(bool validated) -> bool", &set_validated);
}

}  // namespace cuda
}  // namespace convmixer_kernels
