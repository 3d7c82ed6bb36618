"""Drop-in ``nn.Module``s whose parameters and buffers are laid out as timm's.

Each fused module holds the stock modules (``nn.Conv2d``, the activation,
``nn.BatchNorm2d``) as children under the names timm uses, so ``state_dict`` keys
match timm's ``ConvMixer`` exactly, and runs them as one fused op. BatchNorm
behaves exactly as ``nn.BatchNorm2d`` (``momentum=None`` cumulative average,
``num_batches_tracked``, ``track_running_stats=False``, ``affine=False``). Each
module has a ``backend`` attribute (None: ``CONVMIXER_KERNELS_BACKEND`` or ``auto``)
and two training options, set per module or on a whole model:

- ``memory_saving`` (``set_memory_saving``): save only the block input and the
  per-channel statistics for backward, recompute the pre-activation there;
- ``sync_bn`` and ``process_group`` (``convert_sync_batchnorm``): synchronized
  BatchNorm across the ranks of ``process_group`` (None: the default group), as
  ``nn.SyncBatchNorm``; see ``convmixer_kernels.distributed``.

The modules with a pointwise or patch GEMM (``PointwiseBlock``, ``PatchEmbed``,
``ConvMixerLayer``'s pointwise part) also have ``memory_format``, their output layout:
None (class default: the layout the stock modules return, whichever backend runs, see
``stock_layout``), ``torch.channels_last``, ``torch.contiguous_format`` (NCHW) or
``torch.preserve_format`` (follow the input's layout); ``ConvMixer`` sets channels_last on
its blocks. ``DepthwiseBlock``'s output follows its input's layout.
"""
from __future__ import annotations

import weakref
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import _activations, backends, functional
from .ops import BLOCK_OPS
from .ops.block import autograd_transform_active, eager_ok
from ._ranges import block_range
from .spec import DW_BLOCK, PATCH_EMBED, PW_BLOCK, BlockSpec, resolve_out_format, out_memory_format

__all__ = ["DepthwiseBlock", "PointwiseBlock", "PatchEmbed", "ConvMixerLayer", "ConvMixer"]


_FORMAT_NAMES = {torch.channels_last: "channels_last", torch.contiguous_format: "contiguous_format",
                 torch.preserve_format: "preserve_format"}
_FORMAT_TAG = "__torch_memory_format__"


class _PickleState:
    """``torch.save`` of a whole model (pickle protocol 2), multiprocessing and
    ``copy.deepcopy``: the per-call route cache (``_native_route``: backend objects, weak
    references, ids of this process's modules) is left out, and a ``memory_format``
    option travels by name (torch's memory formats do not pickle with protocol 2)."""

    _FORMAT_KEYS = ("memory_format", "_memory_format")

    def __getstate__(self):
        state = dict(super().__getstate__())
        state.pop("_ck_routes", None)
        for key in self._FORMAT_KEYS:
            fmt = state.get(key)
            if fmt is not None and fmt in _FORMAT_NAMES:
                state[key] = (_FORMAT_TAG, _FORMAT_NAMES[fmt])
        return state

    def __setstate__(self, state):
        state = dict(state)
        for key in self._FORMAT_KEYS:
            fmt = state.get(key)
            if isinstance(fmt, tuple) and len(fmt) == 2 and fmt[0] == _FORMAT_TAG:
                state[key] = getattr(torch, fmt[1])
        super().__setstate__(state)


class FusedOptions(_PickleState):
    """The per-module options every fused module has (class defaults; set on instances)."""

    backend: Optional[str] = None
    memory_saving: bool = False
    sync_bn: bool = False
    process_group: Any = None


class OutputLayout:
    """The output layout option of the GEMM-block modules (class default; set on instances
    or through ``ConvMixer.memory_format``). None: the stock modules' layout for the input
    (``stock_layout``), so a converted model's layouts do not depend on which backend
    ``auto`` picked on a machine."""

    memory_format: Optional[torch.memory_format] = None


def _suggests_cl(t: Tensor) -> bool:
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _resolved(layout: dict, x: Any, conv: nn.Conv2d) -> dict:
    """``layout`` with a GEMM module's default (``memory_format`` None) made concrete: the
    stock modules' layout for this call. Only the kernel routes need it (the stock route
    keeps the stock layout by itself), so the hot paths do not pay for it."""
    if layout and layout.get("memory_format", _KEEP) is None and isinstance(x, Tensor):
        return {"memory_format": stock_layout(x, conv.weight)}
    return layout


