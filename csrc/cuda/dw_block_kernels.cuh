// The depthwise CUDA kernels (dw_block.cu; design there): conv + epilogue, training
// statistics and normalisation, the backward's elementwise pass, the weight gradient and
// the row reductions, each with its argument struct.
#pragma once

#include <cstdint>

#include "dw_block_common.cuh"

namespace convmixer_kernels {
namespace cuda {
namespace {  // one translation unit: only dw_block.cu includes this

// ---- conv + epilogue --------------------------------------------------------------------

template <typename in_t, typename out_t>
struct ConvArgs {
  Geometry g;
  int mode, act;
  const in_t* in;  // x (EVAL/TRAIN/ZONLY) or dz (DGRAD)
  Strides4 s_in;
  const float* wt;    // (C, k*k) float32; flipped for DGRAD
  const float* bias;  // (C,) float32, nullable
  out_t* z;           // pre-activation store, nullable
  Strides4 s_z;
  out_t* out;  // out (EVAL) or dx (DGRAD)
  Strides4 s_out;
  const out_t* dy;  // DGRAD: the residual's gradient
  Strides4 s_dy;
  BnArgs bn;     // EVAL
  float* pmean;  // TRAIN: (tiles, C)
  float* pm2;
};

template <typename in_t, typename out_t, int K>
__global__ void __launch_bounds__(THREADS) conv_kernel(const ConvArgs<in_t, out_t> a) {
  extern __shared__ float smem[];
  const Geometry& g = a.g;
  const int k = K > 0 ? K : g.k;
  const int SH = TH + k - 1, SW = TW + k - 1;
  const TileIdx ti = tile_of(g, blockIdx.x);
  load_tile(smem, a.in, a.s_in, g, ti.n, ti.c0, ti.h0 - g.pad, ti.w0 - g.pad, SH, SW);
  __syncthreads();

  const Lane l = lane_of(threadIdx.x);
  const int64_t c = ti.c0 + l.ch;
  const bool cvalid = c < g.C;
  const int64_t cw = cvalid ? c : g.C - 1;  // a valid weight row for lanes past C (results unused)
  float acc[PX];
#pragma unroll
  for (int q = 0; q < PX; ++q) acc[q] = 0.0f;
  const float* s = smem + (l.ch * SH + l.row) * SW + l.col0;
  conv_taps<K>(s, SW, k, a.wt + cw * k * k, acc);

  const int64_t h = ti.h0 + l.row;
  const float b = (a.bias != nullptr && a.mode != kDgrad) ? a.bias[cw] : 0.0f;
  float sum = 0.0f, vals[PX];
#pragma unroll
  for (int q = 0; q < PX; ++q) {
    const int64_t w = ti.w0 + l.col0 + q;
    const bool valid = cvalid && h < g.H && w < g.W;
    vals[q] = 0.0f;
    if (!valid) continue;
    if (a.mode == kDgrad) {
      const float dx = acc[q] + to_f(a.dy[offset(a.s_dy, ti.n, c, h, w)]);
      a.out[offset(a.s_out, ti.n, c, h, w)] = from_f<out_t>(dx);
      continue;
    }
    const out_t zs = from_f<out_t>(acc[q] + b);  // the stored pre-activation
    if (a.z != nullptr) a.z[offset(a.s_z, ti.n, c, h, w)] = zs;
    if (a.mode == kZOnly) continue;
    const float act = act_fwd(to_f(zs), a.act);
    if (a.mode == kTrain) {
      vals[q] = act;
      sum += act;
      continue;
    }
    const float xv = s[g.pad * SW + g.pad + q];  // x at (h, w), from the staged tile
    a.out[offset(a.s_out, ti.n, c, h, w)] = from_f<out_t>(xv + bn_apply(a.bn, c, act));
  }
  if (a.mode != kTrain) return;
  // Per-tile (mean, M2) of this channel: one warp holds the channel's whole tile.
  const float n_tile = static_cast<float>(tile_count(g, ti.t));
  const float mean = warp_sum(sum) / n_tile;
  float m2 = 0.0f;
#pragma unroll
  for (int q = 0; q < PX; ++q) {
    const bool valid = cvalid && h < g.H && ti.w0 + l.col0 + q < g.W;
    const float d = vals[q] - mean;
    m2 += valid ? d * d : 0.0f;
  }
  m2 = warp_sum(m2);
  if (cvalid && (threadIdx.x & 31) == 0) {
    a.pmean[ti.t * g.C + c] = mean;
    a.pm2[ti.t * g.C + c] = m2;
  }
}

// ---- training statistics and normalisation -------------------------------------------------

struct FinalizeArgs {
  Geometry g;
  const float* pmean;
  const float* pm2;
  float* mean;
  float* var;
};

// Batch mean and biased variance per channel: Chan's combination of the tile partials in
// tile order, in double.
__global__ void __launch_bounds__(THREADS) finalize_stats_kernel(const FinalizeArgs a) {
  const int64_t c = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (c >= a.g.C) return;
  double mu = 0.0, m2 = 0.0, n_acc = 0.0;
  for (int64_t t = 0; t < a.g.tiles; ++t) {
    const double nb = static_cast<double>(tile_count(a.g, t));
    const double mb = a.pmean[t * a.g.C + c], m2b = a.pm2[t * a.g.C + c];
    const double tot = n_acc + nb, delta = mb - mu;
    mu += delta * nb / tot;
    m2 += m2b + delta * delta * n_acc * nb / tot;
    n_acc = tot;
  }
  a.mean[c] = static_cast<float>(mu);
  a.var[c] = static_cast<float>(m2 / n_acc);
}

template <typename scalar_t>
struct NormArgs {
  Geometry g;
  int act;
  bool channels_last;  // memory order of out and z (both dense in it)
  const scalar_t* x;
  Strides4 s_x;
  const scalar_t* z;
  scalar_t* out;  // may alias z (same element read then written by one thread)
  BnArgs bn;
};

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) norm_kernel(const NormArgs<scalar_t> a) {
  const Geometry& g = a.g;
  const int64_t total = g.N * g.C * g.H * g.W;
  const int64_t step = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < total; i += step) {
    int64_t n, c, h, w;
    if (a.channels_last) {
      c = i % g.C;
      int64_t r = i / g.C;
      w = r % g.W;
      r /= g.W;
      h = r % g.H;
      n = r / g.H;
    } else {
      w = i % g.W;
      int64_t r = i / g.W;
      h = r % g.H;
      r /= g.H;
      c = r % g.C;
      n = r / g.C;
    }
    const float act = act_fwd(to_f(a.z[i]), a.act);
    const float xv = to_f(a.x[offset(a.s_x, n, c, h, w)]);
    a.out[i] = from_f<scalar_t>(xv + bn_apply(a.bn, c, act));
  }
}

// ---- backward ---------------------------------------------------------------------------

template <typename scalar_t>
struct ElemArgs {
  Geometry g;
  int act;
  bool train;     // batch statistics: dz carries the mean terms
  bool stats;     // write per-tile sums of dy and dy * xhat
  bool dz_pass;   // write dz (and per-tile sums of dz when pdb is set)
  const scalar_t* dy;
  Strides4 s_dy;
  const scalar_t* z;
  Strides4 s_z;
  const float* mean;
  const float* var;
  float eps;
  const float* bn_weight;  // nullable
  const float* mean_g;     // train: mean of dy * bn_weight per channel
  const float* mean_gx;    // train: mean of dy * bn_weight * xhat per channel
  float* psum;             // (tiles, C)
  float* pdot;
  float* pdb;  // nullable
  float* dz;   // float32, strides s_dz
  Strides4 s_dz;
};

template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) bwd_elem_kernel(const ElemArgs<scalar_t> a) {
  const Geometry& g = a.g;
  const TileIdx ti = tile_of(g, blockIdx.x);
  const Lane l = lane_of(threadIdx.x);
  const int64_t c = ti.c0 + l.ch, h = ti.h0 + l.row;
  const bool cvalid = c < g.C;
  float sdy = 0.0f, sdyx = 0.0f, sdz = 0.0f;
  if (cvalid) {
    const float mean = a.mean[c], inv = inv_std(a.var[c], a.eps);
    const float gw = a.bn_weight != nullptr ? a.bn_weight[c] : 1.0f;
    const float mg = a.train ? a.mean_g[c] : 0.0f, mgx = a.train ? a.mean_gx[c] : 0.0f;
#pragma unroll
    for (int q = 0; q < PX; ++q) {
      const int64_t w = ti.w0 + l.col0 + q;
      if (h >= g.H || w >= g.W) continue;
      const float z = to_f(a.z[offset(a.s_z, ti.n, c, h, w)]);
      const float dy = to_f(a.dy[offset(a.s_dy, ti.n, c, h, w)]);
      const float xhat = (act_fwd(z, a.act) - mean) * inv;
      sdy += dy;
      sdyx += dy * xhat;
      if (!a.dz_pass) continue;
      const float gv = a.bn_weight != nullptr ? dy * gw : dy;
      const float da = a.train ? (gv - mg - xhat * mgx) * inv : gv * inv;
      const float dz = act_bwd(z, da, a.act);
      a.dz[offset(a.s_dz, ti.n, c, h, w)] = dz;
      sdz += dz;
    }
  }
  // Warp-uniform from here: a warp is one channel.
  if (a.stats) {
    sdy = warp_sum(sdy);
    sdyx = warp_sum(sdyx);
    if (cvalid && (threadIdx.x & 31) == 0) {
      a.psum[ti.t * g.C + c] = sdy;
      a.pdot[ti.t * g.C + c] = sdyx;
    }
  }
  if (a.dz_pass && a.pdb != nullptr) {
    sdz = warp_sum(sdz);
    if (cvalid && (threadIdx.x & 31) == 0) a.pdb[ti.t * g.C + c] = sdz;
  }
}

