// CUDA kernels of the residual depthwise block
//   out = x + BN(act(dwconv_k(x) + b)),  k odd, 'same' zero padding
// registered as the CUDA implementation of convmixer_kernels::dw_block_{forward,backward}_kernel
// (schemas in convmixer_kernels/schema.py, semantics in convmixer_kernels/reference.py, the CPU
// implementation of the same schema in csrc/cpu/dw_block.cpp).
//
// Tiling (every tiled kernel): a block of 256 threads owns CT = 8 channels x TH = 8 rows x
// TW = 16 columns of one image. Warp `ch` holds channel c0 + ch; in it, lane = row * 4 + q4
// and each thread owns PX = 4 consecutive pixels of its row (columns q4 * 4 .. q4 * 4 + 3),
// so a per-channel sum over the tile is one warp reduction (fixed butterfly order).
// The conv kernels stage the input tile with its halo, (TH + k - 1) x (TW + k - 1) per
// channel, in shared memory (float32), loaded in the order its strides favour (channels
// fastest for channels_last, columns fastest otherwise); the taps then run from shared
// memory with the 4 outputs of a thread in registers (the input row segment of a kernel
// row is loaded into registers once for all its taps).
//
// Kernels:
// - conv_kernel<in_t, out_t, K>: conv + epilogue, by mode:
//     EVAL   z = round(conv(x) + b); out = x + BN(act(z)) with the running statistics;
//     TRAIN  z stored; per-tile per-channel (mean, M2) of act(z) written (no atomics);
//     ZONLY  z stored (backward without a saved pre-activation);
//     DGRAD  dx = conv(dz, flipped weights) + dy (the residual).
// - finalize_stats_kernel: Chan's combination of the tile statistics in tile order, in
//   double: batch mean and biased variance.
// - norm_kernel: out = x + BN(act(z)) (training, second pass).
// - bwd_elem_kernel: per-tile sums of dy and dy * xhat, and/or
//   dz = act'(z) * (dy * bn_weight - mean_g - xhat * mean_gx) * invstd (float32) with its
//   per-tile sums (the conv bias gradient).
// - wgrad_kernel: per-split partial sums of dz * shifted x for every tap (a block walks its
//   split's tiles in order; each (channel, tap) accumulator belongs to one thread).
// - reduce_rows_kernel: column sums of a (rows x cols) float32 matrix, in row order, in
//   double (tile and split partials).
// No atomics anywhere: results are bitwise reproducible run to run on a given device.
// Global offsets are int64. Kernel sizes 3, 5, 7, 9, 13, 31 are template constants; other
// odd sizes go through the run-time-k instantiation (K = 0).
//
// Files: dw_block_common.cuh (constants, geometry, device helpers), dw_block_kernels.cuh
// (the kernels and their arguments), this file (launches, the host entry points with their
// checks from csrc/common/checks.h, the registration): one translation unit.
//
// v2 (issue 22; dw_block_v2.{h,cu,cuh}, docs/cuda-depthwise.md): the register-blocked eval
// and train forwards run instead of conv_kernel (+ finalize/norm) for the calls they cover
// (NCHW-contiguous, k in {3, 5, 7, 9}, W <= 32) only where v2 is enabled
// (dw_block_v2_enabled: its source hash is validated by a recorded GPU run, or the environment
// opts in with CONVMIXER_KERNELS_CUDA_DW_V2=1; =0 forces v1; read at each call); under the same
// switch the channels_last eval and train forwards (dw_block_v2_cl.{h,cu,cuh},
// dw_block_v2_cl_train.cuh) and backward (dw_block_v2_cl_backward.{h,cu,cuh}) run for
// channels_last-contiguous x with k in {3, 5, 7, 9}, C % 4 == 0 and 16-byte aligned pointers. By default
// (unvalidated) the kernels here serve every call. The v2 backward
// (dw_block_v2_backward.{h,cu,cuh}) likewise replaces bwd_elem_kernel, the DGRAD conv and
// wgrad_kernel for the backward calls it covers (same switch; dw_block_backward_cuda). The
// generic v2 path (dw_block_v2_generic.{h,cu,cuh}: run-time k up to 31, column tiles for any W,
// strided views read through their strides) takes every other call, forward and backward, under
// the same switch: output NCHW (x not channels_last-contiguous) or channels_last (out, preact and
// dx written channels_last: channels_last x with k other than 3/5/7/9, C % 4 != 0 or a
// misaligned pointer); it is routed after the templated NCHW and channels_last kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cstdint>
#include <cstdlib>
#include <limits>
#include <string>
#include <type_traits>

