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
//
// Files: gemm_blocks.cpp (this: argument checks, the entry points and registration),
// gemm_blocks_forward.cpp and gemm_blocks_backward.cpp (the two directions),
// gemm_blocks_geom.h (Geom, checks, GEMM operands), gemm_blocks_passes.h (the fused passes'
// building blocks: loads and stores, reductions, chunking).
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "../common/checks.h"
#include "activation.h"
#include "gemm_blocks.h"
#include "gemm_blocks_geom.h"
#include "gemm_blocks_passes.h"

namespace convmixer_kernels {
namespace cpu {
namespace gemm {
namespace {

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
  return forward(g, act, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps,
                 save_preact);
}

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward_entry(
    bool patch, const char* op, const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const OptTensor& bn_weight, const Tensor& mean, const Tensor& var,
    const Tensor& preact, bool use_batch_stats, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  // grad_out and preact may come in any layout: work in preact's (the forward's output
  // layout), else grad_out's; dx is in x's.
  const Geom g = make_geom(patch, x, weight,
                           output_format(preact.numel() > 0 ? preact : grad_out), op);
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
  return backward(g, act, grad_out, x, weight, bias, bn_weight, mean, var, preact, use_batch_stats, eps, mask);
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

}  // namespace gemm
}  // namespace cpu
}  // namespace convmixer_kernels
