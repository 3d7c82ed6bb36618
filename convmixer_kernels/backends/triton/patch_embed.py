"""Triton kernels of the patch embedding ``BN(act(conv_pxp_stride_p(img) + b))``: a GEMM
whose A operand is read straight from the image by index arithmetic (no im2col copy;
trailing rows/columns that do not fill a patch are dropped, as ``nn.Conv2d`` does),
with the pointwise block's epilogue; backward computes the image gradient only when
asked and the weight gradient by a GEMM that reads the patches in place. The kernels
are shared with the pointwise block (``_gemm``)."""
from ._gemm import backward, forward

__all__ = ["forward", "backward"]
