"""Functional API: ``dw_block``, ``pw_block``, ``patch_embed``, ``layer_eval``.

This is the one place where a call meets its backend: each function validates its
arguments, handles ``torch.autocast``, resolves the backend (``backends.resolve``:
the argument, ``CONVMIXER_KERNELS_BACKEND`` or ``auto``'s tuning table) and calls the
registered op (``convmixer_kernels.ops``) with that backend's name; the op hands the
call to the backend object (``convmixer_kernels.backends``). The ``native`` backend
(the stock composite) runs here directly, without the custom op, so it costs what the
stock modules cost.

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
  otherwise. See ``convmixer_kernels.distributed``. A rank may then pass an empty batch
  (N = 0), as with ``nn.SyncBatchNorm``.
"""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import Tensor

from . import _validate, backends, distributed
from .backends.native import composite
from .ops import BLOCK_OPS, layer_eval_op
from .ops.block import autograd_transform_active, eager_ok
from .spec import DW_BLOCK, PATCH_EMBED, PW_BLOCK, BlockSpec, out_memory_format, resolve_out_format

__all__ = ["dw_block", "pw_block", "patch_embed", "layer_eval"]

Momentum = Union[float, Tensor]


def _update_running(running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor,
                    count: int, momentum: Momentum) -> None:
    """running = (1 - m) * running + m * batch, with the unbiased variance (as nn.BatchNorm2d).
    One fused in-place lerp for both buffers where the dtypes allow it (the per-call budget:
    about 8 us against 23 us for the four in-place steps, measured alone)."""
    with torch.no_grad():
        unbiased = var * (count / (count - 1))
        if (type(momentum) is float and running_mean.dtype == mean.dtype
                and running_var.dtype == var.dtype):
            torch._foreach_lerp_((running_mean, running_var), (mean, unbiased), momentum)
            return
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
    sync = sync_bn and isinstance(training, bool) and distributed.needs_sync(process_group, training)
    _validate.block_inputs(spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                           training, momentum, eps, local_batch=sync)
    activation = _validate.activation(activation)
    out_format = resolve_out_format(memory_format, x)
    op = BLOCK_OPS[spec.name]
    params = (x, weight, bias, bn_weight, bn_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in params)
    mode = backends.block_mode(bool(training) or needs_grad, needs_grad and x.requires_grad)
    name = backends.resolve(backend, spec.name, x, mode, activation, weight.shape[-1],
                            weight.shape[0])
    if (memory_saving and getattr(backends.get(name), "runs_composite", False)
            and backends.requested(backend) == "auto"):
        name = backends.first_kernel(spec.name, x)  # the stock path has no memory-saving mode
    if backends.requested(backend) == "auto" and autograd_transform_active():
        name = "native"  # the custom ops' autograd cannot run under torch.func or forward AD
    if (getattr(backends.get(name), "runs_composite", False) or x.shape[0] == 0) and not sync:
        # (an empty batch, N = 0, is the stock modules' business: an empty result)
        return composite(spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                         training, float(momentum), eps, activation
                         ).contiguous(memory_format=out_memory_format(out_format))
    if sync:
        out, mean, var, count = distributed.sync_block(spec, x, weight, bias, bn_weight, bn_bias, eps,
                                                 activation, name, process_group, out_format)
        if running_mean is not None:
            _update_running(running_mean, running_var, mean, var, count, momentum)
        return out
    stats_in = (None, None) if training else (running_mean, running_var)
    eager = eager_ok(x, weight, bias, bn_weight, bn_bias, *stats_in)
    return run_op(op, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training,
                  momentum, eps, activation, not memory_saving and needs_grad, out_format, name,
                  eager)


