// The dz passes of the CPU GEMM blocks' backward (gemm_blocks_backward.cpp): from z (saved
// or recomputed), dy and the statistics, act' and then dz over D, with the per-chunk partial
// sums of dy, dy * xhat and dz (for dbn_bias, dbn_weight, dbias and the batch-statistics
// coefficients).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <vector>

#include "activation.h"
#include "gemm_blocks_geom.h"
#include "gemm_blocks_passes.h"

namespace convmixer_kernels {
namespace cpu {
namespace gemm {

// The fused dz passes' inputs (z, dy, the statistics, bn_weight) and outputs (act' and then
// dz over D, per-chunk partial sums of dy, dy * xhat and dz).
template <typename scalar_t>
struct DzPasses {
  using acc_t = acc_type_t<scalar_t>;
  const Geom& g;
  const Act act;
  const Chunking k;
  const int64_t C;
  bool need_dz = false, need_db = false, have_bnw = false;
  bool two_pass = false;  // batch statistics and dz: dz needs the sums first
  bool want_sdy = false, want_sdyx = false;
  const acc_t* mp = nullptr;     // mean
  std::vector<acc_t> invstd;     // 1 / sqrt(var + eps)
  std::vector<acc_t> w_v;        // bn_weight (ones without)
  ZSource<scalar_t, acc_t> zs;   // z
  Src dys;                       // dy
  acc_t* Db = nullptr;           // D: act', then dz
  std::vector<double> Sdy, Sdyx, Sdz;
  std::vector<acc_t> gm, gxm;  // per channel: mean(g), mean(g * xhat), g = dy * bn_weight

  DzPasses(const Geom& g_, Act act_) : g(g_), act(act_), k(make_chunking(g_)), C(g_.Cout) {}

  // g = dy * w (when bn_weight), then the BN backward coefficient pieces per channel.
  void times_w(const acc_t* d_y, acc_t* out, int64_t len, int64_t c) const {
    if (c >= 0) {
      const acc_t w = w_v[c];
      for (int64_t i = 0; i < len; ++i) out[i] = d_y[i] * w;
    } else {
      const acc_t* __restrict__ w = w_v.data();
      for (int64_t r = 0; r < len / C; ++r)
        for (int64_t cc = 0; cc < C; ++cc) out[r * C + cc] = d_y[r * C + cc] * w[cc];
    }
  }

