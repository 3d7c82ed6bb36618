"""``convert(model)``: run the ConvMixer parts of an existing model with the fused ops.

Converts in place and returns ``model``. A matched submodule keeps its identity,
children, parameters, buffers, hooks and train/eval state; only its class is
swapped for the fused one (the technique ``torch.nn.utils.parametrize`` uses), so
``state_dict`` keys, optimizers holding its parameters and loaded weights are all
unaffected. Matched patterns (exact stock classes, nothing else):

- ``Residual`` (timm's or the paper's: a module whose only child ``fn`` is
  ``Sequential(depthwise Conv2d 'same', GELU/ReLU, BatchNorm2d)``) -> ``DepthwiseBlock``;
- ``Sequential(<that Residual>, Conv2d 1x1, act, BatchNorm2d)`` -> ``ConvMixerLayer``;
- ``Sequential(Conv2d 1x1, act, BatchNorm2d)`` -> ``PointwiseBlock``;
- ``Sequential(Conv2d p x p stride p, act, BatchNorm2d)`` -> ``PatchEmbed``;
- any other ``Sequential`` holding such a (conv, act, BN) run among its children
  (the paper's flat stem) -> ``FusedSequential``, which fuses the run in place.

Convolutions with dilation, non-zero padding modes, other strides or paddings,
activations other than ``nn.GELU``/``nn.ReLU``, and subclasses of the stock modules
(``nn.SyncBatchNorm``, a parametrized conv) are left alone, and ``convert`` says so:
one INFO line on the ``convmixer_kernels`` logger, a ``UserWarning`` when nothing
matched, and the full ``ConvertReport`` with ``report=True``.

After ``convert``, a fused module still runs its stock child modules for a call where
the fused op could not honour what the stock model would do (hooks or
parametrizations added to an inner module, torch.fx/jit/ONNX tracing, an empty batch):
see ``convmixer_kernels.modules._stock_reason``. ``unconvert`` undoes ``convert``.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Optional

from torch import Tensor, nn

from . import _activations, backends
from .modules import (ConvMixerLayer, DepthwiseBlock, FusedOptions, OutputLayout, PatchEmbed,
                      PointwiseBlock, _FusedTriple, run_fused)

__all__ = ["convert", "unconvert", "ConvertReport", "set_backend", "set_memory_saving",
           "convert_sync_batchnorm", "FusedSequential"]

log = logging.getLogger("convmixer_kernels")

# Instance attributes convert() records and unconvert() reads: the class the module had,
# and the values the fused-only options had on the instance before (usually none).
_ORIGINAL_CLASS = "_ck_original_class"
_ORIGINAL_ATTRS = "_ck_original_attrs"
_FUSED_ATTRS = ("backend", "memory_saving", "sync_bn", "process_group", "memory_format",
                "layer_fusion", "_ck_routes")  # _ck_routes: modules._native_route's cache

FUSED_TYPES = (DepthwiseBlock, _FusedTriple, ConvMixerLayer)


def _plain_conv(m: nn.Module) -> bool:
    return (type(m) is nn.Conv2d and m.dilation == (1, 1) and m.padding_mode == "zeros"
            and m.kernel_size[0] == m.kernel_size[1])


def _is_dwconv(m: nn.Module) -> bool:
    if not _plain_conv(m) or not (m.groups == m.in_channels == m.out_channels):
        return False
    k = m.kernel_size[0]
    return k % 2 == 1 and m.stride == (1, 1) and m.padding in ("same", (k // 2, k // 2))


def _is_patch_conv(m: nn.Module) -> bool:
    if not _plain_conv(m) or m.groups != 1:
        return False
    p = m.kernel_size[0]
    no_pad = m.padding in ("valid", (0, 0)) or (p == 1 and m.padding == "same")
    return m.stride == (p, p) and no_pad


def _bn_after(act: nn.Module, bn: nn.Module, conv: nn.Conv2d) -> bool:
    return (_activations.name_of(act) is not None and type(bn) is nn.BatchNorm2d
            and bn.num_features == conv.out_channels)


def triple_class(conv: nn.Module, act: nn.Module, bn: nn.Module) -> Optional[type]:
    """PointwiseBlock/PatchEmbed if (conv, act, bn) is one of them, else None."""
    if not _is_patch_conv(conv) or not _bn_after(act, bn, conv):
        return None
    return PointwiseBlock if conv.kernel_size == (1, 1) else PatchEmbed


def _is_residual_dw(m: nn.Module) -> bool:
    if isinstance(m, DepthwiseBlock):
        return True
    if type(m).__name__ != "Residual" or list(m._modules) != ["fn"]:
        return False
    fn = m.fn
    return (type(fn) is nn.Sequential and len(fn) == 3 and _is_dwconv(fn[0])
            and _bn_after(fn[1], fn[2], fn[0]))


def _runs(seq: nn.Sequential) -> list[int]:
    mods = list(seq)
    return [i for i in range(len(mods) - 2) if triple_class(*mods[i:i + 3]) is not None]


class FusedSequential(FusedOptions, nn.Sequential):
    """A Sequential whose (conv, act, BN) runs execute as fused ops; other children as usual."""

    def forward(self, x: Tensor) -> Tensor:
        mods, i = list(self), 0
        while i < len(mods):
            cls = triple_class(*mods[i:i + 3]) if i + 2 < len(mods) else None
            if cls is None:
                x, i = mods[i](x), i + 1
            else:
                x, i = run_fused(cls._fn, x, *mods[i:i + 3], self), i + 3
        return x


def _fused_class(m: nn.Module) -> Optional[type]:
    if _is_residual_dw(m) and not isinstance(m, DepthwiseBlock):
        return DepthwiseBlock
    if type(m) is not nn.Sequential:
        return None
    if len(m) == 3 and triple_class(*m) is not None:
        return triple_class(*m)
    if len(m) == 4 and _is_residual_dw(m[0]) and triple_class(*list(m)[1:]) is PointwiseBlock:
        return ConvMixerLayer
    return FusedSequential if _runs(m) else None


def _conv_reason(conv: nn.Module, depthwise: bool) -> Optional[str]:
    """Why ``conv`` is not a convolution a fused block computes, or None."""
    if type(conv) is not nn.Conv2d:
        what = "parametrized" if "parametrizations" in conv._modules else "a subclass"
        return f"the conv is {what} ({type(conv).__name__}), not a plain nn.Conv2d"
    if conv.padding_mode != "zeros":
        return f"the conv's padding_mode is {conv.padding_mode!r} (fused: 'zeros')"
    if conv.dilation != (1, 1):
        return f"the conv is dilated ({conv.dilation})"
    if conv.kernel_size[0] != conv.kernel_size[1]:
        return f"the conv's kernel is not square ({conv.kernel_size})"
    if depthwise:
        if not _is_dwconv(conv):
            return (f"not a depthwise conv with an odd kernel, stride 1 and 'same' padding "
                    f"(groups={conv.groups}, k={conv.kernel_size}, stride={conv.stride}, "
                    f"padding={conv.padding})")
    elif not _is_patch_conv(conv):
        return (f"not a 1x1 or patch (kernel = stride, no padding, groups=1) conv "
                f"(groups={conv.groups}, k={conv.kernel_size}, stride={conv.stride}, "
                f"padding={conv.padding})")
    return None


def _triple_reason(conv: nn.Module, act: nn.Module, bn: nn.Module, depthwise: bool) -> Optional[str]:
    reason = _conv_reason(conv, depthwise)
    if reason is None and _activations.name_of(act) is None:
        reason = f"the activation {type(act).__name__} is not nn.GELU or nn.ReLU"
    if reason is None and type(bn) is not nn.BatchNorm2d:
        reason = f"the norm is {type(bn).__name__}, not a plain nn.BatchNorm2d"
    if reason is None and bn.num_features != conv.out_channels:
        reason = "the BatchNorm's num_features differ from the conv's out_channels"
    return reason


def _near_miss(m: nn.Module) -> Optional[str]:
    """Why a module that looks like a ConvMixer part (a conv -> act -> BatchNorm run) is
    not converted, or None when it does not look like one."""
    bn_types = nn.modules.batchnorm._BatchNorm
    if type(m).__name__ == "Residual" and isinstance(getattr(m, "fn", None), nn.Sequential) \
            and len(m.fn) == 3 and isinstance(m.fn[0], nn.Conv2d) and isinstance(m.fn[2], bn_types):
        if list(m._modules) != ["fn"] or type(m.fn) is not nn.Sequential:
            return "a Residual with other children, or whose fn is not a plain nn.Sequential"
        return _triple_reason(m.fn[0], m.fn[1], m.fn[2], depthwise=True)
    if not isinstance(m, nn.Sequential):
        return None
    mods = list(m)
    for i in range(len(mods) - 2):
        conv, act, bn = mods[i:i + 3]
        if isinstance(conv, nn.Conv2d) and isinstance(bn, bn_types) and conv.groups == 1:
            if type(m) is not nn.Sequential:
                return f"a subclass of nn.Sequential ({type(m).__name__}): its forward may differ"
            reason = _triple_reason(conv, act, bn, depthwise=False)
            if reason is not None:
                return f"children {i}-{i + 2}: {reason}"
    return None


@dataclass
class ConvertReport:
    """What ``convert`` did: ``swapped`` holds (qualified name, stock class, fused class)
    for every module whose class it swapped, ``left`` (qualified name, why) for every
    module that looks like a ConvMixer part but was left as it is."""

    swapped: list = field(default_factory=list)
    left: list = field(default_factory=list)

    def __str__(self) -> str:
        counts: dict = {}
        for _, _, fused in self.swapped:
            counts[fused] = counts.get(fused, 0) + 1
        done = ", ".join(f"{n} {c}" for c, n in counts.items()) or "nothing"
        text = f"convert: swapped {done}"
        if self.left:
            text += f"; left {len(self.left)}: " + "; ".join(
                f"{name or '<model>'} ({why})" for name, why in self.left)
        return text


def _swap(m: nn.Module, cls: type) -> None:
    if _ORIGINAL_CLASS not in m.__dict__:  # the class convert found (unconvert restores it)
        m.__dict__[_ORIGINAL_CLASS] = type(m)
        m.__dict__[_ORIGINAL_ATTRS] = {k: m.__dict__[k] for k in _FUSED_ATTRS if k in m.__dict__}
    m.__class__ = cls


def convert(model: nn.Module, backend: Optional[str] = None, *, report: bool = False):
    """Swap the ConvMixer parts of ``model`` for fused modules, in place; returns ``model``
    (with ``report=True``: ``(model, ConvertReport)``).

    ``backend`` (optional) is set on every fused module (see ``set_backend``). Modules
    that look like ConvMixer parts but cannot be served faithfully (a conv subclass or a
    parametrized conv, a padding mode other than zeros, an activation other than
    GELU/ReLU, a BatchNorm subclass, ...) are left alone. ``convert`` logs one INFO line
    on the ``convmixer_kernels`` logger saying what it swapped and what it left and why,
    and warns (``UserWarning``) when nothing in ``model`` matched. ``unconvert(model)``
    undoes it.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    if backend is not None:
        backends.check_name(backend)
    summary = ConvertReport()
    for name, m in list(model.named_modules()):
        cls = _fused_class(m)
        if cls is not None:
            summary.swapped.append((name, type(m).__name__, cls.__name__))
            if cls is ConvMixerLayer and not isinstance(m[0], DepthwiseBlock):
                summary.swapped.append((f"{name}.0" if name else "0", type(m[0]).__name__,
                                        DepthwiseBlock.__name__))
                _swap(m[0], DepthwiseBlock)
            _swap(m, cls)
        elif not isinstance(m, FusedOptions):
            why = _near_miss(m)
            if why is not None:
                summary.left.append((name, why))
    if backend is not None:
        set_backend(model, backend)
    log.info("%s", summary)
    if not summary.swapped and not any(isinstance(m, FusedOptions) for m in model.modules()):
        warnings.warn(f"convmixer_kernels.convert: nothing in this {type(model).__name__} "
                      f"matched a ConvMixer block; the model is unchanged"
                      + (f" ({summary})" if summary.left else ""), UserWarning, stacklevel=2)
    return (model, summary) if report else model


