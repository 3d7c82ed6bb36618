// The CPU GEMM blocks' forward (gemm_blocks.h; the design in gemm_blocks.cpp): the GEMM (or
// oneDNN convolution) into the output buffer, then the fused passes: with batch statistics
// [bias + round + save preact + act + shifted sums] then [normalise + affine + store]; with
// running statistics one pass doing all of it.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <type_traits>
#include <vector>

#include "gemm_blocks.h"
#include "gemm_blocks_geom.h"
#include "gemm_blocks_passes.h"

namespace convmixer_kernels {
namespace cpu {
namespace gemm {
namespace {

// Pass 1 of the batch statistics: z -> preact (pb, when saved), a = act(z) (kept in ab
// where store_a, for pass 2: over the GEMM output, or in the output where the GEMM output
// is the saved preact), per-channel sums shifted by each channel's first activation; then
// the batch mean and biased variance into mp, vp.
template <typename scalar_t, typename acc_t>
void batch_stats_pass(const Geom& g, const Chunking& k, Act act, const ZSource<scalar_t, acc_t>& zs, const acc_t* gb,
                      scalar_t* pb, acc_t* ab, bool store_a, acc_t* mp, acc_t* vp) {
  const int64_t C = g.Cout;
  // Pass 1: z -> preact, a = act(z), shifted sums.
  // The shift (each channel's first activation) keeps sum-of-squares cancellation small.
  std::vector<double> shift(static_cast<size_t>(C));
  for (int64_t c = 0; c < C; ++c) {
    const int64_t off = k.rows ? c : c * k.L;
    const acc_t z = round_to<scalar_t>(zs.bias ? gb[off] + zs.bias[c] : gb[off]);
    acc_t a;
    act_fwd(act, &z, &a, 1);
    shift[c] = static_cast<double>(a);
  }
  std::vector<double> S(static_cast<size_t>(k.nparts)), SS(static_cast<size_t>(k.nparts));
  run_chunks<acc_t>(k, 2, [&](int64_t off, int64_t len, int64_t c, int64_t slot, acc_t* scratch) {
    const acc_t* z = zs.get(off, len, c, scratch);
    if (pb) store(pb + off, z, len);
    acc_t* a = store_a ? ab + off : scratch + k.max_len;
    act_fwd(act, z, a, len);  // z may be a itself (in-place activation)
    if (c >= 0) {
      sum_shifted_sq(a, len, shift[c], &S[slot], &SS[slot]);
    } else {
      double* __restrict__ s = &S[slot];
      double* __restrict__ ss = &SS[slot];
      const double* __restrict__ sh = shift.data();
      for (int64_t cc = 0; cc < C; ++cc) s[cc] = ss[cc] = 0.0;
      for (int64_t r = 0; r < len / C; ++r) {
        const acc_t* __restrict__ ar = a + r * C;
        for (int64_t cc = 0; cc < C; ++cc) {
          const double v = static_cast<double>(ar[cc]) - sh[cc];
          s[cc] += v;
          ss[cc] += v * v;
        }
      }
    }
  });
  const std::vector<double> St = combine(k, S), SSt = combine(k, SS);
  const double inv_m = 1.0 / static_cast<double>(g.M);
  for (int64_t c = 0; c < C; ++c) {
    const double dm = St[c] * inv_m;
    mp[c] = static_cast<acc_t>(shift[c] + dm);
    vp[c] = static_cast<acc_t>(std::max(0.0, SSt[c] * inv_m - dm * dm));
  }
}

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(
    const Geom& g, Act act, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool use_batch_stats, double eps, bool save_preact) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const int64_t C = g.Cout;

  Tensor out, buf;
  // The convolution adds the bias (z in buf); with a saved preact, buf is that preact and
  // the output gets its own buffer (pass 1 stores a there), instead of a copy of z.
  const bool z_in_buf = conv_adds_bias(g, acc, x.scalar_type());
  const bool preact_is_buf = z_in_buf && save_preact;
  if (conv_gemm(g, acc)) {
    buf = conv_forward(g, conv_input(x), weight, z_in_buf ? bias : OptTensor());
    out = kSame && !preact_is_buf ? buf : at::empty(out_sizes(g), x.options().memory_format(g.fmt));
  } else {
    out = at::empty(out_sizes(g), x.options().memory_format(g.fmt));
    buf = kSame ? out : at::empty(out_sizes(g), x.options().dtype(acc).memory_format(g.fmt));
    Tensor P = patch_matrix(g, x, acc);
    Tensor Wm = weight_matrix(g, weight, acc);
    gemm_forward(g, P, Wm, buf);
  }
  Tensor preact = preact_is_buf ? buf
                 : save_preact ? at::empty(out_sizes(g), x.options().memory_format(g.fmt))
                               : at::empty({0}, x.options());

  const std::vector<acc_t> bias_v = channel_values<acc_t>(bias, C, acc_t(0));
  const std::vector<acc_t> w_v = channel_values<acc_t>(bn_weight, C, acc_t(1));
  const std::vector<acc_t> b_v = channel_values<acc_t>(bn_bias, C, acc_t(0));

