// The fused passes of the CPU GEMM blocks (gemm_blocks_forward.cpp, gemm_blocks_backward.cpp):
// activations in the compute dtype, loads and stores of any float dtype, fixed-order lane
// reductions, the chunking of the out-shaped buffers (run_chunks, combine) and the z source.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "gemm_blocks_geom.h"

namespace convmixer_kernels {
namespace cpu {
namespace gemm {

// Elements per chunk of the fused passes (the chunk's scratch stays in L1/L2).
constexpr int64_t kChunk = 4096;
// Most per-chunk partial sums per reduced quantity in rows mode (chunks grow beyond
// kChunk rather than the partials beyond 8 MiB).
constexpr int64_t kMaxParts = int64_t(1) << 20;
// NCHW weight gradient: below this many pixels per image, one GEMM over permuted
// copies beats N small accumulating GEMMs.
constexpr int64_t kLoopGemmMinPixels = 256;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

// ---- activations in the compute dtype ----------------------------------------------

inline void act_fwd(Act act, const float* z, float* a, int64_t n) { act_forward(act, z, a, n); }
inline void act_fwd_deriv(Act act, const float* z, float* a, float* d, int64_t n) {
  act_forward_deriv(act, z, a, d, n);
}

// float64 versions (the shared interface is float32-only); same formulas as ATen's
// gelu / gelu_backward / threshold_backward.
inline double act_one(Act act, double z, double* d) {
  constexpr double kSqrt1_2 = 0.70710678118654752440;
  constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  constexpr double kSqrt2OverPi = 0.79788456080286535588;
  constexpr double kCoef = 0.044715;
  switch (act) {
    case Act::Relu:
      if (d) *d = z > 0.0 ? 1.0 : 0.0;
      return z > 0.0 ? z : 0.0;
    case Act::Gelu: {
      const double cdf = 0.5 * (1.0 + std::erf(z * kSqrt1_2));
      if (d) *d = cdf + z * kInvSqrt2Pi * std::exp(-0.5 * z * z);
      return z * cdf;
    }
    case Act::GeluTanh:
    default: {
      const double t = std::tanh(kSqrt2OverPi * (z + kCoef * z * z * z));
      if (d) {
        *d = 0.5 * (1.0 + t) +
             0.5 * z * (1.0 - t * t) * kSqrt2OverPi * (1.0 + 3.0 * kCoef * z * z);
      }
      return 0.5 * z * (1.0 + t);
    }
  }
}
inline void act_fwd(Act act, const double* z, double* a, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = act_one(act, z[i], nullptr);
}
inline void act_fwd_deriv(Act act, const double* z, double* a, double* d, int64_t n) {
  for (int64_t i = 0; i < n; ++i) a[i] = act_one(act, z[i], &d[i]);
}

// ---- loads and stores ----------------------------------------------------------------

// A tensor's data read as a flat array (its layout is the output layout) of any float dtype.
struct Src {
  const void* ptr = nullptr;
  at::ScalarType dtype = at::kFloat;
};

inline Src src_of(const Tensor& t) { return Src{t.data_ptr(), t.scalar_type()}; }

template <typename T, typename acc_t>
inline void convert(const T* __restrict__ in, int64_t n, acc_t* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(static_cast<float>(in[i]));
}
template <typename acc_t>
inline void convert(const double* __restrict__ in, int64_t n, acc_t* __restrict__ out) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(in[i]);
}

// Pointer to elements [off, off + n) of s in acc_t: s's own memory when it already has
// that dtype, else converted into scratch.
template <typename acc_t>
const acc_t* load(const Src& s, int64_t off, int64_t n, acc_t* scratch) {
  switch (s.dtype) {
    case at::kFloat:
      if (std::is_same<acc_t, float>::value) return reinterpret_cast<const acc_t*>(s.ptr) + off;
      convert(static_cast<const float*>(s.ptr) + off, n, scratch);
      return scratch;
    case at::kDouble:
      if (std::is_same<acc_t, double>::value) return reinterpret_cast<const acc_t*>(s.ptr) + off;
      convert(static_cast<const double*>(s.ptr) + off, n, scratch);
      return scratch;
    case at::kHalf:
      convert(static_cast<const c10::Half*>(s.ptr) + off, n, scratch);
      return scratch;
    case at::kBFloat16:
      convert(static_cast<const c10::BFloat16*>(s.ptr) + off, n, scratch);
      return scratch;
    default:
      TORCH_CHECK(false, "unsupported dtype ", s.dtype);
  }
}

template <typename scalar_t, typename acc_t>
inline void store(scalar_t* __restrict__ out, const acc_t* __restrict__ in, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<scalar_t>(in[i]);
}

// v rounded to scalar_t's precision, back in acc_t.
template <typename scalar_t, typename acc_t>
inline acc_t round_to(acc_t v) {
  return static_cast<acc_t>(static_cast<scalar_t>(v));
}

// ---- lane reductions (fixed order, vectorisable without reassociation) -------------

constexpr int kLanes = 8;

template <typename acc_t>
inline void sum_shifted_sq(const acc_t* __restrict__ a, int64_t n, double k, double* s_out,
                           double* ss_out) {
  double s[kLanes] = {0}, ss[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = static_cast<double>(a[i + j]) - k;
      s[j] += v;
      ss[j] += v * v;
    }
  }
  double st = 0, sst = 0;
  for (; i < n; ++i) {
    const double v = static_cast<double>(a[i]) - k;
    st += v;
    sst += v * v;
  }
  for (int j = 0; j < kLanes; ++j) {
    st += s[j];
    sst += ss[j];
  }
  *s_out = st;
  *ss_out = sst;
}

template <typename acc_t>
inline double lane_sum(const acc_t* __restrict__ a, int64_t n) {
  double s[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) s[j] += static_cast<double>(a[i + j]);
  double st = 0;
  for (; i < n; ++i) st += static_cast<double>(a[i]);
  for (int j = 0; j < kLanes; ++j) st += s[j];
  return st;
}

template <typename acc_t>
inline double lane_dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t n) {
  double s[kLanes] = {0};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) s[j] += static_cast<double>(a[i + j]) * static_cast<double>(b[i + j]);
  double st = 0;
  for (; i < n; ++i) st += static_cast<double>(a[i]) * static_cast<double>(b[i]);
  for (int j = 0; j < kLanes; ++j) st += s[j];
  return st;
}

