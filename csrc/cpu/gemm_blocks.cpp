// CPU kernels of the two GEMM blocks, pw_block (1x1 conv) and patch_embed (p x p conv,
// stride p), registered as the CPU implementations of
// convmixer_kernels::{pw_block,patch_embed}_{forward,backward}_kernel.
//
// Both convolutions are plain GEMMs: pw_block multiplies the (pixels x Cin) input by the
// (Cin x Cout) weight, patch_embed does the same with the (patches x Cin*p*p) matrix of
// non-overlapping patches (a permuted copy of the image). The GEMMs run through ATen
// (MKL/oneDNN) in the compute dtype (float32, float64 for float64 inputs), written
// straight into the output buffer in the requested output layout (the forward kernels'
// `out_format`, 'channels_last' or 'contiguous'; independent of x's layout). P is read
// in x's own order (a view of x for pw_block with x already in the compute dtype):
// (N, Ho*Wo, K) for a channels_last x, (N, K, Ho*Wo) otherwise; the GEMM takes it
// transposed where the output's order differs:
//   channels_last output: z[n] (Ho*Wo, Cout) = P[n] (Ho*Wo, K) @ W^T   (one mm when x is
//                         channels_last too, else a bmm over P's transposed views)
//   NCHW output:          z[n] (Cout, Ho*Wo) = W (Cout, K) @ P^T[n] (K, Ho*Wo) (one bmm)
// In float32 with a channels_last output and a channels_last x (any x for patch_embed) the
// GEMMs run instead as ATen's convolution and its backward (oneDNN) on a channels_last x
// (conv_gemm below: torch's BLAS may not use the widest vectors of the CPU).
// The backward kernels take grad_out and preact in any layout (they work in preact's
// layout, else grad_out's) and write dx in x's layout.
// Everything else is fused into passes over the GEMM output, chunked over contiguous
// pieces of it (rows of channels for channels_last, pixel runs of one channel for NCHW):
//   forward, batch stats: [bias + round to x's dtype + save preact + act + per-channel
//     sums] then [normalise + affine + store];
//   forward, running stats: one pass doing all of it;
//   backward: [recompute act and act' from preact, xhat, sum(dy), sum(dy*xhat)] then
//     [dz = act' * BN backward] (one pass with running statistics), then the backward
//     GEMMs dx = dz @ W, dW = dz^T @ P; dbias is summed in the dz pass.
// Reductions are deterministic: the chunking depends on the shape only, each chunk
// writes its own partial sums (float64), and partials are combined in a fixed order.
// Semantics and numerics: convmixer_kernels/reference.py (forward/backward).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

#include "activation.h"
#include "../common/shape_str.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

using at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

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

Src src_of(const Tensor& t) { return Src{t.data_ptr(), t.scalar_type()}; }

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

// ---- geometry ------------------------------------------------------------------------

struct Geom {
  int64_t N, Cin, H, W, Cout, p, Ho, Wo, HWo, M, K;
  bool out_cl;  // out-shaped buffers channels_last: z is (M, Cout); else (N, Cout, HWo)
  bool in_cl;   // x channels_last: P is (N, HWo, K), K ordered (di, dj, ci); else (N, K, HWo)
  at::MemoryFormat fmt;     // layout of the out-shaped buffers (out, preact, dz)
  at::MemoryFormat in_fmt;  // x's layout (dx)
};

// convmixer_kernels._spec.output_memory_format: x's layout as the blocks read it
at::MemoryFormat output_memory_format(const Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous()
             ? at::MemoryFormat::ChannelsLast
             : at::MemoryFormat::Contiguous;
}

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

void check_float(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              ": expected a float16, bfloat16, float32 or float64 tensor, got ", t.scalar_type());
}

void check_per_channel(const OptTensor& t, const char* name, int64_t c, const char* op) {
  if (!t.has_value() || !t->defined()) return;
  check_float(*t, name, op);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": ", name, ": expected shape (", c,
              ",) (one value per output channel), got ", shape_str(t->sizes()));
}

