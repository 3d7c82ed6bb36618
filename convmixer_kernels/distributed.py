"""Synchronized BatchNorm for the fused blocks (``nn.SyncBatchNorm``'s semantics).

In training, a synchronized block normalises with the statistics of the *global*
batch (every rank of the process group), and its backward all-reduces the two
per-channel sums that BatchNorm's input gradient needs, exactly as
``nn.SyncBatchNorm`` does. Parameter gradients stay rank-local sums (DDP averages
them); the running statistics are updated with the global mean and the global
unbiased variance, so they agree on every rank.

How it runs, with the registered ops unchanged:

forward
    1. the training forward on the local batch gives the local per-channel (mean,
       biased var) and the pre-activation z = conv(x) + b (saved for backward);
    2. every rank's (count, mean, var) is all-gathered and combined in float64 in
       rank order (Chan's parallel formula), so every rank gets the same bits;
    3. the eval forward with the global (mean, var) in place of the running
       statistics gives the output (the same kernel, the same rounding as an
       unsynchronized block).
backward
    1. the eval backward with the global statistics and only the BN outputs asked
       for gives the local sum(dy) and sum(dy * xhat) (xhat with the global
       statistics): these are the BN parameter gradients;
    2. the two sums are all-gathered and added in rank order;
    3. dy' = dy - sum(dy) / M - xhat * sum(dy * xhat) / M (M the global count) turns
       BatchNorm's training backward into its eval backward, so the eval backward
       of dy' gives dz, the conv weight and bias gradients and dx (for the residual
       block dx gets dy back in place of dy').

A rank whose local batch is empty still takes part in every collective (count 0),
so the other ranks do not hang, as with ``nn.SyncBatchNorm``. Collectives are
gathers added in rank order, never an unordered all-reduce: results are bitwise
reproducible run to run. The extra cost over an unsynchronized block is one more
forward pass and an elementwise pass in backward; the point is exact semantics.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from . import _activations
from .spec import BlockSpec, out_memory_format, output_memory_format, stats_dtype
from .ops import BLOCK_OPS

__all__ = ["needs_sync", "sync_block"]


def needs_sync(process_group: Any, training: bool) -> bool:
    """True when a block asked to synchronise must: training with batch statistics and a
    process group of more than one rank (otherwise it is a plain BatchNorm, as
    ``nn.SyncBatchNorm`` falls back to one)."""
    if not training or not (dist.is_available() and dist.is_initialized()):
        return False
    group = None if process_group is None else process_group
    return dist.get_world_size(group) > 1


def _gather(t: Tensor, group: Any) -> list[Tensor]:
    """All-gather a float64 vector; the list is in rank order."""
    world = dist.get_world_size(group)
    parts = [torch.empty_like(t) for _ in range(world)]
    dist.all_gather(parts, t.contiguous(), group=group)
    return parts


def _global_stats(count: int, mean: Tensor, var: Tensor, group: Any) -> tuple[Tensor, Tensor, int]:
    """Combine every rank's (count, mean, biased var) in rank order, in float64."""
    c = mean.numel()
    mine = torch.cat([mean.new_full((1,), float(count), dtype=torch.float64),
                      mean.double(), var.double()])
    total = 0.0
    gmean = torch.zeros(c, dtype=torch.float64, device=mean.device)
    m2 = torch.zeros(c, dtype=torch.float64, device=mean.device)
    for part in _gather(mine, group):  # Chan et al.: merge (n, mean, M2) one rank at a time
        n_b, mean_b, var_b = float(part[0]), part[1:1 + c], part[1 + c:]
        if n_b == 0:
            continue
        n_ab = total + n_b
        delta = mean_b - gmean
        gmean = gmean + delta * (n_b / n_ab)
        m2 = m2 + var_b * n_b + delta * delta * (total * n_b / n_ab)
        total = n_ab
    if total <= 1:
        raise ValueError(f"x: training-mode BatchNorm needs more than one value per channel "
                         f"over the process group, got {int(total)}")
    return gmean, m2 / total, int(total)


def _sum_in_order(t: Tensor, group: Any) -> Tensor:
    parts = _gather(t.double(), group)
    out = parts[0].clone()
    for p in parts[1:]:
        out += p
    return out


