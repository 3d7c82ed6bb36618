"""Registers one block as a pair of ``torch.library`` ops with fake and autograd.

For a block ``name`` (``dw_block``, ``pw_block``, ``patch_embed``)::

    convmixer_kernels::{name}_forward(Tensor x, Tensor weight, Tensor? bias,
        Tensor? bn_weight, Tensor? bn_bias, Tensor? running_mean, Tensor? running_var,
        bool use_batch_stats, float eps, str activation, bool save_preact,
        [str out_format,] str backend)
        -> (Tensor out, Tensor mean, Tensor var, Tensor preact)
    convmixer_kernels::{name}_backward(Tensor grad_out, Tensor x, Tensor weight,
        Tensor? bias, Tensor? bn_weight, Tensor mean, Tensor var, Tensor preact,
        bool use_batch_stats, float eps, str activation, bool[] output_mask, str backend)
        -> (Tensor dx, Tensor dweight, Tensor dbias, Tensor dbn_weight, Tensor dbn_bias)

Both are functional (they mutate nothing: running statistics are updated by the
caller from ``mean``/``var``), so autograd and torch.compile see through them. The
``backend`` argument is a concrete backend name (``auto`` is resolved before the
call); the implementation hands the call to that backend. Shapes, dtypes and
layouts of every result are documented in ``convmixer_kernels.reference``.

Output layout. ``out_format`` exists only in the GEMM blocks' forward (``pw_block``,
``patch_embed``; ``has_out_format``): ``'channels_last'`` or ``'contiguous'`` (NCHW),
the concrete layout of ``out`` and ``preact``, resolved by the functional API from its
``memory_format`` option (``_spec.resolve_out_format``: channels_last by default,
``torch.preserve_format``/None follows x). Every backend's kernel writes that layout
itself (no copy after the kernel); the compiled kernels
``{name}_forward_kernel`` take the same argument (csrc/extension.cpp). ``dw_block``'s
schema has no such argument: its output is residual and follows x's layout
(``_spec.output_memory_format``), as does its saved ``preact``, except on the ``cpu``
backend in float32, where ``preact`` is NCHW (``preact_format``). The backward ops take ``grad_out`` and ``preact`` in
any layout (they work in preact's layout, else grad_out's); the autograd formula hands
them grad_out in the output's layout; ``dx`` follows x's layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import backends
from .._spec import BlockSpec, out_memory_format, output_memory_format, stats_dtype

NAMESPACE = "convmixer_kernels"
_FORWARD_ARGS = (
    "Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
    "Tensor? running_mean, Tensor? running_var, bool use_batch_stats, float eps, "
    "str activation, bool save_preact, "
)
_FORWARD_RESULTS = " -> (Tensor, Tensor, Tensor, Tensor)"
FORWARD_SCHEMA = "(" + _FORWARD_ARGS + "str backend)" + _FORWARD_RESULTS  # dw_block
GEMM_FORWARD_SCHEMA = "(" + _FORWARD_ARGS + "str out_format, str backend)" + _FORWARD_RESULTS
BACKWARD_SCHEMA = (
    "(Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, "
    "Tensor mean, Tensor var, Tensor preact, bool use_batch_stats, float eps, "
    "str activation, bool[] output_mask, str backend) -> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)


def has_out_format(spec: BlockSpec) -> bool:
    """Whether the block's forward op takes ``out_format`` (the GEMM blocks; not dw_block)."""
    return not spec.residual


@dataclass(frozen=True)
class BlockOp:
    spec: BlockSpec
    forward: Any   # the registered forward op (a torch.library CustomOpDef)
    backward: Any  # the registered backward op

    def fmt_args(self, out_format: str) -> tuple:
        """The ``out_format`` argument of the forward op, as a tuple to splice in before
        ``backend``: ``(out_format,)`` for the GEMM blocks, ``()`` for dw_block."""
        return (out_format,) if has_out_format(self.spec) else ()


