// Batch-norm statistics of the CPU depthwise kernels: per-(n, c) plane moments of a tile,
// their combination over n in a fixed order, and the per-channel affine of the
// normalisation (padded to whole CB-channel blocks).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>
#include <utility>
#include <vector>

#include "dw_block_tiles.h"

namespace convmixer_kernels {
namespace cpu {
namespace dw {

// Per-channel vectors padded to whole tiles (blocks * CB entries, zeros past C).
struct Affine {
  std::vector<float> scale, shift, invstd, gamma, mean;
};

// Channel c's entries from its mean, variance, BN weight (gamma) and bias (beta).
inline void set_affine(Affine& a, int64_t c, float mean, float var, float gamma, float beta, double eps) {
  const float invstd = 1.0f / std::sqrt(var + static_cast<float>(eps));
  a.invstd[c] = invstd;
  a.gamma[c] = gamma;
  a.mean[c] = mean;
  a.scale[c] = invstd * gamma;
  a.shift[c] = beta - mean * invstd * gamma;
}

inline Affine make_affine(const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_w,
                   const c10::optional<at::Tensor>& bn_b, double eps, int64_t padded) {
  const int64_t C = mean.numel();
  Affine a;
  a.scale.assign(padded, 0.f);
  a.shift.assign(padded, 0.f);
  a.invstd.assign(padded, 0.f);
  a.gamma.assign(padded, 0.f);
  a.mean.assign(padded, 0.f);
  const at::Tensor mf = mean.to(at::kFloat).contiguous(), vf = var.to(at::kFloat).contiguous();
  const float* m = mf.data_ptr<float>();
  const float* v = vf.data_ptr<float>();
  at::Tensor wf = bn_w.has_value() ? bn_w->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bf = bn_b.has_value() ? bn_b->to(at::kFloat).contiguous() : at::Tensor();
  for (int64_t c = 0; c < C; ++c)
    set_affine(a, c, m[c], v[c], wf.defined() ? wf.data_ptr<float>()[c] : 1.0f,
               bf.defined() ? bf.data_ptr<float>()[c] : 0.0f, eps);
  return a;
}

// Batch mean and biased variance of channel c from its per-(n, c) means and M2s (entry
// n * stride + c, planes of `count` pixels), combined over n in a fixed order (Chan et al.).
inline std::pair<float, float> channel_stats(const double* pmean, const double* pm2, int64_t N, int64_t stride,
                                             int64_t c, int64_t count) {
  double mu = 0.0, M2 = 0.0, n_acc = 0.0;
  for (int64_t n = 0; n < N; ++n) {
    const double nb = static_cast<double>(count), mb = pmean[n * stride + c], m2b = pm2[n * stride + c];
    const double tot = n_acc + nb, delta = mb - mu;
    mu += delta * nb / tot;
    M2 += m2b + delta * delta * n_acc * nb / tot;
    n_acc = tot;
  }
  return {static_cast<float>(mu), static_cast<float>(M2 / n_acc)};
}

// Per-channel mean and M2 of an interleaved tile buffer of n pixels (double, fixed order).
inline void tile_moments(const float* a, int64_t n, double* mean, double* m2) {
  double s[CB] = {0.0}, q[CB] = {0.0};
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t cc = 0; cc < CB; ++cc) s[cc] += a[i * CB + cc];
  for (int64_t cc = 0; cc < CB; ++cc) mean[cc] = s[cc] / static_cast<double>(n);
  for (int64_t i = 0; i < n; ++i)
#pragma omp simd
    for (int64_t cc = 0; cc < CB; ++cc) {
      const double d = a[i * CB + cc] - mean[cc];
      q[cc] += d * d;
    }
  for (int64_t cc = 0; cc < CB; ++cc) m2[cc] = q[cc];
}

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
