"""The contract every backend implements: one method per op, typed.

A backend is an object with a ``name``, the device types it serves, and

- ``unavailable(op, x)``: None if it can run ``op`` on ``x``'s device and dtype, else
  the reason (a sentence);
- ``block_forward(spec, ...)`` and ``block_backward(spec, ...)``: one of the three
  blocks (``spec`` says which: ``convmixer_kernels.spec``), with the arguments and
  results documented in ``convmixer_kernels.reference.forward``/``backward``;
- ``layer_eval(...)``: one ConvMixer layer with running statistics (inference). The
  default runs the backend's own two block forwards; a backend with a fused kernel
  for the whole layer overrides it.

Subclass ``Backend`` and pass an instance to ``convmixer_kernels.backends.register``;
``docs/adding-a-backend.md`` lists the steps.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import torch
from torch import Tensor

from ..spec import DW_BLOCK, PW_BLOCK, BlockSpec

OPS: tuple[str, ...] = ("dw_block", "pw_block", "patch_embed", "layer_eval")


class BlockForward(NamedTuple):
    out: Tensor      # (N, Cout, Ho, Wo), x's dtype, the layout out_format names
    mean: Tensor     # (Cout,) statistics normalised with, float32 (float64 for float64 x)
    var: Tensor      # (Cout,) biased variance (batch) or the running variance
    preact: Tensor   # conv(x) + bias when save_preact, else an empty tensor


class BlockGrads(NamedTuple):
    dx: Tensor
    dweight: Tensor
    dbias: Tensor
    dbn_weight: Tensor
    dbn_bias: Tensor


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this op on this input."""


class Backend:
    """Base class of a backend. ``priority``: its place in ``auto``'s fallback order on a
    device (lower first) when no tuning table entry decides."""

    name: str = ""
    device_types: tuple[str, ...] = ()
    priority: int = 100

    def unavailable(self, op: str, x: Tensor) -> Optional[str]:
        if x.device.type not in self.device_types:
            return f"it runs on {' or '.join(self.device_types)} tensors, got a {x.device.type} tensor"
        return None

    def block_forward(self, spec: BlockSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor],
                      bn_weight: Optional[Tensor], bn_bias: Optional[Tensor],
                      running_mean: Optional[Tensor], running_var: Optional[Tensor],
                      use_batch_stats: bool, eps: float, activation: str, save_preact: bool,
                      out_format: Optional[str] = None) -> BlockForward:
        raise NotImplementedError

    def block_backward(self, spec: BlockSpec, grad_out: Tensor, x: Tensor, weight: Tensor,
                       bias: Optional[Tensor], bn_weight: Optional[Tensor], mean: Tensor,
                       var: Tensor, preact: Tensor, use_batch_stats: bool, eps: float,
                       activation: str, output_mask: Sequence[bool]) -> BlockGrads:
        raise NotImplementedError

    def layer_eval(self, x: Tensor, dw_weight: Tensor, dw_bias: Optional[Tensor],
                   bn1_weight: Optional[Tensor], bn1_bias: Optional[Tensor], bn1_mean: Tensor,
                   bn1_var: Tensor, eps1: float, act1: str, pw_weight: Tensor,
                   pw_bias: Optional[Tensor], bn2_weight: Optional[Tensor],
                   bn2_bias: Optional[Tensor], bn2_mean: Tensor, bn2_var: Tensor, eps2: float,
                   act2: str, out_format: str) -> Tensor:
        y = self.block_forward(DW_BLOCK, x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean,
                               bn1_var, False, eps1, act1, False, None)[0]
        return self.block_forward(PW_BLOCK, y, pw_weight, pw_bias, bn2_weight, bn2_bias,
                                  bn2_mean, bn2_var, False, eps2, act2, False, out_format)[0]


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")
