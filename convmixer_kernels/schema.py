"""The one schema table: every registered op's signature, for Python and C++ alike.

The Python ops (``convmixer_kernels::{block}_forward``, ``{block}_backward``,
``layer_eval``) take a trailing ``str backend``; the compiled kernels behind the
``cpu`` and ``cuda`` backends (``{block}_forward_kernel``, ``{block}_backward_kernel``)
take the same arguments without it. ``convmixer_kernels._cpp_lib`` defines the kernel
schemas from this table before it loads the extension, whose C++ only registers
implementations (``TORCH_LIBRARY_IMPL``); ``tests/test_package.py`` checks that the
loaded ops carry exactly these schemas.

Arguments (see ``convmixer_kernels.reference`` for their meaning):

- ``use_batch_stats``: normalise with the batch statistics (training) or the given
  running ones;
- ``save_preact``: return conv(x) + bias for backward (else an empty tensor);
- ``out_format`` (GEMM blocks only: ``pw_block``, ``patch_embed``): ``'channels_last'``
  or ``'contiguous'``, the layout of ``out`` and ``preact``; ``dw_block``'s output is
  residual and follows x's layout;
- ``output_mask``: which of (dx, dweight, dbias, dbn_weight, dbn_bias) to compute.
"""
from __future__ import annotations

from .spec import SPECS, BlockSpec

NAMESPACE = "convmixer_kernels"

_FORWARD_ARGS = ("Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, Tensor? bn_bias, "
                 "Tensor? running_mean, Tensor? running_var, bool use_batch_stats, float eps, "
                 "str activation, bool save_preact")
_FORWARD_RESULTS = "(Tensor, Tensor, Tensor, Tensor)"  # out, mean, var, preact
_BACKWARD_ARGS = ("Tensor grad_out, Tensor x, Tensor weight, Tensor? bias, Tensor? bn_weight, "
                  "Tensor mean, Tensor var, Tensor preact, bool use_batch_stats, float eps, "
                  "str activation, bool[] output_mask")
_BACKWARD_RESULTS = "(Tensor, Tensor, Tensor, Tensor, Tensor)"  # dx, dw, db, dbn_weight, dbn_bias
_LAYER_EVAL_ARGS = (
    "Tensor x, Tensor dw_weight, Tensor? dw_bias, Tensor? bn1_weight, Tensor? bn1_bias, "
    "Tensor bn1_mean, Tensor bn1_var, float eps1, str act1, Tensor pw_weight, Tensor? pw_bias, "
    "Tensor? bn2_weight, Tensor? bn2_bias, Tensor bn2_mean, Tensor bn2_var, float eps2, "
    "str act2, str out_format")


def has_out_format(spec: BlockSpec) -> bool:
    """Whether the block's forward takes ``out_format`` (the GEMM blocks; not dw_block)."""
    return not spec.residual


def _signature(args: str, results: str, backend: bool) -> str:
    return f"({args}{', str backend' if backend else ''}) -> {results}"


def forward(spec: BlockSpec, backend: bool = True) -> str:
    """Schema of ``{spec.name}_forward`` (``backend=False``: of ``_forward_kernel``)."""
    args = _FORWARD_ARGS + (", str out_format" if has_out_format(spec) else "")
    return _signature(args, _FORWARD_RESULTS, backend)


def backward(spec: BlockSpec, backend: bool = True) -> str:
    """Schema of ``{spec.name}_backward`` (``backend=False``: of ``_backward_kernel``)."""
    return _signature(_BACKWARD_ARGS, _BACKWARD_RESULTS, backend)


LAYER_EVAL = _signature(_LAYER_EVAL_ARGS, "Tensor", True)

# The compiled extension's block kernels: name -> schema (no backend argument).
KERNEL_SCHEMAS: dict[str, str] = {}
for _spec in SPECS.values():
    KERNEL_SCHEMAS[f"{_spec.name}_forward_kernel"] = forward(_spec, backend=False)
    KERNEL_SCHEMAS[f"{_spec.name}_backward_kernel"] = backward(_spec, backend=False)
del _spec

__all__ = ["NAMESPACE", "has_out_format", "forward", "backward", "LAYER_EVAL", "KERNEL_SCHEMAS"]
