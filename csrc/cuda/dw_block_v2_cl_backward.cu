// Depthwise block v2, channels_last backward: host launch (kernels in dw_block_v2_cl_backward.cuh
// and, for the dgrad, dw_block_v2_cl.cuh; interface in dw_block_v2_cl_backward.h).
// dw_block.cu's backward calls it for the calls it covers when v2 is enabled and runs v1's
// backward for everything else.
//
// Instantiations: cl_dgrad_kernel and cl_wgrad_kernel for float32 / bfloat16 / float16 x k in
// {3, 5, 7, 9}; cl_elem_kernel per dtype x {stats, dz, stats + dz} x {train, eval}.
// -DCONVMIXER_DW_V2_ONLY_K9_BF16 (compile checks only) keeps the headline ones (bfloat16, k = 9).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "dw_block_v2_cl.cuh"
#include "dw_block_v2_cl_backward.cuh"
#include "dw_block_v2_cl_backward.h"

namespace convmixer_kernels {
namespace cuda {
namespace {

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

bool cl_only(const at::Tensor& t) {
  return t.dim() == 4 && t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous() &&
         aligned16(t.data_ptr());
}

// Column sums (double, row order) of a (rows, cols) float32 matrix.
at::Tensor colsum(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = m.numel() / std::max<int64_t>(rows, 1);
  at::Tensor out = at::empty({cols}, m.options().dtype(at::kDouble));
  if (cols == 0) return out;
  v2cl::cl_colsum_kernel<<<static_cast<unsigned>((cols + 255) / 256), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      m.data_ptr<float>(), rows, cols, out.data_ptr<double>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

template <typename T, bool STATS, bool DZ, bool TRAIN>
void launch_elem(const v2cl::ClElemArgs<T>& e) {
  const int64_t blocks = (e.items + v2cl::WARPS - 1) / v2cl::WARPS;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dw_block v2 channels_last backward (cuda): the problem ",
              "needs ", blocks, " thread blocks, at most 2^31 - 1 are supported");
  v2cl::cl_elem_kernel<T, STATS, DZ, TRAIN>
      <<<static_cast<unsigned>(blocks), v2cl::THREADS_CL, 0, at::cuda::getCurrentCUDAStream()>>>(e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int K>
void launch_dgrad_wgrad(const v2cl::ClArgs<T>& a, int64_t blocks, bool need_dx, float* pw) {
  auto stream = at::cuda::getCurrentCUDAStream();
  if (need_dx) {
    v2cl::cl_dgrad_kernel<T, K><<<static_cast<unsigned>(blocks), v2cl::THREADS_CL, 0, stream>>>(a);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  if (pw != nullptr) {
    v2cl::cl_wgrad_kernel<T, K><<<static_cast<unsigned>(blocks), v2cl::THREADS_CL, 0, stream>>>(a, pw);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T>
void dispatch_k(int k, const v2cl::ClArgs<T>& a, int64_t blocks, bool need_dx, float* pw) {
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (k == 9) return launch_dgrad_wgrad<T, 9>(a, blocks, need_dx, pw);
  }
  TORCH_CHECK(false, "dw_block v2 channels_last backward: built with CONVMIXER_DW_V2_ONLY_K9_BF16");
#else
  switch (k) {
    case 3: return launch_dgrad_wgrad<T, 3>(a, blocks, need_dx, pw);
    case 5: return launch_dgrad_wgrad<T, 5>(a, blocks, need_dx, pw);
    case 7: return launch_dgrad_wgrad<T, 7>(a, blocks, need_dx, pw);
    case 9: return launch_dgrad_wgrad<T, 9>(a, blocks, need_dx, pw);
    default: TORCH_CHECK(false, "dw_block v2 channels_last backward: k = ", k, " is not covered (3, 5, 7, 9)");
  }
#endif
}

#define CONVMIXER_DW_V2_CLB_DISPATCH(st, name, ...)            \
  AT_DISPATCH_SWITCH(st, name,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

bool dw_block_v2_cl_backward_covers(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact,
                                    int64_t k) {
  if (x.dim() != 4 || x.numel() == 0 || !cl_only(x) || !cl_only(grad_out)) return false;
  if (preact.numel() != 0 && !cl_only(preact)) return false;
  if (grad_out.scalar_type() != x.scalar_type()) return false;
  const auto st = x.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) return false;
  if (k != 3 && k != 5 && k != 7 && k != 9) return false;
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if (k != 9 || st != at::kBFloat16) return false;
#endif
  const int64_t C = x.size(1), H = x.size(2), W = x.size(3);
  if (C % v2cl::VC != 0) return false;
  constexpr int64_t kMax = std::numeric_limits<int32_t>::max();
  const int64_t strips = (W + v2cl::TW - 1) / v2cl::TW;
  return H * W * C < kMax && x.size(0) * H * strips < kMax - 1024;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_v2_cl_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& bnw, const at::Tensor& mean, const at::Tensor& var, bool use_batch_stats, double eps,
    int act, bool need_dx, bool need_dw, bool need_db, bool need_dbnw, bool need_dbnb) {
  const int64_t k = weight.size(2);
  TORCH_CHECK(dw_block_v2_cl_backward_covers(grad_out, x, z, k) && z.numel() == x.numel(),
              "dw_block v2 channels_last backward: call not covered");
  TORCH_CHECK(need_dx || need_dw || need_db, "dw_block v2 channels_last backward: no convolution gradient asked for");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), kk = k * k;
  const double count = static_cast<double>(N * H * W);
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({0}, x.options()), dweight = at::empty({0}, x.options()),
             dbias = at::empty({0}, x.options()), dbnw = at::empty({0}, fopt), dbnb = at::empty({0}, fopt);
  const int64_t groups = (C + v2cl::GC - 1) / v2cl::GC;
  // dz, float32, blocked by channel group: (N * H, groups, W, GC) (cl_elem_kernel writes it)
  const at::Tensor dz = at::empty({N * H * groups * W * v2cl::GC}, fopt);
  const int64_t npix = N * H * W, runs = (npix + v2cl::NPB - 1) / v2cl::NPB;
  const bool need_bn = need_dbnw || need_dbnb;

  CONVMIXER_DW_V2_CLB_DISPATCH(x.scalar_type(), "dw_block_v2_cl_backward", [&] {
    using T = scalar_t;
    v2cl::ClElemArgs<T> e{};
    e.dy = grad_out.data_ptr<T>();
    e.z = z.data_ptr<T>();
    e.mean = mean.data_ptr<float>();
    e.var = var.data_ptr<float>();
    e.bnw = ptr_or_null(bnw);
    e.dz = dz.data_ptr<float>();
    e.eps = static_cast<float>(eps);
    e.act = act;
    e.C = static_cast<int>(C);
    e.W = static_cast<int>(W);
    e.groups = static_cast<int>(groups);
    e.npix = npix;
    e.items = runs * groups;
    at::Tensor psum, pdot, pdb, mg, mgx;
    if (use_batch_stats || need_bn) {
      psum = at::empty({runs, C}, fopt);
      pdot = at::empty({runs, C}, fopt);
      e.psum = psum.data_ptr<float>();
      e.pdot = pdot.data_ptr<float>();
    }
    if (need_db) {
      pdb = at::empty({runs, C}, fopt);
      e.pdb = pdb.data_ptr<float>();
    }
    if (use_batch_stats) {
      // Pass 1: the batch sums of dy and dy * xhat, which every dz needs.
      launch_elem<T, true, false, true>(e);
      const at::Tensor sdy = colsum(psum), sdyx = colsum(pdot);
      const at::Tensor gw = bnw.defined() ? bnw.to(at::kDouble) : at::ones({C}, sdy.options());
      mg = (gw * sdy / count).to(at::kFloat);
      mgx = (gw * sdyx / count).to(at::kFloat);
      e.mg = mg.data_ptr<float>();
      e.mgx = mgx.data_ptr<float>();
      if (need_dbnw) dbnw = sdyx.to(at::kFloat);
      if (need_dbnb) dbnb = sdy.to(at::kFloat);
      // Pass 2: dz and its sums.
      launch_elem<T, false, true, true>(e);
    } else if (need_bn) {
      launch_elem<T, true, true, false>(e);
      const at::Tensor sdy = colsum(psum), sdyx = colsum(pdot);
      if (need_dbnw) dbnw = sdyx.to(at::kFloat);
      if (need_dbnb) dbnb = sdy.to(at::kFloat);
    } else {
      launch_elem<T, false, true, false>(e);
    }
    if (need_db) dbias = colsum(pdb).to(weight.scalar_type());
    if (!need_dx && !need_dw) return;

    // The conv passes on dz: the forward's strips.
    v2cl::ClArgs<T> a{};
    a.x = x.data_ptr<T>();
    a.dz = dz.data_ptr<float>();
    a.dy = grad_out.data_ptr<T>();
    a.C = static_cast<int>(C);
    a.H = static_cast<int>(H);
    a.W = static_cast<int>(W);
    a.strips = (a.W + v2cl::TW - 1) / v2cl::TW;
    a.groups = static_cast<int>(groups);
    a.items = static_cast<int>(N * H * a.strips);  // covers() bounds it
    const int64_t blocks = v2cl::plan_strips(a, groups, at::cuda::getCurrentDeviceProperties()->multiProcessorCount);
    const at::Tensor wflip = weight.flip({2, 3}).reshape({C, kk}).to(at::kFloat).contiguous();
    a.wt = wflip.data_ptr<float>();
    if (need_dx) {
      dx = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::ChannelsLast));
      a.out = dx.data_ptr<T>();
    }
    at::Tensor pw;
    if (need_dw) pw = at::empty({blocks / groups, kk, C}, fopt);
    dispatch_k<T>(static_cast<int>(k), a, blocks, need_dx, need_dw ? pw.data_ptr<float>() : nullptr);
    if (need_dw) dweight = colsum(pw).view({kk, C}).t().reshape(weight.sizes()).to(weight.scalar_type()).contiguous();
  });
  return {dx, dweight, dbias, dbnw, dbnb};
}

}  // namespace cuda
}  // namespace convmixer_kernels
