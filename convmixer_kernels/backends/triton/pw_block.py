"""Triton kernels of the pointwise block ``BN(act(conv1x1(x) + b))``: a GEMM over the
N*H*W pixels (rows) x Cin (reduction) -> Cout with the bias, activation and BatchNorm
in its epilogue; backward by dgrad/wgrad GEMMs after a fused BatchNorm/activation
backward pass. The kernels are shared with the patch embedding (``_gemm``, P = 1)."""
from ._gemm import backward, forward

__all__ = ["forward", "backward"]
