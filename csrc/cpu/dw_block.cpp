// Fused CPU kernels of the residual depthwise block
//   out = x + BN(act(dwconv_k(x) + b)),  k odd, 'same' zero padding
// registered as the CPU implementation of convmixer_kernels::dw_block_{forward,backward}_kernel
// (schemas in csrc/extension.cpp, semantics in convmixer_kernels/reference.py).
//
// Work unit: a tile of CB channels of one image. Each tile is read once, in the loop
// order its strides favour (NCHW rows, or CB contiguous channels per pixel for
// channels_last; any strided view works), into zero-padded float32 planes that stay in
// L2; the k x k taps then run branch-free over each plane, vectorised along W with WB
// outputs held in registers across all taps (AVX2+FMA where the build machine has it).
// Results go back through the same layout-aware tile writer. Statistics and weight
// gradients are reduced per (n, c) plane and then over n in a fixed order, so results do
// not depend on the number of threads (deterministic for a given input).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#if defined(__AVX2__)
#include <immintrin.h>
#endif
#include <cmath>
#include <vector>

#include "activation.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

constexpr int64_t WB = 32;  // outputs per register block along W (4 AVX2 vectors)
constexpr int64_t CB = 16;  // channels per tile

// Geometry of one padded plane buffer.
struct Plane {
  int64_t H, W, k, p;
  int64_t Wp;  // row stride: round_up(W, WB) + 2p (register blocks may read past W)
  int64_t Hp;  // rows: H + 2p
  Plane(int64_t H_, int64_t W_, int64_t k_) : H(H_), W(W_), k(k_), p(k_ / 2) {
    Wp = (W + WB - 1) / WB * WB + 2 * p;
    Hp = H + 2 * p;
  }
  int64_t size() const { return Hp * Wp; }
  int64_t interior(int64_t h) const { return (h + p) * Wp + p; }  // offset of element (h, 0)
};

struct Strides4 {
  int64_t n, c, h, w;
  explicit Strides4(const at::Tensor& t) : n(t.stride(0)), c(t.stride(1)), h(t.stride(2)), w(t.stride(3)) {}
};

// A tile: channels [c0, c0 + cb) of image n; plane cc of a tile buffer starts at cc * plane,
// element (h, w) of it at offset(h) + w.
struct Tile {
  int64_t n, c0, cb;
};

template <typename scalar_t>
inline float round_to(float v) {  // the value a float32 has once stored in scalar_t
  return static_cast<float>(static_cast<scalar_t>(v));
}

// dst[cc * plane + row0 + h * rs + w] = src[n, c0 + cc, h, w] for the tile.
template <typename scalar_t>
void read_tile(const scalar_t* src, const Strides4& s, const Tile& t, int64_t H, int64_t W, float* dst,
               int64_t plane, int64_t row0, int64_t rs) {
  const scalar_t* base = src + t.n * s.n + t.c0 * s.c;
  if (s.c == 1 && s.w != 1) {  // channels_last: CB contiguous channels per pixel
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const scalar_t* px = base + h * s.h + w * s.w;
        float* d = dst + row0 + h * rs + w;
        for (int64_t cc = 0; cc < t.cb; ++cc) d[cc * plane] = static_cast<float>(px[cc]);
      }
    return;
  }
  for (int64_t cc = 0; cc < t.cb; ++cc)
    for (int64_t h = 0; h < H; ++h) {
      const scalar_t* in = base + cc * s.c + h * s.h;
      float* d = dst + cc * plane + row0 + h * rs;
      if (s.w == 1) {
        for (int64_t w = 0; w < W; ++w) d[w] = static_cast<float>(in[w]);
      } else {
        for (int64_t w = 0; w < W; ++w) d[w] = static_cast<float>(in[w * s.w]);
      }
    }
}

