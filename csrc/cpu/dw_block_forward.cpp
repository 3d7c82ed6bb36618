// The CPU depthwise block's forward (dw_block.h; the design in dw_block.cpp): eval in one
// pass; training in channel-group order (act(z) of a group of channels for all N images in
// a thread's buffer) or image order (act(z) of every tile in a float32 cache between two
// passes).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "../common/checks.h"
#include "dw_block.h"
#include "dw_block_buffers.h"
#include "dw_block_conv.h"
#include "dw_block_stats.h"
#include "dw_block_tiles.h"

namespace convmixer_kernels {
namespace cpu {
namespace dw {
namespace {

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, Act act, bool save_preact) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const Plane g(H, W, weight.size(2));
  check_plane_fits(g);
  const int64_t kk = g.k * g.k, Cpad = (C + CB - 1) / CB * CB;
  const auto fmt = output_format(x);
  const at::Tensor wpack = pack_weights(weight, C, g.k, false);
  const std::vector<float> bpack = pad_channels(bias, C, Cpad);
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  // The saved pre-activation is read only by backward_impl, which takes any strides: float32
  // keeps it NCHW whatever x's layout (its rows go through the 8 x 8 transposing writer and
  // reader; channels_last planes of C floats per pixel cost more to write and read back);
  // other dtypes keep x's layout. The fake of dw_block_forward (ops/_block.py) says the same.
  const auto zfmt = std::is_same<scalar_t, float>::value ? at::MemoryFormat::Contiguous : fmt;
  at::Tensor preact = save_preact ? at::empty(x.sizes(), x.options().memory_format(zfmt)) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  const int64_t blocks = Cpad / CB, HWC = HW * CB, gs = g.sub(), zs = g.zsub();
  const Strides4 sx(x), so(out), sz(save_preact ? preact : out);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const float* wp = wpack.data_ptr<float>();
  Affine aff;
  if (!use_batch_stats) {
    mean.copy_(running_mean->to(at::kFloat));
    var.copy_(running_var->to(at::kFloat));
    aff = make_affine(mean, var, bn_weight, bn_bias, eps, Cpad);
  }
  std::vector<double> pmean(N * Cpad), pm2(N * Cpad);

  // Reads the tile (padded, into P), and leaves act(z) of its sub-block j at A + j * as
  // (z also to preact when saved); post(j) runs as soon as sub-block j's act(z) is there,
  // while it is still in L1.
  auto conv_act = [&](const Tile& t, int64_t b, Workspace& ws, float* A, int64_t as, auto&& post) {
    float *P = ws.P.data(), *Z = ws.Z.data();
    const int64_t nj = t.subs();
    read_tile(xp, sx, t, H, W, P + g.interior(), g.Wp, gs);
    for (int64_t j = 0; j < nj; ++j) {
      conv_tile(P + j * gs, g, wp + (b + j) * kk * CB, bpack.data() + t.c0 + j * CB, Z + j * zs, W);
      round_tile<scalar_t>(Z + j * zs, HWC);
      act_forward(act, Z + j * zs, A + j * as, HWC);
      post(j);
    }
    if (save_preact) write_tile(preact.data_ptr<scalar_t>(), sz, t, H, W, Z, W, zs);
  };
  // Per-(n, c) plane statistics of sub-block j's act(z) (at A + j * as) into pmean / pm2.
  auto plane_moments = [&](const Tile& t, int64_t j, const float* A, int64_t as) {
    double m[CB], q[CB];
    tile_moments(A + j * as, HW, m, q);
    for (int64_t cc = 0; cc < t.sub_channels(j); ++cc) {
      pmean[t.n * Cpad + t.c0 + j * CB + cc] = m[cc];
      pm2[t.n * Cpad + t.c0 + j * CB + cc] = q[cc];
    }
  };
  // OUT's sub-block j = x + act(z) * scale + shift (act(z) at A + j * as, x in P).
  auto normalise_sub = [&](const Tile& t, int64_t j, const float* P, const float* A, int64_t as, float* OUT) {
    const int64_t c0 = t.c0 + j * CB;
    const float* sc = aff.scale.data() + c0;
    const float* sh = aff.shift.data() + c0;
    const float *Pj = P + j * gs + g.interior(), *Aj = A + j * as;
    float* Yj = OUT + j * zs;
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const float* xin = Pj + (h * g.Wp + w) * CB;
        const int64_t o = (h * W + w) * CB;
#pragma omp simd
        for (int64_t cc = 0; cc < CB; ++cc) Yj[o + cc] = xin[cc] + Aj[o + cc] * sc[cc] + sh[cc];
      }
  };
  // out = x + act(z) * scale + shift for a channels_last tile straight from x(h, w, j, cc) =
  // xb[h * xh + w * xw + j * xj + cc] (the tensor or the padded tile buffer) and act(z) at A
  // + j * as: normalise_sub and write_tile in one pass, the same arithmetic (same bits).
  auto residual_out = [&](const Tile& t, const auto* xb, int64_t xh, int64_t xw, int64_t xj, const float* A,
                          int64_t as) {
    const int64_t nj = t.subs(), xbytes = t.cb * static_cast<int64_t>(sizeof(*xb));
    const float *sc = aff.scale.data() + t.c0, *sh = aff.shift.data() + t.c0;
    write_tile_cl(out.data_ptr<scalar_t>(), so, t, H, W, [&](int64_t h, int64_t w, float* v) {
      const auto* xq = xb + h * xh + w * xw;
      if (xj == CB) {  // x read from the tensor: prefetch it as read_tile does
        const char* xa = reinterpret_cast<const char*>(xq + kPrefetch * xw);
        for (int64_t l = 0; l < xbytes; l += 64) __builtin_prefetch(xa + l);
      }
      const float* a = A + (h * W + w) * CB;
      for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
        for (int64_t cc = 0; cc < CB; ++cc)
          v[j * CB + cc] = static_cast<float>(xq[j * xj + cc]) + a[j * as + cc] * sc[j * CB + cc] + sh[j * CB + cc];
    });
  };
  // out = x + act(z) * scale + shift over the tile, x read again (from the input directly
  // where both are channels_last).
  auto normalise = [&](const Tile& t, Workspace& ws, const float* A, int64_t as) {
    if (cl_tile(sx, t) && cl_tile(so, t))
      return residual_out(t, xp + t.n * sx.n + t.c0, sx.h, sx.w, int64_t(CB), A, as);
    read_tile(xp, sx, t, H, W, ws.P.data() + g.interior(), g.Wp, gs);
    for (int64_t j = 0; j < t.subs(); ++j) normalise_sub(t, j, ws.P.data(), A, as, ws.OUT.data());
    write_tile(out.data_ptr<scalar_t>(), so, t, H, W, ws.OUT.data(), W, zs);
  };

