// Geometry of the CPU GEMM blocks (gemm_blocks.cpp): argument checks, the shape of a call
// (Geom), and the GEMM operands and products (patch matrix, weight matrix, the forward GEMM
// or convolution) in the layouts the passes work in.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <string>
#include <vector>

#include "../common/checks.h"

namespace convmixer_kernels {
namespace cpu {
namespace gemm {

using at::Tensor;
using OptTensor = c10::optional<at::Tensor>;

// ---- geometry ------------------------------------------------------------------------

struct Geom {
  int64_t N, Cin, H, W, Cout, p, Ho, Wo, HWo, M, K;
  bool out_cl;  // out-shaped buffers channels_last: z is (M, Cout); else (N, Cout, HWo)
  bool in_cl;   // x channels_last: P is (N, HWo, K), K ordered (di, dj, ci); else (N, K, HWo)
  at::MemoryFormat fmt;     // layout of the out-shaped buffers (out, preact, dz)
  at::MemoryFormat in_fmt;  // x's layout (dx)
};

inline bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

inline void check_float(const Tensor& t, const char* name, const char* op) {
  TORCH_CHECK(t.device().is_cpu(), op, ": ", name, ": expected a CPU tensor, got one on ", t.device());
  TORCH_CHECK(is_float_dtype(t.scalar_type()), op, ": ", name,
              ": expected a float16, bfloat16, float32 or float64 tensor, got ", t.scalar_type());
}

inline void check_per_channel(const OptTensor& t, const char* name, int64_t c, const char* op) {
  if (!t.has_value() || !t->defined()) return;
  check_float(*t, name, op);
  TORCH_CHECK(t->dim() == 1 && t->size(0) == c, op, ": ", name, ": expected shape (", c,
              ",) (one value per output channel), got ", shape_str(t->sizes()));
}

// The layout an out_format argument names (convmixer_kernels._spec.OUT_FORMATS).
inline at::MemoryFormat parse_out_format(c10::string_view out_format, const char* op) {
  if (out_format == "channels_last") return at::MemoryFormat::ChannelsLast;
  if (out_format == "contiguous") return at::MemoryFormat::Contiguous;
  TORCH_CHECK_VALUE(false, op, ": out_format: expected 'channels_last' or 'contiguous', got '",
                    std::string(out_format), "'");
  return at::MemoryFormat::Contiguous;  // unreachable
}

inline Geom make_geom(bool patch, const Tensor& x, const Tensor& w, at::MemoryFormat out_fmt,
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
  g.in_fmt = output_format(x);
  g.in_cl = g.in_fmt == at::MemoryFormat::ChannelsLast;
  return g;
}

inline std::vector<int64_t> out_sizes(const Geom& g) { return {g.N, g.Cout, g.Ho, g.Wo}; }

// The GEMM operand built from x, in dtype acc, in x's order: channels_last x:
// (N, HWo, K), K ordered (di, dj, ci) (rows of x's NHWC memory); otherwise (N, K, HWo),
// K ordered (ci, di, dj). A view of x when x already is that matrix (pw_block, same
// dtype), else a copy.
inline Tensor patch_matrix(const Geom& g, const Tensor& x, at::ScalarType acc) {
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
inline Tensor weight_matrix(const Geom& g, const Tensor& w, at::ScalarType acc) {
  Tensor v = g.in_cl ? w.permute({0, 2, 3, 1}) : w;
  return v.to(acc).contiguous().view({g.Cout, g.K});
}

// P as per-image (N, K, HWo) matrices (a transposed view for a channels_last x).
inline Tensor patch_cols(const Geom& g, const Tensor& P) { return g.in_cl ? P.transpose(1, 2) : P; }

// An out-shaped buffer (layout g.fmt) as per-image (N, C, HWo) matrices (a transposed
// view of its (N, HWo, C) memory when channels_last).
inline Tensor out_cols(const Geom& g, const Tensor& buf) {
  return g.out_cl ? buf.permute({0, 2, 3, 1}).view({g.N, g.HWo, g.Cout}).transpose(1, 2)
                  : buf.view({g.N, g.Cout, g.HWo});
}

// buf (out-shaped, dtype acc, layout g.fmt) = conv(x, w) without bias, written by the
// GEMM in buf's layout.
inline void gemm_forward(const Geom& g, const Tensor& P, const Tensor& Wm, const Tensor& buf) {
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
inline bool conv_gemm(const Geom& g, at::ScalarType acc) { return acc == at::kFloat && g.out_cl && (g.in_cl || g.p > 1); }

// Where the convolution runs in x's own dtype (float32 x on the conv_gemm path), it adds the
// bias itself and its output is z: the forward keeps that buffer as the saved preact (no
// copy) and the backward's recompute makes the same call (the same bits). Elsewhere the
// passes add the bias and round to x's dtype.
inline bool conv_adds_bias(const Geom& g, at::ScalarType acc, at::ScalarType x_dtype) {
  return conv_gemm(g, acc) && x_dtype == acc;
}

inline Tensor conv_input(const Tensor& x) { return x.to(at::kFloat).contiguous(at::MemoryFormat::ChannelsLast); }

// conv(x, w) (+ bias where given), stride p, as a channels_last float32 tensor (out-shaped).
inline Tensor conv_forward(const Geom& g, const Tensor& xc, const Tensor& w, const OptTensor& bias = c10::nullopt) {
  const OptTensor b = bias.has_value() && bias->defined() ? OptTensor(bias->to(at::kFloat)) : OptTensor();
  Tensor z = at::convolution(xc, w.to(at::kFloat), b, {g.p, g.p}, {0, 0}, {1, 1}, false, {0, 0}, 1);
  return z.contiguous(at::MemoryFormat::ChannelsLast);  // a no-op where oneDNN ran (it writes channels_last)
}

}  // namespace gemm
}  // namespace cpu
}  // namespace convmixer_kernels
