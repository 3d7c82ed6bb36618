// The CPU GEMM blocks' forward and backward (gemm_blocks_forward.cpp,
// gemm_blocks_backward.cpp) for checked arguments: gemm_blocks.cpp checks them, builds
// the Geom and registers the ops. Dispatch over x's dtype happens here.
#pragma once

#include <ATen/ATen.h>

#include <tuple>
#include <vector>

#include "activation.h"
#include "gemm_blocks_geom.h"

namespace convmixer_kernels {
namespace cpu {
namespace gemm {

std::tuple<Tensor, Tensor, Tensor, Tensor> forward(
    const Geom& g, Act act, const Tensor& x, const Tensor& weight, const OptTensor& bias,
    const OptTensor& bn_weight, const OptTensor& bn_bias, const OptTensor& running_mean,
    const OptTensor& running_var, bool use_batch_stats, double eps, bool save_preact);

std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> backward(
    const Geom& g, Act act, const Tensor& grad_out, const Tensor& x, const Tensor& weight,
    const OptTensor& bias, const OptTensor& bn_weight, const Tensor& mean, const Tensor& var,
    const Tensor& preact, bool use_batch_stats, double eps, const std::vector<bool>& mask);

}  // namespace gemm
}  // namespace cpu
}  // namespace convmixer_kernels
