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
and subclasses of the stock modules are left alone.
"""
from __future__ import annotations

from typing import Optional

from torch import Tensor, nn

from . import _activations, backends
from .modules import (ConvMixerLayer, DepthwiseBlock, FusedOptions, PatchEmbed, PointwiseBlock,
                      _FusedTriple, run_fused)

__all__ = ["convert", "set_backend", "set_memory_saving", "convert_sync_batchnorm", "FusedSequential"]

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


def convert(model: nn.Module, backend: Optional[str] = None) -> nn.Module:
    """Swap the ConvMixer parts of ``model`` for fused modules, in place; returns ``model``.

    ``backend`` (optional) is set on every fused module (see ``set_backend``).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected an nn.Module, got {type(model).__name__}")
    for m in list(model.modules()):
        cls = _fused_class(m)
        if cls is not None:
            m.__class__ = cls
            if cls is ConvMixerLayer and not isinstance(m[0], DepthwiseBlock):
                m[0].__class__ = DepthwiseBlock
    if backend is not None:
        set_backend(model, backend)
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