def _empty(x: Tensor, shape, fmt=torch.contiguous_format, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def preact_format(name: str, backend: str, x: Tensor, fmt: "torch.memory_format") -> "torch.memory_format":
    """Layout of the saved pre-activation: the output's, except for the cpu depthwise block in
    float32, which keeps it NCHW whatever x's layout (csrc/cpu/dw_block.cpp: cheaper to
    write and read back than channels_last; only its backward reads it)."""
    if name == "dw_block" and backend == "cpu" and x.dtype == torch.float32:
        return torch.contiguous_format
    return fmt


def define(spec: BlockSpec) -> BlockOp:
    name = spec.name

    gemm = has_out_format(spec)

    def forward_impl(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
                     use_batch_stats, eps, activation, save_preact, *fmt_backend):
        *fmt, backend = fmt_backend
        if fmt:
            out_memory_format(fmt[0])  # ValueError naming out_format
        return backends.run_forward(backend, name, x, weight, bias, bn_weight, bn_bias,
                                    running_mean, running_var, use_batch_stats, eps,
                                    activation, save_preact, *fmt)

    def backward_impl(grad_out, x, weight, bias, bn_weight, mean, var, preact,
                      use_batch_stats, eps, activation, output_mask, backend):
        return backends.run_backward(backend, name, grad_out, x, weight, bias, bn_weight,
                                     mean, var, preact, use_batch_stats, eps, activation,
                                     output_mask)

    fwd = torch.library.custom_op(f"{NAMESPACE}::{name}_forward", forward_impl,
                                  mutates_args=(),
                                  schema=GEMM_FORWARD_SCHEMA if gemm else FORWARD_SCHEMA)
    bwd = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", backward_impl,
                                  mutates_args=(), schema=BACKWARD_SCHEMA)

    @fwd.register_fake
    def _(x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
          use_batch_stats, eps, activation, save_preact, *fmt_backend):
        fmt = out_memory_format(fmt_backend[0]) if gemm else output_memory_format(x)
        shape = spec.out_shape(x, weight)
        c, sdt = weight.shape[0], stats_dtype(x)
        preact = _empty(x, shape, preact_format(name, fmt_backend[-1], x, fmt)) if save_preact else _empty(x, (0,))
        return _empty(x, shape, fmt), _empty(x, (c,), dtype=sdt), _empty(x, (c,), dtype=sdt), preact

    @bwd.register_fake
    def _(grad_out, x, weight, bias, bn_weight, mean, var, preact, use_batch_stats, eps,
          activation, output_mask, backend):
        def pick(i, shape, fmt=torch.contiguous_format, dtype=None):
            return _empty(x, shape if output_mask[i] else (0,), fmt, dtype)
        c, sdt = weight.shape[0], mean.dtype
        return (pick(0, x.shape, output_memory_format(x)), pick(1, weight.shape),
                pick(2, (c,)), pick(3, (c,), dtype=sdt), pick(4, (c,), dtype=sdt))

    def setup_context(ctx, inputs, output):
        (x, weight, bias, bn_weight, bn_bias, _rm, _rv, use_batch_stats, eps, activation,
         _save, *_fmt, backend) = inputs
        _out, mean, var, preact = output
        ctx.save_for_backward(x, weight, bias, bn_weight, mean, var, preact)
        # The gradients of mean, var and preact are never used: without this autograd would
        # fill a zero tensor for each, preact's as large as the output, at every backward.
        ctx.set_materialize_grads(False)
        ctx.config = (use_batch_stats, eps, activation, backend)
        ctx.n_fmt = len(_fmt)  # out_format (GEMM blocks): no gradient
        ctx.out_fmt = out_memory_format(_fmt[0]) if _fmt else output_memory_format(x)
        ctx.bn_bias_dtype = None if bn_bias is None else bn_bias.dtype

    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_preact):
        x, weight, bias, bn_weight, mean, var, preact = ctx.saved_tensors
        use_batch_stats, eps, activation, backend = ctx.config
        if grad_out is None:  # the output is not used: every gradient is zero
            return (None,) * (11 + ctx.n_fmt + 1)
        # The backward kernels work in preact's layout, else grad_out's: grad_out in the
        # output's layout (a copy only when autograd hands other strides) makes a saved
        # and a recomputed pre-activation (memory_saving) give the same bits.
        grad_out = grad_out.contiguous(memory_format=ctx.out_fmt)
        need = ctx.needs_input_grad
        mask = [need[0], need[1], need[2] and bias is not None,
                need[3] and bn_weight is not None, need[4] and ctx.bn_bias_dtype is not None]
        dx, dw, db, dbnw, dbnb = bwd(grad_out, x, weight, bias, bn_weight, mean, var, preact,
                                     use_batch_stats, eps, activation, mask, backend)
        return (dx if mask[0] else None, dw if mask[1] else None,
                db.to(bias.dtype) if mask[2] else None,
                dbnw.to(bn_weight.dtype) if mask[3] else None,
                dbnb.to(ctx.bn_bias_dtype) if mask[4] else None,
                None, None, None, None, None, None, *([None] * ctx.n_fmt), None)

    fwd.register_autograd(backward, setup_context=setup_context)
    return BlockOp(spec, fwd, bwd)
