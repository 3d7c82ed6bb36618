// Host-side argument checks and helpers shared by the CPU (csrc/cpu/) and CUDA
// (csrc/cuda/) kernels: written once here, included by both (g++ and nvcc).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/DeviceType.h>
#include <ATen/core/List.h>
#include <c10/util/Optional.h>

#include "shape_str.h"

namespace convmixer_kernels {

// The layout of a block's output for input x (convmixer_kernels.spec.output_memory_format):
// channels_last where x is channels_last and not also contiguous (one pixel or one channel
// is both), else contiguous. dw_block's out, preact and dx; the GEMM blocks' dx.
inline at::MemoryFormat output_format(const at::Tensor& x) {
  return x.is_contiguous(at::MemoryFormat::ChannelsLast) && !x.is_contiguous() ? at::MemoryFormat::ChannelsLast
                                                                               : at::MemoryFormat::Contiguous;
}

// An optional tensor argument, when given, is on x's device.
inline void check_same_device(const c10::optional<at::Tensor>& t, const at::Tensor& x, const char* arg,
                              const char* where) {
  if (t.has_value())
    TORCH_CHECK(t->device() == x.device(), where, ": ", arg, " must be on ", x.device(), " like x, got ",
                t->device());
}

// dw_block kernels: x a 4-D float32 / bfloat16 / float16 tensor on a `device` device, weight
// (C, 1, k, k) with k odd on x's device. `where` names the op and backend in the messages.
inline void check_dw_block_inputs(const at::Tensor& x, const at::Tensor& weight, const char* where,
                                  c10::DeviceType device) {
  TORCH_CHECK(x.device().type() == device, where, ": x must be a ", c10::DeviceTypeName(device), " tensor, got ",
              x.device());
  TORCH_CHECK(x.dim() == 4, where, ": x must be 4-D (N, C, H, W), got ", shape_str(x.sizes()));
  const auto st = x.scalar_type();
  TORCH_CHECK(st == at::kFloat || st == at::kBFloat16 || st == at::kHalf, where,
              ": x must be float32, bfloat16 or float16 (float64 runs on the reference backend), got ", st);
  check_same_device(weight, x, "weight", where);
  TORCH_CHECK(weight.dim() == 4 && weight.size(0) == x.size(1) && weight.size(1) == 1 &&
                  weight.size(2) == weight.size(3) && weight.size(2) % 2 == 1,
              where, ": weight must be (C, 1, k, k) with k odd and C = x.size(1), got ", shape_str(weight.sizes()));
}

// dw_block forward: the running statistics are needed without batch statistics.
inline void check_dw_block_forward_args(bool use_batch_stats, const c10::optional<at::Tensor>& running_mean,
                                        const c10::optional<at::Tensor>& running_var, const char* where) {
  TORCH_CHECK(use_batch_stats || (running_mean.has_value() && running_var.has_value()), where,
              ": running_mean and running_var are required without batch statistics");
}

// dw_block backward: grad_out like x, five output_mask entries, preact empty or like x.
inline void check_dw_block_backward_args(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact,
                                         const c10::List<bool>& output_mask, const char* where) {
  TORCH_CHECK(grad_out.sizes() == x.sizes() && grad_out.scalar_type() == x.scalar_type(), where,
              ": grad_out must match x in shape and dtype, got ", shape_str(grad_out.sizes()), " ",
              grad_out.scalar_type());
  TORCH_CHECK(output_mask.size() == 5, where, ": output_mask must have 5 entries");
  TORCH_CHECK(preact.numel() == 0 || (preact.sizes() == x.sizes() && preact.scalar_type() == x.scalar_type()),
              where, ": preact must be empty or match x in shape and dtype");
}

// dw_block's weight (C, 1, k, k) as a contiguous (C, k*k) float32 matrix, rotated by 180
// degrees when `flip` (the input gradient is a 'same' conv of dz with the flipped kernel).
inline at::Tensor dw_weight_matrix(const at::Tensor& weight, bool flip) {
  const int64_t C = weight.size(0), kk = weight.size(2) * weight.size(3);
  at::Tensor w = weight.reshape({C, kk}).to(at::kFloat);
  if (flip) w = w.flip({1});
  return w.contiguous();
}

}  // namespace convmixer_kernels