  void batch_coefficients() {
    const std::vector<double> sdy = combine(k, Sdy), sdyx = combine(k, Sdyx);
    const double inv_m = 1.0 / static_cast<double>(g.M);
    gm.resize(static_cast<size_t>(C));
    gxm.resize(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
      gm[c] = static_cast<acc_t>(static_cast<double>(w_v[c]) * sdy[c] * inv_m);
      gxm[c] = static_cast<acc_t>(static_cast<double>(w_v[c]) * sdyx[c] * inv_m);
    }
  }
};

// With batch statistics and an expensive activation (gelu), evaluated once: pass 1 stores
// xhat (in X) and act' (in D) and sums dy and dy * xhat; pass 2 turns D into dz.
template <typename scalar_t>
void dz_passes_stored(DzPasses<scalar_t>& p, const Tensor& x) {
  using acc_t = acc_type_t<scalar_t>;
  const at::ScalarType acc = c10::CppTypeToScalarType<acc_t>::value;
  const Geom& g = p.g;
  const Act act = p.act;
  const Chunking& k = p.k;
  const int64_t C = p.C;
  const bool need_db = p.need_db, have_bnw = p.have_bnw;
  const acc_t* mp = p.mp;
  const std::vector<acc_t>& invstd = p.invstd;
  const std::vector<acc_t>&gm = p.gm, &gxm = p.gxm;
  const ZSource<scalar_t, acc_t>& zs = p.zs;
  const Src& dys = p.dys;
  acc_t* Db = p.Db;
  std::vector<double>&Sdy = p.Sdy, &Sdyx = p.Sdyx, &Sdz = p.Sdz;
  // Pass 1: xhat (stored), act' (stored in D), sum(dy), sum(dy * xhat).
  const Tensor X = at::empty(out_sizes(g), x.options().dtype(acc).memory_format(g.fmt));
  acc_t* Xb = X.data_ptr<acc_t>();
  run_chunks<acc_t>(k, 3, [&](int64_t off, int64_t len, int64_t c, int64_t slot, acc_t* scratch) {
    const acc_t* z = zs.get(off, len, c, scratch);
    acc_t* a = scratch + k.max_len;
    act_fwd_deriv(act, z, a, Db + off, len);
    const acc_t* d_y = load(dys, off, len, scratch + 2 * k.max_len);
    acc_t* __restrict__ xh = Xb + off;
    if (c >= 0) {
      const acc_t m = mp[c], is = invstd[c];
      for (int64_t i = 0; i < len; ++i) xh[i] = (a[i] - m) * is;
      Sdy[slot] = lane_sum(d_y, len);
      Sdyx[slot] = lane_dot(d_y, xh, len);
    } else {
      const acc_t* __restrict__ is = invstd.data();
      for (int64_t r = 0; r < len / C; ++r)
        for (int64_t cc = 0; cc < C; ++cc) xh[r * C + cc] = (a[r * C + cc] - mp[cc]) * is[cc];
      rows_sum(d_y, len / C, C, &Sdy[slot]);
      rows_dot(d_y, xh, len / C, C, &Sdyx[slot]);
    }
  });
  p.batch_coefficients();
  // Pass 2: dz = act' * (g - mean(g) - xhat * mean(g * xhat)) * invstd, sum(dz).
  run_chunks<acc_t>(k, 2, [&](int64_t off, int64_t len, int64_t c, int64_t slot, acc_t* scratch) {
    const acc_t* d_y = load(dys, off, len, scratch);
    acc_t* gg = scratch + k.max_len;
    if (have_bnw) {
      p.times_w(d_y, gg, len, c);
      d_y = gg;
    }
    const acc_t* __restrict__ xh = Xb + off;
    acc_t* d = Db + off;
    if (c >= 0) {
      const acc_t m1 = gm[c], m2 = gxm[c], is = invstd[c];
      for (int64_t i = 0; i < len; ++i) d[i] = ((d_y[i] - m1) - xh[i] * m2) * is * d[i];
      if (need_db) Sdz[slot] = lane_sum(d, len);
    } else {
      const acc_t* __restrict__ m1 = gm.data();
      const acc_t* __restrict__ m2 = gxm.data();
      const acc_t* __restrict__ is = invstd.data();
      for (int64_t r = 0; r < len / C; ++r) {
        acc_t* dr = d + r * C;
        const acc_t* yr = d_y + r * C;
        const acc_t* xr = xh + r * C;
        for (int64_t cc = 0; cc < C; ++cc)
          dr[cc] = ((yr[cc] - m1[cc]) - xr[cc] * m2[cc]) * is[cc] * dr[cc];
      }
      if (need_db) rows_sum(d, len / C, C, &Sdz[slot]);
    }
  });
}

// Otherwise: the reductions (for dbn_* and the batch-statistics dz), and with running
// statistics dz = act' * g * invstd in the same pass; with batch statistics (a cheap
// activation, relu) a second pass recomputes act, act' and xhat for dz.
template <typename scalar_t>
void dz_passes_recomputed(DzPasses<scalar_t>& p) {
  using acc_t = acc_type_t<scalar_t>;
  const Act act = p.act;
  const Chunking& k = p.k;
  const int64_t C = p.C;
  const bool need_dz = p.need_dz, need_db = p.need_db, have_bnw = p.have_bnw, two_pass = p.two_pass;
  const bool want_sdy = p.want_sdy, want_sdyx = p.want_sdyx;
  const acc_t* mp = p.mp;
  const std::vector<acc_t>& invstd = p.invstd;
  const std::vector<acc_t>&gm = p.gm, &gxm = p.gxm;
  const ZSource<scalar_t, acc_t>& zs = p.zs;
  const Src& dys = p.dys;
  acc_t* Db = p.Db;
  std::vector<double>&Sdy = p.Sdy, &Sdyx = p.Sdyx, &Sdz = p.Sdz;
  // The reductions (for dbn_* and the batch-statistics dz), and with running
  // statistics dz = act' * g * invstd in the same pass.
  const bool need_xhat = want_sdyx, emit_dz = need_dz && !two_pass;
  run_chunks<acc_t>(k, 4, [&](int64_t off, int64_t len, int64_t c, int64_t slot, acc_t* scratch) {
    const acc_t* z = zs.get(off, len, c, scratch);
    acc_t* a = scratch + k.max_len;
    acc_t* dd = scratch + 2 * k.max_len;
    if (emit_dz) {
      act_fwd_deriv(act, z, a, dd, len);
    } else if (need_xhat) {
      act_fwd(act, z, a, len);
    }
    const acc_t* d_y = load(dys, off, len, scratch + 3 * k.max_len);
    if (need_xhat) {  // xhat over a, in place
      if (c >= 0) {
        const acc_t m = mp[c], is = invstd[c];
        for (int64_t i = 0; i < len; ++i) a[i] = (a[i] - m) * is;
      } else {
        const acc_t* __restrict__ is = invstd.data();
        for (int64_t r = 0; r < len / C; ++r)
          for (int64_t cc = 0; cc < C; ++cc) a[r * C + cc] = (a[r * C + cc] - mp[cc]) * is[cc];
      }
    }
    if (c >= 0) {
      if (want_sdy) Sdy[slot] = lane_sum(d_y, len);
      if (want_sdyx) Sdyx[slot] = lane_dot(d_y, a, len);
    } else {
      if (want_sdy) rows_sum(d_y, len / C, C, &Sdy[slot]);
      if (want_sdyx) rows_dot(d_y, a, len / C, C, &Sdyx[slot]);
    }
    if (!emit_dz) return;
    if (have_bnw) {
      p.times_w(d_y, a, len, c);  // a (xhat) is no longer needed
      d_y = a;
    }
    acc_t* d = Db + off;
    if (c >= 0) {
      const acc_t is = invstd[c];
      for (int64_t i = 0; i < len; ++i) d[i] = d_y[i] * is * dd[i];
      if (need_db) Sdz[slot] = lane_sum(d, len);
    } else {
      const acc_t* __restrict__ is = invstd.data();
      for (int64_t r = 0; r < len / C; ++r)
        for (int64_t cc = 0; cc < C; ++cc) d[r * C + cc] = d_y[r * C + cc] * is[cc] * dd[r * C + cc];
      if (need_db) rows_sum(d, len / C, C, &Sdz[slot]);
    }
  });
  if (two_pass) {
    p.batch_coefficients();
    // Pass 2 (cheap activation): recompute a, act' and xhat; dz as above; sum(dz).
    run_chunks<acc_t>(k, 5, [&](int64_t off, int64_t len, int64_t c, int64_t slot, acc_t* scratch) {
      const acc_t* z = zs.get(off, len, c, scratch);
      acc_t* a = scratch + k.max_len;
      acc_t* dd = scratch + 2 * k.max_len;
      act_fwd_deriv(act, z, a, dd, len);
      const acc_t* d_y = load(dys, off, len, scratch + 3 * k.max_len);
      if (have_bnw) {
        p.times_w(d_y, scratch + 4 * k.max_len, len, c);
        d_y = scratch + 4 * k.max_len;
      }
      acc_t* d = Db + off;
      if (c >= 0) {
        const acc_t m = mp[c], m1 = gm[c], m2 = gxm[c], is = invstd[c];
        for (int64_t i = 0; i < len; ++i) {
          const acc_t xh = (a[i] - m) * is;
          d[i] = ((d_y[i] - m1) - xh * m2) * is * dd[i];
        }
        if (need_db) Sdz[slot] = lane_sum(d, len);
      } else {
        const acc_t* __restrict__ m1 = gm.data();
        const acc_t* __restrict__ m2 = gxm.data();
        const acc_t* __restrict__ is = invstd.data();
        for (int64_t r = 0; r < len / C; ++r) {
          acc_t* dr = d + r * C;
          const acc_t* yr = d_y + r * C;
          const acc_t* ar = a + r * C;
          const acc_t* ddr = dd + r * C;
          for (int64_t cc = 0; cc < C; ++cc) {
            const acc_t xh = (ar[cc] - mp[cc]) * is[cc];
            dr[cc] = ((yr[cc] - m1[cc]) - xh * m2[cc]) * is[cc] * ddr[cc];
          }
        }
        if (need_db) rows_sum(d, len / C, C, &Sdz[slot]);
      }
    });
  }
}

}  // namespace gemm
}  // namespace cpu
}  // namespace convmixer_kernels
