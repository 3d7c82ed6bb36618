// Depthwise block v2: host launch of the register-blocked eval forward (dw_block_v2.cuh,
// design there; interface in dw_block_v2.h). dw_block.cu's forward calls it for the calls it
// covers and runs the first kernels (conv_kernel) for everything else.
//
// Instantiations: float32 / bfloat16 / float16 x k in {3, 5, 7, 9} x {32x32 tile, 16x16 tile
// with two planes per warp}. -DCONVMIXER_DW_V2_ONLY_K9_BF16 (compile checks only) keeps the
// headline one (bfloat16, k = 9, both tiles).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>
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

#define CONVMIXER_DW_V2_DISPATCH(st, name, ...)                \
  AT_DISPATCH_SWITCH(st, name,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

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

}  // namespace cuda
}  // namespace convmixer_kernels