class _SyncBlock(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], bn_weight: Optional[Tensor],
                bn_bias: Optional[Tensor], spec: BlockSpec, eps: float, activation: str, backend: str,
                group: Any, out_format: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        op = BLOCK_OPS[spec.name]
        fmt = op.fmt_args(out_format)
        cout = weight.shape[0]
        empty = x.shape[0] == 0
        sdt = stats_dtype(x)
        if empty:
            count, mean, var = 0, x.new_zeros(cout, dtype=sdt), x.new_zeros(cout, dtype=sdt)
            preact = x.new_empty(0)
        else:
            _, mean, var, preact = op.forward(x, weight, bias, None, None, None, None, True, eps,
                                              activation, True, *fmt, backend)
            count = preact.numel() // cout
        gmean64, gvar64, total = _global_stats(count, mean, var, group)
        gmean, gvar = gmean64.to(sdt), gvar64.to(sdt)
        if empty:
            out = torch.empty(spec.out_shape(x, weight), dtype=x.dtype, device=x.device,
                              memory_format=out_memory_format(out_format) if fmt
                              else output_memory_format(x))
        else:
            out = op.forward(x, weight, bias, bn_weight, bn_bias, gmean, gvar, False, eps,
                             activation, False, *fmt, backend)[0]
        ctx.save_for_backward(x, weight, bias, bn_weight, gmean, gvar, preact)
        ctx.config = (spec, eps, activation, backend, group, total)
        ctx.bn_bias_dtype = None if bn_bias is None else bn_bias.dtype
        ctx.mark_non_differentiable(gmean, gvar)
        return out, gmean, gvar, torch.tensor(total)

    @staticmethod
    def backward(ctx, dy: Tensor, _dm: Any, _dv: Any, _dn: Any) -> tuple[Optional[Tensor], ...]:
        x, weight, bias, bn_weight, gmean, gvar, preact = ctx.saved_tensors
        spec, eps, activation, backend, group, total = ctx.config
        op = BLOCK_OPS[spec.name]
        need = ctx.needs_input_grad
        cout = weight.shape[0]
        empty = x.shape[0] == 0
        sdt = gmean.dtype
        if empty:
            s_dyx = s_dy = x.new_zeros(cout, dtype=sdt)
        else:
            _, _, _, s_dyx, s_dy = op.backward(dy, x, weight, bias, bn_weight, gmean, gvar, preact,
                                               False, eps, activation,
                                               [False, False, False, True, True], backend)
        sums = _sum_in_order(torch.cat([s_dy, s_dyx]), group).to(sdt)
        dx = dw = db = None
        mask = [need[0], need[1], need[2] and bias is not None]
        if not empty and any(mask):
            view = (1, cout, 1, 1)
            invstd = torch.rsqrt(gvar + eps)  # elementwise math in the stats dtype (float32/64)
            a = _activations.forward(preact.to(sdt), activation)
            xhat = (a - gmean.view(view)) * invstd.view(view)
            mean_dy = (sums[:cout] / total).view(view)
            mean_dyx = (sums[cout:] / total).view(view)
            dy_eval = (dy.to(sdt) - mean_dy - xhat * mean_dyx).to(dy.dtype)
            dx, dw, db = op.backward(dy_eval, x, weight, bias, bn_weight, gmean, gvar, preact, False,
                                     eps, activation, mask + [False, False], backend)[:3]
            if mask[0] and spec.residual:  # the eval backward added dy' for the residual: want dy
                dx = (dx.to(sdt) - dy_eval.to(sdt) + dy.to(sdt)).to(dx.dtype)
        elif empty:
            dx = torch.zeros_like(x) if mask[0] else None
            dw = torch.zeros_like(weight) if mask[1] else None
            db = torch.zeros_like(bias) if mask[2] else None
        return (dx if mask[0] else None, dw if mask[1] else None,
                db.to(bias.dtype) if mask[2] else None,
                s_dyx.to(bn_weight.dtype) if need[3] and bn_weight is not None else None,
                s_dy.to(ctx.bn_bias_dtype) if need[4] and ctx.bn_bias_dtype is not None else None,
                None, None, None, None, None, None)


def sync_block(spec: BlockSpec, x: Tensor, weight: Tensor, bias: Optional[Tensor],
               bn_weight: Optional[Tensor], bn_bias: Optional[Tensor], eps: float, activation: str,
               backend: str, process_group: Any,
               out_format: str = "contiguous") -> tuple[Tensor, Tensor, Tensor, int]:
    """The training-mode block with global batch statistics -> (out, global mean, global
    biased var, global count per channel). ``out_format``: out's layout for the GEMM
    blocks (see ``convmixer_kernels.ops._block``); dw_block's follows x."""
    out, mean, var, total = _SyncBlock.apply(x, weight, bias, bn_weight, bn_bias, spec, float(eps),
                                             activation, backend, process_group, out_format)
    return out, mean, var, int(total)