// The layout an out_format argument names (convmixer_kernels._spec.OUT_FORMATS).
at::MemoryFormat parse_out_format(c10::string_view out_format, const char* op) {
  if (out_format == "channels_last") return at::MemoryFormat::ChannelsLast;
  if (out_format == "contiguous") return at::MemoryFormat::Contiguous;
  TORCH_CHECK_VALUE(false, op, ": out_format: expected 'channels_last' or 'contiguous', got '",
                    std::string(out_format), "'");
  return at::MemoryFormat::Contiguous;  // unreachable
}

Geom make_geom(bool patch, const Tensor& x, const Tensor& w, at::MemoryFormat out_fmt,
               const char* op) {
  check_float(x, "x", op);
  check_float(w, "weight", op);
  TORCH_CHECK(x.dim() == 4, op, ": x: expected a 4-D (N, C, H, W) tensor, got shape ", shape_str(x.sizes()));
  TORCH_CHECK(x.size(0) >= 1 && x.size(1) >= 1 && x.size(2) >= 1 && x.size(3) >= 1, op,
              ": x: every dimension of (N, C, H, W) must be >= 1, got ", shape_str(x.sizes()));
  TORCH_CHECK(w.dim() == 4, op, ": weight: expected a 4-D conv weight, got shape ", shape_str(w.sizes()));
  TORCH_CHECK(w.size(0) >= 1, op, ": weight: expected at least one output channel, got ", shape_str(w.sizes()));
  TORCH_CHECK(w.size(1) == x.size(1), op, ": weight: expected ", x.size(1),
              " input channels (x has C=", x.size(1), "), got weight of shape ", shape_str(w.sizes()));
  TORCH_CHECK(w.size(2) == w.size(3), op, ": weight: expected a square kernel, got shape ", shape_str(w.sizes()));
  TORCH_CHECK(w.size(2) >= 1, op, ": weight: kernel size must be >= 1, got shape ", shape_str(w.sizes()));
  if (!patch) {
    TORCH_CHECK(w.size(2) == 1, op, ": weight: expected a 1x1 weight (Cout, Cin, 1, 1), got ", shape_str(w.sizes()));
  }
  Geom g;
  g.N = x.size(0);
  g.Cin = x.size(1);
  g.H = x.size(2);
  g.W = x.size(3);
  g.Cout = w.size(0);
  g.p = w.size(2);
  TORCH_CHECK(g.H >= g.p && g.W >= g.p, op, ": x: spatial size ", g.H, "x", g.W,
              " is smaller than the patch size ", g.p);
  g.Ho = g.H / g.p;
  g.Wo = g.W / g.p;
  g.HWo = g.Ho * g.Wo;
  g.M = g.N * g.HWo;
  g.K = g.Cin * g.p * g.p;
  g.fmt = out_fmt;
  // With one output pixel or one channel both layouts are the same memory order: take the
  // NCHW orientation then, so that a backward that derives the layout from its tensors
  // (preact or grad_out, ambiguous there) recomputes z with the forward's GEMM, bit for bit.
  g.out_cl = g.fmt == at::MemoryFormat::ChannelsLast && g.HWo > 1 && g.Cout > 1;
  g.in_fmt = output_memory_format(x);
  g.in_cl = g.in_fmt == at::MemoryFormat::ChannelsLast;
  return g;
}

std::vector<int64_t> out_sizes(const Geom& g) { return {g.N, g.Cout, g.Ho, g.Wo}; }