def unconvert(model: nn.Module) -> nn.Module:
    """Undo ``convert``, in place; returns ``model``.

    Every module ``convert`` swapped gets back the class it had, and loses the fused-only
    options set on it (``backend``, ``memory_saving``, ``sync_bn``, ``process_group``,
    ``memory_format``, ``layer_fusion``); its children, parameters, buffers (the same
    tensor objects), hooks and train/eval state are untouched, so
    ``unconvert(convert(m))`` is ``m`` again and ``convert(unconvert(m))`` the converted
    model again (state_dict and outputs equal, bit for bit). Modules built as fused
    classes (``ck.ConvMixer``, ``ck.DepthwiseBlock`` ...) have no stock class to go back to
    and are left as they are (with a ``UserWarning`` naming them).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    native = []
    for name, m in model.named_modules():
        original = m.__dict__.pop(_ORIGINAL_CLASS, None)
        if original is None:
            if isinstance(m, (FusedOptions, OutputLayout)):
                native.append(name or "<model>")
            continue
        saved = m.__dict__.pop(_ORIGINAL_ATTRS, {})
        for attr in _FUSED_ATTRS:
            m.__dict__.pop(attr, None)
        m.__dict__.update(saved)
        m.__class__ = original
    if native:
        warnings.warn("convmixer_kernels.unconvert: left modules built as fused classes (no stock "
                      f"class to go back to): {', '.join(native)}", UserWarning, stacklevel=2)
    return model


def set_backend(model: nn.Module, backend: Optional[str]) -> nn.Module:
    """Set ``backend`` on every fused module inside ``model`` (None: back to the default)."""
    if backend is not None:
        backends.check_name(backend)
    for m in model.modules():
        if isinstance(m, FusedOptions):
            if backend is None:
                m.__dict__.pop("backend", None)
            else:
                m.backend = backend
    return model


def set_memory_saving(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Turn the memory-saving training mode on or off for every fused module inside
    ``model``: backward recomputes each block's pre-activation from its input instead of
    saving it (one activation-sized tensor less per block, one more convolution in
    backward; the same gradients, bit for bit). Returns ``model``."""
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled: expected a bool, got {type(enabled).__name__}")
    for m in model.modules():
        if isinstance(m, FusedOptions):
            m.memory_saving = enabled
    return model


def convert_sync_batchnorm(module: nn.Module, process_group: object = None) -> nn.Module:
    """``nn.SyncBatchNorm.convert_sync_batchnorm`` for models holding fused modules.

    Every fused module inside ``module`` synchronizes its BatchNorm over
    ``process_group`` (None: the default group) in training; every other BatchNorm
    layer is replaced by ``nn.SyncBatchNorm`` (the stock helper). Parameters,
    buffers and state_dict keys are unchanged. Returns the converted module (a new
    object only when ``module`` itself is a plain BatchNorm layer, as the stock helper).
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"module: expected an nn.Module, got {type(module).__name__}")
    if isinstance(module, FusedOptions):
        for m in module.modules():
            if isinstance(m, FusedOptions):
                m.sync_bn, m.process_group = True, process_group
        return module
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return nn.SyncBatchNorm.convert_sync_batchnorm(module, process_group)
    for name, child in module.named_children():
        new = convert_sync_batchnorm(child, process_group)
        if new is not child:
            module.add_module(name, new)
    return module


