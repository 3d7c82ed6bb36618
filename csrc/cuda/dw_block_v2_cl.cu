// Depthwise block v2, channels_last eval forward: host launch of cl_eval_kernel
// (dw_block_v2_cl.cuh, design there; interface in dw_block_v2_cl.h). dw_block.cu's forward
// calls it for the eval calls it covers when v2 is enabled (dw_block_v2_enabled) and runs the
// first kernels (conv_kernel) for everything else.
//
// Instantiations: float32 / bfloat16 / float16 x k in {3, 5, 7, 9}.
// -DCONVMIXER_DW_V2_ONLY_K9_BF16 (compile checks only) keeps the headline one (bfloat16, k = 9).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "dw_block_v2_cl.cuh"
#include "dw_block_v2_cl.h"
#include "dw_block_v2_cl_train.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

template <typename T>
int64_t plan_cl(v2cl::ClArgs<T>& a, int64_t groups) {
  return v2cl::plan_strips(a, groups, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
}

template <typename T, int K>
void launch_cl_eval(v2cl::ClArgs<T> a, int64_t groups) {
  const int64_t blocks = plan_cl(a, groups);
  if (blocks == 0) return;
  v2cl::cl_eval_kernel<T, K>
      <<<static_cast<unsigned>(blocks), v2cl::THREADS_CL, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int K>
void launch_cl_train(const v2cl::ClArgs<T>& a, int64_t blocks) {
  // blocks: plan_cl's count (rows * groups), the partial rows run_cl_train allocated
  v2cl::cl_train_kernel<T, K>
      <<<static_cast<unsigned>(blocks), v2cl::THREADS_CL, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T>
void launch_cl_train_dispatch_k(int k, const v2cl::ClArgs<T>& a, int64_t blocks) {
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (k == 9) return launch_cl_train<T, 9>(a, blocks);
  }
  TORCH_CHECK(false, "dw_block v2 channels_last: built with CONVMIXER_DW_V2_ONLY_K9_BF16");
#else
  switch (k) {
    case 3: return launch_cl_train<T, 3>(a, blocks);
    case 5: return launch_cl_train<T, 5>(a, blocks);
    case 7: return launch_cl_train<T, 7>(a, blocks);
    case 9: return launch_cl_train<T, 9>(a, blocks);
    default: TORCH_CHECK(false, "dw_block v2 channels_last: k = ", k, " is not covered (3, 5, 7, 9)");
  }
#endif
}

template <typename T>
void launch_cl_eval_dispatch_k(int k, const v2cl::ClArgs<T>& a, int64_t groups) {
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (k == 9) return launch_cl_eval<T, 9>(a, groups);
  }
  TORCH_CHECK(false, "dw_block v2 channels_last: built with CONVMIXER_DW_V2_ONLY_K9_BF16");
#else
  switch (k) {
    case 3: return launch_cl_eval<T, 3>(a, groups);
    case 5: return launch_cl_eval<T, 5>(a, groups);
    case 7: return launch_cl_eval<T, 7>(a, groups);
    case 9: return launch_cl_eval<T, 9>(a, groups);
    default: TORCH_CHECK(false, "dw_block v2 channels_last: k = ", k, " is not covered (3, 5, 7, 9)");
  }
#endif
}

template <typename T>
void run_cl_eval(const at::Tensor& x, int k, const at::Tensor& wt, const at::Tensor& b, const at::Tensor& bnw,
                 const at::Tensor& bnb, const at::Tensor& mean, const at::Tensor& var, double eps, int act,
                 const at::Tensor& out, const at::Tensor& z) {
  v2cl::ClArgs<T> a{};
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
  a.strips = (a.W + v2cl::TW - 1) / v2cl::TW;
  const int64_t groups = (x.size(1) + v2cl::GC - 1) / v2cl::GC;
  a.groups = static_cast<int>(groups);
  a.items = static_cast<int>(x.size(0) * x.size(2) * a.strips);  // covers() bounds it
  launch_cl_eval_dispatch_k<T>(k, a, groups);
}

template <typename T>
void run_cl_train(const at::Tensor& x, int k, const at::Tensor& wt, const at::Tensor& b, const at::Tensor& bnw,
                  const at::Tensor& bnb, double eps, int act, const at::Tensor& out, const at::Tensor& z,
                  const at::Tensor& mean, const at::Tensor& var) {
  v2cl::ClArgs<T> a{};
  a.x = x.data_ptr<T>();
  a.z = z.data_ptr<T>();
  a.wt = wt.data_ptr<float>();
  a.bias = ptr_or_null(b);
  a.act = act;
  a.C = static_cast<int>(x.size(1));
  a.H = static_cast<int>(x.size(2));
  a.W = static_cast<int>(x.size(3));
  a.strips = (a.W + v2cl::TW - 1) / v2cl::TW;
  const int64_t groups = (x.size(1) + v2cl::GC - 1) / v2cl::GC;
  a.groups = static_cast<int>(groups);
  a.items = static_cast<int>(x.size(0) * x.size(2) * a.strips);  // covers() bounds it
  const int64_t blocks = plan_cl(a, groups);
  const int64_t rows = blocks / groups, C = x.size(1);
  const auto fopt = x.options().dtype(at::kFloat);
  const at::Tensor pmean = at::empty({rows, C}, fopt), pm2 = at::empty({rows, C}, fopt), pcnt = at::empty({rows}, fopt);
  a.pmean = pmean.data_ptr<float>();
  a.pm2 = pm2.data_ptr<float>();
  a.pcnt = pcnt.data_ptr<float>();
  launch_cl_train_dispatch_k<T>(k, a, blocks);

  auto stream = at::cuda::getCurrentCUDAStream();
  const at::Tensor terms = at::empty({2, C}, fopt);  // scale, shift
  v2cl::ClFinalizeArgs f{pmean.data_ptr<float>(), pm2.data_ptr<float>(), pcnt.data_ptr<float>(),
                         mean.data_ptr<float>(),  var.data_ptr<float>(), ptr_or_null(bnw),
                         ptr_or_null(bnb),        terms.data_ptr<float>(), terms.data_ptr<float>() + C,
                         static_cast<float>(eps), rows, C};
  v2cl::cl_finalize_kernel<<<static_cast<unsigned>((C + 255) / 256), 256, 0, stream>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  v2cl::ClNormArgs<T> na{};
  na.x = a.x;
  na.z = a.z;
  na.out = out.data_ptr<T>();
  na.scale = f.scale;
  na.shift = f.shift;
  na.act = act;
  na.C = a.C;
  na.groups = a.groups;
  na.npix = x.size(0) * x.size(2) * x.size(3);
  na.items = (na.npix + v2cl::NP - 1) / v2cl::NP * groups;
  const int64_t nblocks = (na.items + v2cl::WARPS - 1) / v2cl::WARPS;
  TORCH_CHECK(nblocks <= std::numeric_limits<int32_t>::max(), "dw_block v2 channels_last (cuda): the problem needs ",
              nblocks, " thread blocks, at most 2^31 - 1 are supported");
  v2cl::cl_norm_kernel<T><<<static_cast<unsigned>(nblocks), v2cl::THREADS_CL, 0, stream>>>(na);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#define CONVMIXER_DW_V2_CL_DISPATCH(st, name, ...)             \
  AT_DISPATCH_SWITCH(st, name,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

bool dw_block_v2_cl_eval_covers(const at::Tensor& x, int64_t k) {
  if (x.dim() != 4 || x.numel() == 0) return false;
  if (!x.is_contiguous(at::MemoryFormat::ChannelsLast) || x.is_contiguous()) return false;
  const auto st = x.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) return false;
  if (k != 3 && k != 5 && k != 7 && k != 9) return false;
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if (k != 9 || st != at::kBFloat16) return false;
#endif
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  if (C % v2cl::VC != 0 || !aligned16(x.data_ptr())) return false;
  // int32 inside an image (H * W * C) and for the strip index (N * H * strips, with room for
  // the last block's unused items)
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  const int64_t strips = (W + v2cl::TW - 1) / v2cl::TW;
  return H * W * C < kMax && x.size(0) * H * strips < kMax - 1024;
}

void dw_block_v2_cl_eval_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                                 const at::Tensor& bnw, const at::Tensor& bnb, const at::Tensor& mean,
                                 const at::Tensor& var, double eps, int act, const at::Tensor& out,
                                 const at::Tensor& z) {
  TORCH_CHECK(dw_block_v2_cl_eval_covers(x, k) && wt.size(1) == k * k && wt.is_contiguous(),
              "dw_block v2 channels_last: call not covered");
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(out.data_ptr()) &&
                  (!z.defined() || (z.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(z.data_ptr()))),
              "dw_block v2 channels_last: out and z must be channels_last and 16-byte aligned");
  CONVMIXER_DW_V2_CL_DISPATCH(x.scalar_type(), "dw_block_v2_cl_eval_forward", [&] {
    run_cl_eval<scalar_t>(x, static_cast<int>(k), wt, b, bnw, bnb, mean, var, eps, act, out, z);
  });
}

}  // namespace cuda
}  // namespace convmixer_kernels

namespace convmixer_kernels {
namespace cuda {

bool dw_block_v2_cl_train_covers(const at::Tensor& x, int64_t k) { return dw_block_v2_cl_eval_covers(x, k); }

void dw_block_v2_cl_train_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                                  const at::Tensor& bnw, const at::Tensor& bnb, double eps, int act,
                                  const at::Tensor& out, const at::Tensor& z, const at::Tensor& mean,
                                  const at::Tensor& var) {
  TORCH_CHECK(dw_block_v2_cl_train_covers(x, k) && wt.size(1) == k * k && wt.is_contiguous(),
              "dw_block v2 channels_last: call not covered");
  TORCH_CHECK(out.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(out.data_ptr()) &&
                  z.is_contiguous(at::MemoryFormat::ChannelsLast) && aligned16(z.data_ptr()),
              "dw_block v2 channels_last: out and z must be channels_last and 16-byte aligned");
  CONVMIXER_DW_V2_CL_DISPATCH(x.scalar_type(), "dw_block_v2_cl_train_forward", [&] {
    run_cl_train<scalar_t>(x, static_cast<int>(k), wt, b, bnw, bnb, eps, act, out, z, mean, var);
  });
}

}  // namespace cuda
}  // namespace convmixer_kernels
