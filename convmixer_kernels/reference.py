"""Pure-PyTorch reference of every op: the spec, the test oracle and the CPU fallback.

Each block is equivalent to a few lines of stock PyTorch::

    # dw_block: residual depthwise block, k odd, 'same' zero padding
    y = F.conv2d(x, weight, bias, padding=k // 2, groups=C)
    out = x + F.batch_norm(act(y), running_mean, running_var, bn_weight, bn_bias,
                           training, momentum, eps)
    # pw_block: 1x1 conv, no residual
    out = F.batch_norm(act(F.conv2d(x, weight, bias)), ...)
    # patch_embed: p x p conv with stride p
    out = F.batch_norm(act(F.conv2d(img, weight, bias, stride=p)), ...)

``dw_block``/``pw_block``/``patch_embed`` below are exactly those lines (they update
the running statistics in place, as ``F.batch_norm`` does).

``forward``/``backward`` implement the same maths in the form every backend
implements (see ``convmixer_kernels.backends``): the forward returns the statistics it
normalised with instead of updating buffers, the backward is written out analytically
(BatchNorm, activation and convolution backward) and recomputes the
pre-activation from ``x`` when it was not saved. Both compute in float32 (float64
for float64 inputs) whatever the storage dtype, and round once when they store a
result, as the fused kernels do; the pre-activation is rounded to x's dtype
before the activation (as the stored copy that backward reads).
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from . import _activations
from .spec import (DW_BLOCK, PATCH_EMBED, PW_BLOCK, BlockSpec, out_memory_format,
                    output_memory_format, stats_dtype)

__all__ = ["dw_block", "pw_block", "patch_embed", "forward", "backward"]


def _composite(spec: BlockSpec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
               training, momentum, eps, activation) -> Tensor:
    z = F.conv2d(x, weight, bias, stride=spec.stride(weight), padding=spec.padding(weight),
                 groups=spec.groups(x))
    y = F.batch_norm(_activations.forward(z, activation), running_mean, running_var,
                     bn_weight, bn_bias, training, momentum, eps)
    return x + y if spec.residual else y


def dw_block(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
             bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
             running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
             training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
             activation: str = "gelu") -> Tensor:
    """x (N, C, H, W), weight (C, 1, k, k) -> x + BN(act(dwconv_k(x) + bias)), (N, C, H, W)."""
    return _composite(DW_BLOCK, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      training, momentum, eps, activation)


def pw_block(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
             bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
             running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
             training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
             activation: str = "gelu") -> Tensor:
    """x (N, Cin, H, W), weight (Cout, Cin, 1, 1) -> BN(act(conv1x1(x) + bias)), (N, Cout, H, W)."""
    return _composite(PW_BLOCK, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      training, momentum, eps, activation)


def patch_embed(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                training: bool = False, momentum: float = 0.1, eps: float = 1e-5,
                activation: str = "gelu") -> Tensor:
    """img (N, Cin, H, W), weight (Cout, Cin, p, p) -> BN(act(conv_p_stride_p(img) + bias)),
    (N, Cout, H // p, W // p)."""
    return _composite(PATCH_EMBED, x, weight, bias, bn_weight, bn_bias, running_mean,
                      running_var, training, momentum, eps, activation)


# ---- the backend contract, in PyTorch ------------------------------------------------

def _empty(x: Tensor, dtype: Optional[torch.dtype] = None) -> Tensor:
    """A fresh 0-element tensor: the placeholder for a result that was not asked for."""
    return x.new_empty(0, dtype=dtype)


def _per_channel(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return None if t is None else t.to(dtype).view(1, -1, 1, 1)


def _conv(spec: BlockSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    return F.conv2d(x, weight, bias, stride=spec.stride(weight), padding=spec.padding(weight),
                    groups=spec.groups(x))


def _preact(spec: BlockSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor],
            sdt: torch.dtype) -> Tensor:
    """conv(x) + bias accumulated in ``sdt``, stored in x's dtype. The activation and
    the statistics are computed from this stored value in forward and backward alike,
    so saving it or recomputing it gives the same gradients."""
    z = _conv(spec, x.to(sdt), weight.to(sdt), None if bias is None else bias.to(sdt))
    return z.to(x.dtype)


def _normalise(a: Tensor, mean: Tensor, var: Tensor, bn_weight, bn_bias, eps: float) -> Tensor:
    """(a - mean) / sqrt(var + eps) * bn_weight + bn_bias in the statistics' dtype."""
    dt = mean.dtype
    y = (a.to(dt) - mean.view(1, -1, 1, 1)) * torch.rsqrt(var.view(1, -1, 1, 1) + eps)
    if bn_weight is not None:
        y = y * _per_channel(bn_weight, dt)
    if bn_bias is not None:
        y = y + _per_channel(bn_bias, dt)
    return y


def forward(spec: BlockSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor],
            bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
            running_mean: Optional[Tensor], running_var: Optional[Tensor],
            use_batch_stats: bool, eps: float, activation: str,
            save_preact: bool, out_format: Optional[str] = None
            ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (out, mean, var, preact).

    out: (N, Cout, Ho, Wo) in x's dtype and in the layout ``out_format`` names
    (``'channels_last'`` or ``'contiguous'``: the GEMM blocks' argument, see
    ``convmixer_kernels.ops.block``); dw_block passes none and its output follows x,
    ``output_memory_format(x)``;
    mean, var: (Cout,) statistics normalised with (batch mean and biased batch
    variance when ``use_batch_stats``, else copies of the running ones), in ``stats_dtype(x)``;
    preact: conv(x) + bias in out's layout, saved for backward when ``save_preact``,
    else an empty tensor.
    """
    fmt = output_memory_format(x) if out_format is None else out_memory_format(out_format)
    sdt = stats_dtype(x)
    z = _preact(spec, x, weight, bias, sdt)
    a = _activations.forward(z.to(sdt), activation)
    if use_batch_stats:
        var, mean = torch.var_mean(a.to(sdt), dim=(0, 2, 3), correction=0)
    else:
        mean, var = running_mean.to(sdt).clone(), running_var.to(sdt).clone()
    y = _normalise(a, mean, var, bn_weight, bn_bias, eps)
    out = (x + y if spec.residual else y).to(x.dtype)
    preact = z.contiguous(memory_format=fmt) if save_preact else x.new_empty(0)
    return out.contiguous(memory_format=fmt), mean, var, preact


def backward(spec: BlockSpec, grad_out: Tensor, x: Tensor, weight: Tensor,
             bias: Optional[Tensor], bn_weight: Optional[Tensor], mean: Tensor, var: Tensor,
             preact: Tensor, use_batch_stats: bool, eps: float, activation: str,
             output_mask: Sequence[bool]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """-> (dx, dweight, dbias, dbn_weight, dbn_bias); each is an empty tensor where
    ``output_mask`` (same order) is False (the caller sets it False for absent
    parameters). dx like x (dtype and ``output_memory_format(x)``), dweight/dbias in the
    conv weight's dtype, dbn_* in the statistics' dtype. ``grad_out`` and ``preact`` may
    come in any layout.

    With batch statistics the gradient flows through the mean and variance
    (training-mode BatchNorm); with running statistics it does not.
    """
    need_dx, need_dw, need_db, need_dbnw, need_dbnb = (bool(m) for m in output_mask)
    sdt = mean.dtype
    # Work in preact's layout (the forward's output layout), else grad_out's, as the
    # kernels do: a saved and a recomputed pre-activation then give the same bits.
    fmt = output_memory_format(preact if preact.numel() > 0 else grad_out)
    zs = (preact if preact.numel() > 0 else _preact(spec, x, weight, bias, sdt)).to(sdt)
    zs = zs.contiguous(memory_format=fmt)
    invstd = torch.rsqrt(var + eps).view(1, -1, 1, 1)
    xhat = (_activations.forward(zs, activation) - mean.view(1, -1, 1, 1)) * invstd
    dy = grad_out.to(sdt).contiguous(memory_format=fmt)
    dbn_weight = (dy * xhat).sum((0, 2, 3)) if need_dbnw else _empty(x, sdt)
    dbn_bias = dy.sum((0, 2, 3)) if need_dbnb else _empty(x, sdt)
    if not (need_dx or need_dw or need_db):
        return _empty(x), _empty(x), _empty(x), dbn_weight, dbn_bias
    g = dy * _per_channel(bn_weight, sdt) if bn_weight is not None else dy
    if use_batch_stats:
        g_mean = g.mean((0, 2, 3), keepdim=True)
        gx_mean = (g * xhat).mean((0, 2, 3), keepdim=True)
        da = (g - g_mean - xhat * gx_mean) * invstd
    else:
        da = g * invstd
    # The convolution backward runs in the statistics' dtype (float32 accumulation, as
    # the fused kernels do); results are rounded once to the parameters' dtypes.
    dz = _activations.backward(da, zs, activation)
    dx, dw, db = torch.ops.aten.convolution_backward(
        dz, x.to(sdt), weight.to(sdt), [weight.shape[0]] if need_db else None,
        list(spec.stride(weight)), list(spec.padding(weight)), [1, 1], False, [0, 0],
        spec.groups(x), [need_dx, need_dw, need_db])
    if need_dx:
        dx = (dx + dy if spec.residual else dx).to(x.dtype)
        dx = dx.contiguous(memory_format=output_memory_format(x))
    dw = dw.to(weight.dtype).contiguous() if need_dw else _empty(x)
    db = db.to(weight.dtype) if need_db else _empty(x)
    return dx if need_dx else _empty(x), dw, db, dbn_weight, dbn_bias
