"""The ``triton`` backend: Triton kernels, one module per block (``dw_block``,
``pw_block``/``patch_embed`` over the shared ``_gemm``) and a fused eval layer
(``layer``). CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (Triton's
interpreter, which the CPU test suite runs them under). The kernel modules import
Triton; this file does not, so ``import convmixer_kernels`` never loads it."""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ..base import Backend, BlockForward, BlockGrads, dtype_name

_MODULES = {"dw_block": "dw_block", "pw_block": "pw_block", "patch_embed": "patch_embed",
            "layer_eval": "layer"}


class TritonBackend(Backend):
    name = "triton"
    device_types = ("cuda",)
    priority = 20
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def unavailable(self, op, x):
        if x.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return ("it runs on cuda tensors (cpu tensors only under TRITON_INTERPRET=1, "
                        "Triton's interpreter)")
        elif x.device.type != "cuda":
            return f"it runs on cuda tensors, got a {x.device.type} tensor"
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if op not in _MODULES:
            return f"this version of convmixer_kernels has no Triton kernel for {op} yet"
        if x.dtype not in self.dtypes:
            return (f"its kernels take {', '.join(dtype_name(d) for d in self.dtypes)}, "
                    f"got {dtype_name(x.dtype)}")
        return None

    @staticmethod
    def _module(op: str):
        return importlib.import_module(f"{__name__}.{_MODULES[op]}")

    def block_forward(self, spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      use_batch_stats, eps, activation, save_preact, out_format=None):
        fmt = () if out_format is None else (out_format,)
        return BlockForward(*self._module(spec.name).forward(
            x, weight, bias, bn_weight, bn_bias, running_mean, running_var, use_batch_stats,
            eps, activation, save_preact, *fmt))

    def block_backward(self, spec, *args):
        return BlockGrads(*self._module(spec.name).backward(*args))

    def layer_eval(self, *args):
        return self._module("layer_eval").forward(*args)


TRITON = TritonBackend()