// The GEMM operand built from x, in dtype acc, in x's order: channels_last x:
// (N, HWo, K), K ordered (di, dj, ci) (rows of x's NHWC memory); otherwise (N, K, HWo),
// K ordered (ci, di, dj). A view of x when x already is that matrix (pw_block, same
// dtype), else a copy.
Tensor patch_matrix(const Geom& g, const Tensor& x, at::ScalarType acc) {
  Tensor v;
  std::vector<int64_t> shape;
  if (g.in_cl) {
    v = x.permute({0, 2, 3, 1})
            .narrow(1, 0, g.Ho * g.p)
            .narrow(2, 0, g.Wo * g.p)
            .view({g.N, g.Ho, g.p, g.Wo, g.p, g.Cin})
            .permute({0, 1, 3, 2, 4, 5});
    shape = {g.N, g.HWo, g.K};
  } else {
    v = x.narrow(2, 0, g.Ho * g.p)
            .narrow(3, 0, g.Wo * g.p)
            .view({g.N, g.Cin, g.Ho, g.p, g.Wo, g.p})
            .permute({0, 1, 3, 5, 2, 4});
    shape = {g.N, g.K, g.HWo};
  }
  if (v.scalar_type() == acc && v.is_contiguous()) return v.view(shape);
  Tensor m = at::empty(v.sizes(), x.options().dtype(acc));
  m.copy_(v);
  return m.view(shape);
}

// The weight as (Cout, K) in dtype acc, K ordered as patch_matrix's.
Tensor weight_matrix(const Geom& g, const Tensor& w, at::ScalarType acc) {
  Tensor v = g.in_cl ? w.permute({0, 2, 3, 1}) : w;
  return v.to(acc).contiguous().view({g.Cout, g.K});
}

// P as per-image (N, K, HWo) matrices (a transposed view for a channels_last x).
Tensor patch_cols(const Geom& g, const Tensor& P) { return g.in_cl ? P.transpose(1, 2) : P; }

// An out-shaped buffer (layout g.fmt) as per-image (N, C, HWo) matrices (a transposed
// view of its (N, HWo, C) memory when channels_last).
Tensor out_cols(const Geom& g, const Tensor& buf) {
  return g.out_cl ? buf.permute({0, 2, 3, 1}).view({g.N, g.HWo, g.Cout}).transpose(1, 2)
                  : buf.view({g.N, g.Cout, g.HWo});
}

// buf (out-shaped, dtype acc, layout g.fmt) = conv(x, w) without bias, written by the
// GEMM in buf's layout.
void gemm_forward(const Geom& g, const Tensor& P, const Tensor& Wm, const Tensor& buf) {
  if (g.out_cl) {
    if (g.in_cl) {
      Tensor b2 = buf.permute({0, 2, 3, 1}).view({g.M, g.Cout});
      at::mm_out(b2, P.view({g.M, g.K}), Wm.t());
    } else {
      // z[n] (HWo, Cout) = P[n]^T (HWo, K) @ W^T (K, Cout)
      Tensor b3 = buf.permute({0, 2, 3, 1}).view({g.N, g.HWo, g.Cout});
      at::bmm_out(b3, P.transpose(1, 2), Wm.t().expand({g.N, g.K, g.Cout}));
    }
  } else {
    // z[n] (Cout, HWo) = W (Cout, K) @ P[n] (K, HWo)
    Tensor b3 = buf.view({g.N, g.Cout, g.HWo});
    at::bmm_out(b3, Wm.expand({g.N, g.Cout, g.K}), patch_cols(g, P));
  }
}

// The float32 channels_last GEMMs run as ATen convolutions instead (conv_gemm): on CPUs
// where torch's BLAS does not use the widest vectors (seen on an AMD EPYC with AVX-512:
// torch.mm at 0.2 TFLOP/s against 0.46 for oneDNN's channels_last 1x1 convolution, the
// one eager PyTorch runs), they run at oneDNN's speed, and elsewhere at eager's. x is read
// as a channels_last float32 tensor: itself when it is one, else one copy, which the patch
// embedding's GEMM path makes anyway (its patch matrix). pw_block with an NCHW x keeps the
// GEMMs (there the copy cost more than oneDNN gained: 0.89-0.96x in an A/B; the patch
// embedding of NCHW images gained 1.36-1.61x), as do NCHW outputs and float64.
bool conv_gemm(const Geom& g, at::ScalarType acc) { return acc == at::kFloat && g.out_cl && (g.in_cl || g.p > 1); }