def run_op(op, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training,
           momentum, eps, activation, save_preact, out_format, name, eager) -> Tensor:
    """The op on validated arguments and a resolved backend ``name``, then the running
    statistics' update (``training`` with running statistics). ``eager``: through the op's
    ``torch.autograd.Function`` (``ops.block.eager_ok`` said so) instead of the registered op."""
    stats_in = (None, None) if training else (running_mean, running_var)
    args = (x, weight, bias, bn_weight, bn_bias, *stats_in, training, float(eps), activation,
            save_preact, *op.fmt_args(out_format), name)
    run = op.eager.fast_apply if eager else op.forward
    if not (training and running_mean is not None):
        return run(*args)[0]
    with _SavesAfterUpdate():
        out, mean, var, _ = run(*args)
        _update_running(running_mean, running_var, mean, var, out.numel() // out.shape[1], momentum)
    return out


class _SavesAfterUpdate:
    """Holds the op's saved tensors back from the active saved-tensor hooks until the
    running statistics are updated, then hands them on in order.

    F.batch_norm updates the running statistics inside its op, before autograd saves
    anything; the fused op returns the batch statistics and the caller updates. Under
    non-reentrant ``torch.utils.checkpoint`` the recompute stops as soon as the region's
    last saved tensor is packed again ("early stop"): without this the update of a
    region's last block would be cut off on recompute, where the stock model's is not.
    A no-op (one C call) where no saved-tensor hooks are active, and under torch.compile."""

    __slots__ = ("outer", "held", "inner")

    def __enter__(self):
        self.outer = (None if torch.compiler.is_compiling()
                      else torch._C._autograd._top_saved_tensors_default_hooks(False))
        if self.outer is None:
            return self
        self.held = []
        outer_unpack = self.outer[1]

        def pack(t):
            box = [t]
            self.held.append(box)
            return box

        def unpack(box):
            return outer_unpack(box[0])

        self.inner = torch.autograd.graph.saved_tensors_hooks(pack, unpack)
        self.inner.__enter__()
        return self

    def __exit__(self, *exc):
        if self.outer is None:
            return False
        self.inner.__exit__(*exc)
        if exc[0] is None:
            outer_pack = self.outer[0]
            for box in self.held:  # may raise checkpoint's stop-recomputation signal
                box[0] = outer_pack(box[0])
        return False


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


def layer_eval(x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
               bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], bn1_mean: Tensor,
               bn1_var: Tensor, pw_weight: Tensor, pw_bias: Optional[Tensor],
               bn2_weight: Optional[Tensor], bn2_bias: Optional[Tensor], bn2_mean: Tensor,
               bn2_var: Tensor, eps1: float = 1e-5, eps2: float = 1e-5,
               act1: str = "gelu", act2: Optional[str] = None, training: bool = False,
               backend: Optional[str] = None, *,
               memory_format: Optional[torch.memory_format] = torch.channels_last) -> Tensor:
    """One ConvMixer layer with running statistics: x (N, C, H, W), dw_weight (C, 1, k, k),
    pw_weight (C_out, C, 1, 1) -> BN2(act2(conv1x1(y) + pw_bias)) of shape
    (N, C_out, H, W), y = x + BN1(act1(dwconv_k(x) + dw_bias)). ``act2`` defaults to
    ``act1``. The output is channels_last by default, as ``pw_block``'s
    (``memory_format``: torch.contiguous_format for NCHW, torch.preserve_format or None
    to follow x). Inference only: ``training`` must be False and, with grad mode on, no
    input may require grad (run under ``torch.no_grad()``/``torch.inference_mode()``).
    Every backend runs it (the ``triton`` backend as one fused kernel, the others as
    their two blocks)."""
    if not isinstance(training, bool):
        raise TypeError(f"training: expected a bool, got {type(training).__name__}")
    if training:
        raise ValueError("training: layer_eval is inference only (running statistics, no "
                         "backward); got training=True: use dw_block + pw_block to train")
    args = dict(x=x, dw_weight=dw_weight, dw_bias=dw_bias, bn1_weight=bn1_weight,
                bn1_bias=bn1_bias, bn1_mean=bn1_mean, bn1_var=bn1_var, pw_weight=pw_weight,
                pw_bias=pw_bias, bn2_weight=bn2_weight, bn2_bias=bn2_bias, bn2_mean=bn2_mean,
                bn2_var=bn2_var)
    for name in ("bn1_mean", "bn1_var", "bn2_mean", "bn2_var"):
        if args[name] is None:
            raise ValueError(f"{name}: required (layer_eval normalises with the running "
                             "statistics)")
    low = _autocast_dtype(x)
    if low is not None:
        raise ValueError("x: layer_eval does not run under torch.autocast (cast the inputs "
                         "and weights, or use dw_block + pw_block, which follow autocast)")
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
    name = backends.resolve(backend, "layer_eval", x, "eval", act1, dw_weight.shape[-1])
    if getattr(backends.get(name), "runs_composite", False) or x.shape[0] == 0:
        y = composite(DW_BLOCK, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var,
                      False, 0.0, eps1, act1)
        return composite(PW_BLOCK, y, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean,
                         bn2_var, False, 0.0, eps2, act2
                         ).contiguous(memory_format=out_memory_format(out_format))
    return layer_eval_op(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var,
                         float(eps1), act1, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean,
                         bn2_var, float(eps2), act2, out_format, name)