  const Chunking k = make_chunking(g);
  acc_t* gb = buf.data_ptr<acc_t>();
  scalar_t* ob = out.data_ptr<scalar_t>();
  scalar_t* pb = save_preact && !preact_is_buf ? preact.data_ptr<scalar_t>() : nullptr;
  // Where a is stored between the passes: over the GEMM output, or (kSame) in the output.
  acc_t* ab = preact_is_buf ? reinterpret_cast<acc_t*>(ob) : gb;
  ZSource<scalar_t, acc_t> zs;
  zs.gemm = gb;
  zs.bias = present(bias) && !z_in_buf ? bias_v.data() : nullptr;
  zs.C = C;

  Tensor mean = at::empty({C}, x.options().dtype(acc));
  Tensor var = at::empty({C}, x.options().dtype(acc));
  acc_t* mp = mean.data_ptr<acc_t>();
  acc_t* vp = var.data_ptr<acc_t>();

  // Batch statistics take two passes over the GEMM output. An expensive activation
  // (gelu) is evaluated once: pass 1 stores a over the GEMM output for pass 2. A cheap
  // one (relu) is recomputed in pass 2 instead, which moves less memory.
  const bool store_a = act != Act::Relu;
  if (use_batch_stats) {
    batch_stats_pass<scalar_t, acc_t>(g, k, act, zs, gb, pb, ab, store_a, mp, vp);
  } else {
    TORCH_CHECK(present(running_mean) && present(running_var),
                "running_mean, running_var: required when use_batch_stats is False");
    mean.copy_(*running_mean);
    var.copy_(*running_var);
  }

  std::vector<acc_t> invstd(static_cast<size_t>(C));
  const acc_t eps_a = static_cast<acc_t>(eps);
  for (int64_t c = 0; c < C; ++c) invstd[c] = acc_t(1) / std::sqrt(vp[c] + eps_a);

  // y = (a - mean) * invstd * w + b, rounded once to scalar_t.
  auto normalise = [&](const acc_t* a, scalar_t* y, int64_t len, int64_t c) {
    if (c >= 0) {
      const acc_t m = mp[c], is = invstd[c], w = w_v[c], b = b_v[c];
      if (kSame && static_cast<const void*>(a) == static_cast<const void*>(y)) {
        acc_t* io = reinterpret_cast<acc_t*>(y);
        for (int64_t i = 0; i < len; ++i) io[i] = (io[i] - m) * is * w + b;
      } else {
        for (int64_t i = 0; i < len; ++i) y[i] = static_cast<scalar_t>((a[i] - m) * is * w + b);
      }
    } else {
      const acc_t* __restrict__ m = mp;
      const acc_t* __restrict__ is = invstd.data();
      const acc_t* __restrict__ w = w_v.data();
      const acc_t* __restrict__ b = b_v.data();
      if (kSame && static_cast<const void*>(a) == static_cast<const void*>(y)) {
        acc_t* io = reinterpret_cast<acc_t*>(y);
        for (int64_t r = 0; r < len / C; ++r) {
          acc_t* row = io + r * C;
          for (int64_t cc = 0; cc < C; ++cc) row[cc] = (row[cc] - m[cc]) * is[cc] * w[cc] + b[cc];
        }
      } else {
        for (int64_t r = 0; r < len / C; ++r) {
          const acc_t* ar = a + r * C;
          scalar_t* yr = y + r * C;
          for (int64_t cc = 0; cc < C; ++cc)
            yr[cc] = static_cast<scalar_t>((ar[cc] - m[cc]) * is[cc] * w[cc] + b[cc]);
        }
      }
    }
  };

  if (use_batch_stats && store_a) {
    // Pass 2: normalise the stored activations.
    run_chunks<acc_t>(k, 0, [&](int64_t off, int64_t len, int64_t c, int64_t, acc_t*) {
      normalise(ab + off, ob + off, len, c);
    });
  } else {
    // Running statistics: one pass z -> preact, act, normalise (with batch statistics and a
    // cheap activation: pass 2, recomputing act(z); the preact was stored by pass 1).
    const scalar_t* pb2 = use_batch_stats ? nullptr : pb;
    run_chunks<acc_t>(k, 2, [&](int64_t off, int64_t len, int64_t c, int64_t, acc_t* scratch) {
      const acc_t* z = zs.get(off, len, c, scratch);
      if (pb2) store(pb + off, z, len);
      acc_t* a = scratch + k.max_len;
      act_fwd(act, z, a, len);
      normalise(a, ob + off, len, c);
    });
  }
  return std::make_tuple(out, mean, var, preact);
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(
    const Geom& g, Act act, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool use_batch_stats, double eps, bool save_preact) {
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convmixer_gemm_block", [&] {
    return forward_impl<scalar_t>(g, act, x, weight, bias, bn_weight, bn_bias, running_mean,
                                  running_var, use_batch_stats, eps, save_preact);
  });
}

}  // namespace gemm
}  // namespace cpu
}  // namespace convmixer_kernels