#include "../common/checks.h"
#include "dw_block_common.cuh"
#include "dw_block_kernels.cuh"
#include "dw_block_v2.h"
#include "dw_block_v2_backward.h"
#include "dw_block_v2_cl.h"
#include "dw_block_v2_cl_backward.h"
#include "dw_block_v2_generic.h"

namespace convmixer_kernels {
namespace cuda {
namespace {

// ---- host side ---------------------------------------------------------------------------

constexpr size_t kDefaultSmem = 48 * 1024;

template <typename A>
void launch(void (*kernel)(const A), int64_t blocks, size_t smem, const A& args) {
  if (blocks == 0) return;
  TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(),
              "dw_block (cuda): the problem needs ", blocks, " thread blocks, at most 2^31 - 1 are supported");
  if (smem > kDefaultSmem) {
    const int optin = at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin;
    TORCH_CHECK(smem <= static_cast<size_t>(optin), "dw_block (cuda): this kernel size needs ", smem,
                " bytes of shared memory per block, the device allows ", optin,
                "; use a smaller kernel size (3..31 are supported) or another backend");
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  kernel<<<static_cast<unsigned>(blocks), THREADS, smem, at::cuda::getCurrentCUDAStream()>>>(args);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

int64_t cdiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The v2 gate (dw_block_v2.h): validated source hash or CONVMIXER_KERNELS_CUDA_DW_V2=1; =0 forces v1.
bool v2_enabled() { return dw_block_v2_enabled(); }

size_t conv_smem(const Geometry& g) { return sizeof(float) * CT * (TH + g.k - 1) * (TW + g.k - 1); }

size_t wgrad_smem(const Geometry& g) {
  return sizeof(float) * (CT * (TH + g.k - 1) * (TW + g.k - 1) + CT * TH * TW + CT * g.k * g.k);
}

// Calls fn(std::integral_constant<int, K>{}) with K = k for the unrolled sizes, K = 0 otherwise.
template <typename Fn>
void with_kernel_size(int k, Fn&& fn) {
#define CONVMIXER_DW_K_CASE(KV) \
  case KV:                      \
    return fn(std::integral_constant<int, KV>{});
  switch (k) {
    CONVMIXER_DW_K_CASE(3)
    CONVMIXER_DW_K_CASE(5)
    CONVMIXER_DW_K_CASE(7)
    CONVMIXER_DW_K_CASE(9)
    CONVMIXER_DW_K_CASE(13)
    CONVMIXER_DW_K_CASE(31)
    default:
      return fn(std::integral_constant<int, 0>{});
  }
#undef CONVMIXER_DW_K_CASE
}

template <typename in_t, typename out_t>
void launch_conv(const ConvArgs<in_t, out_t>& args) {
  with_kernel_size(args.g.k, [&](auto kc) {
    constexpr int K = decltype(kc)::value;
    launch(conv_kernel<in_t, out_t, K>, args.g.blocks, conv_smem(args.g), args);
  });
}

// The storage dtypes of the kernels: float32, float16, bfloat16 (float32 arithmetic).
#define CONVMIXER_DW_DISPATCH(st, name, ...)                \
  AT_DISPATCH_SWITCH(st, name,                              \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))

// Per-channel float32 copies (contiguous) of optional parameters.
at::Tensor f32(const c10::optional<at::Tensor>& t) {
  return t.has_value() ? t->to(at::kFloat).contiguous() : at::Tensor();
}

const float* ptr_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; }

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_forward_cuda(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, c10::string_view activation, bool save_preact) {
  const char* where = "dw_block_forward_kernel (cuda)";
  check_dw_block_inputs(x, weight, where, at::kCUDA);
  check_dw_block_forward_args(use_batch_stats, running_mean, running_var, where);
  check_same_device(bias, x, "bias", where);
  check_same_device(bn_weight, x, "bn_weight", where);
  check_same_device(bn_bias, x, "bn_bias", where);
  check_same_device(running_mean, x, "running_mean", where);
  check_same_device(running_var, x, "running_var", where);
  const int act = parse_act(activation, where);
  const c10::cuda::CUDAGuard guard(x.device());

  const Geometry g = make_geometry(x, weight.size(2));
  const auto fmt = output_format(x);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor preact = save_preact ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor mean = at::empty({g.C}, fopt), var = at::empty({g.C}, fopt);
  if (!use_batch_stats) {
    mean.copy_(running_mean->to(at::kFloat));
    var.copy_(running_var->to(at::kFloat));
  }
  if (x.numel() == 0) {
    if (use_batch_stats) {
      mean.fill_(std::numeric_limits<float>::quiet_NaN());
      var.fill_(std::numeric_limits<float>::quiet_NaN());
    }
    return {out, mean, var, preact};
  }
  const at::Tensor wt = dw_weight_matrix(weight, false), b = f32(bias), bnw = f32(bn_weight), bnb = f32(bn_bias);
  if (!use_batch_stats && v2_enabled() && dw_block_v2_eval_covers(x, g.k)) {
    dw_block_v2_eval_forward(x, g.k, wt, b, bnw, bnb, mean, var, eps, act, out,
                             save_preact ? preact : at::Tensor());
    return {out, mean, var, preact};
  }
  // channels_last eval (dw_block_v2_cl.*): x channels_last-contiguous, C % 4 == 0, 16-byte aligned
  if (!use_batch_stats && v2_enabled() && dw_block_v2_cl_eval_covers(x, g.k)) {
    dw_block_v2_cl_eval_forward(x, g.k, wt, b, bnw, bnb, mean, var, eps, act, out,
                                save_preact ? preact : at::Tensor());
    return {out, mean, var, preact};
  }
  if (use_batch_stats && v2_enabled() && dw_block_v2_train_covers(x, g.k)) {
    // z into preact (saved) or into out as scratch, as the v1 path below
    dw_block_v2_train_forward(x, g.k, wt, b, bnw, bnb, eps, act, out, save_preact ? preact : out, mean, var);
    return {out, mean, var, preact};
  }
  // channels_last train (dw_block_v2_cl.*): the same calls as the channels_last eval above
  if (use_batch_stats && v2_enabled() && dw_block_v2_cl_train_covers(x, g.k)) {
    dw_block_v2_cl_train_forward(x, g.k, wt, b, bnw, bnb, eps, act, out, save_preact ? preact : out, mean, var);
    return {out, mean, var, preact};
  }
  // Every other call (output NCHW or channels_last, any strides, k odd 3..31, any W): the generic
  // v2 path (dw_block_v2_generic.*: run-time k, column tiles with a halo, x read through its
  // strides, out / preact written in output_format(x)).
  if (v2_enabled() && dw_block_v2_generic_covers(x, g.k)) {
    if (use_batch_stats)
      dw_block_v2_generic_train_forward(x, g.k, wt, b, bnw, bnb, eps, act, out, save_preact ? preact : out, mean,
                                        var);
    else
      dw_block_v2_generic_eval_forward(x, g.k, wt, b, bnw, bnb, mean, var, eps, act, out,
                                       save_preact ? preact : at::Tensor());
    return {out, mean, var, preact};
  }
  // Training stores z in preact, or in out as scratch until the statistics are known.
  at::Tensor zbuf = save_preact ? preact : (use_batch_stats ? out : at::Tensor());
  at::Tensor pmean, pm2;
  if (use_batch_stats) {
    pmean = at::empty({g.tiles, g.C}, fopt);
    pm2 = at::empty({g.tiles, g.C}, fopt);
  }
  const BnArgs bn{mean.data_ptr<float>(), var.data_ptr<float>(), ptr_or_null(bnw), ptr_or_null(bnb),
                  static_cast<float>(eps)};

  CONVMIXER_DW_DISPATCH(x.scalar_type(), "dw_block_forward_cuda", [&] {
    ConvArgs<scalar_t, scalar_t> ca{};
    ca.g = g;
    ca.mode = use_batch_stats ? kTrain : kEval;
    ca.act = act;
    ca.in = x.data_ptr<scalar_t>();
    ca.s_in = strides_of(x);
    ca.wt = wt.data_ptr<float>();
    ca.bias = ptr_or_null(b);
    ca.z = zbuf.defined() ? zbuf.data_ptr<scalar_t>() : nullptr;
    ca.s_z = strides_of(out);  // preact and out share the output layout
    ca.out = out.data_ptr<scalar_t>();
    ca.s_out = strides_of(out);
    ca.bn = bn;
    ca.pmean = use_batch_stats ? pmean.data_ptr<float>() : nullptr;
    ca.pm2 = use_batch_stats ? pm2.data_ptr<float>() : nullptr;
    launch_conv(ca);
    if (!use_batch_stats) return;

    launch(finalize_stats_kernel, cdiv(g.C, THREADS), 0,
           FinalizeArgs{g, pmean.data_ptr<float>(), pm2.data_ptr<float>(), mean.data_ptr<float>(),
                        var.data_ptr<float>()});
    NormArgs<scalar_t> na{};
    na.g = g;
    na.act = act;
    na.channels_last = fmt == at::MemoryFormat::ChannelsLast;
    na.x = x.data_ptr<scalar_t>();
    na.s_x = strides_of(x);
    na.z = zbuf.data_ptr<scalar_t>();
    na.out = out.data_ptr<scalar_t>();
    na.bn = bn;
    const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
    launch(norm_kernel<scalar_t>, std::min<int64_t>(cdiv(x.numel(), THREADS), sms * 32), 0, na);
  });
  return {out, mean, var, preact};
}

// Column sums (double, row order) of a (rows, cols) float32 matrix.
at::Tensor reduce_rows(const at::Tensor& m) {
  const int64_t rows = m.size(0), cols = m.numel() / std::max<int64_t>(rows, 1);
  at::Tensor out = at::empty({cols}, m.options().dtype(at::kDouble));
  launch(reduce_rows_kernel, cdiv(cols, THREADS), 0, ReduceArgs{m.data_ptr<float>(), rows, cols, out.data_ptr<double>()});
  return out;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_backward_cuda(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact, bool use_batch_stats, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  const char* where = "dw_block_backward_kernel (cuda)";
  check_dw_block_inputs(x, weight, where, at::kCUDA);
  check_dw_block_backward_args(grad_out, x, preact, output_mask, where);
  TORCH_CHECK(grad_out.device() == x.device(), where, ": grad_out must be on ", x.device(), " like x");
  TORCH_CHECK(mean.numel() == x.size(1) && var.numel() == x.size(1), where,
              ": mean and var must have C = ", x.size(1), " entries, got ", mean.numel(), " and ", var.numel());
  TORCH_CHECK(mean.device() == x.device() && var.device() == x.device(), where, ": mean and var must be on ",
              x.device(), " like x");
  TORCH_CHECK(preact.numel() == 0 || preact.device() == x.device(), where, ": preact must be on ", x.device());
  check_same_device(bias, x, "bias", where);
  check_same_device(bn_weight, x, "bn_weight", where);
  const int act = parse_act(activation, where);
  const c10::cuda::CUDAGuard guard(x.device());

  const bool need_dx = output_mask[0], need_dw = output_mask[1], need_db = output_mask[2],
             need_dbnw = output_mask[3], need_dbnb = output_mask[4];
  const Geometry g = make_geometry(x, weight.size(2));
  const auto fmt = output_format(x);
  const auto fopt = x.options().dtype(at::kFloat);
  auto empty = [&]() { return at::empty({0}, x.options()); };
  const bool need_conv = need_dx || need_dw || need_db;
  const bool need_stats = need_dbnw || need_dbnb || (use_batch_stats && need_conv);
  at::Tensor dx = empty(), dweight = empty(), dbias = empty(), dbnw = at::empty({0}, fopt), dbnb = at::empty({0}, fopt);
  if (x.numel() == 0) {
    if (need_dx) dx = at::empty(x.sizes(), x.options().memory_format(fmt));
    if (need_dw) dweight = at::zeros(weight.sizes(), weight.options());
    if (need_db) dbias = at::zeros({g.C}, weight.options());
    if (need_dbnw) dbnw = at::zeros({g.C}, fopt);
    if (need_dbnb) dbnb = at::zeros({g.C}, fopt);
    return {dx, dweight, dbias, dbnw, dbnb};
  }
  if (!need_conv && !need_stats) return {dx, dweight, dbias, dbnw, dbnb};

  const at::Tensor mean32 = mean.to(at::kFloat).contiguous(), var32 = var.to(at::kFloat).contiguous();
  const at::Tensor bnw = f32(bn_weight);
  const double count = static_cast<double>(g.N * g.H * g.W);
  // v2 backward (dw_block_v2_backward.cu, docs/cuda-depthwise.md "v2 backward"): NCHW, k in
  // {3, 5, 7, 9}, W <= 32, behind the same switch as the v2 forward. It takes the pre-activation
  // below (saved, or recomputed by conv_kernel) and replaces the elementwise, dgrad and wgrad
  // passes. BN-only masks stay on bwd_elem_kernel (one pass already).
  const bool use_v2 = need_conv && v2_enabled() && dw_block_v2_backward_covers(grad_out, x, preact, g.k);
  // channels_last v2 backward (dw_block_v2_cl_backward.*): channels_last x, grad_out (and a saved
  // preact), C % 4 == 0, 16-byte aligned, k in {3, 5, 7, 9}
  const bool use_v2_cl =
      need_conv && !use_v2 && v2_enabled() && dw_block_v2_cl_backward_covers(grad_out, x, preact, g.k);
  // The other calls (k odd 3..31, any W, strided x / grad_out / preact, channels_last x with
  // C % 4 != 0, misaligned pointers, other k): the generic v2 backward (dw_block_v2_generic.*;
  // dx in output_format(x)), same switch.
  const bool use_v2_generic =
      !use_v2 && !use_v2_cl && need_conv && v2_enabled() && dw_block_v2_generic_backward_covers(grad_out, x, g.k);

  CONVMIXER_DW_DISPATCH(x.scalar_type(), "dw_block_backward_cuda", [&] {
    // The pre-activation: the saved one, or recomputed from x.
    at::Tensor z = preact;
    if (preact.numel() == 0) {
      z = at::empty(x.sizes(), x.options().memory_format(fmt));
      const at::Tensor wt = dw_weight_matrix(weight, false), b = f32(bias);
      ConvArgs<scalar_t, scalar_t> ca{};
      ca.g = g;
      ca.mode = kZOnly;
      ca.act = act;
      ca.in = x.data_ptr<scalar_t>();
      ca.s_in = strides_of(x);
      ca.wt = wt.data_ptr<float>();
      ca.bias = ptr_or_null(b);
      ca.z = z.data_ptr<scalar_t>();
      ca.s_z = strides_of(z);
      launch_conv(ca);
    }
    if (use_v2_cl) {
      std::tie(dx, dweight, dbias, dbnw, dbnb) =
          dw_block_v2_cl_backward(grad_out, x, weight, z, bnw, mean32, var32, use_batch_stats, eps, act, need_dx,
                                  need_dw, need_db, need_dbnw, need_dbnb);
      return;
    }
    if (use_v2) {
      std::tie(dx, dweight, dbias, dbnw, dbnb) =
          dw_block_v2_backward(grad_out, x, weight, z, bnw, mean32, var32, use_batch_stats, eps, act, need_dx,
                               need_dw, need_db, need_dbnw, need_dbnb);
      return;
    }
    if (use_v2_generic) {
      std::tie(dx, dweight, dbias, dbnw, dbnb) =
          dw_block_v2_generic_backward(grad_out, x, weight, z, bnw, mean32, var32, use_batch_stats, eps, act,
                                       need_dx, need_dw, need_db, need_dbnw, need_dbnb);
      return;
    }

    at::Tensor dz = need_conv ? at::empty(x.sizes(), fopt.memory_format(fmt)) : at::Tensor();
    at::Tensor pdb = need_db ? at::empty({g.tiles, g.C}, fopt) : at::Tensor();
    at::Tensor psum = at::empty({g.tiles, g.C}, fopt), pdot = at::empty({g.tiles, g.C}, fopt);
    ElemArgs<scalar_t> ea{};
    ea.g = g;
    ea.act = act;
    ea.train = false;
    ea.dy = grad_out.data_ptr<scalar_t>();
    ea.s_dy = strides_of(grad_out);
    ea.z = z.data_ptr<scalar_t>();
    ea.s_z = strides_of(z);
    ea.mean = mean32.data_ptr<float>();
    ea.var = var32.data_ptr<float>();
    ea.eps = static_cast<float>(eps);
    ea.bn_weight = ptr_or_null(bnw);
    ea.psum = psum.data_ptr<float>();
    ea.pdot = pdot.data_ptr<float>();
    ea.pdb = need_db ? pdb.data_ptr<float>() : nullptr;
    ea.dz = need_conv ? dz.data_ptr<float>() : nullptr;
    ea.s_dz = need_conv ? strides_of(dz) : Strides4{0, 0, 0, 0};

    if (need_stats) {
      // Eval: dz needs no statistics, so it comes out of the same pass.
      ea.stats = true;
      ea.dz_pass = need_conv && !use_batch_stats;
      launch(bwd_elem_kernel<scalar_t>, g.blocks, 0, ea);
      const at::Tensor sdy = reduce_rows(psum), sdyx = reduce_rows(pdot);
      if (need_dbnw) dbnw = sdyx.to(at::kFloat);
      if (need_dbnb) dbnb = sdy.to(at::kFloat);
      if (need_conv && use_batch_stats) {
        const at::Tensor gw = bnw.defined() ? bnw.to(at::kDouble) : at::ones({g.C}, sdy.options());
        const at::Tensor mg = (gw * sdy / count).to(at::kFloat), mgx = (gw * sdyx / count).to(at::kFloat);
        ea.stats = false;
        ea.dz_pass = true;
        ea.train = true;
        ea.mean_g = mg.data_ptr<float>();
        ea.mean_gx = mgx.data_ptr<float>();
        launch(bwd_elem_kernel<scalar_t>, g.blocks, 0, ea);
      }
    } else if (need_conv) {
      ea.stats = false;
      ea.dz_pass = true;
      launch(bwd_elem_kernel<scalar_t>, g.blocks, 0, ea);
    }
    if (!need_conv) return;

    if (need_dx) {
      dx = at::empty(x.sizes(), x.options().memory_format(fmt));
      const at::Tensor wflip = dw_weight_matrix(weight, true);
      ConvArgs<float, scalar_t> da{};
      da.g = g;
      da.mode = kDgrad;
      da.act = act;
      da.in = dz.data_ptr<float>();
      da.s_in = strides_of(dz);
      da.wt = wflip.data_ptr<float>();
      da.out = dx.data_ptr<scalar_t>();
      da.s_out = strides_of(dx);
      da.dy = grad_out.data_ptr<scalar_t>();
      da.s_dy = strides_of(grad_out);
      launch_conv(da);
    }
    if (need_dw) {
      // Splits of the tile sequence: about 4 blocks per SM in all, each split's tiles in order.
      const int64_t sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
      const int64_t want = std::max<int64_t>(1, std::min<int64_t>(g.tiles, 4 * sms / g.groups));
      const int64_t per_split = cdiv(g.tiles, want), splits = cdiv(g.tiles, per_split);
      const int64_t kk = static_cast<int64_t>(g.k) * g.k;
      at::Tensor pw = at::empty({splits, kk, g.C}, fopt);
      WgradArgs<scalar_t> wa{};
      wa.g = g;
      wa.x = x.data_ptr<scalar_t>();
      wa.s_x = strides_of(x);
      wa.dz = dz.data_ptr<float>();
      wa.s_dz = strides_of(dz);
      wa.tiles_per_split = per_split;
      wa.pw = pw.data_ptr<float>();
      launch(wgrad_kernel<scalar_t>, splits * g.groups, wgrad_smem(g), wa);
      dweight = reduce_rows(pw).view({kk, g.C}).t().reshape(weight.sizes()).to(weight.scalar_type()).contiguous();
    }
    if (need_db) dbias = reduce_rows(pdb).to(weight.scalar_type());
  });
  return {dx, dweight, dbias, dbnw, dbnb};
}

}  // namespace

TORCH_LIBRARY_IMPL(convmixer_kernels, CUDA, m) {
  m.impl("dw_block_forward_kernel", &dw_block_forward_cuda);
  m.impl("dw_block_backward_kernel", &dw_block_backward_cuda);
}

}  // namespace cuda
}  // namespace convmixer_kernels
