"""Triton kernel of one ConvMixer layer in eval mode (running statistics), fused:

    y   = x + BN1(act1(dwconv_k(x) + b1))        # the residual depthwise block
    out = BN2(act2(conv1x1(y) + b2))             # the pointwise block

as ONE GEMM over the M = N*H*W pixels (rows), K = C input channels (reduction) and
C_out output channels (columns), whose A tile [BLOCK_M pixels x BLOCK_K channels] is
computed in the prologue from x instead of being read from memory: the k x k
depthwise conv of those pixels and channels, + b1, rounded to the storage dtype (the
pre-activation), act1, the BN1 eval affine, + x, rounded to the storage dtype again
(exactly the ``y`` that the two-op path stores and the pointwise GEMM reads back), then
``tl.dot``. The epilogue is the pointwise block's (``_gemm``): + b2, rounded, act2,
BN2 affine. The prologue and epilogue are the depthwise and GEMM kernels' own device
functions (``dw_block._preact``/``_bn``, ``_gemm._pixel``/``_swizzle``/``_bn``), so
both paths compute the same values to the rounding of their float32 sums (the same
taps in the same order; on a GPU only FMA contraction can differ).

Cost trade-off. The fused kernel never writes or reads y (saves 2 x T bytes of memory
traffic per layer, T = N*C*H*W elements, and one launch), but every column tile of
C_out recomputes the depthwise conv of its rows: the depthwise work is multiplied by
``ceil(C_out / BLOCK_N)``, on CUDA cores (k*k FMAs per element per column tile) while
the GEMM runs on tensor cores. So it can pay only when C_out / BLOCK_N is small: the
GPU tiling takes BLOCK_N up to 256 (one column tile for C_out <= 256, the CIFAR
ConvMixer-256; 3 for C=768, 6 for C=1536) with BLOCK_M = 64 rows and BLOCK_K = 16
channels a step over 8 warps (a 64 x 256 float32 accumulator is 64 registers a thread;
the prologue's unrolled taps need most of the rest: BLOCK_K = 32 spills in NCHW on
sm_90, see ``layer_config``). Whether it beats the two-op split
(dw_block kernel + pw_block GEMM) is a GPU measurement: the benchmark provider
``fused_triton_layer`` (op ``layer``, mode ``inference``) times it beside
``fused_triton``.

Numerics: float32 arithmetic whatever the storage dtype. ``tl.dot`` gets the storage
dtype on a GPU (tensor cores for fp16/bf16; for float32 TF32 when
``torch.backends.cudnn.allow_tf32`` allows it, as pw_block, else IEEE) and float32
under the interpreter (``DOT_F32``: its bfloat16 arithmetic is wrong). Offsets are int64
when some tensor needs it (``IDX64``, always under the interpreter as in ``_gemm``).
Inference only: no pre-activation is kept and there is no backward.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from ...spec import out_memory_format
from ._common import ACT_CODES, act_fwd, interpreting, launch, needs_int64
from ._gemm import _bn as _pw_bn
from ._gemm import _fit, _per_channel, _pixel, _precision, _strides, _swizzle
from .dw_block import _bn as _dw_bn
from .dw_block import _preact, _vec, _wt

__all__ = ["forward", "layer_config", "use_int64"]


@triton.jit
def _fwd(x_ptr, wt_ptr, b1_ptr, mean1_ptr, var1_ptr, bnw1_ptr, bnb1_ptr,
         w_ptr, b2_ptr, mean2_ptr, var2_ptr, bnw2_ptr, bnb2_ptr, out_ptr,
         M, C, H, W, COUT, eps1, eps2,
         sxn, sxc, sxh, sxw, swk, swn, son, soc, soh, sow,
         K: tl.constexpr, ACT1: tl.constexpr, ACT2: tl.constexpr,
         HAS_BIAS1: tl.constexpr, HAS_BNW1: tl.constexpr, HAS_BNB1: tl.constexpr,
         IDX64: tl.constexpr, PREC: tl.constexpr, DOT_F32: tl.constexpr,
         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
         GROUP_M: tl.constexpr):
    pid_m, pid_n = _swizzle(tl.program_id(0), M, COUT, BLOCK_M, BLOCK_N, GROUP_M)
    if IDX64:
        pid_m = pid_m.to(tl.int64)
        pid_n = pid_n.to(tl.int64)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = rm < M
    nmask = rn < COUT
    n, h, w = _pixel(rm, H, W)
    x_row = n * sxn + h * sxh + w * sxw
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        c = k0 + tl.arange(0, BLOCK_K)
        if IDX64:
            c = c.to(tl.int64)
        cmask = c < C
        amask = mmask[:, None] & cmask[None, :]
        # prologue: the depthwise block's output y for these pixels and channels
        z = _preact(x_ptr, n, c, cmask, h, w, mmask, sxn, sxc, sxh, sxw, wt_ptr, b1_ptr,
                    C, H, W, K, HAS_BIAS1, BLOCK_M, BLOCK_K)
        y = _dw_bn(act_fwd(z, ACT1), c, cmask, mean1_ptr, var1_ptr, bnw1_ptr, bnb1_ptr, eps1,
                   HAS_BNW1, HAS_BNB1)
        xv = tl.load(x_ptr + x_row[:, None] + c[None, :] * sxc, mask=amask,
                     other=0.0).to(tl.float32)
        # rounded to the storage dtype, as the two-op path stores it; zero off the tile
        a = tl.where(amask, xv + y, 0.0).to(x_ptr.dtype.element_ty)
        b = tl.load(w_ptr + c[:, None] * swk + rn[None, :] * swn,
                    mask=cmask[:, None] & nmask[None, :], other=0.0)
        if DOT_F32:
            a = a.to(tl.float32)
            b = b.to(tl.float32)
        acc = tl.dot(a, b, acc, input_precision=PREC)
    # epilogue: the pointwise block's eval epilogue
    z2 = acc + tl.load(b2_ptr + rn, mask=nmask, other=0.0).to(tl.float32)[None, :]
    z2 = z2.to(x_ptr.dtype.element_ty).to(tl.float32)
    out = _pw_bn(act_fwd(z2, ACT2), rn, nmask, mean2_ptr, var2_ptr, bnw2_ptr, bnb2_ptr, eps2)
    o_off = (n * son + h * soh + w * sow)[:, None] + rn[None, :] * soc
    tl.store(out_ptr + o_off, out.to(out_ptr.dtype.element_ty),
             mask=mmask[:, None] & nmask[None, :])


def layer_config(M: int, C: int, COUT: int, dtype: torch.dtype) -> dict:
    """Tile of the fused layer GEMM (see the module docstring for the choice). The
    interpreter costs per program and per operation: there one program takes as much
    as it can."""
    if interpreting():
        return dict(BLOCK_M=_fit(M, 16, 512), BLOCK_N=_fit(COUT, 16, 256),
                    BLOCK_K=_fit(C, 16, 128), GROUP_M=1, num_warps=4)
    # sm_90 resources at C = C_out = 1536, k = 9 (python -m convmixer_kernels.tools.triton_variants):
    # BLOCK_K 16 keeps the unrolled taps' addresses in registers (no spills in either
    # layout); BLOCK_K 32 spilled in NCHW, BLOCK_M 128 or 4 warps spilled everywhere.
    return dict(BLOCK_M=64, BLOCK_N=_fit(COUT, 16, 256), BLOCK_K=16, GROUP_M=8,
                num_warps=8, num_stages=2)


def use_int64(x: Tensor, out: Tensor, C: int) -> bool:
    """int64 offsets when x or out needs them or the pixel x channel index range does, and
    always under the interpreter (as ``_gemm.use_int64``: its int32 overflow checks cost
    more than the kernel; the int32 variant is tested by forcing it)."""
    if interpreting():
        return True
    M = out.shape[0] * out.shape[2] * out.shape[3]
    return needs_int64(x, out) or M * max(C, out.shape[1]) >= 2 ** 31 - 1


def forward(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
            bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], bn1_mean: Tensor,
            bn1_var: Tensor, eps1: float, act1: str, pw_weight: Tensor,
            pw_bias: Optional[Tensor], bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor],
            bn2_mean: Tensor, bn2_var: Tensor, eps2: float, act2: str,
            out_format: str) -> Tensor:
    """x (N, C, H, W), dw_weight (C, 1, k, k), pw_weight (C_out, C, 1, 1), per-channel
    vectors of C (BN1) and C_out (BN2) -> out (N, C_out, H, W) in x's dtype and in the
    layout ``out_format`` names ('channels_last' or 'contiguous'; the epilogue stores
    through out's strides). Arguments are validated by the caller
    (``convmixer_kernels.ops.layer``)."""
    N, C, H, W = x.shape
    COUT, K = pw_weight.shape[0], dw_weight.shape[-1]
    M, dev = N * H * W, x.device
    out = torch.empty((N, COUT, H, W), dtype=x.dtype, device=dev,
                      memory_format=out_memory_format(out_format))
    wt, b1, bnw1, bnb1 = _wt(dw_weight), _vec(dw_bias), _vec(bn1_weight), _vec(bn1_bias)
    mean1 = bn1_mean.detach().to(torch.float32).contiguous()
    var1 = bn1_var.detach().to(torch.float32).contiguous()
    wmat = pw_weight.detach().reshape(COUT, C).contiguous()
    b2 = _per_channel(pw_bias, COUT, 0.0, x)
    bnw2 = _per_channel(bn2_weight, COUT, 1.0, x)
    bnb2 = _per_channel(bn2_bias, COUT, 0.0, x)
    mean2 = bn2_mean.detach().to(torch.float32).contiguous()
    var2 = bn2_var.detach().to(torch.float32).contiguous()
    idx64 = use_int64(x, out, C)
    cfg = layer_config(M, C, COUT, x.dtype)
    grid = (math.ceil(M / cfg["BLOCK_M"]) * math.ceil(COUT / cfg["BLOCK_N"]),)
    launch(_fwd, grid, x, wt, b1, mean1, var1, bnw1, bnb1, wmat, b2, mean2, var2, bnw2, bnb2,
           out, M, C, H, W, COUT, float(eps1), float(eps2), *_strides(x), 1, C, *_strides(out),
           K=K, ACT1=ACT_CODES[act1], ACT2=ACT_CODES[act2], HAS_BIAS1=b1 is not None,
           HAS_BNW1=bnw1 is not None, HAS_BNB1=bnb1 is not None, IDX64=idx64,
           PREC=_precision(x), DOT_F32=interpreting(), **cfg)
    return out
