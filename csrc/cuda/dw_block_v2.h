// Depthwise block v2 (register-blocked kernels, dw_block_v2.cuh): the host entry points that
// dw_block.cu's launcher calls. Unvalidated on a GPU until a recorded GPU run passes the
// tests (docs/cuda-depthwise.md).
#pragma once

#include <ATen/ATen.h>

namespace convmixer_kernels {
namespace cuda {

// Whether the v2 eval forward covers this call: x NCHW-contiguous (its output is then NCHW,
// checks.h output_format), nonempty, k in {3, 5, 7, 9}, W <= 32, H * W < 2^31.
bool dw_block_v2_eval_covers(const at::Tensor& x, int64_t k);

// The eval forward (running statistics): out = x + BN(act(round(conv(x) + b))) and, when z
// is defined, the rounded pre-activation into z. wt (C, k*k) float32; b, bnw, bnb float32
// (C,) or undefined; mean, var float32 (C,). x, out, z contiguous NCHW on one device.
// act: kGelu / kGeluTanh / kRelu of dw_block_common.cuh. Call only where covers() holds.
void dw_block_v2_eval_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                              const at::Tensor& bnw, const at::Tensor& bnb, const at::Tensor& mean,
                              const at::Tensor& var, double eps, int act, const at::Tensor& out,
                              const at::Tensor& z);

}  // namespace cuda
}  // namespace convmixer_kernels
