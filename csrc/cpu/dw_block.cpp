// Fused CPU kernels of the residual depthwise block
//   out = x + BN(act(dwconv_k(x) + b)),  k odd, 'same' zero padding
// registered as the CPU implementation of convmixer_kernels::dw_block_{forward,backward}_kernel
// (schemas in convmixer_kernels/schema.py, semantics in convmixer_kernels/reference.py).
//
// Work unit: a tile of CB = 8 channels of one image. Each tile is read once, in the loop
// order its strides favour (8 contiguous channels per pixel for channels_last, rows for
// NCHW, float32 NCHW rows 8 pixels x 8 channels at a time through an in-register transpose;
// any strided view works), into a zero-padded, channel-interleaved float32 buffer
// that stays in L1/L2, so one AVX2 vector holds the 8 channels of a pixel. The k x k taps
// then run branch-free over it with 2 rows x 4 pixels of outputs in registers (taps
// unrolled for k = 3, 5, 7, 9; a run-time loop for other k).
// Where the CPU has AVX-512 (use_avx512(), activation.h; CONVMIXER_KERNELS_CPU_ISA=avx2
// forces the AVX2 code) the conv and the weight gradient run on 16-float vectors holding 2
// neighbouring pixels (2 rows x 8 pixels per register block); the conv gives the same bits
// as the AVX2 code, the weight gradient sums pixel pairs first (same to rounding).
// Training forward and backward run in channel-group order where there are enough channels
// (group_subs()): a thread takes a group of channels through all N images and keeps, in its
// own buffers, act(z) (forward; in L2) or act(z), act'(z) and dy (backward) between the
// statistics step and the normalise / gradient step, so z, dy and the activation are
// loaded or evaluated once per element. Otherwise (few channels, large planes) image
// order: training forward keeps act(z) of every tile in a float32 buffer of the
// activation's size between two passes; the backward's two passes each load z and dy.
// Each sub-block's act(z) is computed (and its statistics taken) right after its conv, while
// it is in L1. Results go back through the same layout-aware tile writer; for channels_last
// tiles the last step (x + act(z) * scale + shift, or dx = conv + dy) is fused with the
// write, one pixel at a time (write_tile_cl), with x taken from the input or the tile buffer
// instead of being read into a tile buffer again. Per-thread buffers come from a per-thread
// pool kept between calls (Buf: at most 8 MiB per thread), not from the system at every
// call. Statistics and weight gradients are reduced per (n, c) plane and then over n in a
// fixed order, so results do not depend on the number of threads (deterministic for a
// given input).
//
// Files: dw_block.cpp (this: argument checks and registration), dw_block_forward.cpp and
// dw_block_backward.cpp (the passes), dw_block_tiles.h (tile geometry and I/O),
// dw_block_conv.cpp / dw_block_wgrad.cpp (the tap loops, dw_block_conv.h),
// dw_block_stats.h (statistics and the affine), dw_block_buffers.h (packed weights,
// per-thread buffers, for_each_tile); simd.h (V8) and activation.h are shared.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <string>
#include <tuple>
#include <vector>

#include "../common/checks.h"
#include "activation.h"
#include "dw_block.h"

namespace convmixer_kernels {
namespace cpu {
namespace {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_forward_cpu(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, c10::string_view activation, bool save_preact) {
  const char* where = "dw_block_forward_kernel (cpu)";
  check_dw_block_inputs(x, weight, where, at::kCPU);
  check_dw_block_forward_args(use_batch_stats, running_mean, running_var, where);
  const Act act = parse_act(std::string(activation));
  return dw::forward(x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats, eps, act,
                     save_preact);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_backward_cpu(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact, bool use_batch_stats, double eps, c10::string_view activation,
    const c10::List<bool>& output_mask) {
  const char* where = "dw_block_backward_kernel (cpu)";
  check_dw_block_inputs(x, weight, where, at::kCPU);
  check_dw_block_backward_args(grad_out, x, preact, output_mask, where);
  const Act act = parse_act(std::string(activation));
  std::vector<bool> mask;
  for (const bool m : output_mask) mask.push_back(m);
  return dw::backward(grad_out, x, weight, bias, bn_weight, mean, var, preact, use_batch_stats, eps, act, mask);
}

}  // namespace

TORCH_LIBRARY_IMPL(convmixer_kernels, CPU, m) {
  m.impl("dw_block_forward_kernel", &dw_block_forward_cpu);
  m.impl("dw_block_backward_kernel", &dw_block_backward_cpu);
}

}  // namespace cpu
}  // namespace convmixer_kernels
