"""The activations a ConvMixer block can use: names, modules, forward and backward.

One table for the whole package. ``gelu`` is the exact (erf) GELU of the paper,
``gelu_tanh`` the tanh approximation, ``relu`` what timm's ``convmixer_768_32`` uses.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "relu")


def check_activation(activation: object) -> str:
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return activation


def make_module(activation: str) -> nn.Module:
    """The stock ``nn.Module`` for an activation name (what timm and the paper use)."""
    check_activation(activation)
    if activation == "relu":
        return nn.ReLU()
    return nn.GELU(approximate="tanh" if activation == "gelu_tanh" else "none")


def name_of(module: nn.Module) -> str | None:
    """The activation name of a stock module, or None if it is not one we fuse."""
    if type(module) is nn.ReLU:
        return "relu"
    if type(module) is nn.GELU:
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(module.approximate)
    return None


def forward(z: Tensor, activation: str) -> Tensor:
    if activation == "relu":
        return F.relu(z)
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def backward(grad: Tensor, z: Tensor, activation: str) -> Tensor:
    """d act(z) / dz applied to ``grad``."""
    if activation == "relu":
        return torch.ops.aten.threshold_backward(grad, z, 0)
    approximate = "tanh" if activation == "gelu_tanh" else "none"
    return torch.ops.aten.gelu_backward(grad, z, approximate=approximate)
