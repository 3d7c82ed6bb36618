// Depthwise block v2, generic path (dw_block_v2_generic.cuh): the host entry points that
// dw_block.cu's launcher calls for the calls the templated v2 kernels (dw_block_v2.h,
// dw_block_v2_backward.h, dw_block_v2_cl*.h) do not cover: any odd k in 3..31, any W (column
// tiles of 32 with a halo), strided views of x / grad_out / preact (read through their
// strides, no copy); outputs NCHW-contiguous or channels_last-contiguous (output_format(x)).
// Unvalidated on a GPU until a recorded GPU run passes the tests (docs/cuda-depthwise.md).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace convmixer_kernels {
namespace cuda {

// Whether the generic v2 forward (eval and train) covers this call: x 4-D, nonempty, float32 /
// bfloat16 / float16, k odd in 3..31, any strides (the output layout is checks.h output_format:
// channels_last for channels_last-contiguous x, else NCHW), C, H, W < 2^31, and the device has the
// shared memory the kernel size needs (k >= 19 uses the opt-in above 48 KB per block).
bool dw_block_v2_generic_covers(const at::Tensor& x, int64_t k);

// The eval forward, as dw_block_v2_eval_forward (dw_block_v2.h), for any x covered above:
// out and z (when defined) contiguous in output_format(x), x read through its strides.
void dw_block_v2_generic_eval_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                                      const at::Tensor& bnw, const at::Tensor& bnb, const at::Tensor& mean,
                                      const at::Tensor& var, double eps, int act, const at::Tensor& out,
                                      const at::Tensor& z);

// The train forward, as dw_block_v2_train_forward: z (output_format(x): the saved pre-activation
// or out as scratch), per-tile (mean, M2) partials, a fixed-order finalize into mean / var, then
// out = x + BN(act(z)).
void dw_block_v2_generic_train_forward(const at::Tensor& x, int64_t k, const at::Tensor& wt, const at::Tensor& b,
                                       const at::Tensor& bnw, const at::Tensor& bnb, double eps, int act,
                                       const at::Tensor& out, const at::Tensor& z, const at::Tensor& mean,
                                       const at::Tensor& var);

// Whether the generic v2 backward covers this call: x as dw_block_v2_generic_covers (with the
// backward's shared memory); grad_out and preact any strides (read through them).
bool dw_block_v2_generic_backward_covers(const at::Tensor& grad_out, const at::Tensor& x, int64_t k);

// The backward, as dw_block_v2_backward (dw_block_v2_backward.h): z the pre-activation (saved or
// recomputed, any strides). dx contiguous in output_format(x). Weight / bias / BN gradients from per-(image
// group, channel) partial sums reduced in a fixed order, no atomics.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_v2_generic_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& bnw, const at::Tensor& mean, const at::Tensor& var, bool use_batch_stats, double eps,
    int act, bool need_dx, bool need_dw, bool need_db, bool need_dbnw, bool need_dbnb);

}  // namespace cuda
}  // namespace convmixer_kernels
