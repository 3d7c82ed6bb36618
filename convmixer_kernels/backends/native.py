"""The ``native`` backend: the stock modules' own composite, ``conv2d -> act ->
batch_norm (+ x)`` in the storage dtype, on whatever PyTorch runs them with (cuDNN,
oneDNN, MKL). It exists so that ``auto`` can pick the stock path where it is the
fastest: the functional API and the modules run it directly (``F.conv2d``, the
activation, ``F.batch_norm`` / the stock child modules), so it costs what the stock
modules cost. ``block_forward`` implements the same maths in the backend contract (for
the registered ops and the conformance tests); ``block_backward`` is the reference's.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _activations, reference
from ..spec import out_memory_format, output_memory_format, stats_dtype
from .base import Backend, BlockForward, BlockGrads


def composite(spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var, training,
              momentum, eps, activation):
    """What the stock modules compute, running statistics updated in place by
    ``F.batch_norm`` (``momentum`` a float)."""
    z = F.conv2d(x, weight, bias, stride=spec.stride(weight), padding=spec.padding(weight),
                 groups=spec.groups(x))
    y = F.batch_norm(_activations.forward(z, activation), running_mean, running_var,
                     bn_weight, bn_bias, training, momentum, eps)
    return x + y if spec.residual else y


class NativeBackend(Backend):
    name = "native"
    device_types = ("cpu", "cuda")
    priority = 5  # with no measurement to go by, auto runs the stock path
    runs_composite = True  # functional.py calls ``composite`` directly, no custom op

    def block_forward(self, spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                      use_batch_stats, eps, activation, save_preact, out_format=None):
        fmt = output_memory_format(x) if out_format is None else out_memory_format(out_format)
        z = F.conv2d(x, weight, bias, stride=spec.stride(weight), padding=spec.padding(weight),
                     groups=spec.groups(x))
        a = _activations.forward(z, activation)
        sdt = stats_dtype(x)
        if use_batch_stats:
            var, mean = torch.var_mean(a.to(sdt), dim=(0, 2, 3), correction=0)
        else:
            mean, var = running_mean.to(sdt).clone(), running_var.to(sdt).clone()
        w, b = (None if t is None else t.to(sdt) for t in (bn_weight, bn_bias))
        y = F.batch_norm(a, mean, var, w, b, False, 0.0, eps)
        out = (x + y if spec.residual else y).to(x.dtype).contiguous(memory_format=fmt)
        preact = z.contiguous(memory_format=fmt) if save_preact else x.new_empty(0)
        return BlockForward(out, mean, var, preact)

    def block_backward(self, spec, grad_out, x, weight, bias, bn_weight, mean, var, preact,
                       use_batch_stats, eps, activation, output_mask):
        """The reference's analytic backward (float32 accumulation), recomputing the
        pre-activation from x (so a saved and a recomputed one give the same bits). Only
        the registered op uses it: the functional API and the modules take the stock
        composite's own autograd."""
        return BlockGrads(*reference.backward(spec, grad_out, x, weight, bias, bn_weight, mean,
                                              var, x.new_empty(0), use_batch_stats, eps,
                                              activation, output_mask))


NATIVE = NativeBackend()
