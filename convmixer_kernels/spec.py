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
    """x's layout as the blocks read it: channels_last for a channels_last tensor (one
    that is not also plain contiguous), NCHW-contiguous otherwise (strided views
    included). dw_block's output and every block's dx follow this rule; pw_block's and
    patch_embed's output follow their ``out_format`` (``resolve_out_format``), which is
    this rule only for ``memory_format=torch.preserve_format``/None."""
    if x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous():
        return torch.channels_last
    return torch.contiguous_format


# Output layouts of the GEMM blocks (pw_block, patch_embed) as the ops and kernels name
# them: the ``out_format`` argument of their schemas.
OUT_FORMATS: dict[str, "torch.memory_format"] = {
    "channels_last": torch.channels_last,
    "contiguous": torch.contiguous_format,
}


def out_format_name(fmt: "torch.memory_format") -> str:
    """The ``out_format`` string of a concrete layout (torch.channels_last or
    torch.contiguous_format)."""
    return "channels_last" if fmt == torch.channels_last else "contiguous"


def out_memory_format(out_format: str) -> "torch.memory_format":
    """The layout an ``out_format`` string names; ValueError naming ``out_format`` otherwise."""
    try:
        return OUT_FORMATS[out_format]
    except (KeyError, TypeError):
        raise ValueError(f"out_format: expected one of {tuple(OUT_FORMATS)}, "
                         f"got {out_format!r}") from None


def resolve_out_format(memory_format: object, x: Tensor) -> str:
    """The concrete ``out_format`` of a GEMM block's ``memory_format`` option:
    torch.channels_last -> 'channels_last', torch.contiguous_format -> 'contiguous',
    torch.preserve_format or None -> x's layout (``output_memory_format(x)``).
    Anything else: ValueError naming ``memory_format``."""
    if memory_format is None or memory_format is torch.preserve_format:
        return out_format_name(output_memory_format(x))
    if memory_format is torch.channels_last or memory_format is torch.contiguous_format:
        return out_format_name(memory_format)
    raise ValueError("memory_format: expected torch.channels_last (the default), "
                     "torch.contiguous_format (NCHW), torch.preserve_format or None (follow "
                     f"the input's layout), got {memory_format!r}")


def stats_dtype(x: Tensor) -> "torch.dtype":
    """Per-channel statistics are float32 (float64 for float64 inputs)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32