def stock_layout(x: Tensor, weight: Tensor) -> torch.memory_format:
    """The layout of ``conv2d(x, weight)`` as torch returns it on the CPU (oneDNN and its
    fallback) and with cuDNN: channels_last where x or the weight is laid out
    channels_last, else contiguous. A 1x1 weight is both, and counts as contiguous."""
    if x.dim() == 4 and (_suggests_cl(x) or _suggests_cl(weight)):
        return torch.channels_last
    return torch.contiguous_format


_SPEC_OF = {functional.dw_block: DW_BLOCK, functional.pw_block: PW_BLOCK,
            functional.patch_embed: PATCH_EMBED}
_FN_OF = {spec.name: fn for fn, spec in _SPEC_OF.items()}

# The global module hooks (torch.nn.modules.module.register_module_forward_hook & co.):
# the dicts are created once and filled in place, so holding them here is a cheap check.
_GLOBAL_HOOKS = tuple(getattr(torch.nn.modules.module, name, {}) for name in (
    "_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
    "_global_backward_pre_hooks"))
_GF, _GFP, _GB, _GBP = _GLOBAL_HOOKS
_FX_PROXY = torch.fx.Proxy
_ACT_TYPES = (nn.GELU, nn.ReLU)  # the activations the fused ops compute (_activations)
_STRIDED = torch.strided
_FX = "torch.fx symbolic tracing"
_JIT = "torch.jit tracing or scripting"
_ONNX = "torch.onnx.export"
_UNUSUAL = "a sparse, mkldnn, nested or quantized input (the stock modules decide)"
# Reasons whose stock call returns exactly what the stock modules return (no relayout to
# the block's output layout): the tracers record the stock graph; unusual tensors have
# no memory format to change.
_FUNC = ("a torch.func transform (grad, vjp, jvp, vmap, ...) or forward-mode AD: the custom "
         "ops' autograd does not support them")
_AS_STOCK = frozenset((_FX, _JIT, _ONNX, _UNUSUAL, _FUNC))
_EMPTY = "an empty input (N = 0)"


def _hooked(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks
                or m._backward_pre_hooks)


def _stock_reason(x: Any, conv: nn.Module, act: nn.Module, bn: nn.Module) -> Optional[str]:
    """Why this call must run the stock child modules ``bn(act(conv(x)))`` instead of the
    fused op, or None (run the fused op). The rule, in order:

    1. an inner module is not the exact stock class the fused op computes: a
       parametrized conv or BN (``torch.nn.utils.parametrize``), a subclass (say
       ``nn.SyncBatchNorm`` swapped in after ``convert``), an activation other than
       ``nn.GELU``/``nn.ReLU``;
    2. an inner module has forward, forward-pre, backward or backward-pre hooks
       (``spectral_norm``, ``weight_norm`` and ``prune`` work through forward-pre hooks),
       or global module hooks are registered (``register_module_forward_hook`` & co.);
    3. a tracer that cannot see the custom ops is running: ``torch.fx`` (a Proxy input),
       ``torch.jit.trace``, ``torch.onnx.export`` (both exporters; ``torch.export`` on
       its own and ``torch.compile`` keep the fused ops), or a ``torch.func`` transform
       (``grad``, ``vjp``, ``jvp``, ``vmap``) or forward-mode AD: custom ops' autograd
       cannot run under them;
    4. the input is one the fused kernels do not take but the stock modules handle
       (or reject) themselves: an empty tensor (N = 0), a sparse, mkldnn, nested or
       quantized tensor.

    A few attribute reads on the fast path (the never-slower budget)."""
    if type(conv) is not nn.Conv2d or type(bn) is not nn.BatchNorm2d:
        for m in (conv, bn):
            if "parametrizations" in m._modules:
                return f"{type(m).__name__} is parametrized (torch.nn.utils.parametrize)"
        return (f"an inner module is a subclass ({type(conv).__name__}, {type(bn).__name__}), "
                "not the stock nn.Conv2d/nn.BatchNorm2d")
    if type(act) not in _ACT_TYPES:
        return f"the activation {type(act).__name__} is not one the fused ops compute"
    if (conv._forward_hooks or conv._forward_pre_hooks or conv._backward_hooks
            or conv._backward_pre_hooks or act._forward_hooks or act._forward_pre_hooks
            or act._backward_hooks or act._backward_pre_hooks or bn._forward_hooks
            or bn._forward_pre_hooks or bn._backward_hooks or bn._backward_pre_hooks):
        return "an inner module has hooks (forward/backward hooks, spectral_norm, prune)"
    if _GF or _GFP or _GB or _GBP:
        return "global module hooks are registered"
    if isinstance(x, _FX_PROXY):
        return _FX
    if torch.jit.is_tracing():  # the legacy ONNX exporter traces with it too
        return _JIT
    if autograd_transform_active():
        return _FUNC
    # The dynamo ONNX exporter runs torch.export; torch.export alone keeps the fused ops.
    if torch.compiler.is_exporting() and torch.onnx.is_in_onnx_export():
        return _ONNX
    if not isinstance(x, Tensor):
        return None  # the functional API rejects it with its message
    if x.layout is not _STRIDED or x.is_nested or x.is_quantized:
        return _UNUSUAL
    if x.numel() == 0:
        return _EMPTY
    return None