// The inverse of read_tile (rounding to scalar_t).
template <typename scalar_t>
void write_tile(scalar_t* dst, const Strides4& s, const Tile& t, int64_t H, int64_t W, const float* src,
                int64_t plane, int64_t row0, int64_t rs) {
  scalar_t* base = dst + t.n * s.n + t.c0 * s.c;
  if (s.c == 1 && s.w != 1) {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        scalar_t* px = base + h * s.h + w * s.w;
        const float* v = src + row0 + h * rs + w;
        for (int64_t cc = 0; cc < t.cb; ++cc) px[cc] = static_cast<scalar_t>(v[cc * plane]);
      }
    return;
  }
  for (int64_t cc = 0; cc < t.cb; ++cc)
    for (int64_t h = 0; h < H; ++h) {
      scalar_t* out = base + cc * s.c + h * s.h;
      const float* v = src + cc * plane + row0 + h * rs;
      if (s.w == 1) {
        for (int64_t w = 0; w < W; ++w) out[w] = static_cast<scalar_t>(v[w]);
      } else {
        for (int64_t w = 0; w < W; ++w) out[w * s.w] = static_cast<scalar_t>(v[w]);
      }
    }
}

// Register block of ROWS output rows x WB columns:
// acc[r * WB + v] = bias + sum_{i,j} P[h + r + i][w0 + v + j] * wt[i * k + j].
// Two rows give 8 independent FMA chains: enough to hide the FMA latency on AVX2 cores.
template <int ROWS>
inline void conv_block(const float* P, int64_t Wp, int64_t k, const float* wt, float bias,
                       int64_t h, int64_t w0, float* acc) {
#if defined(__AVX2__) && defined(__FMA__)
  static_assert(WB == 32, "the AVX2 block holds 4 vectors of 8 floats per row");
  __m256 a[ROWS][4];
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v) a[r][v] = _mm256_set1_ps(bias);
  for (int64_t i = 0; i < k; ++i) {
    const float* row = P + (h + i) * Wp + w0;
    const float* wrow = wt + i * k;
    for (int64_t j = 0; j < k; ++j) {
      const __m256 wv = _mm256_broadcast_ss(wrow + j);
      for (int r = 0; r < ROWS; ++r) {
        const float* rr = row + r * Wp + j;
        for (int v = 0; v < 4; ++v) a[r][v] = _mm256_fmadd_ps(_mm256_loadu_ps(rr + 8 * v), wv, a[r][v]);
      }
    }
  }
  for (int r = 0; r < ROWS; ++r)
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(acc + r * WB + 8 * v, a[r][v]);
#else
  for (int64_t v = 0; v < ROWS * WB; ++v) acc[v] = bias;
  for (int r = 0; r < ROWS; ++r)
    for (int64_t i = 0; i < k; ++i) {
      const float* row = P + (h + r + i) * Wp + w0;
      for (int64_t j = 0; j < k; ++j) {
        const float wv = wt[i * k + j];
#pragma omp simd
        for (int64_t v = 0; v < WB; ++v) acc[r * WB + v] += row[v + j] * wv;
      }
    }
#endif
}

// out[h * W + w] = bias + sum_{i,j} P[h + i][w + j] * wt[i * k + j]: 'same' conv of one padded plane.
void conv_plane(const float* P, const Plane& g, const float* wt, float bias, float* out) {
  float acc[2 * WB];
  for (int64_t w0 = 0; w0 < g.W; w0 += WB) {
    const int64_t nw = std::min(WB, g.W - w0);
    int64_t h = 0;
    for (; h + 2 <= g.H; h += 2) {
      conv_block<2>(P, g.Wp, g.k, wt, bias, h, w0, acc);
      std::copy(acc, acc + nw, out + h * g.W + w0);
      std::copy(acc + WB, acc + WB + nw, out + (h + 1) * g.W + w0);
    }
    if (h < g.H) {
      conv_block<1>(P, g.Wp, g.k, wt, bias, h, w0, acc);
      std::copy(acc, acc + nw, out + h * g.W + w0);
    }
  }
}

