// The CPU depthwise block's forward and backward (dw_block_forward.cpp,
// dw_block_backward.cpp) for checked arguments (dw_block.cpp checks them and registers the
// ops); arguments and results as convmixer_kernels::dw_block_{forward,backward}_kernel,
// the activation parsed, output_mask as a vector.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "activation.h"

namespace convmixer_kernels {
namespace cpu {
namespace dw {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> forward(
    const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const c10::optional<at::Tensor>& bn_bias,
    const c10::optional<at::Tensor>& running_mean, const c10::optional<at::Tensor>& running_var,
    bool use_batch_stats, double eps, Act act, bool save_preact);

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const c10::optional<at::Tensor>& bn_weight, const at::Tensor& mean, const at::Tensor& var,
    const at::Tensor& preact, bool use_batch_stats, double eps, Act act, const std::vector<bool>& mask);

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