Tensor conv_input(const Tensor& x) { return x.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast); }

// conv(x, w) without bias, stride p, as a channels_last float32 tensor (out-shaped).
Tensor conv_forward(const Geom& g, const Tensor& xc, const Tensor& w) {
  Tensor z = at::convolution(xc, w.to(at::kFloat), c10::nullopt, {g.p, g.p}, {0, 0}, {1, 1}, false, {0, 0}, 1);
  return z.contiguous(at::MemoryFormat::ChannelsLast);  // a no-op where oneDNN ran (it writes channels_last)
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

Chunking make_chunking(const Geom& g) {
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
std::vector<double> combine(const Chunking& k, const std::vector<double>& part) {
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

bool present(const OptTensor& t) { return t.has_value() && t->defined(); }

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

// ---- forward ---------------------------------------------------------------------------

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
  if (conv_gemm(g, acc)) {
    buf = conv_forward(g, conv_input(x), weight);
    out = kSame ? buf : at::empty(out_sizes(g), x.options().memory_format(g.fmt));
  } else {
    out = at::empty(out_sizes(g), x.options().memory_format(g.fmt));
    buf = kSame ? out : at::empty(out_sizes(g), x.options().dtype(acc).memory_format(g.fmt));
    Tensor P = patch_matrix(g, x, acc);
    Tensor Wm = weight_matrix(g, weight, acc);
    gemm_forward(g, P, Wm, buf);
  }
  Tensor preact = save_preact ? at::empty(out_sizes(g), x.options().memory_format(g.fmt))
                              : at::empty({0}, x.options());

  const std::vector<acc_t> bias_v = channel_values<acc_t>(bias, C, acc_t(0));
  const std::vector<acc_t> w_v = channel_values<acc_t>(bn_weight, C, acc_t(1));
  const std::vector<acc_t> b_v = channel_values<acc_t>(bn_bias, C, acc_t(0));

  const Chunking k = make_chunking(g);
  acc_t* gb = buf.data_ptr<acc_t>();
  scalar_t* ob = out.data_ptr<scalar_t>();
  scalar_t* pb = save_preact ? preact.data_ptr<scalar_t>() : nullptr;
  ZSource<scalar_t, acc_t> zs;
  zs.gemm = gb;
  zs.bias = present(bias) ? bias_v.data() : nullptr;
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
      acc_t* a = store_a ? gb + off : scratch + k.max_len;
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
      normalise(gb + off, ob + off, len, c);
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

// ---- backward --------------------------------------------------------------------------

template <typename scalar_t>
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_impl(
    const Geom& g, Act act, const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const OptTensor& bn_weight, const Tensor& mean, const Tensor& var,
    const Tensor& preact, bool use_batch_stats, double eps, const std::vector<bool>& mask) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr bool kSame = std::is_same<scalar_t, acc_t>::value;
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

  const bool have_preact = preact.numel() > 0;
  Tensor dy = grad_out.contiguous(g.fmt);  // a copy only when grad_out is in another layout
  Tensor pre = have_preact ? preact.contiguous(g.fmt) : Tensor();
  const bool use_conv = conv_gemm(g, acc);
  Tensor P, Wm, D, xc;
  if (use_conv) {
    if (!have_preact || need_dw) xc = conv_input(x);
  } else {
    if (!have_preact || need_dw) P = patch_matrix(g, x, acc);
    if (!have_preact || need_dx) Wm = weight_matrix(g, weight, acc);
  }
  if (!have_preact) {  // z recomputed with the forward's GEMM: the same bits
    if (use_conv) {
      D = conv_forward(g, xc, weight);
    } else {
      D = at::empty(out_sizes(g), x.options().dtype(acc).memory_format(g.fmt));
      gemm_forward(g, P, Wm, D);
    }
  } else if (need_dz) {
    D = at::empty(out_sizes(g), x.options().dtype(acc).memory_format(g.fmt));
  }
  if (!need_dw) P = Tensor();

  const std::vector<acc_t> bias_v = channel_values<acc_t>(bias, C, acc_t(0));
  const std::vector<acc_t> w_v = channel_values<acc_t>(bn_weight, C, acc_t(1));
  const bool have_bnw = present(bn_weight);
  Tensor mean_c = mean.contiguous(), var_c = var.contiguous();
  const acc_t* mp = mean_c.data_ptr<acc_t>();
  const acc_t* vp = var_c.data_ptr<acc_t>();
  std::vector<acc_t> invstd(static_cast<size_t>(C));
  const acc_t eps_a = static_cast<acc_t>(eps);
  for (int64_t c = 0; c < C; ++c) invstd[c] = acc_t(1) / std::sqrt(vp[c] + eps_a);

  ZSource<scalar_t, acc_t> zs;
  if (have_preact) {
    zs.preact = src_of(pre);
  } else {
    zs.gemm = D.data_ptr<acc_t>();
    zs.bias = present(bias) ? bias_v.data() : nullptr;
    zs.direct = false;  // act' is written over the recomputed z
  }
  zs.C = C;
  const Src dys = src_of(dy);
  acc_t* Db = D.defined() ? D.data_ptr<acc_t>() : nullptr;
  const Chunking k = make_chunking(g);

  const bool two_pass = use_batch_stats && need_dz;
  const bool want_sdy = need_dbnb || two_pass, want_sdyx = need_dbnw || two_pass;
  std::vector<double> Sdy(want_sdy ? k.nparts : 0), Sdyx(want_sdyx ? k.nparts : 0),
      Sdz(need_db ? k.nparts : 0);

  // g = dy * w (when bn_weight), then the BN backward coefficient pieces per channel.
  auto times_w = [&](const acc_t* d_y, acc_t* out, int64_t len, int64_t c) {
    if (c >= 0) {
      const acc_t w = w_v[c];
      for (int64_t i = 0; i < len; ++i) out[i] = d_y[i] * w;
    } else {
      const acc_t* __restrict__ w = w_v.data();
      for (int64_t r = 0; r < len / C; ++r)
        for (int64_t cc = 0; cc < C; ++cc) out[r * C + cc] = d_y[r * C + cc] * w[cc];
    }
  };

  // With batch statistics the dz pass needs sum(dy) and sum(dy * xhat) first: two passes.
  // An expensive activation (gelu) is evaluated once, in pass 1, which stores xhat and
  // act'; a cheap one (relu) is recomputed in pass 2 instead, which moves less memory.
  const bool store = two_pass && act != Act::Relu;
  std::vector<acc_t> gm, gxm;  // per channel: mean(g), mean(g * xhat), g = dy * bn_weight
  auto batch_coefficients = [&]() {
    const std::vector<double> sdy = combine(k, Sdy), sdyx = combine(k, Sdyx);
    const double inv_m = 1.0 / static_cast<double>(g.M);
    gm.resize(static_cast<size_t>(C));
    gxm.resize(static_cast<size_t>(C));
    for (int64_t c = 0; c < C; ++c) {
      gm[c] = static_cast<acc_t>(static_cast<double>(w_v[c]) * sdy[c] * inv_m);
      gxm[c] = static_cast<acc_t>(static_cast<double>(w_v[c]) * sdyx[c] * inv_m);
    }
  };
  Tensor X;
  if (store) {
    // Pass 1: xhat (stored), act' (stored in D), sum(dy), sum(dy * xhat).
    X = at::empty(out_sizes(g), x.options().dtype(acc).memory_format(g.fmt));
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
    batch_coefficients();
    // Pass 2: dz = act' * (g - mean(g) - xhat * mean(g * xhat)) * invstd, sum(dz).
    run_chunks<acc_t>(k, 2, [&](int64_t off, int64_t len, int64_t c, int64_t slot, acc_t* scratch) {
      const acc_t* d_y = load(dys, off, len, scratch);
      acc_t* gg = scratch + k.max_len;
      if (have_bnw) {
        times_w(d_y, gg, len, c);
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
  } else {
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
        times_w(d_y, a, len, c);  // a (xhat) is no longer needed
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
      batch_coefficients();
      // Pass 2 (cheap activation): recompute a, act' and xhat; dz as above; sum(dz).
      run_chunks<acc_t>(k, 5, [&](int64_t off, int64_t len, int64_t c, int64_t slot, acc_t* scratch) {
        const acc_t* z = zs.get(off, len, c, scratch);
        acc_t* a = scratch + k.max_len;
        acc_t* dd = scratch + 2 * k.max_len;
        act_fwd_deriv(act, z, a, dd, len);
        const acc_t* d_y = load(dys, off, len, scratch + 3 * k.max_len);
        if (have_bnw) {
          times_w(d_y, scratch + 4 * k.max_len, len, c);
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
  X = Tensor();

  auto per_channel_out = [&](const std::vector<double>& part, at::ScalarType dtype) {
    const std::vector<double> tot = combine(k, part);
    Tensor t = at::empty({C}, x.options().dtype(at::kDouble));
    std::copy(tot.begin(), tot.end(), t.data_ptr<double>());
    return dtype == at::kDouble ? t : t.to(dtype);
  };
  Tensor dbn_weight = need_dbnw ? per_channel_out(Sdyx, acc) : empty_s();
  Tensor dbn_bias = need_dbnb ? per_channel_out(Sdy, acc) : empty_s();
  Tensor dbias = need_db ? per_channel_out(Sdz, weight.scalar_type()) : empty_x();

  Tensor dweight = empty_x(), dx = empty_x();
  if (use_conv && (need_dw || need_dx)) {
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
    return std::make_tuple(dx, dweight, dbias, dbn_weight, dbn_bias);
  }
  if (need_dw) {
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
  }
  if (need_dx) {
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
  }
  return std::make_tuple(dx, dweight, dbias, dbn_weight, dbn_bias);
}

// ---- op entry points -------------------------------------------------------------------

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_entry(
    bool patch, const char* op, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool use_batch_stats, double eps, c10::string_view activation,
    bool save_preact, c10::string_view out_format) {
  const Geom g = make_geom(patch, x, weight, parse_out_format(out_format, op), op);
  const int64_t C = g.Cout;
  check_per_channel(bias, "bias", C, op);
  check_per_channel(bn_weight, "bn_weight", C, op);
  check_per_channel(bn_bias, "bn_bias", C, op);
  check_per_channel(running_mean, "running_mean", C, op);
  check_per_channel(running_var, "running_var", C, op);
  TORCH_CHECK(use_batch_stats || (present(running_mean) && present(running_var)), op,
              ": running_mean, running_var: required when use_batch_stats is False");
  const Act act = parse_act(std::string(activation));
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convmixer_gemm_block", [&] {
    return forward_impl<scalar_t>(g, act, x, weight, bias, bn_weight, bn_bias, running_mean,
                                  running_var, use_batch_stats, eps, save_preact);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_entry(
    bool patch, const char* op, const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const OptTensor& bn_weight, const Tensor& mean, const Tensor& var,
    const Tensor& preact, bool use_batch_stats, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  // grad_out and preact may come in any layout: work in preact's (the forward's output
  // layout), else grad_out's; dx is in x's.
  const Geom g = make_geom(patch, x, weight,
                           output_memory_format(preact.numel() > 0 ? preact : grad_out), op);
  const int64_t C = g.Cout;
  check_per_channel(bias, "bias", C, op);
  check_per_channel(bn_weight, "bn_weight", C, op);
  const at::ScalarType sdt = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const auto& nt : {std::make_pair("mean", &mean), std::make_pair("var", &var)}) {
    const Tensor& t = *nt.second;
    TORCH_CHECK(t.device().is_cpu(), op, ": ", nt.first, ": expected a CPU tensor, got one on ", t.device());
    TORCH_CHECK(t.dim() == 1 && t.size(0) == C, op, ": ", nt.first, ": expected shape (", C,
                ",), got ", shape_str(t.sizes()));
    TORCH_CHECK(t.scalar_type() == sdt, op, ": ", nt.first, ": expected the statistics dtype ",
                sdt, " for x of dtype ", x.scalar_type(), ", got ", t.scalar_type());
  }
  check_float(grad_out, "grad_out", op);
  TORCH_CHECK(grad_out.sizes() == c10::IntArrayRef(out_sizes(g)), op, ": grad_out: expected shape ",
              shape_str(out_sizes(g)), ", got ", shape_str(grad_out.sizes()));
  if (preact.numel() > 0) {
    check_float(preact, "preact", op);
    TORCH_CHECK(preact.sizes() == c10::IntArrayRef(out_sizes(g)), op, ": preact: expected shape ",
                shape_str(out_sizes(g)), " or an empty tensor, got ", shape_str(preact.sizes()));
  }
  TORCH_CHECK(output_mask.size() == 5, op, ": output_mask: expected 5 entries, got ", output_mask.size());
  std::vector<bool> mask;
  for (const bool m : output_mask) mask.push_back(m);
  const Act act = parse_act(std::string(activation));
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "convmixer_gemm_block", [&] {
    return backward_impl<scalar_t>(g, act, grad_out, x, weight, bias, bn_weight, mean, var, preact,
                                   use_batch_stats, eps, mask);
  });
}

std::tuple<Tensor, Tensor, Tensor, Tensor> pw_block_forward_cpu(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool use_batch_stats, double eps, c10::string_view activation, bool save_preact,
    c10::string_view out_format) {
  return forward_entry(false, "pw_block_forward_kernel", x, weight, bias, bn_weight, bn_bias,
                       running_mean, running_var, use_batch_stats, eps, activation, save_preact,
                       out_format);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> patch_embed_forward_cpu(
    const Tensor& x, const Tensor& weight, const OptTensor& bias, const OptTensor& bn_weight,
    const OptTensor& bn_bias, const OptTensor& running_mean, const OptTensor& running_var,
    bool use_batch_stats, double eps, c10::string_view activation, bool save_preact,
    c10::string_view out_format) {
  return forward_entry(true, "patch_embed_forward_kernel", x, weight, bias, bn_weight, bn_bias,
                       running_mean, running_var, use_batch_stats, eps, activation, save_preact,
                       out_format);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> pw_block_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const Tensor& mean, const Tensor& var, const Tensor& preact,
    bool use_batch_stats, double eps, c10::string_view activation, const c10::List<bool>& output_mask) {
  return backward_entry(false, "pw_block_backward_kernel", grad_out, x, weight, bias, bn_weight,
                        mean, var, preact, use_batch_stats, eps, activation, output_mask);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> patch_embed_backward_cpu(
    const Tensor& grad_out, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const Tensor& mean, const Tensor& var, const Tensor& preact,
    bool use_batch_stats, double eps, c10::string_view activation, const c10::List<bool>& output_mask) {
  return backward_entry(true, "patch_embed_backward_kernel", grad_out, x, weight, bias, bn_weight,
                        mean, var, preact, use_batch_stats, eps, activation, output_mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("pw_block_forward_kernel", &pw_block_forward_cpu);
  m.impl("pw_block_backward_kernel", &pw_block_backward_cpu);
  m.impl("patch_embed_forward_kernel", &patch_embed_forward_cpu);
  m.impl("patch_embed_backward_kernel", &patch_embed_backward_cpu);
}

}  // namespace cpu
}  // namespace convmixer_kernels