def _geometry_reason(spec: BlockSpec, conv: nn.Conv2d) -> Optional[str]:
    """Why ``conv`` (changed since the module was built) is not the convolution ``spec``'s
    fused op computes, or None: zero padding, no dilation, and a square kernel with
    depthwise 'same' (odd k, stride 1), 1x1 or non-overlapping-patch geometry."""
    k = conv.kernel_size
    if conv.padding_mode != "zeros" or conv.dilation != (1, 1) or k[0] != k[1]:
        pass
    elif spec.depthwise:
        if (conv.stride == (1, 1) and k[0] % 2 == 1 and conv.groups == conv.in_channels
                == conv.out_channels and conv.padding in ("same", (k[0] // 2, k[0] // 2))):
            return None
    elif conv.groups == 1 and conv.padding in ((0, 0), "valid") and (
            conv.stride == k if spec.patch else (k == (1, 1) and conv.stride == (1, 1))):
        return None
    return (f"the conv ({conv}) is not the convolution {spec.name} computes "
            "(padding mode, dilation, stride, padding or groups changed)")


_FUSED = object()  # route: the fused op


def _native_route(spec: BlockSpec, x: Tensor, conv: nn.Conv2d, act: nn.Module, bn: nn.BatchNorm2d,
                  owner: FusedOptions, layout: dict) -> Any:
    """How this call runs: ``_FUSED`` (the fused op), None (the stock child modules, their
    output as they return it) or a ``torch.memory_format`` (the stock child modules, their
    output laid out in it). The stock children run where the backend chosen for this input
    is ``native`` (explicitly, or by ``auto``'s tuning table); their output keeps the stock
    layout unless the module's ``memory_format`` is not None (``ConvMixer`` sets it on its
    blocks), as the kernels' output does (``run_fused`` resolves None to ``stock_layout``).
    The answer is kept per
    module and input signature (shape, strides, dtype, device, mode, options), so a
    repeated call costs one key and a dict lookup."""
    if (not isinstance(x, Tensor) or owner.sync_bn or torch.compiler.is_compiling()
            or (owner.memory_saving and owner.backend in (None, "auto")
                and backends.env_backend() in (None, "auto"))):
        # memory saving under auto: our ops (the stock path cannot recompute to save memory)
        # under torch.compile the functional API runs the same composite (F.conv2d, act,
        # F.batch_norm): tracing the stock child modules of a ConvMixerLayer gave wrong
        # running statistics for its depthwise block under aot_eager (torch 2.11)
        return _FUSED
    grad = torch.is_grad_enabled()
    train = bn.training or (bn.running_mean is None and bn.running_var is None) or (
        grad and (x.requires_grad or conv.weight.requires_grad))
    mode = backends.block_mode(train, grad and x.requires_grad)
    fmt = _KEEP if getattr(owner, "memory_format", None) is None else layout.get("memory_format", _KEEP)
    key = (id(conv), x.shape, x.stride(), x.dtype, x.device, mode, bn.eps, owner.backend,
           backends.env_backend(), backends.generation(), fmt, conv.weight.stride())
    routes = owner.__dict__.get("_ck_routes")
    if routes is None or len(routes) > 64:
        routes = owner.__dict__["_ck_routes"] = {}
    route = routes.get(key, _MISSING)
    if route is _MISSING:
        route = _FUSED
        name = _choose(spec, x, conv, act, bn, owner, mode)
        if name is not None and getattr(backends.get(name), "runs_composite", False):
            route = None
            if fmt is not _KEEP and not spec.residual:
                route = out_memory_format(resolve_out_format(fmt, x))
            routes[key] = route
        # (the fused route is stored by run_fused once the functional API has accepted
        # this signature: the eager-inference shortcut skips the validation)
        elif name is not None and not train and type(x) is Tensor:
            layout = _resolved(layout, x, conv)
            route = _Inference(backends.get(name), _activations.name_of(act),
                               resolve_out_format(layout["memory_format"], x)
                               if "memory_format" in layout else None, key)
        elif name is not None and grad and type(x) is Tensor and not owner.memory_saving:
            layout = _resolved(layout, x, conv)
            route = _Training(name, _activations.name_of(act),
                              resolve_out_format(layout.get("memory_format", torch.channels_last), x),
                              key, None)
        else:
            routes[key] = route
    return route


class _Inference(tuple):
    """Route: eager inference (running statistics, no grad) by the backend's kernel itself,
    for a signature the functional API has validated (``run_fused``)."""

    def __new__(cls, backend, activation, out_format, key):
        return super().__new__(cls, (backend, activation, out_format, key))


class _Training(tuple):
    """Route: eager training (grad enabled) by a kernel backend through the op's autograd
    Function, for a signature the functional API has validated (``run_fused``); ``params``:
    what it was validated with (``_validated_with``; other tensors in the children, or other
    BatchNorm options, validate again)."""

    def __new__(cls, name, activation, out_format, key, params):
        return super().__new__(cls, (name, activation, out_format, key, params))


_MISSING = object()
_KEEP = object()  # no memory_format set on the module: the stock layout


def _choose(spec, x, conv, act, bn, owner, mode) -> Optional[str]:
    """The backend ``auto`` (or the module's choice) runs for this input; None where the
    functional API will raise (it names the argument)."""
    if x.dim() != 4:
        return None
    w = conv.weight
    if x.shape[1] != conv.in_channels or x.dtype != w.dtype or x.device != w.device or x.numel() == 0:
        return None  # the functional API raises its error naming the argument
    if not (isinstance(bn.eps, float) and 0 < bn.eps < float("inf")):
        return None
    activation = _activations.name_of(act)
    try:
        name = backends.resolve(owner.backend, spec.name, x, mode, activation or "gelu",
                                conv.kernel_size[0], conv.out_channels)
    except (ValueError, TypeError, backends.BackendUnavailable):
        return None  # the functional API raises the error with its message
    return name


def _run_stock(spec: BlockSpec, x: Tensor, conv: nn.Conv2d, act: nn.Module, bn: nn.BatchNorm2d,
               layout: Optional[dict]) -> Tensor:
    """``bn(act(conv(x)))`` (+ x) by the stock modules themselves (their hooks and
    parametrizations included), in the block's output layout (``layout`` None: as the
    stock modules return it)."""
    y = bn(act(conv(x)))
    if spec.residual:
        return y + x  # timm's and the paper's Residual: fn(x) + x
    if layout is None:
        return y
    layout = _resolved(layout, x, conv)
    fmt = out_memory_format(resolve_out_format(layout.get("memory_format", torch.channels_last), x))
    return y.contiguous(memory_format=fmt)


def _run_native(x: Tensor, conv: nn.Conv2d, act: nn.Module, bn: nn.BatchNorm2d) -> Tensor:
    """``bn(act(conv(x)))`` as the stock modules compute it, the same ATen calls with the
    same arguments, for children that ``_stock_reason`` passed (the exact stock classes, no
    hooks, so each ``__call__`` would only run ``forward``). What ``forward`` does is done
    here directly (the per-call budget: this path must cost no more host time than the stock
    modules), BatchNorm's training bookkeeping included; a padding mode other than zeros and
    an eval BatchNorm without running statistics run ``forward`` itself.
    ``tests/test_host_path.py`` checks the results, statistics, counters and gradients
    bitwise against the stock modules."""
    p = conv._parameters
    if conv.padding_mode == "zeros":  # nn.Conv2d._conv_forward
        y = torch.conv2d(x, p["weight"], p["bias"], conv.stride, conv.padding, conv.dilation,
                         conv.groups)
    else:
        y = conv.forward(x)
    if type(act) is nn.GELU:
        y = F.gelu(y, approximate=act.approximate)  # a builtin: no Python wrapper
    else:
        y = torch.relu_(y) if act.inplace else torch.relu(y)  # F.relu
    b, bp = bn._buffers, bn._parameters
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training:  # nn.BatchNorm2d.forward in training (torch 2.11), statement for statement
        rm = rv = None
        if bn.track_running_stats:
            nbt = b["num_batches_tracked"]
            if nbt is not None:
                nbt.add_(1)
                factor = 1.0 / float(nbt) if bn.momentum is None else bn.momentum
            rm, rv = b["running_mean"], b["running_var"]
        return F.batch_norm(y, rm, rv, bp["weight"], bp["bias"], True, factor, bn.eps)
    if b["running_mean"] is None or b["running_var"] is None:
        return bn.forward(y)
    # nn.BatchNorm2d.forward in eval with running statistics: F.batch_norm(training=False)
    return torch.batch_norm(y, bp["weight"], bp["bias"], b["running_mean"], b["running_var"],
                            False, factor, bn.eps, torch.backends.cudnn.enabled)


def run_fused(fn: Callable[..., Tensor], x: Tensor, conv: nn.Conv2d, act: nn.Module,
              bn: nn.BatchNorm2d, owner: FusedOptions, **layout: Any) -> Tensor:
    """Run ``bn(act(conv(x)))`` (plus the residual for ``dw_block``) as one fused op,
    with nn.BatchNorm2d's bookkeeping (mirrors its ``forward``) and ``owner``'s options
    (``layout``: ``memory_format=`` for the GEMM blocks). The stock child modules run
    instead, ``bn(act(conv(x)))`` (+ x), where ``_stock_reason`` names a reason (hooks,
    parametrizations, tracers, empty or unusual inputs) and where the backend chosen for
    this input is ``native`` (the same maths, bookkeeping and cost as the stock model)."""
    spec = _SPEC_OF[fn]
    reason = _stock_reason(x, conv, act, bn)
    if reason is _EMPTY and owner.sync_bn and bn.training:
        reason = None  # a rank's empty share of a synchronized batch: it must join the all-reduce
    if reason is None:
        reason = _geometry_reason(spec, conv)
    if reason is not None:
        return _run_stock(spec, x, conv, act, bn, None if reason in _AS_STOCK else layout)
    route = _native_route(spec, x, conv, act, bn, owner, layout)
    if route is _FUSED:
        return _run_functional(fn, x, conv, act, bn, owner, layout)
    if type(route) is _Inference:
        routes = owner.__dict__["_ck_routes"]
        if route[3] not in routes:  # this signature's first call: the functional API checks it
            out = _run_functional(fn, x, conv, act, bn, owner, layout)
            routes[route[3]] = route
            return out
        if (not torch.is_grad_enabled() and not torch.is_autocast_enabled(x.device.type)
                and type(x) is Tensor and not torch._C._len_torch_dispatch_stack()
                and not torch._C._is_torch_function_mode_enabled()):
            return _run_inference(spec, route, x, conv, bn)
        return _run_functional(fn, x, conv, act, bn, owner, layout)
    if type(route) is _Training:
        routes = owner.__dict__["_ck_routes"]
        if routes.get(route[3]) is not route or not _still_valid(route, conv, bn):
            # this signature's first call (or new tensors in the children): checked by the
            # functional API, then kept
            out = _run_functional(fn, x, conv, act, bn, owner, layout)
            routes[route[3]] = _Training(*route[:4], _validated_with(conv, bn))
            return out
        if (torch.is_grad_enabled() and not owner.memory_saving
                and not torch.is_autocast_enabled(x.device.type)
                and type(x) is Tensor and eager_ok(x, *conv._parameters.values(),
                                                   *bn._parameters.values())):
            return _run_training(spec, route, x, conv, bn)
        return _run_functional(fn, x, conv, act, bn, owner, layout)
    y = _run_native(x, conv, act, bn)
    if spec.residual:
        return y + x
    return y if route is None else y.contiguous(memory_format=route)


def _tensors_of(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    p, bp, b = conv._parameters, bn._parameters, bn._buffers
    return (p["weight"], p["bias"], bp["weight"], bp["bias"], b["running_mean"], b["running_var"])


def _validated_with(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> tuple:
    """What a training route was validated with: weak references to the children's tensors
    (not ids, which a new tensor may reuse) and BatchNorm's options."""
    return (tuple(None if t is None else weakref.ref(t) for t in _tensors_of(conv, bn)),
            bn.momentum, bn.training, bn.track_running_stats)


def _still_valid(route: "_Training", conv: nn.Conv2d, bn: nn.BatchNorm2d) -> bool:
    refs, momentum, training, track = route[4]
    if (momentum, training, track) != (bn.momentum, bn.training, bn.track_running_stats):
        return False
    return all((r is None and t is None) or (r is not None and r() is t)
               for r, t in zip(refs, _tensors_of(conv, bn)))


def _bn_bookkeeping(bn: nn.BatchNorm2d) -> tuple:
    """nn.BatchNorm2d's per-call bookkeeping before a fused call: counts the batch, and
    returns (momentum factor, use batch statistics, running_mean, running_var to pass: None
    where training does not track them)."""
    b = bn._buffers
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and b["num_batches_tracked"] is not None:
        b["num_batches_tracked"].add_(1)
        if bn.momentum is None:  # cumulative moving average, kept as a tensor (no host sync)
            factor = 1.0 / b["num_batches_tracked"]
    rm, rv = b["running_mean"], b["running_var"]
    use_batch_stats = bn.training or (rm is None and rv is None)
    if bn.training and not bn.track_running_stats:
        rm = rv = None
    return factor, use_batch_stats, rm, rv


def _run_training(spec: BlockSpec, route: "_Training", x: Tensor, conv: nn.Conv2d,
                  bn: nn.BatchNorm2d) -> Tensor:
    """Eager training on a kernel backend for a validated signature: what
    ``_run_functional`` runs (nn.BatchNorm2d's bookkeeping, the op's autograd Function, the
    running statistics' update), without the functional API's checks and backend choice."""
    name, activation, out_format, _, _ = route
    p, bp, b = conv._parameters, bn._parameters, bn._buffers
    w, bias, bn_w, bn_b = p["weight"], p["bias"], bp["weight"], bp["bias"]
    factor, use_batch_stats, rm, rv = _bn_bookkeeping(bn)
    needs_grad = (x.requires_grad or w.requires_grad or (bias is not None and bias.requires_grad)
                  or (bn_w is not None and bn_w.requires_grad)
                  or (bn_b is not None and bn_b.requires_grad))
    with block_range(_FN_OF[spec.name]):
        return functional.run_op(BLOCK_OPS[spec.name], x, w, bias, bn_w, bn_b, rm, rv,
                                 use_batch_stats, factor, bn.eps, activation, needs_grad,
                                 out_format, name, True)


def _run_inference(spec: BlockSpec, route: "_Inference", x: Tensor, conv: nn.Conv2d,
                   bn: nn.BatchNorm2d) -> Tensor:
    """Eager inference by the backend's kernel, without the op's autograd and dispatch
    layers (nothing to record: no grad, no tracer, no mode): what the op would run."""
    backend, activation, out_format, _ = route
    p, bp, b = conv._parameters, bn._parameters, bn._buffers
    with block_range(_FN_OF[spec.name]):
        return backend.block_forward(spec, x, p["weight"], p["bias"], bp["weight"], bp["bias"],
                                     b["running_mean"], b["running_var"], False, float(bn.eps),
                                     activation, False, out_format)[0]


def _run_functional(fn, x: Tensor, conv: nn.Conv2d, act: nn.Module, bn: nn.BatchNorm2d,
                    owner: FusedOptions, layout: dict) -> Tensor:
    """The fused op through the functional API, with BatchNorm's bookkeeping (and the GEMM
    modules' default layout made concrete)."""
    layout = _resolved(layout, x, conv)
    factor, use_batch_stats, rm, rv = _bn_bookkeeping(bn)
    activation = _activations.name_of(act)
    if activation is None:
        raise TypeError(f"activation module: expected nn.GELU or nn.ReLU, got {type(act).__name__}")
    with block_range(fn):  # a profiler range (NVTX under emit_nvtx); nothing without a profiler
        return fn(x, conv.weight, conv.bias, bn.weight, bn.bias,
                  rm, rv,
                  training=use_batch_stats, momentum=factor, eps=bn.eps, activation=activation,
                  backend=owner.backend, memory_saving=owner.memory_saving, sync_bn=owner.sync_bn,
                  process_group=owner.process_group, **layout)


def _bn(dim: int, eps: float, momentum: Optional[float], dd: dict) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(dim, eps=eps, momentum=momentum, **dd)


class DepthwiseBlock(FusedOptions, nn.Module):
    """x + BN(act(dwconv_k(x) + b)): timm's ``Residual(Sequential(conv, act, bn))``.

    x (N, dim, H, W) -> (N, dim, H, W). Children: ``fn.0`` conv, ``fn.1`` act, ``fn.2`` BN.
    """

    def __init__(self, dim: int, kernel_size: int = 9, activation: str = "gelu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 backend: Optional[str] = None, device=None, dtype=None):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size: expected an odd size >= 1, got {kernel_size}")
        dd = {"device": device, "dtype": dtype}
        self.fn = nn.Sequential(
            nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same", **dd),
            _activations.make_module(activation), _bn(dim, eps, momentum, dd))
        if backend is not None:
            self.backend = backends.check_name(backend)

    def forward(self, x: Tensor) -> Tensor:
        fn = self.fn
        if _hooked(fn):  # hooks on the Sequential itself: call it, as timm's Residual does
            return fn(x) + x
        m = fn._modules  # (not fn[i]: Sequential's indexing costs a few us per call)
        return run_fused(functional.dw_block, x, m["0"], m["1"], m["2"], self)


class _FusedTriple(FusedOptions, OutputLayout, nn.Sequential):
    """Sequential(conv, act, BN) run as one fused op (keys ``0.*`` and ``2.*`` as timm's),
    its output in ``memory_format`` (None by default: the stock modules' layout)."""

    _fn: Callable[..., Tensor]

    def forward(self, x: Tensor) -> Tensor:
        m = self._modules  # (not self[i]: Sequential's indexing costs a few us per call)
        return run_fused(type(self)._fn, x, m["0"], m["1"], m["2"], self,
                         memory_format=self.memory_format)


class PointwiseBlock(_FusedTriple):
    """BN(act(conv1x1(x) + b)): x (N, in_dim, H, W) -> (N, out_dim, H, W), in
    ``memory_format`` (None by default: the stock modules' layout)."""

    _fn = staticmethod(functional.pw_block)

    def __init__(self, in_dim: int, out_dim: Optional[int] = None, activation: str = "gelu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 backend: Optional[str] = None, device=None, dtype=None):
        out_dim = in_dim if out_dim is None else out_dim
        dd = {"device": device, "dtype": dtype}
        super().__init__(nn.Conv2d(in_dim, out_dim, 1, **dd), _activations.make_module(activation),
                         _bn(out_dim, eps, momentum, dd))
        if backend is not None:
            self.backend = backends.check_name(backend)


class PatchEmbed(_FusedTriple):
    """BN(act(conv_p_stride_p(img) + b)): img (N, in_chans, H, W) -> (N, dim, H // p, W // p),
    in ``memory_format`` (None by default: the stock modules' layout)."""

    _fn = staticmethod(functional.patch_embed)

    def __init__(self, in_chans: int, dim: int, patch_size: int = 7, activation: str = "gelu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 backend: Optional[str] = None, device=None, dtype=None):
        if patch_size < 1:
            raise ValueError(f"patch_size: expected a size >= 1, got {patch_size}")
        dd = {"device": device, "dtype": dtype}
        super().__init__(nn.Conv2d(in_chans, dim, patch_size, stride=patch_size, **dd),
                         _activations.make_module(activation), _bn(dim, eps, momentum, dd))
        if backend is not None:
            self.backend = backends.check_name(backend)


class ConvMixerLayer(FusedOptions, OutputLayout, nn.Sequential):
    """One ConvMixer layer: ``DepthwiseBlock`` then the pointwise block.

    Children as timm's layer: ``0`` DepthwiseBlock (``0.fn.*``), ``1`` 1x1 conv,
    ``2`` act, ``3`` BN. x (N, dim, H, W) -> (N, dim, H, W), in ``memory_format`` (the
    pointwise block's output layout; None by default: the stock modules' layout).
    """

    def __init__(self, dim: int, kernel_size: int = 9, activation: str = "gelu",
                 eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 backend: Optional[str] = None, device=None, dtype=None):
        dd = {"device": device, "dtype": dtype}
        super().__init__(
            DepthwiseBlock(dim, kernel_size, activation, eps, momentum, backend, **dd),
            nn.Conv2d(dim, dim, 1, **dd), _activations.make_module(activation),
            _bn(dim, eps, momentum, dd))
        if backend is not None:
            self.backend = backends.check_name(backend)

    # Eval + no grad + triton: the whole layer as one Triton kernel (the pointwise GEMM's
    # prologue computes the depthwise block; see convmixer_kernels/backends/triton/layer.py). Off
    # by default: which split is faster is for a GPU run of the bench provider
    # ``fused_triton_layer`` against ``fused_triton`` to show.
    layer_fusion: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.layer_fusion and layer_blocker(self, x) is None:
            return layer_module_eval(self, x)
        m = self._modules
        x = m["0"](x)
        return run_fused(functional.pw_block, x, m["1"], m["2"], m["3"], self,
                         memory_format=self.memory_format)


def _layer_children(layer: nn.Module):
    """(dw conv, act1, bn1, pw conv, act2, bn2) of a ConvMixerLayer (timm's child layout)."""
    dw = layer[0].fn
    return dw[0], dw[1], dw[2], layer[1], layer[2], layer[3]


def layer_blocker(layer: nn.Module, x: Tensor) -> Optional[str]:
    """None when ``layer_module_eval(layer, x)`` computes what ``layer``'s two fused ops
    would, with the triton backend; else why not (the caller runs the two blocks)."""
    if not isinstance(x, Tensor) or x.dim() != 4:
        return "x is not a 4-D tensor"
    dwconv, act1, bn1, pwconv, act2, bn2 = _layer_children(layer)
    reason = _stock_reason(x, dwconv, act1, bn1) or _stock_reason(x, pwconv, act2, bn2)
    if reason is not None or _hooked(layer[0]) or _hooked(layer[0].fn):
        return reason or "the depthwise block has hooks"
    if bn1.training or bn2.training:
        return "training mode (batch statistics)"
    if bn1.running_mean is None or bn2.running_mean is None:
        return "a BatchNorm has no running statistics"
    if torch.is_grad_enabled() and (x.requires_grad or any(
            p.requires_grad for p in layer.parameters())):
        return "grad mode with inputs or parameters that require grad"
    if x.device.type in ("cpu", "cuda") and torch.is_autocast_enabled(x.device.type):
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
    """``layer(x)`` for a ``ConvMixerLayer`` in eval mode by one ``layer_eval`` call with
    the triton backend (check ``layer_blocker(layer, x)`` first)."""
    dwconv, act1, bn1, pwconv, act2, bn2 = _layer_children(layer)
    with block_range(functional.layer_eval):  # a profiler range, as the blocks have
        return functional.layer_eval(
            x, dwconv.weight, dwconv.bias, bn1.weight, bn1.bias, bn1.running_mean,
            bn1.running_var, pwconv.weight, pwconv.bias, bn2.weight, bn2.bias, bn2.running_mean,
            bn2.running_var, eps1=bn1.eps, eps2=bn2.eps, act1=_activations.name_of(act1),
            act2=_activations.name_of(act2), backend="triton", memory_format=layer.memory_format)


class ConvMixer(_PickleState, nn.Module):
    """ConvMixer with timm's attribute names and ``state_dict`` keys.

    ``ConvMixer(dim, depth, ...).load_state_dict(timm_model.state_dict())`` works for
    timm's ``convmixer_*`` models. img (N, in_chans, H, W) -> logits (N, num_classes).

    ``memory_format``: the layout the trunk runs in, set on the patch embedding and on
    every layer (their ``memory_format``, the GEMM blocks' output layout; the depthwise
    blocks follow their input). The default, ``torch.channels_last``, lays the image out
    channels-last before the patch embedding (a copy of the 3-channel image, about a
    tenth of one trunk activation when it is not already channels_last) and has every
    GEMM block write channels_last: pixel-major rows, from which the depthwise blocks
    read whole channel vectors, the layout the GPU kernels are built for.
    ``torch.contiguous_format`` runs the image and the trunk NCHW; None keeps the image's
    layout throughout. Setting the
    attribute later updates the blocks. Results are the same up to rounding order.
    """

    def __init__(self, dim: int, depth: int, kernel_size: int = 9, patch_size: int = 7,
                 num_classes: int = 1000, activation: str = "gelu", in_chans: int = 3,
                 drop_rate: float = 0.0, eps: float = 1e-5, momentum: Optional[float] = 0.1,
                 backend: Optional[str] = None, device=None, dtype=None,
                 memory_format: Optional[torch.memory_format] = torch.channels_last):
        super().__init__()
        self._check_memory_format(memory_format)
        dd = {"device": device, "dtype": dtype}
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = self.head_hidden_size = dim
        self.stem = PatchEmbed(in_chans, dim, patch_size, activation, eps, momentum, backend, **dd)
        self.blocks = nn.Sequential(*[
            ConvMixerLayer(dim, kernel_size, activation, eps, momentum, backend, **dd)
            for _ in range(depth)])
        self.pooling = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(dim, num_classes, **dd) if num_classes > 0 else nn.Identity()
        self.memory_format = memory_format

    @staticmethod
    def _check_memory_format(memory_format: object) -> None:
        if memory_format not in (None, torch.channels_last, torch.contiguous_format):
            raise ValueError(f"memory_format: expected torch.channels_last, torch.contiguous_format "
                             f"or None, got {memory_format!r}")

    @property
    def memory_format(self) -> Optional[torch.memory_format]:
        return self._memory_format

    @memory_format.setter
    def memory_format(self, memory_format: Optional[torch.memory_format]) -> None:
        self._check_memory_format(memory_format)
        self._memory_format = memory_format
        for m in (self.stem, *self.blocks):
            if isinstance(m, OutputLayout):
                m.memory_format = memory_format

    def forward_features(self, x: Tensor) -> Tensor:
        if self.memory_format is not None and isinstance(x, Tensor) and x.dim() == 4:
            x = x.contiguous(memory_format=self.memory_format)
        return self.blocks(self.stem(x))

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = self.head_drop(self.pooling(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def convmixer_1536_20(**kwargs) -> ConvMixer:
    """timm's ``convmixer_1536_20``: dim 1536, depth 20, k=9, patch 7, GELU."""
    return ConvMixer(1536, 20, kernel_size=9, patch_size=7, **kwargs)


def convmixer_768_32(**kwargs) -> ConvMixer:
    """timm's ``convmixer_768_32``: dim 768, depth 32, k=7, patch 7, ReLU."""
    return ConvMixer(768, 32, kernel_size=7, patch_size=7, activation="relu", **kwargs)


def convmixer_1024_20_ks9_p14(**kwargs) -> ConvMixer:
    """timm's ``convmixer_1024_20_ks9_p14``: dim 1024, depth 20, k=9, patch 14, GELU."""
    return ConvMixer(1024, 20, kernel_size=9, patch_size=14, **kwargs)
