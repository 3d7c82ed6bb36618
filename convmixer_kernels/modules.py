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
  ``nn.SyncBatchNorm``; see ``convmixer_kernels._sync``.

The modules with a pointwise or patch GEMM (``PointwiseBlock``, ``PatchEmbed``,
``ConvMixerLayer``'s pointwise part) also have ``memory_format``, their output layout:
``torch.channels_last`` (class default), ``torch.contiguous_format`` (NCHW), or
None/``torch.preserve_format`` (follow the input's layout); see
``convmixer_kernels.functional``. ``DepthwiseBlock``'s output follows its input's layout.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from torch import Tensor, nn

from . import _activations, backends, functional
from .ops import layer as _layer_op
from ._ranges import block_range

__all__ = ["DepthwiseBlock", "PointwiseBlock", "PatchEmbed", "ConvMixerLayer", "ConvMixer"]


class FusedOptions:
    """The per-module options every fused module has (class defaults; set on instances)."""

    backend: Optional[str] = None
    memory_saving: bool = False
    sync_bn: bool = False
    process_group: Any = None


class OutputLayout:
    """The output layout option of the GEMM-block modules (class default; set on instances
    or through ``ConvMixer.memory_format``)."""

    memory_format: Optional[torch.memory_format] = torch.channels_last


def run_fused(fn: Callable[..., Tensor], x: Tensor, conv: nn.Conv2d, act: nn.Module,
              bn: nn.BatchNorm2d, owner: FusedOptions, **layout: Any) -> Tensor:
    """Run ``bn(act(conv(x)))`` (plus the residual for ``dw_block``) as one fused op,
    with nn.BatchNorm2d's bookkeeping (mirrors its ``forward``) and ``owner``'s options
    (``layout``: ``memory_format=`` for the GEMM blocks)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        if bn.momentum is None:  # cumulative moving average, kept as a tensor (no host sync)
            factor = 1.0 / bn.num_batches_tracked
    use_batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    keep = not bn.training or bn.track_running_stats
    activation = _activations.name_of(act)
    if activation is None:
        raise TypeError(f"activation module: expected nn.GELU or nn.ReLU, got {type(act).__name__}")
    with block_range(fn):  # a profiler range (NVTX under emit_nvtx); nothing without a profiler
        return fn(x, conv.weight, conv.bias, bn.weight, bn.bias,
                  bn.running_mean if keep else None, bn.running_var if keep else None,
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
        return run_fused(functional.dw_block, x, self.fn[0], self.fn[1], self.fn[2], self)


class _FusedTriple(FusedOptions, OutputLayout, nn.Sequential):
    """Sequential(conv, act, BN) run as one fused op (keys ``0.*`` and ``2.*`` as timm's),
    its output in ``memory_format`` (channels_last by default)."""

    _fn: Callable[..., Tensor]

    def forward(self, x: Tensor) -> Tensor:
        return run_fused(type(self)._fn, x, self[0], self[1], self[2], self,
                         memory_format=self.memory_format)


class PointwiseBlock(_FusedTriple):
    """BN(act(conv1x1(x) + b)): x (N, in_dim, H, W) -> (N, out_dim, H, W), in
    ``memory_format`` (channels_last by default)."""

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
    in ``memory_format`` (channels_last by default)."""

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
    pointwise block's output layout, channels_last by default).
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
    # prologue computes the depthwise block; see convmixer_kernels/_triton/layer.py). Off
    # by default: which split is faster is for a GPU run of the bench provider
    # ``fused_triton_layer`` against ``fused_triton`` to show.
    layer_fusion: bool = False

    def forward(self, x: Tensor) -> Tensor:
        if self.layer_fusion and _layer_op.layer_blocker(self, x) is None:
            return _layer_op.layer_module_eval(self, x)
        x = self[0](x)
        return run_fused(functional.pw_block, x, self[1], self[2], self[3], self,
                         memory_format=self.memory_format)


class ConvMixer(nn.Module):
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
