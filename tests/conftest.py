"""Shared test helpers: seeds, the tolerance table, stock-module oracles."""
from __future__ import annotations

import copy
import os
import zlib

import pytest
import torch
from torch import nn

# Without a GPU the Triton kernels run under Triton's interpreter; it must be switched
# on before the first kernel module is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import convmixer_kernels as ck  # noqa: E402

# float32 means float32 in the tests: stock convolutions on a GPU use TF32 by default
# (cuDNN), and our Triton GEMMs follow the same switch, so both are turned off here; the
# float32 tolerances of docs/design.md (The tolerance rule) are IEEE float32's.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
LAYOUTS = ("nchw", "channels_last", "strided")

# One table for tolerances (docs/design.md (The tolerance rule)). float32/float64: max abs error
# against the float64 oracle <= RTOL * scale + ATOL (scale = max |oracle|), plus 2x
# PyTorch's own float32 error (which dominates only in ill-conditioned cases such as
# BatchNorm over a handful of values, where reductions cancel large terms).
# float16/bfloat16: error <= 2 x the error of the same PyTorch composite run in that
# dtype, plus a floor of one unit in the last place at the output scale.
RTOL = {torch.float64: 1e-10, torch.float32: 5e-5}
ATOL = {torch.float64: 1e-12, torch.float32: 1e-5}
ULP = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7}


def backends_under_test(device: str = "cpu", op: str = "dw_block",
                        dtype: torch.dtype = torch.float32) -> list[str]:
    """Every backend that can run ``op`` on ``dtype`` tensors of ``device`` in this build
    (reference always)."""
    return ck.available_backends(device, op, dtype)


@pytest.fixture(autouse=True)
def seed(request):
    """A fresh, reproducible seed per test (derived from the test id)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield


def make_input(shape, dtype, layout: str, requires_grad: bool = False,
               device: str = "cpu") -> torch.Tensor:
    """Random input in the requested layout; 'strided' is a non-contiguous view."""
    if layout == "strided":
        n, c, h, w = shape
        base = torch.randn(n, c, h, 2 * w + 1, dtype=torch.float64).to(device, dtype)
        x = base[..., 1::2]
        assert not x.is_contiguous() or x.numel() <= 1
    else:
        x = torch.randn(shape, dtype=torch.float64).to(device, dtype)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
    return x.requires_grad_(requires_grad)


def randomize_(module: nn.Module) -> nn.Module:
    """Random (non-default) parameters and running statistics for every BatchNorm/conv."""
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                if m.affine:
                    m.weight.uniform_(0.5, 1.5)
                    m.bias.uniform_(-0.5, 0.5)
                if m.track_running_stats:
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
            elif isinstance(m, nn.Conv2d) and m.bias is not None:
                m.bias.uniform_(-0.5, 0.5)
    return module


def max_err(actual: torch.Tensor, oracle: torch.Tensor) -> float:
    if not actual.numel():
        return 0.0
    return (actual.detach().cpu().double() - oracle.detach().cpu().double()).abs().max().item()


def assert_close_to_oracle(name: str, actual, oracle, lowp=None) -> None:
    """The docs/design.md (The tolerance rule) rule; prints the errors before asserting. ``lowp`` is
    PyTorch's result in the same dtype, or a sequence of such results (the largest
    error counts: two PyTorch implementations measure its rounding noise better than
    one where the result cancels, such as a bias gradient through BatchNorm)."""
    assert actual.shape == oracle.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(oracle.shape)}"
    dtype = actual.dtype
    err = max_err(actual, oracle)
    scale = oracle.detach().double().abs().max().item() if oracle.numel() else 0.0
    lowps = [] if lowp is None else [lowp] if isinstance(lowp, torch.Tensor) else list(lowp)
    lowp_err = max((max_err(t, oracle) for t in lowps), default=0.0)
    detail = f" pytorch_{dtype}_err={lowp_err:.3e}"
    if dtype in RTOL:
        # Ill-conditioned cases (BatchNorm over 2 values, say) cancel large terms: there
        # the 2x rule of the low-precision dtypes applies to float32 too.
        bound = RTOL[dtype] * scale + ATOL[dtype] + 2 * lowp_err
    else:
        bound = 2 * lowp_err + ULP[dtype] * max(scale, 1.0)
    print(f"{name}: max_err={err:.3e} bound={bound:.3e} scale={scale:.3e}{detail}")
    assert err <= bound, f"{name}: max error {err:.3e} > bound {bound:.3e}{detail}"
    nan_ok = torch.equal(torch.isnan(actual).cpu(), torch.isnan(oracle).cpu())
    assert nan_ok, f"{name}: NaN pattern differs from the oracle"


def eager_copy(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """A stock-module copy of a fused module (same parameters), in ``dtype``."""
    m = copy.deepcopy(module).to(dtype)
    return unfuse_(m)


def unfuse_(model: nn.Module) -> nn.Module:
    """Turn fused modules back into the stock classes they were made from (in place)."""
    from convmixer_kernels.convert import FUSED_TYPES, FusedSequential

    for m in model.modules():
        if isinstance(m, ck.DepthwiseBlock):
            m.__class__ = _StockResidual
        elif isinstance(m, FUSED_TYPES + (FusedSequential,)):
            m.__class__ = nn.Sequential
    return model


class _StockResidual(nn.Module):
    """The paper's Residual: fn(x) + x, with stock children."""

    def forward(self, x):
        return self.fn(x) + x


def grads_of(module: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {"x": x.grad}
    for name, p in module.named_parameters():
        out[name] = p.grad
    return out


def has_cuda() -> bool:
    return torch.cuda.is_available() and os.environ.get("CONVMIXER_KERNELS_NO_CUDA_TESTS") != "1"


def stock_conv_layout(x: torch.Tensor, conv: torch.nn.Conv2d) -> torch.memory_format:
    """The layout torch's own convolution returns for x (what the stock modules return)."""
    with torch.no_grad():
        y = torch.nn.functional.conv2d(x, conv.weight, conv.bias, conv.stride)
    cl = y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()
    return torch.channels_last if cl else torch.contiguous_format
