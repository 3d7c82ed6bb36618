"""Pieces shared by the Triton kernels: activations, launch recording, tile helpers.

Everything here is imported only when the ``triton`` backend runs (``import
convmixer_kernels`` never imports Triton).
"""
from __future__ import annotations

import os
from typing import Any, Callable, Optional

import torch
import triton
import triton.language as tl

ACT_CODES = {"gelu": 0, "gelu_tanh": 1, "relu": 2}

# Set by convmixer_kernels.tools.triton_variants to collect (kernel, grid, args, meta) instead
# of launching: the ahead-of-time compile check enumerates the variants this way.
_recorder: Optional[Callable[[Any, tuple, tuple, dict], None]] = None


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def launch(kernel, grid: tuple, *args, **meta) -> None:
    if _recorder is not None:
        _recorder(kernel, grid, args, meta)
        return
    kernel[grid](*args, **meta)


def needs_int64(*tensors: torch.Tensor) -> bool:
    """True when some element offset of these tensors does not fit in int32."""
    for t in tensors:
        if t is None or t.numel() == 0:
            continue
        if sum((s - 1) * abs(st) for s, st in zip(t.shape, t.stride())) >= 2 ** 31 - 1:
            return True
    return False


@triton.jit
def act_fwd(z, ACT: tl.constexpr):
    """act(z) in float32: 0 exact (erf) GELU, 1 tanh GELU, 2 ReLU (NaN propagates)."""
    if ACT == 0:
        r = 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476))
    elif ACT == 1:
        # 0.5 z (1 + tanh(u)) == z * sigmoid(2u): no cancellation near u = 0.
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        r = z / (1.0 + tl.exp(-2.0 * u))
    else:
        r = tl.where(z < 0.0, 0.0, z)
    return r


@triton.jit
def act_bwd(z, g, ACT: tl.constexpr):
    """g * act'(z) in float32 (ReLU: the gradient passes where z > 0 or z is NaN, as
    aten.threshold_backward)."""
    if ACT == 0:
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        pdf = tl.exp(-0.5 * z * z) * 0.3989422804014327
        r = g * (cdf + z * pdf)
    elif ACT == 1:
        u = 0.7978845608028654 * (z + 0.044715 * z * z * z)
        s = 1.0 / (1.0 + tl.exp(-2.0 * u))
        du = 0.7978845608028654 * (1.0 + 0.134145 * z * z)
        r = g * (s + 2.0 * z * s * (1.0 - s) * du)
    else:
        r = tl.where(z <= 0.0, 0.0, g)
    return r


@triton.jit
def invstd(var, eps):
    """1 / sqrt(var + eps), correctly rounded steps (the reference's rsqrt)."""
    return tl.div_rn(1.0, tl.sqrt_rn(var + eps))


def pow2(v: int) -> int:
    """The smallest power of two >= v (1 for v <= 1)."""
    return 1 << max(0, (int(v) - 1).bit_length())


def combine_tile_stats(pmean: torch.Tensor, pm2: torch.Tensor, count: int,
                       block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch mean and biased variance from per-tile (mean, M2) of ``count`` values cut
    into tiles of ``block`` (the last one partial): Chan's parallel combination in
    float64, reduced in a fixed order."""
    tiles = pmean.shape[0]
    cnt = torch.full((tiles, 1), float(block), dtype=torch.float64, device=pmean.device)
    cnt[-1] = count - (tiles - 1) * block
    pm = pmean.double()
    mean = (pm * cnt).sum(0) / count
    var = (pm2.double().sum(0) + (cnt * (pm - mean) ** 2).sum(0)) / count
    return mean.float(), var.float()
