"""Registers one block as a pair of ``torch.library`` ops with fake and autograd.

For a block ``name`` (``dw_block``, ``pw_block``, ``patch_embed``) the ops are
``convmixer_kernels::{name}_forward`` -> (out, mean, var, preact) and
``{name}_backward`` -> (dx, dweight, dbias, dbn_weight, dbn_bias), with the schemas of
``convmixer_kernels.schema``. Both are functional (they mutate nothing: running
statistics are updated by the caller from ``mean``/``var``), so autograd and
torch.compile see through them. ``backend`` is a concrete backend name (``auto`` is
resolved before the call); the implementation hands the call to that backend's
``block_forward``/``block_backward`` (``convmixer_kernels.backends.base``). Shapes,
dtypes and layouts of every result are documented in ``convmixer_kernels.reference``.

Layouts: the GEMM blocks write ``out`` and ``preact`` in ``out_format``; ``dw_block``'s
follow x's layout, except the ``cpu`` backend's float32 ``preact``, which is NCHW
(``preact_format``). The backward ops take ``grad_out`` and ``preact`` in any layout;
``dx`` follows x's layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from .. import backends
from ..spec import BlockSpec, out_memory_format, output_memory_format, stats_dtype
from .. import schema
from ..schema import NAMESPACE, has_out_format


@dataclass(frozen=True)
class BlockOp:
    spec: BlockSpec
    forward: Any   # the registered forward op (a torch.library CustomOpDef)
    backward: Any  # the registered backward op
    eager: Any     # ``eager.apply(*args)`` (``eager.fast_apply`` after ``eager_ok``): the same
                   # forward and autograd without the registered ops' dispatch layers

    def fmt_args(self, out_format: str) -> tuple:
        """The ``out_format`` argument of the forward op, as a tuple to splice in before
        ``backend``: ``(out_format,)`` for the GEMM blocks, ``()`` for dw_block."""
        return (out_format,) if has_out_format(self.spec) else ()


def _empty(x: Tensor, shape, fmt=torch.contiguous_format, dtype=None) -> Tensor:
    return torch.empty(shape, dtype=dtype or x.dtype, device=x.device, memory_format=fmt)


def preact_format(name: str, backend: str, x: Tensor, fmt: "torch.memory_format") -> "torch.memory_format":
    """Layout of the saved pre-activation: the output's, except for the cpu depthwise block in
    float32, which keeps it NCHW whatever x's layout (csrc/cpu/dw_block_forward.cpp: cheaper to
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
        return tuple(backends.get(backend).block_forward(
            spec, x, weight, bias, bn_weight, bn_bias, running_mean, running_var,
            use_batch_stats, eps, activation, save_preact, fmt[0] if fmt else None))

    def backward_impl(grad_out, x, weight, bias, bn_weight, mean, var, preact,
                      use_batch_stats, eps, activation, output_mask, backend):
        return tuple(backends.get(backend).block_backward(
            spec, grad_out, x, weight, bias, bn_weight, mean, var, preact, use_batch_stats,
            eps, activation, output_mask))

    fwd = torch.library.custom_op(f"{NAMESPACE}::{name}_forward", forward_impl,
                                  mutates_args=(),
                                  schema=schema.forward(spec))
    bwd = torch.library.custom_op(f"{NAMESPACE}::{name}_backward", backward_impl,
                                  mutates_args=(), schema=schema.backward(spec))

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

    def backward(ctx, grad_out, _grad_mean, _grad_var, _grad_preact, bwd=bwd):
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

    class Eager(torch.autograd.Function):
        """The registered op's forward implementation and autograd formula, called without
        the custom op's dispatch (eager calls only: ``eager_ok``)."""

        @staticmethod
        def forward(ctx, *inputs):
            out = forward_impl(*inputs)
            setup_context(ctx, inputs, out)
            return out

        @staticmethod
        @torch.autograd.function.once_differentiable
        def backward(ctx, *grads):
            return backward(ctx, *grads, bwd=backward_impl)

    Eager.__name__ = Eager.__qualname__ = f"{name}_eager"
    # Eager.apply less its Python layer (default-argument binding, functorch's dead-wrapper
    # unwrapping: about 8 us per call), for callers that checked eager_ok (no torch.func
    # transform active, plain tensors).
    Eager.fast_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, Eager)
    return BlockOp(spec, fwd, bwd, Eager)


_PLAIN = (Tensor, torch.nn.Parameter)


def autograd_transform_active() -> bool:
    """Whether a ``torch.func`` transform (grad, vjp, jvp, vmap) or forward-mode AD
    (``torch.autograd.forward_ad.dual_level``) is active: the custom ops' autograd (and
    ``BlockOp.eager``) support neither, the stock composite does. Outside torch.compile."""
    return ((torch._C._functorch.peek_interpreter_stack() is not None
             or torch.autograd.forward_ad._current_level >= 0)
            and not torch.compiler.is_compiling())


def eager_ok(*tensors) -> bool:
    """Whether a block call may take ``BlockOp.eager`` instead of the registered op: plain
    tensors (no subclass: fake, functional or user tensors go through the op), no
    torch.compile/export or jit tracing, no dispatch or ``__torch_function__`` mode (profilers
    of ops, FlopCounterMode, make_fx see the registered op), no torch.func transform or
    forward-mode AD (``autograd_transform_active``)."""
    if (torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack()
            or torch._C._is_torch_function_mode_enabled() or torch.jit.is_tracing()
            or autograd_transform_active()):
        return False
    return all(t is None or type(t) in _PLAIN for t in tensors)
