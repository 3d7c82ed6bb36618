"""Registered op of one ConvMixer layer in eval mode (inference only)::

    convmixer_kernels::layer_eval(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean,
        bn1_var, eps1, act1, pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean, bn2_var,
        eps2, act2, out_format, backend) -> Tensor

(schema in ``convmixer_kernels.schema``), equivalent to the two blocks with running
statistics: ``pw_block(dw_block(x, ...), ...)``. The implementation hands the call to
the backend's ``layer_eval`` (``convmixer_kernels.backends.base``): the ``triton``
backend runs one GEMM whose prologue computes the depthwise block (never stored), the
others their two block kernels. A fake (shape-only) implementation and no autograd: the
functional ``convmixer_kernels.functional.layer_eval`` refuses training and inputs that
require grad.
"""
from __future__ import annotations

import torch

from .. import backends
from ..spec import out_memory_format
from .. import schema

__all__ = ["layer_eval_op"]


def _impl(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var, eps1, act1,
          pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean, bn2_var, eps2, act2, out_format,
          backend):
    out_memory_format(out_format)  # ValueError naming out_format
    return backends.get(backend).layer_eval(
        x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var, eps1, act1, pw_weight,
        pw_bias, bn2_weight, bn2_bias, bn2_mean, bn2_var, eps2, act2, out_format)


layer_eval_op = torch.library.custom_op(f"{schema.NAMESPACE}::layer_eval", _impl,
                                        mutates_args=(), schema=schema.LAYER_EVAL)


@layer_eval_op.register_fake
def _(x, dw_weight, dw_bias, bn1_weight, bn1_bias, bn1_mean, bn1_var, eps1, act1,
      pw_weight, pw_bias, bn2_weight, bn2_bias, bn2_mean, bn2_var, eps2, act2, out_format,
      backend):
    n, _, h, w = x.shape
    return torch.empty((n, pw_weight.shape[0], h, w), dtype=x.dtype, device=x.device,
                       memory_format=out_memory_format(out_format))
