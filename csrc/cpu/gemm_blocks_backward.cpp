// The CPU GEMM blocks' backward (gemm_blocks.h; the design in gemm_blocks.cpp), in steps:
//   prepare_operands   dy and preact in the work layout, z recomputed where not saved, the
//                      GEMM (or convolution) operands;
//   dz passes          (gemm_blocks_dz.h) [act, act', xhat, sum(dy), sum(dy * xhat)] then
//                      [dz = act' * BN backward] (one pass with running statistics),
//                      sum(dz) for dbias: dz_passes_stored (gelu with batch statistics:
//                      xhat and act' stored between the passes) or dz_passes_recomputed;
//   weight and input gradients from dz: conv_grads (oneDNN's convolution backward), or
//                      gemm_weight_grad (dW = dz^T @ P) and gemm_input_grad (dx = dz @ W).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "gemm_blocks.h"
#include "gemm_blocks_dz.h"
#include "gemm_blocks_geom.h"
#include "gemm_blocks_passes.h"

namespace convmixer_kernels {
namespace cpu {
namespace gemm {
namespace {

// The backward's operands, in the work layout g.fmt: dy, the saved preact, the GEMM operands
// P and Wm (or x as the channels_last float32 xc of the convolution path), and D: z
// recomputed with the forward's GEMM where no preact was saved (the same bits), else a
// buffer for act' and dz where dz is needed.
struct Operands {
  Tensor dy, pre, P, Wm, D, xc;
  bool use_conv = false;
  bool z_has_bias = false;  // the recomputed z (D) already has the bias (the forward's conv added it)
};

Operands prepare_operands(const Geom& g, at::ScalarType acc, const Tensor& grad_out, const Tensor& x,
                          const Tensor& weight, const OptTensor& bias, const Tensor& preact, bool need_dz,
                          bool need_dx, bool need_dw) {
  Operands o;
  const bool have_preact = preact.numel() > 0;
  o.dy = grad_out.contiguous(g.fmt);  // a copy only when grad_out is in another layout
  o.pre = have_preact ? preact.contiguous(g.fmt) : Tensor();
  o.use_conv = conv_gemm(g, acc);
  if (o.use_conv) {
    if (!have_preact || need_dw) o.xc = conv_input(x);
  } else {
    if (!have_preact || need_dw) o.P = patch_matrix(g, x, acc);
    if (!have_preact || need_dx) o.Wm = weight_matrix(g, weight, acc);
  }
  if (!have_preact) {  // z recomputed with the forward's GEMM: the same bits
    if (o.use_conv) {
      o.z_has_bias = conv_adds_bias(g, acc, x.scalar_type());
      o.D = conv_forward(g, o.xc, weight, o.z_has_bias ? bias : OptTensor());
    } else {
      o.D = at::empty(out_sizes(g), x.options().dtype(acc).memory_format(g.fmt));
      gemm_forward(g, o.P, o.Wm, o.D);
    }
  } else if (need_dz) {
    o.D = at::empty(out_sizes(g), x.options().dtype(acc).memory_format(g.fmt));
  }
  if (!need_dw) o.P = Tensor();
  return o;
}

// dx and dweight from the convolution's backward (the float32 channels_last path).
template <typename scalar_t>
void conv_grads(const Geom& g, Operands& o, const Tensor& x, const Tensor& weight, bool need_dx, bool need_dw,
                Tensor& dx, Tensor& dweight) {
  constexpr bool kSame = std::is_same<scalar_t, acc_type_t<scalar_t>>::value;
  Tensor& xc = o.xc;
  const Tensor& D = o.D;
  // dx and dW from the convolution's backward (oneDNN's where the forward ran it). dx is
  // zero outside the patches (rows and columns past Ho * p, Wo * p) by construction.
  Tensor xin = xc.defined() ? xc : at::empty(x.sizes(), x.options().dtype(at::kFloat).memory_format(at::MemoryFormat::ChannelsLast));
  auto grads = at::convolution_backward(D, xin, weight.to(at::kFloat), c10::nullopt, {g.p, g.p}, {0, 0},
                                        {1, 1}, false, {0, 0}, 1, {need_dx, need_dw, false});
  xc = Tensor();
  if (need_dw) {
    dweight = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
    dweight.copy_(std::get<1>(grads));
  }
  if (need_dx) {
    const Tensor& gx = std::get<0>(grads);
    if (kSame && gx.is_contiguous(g.in_fmt)) {
      dx = gx;
    } else {
      dx = at::empty(x.sizes(), x.options().memory_format(g.in_fmt));
      dx.copy_(gx);
    }
  }
}

// dweight from the GEMM dW = dz^T @ P (P released after).
Tensor gemm_weight_grad(const Geom& g, Operands& o, const Tensor& weight) {
  const int64_t C = g.Cout;
  const Tensor& D = o.D;
  Tensor& P = o.P;
  Tensor dweight;
  // dW = sum_n dz[n] (C, HWo) @ P[n]^T (HWo, K)
  Tensor dW;
  if (g.out_cl && g.in_cl) {
    dW = at::mm(D.permute({0, 2, 3, 1}).view({g.M, C}).t(), P.view({g.M, g.K}));
  } else {
    Tensor dz3 = out_cols(g, D);
    Tensor pc = patch_cols(g, P);
    if (g.N == 1 || g.HWo >= kLoopGemmMinPixels) {
      dW = at::mm(dz3[0], pc[0].t());
      for (int64_t n = 1; n < g.N; ++n) dW.addmm_(dz3[n], pc[n].t());
    } else {
      dW = at::mm(dz3.permute({1, 0, 2}).reshape({C, g.M}),
                  pc.permute({0, 2, 1}).reshape({g.M, g.K}));
    }
  }
  P = Tensor();
  Tensor dw4 = g.in_cl ? dW.view({C, g.p, g.p, g.Cin}).permute({0, 3, 1, 2})
                       : dW.view({C, g.Cin, g.p, g.p});
  dweight = at::empty(weight.sizes(), weight.options().memory_format(at::MemoryFormat::Contiguous));
  dweight.copy_(dw4);
  return dweight;
}

// dx from the GEMM dP = dz @ W, scattered back to the patches (written by the GEMM itself
// for pw_block in the compute dtype).
template <typename scalar_t>
Tensor gemm_input_grad(const Geom& g, const Operands& o, const Tensor& x) {
  constexpr bool kSame = std::is_same<scalar_t, acc_type_t<scalar_t>>::value;
  const int64_t C = g.Cout;
  const Tensor& D = o.D;
  const Tensor& Wm = o.Wm;
  Tensor dx;
  const bool direct = g.p == 1 && kSame;  // pw_block: the GEMM writes dx itself
  const bool full = g.Ho * g.p == g.H && g.Wo * g.p == g.W;
  dx = at::empty(x.sizes(), x.options().memory_format(g.in_fmt));
  if (!full) dx.zero_();  // pixels outside the patches get no gradient
  if (g.in_cl) {
    // dP[n] (HWo, K) = dz[n]^T (HWo, C) @ W (C, K): one mm when dz is channels_last too
    Tensor dz2 = g.out_cl ? D.permute({0, 2, 3, 1}).view({g.M, C}) : Tensor();
    Tensor dzt = g.out_cl ? Tensor() : out_cols(g, D).transpose(1, 2);
    if (direct) {
      Tensor dx3 = dx.permute({0, 2, 3, 1}).view({g.N, g.HWo, g.Cin});
      if (g.out_cl) {
        Tensor dx2 = dx3.view({g.M, g.Cin});
        at::mm_out(dx2, dz2, Wm);
      } else {
        at::bmm_out(dx3, dzt, Wm.expand({g.N, C, g.K}));
      }
    } else {
      Tensor dP = g.out_cl ? at::mm(dz2, Wm) : at::bmm(dzt, Wm.expand({g.N, C, g.K}));
      // (M, K), K ordered (di, dj, ci)
      dx.permute({0, 2, 3, 1})
          .narrow(1, 0, g.Ho * g.p)
          .narrow(2, 0, g.Wo * g.p)
          .view({g.N, g.Ho, g.p, g.Wo, g.p, g.Cin})
          .permute({0, 1, 3, 2, 4, 5})
          .copy_(dP.view({g.N, g.Ho, g.Wo, g.p, g.p, g.Cin}));
    }
  } else {
    // dP[n] (K, HWo) = W^T (K, C) @ dz[n] (C, HWo)
    Tensor dz3 = out_cols(g, D);
    Tensor wt = Wm.t().expand({g.N, g.K, C});
    if (direct) {
      Tensor dx3 = dx.view({g.N, g.Cin, g.HWo});
      at::bmm_out(dx3, wt, dz3);
    } else {
      Tensor dP = at::bmm(wt, dz3);  // (N, K, HWo), K ordered (ci, di, dj)
      dx.narrow(2, 0, g.Ho * g.p)
          .narrow(3, 0, g.Wo * g.p)
          .view({g.N, g.Cin, g.Ho, g.p, g.Wo, g.p})
          .permute({0, 1, 3, 5, 2, 4})
          .copy_(dP.view({g.N, g.Cin, g.p, g.p, g.Ho, g.Wo}));
    }
  }
  return dx;
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Geom& g, Act act, const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const OptTensor& bn_weight, const Tensor& mean, const Tensor& var,
    const Tensor& preact, bool use_batch_stats, double eps, const std::vector<bool>& mask) {
  using acc_t = acc_type_t<scalar_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t C = g.Cout;
  const bool need_dx = mask[0], need_dw = mask[1], need_db = mask[2], need_dbnw = mask[3],
             need_dbnb = mask[4];
  const bool need_dz = need_dx || need_dw || need_db;
  auto empty_x = [&]() { return at::empty({0}, x.options()); };
  auto empty_s = [&]() { return at::empty({0}, x.options().dtype(acc)); };
  if (!need_dz && !need_dbnw && !need_dbnb) {
    return std::make_tuple(empty_x(), empty_x(), empty_x(), empty_s(), empty_s());
  }

  Operands o = prepare_operands(g, acc, grad_out, x, weight, bias, preact, need_dz, need_dx, need_dw);

  DzPasses<scalar_t> p(g, act);
  const std::vector<acc_t> bias_v = channel_values<acc_t>(bias, C, acc_t(0));
  p.w_v = channel_values<acc_t>(bn_weight, C, acc_t(1));
  p.have_bnw = present(bn_weight);
  Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
  p.mp = mean_c.data_ptr<acc_t>();
  const acc_t* vp = var_c.data_ptr<acc_t>();
  p.invstd.resize(static_cast<size_t>(C));
  const acc_t eps_a = static_cast<acc_t>(eps);
  for (int64_t c = 0; c < C; ++c) p.invstd[c] = acc_t(1) / std::sqrt(vp[c] + eps_a);
  if (preact.numel() > 0) {
    p.zs.preact = src_of(o.pre);
  } else {
    p.zs.gemm = o.D.data_ptr<acc_t>();
    p.zs.bias = present(bias) && !o.z_has_bias ? bias_v.data() : nullptr;
    p.zs.direct = false;  // act' is written over the recomputed z
  }
  p.zs.C = C;
  p.dys = src_of(o.dy);
  p.Db = o.D.defined() ? o.D.data_ptr<acc_t>() : nullptr;
  p.need_dz = need_dz;
  p.need_db = need_db;
  p.two_pass = use_batch_stats && need_dz;
  p.want_sdy = need_dbnb || p.two_pass;
  p.want_sdyx = need_dbnw || p.two_pass;
  p.Sdy.assign(p.want_sdy ? p.k.nparts : 0, 0.0);
  p.Sdyx.assign(p.want_sdyx ? p.k.nparts : 0, 0.0);
  p.Sdz.assign(need_db ? p.k.nparts : 0, 0.0);

  // With batch statistics the dz pass needs sum(dy) and sum(dy * xhat) first: two passes.
  // An expensive activation (gelu) is evaluated once, in pass 1, which stores xhat and
  // act'; a cheap one (relu) is recomputed in pass 2 instead, which moves less memory.
  if (p.two_pass && act != Act::Relu) {
    dz_passes_stored(p, x);
  } else {
    dz_passes_recomputed(p);
  }

  auto per_channel_out = [&](const std::vector<double>& part, at::ScalarType dtype) {
    const std::vector<double> tot = combine(p.k, part);
    Tensor t = at::empty({C}, x.options().dtype(at::kDouble));
    std::copy(tot.begin(), tot.end(), t.data_ptr<double>());
    return dtype == at::kDouble ? t : t.to(dtype);
  };
  Tensor dbn_weight = need_dbnw ? per_channel_out(p.Sdyx, acc) : empty_s();
  Tensor dbn_bias = need_dbnb ? per_channel_out(p.Sdy, acc) : empty_s();
  Tensor dbias = need_db ? per_channel_out(p.Sdz, weight.scalar_type()) : empty_x();

  Tensor dweight = empty_x(), dx = empty_x();
  if (o.use_conv && (need_dw || need_dx)) {
    conv_grads<scalar_t>(g, o, x, weight, need_dx, need_dw, dx, dweight);
    return std::make_tuple(dx, dweight, dbias, dbn_weight, dbn_bias);
  }
  if (need_dw) dweight = gemm_weight_grad(g, o, weight);
  if (need_dx) dx = gemm_input_grad<scalar_t>(g, o, x);
  return std::make_tuple(dx, dweight, dbias, dbn_weight, dbn_bias);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Geom& g, Act act, const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const OptTensor& bn_weight, const Tensor& mean, const Tensor& var,
    const Tensor& preact, bool use_batch_stats, double eps, const std::vector<bool>& mask) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convmixer_gemm_block", [&] {
    return backward_impl<scalar_t>(g, act, grad_out, x, weight, bias, bn_weight, mean, var, preact,
                                   use_batch_stats, eps, mask);
  });
}

}  // namespace gemm
}  // namespace cpu
}  // namespace convmixer_kernels