template <typename scalar_t>
struct WgradArgs {
  Geometry g;
  const scalar_t* x;
  Strides4 s_x;
  const float* dz;
  Strides4 s_dz;
  int64_t tiles_per_split;
  float* pw;  // (splits, k*k, C)
};

// Block (split, channel group): pw[split, tap, c] = sum over the split's tiles, in order, of
// sum over the tile of dz[p, c] * x[p + offset(tap), c].
template <typename scalar_t>
__global__ void __launch_bounds__(THREADS) wgrad_kernel(const WgradArgs<scalar_t> a) {
  extern __shared__ float smem[];
  const Geometry& g = a.g;
  const int k = g.k, kk = k * k, SH = TH + k - 1, SW = TW + k - 1;
  float* xs = smem;                    // CT x SH x SW
  float* dzs = xs + CT * SH * SW;      // CT x TH x TW
  float* accs = dzs + CT * TH * TW;    // CT x kk, entry p owned by thread p % THREADS
  const int64_t grp = blockIdx.x % g.groups, split = blockIdx.x / g.groups;
  const int64_t c0 = grp * CT;
  for (int p = threadIdx.x; p < CT * kk; p += THREADS) accs[p] = 0.0f;
  const int64_t t_lo = split * a.tiles_per_split;
  const int64_t t_hi = t_lo + a.tiles_per_split < g.tiles ? t_lo + a.tiles_per_split : g.tiles;
  const bool dz_chan_fast = a.s_dz.c == 1;
  for (int64_t t = t_lo; t < t_hi; ++t) {
    const TileIdx ti = tile_of(g, t * g.groups + grp);
    __syncthreads();  // the previous tile's shared data has been read
    load_tile(xs, a.x, a.s_x, g, ti.n, c0, ti.h0 - g.pad, ti.w0 - g.pad, SH, SW);
    for (int e = threadIdx.x; e < CT * TH * TW; e += THREADS) {
      int cc, r, q;
      if (dz_chan_fast) {
        cc = e % CT;
        q = (e / CT) % TW;
        r = e / (CT * TW);
      } else {
        q = e % TW;
        r = (e / TW) % TH;
        cc = e / (TW * TH);
      }
      const int64_t c = c0 + cc, h = ti.h0 + r, w = ti.w0 + q;
      float v = 0.0f;
      if (c < g.C && h < g.H && w < g.W) v = a.dz[offset(a.s_dz, ti.n, c, h, w)];
      dzs[(cc * TH + r) * TW + q] = v;
    }
    __syncthreads();
    for (int p = threadIdx.x; p < CT * kk; p += THREADS) {
      const int cc = p / kk, tap = p % kk, i = tap / k, j = tap % k;
      const float* xr = xs + (cc * SH + i) * SW + j;
      const float* dr = dzs + cc * TH * TW;
      float s = 0.0f;
      for (int r = 0; r < TH; ++r)
#pragma unroll
        for (int q = 0; q < TW; ++q) s = fmaf(dr[r * TW + q], xr[r * SW + q], s);
      accs[p] += s;
    }
  }
  for (int p = threadIdx.x; p < CT * kk; p += THREADS) {  // each thread reads its own entries
    const int cc = p / kk, tap = p % kk;
    const int64_t c = c0 + cc;
    if (c < g.C) a.pw[(split * kk + tap) * g.C + c] = accs[p];
  }
}

struct ReduceArgs {
  const float* in;  // (rows, cols)
  int64_t rows, cols;
  double* out;  // (cols,)
};

__global__ void __launch_bounds__(THREADS) reduce_rows_kernel(const ReduceArgs a) {
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (col >= a.cols) return;
  double s = 0.0;
  for (int64_t r = 0; r < a.rows; ++r) s += a.in[r * a.cols + col];
  a.out[col] = s;
}

}  // namespace
}  // namespace cuda
}  // namespace convmixer_kernels
