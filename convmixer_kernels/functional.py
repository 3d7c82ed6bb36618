"""Functional API: ``dw_block``, ``pw_block``, ``patch_embed``.

Same arguments and semantics as the pure-PyTorch versions in
``convmixer_kernels.reference`` (which read like ``F.conv2d`` + activation +
``F.batch_norm``): with ``training=True`` the batch statistics normalise and the
running statistics, if given, are updated in place with ``momentum``; with
``training=False`` the running statistics normalise. ``backend`` picks the
implementation (see ``convmixer_kernels.backends``); None means the environment
variable ``CONVMIXER_KERNELS_BACKEND``, else ``auto``.

Output layout: ``pw_block`` and ``patch_embed`` take a keyword-only ``memory_format``:
``torch.channels_last`` (the default: what the next depthwise block reads best),
``torch.contiguous_format`` (NCHW), or ``torch.preserve_format``/None (follow the
input's layout: channels_last for a channels_last input, NCHW otherwise, strided views
included). The kernels write that layout directly; values are the same in every layout.
``dw_block``'s output follows its input's layout (it is residual). Gradients with respect
to the input follow the input's layout in all three.

Keyword-only options of all three:

- ``memory_saving=True``: for training, save only the block input and the
  per-channel statistics for backward and recompute the pre-activation there
  (one more convolution in backward, one activation-sized tensor less per block).
  Gradients are the same bits as without it.
- ``sync_bn=True``: synchronized BatchNorm (``nn.SyncBatchNorm``'s semantics) over
  ``process_group`` (None: the default group) when training with batch statistics
  in an initialized ``torch.distributed`` run of more than one rank; a plain block
  otherwise. See ``convmixer_kernels._sync``. A rank may then pass an empty batch
  (N = 0), as with ``nn.SyncBatchNorm``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import _sync, _validate, backends
from ._spec import DW_BLOCK, PATCH_EMBED, PW_BLOCK, BlockSpec, resolve_out_format
from .ops import BLOCK_OPS

__all__ = ["dw_block", "pw_block", "patch_embed"]

Momentum = Union[float, Tensor]


def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                    count: int, momentum: Momentum) -> None:
    """running = (1 - m) * running + m * batch, with the unbiased variance (as nn.BatchNorm2d)."""
    unbiased = var * (count / (count - 1))
    with torch.no_grad():
        running_mean.mul_(1 - momentum).add_(mean.to(running_mean.dtype) * momentum)
        running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype) * momentum)


_AUTOCAST_ELIGIBLE = (torch.float32, torch.float16, torch.bfloat16)  # autocast leaves float64 alone


def _autocast_dtype(x: object) -> Optional[torch.dtype]:
    """The dtype the convolution runs in under an enabled ``torch.autocast`` for x's device
    (None outside autocast, and for inputs autocast leaves alone: non-tensors, float64)."""
    if not isinstance(x, Tensor) or x.dtype not in _AUTOCAST_ELIGIBLE:
        return None
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def _block(spec: BlockSpec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
           training, momentum, eps, activation, backend, memory_saving=False, sync_bn=False,
           process_group=None, memory_format=torch.preserve_format) -> Tensor:
    """Validate, resolve the backend, run the op, update the running statistics.

    Under ``torch.autocast`` the block does what the stock modules do there: the
    convolution is on autocast's list of low-precision ops, so x, weight and bias are
    cast to the autocast dtype (differentiably: parameter gradients stay in their own
    dtype) and the op runs with autocast disabled; BatchNorm keeps its float32
    parameters and running statistics (the kernels take them mixed with a low-precision
    x and accumulate in float32). The output is in the autocast dtype, except for
    ``dw_block``, whose residual ``x + BN(...)`` type-promotes to x's dtype in the stock
    composite: its output is cast back to x's dtype.
    """
    low = _autocast_dtype(x)
    if low is not None:
        in_dtype = x.dtype
        cast = [t.to(low) if isinstance(t, Tensor) and t.dtype in _AUTOCAST_ELIGIBLE else t
                for t in (x, weight, bias)]
        with torch.autocast(x.device.type, enabled=False):
            out = _block(spec, *cast, bn_weight, bn_bias, running_mean, running_var,
                         training, momentum, eps, activation, backend, memory_saving, sync_bn,
                         process_group, memory_format)
        return out.to(in_dtype) if spec.residual else out
    if not isinstance(sync_bn, bool):
        raise TypeError(f"sync_bn: expected a bool, got {type(sync_bn).__name__}")
    if not isinstance(memory_saving, bool):
        raise TypeError(f"memory_saving: expected a bool, got {type(memory_saving).__name__}")
    sync = sync_bn and isinstance(training, bool) and _sync.needs_sync(process_group, training)
    _validate.block_inputs(spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                           training, momentum, eps, local_batch=sync)
    activation = _validate.activation(activation)
    out_format = resolve_out_format(memory_format, x)
    op = BLOCK_OPS[spec.name]
    name = backends.resolve(backend, spec.name, x)
    if sync:
        out, mean, var, count = _sync.sync_block(spec, x, weight, bias, bn_weight, bn_bias, eps,
                                                 activation, name, process_group, out_format)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count, momentum)
        return out
    params = (x, weight, bias, bn_weight, bn_bias)
    save_preact = (not memory_saving and torch.is_grad_enabled()
                   and any(t is not None and t.requires_grad for t in params))
    stats_in = (None, None) if training else (running_mean, running_var)
    out, mean, var, _ = op.forward(
        x, weight, bias, bn_weight, bn_bias, *stats_in, training, float(eps), activation,
        save_preact, *op.fmt_args(out_format), name)
    if training and running_mean is not None:
        _update_running(running_mean, running_var, mean, var, out.numel() // out.shape[1], momentum)
    return out


def dw_block(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
             bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
             running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
             training: bool = False, momentum: Momentum = 0.1, eps: float = 1e-5,
             activation: str = "gelu", backend: Optional[str] = None, *,
             memory_saving: bool = False, sync_bn: bool = False, process_group=None) -> Tensor:
    """Residual depthwise block: x (N, C, H, W), weight (C, 1, k, k), k odd ->
    x + BN(act(dwconv_k(x) + bias)) of shape (N, C, H, W), 'same' zero padding, in x's
    layout (channels_last for a channels_last x, NCHW otherwise)."""
    return _block(DW_BLOCK, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                  training, momentum, eps, activation, backend, memory_saving, sync_bn,
                process_group)


def pw_block(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
             bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
             running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
             training: bool = False, momentum: Momentum = 0.1, eps: float = 1e-5,
             activation: str = "gelu", backend: Optional[str] = None, *,
             memory_saving: bool = False, sync_bn: bool = False, process_group=None,
             memory_format: Optional[torch.memory_format] = torch.channels_last) -> Tensor:
    """Pointwise block: x (N, Cin, H, W), weight (Cout, Cin, 1, 1) ->
    BN(act(conv1x1(x) + bias)) of shape (N, Cout, H, W), channels_last by default
    (``memory_format``: torch.contiguous_format for NCHW, torch.preserve_format or None
    to follow x's layout)."""
    return _block(PW_BLOCK, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                  training, momentum, eps, activation, backend, memory_saving, sync_bn,
                  process_group, memory_format)


def patch_embed(x: Tensor, weight: Tensor, bias: Optional[Tensor] = None,
                bn_weight: Optional[Tensor] = None, bn_bias: Optional[Tensor] = None,
                running_mean: Optional[Tensor] = None, running_var: Optional[Tensor] = None,
                training: bool = False, momentum: Momentum = 0.1, eps: float = 1e-5,
                activation: str = "gelu", backend: Optional[str] = None, *,
                memory_saving: bool = False, sync_bn: bool = False, process_group=None,
                memory_format: Optional[torch.memory_format] = torch.channels_last) -> Tensor:
    """Patch embedding: img (N, Cin, H, W), weight (Cout, Cin, p, p) ->
    BN(act(conv_p_stride_p(img) + bias)) of shape (N, Cout, H // p, W // p)
    (trailing rows/columns that do not fill a patch are dropped, as nn.Conv2d does),
    channels_last by default (``memory_format``: torch.contiguous_format for NCHW,
    torch.preserve_format or None to follow the image's layout)."""
    return _block(PATCH_EMBED, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                  training, momentum, eps, activation, backend, memory_saving, sync_bn,
                  process_group, memory_format)
