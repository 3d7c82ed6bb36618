"""Input checks shared by every public entry point.

Each failure raises ``TypeError`` (wrong type or dtype) or ``ValueError`` (wrong
shape, value or device) with a message naming the argument and what was expected.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from . import _activations
from .spec import BlockSpec

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_NUMBER = (int, float, torch.SymInt, torch.SymFloat)


def _finite(v) -> bool:
    """math.isfinite, except for values traced by torch.compile (dynamic=True makes float
    attributes such as a BatchNorm's momentum and eps symbolic: no bool to branch on)."""
    return isinstance(v, (torch.SymInt, torch.SymFloat)) or torch.compiler.is_compiling() \
        or math.isfinite(v)


def _tensor(name: str, t: object) -> Tensor:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.is_nested:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got a nested tensor "
                        "(run the tensors of a nested batch one by one, or pad them)")
    if t.layout != torch.strided:
        raise TypeError(f"{name}: expected a dense (strided) tensor, got layout {t.layout} "
                        "(convert it with .to_dense())")
    if t.is_quantized:
        raise TypeError(f"{name}: expected a floating-point tensor, got a quantized tensor "
                        f"({t.dtype}; convert it with .dequantize())")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name}: expected a floating-point tensor (float16, bfloat16, float32 "
                        f"or float64), got {t.dtype}")
    return t


def _kernel_size(spec: BlockSpec, weight: Tensor) -> int:
    kh, kw = weight.shape[-2:]
    if kh != kw:
        raise ValueError(f"weight: expected a square kernel, got {kh}x{kw} (shape {tuple(weight.shape)})")
    if kh == 0:
        raise ValueError(f"weight: kernel size must be >= 1, got 0 (shape {tuple(weight.shape)})")
    if spec.depthwise and kh % 2 == 0:
        raise ValueError(f"weight: depthwise kernel size must be odd ('same' padding is "
                         f"symmetric only for odd k), got k={kh}")
    return kh


def block_inputs(spec: BlockSpec, x: object, weight: object, bias: Optional[Tensor],
                 bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                 running_mean: Optional[Tensor], running_var: Optional[Tensor],
                 training: object, momentum: object, eps: object, local_batch: bool = False) -> None:
    """``local_batch``: x is one rank's share of a synchronized BatchNorm's batch, which may
    be empty (N = 0) and may hold a single value per channel (the count that matters is
    the global one, checked once the ranks' counts are combined)."""
    x = _tensor("x", x)
    if x.dim() != 4:
        raise ValueError(f"x: expected a 4-D (N, C, H, W) tensor, got shape {tuple(x.shape)}")
    n, c, h, w = x.shape
    if c == 0 or h == 0 or w == 0:  # N = 0 is an empty batch, as the stock modules take it
        raise ValueError(f"x: C, H and W must be >= 1, got {tuple(x.shape)}")
    weight = _tensor("weight", weight)
    if weight.dim() != 4:
        raise ValueError(f"weight: expected a 4-D conv weight, got shape {tuple(weight.shape)}")
    k = _kernel_size(spec, weight)
    cout = weight.shape[0]
    if spec.depthwise and (cout != c or weight.shape[1] != 1):
        raise ValueError(f"weight: expected a depthwise weight of shape (C, 1, k, k) = "
                         f"({c}, 1, {k}, {k}) for x with C={c}, got {tuple(weight.shape)}")
    if not spec.depthwise and weight.shape[1] != c:
        raise ValueError(f"weight: expected {c} input channels (x has C={c}), got weight of "
                         f"shape {tuple(weight.shape)}")
    if not spec.depthwise and not spec.patch and k != 1:
        raise ValueError(f"weight: expected a 1x1 weight (Cout, Cin, 1, 1), got {tuple(weight.shape)}")
    if spec.patch and (h < k or w < k):
        raise ValueError(f"x: spatial size {h}x{w} is smaller than the patch size {k}")
    if cout == 0:
        raise ValueError("weight: expected at least one output channel, got 0")
    if weight.device != x.device:
        raise ValueError(f"weight: expected a tensor on x's device ({x.device}), got {weight.device}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight: expected x's dtype {x.dtype} (as nn.Conv2d does), got {weight.dtype}")
    for name, t in (("bias", bias), ("bn_weight", bn_weight), ("bn_bias", bn_bias),
                    ("running_mean", running_mean), ("running_var", running_var)):
        if t is None:
            continue
        _tensor(name, t)
        if tuple(t.shape) != (cout,):
            raise ValueError(f"{name}: expected shape ({cout},) (one value per output channel), "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"{name}: expected a tensor on x's device ({x.device}), got {t.device}")
    if torch.is_grad_enabled():
        for name, t in (("running_mean", running_mean), ("running_var", running_var)):
            if t is not None and t.requires_grad:  # as F.batch_norm (native_batch_norm) raises
                raise RuntimeError(f"{name}: requires grad, but BatchNorm is not differentiable "
                                   "with respect to its running statistics; this input cannot "
                                   "have requires_grad=True")
    if bias is not None and bias.dtype != x.dtype:
        raise TypeError(f"bias: expected x's dtype {x.dtype}, got {bias.dtype}")
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean, running_var: pass both or neither")
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if not training and running_mean is None:
        raise ValueError("running_mean, running_var: required when training=False (eval mode "
                         "normalises with the running statistics)")
    if isinstance(momentum, Tensor):
        if momentum.numel() != 1:
            raise ValueError(f"momentum: expected a scalar, got a tensor of shape {tuple(momentum.shape)}")
    elif isinstance(momentum, bool) or not isinstance(momentum, _NUMBER) or not _finite(momentum):
        raise TypeError(f"momentum: expected a finite float (use the modules for momentum=None), "
                        f"got {momentum!r}")
    if isinstance(eps, bool) or not isinstance(eps, _NUMBER) or not _finite(eps):
        raise ValueError(f"eps: expected a finite float > 0, got {eps!r}")
    elif eps <= 0:  # F.batch_norm raises ValueError("batch_norm eps must be positive")
        raise ValueError(f"eps: expected a finite float > 0 (batch_norm eps must be positive), "
                         f"got {eps!r}")
    if training and not local_batch:
        ho, wo = spec.out_shape(x, weight)[2:]
        if n * ho * wo == 1:  # as F.batch_norm: an empty batch (0 values) is fine
            raise ValueError(f"x: training-mode BatchNorm needs more than one value per channel, "
                             f"got N*H*W = {n * ho * wo} (input shape {tuple(x.shape)})")


def activation(act: object) -> str:
    return _activations.check_activation(act)
