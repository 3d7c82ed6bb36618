"""The register-blocked eval forward (v2) of the CUDA depthwise block (csrc/cuda/dw_block_v2.*).

The cuda backend's eval forward runs v2 for NCHW-contiguous inputs with k in {3, 5, 7, 9} and
W <= 32 (docs/cuda-depthwise.md); CONVMIXER_KERNELS_CUDA_DW_V2=0 keeps the first kernels.
These tests (marked ``cuda``, skipped without a GPU) compare v2 with the reference backend
at the issue's shapes and awkward ones: odd H and W (the scalar load/store path), 1x1 planes,
C not a multiple of anything, N = 1, H taller than a tile, an odd plane count on the
two-planes-per-warp tile, a misaligned data pointer, NaN, and the switch back to v1.
Until a GPU run has passed them, v2 is unvalidated.
"""
from __future__ import annotations

import pytest
import torch

from convmixer_kernels import _cpp_lib, reference
from convmixer_kernels.spec import DW_BLOCK

from test_cuda_backend import check, close, cuda_args, needs_gpu, to_oracle

pytestmark = [pytest.mark.cuda, needs_gpu]

SWITCH = "CONVMIXER_KERNELS_CUDA_DW_V2"


def kernel_forward(args):
    """The cuda implementation of the kernel op (csrc/cuda/dw_block.cu's launcher) directly."""
    _cpp_lib.load()
    return torch.ops.convmixer_kernels.dw_block_forward_kernel(*args)


def forward_both(args):
    got = kernel_forward(args)
    want = reference.forward(DW_BLOCK, *args)
    dtype = args[0].dtype
    oracle = reference.forward(DW_BLOCK, *to_oracle(args)) if dtype == torch.float32 else (None,) * 4
    for name, g, w, o in zip(("out", "mean", "var", "preact"), got, want, oracle):
        check(name, g, w, dtype, o)
    assert got[0].is_contiguous()
    return got


# (shape, k): 32x32 tile (W in 17..32) and 16x16 two-plane tile (W <= 16), vec (W % 8 == 0)
# and scalar paths, tiles down the rows, 1x1 planes, N = 1, odd C.
SHAPES = [((2, 64, 32, 32), 9), ((4, 256, 16, 16), 5), ((2, 96, 32, 32), 7), ((2, 40, 32, 32), 3),
          ((1, 7, 1, 1), 3), ((3, 5, 1, 1), 9), ((1, 5, 17, 31), 7), ((3, 13, 33, 24), 9),
          ((2, 3, 9, 16), 5), ((1, 19, 15, 13), 3), ((5, 3, 40, 8), 7), ((1, 1, 32, 32), 9),
          ((2, 11, 70, 32), 5), ((1, 9, 2, 3), 9)]


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "nosave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", SHAPES, ids=str)
def test_v2_eval_matches_reference(shape, k, dtype, save_preact, activation, monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    forward_both(cuda_args(shape, k, dtype, "nchw", False, save_preact, activation))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_v2_cifar_shape(dtype):
    """N=128, C=256, 16x16, k=5: the two-planes-per-warp tile."""
    forward_both(cuda_args((128, 256, 16, 16), 5, dtype, "nchw", False, False))


def test_v2_headline_shape():
    """N=64, C=1536, 32x32, k=9, bfloat16 (compared with the reference in bfloat16)."""
    forward_both(cuda_args((64, 1536, 32, 32), 9, torch.bfloat16, "nchw", False, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_v2_misaligned_pointer(dtype):
    """A contiguous x whose data pointer is not 16-byte aligned takes the scalar path."""
    args = list(cuda_args((2, 6, 32, 32), 9, dtype, "nchw", False, True))
    base = torch.empty(args[0].numel() + 1, device="cuda", dtype=dtype)
    x = base[1:].view(args[0].shape)
    x.copy_(args[0])
    assert x.is_contiguous() and x.data_ptr() % 16 != 0
    args[0] = x
    forward_both(tuple(args))


def test_v2_nan_propagates():
    args = list(cuda_args((2, 8, 16, 16), 5, torch.float32, "nchw", False, True, "relu"))
    args[0] = args[0].clone()
    args[0][0, 3, 4, 4] = float("nan")
    forward_both(tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 24, 32, 32), 9), ((4, 32, 16, 16), 5)], ids=str)
def test_v2_switch_and_agreement_with_v1(shape, k, dtype, monkeypatch):
    """CONVMIXER_KERNELS_CUDA_DW_V2=0 runs the first kernel; both agree within the tolerance
    (v2 applies BN as act * scale + shift, v1 as (act - mean) * invstd * w + b)."""
    args = cuda_args(shape, k, dtype, "nchw", False, True)
    monkeypatch.delenv(SWITCH, raising=False)
    v2 = kernel_forward(args)
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_forward(args)
    forward_both(args)  # v1 against the reference too
    for name, a, b in zip(("out", "mean", "var", "preact"), v2, v1):
        close(name, a, b, dtype)
    # the pre-activation sums the taps in the same order in both kernels
    assert torch.equal(v2[3], v1[3])


def test_v2_eval_then_backward():
    """Backward from a v2 forward's saved pre-activation matches the reference."""
    args = cuda_args((2, 16, 32, 32), 9, torch.float32, "nchw", False, True)
    out, mean, var, preact = forward_both(args)
    bargs = (torch.randn_like(out), *args[:4], mean, var, preact, False, 1e-5, "gelu", [True] * 5)
    got = torch.ops.convmixer_kernels.dw_block_backward_kernel(*bargs)
    want = reference.backward(DW_BLOCK, *bargs)
    oracle = reference.backward(DW_BLOCK, *to_oracle(bargs))
    for name, g, w, o in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"), got, want, oracle):
        check(name, g, w, torch.float32, o)