// dw[i * k + j] += sum_{h,w} D[h][w] * P[h + i][w + j]; D has rows of round_up(W, WB)
// floats, zero beyond W, so whole register blocks can be used.
void wgrad_plane(const float* P, const Plane& g, const float* D, double* dw) {
  const int64_t k = g.k, Wr = g.Wp - 2 * g.p;
  for (int64_t i = 0; i < k; ++i)
    for (int64_t j = 0; j < k; ++j) {
      float acc[WB] = {0.f};
      for (int64_t h = 0; h < g.H; ++h) {
        const float* prow = P + (h + i) * g.Wp + j;
        const float* drow = D + h * Wr;
        for (int64_t w0 = 0; w0 < Wr; w0 += WB) {
#pragma omp simd
          for (int64_t v = 0; v < WB; ++v) acc[v] += drow[w0 + v] * prow[w0 + v];
        }
      }
      double total = 0.0;
      for (int64_t v = 0; v < WB; ++v) total += acc[v];
      dw[i * k + j] += total;
    }
}

// Per-channel normalisation as an affine map of the activation: y = a * scale + shift.
struct Affine {
  std::vector<float> scale, shift, invstd, gamma;
};

Affine make_affine(const at::Tensor& mean, const at::Tensor& var, const c10::optional<at::Tensor>& bn_w,
                   const c10::optional<at::Tensor>& bn_b, double eps) {
  const int64_t C = mean.numel();
  Affine a;
  a.scale.resize(C);
  a.shift.resize(C);
  a.invstd.resize(C);
  a.gamma.resize(C);
  const float* m = mean.data_ptr<float>();
  const float* v = var.data_ptr<float>();
  at::Tensor wf = bn_w.has_value() ? bn_w->to(at::kFloat).contiguous() : at::Tensor();
  at::Tensor bf = bn_b.has_value() ? bn_b->to(at::kFloat).contiguous() : at::Tensor();
  for (int64_t c = 0; c < C; ++c) {
    const float invstd = 1.0f / std::sqrt(v[c] + static_cast<float>(eps));
    const float gamma = wf.defined() ? wf.data_ptr<float>()[c] : 1.0f;
    const float beta = bf.defined() ? bf.data_ptr<float>()[c] : 0.0f;
    a.invstd[c] = invstd;
    a.gamma[c] = gamma;
    a.scale[c] = invstd * gamma;
    a.shift[c] = beta - m[c] * invstd * gamma;
  }
  return a;
}

void check_inputs(const at::Tensor& x, const at::Tensor& weight, const char* where) {
  TORCH_CHECK(x.device().is_cpu(), where, ": x must be a CPU tensor, got ", x.device());
  TORCH_CHECK(x.dim() == 4, where, ": x must be 4-D (N, C, H, W), got ", x.sizes());
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, where,
              ": x must be float32, bfloat16 or float16 (float64 runs on the reference backend), got ", st);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              where, ": weight must be (C, 1, k, k) with k odd and C = x.size(1), got ", weight.sizes());
}

at::MemoryFormat output_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// Per-plane mean and M2 (sum of squared deviations) combined over n in a fixed order
// (Chan et al.), giving per-channel batch mean and biased variance.
void finalize_stats(const std::vector<double>& pmean, const std::vector<double>& pm2, int64_t N, int64_t C,
                    int64_t count, at::Tensor& mean, at::Tensor& var) {
  float* m = mean.data_ptr<float>();
  float* v = var.data_ptr<float>();
  for (int64_t c = 0; c < C; ++c) {
    double mu = 0.0, M2 = 0.0, n_acc = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const double nb = static_cast<double>(count), mb = pmean[n * C + c], m2b = pm2[n * C + c];
      const double tot = n_acc + nb, delta = mb - mu;
      mu += delta * nb / tot;
      M2 += m2b + delta * delta * n_acc * nb / tot;
      n_acc = tot;
    }
    m[c] = static_cast<float>(mu);
    v[c] = static_cast<float>(M2 / n_acc);
  }
}