// ---- chunking of the fused passes ---------------------------------------------------

// The out-shaped buffers are walked as contiguous chunks. Rows mode ((M, C) memory:
// channels_last, or NCHW with one pixel per image): a chunk is a block of whole rows and
// has one partial per channel. Planes mode (NCHW): a chunk is a group of whole planes
// (one (n, c) image channel each, one partial per plane) or, for large planes, one block
// of a plane (one partial per block).
struct Chunking {
  bool rows;
  int64_t C, L, N, M;
  int64_t per;      // rows mode: rows per chunk; planes mode with nb == 1: planes per chunk
  int64_t nb, blen;  // planes mode: blocks per plane, block length
  int64_t nchunks, nparts, max_len;
};

inline Chunking make_chunking(const Geom& g) {
  Chunking k;
  k.C = g.Cout;
  k.L = g.HWo;
  k.N = g.N;
  k.M = g.M;
  k.rows = g.HWo == 1 || (g.out_cl && g.Cout > 1);
  k.nb = 1;
  k.blen = k.L;
  if (k.rows) {
    k.per = std::max<int64_t>(1, kChunk / k.C);
    k.per = std::max(k.per, (k.M * k.C + kMaxParts - 1) / kMaxParts);
    k.nchunks = (k.M + k.per - 1) / k.per;
    k.nparts = k.nchunks * k.C;
    k.max_len = k.per * k.C;
  } else if (k.L >= kChunk) {
    k.nb = (k.L + kChunk - 1) / kChunk;
    k.blen = (k.L + k.nb - 1) / k.nb;
    k.per = 1;
    k.nchunks = k.N * k.C * k.nb;
    k.nparts = k.nchunks;
    k.max_len = k.blen;
  } else {
    k.per = std::max<int64_t>(1, kChunk / k.L);
    k.nchunks = (k.N * k.C + k.per - 1) / k.per;
    k.nparts = k.N * k.C;
    k.max_len = k.per * k.L;
  }
  return k;
}

// Calls f(off, len, c, slot) for the pieces of chunk j: c >= 0: len elements of channel c,
// partial slot `slot`; c == -1 (rows mode): len / C whole rows, partial slots
// [slot, slot + C) per channel.
template <class F>
inline void visit(const Chunking& k, int64_t j, const F& f) {
  if (k.rows) {
    const int64_t r0 = j * k.per, r1 = std::min(k.M, r0 + k.per);
    f(r0 * k.C, (r1 - r0) * k.C, int64_t(-1), j * k.C);
  } else if (k.nb > 1) {
    const int64_t plane = j / k.nb, b = j % k.nb;
    const int64_t s = b * k.blen, e = std::min(k.L, s + k.blen);
    f(plane * k.L + s, e - s, plane % k.C, j);
  } else {
    const int64_t p0 = j * k.per, p1 = std::min(k.N * k.C, p0 + k.per);
    for (int64_t pl = p0; pl < p1; ++pl) f(pl * k.L, k.L, pl % k.C, pl);
  }
}

