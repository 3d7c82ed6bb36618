"""The ``cpu`` and ``cuda`` backends: kernels of the compiled extension
``convmixer_kernels._C`` (loaded on first use by ``convmixer_kernels._cpp_lib``).

Each block has two kernel ops, ``convmixer_kernels::{block}_forward_kernel`` and
``{block}_backward_kernel`` (schemas in ``convmixer_kernels.schema``), with a CPU
implementation in ``csrc/cpu/`` and a CUDA one in ``csrc/cuda/``; the dispatcher picks
by the tensors' device. ``layer_eval`` runs the two block kernels.
"""
from __future__ import annotations

import math

import torch

from .. import _cpp_lib, reference
from .base import Backend, BlockForward, BlockGrads, dtype_name

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)


class CompiledBackend(Backend):
    def __init__(self, name: str, device_type: str, dispatch_key: str, what: str,
                 priority: int, dtypes: tuple[torch.dtype, ...] = _FLOATS):
        self.name, self.device_types, self.dispatch_key = name, (device_type,), dispatch_key
        self.what, self.priority, self.dtypes = what, priority, dtypes

    def unavailable(self, op, x):
        reason = super().unavailable(op, x)
        if reason is not None:
            return reason
        ext = _cpp_lib.status()
        if ext is not None:
            return ext
        for block in (("dw_block", "pw_block") if op == "layer_eval" else (op,)):
            if not torch._C._dispatch_has_kernel_for_dispatch_key(
                    f"convmixer_kernels::{block}_forward_kernel", self.dispatch_key):
                return f"this build of convmixer_kernels._C has no {self.what} for {block}"
        if x.dtype not in self.dtypes:
            return (f"its kernels take {', '.join(dtype_name(d) for d in self.dtypes)}, "
                    f"got {dtype_name(x.dtype)}")
        return None

    def _nonfinite_dw_weight(self, spec, weight) -> bool:
        """The CPU depthwise kernels convolve a zero-padded tile, so a NaN/Inf tap would
        spread over the border (0 * NaN) where the stock conv never reads it; such a
        call runs the reference instead (a check of C*k*k values, on the CPU only: one sum,
        whose overflow on huge finite taps only sends the call to the reference too)."""
        return spec.depthwise and weight.device.type == "cpu" and not math.isfinite(weight.sum())

    def block_forward(self, spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      use_batch_stats, eps, activation, save_preact, out_format=None):
        if self._nonfinite_dw_weight(spec, weight):
            return BlockForward(*reference.forward(
                spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                use_batch_stats, eps, activation, save_preact, out_format))
        fmt = () if out_format is None else (out_format,)
        kernel = getattr(torch.ops.convmixer_kernels, f"{spec.name}_forward_kernel")
        return BlockForward(*kernel(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                                    use_batch_stats, eps, activation, save_preact, *fmt))

    def block_backward(self, spec, *args):
        if self._nonfinite_dw_weight(spec, args[2]):
            return BlockGrads(*reference.backward(spec, *args))
        kernel = getattr(torch.ops.convmixer_kernels, f"{spec.name}_backward_kernel")
        return BlockGrads(*kernel(*args))


CPU = CompiledBackend("cpu", "cpu", "CPU", "C++ CPU kernel", priority=10)
CUDA = CompiledBackend("cuda", "cuda", "CUDA", "CUDA kernel", priority=10)
