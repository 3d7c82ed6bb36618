// Depthwise block v2 backward (register-blocked kernels, dw_block_v2_backward.cuh): the host
// entry points that dw_block.cu's backward calls. Unvalidated on a GPU until a recorded GPU
// run passes tests/test_cuda_dw_block_v2.py (docs/cuda-depthwise.md, "v2 backward").
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace convmixer_kernels {
namespace cuda {

// Whether the v2 backward covers this call: x, grad_out and a saved preact (when given)
// NCHW-contiguous, x nonempty, float32 / bfloat16 / float16, k in {3, 5, 7, 9}, W <= 32,
// H * W < 2^31, C < 2^31. (The output dx is then NCHW, checks.h output_format.)
bool dw_block_v2_backward_covers(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact,
                                 int64_t k);

// The backward of out = x + BN(act(z)), z = round(dwconv(x) + b), from the pre-activation z
// (saved or recomputed; NCHW-contiguous, x's dtype). bnw: float32 (C,) or undefined; mean,
// var: float32 (C,) contiguous, the statistics the forward normalised with; use_batch_stats:
// the gradient flows through them (training). act: kGelu / kGeluTanh / kRelu of
// dw_block_common.cuh. At least one of need_dx, need_dw, need_db must hold.
// -> (dx, dweight, dbias, dbn_weight, dbn_bias), as dw_block_backward_kernel returns them
// (an empty tensor where not asked for). Call only where covers() holds.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_v2_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& bnw, const at::Tensor& mean, const at::Tensor& var, bool use_batch_stats, double eps,
    int act, bool need_dx, bool need_dw, bool need_db, bool need_dbnw, bool need_dbnb);

}  // namespace cuda
}  // namespace convmixer_kernels
