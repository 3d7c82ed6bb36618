// Depthwise block v2 (register-blocked kernels, dw_block_v2.cuh): the host entry points that
// dw_block.cu's launcher calls. Unvalidated on a GPU until a recorded GPU run passes the
// tests (docs/cuda-depthwise.md).
#pragma once

#include <ATen/ATen.h>

namespace convmixer_kernels {
namespace cuda {

// Whether v2 may run at all (read at each call): CONVMIXER_KERNELS_CUDA_DW_V2=0 -> no (v1
// everywhere); =1 -> yes (explicit opt-in, validated or not); unset/other -> only when Python
// found this build's source hash validated in the manifest (convmixer_kernels/validated/cuda.json)
// and said so through _cuda_dw_v2_set_validated. Default: no (v1).
bool dw_block_v2_enabled();

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

// Whether the v2 train forward covers this call (the same set as the eval forward).
bool dw_block_v2_train_covers(const at::Tensor& x, int64_t k);

// The train forward (batch statistics): z = round(conv(x) + b) into z (the saved pre-activation,
// or out as scratch, as v1), the batch mean and biased variance of act(z) into mean and var
// (float32 (C,)), then out = x + BN(act(z)) with them. Three kernels: train_kernel (conv +
// per-tile partial statistics), finalize_kernel (fixed-order combination), norm_kernel.
void dw_block_v2_train_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                               const at::Tensor& bnw, const at::Tensor& bnb, double eps, int act,
                               const at::Tensor& out, const at::Tensor& z, const at::Tensor& mean,
                               const at::Tensor& var);

}  // namespace cuda
}  // namespace convmixer_kernels
