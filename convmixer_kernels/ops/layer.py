"""Registered op of one ConvMixer layer in eval mode, fused (inference only)::

    convmixer_kernels::layer_eval(Tensor x, Tensor dw_weight, Tensor? dw_bias,
        Tensor? bn1_weight, Tensor? bn1_bias, Tensor bn1_mean, Tensor bn1_var, float eps1,
        str act1, Tensor pw_weight, Tensor? pw_bias, Tensor? bn2_weight, Tensor? bn2_bias,
        Tensor bn2_mean, Tensor bn2_var, float eps2, str act2, str out_format,
        str backend) -> Tensor

equivalent to the two blocks with running statistics::

    y = dw_block(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var,
                 training=False, eps=eps1, activation=act1)
    out = pw_block(y, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean, bn2_var,
                   training=False, eps=eps2, activation=act2, memory_format=memory_format)

The output layout is the pointwise block's: ``out_format`` ('channels_last' or
'contiguous', resolved from ``layer_eval``'s ``memory_format``, channels_last by
default; see ``convmixer_kernels.ops._block``), written by the kernel's epilogue.

``backend`` ``triton`` runs one GEMM whose prologue computes y (never stored, see
``convmixer_kernels._triton.layer``); ``reference`` runs the two reference blocks.
The op has a fake (shape-only) implementation and no autograd: ``layer_eval`` refuses
training mode and inputs that require grad. ``layer_blocker``/``layer_module_eval``
run a ``ConvMixerLayer`` through it (``ConvMixerLayer.layer_fusion``).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor, nn

from .. import _activations, _validate, backends, reference
from .._ranges import block_range
from .._spec import DW_BLOCK, PW_BLOCK, out_memory_format, resolve_out_format

__all__ = ["layer_eval_op", "layer_eval", "layer_blocker", "layer_module_eval", "BACKENDS"]

BACKENDS = ("triton", "reference")
SCHEMA = (
    "(Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor? bn1_weight, Tensor? bn1_bias, "
    "Tensor bn1_mean, Tensor bn1_var, float eps1, str act1, Tensor pw_weight, Tensor? pw_bias, "
    "Tensor? bn2_weight, Tensor? bn2_bias, Tensor bn2_mean, Tensor bn2_var, float eps2, "
    "str act2, str out_format, str backend) -> Tensor"
)


def _impl(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var, eps1, act1,
          pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean, bn2_var, eps2, act2, out_format,
          backend):
    out_memory_format(out_format)  # ValueError naming out_format
    if backend == "triton":
        from .._triton import layer
        return layer.forward(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var,
                             eps1, act1, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean,
                             bn2_var, eps2, act2, out_format)
    if backend == "reference":
        y = reference.forward(DW_BLOCK, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean,
                              bn1_var, False, eps1, act1, False)[0]
        return reference.forward(PW_BLOCK, y, pw_weight, pw_bias, bn2_weight, bn2_bias,
                                 bn2_mean, bn2_var, False, eps2, act2, False, out_format)[0]
    raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")


layer_eval_op = torch.library.custom_op("convmixer_kernels::layer_eval", _impl,
                                        mutates_args=(), schema=SCHEMA)


@layer_eval_op.register_fake
def _(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var, eps1, act1,
      pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean, bn2_var, eps2, act2, out_format,
      backend):
    n, _, h, w = x.shape
    return torch.empty((n, pw_weight.shape[0], h, w), dtype=x.dtype, device=x.device,
                       memory_format=out_memory_format(out_format))


def layer_eval(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
               bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], bn1_mean: Tensor,
               bn1_var: Tensor, pw_weight: Tensor, pw_bias: Optional[Tensor],
               bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], bn2_mean: Tensor,
               bn2_var: Tensor, eps1: float = 1e-5, eps2: float = 1e-5,
               act1: str = "gelu", act2: Optional[str] = None, training: bool = False,
               backend: str = "triton", *,
               memory_format: Optional[torch.memory_format] = torch.channels_last) -> Tensor:
    """One ConvMixer layer with running statistics: x (N, C, H, W), dw_weight (C, 1, k, k),
    pw_weight (C_out, C, 1, 1) -> BN2(act2(conv1x1(y) + pw_bias)) of shape
    (N, C_out, H, W), y = x + BN1(act1(dwconv_k(x) + dw_bias)). ``act2`` defaults to
    ``act1``. The output is channels_last by default, as ``pw_block``'s
    (``memory_format``: torch.contiguous_format for NCHW, torch.preserve_format or None
    to follow x). Inference only: ``training`` must be False and, with grad mode on, no
    input may require grad (run under ``torch.no_grad()``/``torch.inference_mode()``)."""
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if training:
        raise ValueError("training: layer_eval is inference only (running statistics, no "
                         "backward); got training=True: use dw_block + pw_block to train")
    args = dict(x=x, dw_weight=dw_weight, dw_bias=dw_bias, bn1_weight=bn1_weight,
                bn1_bias=bn1_bias, bn1_mean=bn1_mean, bn1_var=bn1_var, pw_weight=pw_weight,
                pw_bias=pw_bias, bn2_weight=bn2_weight, bn2_bias=bn2_bias, bn2_mean=bn2_mean,
                bn2_var=bn2_var)
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    for name in ("bn1_mean", "bn1_var", "bn2_mean", "bn2_var"):
        if args[name] is None:
            raise ValueError(f"{name}: required (layer_eval normalises with the running "
                             "statistics)")
    _validate.block_inputs(DW_BLOCK, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean,
                           bn1_var, False, 0.1, eps1)
    # y has x's shape, dtype, device and layout
    _validate.block_inputs(PW_BLOCK, x, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean,
                           bn2_var, False, 0.1, eps2)
    act1 = _validate.activation(act1)
    act2 = act1 if act2 is None else _validate.activation(act2)
    out_format = resolve_out_format(memory_format, x)
    if torch.is_grad_enabled():
        for name, t in args.items():
            if isinstance(t, Tensor) and t.requires_grad:
                raise ValueError(f"{name}: requires grad, but layer_eval is inference only (no "
                                 "backward): run it under torch.no_grad() or "
                                 "torch.inference_mode(), or detach the input")
    if backend == "triton":
        for op in ("dw_block", "pw_block"):
            backends.resolve("triton", op, x)  # raises BackendUnavailable with the reason
    return layer_eval_op(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var,
                         float(eps1), act1, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean,
                         bn2_var, float(eps2), act2, out_format, backend)


# ---- running a ConvMixerLayer through the op -----------------------------------------

def _children(layer: nn.Module):
    """(dw conv, act1, bn1, pw conv, act2, bn2) of a ConvMixerLayer (timm's child layout)."""
    dw = layer[0].fn
    return dw[0], dw[1], dw[2], layer[1], layer[2], layer[3]


def _autocast_on(x: Tensor) -> bool:
    return x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type)


