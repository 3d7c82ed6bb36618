// The CPU depthwise block's backward (dw_block.h; the design in dw_block.cpp): per-(n, c)
// sums of dy and dy * xhat, then dz, the bias and weight gradients and dx = conv(dz, flipped
// w) + dy, in channel-group order (act(z), act'(z) and dy of a group kept in a thread's
// buffers) or image order (two passes, each loading z and dy).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
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
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact_in, bool use_batch_stats, double eps, Act act, const std::vector<bool>& mask) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const Plane g(H, W, weight.size(2));
  check_plane_fits(g);
  const int64_t k = g.k, kk = k * k, blocks = (C + CB - 1) / CB, Cpad = blocks * CB, HWC = HW * CB, gs = g.sub(),
                zs = g.zsub();
  const Affine aff = make_affine(mean, var, bn_weight, c10::nullopt, eps, Cpad);
  const at::Tensor wpack = pack_weights(weight, C, k, false), wflip = pack_weights(weight, C, k, true);
  const std::vector<float> bpack = pad_channels(bias, C, Cpad), zeros(Cpad, 0.f);
  const bool need_dx = mask[0], need_dw = mask[1], need_db = mask[2], need_dbnw = mask[3], need_dbnb = mask[4];
  const auto fmt = output_format(x);
  const auto fopt = x.options().dtype(at::kFloat);
  const Strides4 sx(x), sg(grad_out);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = grad_out.data_ptr<scalar_t>();
  const bool have_z = preact_in.numel() > 0;

  // Loads the tile's x (padded; only where needed: z needs it unless saved) and z.
  auto load_xz = [&](const Tile& t, int64_t b, float* P, float* Z, bool need_x) {
    if (need_x || !have_z) read_tile(xp, sx, t, H, W, P + g.interior(), g.Wp, gs);
    if (have_z) {
      read_tile(preact_in.data_ptr<scalar_t>(), Strides4(preact_in), t, H, W, Z, W, zs);
      return;
    }
    for (int64_t j = 0; j < t.subs(); ++j)
      conv_tile(P + j * gs, g, wpack.data_ptr<float>() + (b + j) * kk * CB, bpack.data() + t.c0 + j * CB,
                Z + j * zs, W);
    for (int64_t j = 0; j < t.subs(); ++j) round_tile<scalar_t>(Z + j * zs, HWC);
  };

  // Per-(n, c) sums of dy and dy * xhat over the tile (act(z) of sub-block j at A + j * zs,
  // dy at DY + j * zs).
  std::vector<double> psum_dy(N * Cpad), psum_dyx(N * Cpad);
  auto plane_sums = [&](const Tile& t, const float* A, const float* DY) {
    for (int64_t j = 0; j < t.subs(); ++j) {
      const int64_t c0 = t.c0 + j * CB;
      const float* mu = aff.mean.data() + c0;
      const float* is = aff.invstd.data() + c0;
      const float *dyj = DY + j * zs, *aj = A + j * zs;
      double s[CB] = {0.0}, sx2[CB] = {0.0};
      for (int64_t i = 0; i < HW; ++i)
#pragma omp simd
        for (int64_t cc = 0; cc < CB; ++cc) {
          const float dy = dyj[i * CB + cc];
          s[cc] += dy;
          sx2[cc] += static_cast<double>(dy * ((aj[i * CB + cc] - mu[cc]) * is[cc]));
        }
      for (int64_t cc = 0; cc < CB; ++cc) {
        psum_dy[t.n * Cpad + c0 + cc] = s[cc];
        psum_dyx[t.n * Cpad + c0 + cc] = sx2[cc];
      }
    }
  };
  // Channel c's sums over n (in order) and the per-channel factors of dz.
  std::vector<double> sum_dy(Cpad, 0.0), sum_dyx(Cpad, 0.0);
  const double count = static_cast<double>(N * HW);
  std::vector<float> mdy(Cpad, 0.f), mdyx(Cpad, 0.f), s1(Cpad, 0.f);
  auto channel_sums = [&](int64_t c) {
    for (int64_t n = 0; n < N; ++n) {
      sum_dy[c] += psum_dy[n * Cpad + c];
      sum_dyx[c] += psum_dyx[n * Cpad + c];
    }
    if (use_batch_stats) {
      mdy[c] = static_cast<float>(sum_dy[c] / count);
      mdyx[c] = static_cast<float>(sum_dyx[c] / count);
    }
    s1[c] = aff.gamma[c] * aff.invstd[c];
  };

  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  std::vector<double> pdw(need_dw ? N * Cpad * kk : 0, 0.0), pdb(N * Cpad, 0.0);
  const Strides4 sdx(need_dx ? dx : x);
  // dz = act'(z) * gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat)) over the tile
  // (sub-block j's act(z), act'(z) and dy at A, D, DY + j * zs; D is overwritten with dz),
  // then the bias and weight gradient partial sums and dx = conv(dz, flipped w) + dy. P holds
  // the padded x where the weight gradient is needed.
  auto grad_tile = [&](const Tile& t, int64_t b, Workspace& ws, const float* A, float* D, const float* DY) {
    float *P = ws.P.data(), *DZ = ws.DZ.data(), *OUT = ws.OUT.data();
    const int64_t nj = t.subs();
    for (int64_t j = 0; j < nj; ++j) {
      const int64_t c0 = t.c0 + j * CB;
      const float *mu = aff.mean.data() + c0, *is = aff.invstd.data() + c0, *sc = s1.data() + c0,
                  *m1 = mdy.data() + c0, *m2 = mdyx.data() + c0;
      const float *Aj = A + j * zs, *DYj = DY + j * zs;
      float *Dj = D + j * zs, *DZj = DZ + j * gs;
      double db[CB] = {0.0};
      for (int64_t h = 0; h < H; ++h)
        for (int64_t w = 0; w < W; ++w) {
          const int64_t i = (h * W + w) * CB;
          float* dzp = DZj + g.interior() + (h * g.Wp + w) * CB;
#pragma omp simd
          for (int64_t cc = 0; cc < CB; ++cc) {
            const float xhat = (Aj[i + cc] - mu[cc]) * is[cc];
            const float dz = Dj[i + cc] * sc[cc] * (DYj[i + cc] - m1[cc] - xhat * m2[cc]);
            Dj[i + cc] = dz;
            dzp[cc] = dz;
            db[cc] += dz;
          }
        }
      for (int64_t cc = 0; cc < CB; ++cc) pdb[t.n * Cpad + c0 + cc] = db[cc];
      if (need_dw) wgrad_tile(P + j * gs, g, Dj, pdw.data() + (t.n * blocks + b + j) * kk * CB);
      if (need_dx) conv_tile(DZj, g, wflip.data_ptr<float>() + (b + j) * kk * CB, zeros.data(), OUT + j * zs, W);
    }
    if (need_dx && cl_tile(sdx, t)) {  // dx = conv + dy, written straight from the two
      write_tile_cl(dx.data_ptr<scalar_t>(), sdx, t, H, W, [&](int64_t h, int64_t w, float* v) {
        const int64_t i = (h * W + w) * CB;
        for (int64_t j = 0; j < nj; ++j)
#pragma omp simd
          for (int64_t cc = 0; cc < CB; ++cc) v[j * CB + cc] = OUT[j * zs + i + cc] + DY[j * zs + i + cc];
      });
    } else if (need_dx) {
      for (int64_t j = 0; j < nj; ++j)
        for (int64_t i = 0; i < HWC; ++i) OUT[j * zs + i] += DY[j * zs + i];
      write_tile(dx.data_ptr<scalar_t>(), sdx, t, H, W, OUT, W, zs);
    }
  };
  const bool grads = need_dx || need_dw || need_db;

  // Three buffers of up to 4 MiB per thread; channels_last groups of up to 32 channels (a
  // pair of cache lines per pixel; 64 and 16 measured slower).
  const int64_t gns = group_subs(N, C, HW, sx.c == 1, 4, int64_t(1) << 20);
  if (gns > 0) {
    // Channel-group order: a thread takes a group of channels through all N images, keeping
    // their act(z), act'(z) and dy in its own buffers between the two steps, so that z is
    // read (or recomputed), dy read and the activation evaluated once per element instead of
    // twice. The arithmetic per plane and per channel is the image order's: the same bits.
    const int64_t tc = gns * CB, groups = (C + tc - 1) / tc, per_n = gns * zs;
    at::parallel_for(0, groups, 1, [&](int64_t begin, int64_t end) {
      Workspace ws(g, true, gns);
      Buf GA(N * per_n, false), GD(N * per_n, false), GDY(N * per_n, false);
      for (int64_t gi = begin; gi < end; ++gi) {
        const int64_t c0 = gi * tc, cb = std::min(tc, C - c0), b = c0 / CB;
        for (int64_t n = 0; n < N; ++n) {
          const Tile t{n, c0, cb};
          float *A = GA.data() + n * per_n, *D = GD.data() + n * per_n, *DY = GDY.data() + n * per_n;
          load_xz(t, b, ws.P.data(), ws.Z.data(), false);
          read_tile(gp, sg, t, H, W, DY, W, zs);
          for (int64_t j = 0; j < t.subs(); ++j) act_forward_deriv(act, ws.Z.data() + j * zs, A + j * zs, D + j * zs, HWC);
          plane_sums(t, A, DY);
        }
        for (int64_t c = c0; c < std::min(c0 + tc, Cpad); ++c) channel_sums(c);
        if (!grads) continue;
        for (int64_t n = 0; n < N; ++n) {
          const Tile t{n, c0, cb};
          if (need_dw) read_tile(xp, sx, t, H, W, ws.P.data() + g.interior(), g.Wp, gs);
          grad_tile(t, b, ws, GA.data() + n * per_n, GD.data() + n * per_n, GDY.data() + n * per_n);
        }
      }
    });
  } else {
    // Image order (too few channel groups to share among the threads, or large planes): pass 1
    // the sums, pass 2 the gradients, each loading z and dy and evaluating the activation.
    for_each_tile(N, C, g, true, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
      float *Z = ws.Z.data(), *DY = ws.DY.data();
      load_xz(t, b, ws.P.data(), Z, false);
      read_tile(gp, sg, t, H, W, DY, W, zs);
      for (int64_t j = 0; j < t.subs(); ++j) act_forward(act, Z + j * zs, Z + j * zs, HWC);
      plane_sums(t, Z, DY);
    });
    for (int64_t c = 0; c < Cpad; ++c) channel_sums(c);
    if (grads)
      for_each_tile(N, C, g, true, sx.c == 1, [&](const Tile& t, int64_t b, Workspace& ws) {
        float *A = ws.A.data(), *D = ws.D.data(), *DY = ws.DY.data();
        load_xz(t, b, ws.P.data(), ws.Z.data(), need_dw);
        read_tile(gp, sg, t, H, W, DY, W, zs);
        for (int64_t j = 0; j < t.subs(); ++j) act_forward_deriv(act, ws.Z.data() + j * zs, A + j * zs, D + j * zs, HWC);
        grad_tile(t, b, ws, A, D, DY);
      });
  }

  auto empty = [&]() { return at::empty({0}, x.options()); };
  at::Tensor dweight = empty(), dbias = empty(), dbnw = at::empty({0}, fopt), dbnb = at::empty({0}, fopt);
  if (need_dw) {  // pdw: (N, blocks, k*k, CB) -> (C, 1, k, k), summed over n in order
    at::Tensor acc = at::zeros({blocks, kk, CB}, x.options().dtype(at::kDouble));
    double* a = acc.data_ptr<double>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < blocks * kk * CB; ++i) a[i] += pdw[n * blocks * kk * CB + i];
    dweight = acc.transpose(1, 2).reshape({Cpad, kk}).narrow(0, 0, C).reshape({C, 1, k, k})
                  .to(weight.scalar_type()).contiguous();
  }
  auto per_channel = [&](const std::vector<double>& v, at::ScalarType st) {
    at::Tensor t = at::empty({C}, x.options().dtype(at::kDouble));
    std::copy(v.begin(), v.begin() + C, t.data_ptr<double>());
    return t.to(st);
  };
  if (need_db) {
    std::vector<double> acc(Cpad, 0.0);
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < Cpad; ++c) acc[c] += pdb[n * Cpad + c];
    dbias = per_channel(acc, weight.scalar_type());
  }
  if (need_dbnw) dbnw = per_channel(sum_dyx, at::kFloat);
  if (need_dbnb) dbnb = per_channel(sum_dy, at::kFloat);
  if (!need_dx) dx = empty();
  return {dx, dweight, dbias, dbnw, dbnb};
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact, bool use_batch_stats, double eps, Act act, const std::vector<bool>& mask) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_backward_cpu", [&] {
    return backward_impl<scalar_t>(grad_out, x, weight, bias, bn_weight, mean, var, preact, use_batch_stats, eps,
                                   act, mask);
  });
}

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