// Scratch buffers of one thread, allocated (and zeroed) once per parallel chunk: padded
// buffers keep their zero borders because tiles only ever write their interiors.
struct Workspace {
  std::vector<float> P, Z, A, D, DY, DZ, OUT;
  Workspace(const Plane& g, int64_t HW, bool backward)
      : P(CB * g.size(), 0.f), Z(CB * HW), A(2 * HW, 0.f), D(g.H * (g.Wp - 2 * g.p), 0.f),
        DY(backward ? CB * HW : 0), DZ(backward ? g.size() : 0, 0.f), OUT(backward ? CB * HW : 0) {}
};

// Runs fn(tile, workspace) for every (n, channel block) tile, in parallel.
template <typename Fn>
void for_each_tile(int64_t N, int64_t C, const Plane& g, bool backward, Fn fn) {
  const int64_t blocks = (C + CB - 1) / CB;
  at::parallel_for(0, N * blocks, 1, [&](int64_t begin, int64_t end) {
    Workspace ws(g, g.H * g.W, backward);
    for (int64_t t = begin; t < end; ++t) {
      const int64_t n = t / blocks, c0 = (t % blocks) * CB;
      fn(Tile{n, c0, std::min(CB, C - c0)}, ws);
    }
  });
}

// Sum and sum of squared deviations of a[0..n) (double, fixed order per build).
inline void plane_moments(const float* a, int64_t n, double& mean, double& m2) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i];
  mean = s / static_cast<double>(n);
  const double mu = mean;
  double q = 0.0;