def layer_blocker(layer: nn.Module, x: Tensor) -> Optional[str]:
    """None when ``layer_module_eval(layer, x)`` computes what ``layer``'s two fused ops
    would, with the triton backend; else why not (the caller runs the two ops)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        return "x is not a 4-D tensor"
    dwconv, act1, bn1, pwconv, act2, bn2 = _children(layer)
    if bn1.training or bn2.training:
        return "training mode (batch statistics)"
    if bn1.running_mean is None or bn2.running_mean is None:
        return "a BatchNorm has no running statistics"
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in layer.parameters())):
        return "grad mode with inputs or parameters that require grad"
    if _autocast_on(x):
        return "autocast is enabled"
    if _activations.name_of(act1) is None or _activations.name_of(act2) is None:
        return "an activation module is neither nn.GELU nor nn.ReLU"
    try:
        chosen = {backends.resolve(layer[0].backend, "dw_block", x),
                  backends.resolve(layer.backend, "pw_block", x)}
    except backends.BackendUnavailable as e:
        return str(e)
    if chosen != {"triton"}:
        return f"the blocks run on backend(s) {sorted(chosen)}, not triton"
    return None


def layer_module_eval(layer: nn.Module, x: Tensor) -> Tensor:
    """``layer(x)`` for a ``ConvMixerLayer`` in eval mode by one ``layer_eval`` call
    (check ``layer_blocker(layer, x)`` first)."""
    dwconv, act1, bn1, pwconv, act2, bn2 = _children(layer)
    with block_range(layer_eval):  # a profiler range, as the blocks have
        return layer_eval(x, dwconv.weight, dwconv.bias, bn1.weight, bn1.bias, bn1.running_mean,
                          bn1.running_var, pwconv.weight, pwconv.bias, bn2.weight, bn2.bias,
                          bn2.running_mean, bn2.running_var, eps1=bn1.eps, eps2=bn2.eps,
                          act1=_activations.name_of(act1), act2=_activations.name_of(act2),
                          backend="triton", memory_format=layer.memory_format)