  if (!use_batch_stats) {  // eval: one pass
    for_each_tile(N, C, g, false, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
      if (cl_tile(so, t)) {  // x from the padded tile buffer
        conv_act(t, b, ws, ws.A.data(), zs, [](int64_t) {});
        return residual_out(t, static_cast<const float*>(ws.P.data() + g.interior()), g.Wp * CB, int64_t(CB), gs,
                            ws.A.data(), zs);
      }
      conv_act(t, b, ws, ws.A.data(), zs,
               [&](int64_t j) { normalise_sub(t, j, ws.P.data(), ws.A.data(), zs, ws.OUT.data()); });
      write_tile(out.data_ptr<scalar_t>(), so, t, H, W, ws.OUT.data(), W, zs);
    });
    return {out, mean, var, preact};
  }

  // Training: the normalisation needs every image's statistics, so act(z) is kept in float32
  // between the statistics step and the normalise step (act is not evaluated twice, z not
  // read through the layout-aware reader again).
  float* const mp = mean.data_ptr<float>();
  float* const vp = var.data_ptr<float>();
  // Channel c's batch statistics (to mean / var) and affine, once its planes' are known.
  const std::vector<float> gamma = bn_weight.has_value() ? pad_channels(bn_weight, C, Cpad)
                                                         : std::vector<float>(Cpad, 1.f);
  const std::vector<float> beta = pad_channels(bn_bias, C, Cpad);
  for (auto* v : {&aff.scale, &aff.shift, &aff.invstd, &aff.gamma, &aff.mean}) v->assign(Cpad, 0.f);
  auto finish_channel = [&](int64_t c) {
    const auto [m, v] = channel_stats(pmean.data(), pm2.data(), N, Cpad, c, HW);
    mp[c] = m;
    vp[c] = v;
    set_affine(aff, c, m, v, gamma[c], beta[c], eps);
  };
  // Channel-group order where there are enough channels: a thread takes a group of channels
  // (32 for channels_last: a pair of cache lines per pixel; 8 for NCHW) through all N
  // images, act(z) into its own buffer of at most 1 MiB (in L2), then the group's statistics
  // and affine, then the normalise step of each image from that buffer, instead of a round
  // trip of act(z) through memory. The arithmetic per plane and per channel is the image
  // order's below: the same bits.
  const int64_t gns = group_subs(N, C, HW, sx.c == 1, 4, int64_t(1) << 18);
  if (gns > 0) {
    const int64_t tc = gns * CB, groups = (C + tc - 1) / tc;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      Workspace ws(g, false, gns);
      Buf G(N * gns * HWC, false);  // act(z): image n, sub-block j at (n * gns + j) * HWC
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t c0 = gi * tc, cb = std::min(tc, C - c0);
        for (int64_t n = 0; n < N; ++n) {
          const Tile t{n, c0, cb};
          float* Gn = G.data() + n * gns * HWC;
          conv_act(t, c0 / CB, ws, Gn, HWC, [&](int64_t j) { plane_moments(t, j, Gn, HWC); });
        }
        for (int64_t c = c0; c < c0 + cb; ++c) finish_channel(c);
        for (int64_t n = 0; n < N; ++n) normalise(Tile{n, c0, cb}, ws, G.data() + n * gns * HWC, HWC);
      }
    });
    return {out, mean, var, preact};
  }
  // Image order (few channels, or large planes): act(z) of every tile in a cache of the
  // activation's size (tile order, contiguous) between two passes.
  at::Tensor acache = at::empty({N * blocks * HWC}, x.options().dtype(at::kFloat));
  float* const acp = acache.data_ptr<float>();
  for_each_tile(N, C, g, false, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
    float* A = acp + (t.n * blocks + b) * HWC;
    conv_act(t, b, ws, A, HWC, [&](int64_t j) { plane_moments(t, j, A, HWC); });
  });
  for (int64_t c = 0; c < C; ++c) finish_channel(c);
  for_each_tile(N, C, g, false, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
    normalise(t, ws, acp + (t.n * blocks + b) * HWC, HWC);
  });
  return {out, mean, var, preact};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, Act act, bool save_preact) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_forward_cpu", [&] {
    return forward_impl<scalar_t>(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                  use_batch_stats, eps, act, save_preact);
  });
}

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
