// Depthwise block v2 backward: host launch of the register-blocked kernels
// (dw_block_v2_backward.cuh, design there; interface in dw_block_v2_backward.h). dw_block.cu's
// backward calls it for the calls it covers and runs the first kernels for everything else.
//
// Passes over the N*C*H*W data (the partial sums are (N * tiles_h, C, k*k + 3) floats, about
// k*k / (H*W) of an activation, plus the reads of the per-channel terms):
//   eval (running statistics):     1  bwd_kernel: read x, dy, z; write dx
//   training (batch statistics):   2  stats_kernel: read dy, z; then bwd_kernel
// (+ 1 before them when the forward did not save z: dw_block.cu recomputes it.)
//
// Instantiations: float32 / bfloat16 / float16 x k in {3, 5, 7, 9} x {32x32 tile, 16x16 tile
// with two planes per warp}. -DCONVMIXER_DW_V2_ONLY_K9_BF16 (compile checks only) keeps the
// headline ones (bfloat16, k = 9, both tiles).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <cstdint>
#include <limits>
#include <type_traits>

#include "dw_block_v2_backward.cuh"
#include "dw_block_v2_backward.h"

namespace convmixer_kernels {
namespace cuda {
namespace {

int64_t cdiv_b(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Rows of a row tile: 32 (32x32 tiles) for W in 17..32, 16 (16x16 tiles) for W <= 16.
int64_t tile_rows(int64_t W) { return W <= 16 ? 16 : 32; }

int64_t blocks_of(int64_t warps) {
  const int64_t blocks = cdiv_b(warps, v2b::WARPS);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dw_block v2 backward (cuda): the problem needs ",
              blocks, " thread blocks, at most 2^31 - 1 are supported");
  return blocks;
}

template <typename T, int K, int QC, int R>
void launch_bwd(v2b::BwdArgs<T> a) {
  using S = v2b::Tile<K, QC, R>;
  TORCH_CHECK(a.tiles_h == cdiv_b(a.H, S::TR), "dw_block v2 backward: tile rows mismatch");
  a.warps = cdiv_b(a.planes, S::PPW) * a.tiles_h;
  const int64_t blocks = blocks_of(a.warps);
  if (blocks == 0) return;
  v2b::bwd_kernel<T, K, QC, R>
      <<<static_cast<unsigned>(blocks), v2b::THREADS_B, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int K>
void launch_bwd_k(const v2b::BwdArgs<T>& a) {
  if (a.W <= 16)
    launch_bwd<T, K, 2, 2>(a);  // 16x16 tiles, two planes per warp
  else
    launch_bwd<T, K, 4, 4>(a);  // 32x32 tiles
}

template <typename T>
void launch_bwd_dispatch_k(int k, const v2b::BwdArgs<T>& a) {
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if constexpr (std::is_same<T, c10::BFloat16>::value) {
    if (k == 9) return launch_bwd_k<T, 9>(a);
  }
  TORCH_CHECK(false, "dw_block v2 backward: built with CONVMIXER_DW_V2_ONLY_K9_BF16");
#else
  switch (k) {
    case 3: return launch_bwd_k<T, 3>(a);
    case 5: return launch_bwd_k<T, 5>(a);
    case 7: return launch_bwd_k<T, 7>(a);
    case 9: return launch_bwd_k<T, 9>(a);
    default: TORCH_CHECK(false, "dw_block v2 backward: k = ", k, " is not covered (3, 5, 7, 9)");
  }
#endif
}

template <typename T>
void launch_stats(v2b::StatsArgs<T> a) {
  const bool small = a.W <= 16;
  TORCH_CHECK(a.tiles_h == cdiv_b(a.H, small ? 16 : 32), "dw_block v2 backward: tile rows mismatch");
  a.warps = cdiv_b(a.planes, small ? 2 : 1) * a.tiles_h;
  const int64_t blocks = blocks_of(a.warps);
  if (blocks == 0) return;
  const auto stream = at::cuda::getCurrentCUDAStream();
  if (small)
    v2b::stats_kernel<T, 2, 2><<<static_cast<unsigned>(blocks), v2b::THREADS_B, 0, stream>>>(a);
  else
    v2b::stats_kernel<T, 4, 4><<<static_cast<unsigned>(blocks), v2b::THREADS_B, 0, stream>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Column sums of a (rows, ...) float32 tensor: (cols,) float64, rows added in order.
at::Tensor colsum(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = rows > 0 ? m.numel() / rows : 0;
  at::Tensor out = at::zeros({cols}, m.options().dtype(at::kDouble));
  if (cols == 0 || rows == 0) return out;
  v2b::colsum_kernel<<<static_cast<unsigned>(cdiv_b(cols, 256)), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      v2b::ColSumArgs{m.data_ptr<float>(), rows, cols, out.data_ptr<double>()});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void launch_chan(const v2b::ChanArgs& a) {
  v2b::chan_kernel<<<static_cast<unsigned>(cdiv_b(a.C, 256)), 256, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

#define CONVMIXER_DW_V2B_DISPATCH(st, name, ...)               \
  AT_DISPATCH_SWITCH(st, name,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

}  // namespace

bool dw_block_v2_backward_covers(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact,
                                 int64_t k) {
  if (x.dim() != 4 || x.numel() == 0 || !x.is_contiguous() || !grad_out.is_contiguous()) return false;
  if (preact.numel() != 0 && !preact.is_contiguous()) return false;
  const auto st = x.scalar_type();
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) return false;
  if (k != 3 && k != 5 && k != 7 && k != 9) return false;
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if (k != 9 || st != at::kBFloat16) return false;
#endif
  return x.size(3) <= 32 && x.size(2) * x.size(3) < std::numeric_limits<int32_t>::max() &&
         x.size(1) < std::numeric_limits<int32_t>::max();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_v2_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& bnw, const at::Tensor& mean, const at::Tensor& var, bool use_batch_stats, double eps,
    int act, bool need_dx, bool need_dw, bool need_db, bool need_dbnw, bool need_dbnb) {
  const int64_t k = weight.size(2);
  TORCH_CHECK(dw_block_v2_backward_covers(grad_out, x, z, k) && z.numel() == x.numel(),
              "dw_block v2 backward: call not covered");
  TORCH_CHECK(need_dx || need_dw || need_db, "dw_block v2 backward: no convolution gradient asked for");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t tiles_h = cdiv_b(H, tile_rows(W)), rows = N * tiles_h;
  const int64_t kk = k * k, S = kk + 3;
  const double count = static_cast<double>(N * H * W);
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({0}, x.options()), dweight = at::empty({0}, x.options()),
             dbias = at::empty({0}, x.options()), dbnw = at::empty({0}, fopt), dbnb = at::empty({0}, fopt);
  if (need_dx) dx = at::empty(x.sizes(), x.options());  // NCHW-contiguous, as x
  const at::Tensor wt = weight.reshape({C, kk}).to(at::kFloat).contiguous();
  at::Tensor inv = at::empty({C}, fopt), mg, mgx;
  v2b::ChanArgs ca{};
  ca.C = C;
  ca.var = var.data_ptr<float>();
  ca.eps = static_cast<float>(eps);
  ca.inv = inv.data_ptr<float>();
  launch_chan(ca);

  CONVMIXER_DW_V2B_DISPATCH(x.scalar_type(), "dw_block_v2_backward", [&] {
    using T = scalar_t;
    const bool vec = W % 8 == 0 && aligned16(x.data_ptr()) && aligned16(grad_out.data_ptr()) &&
                     aligned16(z.data_ptr()) && (!need_dx || aligned16(dx.data_ptr()));
    if (use_batch_stats) {
      // Pass 1: the batch sums of dy and dy * xhat, which every dz needs.
      at::Tensor ps = at::empty({rows, C, 2}, fopt);
      v2b::StatsArgs<T> sa{};
      sa.dy = grad_out.data_ptr<T>();
      sa.z = z.data_ptr<T>();
      sa.mean = mean.data_ptr<float>();
      sa.inv = inv.data_ptr<float>();
      sa.part = ps.data_ptr<float>();
      sa.act = act;
      sa.C = static_cast<int>(C);
      sa.H = static_cast<int>(H);
      sa.W = static_cast<int>(W);
      sa.planes = N * C;
      sa.tiles_h = tiles_h;
      sa.vec = vec;
      launch_stats<T>(sa);
      const at::Tensor sums = colsum(ps);  // (C, 2) float64
      mg = at::empty({C}, fopt);
      mgx = at::empty({C}, fopt);
      if (need_dbnw) dbnw = at::empty({C}, fopt);
      if (need_dbnb) dbnb = at::empty({C}, fopt);
      v2b::ChanArgs fa = ca;
      fa.sums = sums.data_ptr<double>();
      fa.bnw = ptr_or_null(bnw);
      fa.count = count;
      fa.mg = mg.data_ptr<float>();
      fa.mgx = mgx.data_ptr<float>();
      fa.dbnb = need_dbnb ? dbnb.data_ptr<float>() : nullptr;
      fa.dbnw = need_dbnw ? dbnw.data_ptr<float>() : nullptr;
      launch_chan(fa);
    }

    // Pass 2 (eval: the only one): dz, dx, and the per-tile partial sums.
    at::Tensor part = at::empty({rows, C, S}, fopt);
    v2b::BwdArgs<T> a{};
    a.x = x.data_ptr<T>();
    a.dy = grad_out.data_ptr<T>();
    a.z = z.data_ptr<T>();
    a.dx = need_dx ? dx.data_ptr<T>() : nullptr;
    a.wt = wt.data_ptr<float>();
    a.mean = mean.data_ptr<float>();
    a.inv = inv.data_ptr<float>();
    a.bnw = ptr_or_null(bnw);
    a.mg = use_batch_stats ? mg.data_ptr<float>() : nullptr;
    a.mgx = use_batch_stats ? mgx.data_ptr<float>() : nullptr;
    a.part = part.data_ptr<float>();
    a.act = act;
    a.C = static_cast<int>(C);
    a.H = static_cast<int>(H);
    a.W = static_cast<int>(W);
    a.planes = N * C;
    a.tiles_h = tiles_h;
    a.vec = vec;
    a.train = use_batch_stats;
    a.need_dx = need_dx;
    a.need_dw = need_dw;
    a.need_stats = !use_batch_stats && (need_dbnw || need_dbnb);
    launch_bwd_dispatch_k<T>(static_cast<int>(k), a);

    const at::Tensor sums = colsum(part).view({C, S});
    if (need_dw) dweight = sums.narrow(1, 0, kk).to(weight.scalar_type()).reshape(weight.sizes()).contiguous();
    if (need_db) dbias = sums.select(1, kk).to(weight.scalar_type()).contiguous();
    if (!use_batch_stats) {
      if (need_dbnb) dbnb = sums.select(1, kk + 1).to(at::kFloat).contiguous();
      if (need_dbnw) dbnw = sums.select(1, kk + 2).to(at::kFloat).contiguous();
    }
  });
  return {dx, dweight, dbias, dbnw, dbnb};
}

}  // namespace cuda
}  // namespace convmixer_kernels
