// CUDA implementation of convmixer_kernels::_axpb (see csrc/testing/module.cpp): the build,
// registration and launch pattern every CUDA kernel of the package follows
// (device guard, current stream, launch check, int64 indexing).
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "axpb.h"

namespace convmixer_kernels {
namespace {

__global__ void axpb_kernel(const float* __restrict__ x, float* __restrict__ out, float a,
                            float b, int64_t n) {
  const int64_t stride = static_cast<int64_t>(blockDim.x) * gridDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    out[i] = a * x[i] + b;
  }
}

at::Tensor axpb_cuda(const at::Tensor& x, double a, double b) {
  check_axpb_input(x, at::kCUDA);
  const c10::cuda::CUDAGuard guard(x.device());
  auto xc = x.contiguous();
  auto out = at::empty_like(xc);
  const int64_t n = xc.numel();
  if (n == 0) return out;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65535);
  axpb_kernel<<<blocks, threads, 0, at::cuda::getCurrentCUDAStream()>>>(
      xc.data_ptr<float>(), out.data_ptr<float>(), static_cast<float>(a), static_cast<float>(b), n);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) { m.impl("_axpb", &axpb_cuda); }

}  // namespace convmixer_kernels