#pragma omp simd reduction(+ : q)
  for (int64_t i = 0; i < n; ++i) q += (a[i] - mu) * (a[i] - mu);
  m2 = q;
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward_impl(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, Act act, bool save_preact) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const Plane g(H, W, weight.size(2));
  const int64_t kk = g.k * g.k;
  const auto fmt = output_format(x);
  const at::Tensor wt = weight.to(at::kFloat).contiguous();
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::zeros({C}, x.options().dtype(at::kFloat));
  at::Tensor out = at::empty(x.sizes(), x.options().memory_format(fmt));
  at::Tensor preact = save_preact ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  at::Tensor mean = at::empty({C}, x.options().dtype(at::kFloat));
  at::Tensor var = at::empty({C}, x.options().dtype(at::kFloat));
  // Training stores z in preact, or in out as scratch until the statistics are known.
  at::Tensor zbuf = save_preact ? preact : out;
  const Strides4 sx(x), so(out), sz(zbuf);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const float* wp = wt.data_ptr<float>();
  const float* bp = bf.data_ptr<float>();
  Affine aff;
  if (!use_batch_stats) {
    mean.copy_(running_mean->to(at::kFloat));
    var.copy_(running_var->to(at::kFloat));
    aff = make_affine(mean, var, bn_weight, bn_bias, eps);
  }
  std::vector<double> pmean(N * C), pm2(N * C);

  // Pass 1: conv; eval writes out directly, training writes z and per-plane statistics.
  for_each_tile(N, C, g, false, [&](const Tile& t, Workspace& ws) {
    std::vector<float>&P = ws.P, &Z = ws.Z, &A = ws.A;
    read_tile(xp, sx, t, H, W, P.data(), g.size(), g.interior(0), g.Wp);
    for (int64_t cc = 0; cc < t.cb; ++cc) {
      const int64_t c = t.c0 + cc;
      float* z = Z.data() + cc * HW;
      conv_plane(P.data() + cc * g.size(), g, wp + c * kk, bp[c], z);
      for (int64_t i = 0; i < HW; ++i) z[i] = round_to<scalar_t>(z[i]);
      act_forward(act, z, A.data(), HW);
      if (use_batch_stats) {
        plane_moments(A.data(), HW, pmean[t.n * C + c], pm2[t.n * C + c]);
      } else {  // eval: Z becomes the output tile (after preact is written below)
        const float* xin = P.data() + cc * g.size();
        if (!save_preact) {
          for (int64_t h = 0; h < H; ++h)
            for (int64_t w = 0; w < W; ++w)
              z[h * W + w] = xin[g.interior(h) + w] + A[h * W + w] * aff.scale[c] + aff.shift[c];
        }
      }
    }
    if (save_preact || use_batch_stats)
      write_tile(zbuf.data_ptr<scalar_t>(), sz, t, H, W, Z.data(), HW, 0, W);
    if (!use_batch_stats && save_preact) {  // eval with preact saved: out from Z now
      for (int64_t cc = 0; cc < t.cb; ++cc) {
        const int64_t c = t.c0 + cc;
        float* z = Z.data() + cc * HW;
        act_forward(act, z, z, HW);
        const float* xin = P.data() + cc * g.size();
        for (int64_t h = 0; h < H; ++h)
          for (int64_t w = 0; w < W; ++w)
            z[h * W + w] = xin[g.interior(h) + w] + z[h * W + w] * aff.scale[c] + aff.shift[c];
      }
    }
    if (!use_batch_stats) write_tile(out.data_ptr<scalar_t>(), so, t, H, W, Z.data(), HW, 0, W);
  });
  if (!use_batch_stats) return {out, mean, var, preact};

  finalize_stats(pmean, pm2, N, C, HW, mean, var);
  aff = make_affine(mean, var, bn_weight, bn_bias, eps);
  // Pass 2: out = x + act(z) * scale + shift.
  for_each_tile(N, C, g, true, [&](const Tile& t, Workspace& ws) {
    std::vector<float>&X = ws.OUT, &Z = ws.Z;
    read_tile(xp, sx, t, H, W, X.data(), HW, 0, W);
    read_tile(zbuf.data_ptr<scalar_t>(), sz, t, H, W, Z.data(), HW, 0, W);
    for (int64_t cc = 0; cc < t.cb; ++cc) {
      const int64_t c = t.c0 + cc;
      float* z = Z.data() + cc * HW;
      const float* xin = X.data() + cc * HW;
      act_forward(act, z, z, HW);
      const float sc = aff.scale[c], sh = aff.shift[c];
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) z[i] = xin[i] + z[i] * sc + sh;
    }
    write_tile(out.data_ptr<scalar_t>(), so, t, H, W, Z.data(), HW, 0, W);
  });
  return {out, mean, var, preact};
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean_in, const at::Tensor& var_in,
    const at::Tensor& preact_in, bool use_batch_stats, double eps, Act act, const std::vector<bool>& mask) {
  const int64_t N = x.size(0), C = x.size(1), H = x.size(2), W = x.size(3), HW = H * W;
  const Plane g(H, W, weight.size(2));
  const int64_t k = g.k, kk = k * k, Wr = g.Wp - 2 * g.p;
  const at::Tensor mean = mean_in.to(at::kFloat).contiguous(), var = var_in.to(at::kFloat).contiguous();
  const Affine aff = make_affine(mean, var, bn_weight, c10::nullopt, eps);
  const at::Tensor wt = weight.to(at::kFloat).contiguous();
  // Flipped kernel for the input gradient (a 'same' conv of dz with the k x k kernel rotated).
  const at::Tensor wflip = wt.flip({2, 3}).contiguous();
  const bool need_dx = mask[0], need_dw = mask[1], need_db = mask[2], need_dbnw = mask[3], need_dbnb = mask[4];
  const auto fmt = output_format(x);
  const auto fopt = x.options().dtype(at::kFloat);
  at::Tensor go = grad_out;
  const Strides4 sx(x), sg(go);
  const scalar_t* xp = x.data_ptr<scalar_t>();
  const scalar_t* gp = go.data_ptr<scalar_t>();
  const float* mp = mean.data_ptr<float>();
  const float* wp = wt.data_ptr<float>();
  const float* wfp = wflip.data_ptr<float>();
  const bool have_z = preact_in.numel() > 0;
  const at::Tensor bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::zeros({C}, fopt);
  const float* bp = bf.data_ptr<float>();

  // Loads the tile's x (padded) and z (recomputed from x when preact was not saved).
  auto load_xz = [&](const Tile& t, std::vector<float>& P, std::vector<float>& Z) {
    read_tile(xp, sx, t, H, W, P.data(), g.size(), g.interior(0), g.Wp);
    if (have_z) {
      read_tile(preact_in.data_ptr<scalar_t>(), Strides4(preact_in), t, H, W, Z.data(), HW, 0, W);
      return;
    }
    for (int64_t cc = 0; cc < t.cb; ++cc) {
      float* z = Z.data() + cc * HW;
      conv_plane(P.data() + cc * g.size(), g, wp + (t.c0 + cc) * kk, bp[t.c0 + cc], z);
      for (int64_t i = 0; i < HW; ++i) z[i] = round_to<scalar_t>(z[i]);
    }
  };

  // Pass 1: per-plane sums of dy and dy * xhat.
  std::vector<double> psum_dy(N * C), psum_dyx(N * C);
  for_each_tile(N, C, g, true, [&](const Tile& t, Workspace& ws) {
    std::vector<float>&P = ws.P, &Z = ws.Z, &DY = ws.DY;
    load_xz(t, P, Z);
    read_tile(gp, sg, t, H, W, DY.data(), HW, 0, W);
    for (int64_t cc = 0; cc < t.cb; ++cc) {
      const int64_t c = t.c0 + cc;
      float* z = Z.data() + cc * HW;
      const float* dy = DY.data() + cc * HW;
      act_forward(act, z, z, HW);
      const float mu = mp[c], invstd = aff.invstd[c];
      double s = 0.0, sx2 = 0.0;
#pragma omp simd reduction(+ : s, sx2)
      for (int64_t i = 0; i < HW; ++i) {
        s += dy[i];
        sx2 += static_cast<double>(dy[i] * ((z[i] - mu) * invstd));
      }
      psum_dy[t.n * C + c] = s;
      psum_dyx[t.n * C + c] = sx2;
    }
  });
  std::vector<double> sum_dy(C, 0.0), sum_dyx(C, 0.0);
  for (int64_t n = 0; n < N; ++n)
    for (int64_t c = 0; c < C; ++c) {
      sum_dy[c] += psum_dy[n * C + c];
      sum_dyx[c] += psum_dyx[n * C + c];
    }

  at::Tensor dx = need_dx ? at::empty(x.sizes(), x.options().memory_format(fmt)) : at::empty({0}, x.options());
  std::vector<double> pdw(need_dw ? N * C * kk : 0, 0.0), pdb(N * C, 0.0);
  const double count = static_cast<double>(N * HW);
  if (need_dx || need_dw || need_db) {
    const Strides4 sdx(need_dx ? dx : x);
    for_each_tile(N, C, g, true, [&](const Tile& t, Workspace& ws) {
      std::vector<float>&P = ws.P, &Z = ws.Z, &DY = ws.DY, &D = ws.D, &A = ws.A, &DZ = ws.DZ, &OUT = ws.OUT;
      load_xz(t, P, Z);
      read_tile(gp, sg, t, H, W, DY.data(), HW, 0, W);
      float* Dtmp = A.data() + HW;  // A holds 2 * HW floats: activation, then act'
      for (int64_t cc = 0; cc < t.cb; ++cc) {
        const int64_t c = t.c0 + cc;
        const float* z = Z.data() + cc * HW;
        const float* dy = DY.data() + cc * HW;
        act_forward_deriv(act, z, A.data(), Dtmp, HW);
        for (int64_t h = 0; h < H; ++h) std::copy(Dtmp + h * W, Dtmp + (h + 1) * W, D.data() + h * Wr);
        const float invstd = aff.invstd[c], gamma = aff.gamma[c], mu = mp[c];
        const float mdy = use_batch_stats ? static_cast<float>(sum_dy[c] / count) : 0.f;
        const float mdyx = use_batch_stats ? static_cast<float>(sum_dyx[c] / count) : 0.f;
        // dz = act'(z) * gamma * invstd * (dy - mean(dy) - xhat * mean(dy * xhat))
        const float s1 = gamma * invstd;
        double db = 0.0;
        for (int64_t h = 0; h < H; ++h) {
          float* dzrow = DZ.data() + g.interior(h);
          float* drow = D.data() + h * Wr;  // dz rows, zero beyond W, for wgrad
          const float* arow = A.data() + h * W;
          const float* dyrow = dy + h * W;
#pragma omp simd reduction(+ : db)
          for (int64_t w = 0; w < W; ++w) {
            const float xhat = (arow[w] - mu) * invstd;
            const float dz = drow[w] * s1 * (dyrow[w] - mdy - xhat * mdyx);
            dzrow[w] = dz;
            drow[w] = dz;
            db += dz;
          }
        }
        pdb[t.n * C + c] = db;
        if (need_dw) wgrad_plane(P.data() + cc * g.size(), g, D.data(), pdw.data() + (t.n * C + c) * kk);
        if (need_dx) {
          float* o = OUT.data() + cc * HW;
          conv_plane(DZ.data(), g, wfp + c * kk, 0.f, o);
#pragma omp simd
          for (int64_t i = 0; i < HW; ++i) o[i] += dy[i];
        }
      }
      if (need_dx) write_tile(dx.data_ptr<scalar_t>(), sdx, t, H, W, OUT.data(), HW, 0, W);
    });
  }

  auto empty = [&]() { return at::empty({0}, x.options()); };
  at::Tensor dweight = empty(), dbias = empty(), dbnw = at::empty({0}, fopt), dbnb = at::empty({0}, fopt);
  if (need_dw) {
    at::Tensor acc = at::zeros({C, 1, k, k}, x.options().dtype(at::kDouble));
    double* a = acc.data_ptr<double>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t i = 0; i < C * kk; ++i) a[i] += pdw[n * C * kk + i];
    dweight = acc.to(weight.scalar_type());
  }
  if (need_db) {
    at::Tensor acc = at::zeros({C}, x.options().dtype(at::kDouble));
    double* a = acc.data_ptr<double>();
    for (int64_t n = 0; n < N; ++n)
      for (int64_t c = 0; c < C; ++c) a[c] += pdb[n * C + c];
    dbias = acc.to(weight.scalar_type());
  }
  if (need_dbnw) dbnw = at::from_blob(sum_dyx.data(), {C}, x.options().dtype(at::kDouble)).to(at::kFloat);
  if (need_dbnb) dbnb = at::from_blob(sum_dy.data(), {C}, x.options().dtype(at::kDouble)).to(at::kFloat);
  if (!need_dx) dx = empty();
  return {dx, dweight, dbias, dbnw, dbnb};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, c10::string_view activation, bool save_preact) {
  check_inputs(x, weight, "dw_block_forward_kernel (cpu)");
  TORCH_CHECK(use_batch_stats || (running_mean.has_value() && running_var.has_value()),
              "dw_block_forward_kernel (cpu): running_mean and running_var are required without batch statistics");
  const Act act = parse_act(std::string(activation));
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_forward_cpu", [&] {
    return forward_impl<scalar_t>(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                  use_batch_stats, eps, act, save_preact);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact, bool use_batch_stats, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  check_inputs(x, weight, "dw_block_backward_kernel (cpu)");
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(),
              "dw_block_backward_kernel (cpu): grad_out must match x in shape and dtype, got ", grad_out.sizes(),
              " ", grad_out.scalar_type());
  TORCH_CHECK(output_mask.size() == 5, "dw_block_backward_kernel (cpu): output_mask must have 5 entries");
  TORCH_CHECK(preact.numel() == 0 || (preact.sizes() == x.sizes() && preact.scalar_type() == x.scalar_type()),
              "dw_block_backward_kernel (cpu): preact must be empty or match x");
  const Act act = parse_act(std::string(activation));
  std::vector<bool> mask;
  for (const bool m : output_mask) mask.push_back(m);
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "dw_block_backward_cpu", [&] {
    return backward_impl<scalar_t>(grad_out, x, weight, bias, bn_weight, mean, var, preact, use_batch_stats, eps,
                                   act, mask);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("dw_block_forward_kernel", &dw_block_forward_cpu);
  m.impl("dw_block_backward_kernel", &dw_block_backward_cpu);
}

}  // namespace cpu
}  // namespace convmixer_kernels
