"""Geometry of the three fused blocks: one place for what differs between them.

All three compute ``[x +] BN(act(conv(x) + b))``; they differ in the convolution
(depthwise 'same' k x k, pointwise 1x1, or non-overlapping p x p patches) and in
whether the input is added back.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class BlockSpec:
    name: str
    residual: bool
    depthwise: bool
    patch: bool

    def stride(self, weight: Tensor) -> tuple[int, int]:
        k = weight.shape[-1] if self.patch else 1
        return (k, k)

    def padding(self, weight: Tensor) -> tuple[int, int]:
        k = weight.shape[-1] if self.depthwise else 0
        return (k // 2, k // 2)

    def groups(self, x: Tensor) -> int:
        return x.shape[1] if self.depthwise else 1

    def out_shape(self, x: Tensor, weight: Tensor) -> tuple[int, int, int, int]:
        n, _, h, w = x.shape
        if self.patch:
            p = weight.shape[-1]
            return (n, weight.shape[0], h // p, w // p)
        return (n, weight.shape[0], h, w)


DW_BLOCK = BlockSpec("dw_block", residual=True, depthwise=True, patch=False)
PW_BLOCK = BlockSpec("pw_block", residual=False, depthwise=False, patch=False)
PATCH_EMBED = BlockSpec("patch_embed", residual=False, depthwise=False, patch=True)
SPECS: dict[str, BlockSpec] = {s.name: s for s in (DW_BLOCK, PW_BLOCK, PATCH_EMBED)}


def output_memory_format(x: Tensor) -> "torch.memory_format":
    """Layout of every activation-shaped result: channels_last for a channels_last
    input (one that is not also plain contiguous), NCHW-contiguous otherwise
    (strided views included). Fakes and kernels both follow this rule."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


def stats_dtype(x: Tensor) -> "torch.dtype":
    """Per-channel statistics are float32 (float64 for float64 inputs)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
