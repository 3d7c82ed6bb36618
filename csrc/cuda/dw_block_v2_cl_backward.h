// Depthwise block v2, channels_last backward (dw_block_v2_cl_backward.cuh, the dgrad in
// dw_block_v2_cl.cuh): the host entry points that dw_block.cu's backward calls, behind the
// v2 switch (dw_block_v2_enabled). Unvalidated on a GPU until a recorded GPU run passes the
// tests (docs/cuda-depthwise.md, "v2 backward, channels_last").
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace convmixer_kernels {
namespace cuda {

// Whether the channels_last v2 backward covers this call: x, grad_out and a saved preact
// (when given) channels_last-contiguous and not NCHW-contiguous, 16-byte aligned, x nonempty,
// float32 / bfloat16 / float16, k in {3, 5, 7, 9}, C % 4 == 0, H * W * C < 2^31.
bool dw_block_v2_cl_backward_covers(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& preact,
                                    int64_t k);

// The backward of out = x + BN(act(z)), z = round(dwconv(x) + b), from the pre-activation z
// (saved or recomputed; channels_last, x's dtype), as dw_block_v2_backward (dw_block_v2_backward.h)
// for NCHW: -> (dx, dweight, dbias, dbn_weight, dbn_bias), empty where not asked for. At least
// one of need_dx, need_dw, need_db must hold. Call only where covers() holds.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> dw_block_v2_cl_backward(
    const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& z,
    const at::Tensor& bnw, const at::Tensor& mean, const at::Tensor& var, bool use_batch_stats, double eps,
    int act, bool need_dx, bool need_dw, bool need_db, bool need_dbnw, bool need_dbnb);

}  // namespace cuda
}  // namespace convmixer_kernels