// Runs f(off, len, c, slot, scratch) over every chunk in parallel; scratch holds
// nscratch arrays of max_len acc_t, private to the thread.
template <typename acc_t, class F>
void run_chunks(const Chunking& k, int nscratch, const F& f) {
  at::parallel_for(0, k.nchunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(static_cast<size_t>(std::max(nscratch, 1) * k.max_len));
    for (int64_t j = begin; j < end; ++j) {
      visit(k, j, [&](int64_t off, int64_t len, int64_t c, int64_t slot) {
        f(off, len, c, slot, scratch.data());
      });
    }
  });
}

// Per-channel totals of a partials array, in a fixed order.
inline std::vector<double> combine(const Chunking& k, const std::vector<double>& part) {
  std::vector<double> out(static_cast<size_t>(k.C), 0.0);
  if (k.rows) {
    for (int64_t j = 0; j < k.nchunks; ++j)
      for (int64_t c = 0; c < k.C; ++c) out[c] += part[j * k.C + c];
  } else {
    for (int64_t c = 0; c < k.C; ++c) {
      double s = 0;
      for (int64_t n = 0; n < k.N; ++n)
        for (int64_t b = 0; b < k.nb; ++b) s += part[(n * k.C + c) * k.nb + b];
      out[c] = s;
    }
  }
  return out;
}

// Rows-mode per-channel accumulation: s[c] += sum over rows of v[r * C + c].
template <typename acc_t>
inline void rows_sum(const acc_t* __restrict__ v, int64_t rows, int64_t C, double* __restrict__ s) {
  for (int64_t c = 0; c < C; ++c) s[c] = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* vr = v + r * C;
    for (int64_t c = 0; c < C; ++c) s[c] += static_cast<double>(vr[c]);
  }
}

template <typename acc_t>
inline void rows_dot(const acc_t* __restrict__ a, const acc_t* __restrict__ b, int64_t rows,
                     int64_t C, double* __restrict__ s) {
  for (int64_t c = 0; c < C; ++c) s[c] = 0.0;
  for (int64_t r = 0; r < rows; ++r) {
    const acc_t* ar = a + r * C;
    const acc_t* br = b + r * C;
    for (int64_t c = 0; c < C; ++c) s[c] += static_cast<double>(ar[c]) * static_cast<double>(br[c]);
  }
}

// Per-channel vector of an optional per-channel tensor in acc_t (fill when absent).
template <typename acc_t>
std::vector<acc_t> channel_values(const OptTensor& t, int64_t C, acc_t fill) {
  std::vector<acc_t> v(static_cast<size_t>(C), fill);
  if (t.has_value() && t->defined()) {
    Tensor r = t->to(c10::CppTypeToScalarType<acc_t>::value).contiguous();  // t.to(sdt)
    const acc_t* q = r.data_ptr<acc_t>();
    for (int64_t c = 0; c < C; ++c) v[c] = q[c];
  }
  return v;
}

inline bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

// z loader: either the GEMM output (+ bias, rounded to x's dtype) or a saved preact.
template <typename scalar_t, typename acc_t>
struct ZSource {
  const acc_t* gemm = nullptr;  // out-shaped GEMM output (no bias)
  const acc_t* bias = nullptr;  // per-channel bias or null
  Src preact;                   // used when gemm is null
  int64_t C = 1;
  bool direct = true;           // may return a pointer into gemm (callers that write it: false)

  // z for elements [off, off + len) of channel c (c == -1: whole rows).
  const acc_t* get(int64_t off, int64_t len, int64_t c, acc_t* scratch) const {
    if (gemm == nullptr) return load(preact, off, len, scratch);
    const acc_t* __restrict__ g = gemm + off;
    acc_t* __restrict__ z = scratch;
    if (bias == nullptr) {
      if (std::is_same<scalar_t, acc_t>::value && direct) return g;
      for (int64_t i = 0; i < len; ++i) z[i] = round_to<scalar_t>(g[i]);
    } else if (c >= 0) {
      const acc_t b = bias[c];
      for (int64_t i = 0; i < len; ++i) z[i] = round_to<scalar_t>(g[i] + b);
    } else {
      const acc_t* __restrict__ bb = bias;
      for (int64_t r = 0; r < len / C; ++r)
        for (int64_t cc = 0; cc < C; ++cc) z[r * C + cc] = round_to<scalar_t>(g[r * C + cc] + bb[cc]);
    }
    return z;
  }
};

}  // namespace gemm
}  // namespace cpu
}  // namespace convmixer_kernels
