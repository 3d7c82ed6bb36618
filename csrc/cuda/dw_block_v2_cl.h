// Depthwise block v2, channels_last eval and train forwards (dw_block_v2_cl.cuh,
// dw_block_v2_cl_train.cuh): the host entry points
// that dw_block.cu's launcher calls, behind the same switch as the NCHW v2 kernels
// (dw_block_v2_enabled, dw_block_v2.h). Unvalidated on a GPU until a recorded GPU run passes
// the tests (docs/cuda-depthwise.md).
#pragma once

#include <ATen/ATen.h>

namespace convmixer_kernels {
namespace cuda {

// Whether the channels_last v2 eval forward covers this call: x channels_last-contiguous and
// not also NCHW-contiguous (its output is then channels_last, checks.h output_format),
// nonempty, float32/bfloat16/float16, k in {3, 5, 7, 9}, C % 4 == 0, the data pointer 16-byte
// aligned. Any N, H, W.
bool dw_block_v2_cl_eval_covers(const at::Tensor& x, int64_t k);

// The eval forward (running statistics), channels_last: out = x + BN(act(round(conv(x) + b)))
// and, when z is defined, the rounded pre-activation into z. wt (C, k*k) float32; b, bnw, bnb
// float32 (C,) or undefined; mean, var float32 (C,). out and z channels_last-contiguous, 16-byte
// aligned. Call only where covers() holds.
void dw_block_v2_cl_eval_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                                 const at::Tensor& bnw, const at::Tensor& bnb, const at::Tensor& mean,
                                 const at::Tensor& var, double eps, int act, const at::Tensor& out,
                                 const at::Tensor& z);

// Whether the channels_last v2 train forward covers this call (the same set as the eval).
bool dw_block_v2_cl_train_covers(const at::Tensor& x, int64_t k);

// The train forward (batch statistics), channels_last: z = round(conv(x) + b) into z (the saved
// pre-activation, or out as scratch, as v1), the batch mean and biased variance of act(z) into
// mean and var (float32 (C,)), then out = x + BN(act(z)) with them. Three kernels:
// cl_train_kernel (conv + per-block partial statistics), cl_finalize_kernel (fixed-order
// combination in double), cl_norm_kernel. out and z channels_last-contiguous, 16-byte aligned.
void dw_block_v2_cl_train_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                                  const at::Tensor& bnw, const at::Tensor& bnb, double eps, int act,
                                  const at::Tensor& out, const at::Tensor& z, const at::Tensor& mean,
                                  const at::Tensor& var);

}  // namespace cuda
}  // namespace convmixer_kernels
