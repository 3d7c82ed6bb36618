// The two tap loops of the CPU depthwise kernels, on tile buffers (dw_block_tiles.h):
// the 'same' convolution (dw_block_conv.cpp) and the weight gradient (dw_block_wgrad.cpp).
// Each runs AVX-512 code where use_avx512() (activation.h) says so, else AVX2 (or the
// compiler's vectors without AVX2); the conv gives the same bits either way.
#pragma once

#include <cstdint>

#include "dw_block_tiles.h"

namespace convmixer_kernels {
namespace cpu {
namespace dw {

// out (H x W x CB, row stride out_rs) = 'same' conv of the padded tile buffer P with the
// packed weights wt (k*k x CB) plus bias (CB floats).
void conv_tile(const float* P, const Plane& g, const float* wt, const float* bias, float* out, int64_t out_rs);

// dw(i, j) += sum_{h,w} D(h, w) * P(h + i, w + j) per channel, for every tap (i, j):
// D is H x W x CB (row stride W), P the padded input, dw (k*k x CB) float64.
void wgrad_tile(const float* P, const Plane& g, const float* D, double* dw);

}  // namespace dw
}  // namespace cpu
}  // namespace convmixer_kernels
