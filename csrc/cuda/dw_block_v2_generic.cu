// Depthwise block v2, generic path (NCHW and channels_last outputs): host launch of the kernels of dw_block_v2_generic.cuh
// and dw_block_v2_generic_backward.cuh (design there; interface in dw_block_v2_generic.h).
// dw_block.cu calls it, behind the v2 switch, for the calls the templated v2 kernels do not
// cover (k > 9, W > 32, strided views; channels_last x with C % 4 != 0, a misaligned pointer or
// k > 9); docs/cuda-depthwise.md "v2 generic NCHW path".
//
// Instantiations, per dtype (float32, bfloat16, float16): gen_eval_kernel, gen_train_kernel and
// gen_bwd_kernel with a run-time k (KC = 0), gen_norm_kernel, and per activation gen_stats_kernel
// and gen_dz_kernel; gen_finalize_kernel once. -DCONVMIXER_DW_V2_ONLY_K9_BF16 (compile checks
// only) keeps the bfloat16 ones.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>
#include <type_traits>

#include "../common/checks.h"
#include "dw_block_v2_generic_backward.cuh"  // includes dw_block_v2_generic.cuh
#include "dw_block_v2_generic.h"

namespace convmixer_kernels {
namespace cuda {
namespace {

int64_t cdiv_g(int64_t a, int64_t b) { return (a + b - 1) / b; }

bool aligned16_g(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

const float* ptr_or_null_g(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

// The view of a 4-D tensor (strides of size-1 dimensions do not matter for the 16-byte path).
v2g::View view_of(const at::Tensor& t) {
  v2g::View v{t.stride(0), t.stride(1), t.stride(2), t.stride(3), false};
  auto mult8 = [&](int d) { return t.size(d) <= 1 || t.stride(d) % 8 == 0; };
  v.vec = (t.size(3) <= 1 || t.stride(3) == 1) && mult8(0) && mult8(1) && mult8(2) && aligned16_g(t.data_ptr());
  if (t.size(3) == 1) v.sw = 1;  // any stride of a size-1 dimension: element 0 only
  return v;
}

int64_t blocks_g(int64_t warps) {
  const int64_t blocks = cdiv_g(warps, v2g::WARPS);
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "dw_block v2 generic (cuda): the problem needs ",
              blocks, " thread blocks, at most 2^31 - 1 are supported");
  return blocks;
}

// Dynamic shared memory beyond the default 48 KB needs the opt-in attribute (k >= 19 with 4 warps).
template <typename A>
void launch_g(void (*kernel)(const A), int64_t warps, size_t smem, const A& a) {
  const int64_t blocks = blocks_g(warps);
  if (blocks == 0) return;
  if (smem > 48 * 1024) {
    const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem <= static_cast<size_t>(optin), "dw_block v2 generic (cuda): k needs ", smem,
                " bytes of shared memory per block, the device allows ", optin);
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), v2g::THREADS_G, smem, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

size_t fwd_smem(int k) { return sizeof(float) * v2g::WARPS * v2g::Geo::of(k).wfloats; }

size_t bwd_smem(int k) {
  const v2g::Geo g = v2g::Geo::of(k);
  return sizeof(float) * v2g::WARPS * (g.wfloats + g.k * g.kp + 32 * v2g::XS + 128);
}

template <typename T>
void fill_fwd(v2g::GenFwdArgs<T>& a, const at::Tensor& x, int k, const at::Tensor& wt, const at::Tensor& b, int act) {
  a.x = x.data_ptr<T>();
  a.vx = view_of(x);
  a.wt = wt.data_ptr<float>();
  a.bias = ptr_or_null_g(b);
  a.act = act;
  a.k = k;
  a.C = static_cast<int>(x.size(1));
  a.H = static_cast<int>(x.size(2));
  a.W = static_cast<int>(x.size(3));
  a.tiles_h = static_cast<int>(cdiv_g(a.H, v2g::TR));
  a.tiles_w = static_cast<int>(cdiv_g(a.W, v2g::TC));
  a.planes = x.size(0) * x.size(1);
  a.warps = a.planes * a.tiles_h * a.tiles_w;
}

template <typename T>
void run_gen_eval(const at::Tensor& x, int k, const at::Tensor& wt, const at::Tensor& b, const at::Tensor& bnw,
                  const at::Tensor& bnb, const at::Tensor& mean, const at::Tensor& var, double eps, int act,
                  const at::Tensor& out, const at::Tensor& z) {
  v2g::GenFwdArgs<T> a{};
  fill_fwd<T>(a, x, k, wt, b, act);
  a.out = out.data_ptr<T>();
  a.z = z.defined() ? z.data_ptr<T>() : nullptr;
  a.ocl = output_format(x) == at::MemoryFormat::ChannelsLast;
  a.ovec = !a.ocl && a.W % 8 == 0 && aligned16_g(a.out) && (a.z == nullptr || aligned16_g(a.z));
  a.mean = mean.data_ptr<float>();
  a.var = var.data_ptr<float>();
  a.bnw = ptr_or_null_g(bnw);
  a.bnb = ptr_or_null_g(bnb);
  a.eps = static_cast<float>(eps);
  launch_g(v2g::gen_eval_kernel<T, 0>, a.warps, fwd_smem(k), a);
}

template <typename T>
void run_gen_train(const at::Tensor& x, int k, const at::Tensor& wt, const at::Tensor& b, const at::Tensor& bnw,
                   const at::Tensor& bnb, double eps, int act, const at::Tensor& out, const at::Tensor& z,
                   const at::Tensor& mean, const at::Tensor& var) {
  v2g::GenFwdArgs<T> a{};
  fill_fwd<T>(a, x, k, wt, b, act);
  const int64_t N = x.size(0), C = x.size(1);
  const int64_t tiles = N * a.tiles_h * a.tiles_w;
  const auto fopt = x.options().dtype(at::kFloat);
  const at::Tensor pmean = at::empty({tiles, C}, fopt), pm2 = at::empty({tiles, C}, fopt);
  a.z = z.data_ptr<T>();
  a.ocl = output_format(x) == at::MemoryFormat::ChannelsLast;
  a.ovec = !a.ocl && a.W % 8 == 0 && aligned16_g(a.z);
  a.pmean = pmean.data_ptr<float>();
  a.pm2 = pm2.data_ptr<float>();
  launch_g(v2g::gen_train_kernel<T, 0>, a.warps, fwd_smem(k), a);

  const at::Tensor terms = at::empty({2, C}, fopt);  // scale, shift
  v2g::GenFinalizeArgs f{pmean.data_ptr<float>(), pm2.data_ptr<float>(), mean.data_ptr<float>(),
                         var.data_ptr<float>(), ptr_or_null_g(bnw), ptr_or_null_g(bnb), terms.data_ptr<float>(),
                         terms.data_ptr<float>() + C, static_cast<float>(eps), N, C, a.H, a.W, a.tiles_h,
                         a.tiles_w};
  v2g::gen_finalize_kernel<<<static_cast<unsigned>(cdiv_g(C, 256)), 256, 0, at::cuda::getCurrentCUDAStream()>>>(f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  v2g::GenNormArgs<T> na{};
  na.x = a.x;
  na.vx = a.vx;
  na.xplane = a.vx.vec && (a.W <= 1 || x.stride(3) == 1) && (a.H <= 1 || x.stride(2) == a.W);
  na.z = a.z;
  na.out = out.data_ptr<T>();
  na.scale = f.scale;
  na.shift = f.shift;
  na.act = act;
  na.C = a.C;
  na.W = a.W;
  na.HW = static_cast<int64_t>(a.H) * a.W;
  na.chunks = cdiv_g(na.HW, 256);
  na.items = a.planes * na.chunks;
  na.ocl = a.ocl;
  na.vec = !na.ocl && na.xplane && na.HW % 8 == 0 && aligned16_g(na.z) && aligned16_g(na.out);
  launch_g(v2g::gen_norm_kernel<T>, na.items, 0, na);
}

// Images per backward work item. A warp walks its group's images, so an item lasts about
// `group` images and the items run in waves of `res` resident warps (the kernel's occupancy at
// this shared memory): choose the group count G minimising waves x images per item,
// ceil(C * G / res) * ceil(N / G), the smaller G on ties (fewer partial rows).
template <typename A>
int64_t bwd_group(int64_t N, int64_t C, void (*kernel)(const A), size_t smem) {
  const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  if (smem > 48 * 1024)  // the occupancy query counts the opt-in only once it is set
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, v2g::THREADS_G, smem));
  const int64_t res = std::max<int64_t>(1, per_sm) * sms * v2g::WARPS;
  const int64_t gmax = std::min<int64_t>({N, cdiv_g(8 * res, C), 4096});  // past 8 waves: no gain
  int64_t best_per = N, best_t = std::numeric_limits<int64_t>::max();
  for (int64_t g = 1; g <= gmax; ++g) {
    const int64_t per = cdiv_g(N, g), groups = cdiv_g(N, per);
    const int64_t t = cdiv_g(C * groups, res) * per;
    if (t < best_t) {
      best_t = t;
      best_per = per;
    }
  }
  return best_per;
}

// Column sums of a (rows, ...) float32 tensor in double, rows in order (v2b::colsum_kernel).
at::Tensor colsum_g(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = rows > 0 ? m.numel() / rows : 0;
  at::Tensor out = at::zeros({cols}, m.options().dtype(at::kDouble));
  if (cols == 0 || rows == 0) return out;
  v2b::colsum_kernel<<<static_cast<unsigned>(cdiv_g(cols, 256)), 256, 0, at::cuda::getCurrentCUDAStream()>>>(
      v2b::ColSumArgs{m.data_ptr<float>(), rows, cols, out.data_ptr<double>()});
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

void launch_chan_g(const v2b::ChanArgs& a) {
  v2b::chan_kernel<<<static_cast<unsigned>(cdiv_g(a.C, 256)), 256, 0, at::cuda::getCurrentCUDAStream()>>>(a);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
#define CONVMIXER_DW_V2G_DISPATCH(st, name, ...) \
  AT_DISPATCH_SWITCH(st, name, AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
#else
#define CONVMIXER_DW_V2G_DISPATCH(st, name, ...)               \
  AT_DISPATCH_SWITCH(st, name,                                 \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
#endif

bool x_covered(const at::Tensor& x, int64_t k) {
  if (x.dim() != 4 || x.numel() == 0) return false;
  const auto st = x.scalar_type();
#ifdef CONVMIXER_DW_V2_ONLY_K9_BF16
  if (st != at::kBFloat16) return false;
#else
  if (st != at::kFloat && st != at::kBFloat16 && st != at::kHalf) return false;
#endif
  if (k < 3 || k > 31 || k % 2 == 0) return false;
  // Any output layout: NCHW-contiguous, or channels_last-contiguous where output_format(x) is
  // channels_last (x channels_last-contiguous; out, z and dx then channels_last, element stores).
  constexpr int64_t imax = std::numeric_limits<int32_t>::max();
  return x.size(1) < imax && x.size(2) < imax - 64 && x.size(3) < imax - 64;
}

// Whether the device gives a block `smem` bytes of shared memory (opt-in included): k = 31
// needs 95 KB (forward) and 132 KB (backward) per block, more than some GPUs have; v1 runs there.
bool smem_fits(size_t smem) {
  return smem <= static_cast<size_t>(at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

}  // namespace

bool dw_block_v2_generic_covers(const at::Tensor& x, int64_t k) {
  return x_covered(x, k) && smem_fits(fwd_smem(static_cast<int>(k)));
}

void dw_block_v2_generic_eval_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                                      const at::Tensor& bnw, const at::Tensor& bnb, const at::Tensor& mean,
                                      const at::Tensor& var, double eps, int act, const at::Tensor& out,
                                      const at::Tensor& z) {
  TORCH_CHECK(x_covered(x, k) && wt.size(1) == k * k, "dw_block v2 generic: call not covered");
  const auto fmt = output_format(x);
  TORCH_CHECK(out.is_contiguous(fmt) && (!z.defined() || z.is_contiguous(fmt)),
              "dw_block v2 generic: out and z must have x's output layout (output_format)");
  CONVMIXER_DW_V2G_DISPATCH(x.scalar_type(), "dw_block_v2_generic_eval_forward", [&] {
    run_gen_eval<scalar_t>(x, static_cast<int>(k), wt, b, bnw, bnb, mean, var, eps, act, out, z);
  });
}

void dw_block_v2_generic_train_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                                       const at::Tensor& bnw, const at::Tensor& bnb, double eps, int act,
                                       const at::Tensor& out, const at::Tensor& z, const at::Tensor& mean,
                                       const at::Tensor& var) {
  TORCH_CHECK(x_covered(x, k) && wt.size(1) == k * k, "dw_block v2 generic: call not covered");
  const auto fmt = output_format(x);
  TORCH_CHECK(out.is_contiguous(fmt) && z.is_contiguous(fmt),
              "dw_block v2 generic: out and z must have x's output layout (output_format)");
  CONVMIXER_DW_V2G_DISPATCH(x.scalar_type(), "dw_block_v2_generic_train_forward", [&] {
    run_gen_train<scalar_t>(x, static_cast<int>(k), wt, b, bnw, bnb, eps, act, out, z, mean, var);
  });
}

bool dw_block_v2_generic_backward_covers(const at::Tensor& grad_out, const at::Tensor& x, int64_t k) {
  return x_covered(x, k) && grad_out.sizes() == x.sizes() && smem_fits(bwd_smem(static_cast<int>(k)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_v2_generic_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& bnw, const at::Tensor& mean, const at::Tensor& var, bool use_batch_stats, double eps,
    int act, bool need_dx, bool need_dw, bool need_db, bool need_dbnw, bool need_dbnb) {
  const int64_t k = weight.size(2);
  TORCH_CHECK(dw_block_v2_generic_backward_covers(grad_out, x, k) && z.sizes() == x.sizes(),
              "dw_block v2 generic backward: call not covered");
  TORCH_CHECK(need_dx || need_dw || need_db, "dw_block v2 generic backward: no convolution gradient asked for");
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3);
  const int64_t kk = k * k;
  const double count = static_cast<double>(N * H * W);
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor dx = at::empty({0}, x.options()), dweight = at::empty({0}, x.options()),
             dbias = at::empty({0}, x.options()), dbnw = at::empty({0}, fopt), dbnb = at::empty({0}, fopt);
  const bool dxcl = output_format(x) == at::MemoryFormat::ChannelsLast;
  if (need_dx) dx = at::empty(x.sizes(), x.options().memory_format(output_format(x)));  // NCHW or channels_last
  const at::Tensor wt = weight.reshape({C, kk}).to(at::kFloat).contiguous();
  at::Tensor inv = at::empty({C}, fopt), mg, mgx;
  v2b::ChanArgs ca{};
  ca.C = C;
  ca.var = var.data_ptr<float>();
  ca.eps = static_cast<float>(eps);
  ca.inv = inv.data_ptr<float>();
  launch_chan_g(ca);

  CONVMIXER_DW_V2G_DISPATCH(x.scalar_type(), "dw_block_v2_generic_backward", [&] {
    using T = scalar_t;
    const size_t smem = bwd_smem(static_cast<int>(k));
    auto* bwd = v2g::gen_bwd_kernel<T, 0>;
    const int64_t group = bwd_group(N, C, bwd, smem), groups = cdiv_g(N, group);
    TORCH_CHECK(groups * C < std::numeric_limits<int32_t>::max(), "dw_block v2 generic backward: C = ", C,
                " is too large (groups x C must stay below 2^31)");
    if (use_batch_stats) {
      at::Tensor ps = at::empty({groups, C, 2}, fopt);
      v2g::GenStatsArgs<T> sa{};
      sa.dy = grad_out.data_ptr<T>();
      sa.vdy = view_of(grad_out);
      sa.z = z.data_ptr<T>();
      sa.vz = view_of(z);
      sa.mean = mean.data_ptr<float>();
      sa.inv = inv.data_ptr<float>();
      sa.part = ps.data_ptr<float>();
      sa.act = act;
      sa.C = static_cast<int>(C);
      sa.H = static_cast<int>(H);
      sa.W = static_cast<int>(W);
      sa.N = N;
      sa.group = group;
      sa.warps = groups * C;
      switch (act) {
        case kGelu: launch_g(v2g::gen_stats_kernel<T, kGelu>, sa.warps, 0, sa); break;
        case kGeluTanh: launch_g(v2g::gen_stats_kernel<T, kGeluTanh>, sa.warps, 0, sa); break;
        default: launch_g(v2g::gen_stats_kernel<T, kRelu>, sa.warps, 0, sa); break;
      }
      const at::Tensor sums = colsum_g(ps);  // (C, 2) float64
      mg = at::empty({C}, fopt);
      mgx = at::empty({C}, fopt);
      if (need_dbnw) dbnw = at::empty({C}, fopt);
      if (need_dbnb) dbnb = at::empty({C}, fopt);
      v2b::ChanArgs fa = ca;
      fa.sums = sums.data_ptr<double>();
      fa.bnw = ptr_or_null_g(bnw);
      fa.count = count;
      fa.mg = mg.data_ptr<float>();
      fa.mgx = mgx.data_ptr<float>();
      fa.dbnb = need_dbnb ? dbnb.data_ptr<float>() : nullptr;
      fa.dbnw = need_dbnw ? dbnw.data_ptr<float>() : nullptr;
      launch_chan_g(fa);
    }

    // dz once per element (float32 scratch, rows padded to a multiple of 8 columns) and the
    // per-group sums of dz (and, in eval, of dy and dy * xhat); the scratch only when the
    // convolution gradients need it
    const bool conv_grads = need_dx || need_dw;
    const int64_t wp = (W + 7) / 8 * 8;
    const at::Tensor dzs = conv_grads ? at::empty({N, C, H, wp}, fopt) : at::Tensor();
    const at::Tensor psum = at::empty({groups, C, 3}, fopt);
    v2g::GenDzArgs<T> da{};
    da.dy = grad_out.data_ptr<T>();
    da.vdy = view_of(grad_out);
    da.z = z.data_ptr<T>();
    da.vz = view_of(z);
    da.dz = conv_grads ? dzs.data_ptr<float>() : nullptr;
    da.mean = mean.data_ptr<float>();
    da.inv = inv.data_ptr<float>();
    da.bnw = ptr_or_null_g(bnw);
    da.mg = use_batch_stats ? mg.data_ptr<float>() : nullptr;
    da.mgx = use_batch_stats ? mgx.data_ptr<float>() : nullptr;
    da.psum = psum.data_ptr<float>();
    da.C = static_cast<int>(C);
    da.H = static_cast<int>(H);
    da.W = static_cast<int>(W);
    da.wp = static_cast<int>(wp);
    da.N = N;
    da.group = group;
    da.warps = groups * C;
    da.train = use_batch_stats;
    da.need_stats = !use_batch_stats && (need_dbnw || need_dbnb);
    switch (act) {
      case kGelu: launch_g(v2g::gen_dz_kernel<T, kGelu>, da.warps, 0, da); break;
      case kGeluTanh: launch_g(v2g::gen_dz_kernel<T, kGeluTanh>, da.warps, 0, da); break;
      default: launch_g(v2g::gen_dz_kernel<T, kRelu>, da.warps, 0, da); break;
    }
    const at::Tensor sums = colsum_g(psum).view({C, 3});
    if (need_db) dbias = sums.select(1, 0).to(weight.scalar_type()).contiguous();
    if (!use_batch_stats) {
      if (need_dbnb) dbnb = sums.select(1, 1).to(at::kFloat).contiguous();
      if (need_dbnw) dbnw = sums.select(1, 2).to(at::kFloat).contiguous();
    }
    if (!conv_grads) return;

    at::Tensor part = at::empty({groups, C, kk}, fopt);
    v2g::GenBwdArgs<T> a{};
    a.x = x.data_ptr<T>();
    a.vx = view_of(x);
    a.dy = grad_out.data_ptr<T>();
    a.vdy = view_of(grad_out);
    a.dz = dzs.data_ptr<float>();
    a.dx = need_dx ? dx.data_ptr<T>() : nullptr;
    a.dxvec = need_dx && !dxcl && W % 8 == 0 && aligned16_g(dx.data_ptr());
    a.dxcl = dxcl;
    a.wt = wt.data_ptr<float>();
    a.part = part.data_ptr<float>();
    a.k = static_cast<int>(k);
    a.C = static_cast<int>(C);
    a.H = static_cast<int>(H);
    a.W = static_cast<int>(W);
    a.wp = static_cast<int>(wp);
    a.tiles_h = static_cast<int>(cdiv_g(H, v2g::TR));
    a.tiles_w = static_cast<int>(cdiv_g(W, v2g::TC));
    a.N = N;
    a.group = group;
    a.warps = groups * C;
    a.need_dx = need_dx;
    a.need_dw = need_dw;
    launch_g(bwd, a.warps, smem, a);
    if (need_dw) dweight = colsum_g(part).view({C, kk}).to(weight.scalar_type()).reshape(weight.sizes()).contiguous();
  });
  return {dx, dweight, dbias, dbnw, dbnb};
}

}  // namespace cuda
}  // namespace convmixer_kernels
