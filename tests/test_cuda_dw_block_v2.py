"""The register-blocked v2 kernels of the CUDA depthwise block: the eval forward and the train
forward (conv + per-tile statistics, finalize, normalise; csrc/cuda/dw_block_v2.*) and the
backward (csrc/cuda/dw_block_v2_backward.*, the cases under "v2 backward").

The cuda backend runs the templated v2 kernels for NCHW-contiguous inputs with k in {3, 5, 7,
9} and W <= 32, and the generic v2 kernels for every other NCHW call (docs/cuda-depthwise.md),
only where v2 is enabled: its source validated by the manifest
(convmixer_kernels/backends/validation.py) or CONVMIXER_KERNELS_CUDA_DW_V2=1; =0 keeps the
first kernels. These tests (marked ``cuda``, skipped without a GPU) opt in with =1 and compare
v2 with the reference backend at the issue's shapes and awkward ones: odd H and W (the scalar
load/store path), 1x1 planes, C not a multiple of anything, N = 1, H taller than a tile, an
odd plane count on the two-planes-per-warp tile, a misaligned data pointer, NaN, the switch
back to v1 and the default (v1 while unvalidated). The channels_last eval and train forwards
and backward (csrc/cuda/dw_block_v2_cl*) have their cases after them (C % 4 == 0, aligned;
the other channels_last calls stay on v1 and are checked too), and the generic NCHW path
(csrc/cuda/dw_block_v2_generic.*: every other NCHW call, i.e. k in 11..31, W > 32 and
strided views, eval, train and backward) at the end. A GPU run that passes all of them
writes the manifest entry that validates v2 (scripts/gpu_check.sh).
"""
from __future__ import annotations

import pytest
import torch

from convmixer_kernels import _cpp_lib, reference
from convmixer_kernels.spec import DW_BLOCK, output_memory_format

from conftest import assert_close_to_oracle
from test_cuda_backend import check, close, cuda_args, needs_gpu, to_oracle

pytestmark = [pytest.mark.cuda, needs_gpu]

SWITCH = "CONVMIXER_KERNELS_CUDA_DW_V2"


@pytest.fixture(autouse=True)
def _opt_in(monkeypatch):
    """Every test runs v2 by the explicit opt-in unless it sets the switch itself."""
    monkeypatch.setenv(SWITCH, "1")


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
def test_v2_eval_matches_reference(shape, k, dtype, save_preact, activation):
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
    monkeypatch.setenv(SWITCH, "1")
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


# ---- v2 backward (csrc/cuda/dw_block_v2_backward.*) ----------------------------------------
# dw_block_backward_kernel runs v2 for NCHW-contiguous x, grad_out and preact with k in
# {3, 5, 7, 9} and W <= 32 when dx, dweight or dbias is asked for (docs/cuda-depthwise.md,
# "v2 backward"). The switch is set to "1" explicitly so that these cases test v2 whatever
# the switch's default is.

GRAD_NAMES = ("dx", "dweight", "dbias", "dbn_weight", "dbn_bias")


def kernel_backward(bargs):
    _cpp_lib.load()
    return torch.ops.convmixer_kernels.dw_block_backward_kernel(*bargs)


def oracle_args(args, device):
    """The arguments in float64 on ``device`` (the CPU, or the GPU for the large shapes where a
    float64 CPU convolution would take minutes)."""
    return tuple(a.detach().to(device, torch.float64) if torch.is_tensor(a) and a.is_floating_point() else a
                 for a in args)


def backward_args(shape, k, dtype, training, save_preact, activation="gelu", mask=(True,) * 5):
    """Fresh random x, parameters and grad_out; mean, var and preact from the reference
    forward (the batch statistics in training)."""
    args = cuda_args(shape, k, dtype, "nchw", training, save_preact, activation)
    out, mean, var, preact = reference.forward(DW_BLOCK, *args)
    grad = torch.randn(out.shape).to(args[0].device, dtype)
    return (grad, args[0], args[1], args[2], args[3], mean, var, preact, training, 1e-5, activation,
            list(mask))


def backward_both(bargs, oracle_device="cpu"):
    """The kernel op against the float64 oracle with the tolerance rule (conftest), PyTorch's
    own error being the reference backend run in the kernel's dtype."""
    got = kernel_backward(bargs)
    want = reference.backward(DW_BLOCK, *bargs)
    oracle = reference.backward(DW_BLOCK, *oracle_args(bargs, oracle_device))
    for name, m, g, w, o in zip(GRAD_NAMES, bargs[-1], got, want, oracle):
        assert (g.numel() > 0) == bool(m), name
        if not m:
            continue
        assert g.shape == w.shape and g.dtype == w.dtype, f"{name}: {g.shape} {g.dtype}"
        assert g.device == w.device, name
        assert_close_to_oracle(name, g, o, lowp=w)
    if bargs[-1][0]:  # dx in x's output layout (NCHW, or channels_last for channels_last x)
        assert got[0].is_contiguous(memory_format=output_memory_format(bargs[1]))
    return got


# (shape, k): both tiles, vec and scalar paths, tiles down the rows (dz halo rows inside the
# image), 1x1 planes, N = 1, odd plane counts on the two-planes-per-warp tile.
BWD_SHAPES = [((2, 64, 32, 32), 9), ((4, 48, 16, 16), 5), ((2, 24, 32, 32), 7), ((2, 16, 32, 32), 3),
              ((1, 7, 1, 1), 3), ((1, 5, 17, 31), 7), ((3, 13, 33, 24), 9), ((2, 3, 9, 16), 5),
              ((1, 19, 15, 13), 3), ((5, 3, 40, 8), 7), ((2, 11, 70, 32), 5), ((1, 9, 2, 3), 9)]


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", BWD_SHAPES, ids=str)
def test_v2_backward_matches_reference(shape, k, dtype, training, save_preact, activation, monkeypatch):
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args(shape, k, dtype, training, save_preact, activation))


@pytest.mark.parametrize("mask", [[True, False, False, False, False], [False, True, True, False, False],
                                  [False, False, True, True, True], [True, True, False, True, False],
                                  [False, True, False, False, False]], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_backward_output_mask(mask, training, monkeypatch):
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args((2, 10, 12, 11), 7, torch.float32, training, True, mask=mask))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_backward_no_bn_weight(training, monkeypatch):
    """bn_weight absent (affine=False): dz uses gw = 1."""
    monkeypatch.setenv(SWITCH, "1")
    mask = (True, True, True, False, True)
    bargs = list(backward_args((2, 12, 32, 32), 9, torch.float32, training, True, mask=mask))
    bargs[4] = None
    backward_both(tuple(bargs))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_v2_backward_cifar_shape(dtype, training, monkeypatch):
    """N=128, C=256, 16x16, k=5: the two-planes-per-warp tile."""
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args((128, 256, 16, 16), 5, dtype, training, True), oracle_device="cuda")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_backward_headline_shape(training, monkeypatch):
    """N=64, C=1536, 32x32, k=9, bfloat16, exact GELU (the float64 oracle on the GPU)."""
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args((64, 1536, 32, 32), 9, torch.bfloat16, training, True), oracle_device="cuda")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_backward_misaligned_pointers(dtype, training, monkeypatch):
    """Contiguous x, grad_out and preact whose data pointers are not 16-byte aligned take the
    scalar path."""
    monkeypatch.setenv(SWITCH, "1")
    bargs = list(backward_args((2, 6, 32, 32), 9, dtype, training, True))
    for i in (0, 1, 7):
        base = torch.empty(bargs[i].numel() + 1, device=bargs[i].device, dtype=dtype)
        t = base[1:].view(bargs[i].shape)
        t.copy_(bargs[i])
        assert t.is_contiguous() and t.data_ptr() % 16 != 0
        bargs[i] = t
    backward_both(tuple(bargs))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_backward_nan_propagates(training, monkeypatch):
    monkeypatch.setenv(SWITCH, "1")
    bargs = list(backward_args((2, 8, 16, 16), 5, torch.float32, training, True, "relu"))
    bargs[0] = bargs[0].clone()
    bargs[0][0, 3, 4, 4] = float("nan")
    got = kernel_backward(tuple(bargs))
    want = reference.backward(DW_BLOCK, *bargs)
    for name, g, w in zip(GRAD_NAMES, got, want):
        close(name, g, w, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((8, 96, 32, 32), 9), ((16, 64, 16, 16), 5), ((3, 13, 33, 24), 7)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_backward_bitwise_deterministic(shape, k, dtype, training, monkeypatch):
    """No atomics: per-tile partial sums reduced in a fixed order, so two runs agree bit for bit."""
    monkeypatch.setenv(SWITCH, "1")
    bargs = backward_args(shape, k, dtype, training, True)
    first = kernel_backward(bargs)
    for _ in range(2):
        again = kernel_backward(bargs)
        for name, a, b in zip(GRAD_NAMES, first, again):
            assert torch.equal(a, b), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_backward_agrees_with_v1(dtype, training, monkeypatch):
    """CONVMIXER_KERNELS_CUDA_DW_V2=0 runs the first backward; both agree within the tolerance."""
    bargs = backward_args((2, 24, 32, 32), 9, dtype, training, True)
    monkeypatch.setenv(SWITCH, "1")
    v2 = kernel_backward(bargs)
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_backward(bargs)
    for name, a, b in zip(GRAD_NAMES, v2, v1):
        close(name, a, b, dtype)


# ---- train forward (batch statistics) -------------------------------------------------------

TRAIN_SHAPES = [((2, 64, 32, 32), 9), ((4, 32, 16, 16), 5), ((2, 40, 32, 32), 3), ((1, 7, 1, 1), 3),
                ((3, 13, 33, 24), 9), ((2, 3, 9, 16), 5), ((1, 19, 15, 13), 3), ((5, 3, 40, 8), 7),
                ((2, 11, 70, 32), 5), ((1, 9, 2, 3), 9), ((3, 5, 17, 31), 7)]


@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "nosave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", TRAIN_SHAPES, ids=str)
def test_v2_train_matches_reference(shape, k, dtype, save_preact):
    """out, the batch mean and biased variance, and the saved pre-activation (erf GELU)."""
    forward_both(cuda_args(shape, k, dtype, "nchw", True, save_preact, "gelu"))


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 64, 32, 32), 9), ((4, 32, 16, 16), 5), ((3, 13, 33, 24), 9),
                                     ((1, 19, 15, 13), 3)], ids=str)
def test_v2_train_activations(shape, k, dtype, activation):
    """The other activations' epilogues (tanh GELU keeps a branch per element, ReLU selects)."""
    forward_both(cuda_args(shape, k, dtype, "nchw", True, True, activation))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_v2_train_cifar_shape(dtype):
    forward_both(cuda_args((128, 256, 16, 16), 5, dtype, "nchw", True, False))


def test_v2_train_headline_shape():
    forward_both(cuda_args((64, 1536, 32, 32), 9, torch.bfloat16, "nchw", True, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 24, 32, 32), 9), ((4, 32, 16, 16), 5), ((3, 6, 45, 20), 7)], ids=str)
def test_v2_train_agrees_with_v1(shape, k, dtype, monkeypatch):
    """The pre-activation is bitwise v1's (same tap order and rounding); statistics and out
    agree within the tolerance (other tile partition of the partial sums; BN as one FFMA)."""
    args = cuda_args(shape, k, dtype, "nchw", True, True)
    v2 = kernel_forward(args)
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_forward(args)
    for name, a, b in zip(("out", "mean", "var", "preact"), v2, v1):
        close(name, a, b, dtype)
    assert torch.equal(v2[3], v1[3])


def test_v2_train_deterministic():
    """No atomics: two runs give the same bits."""
    args = cuda_args((3, 40, 32, 32), 7, torch.bfloat16, "nchw", True, False)
    a, b = kernel_forward(args), kernel_forward(args)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_v2_train_misaligned_pointer():
    args = list(cuda_args((2, 6, 32, 32), 9, torch.float32, "nchw", True, True))
    base = torch.empty(args[0].numel() + 1, device="cuda", dtype=torch.float32)
    x = base[1:].view(args[0].shape)
    x.copy_(args[0])
    args[0] = x
    forward_both(tuple(args))


@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "nosave"])
def test_v2_train_then_backward(save_preact):
    """The backward (v1) from a v2 train forward's statistics (and saved pre-activation)."""
    args = cuda_args((2, 16, 32, 32), 9, torch.float32, "nchw", True, save_preact)
    out, mean, var, preact = forward_both(args)
    bargs = (torch.randn_like(out), *args[:4], mean, var, preact, True, 1e-5, "gelu", [True] * 5)
    got = torch.ops.convmixer_kernels.dw_block_backward_kernel(*bargs)
    want = reference.backward(DW_BLOCK, *bargs)
    oracle = reference.backward(DW_BLOCK, *to_oracle(bargs))
    for name, g, w, o in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"), got, want, oracle):
        check(name, g, w, torch.float32, o)


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
def test_default_is_v1_while_unvalidated(training, monkeypatch):
    """Without the switch, an unvalidated build runs v1 (the same bits as =0), a validated
    one v2 (the same bits as =1). Never skipped, so a rerun on a validated build records too."""
    from convmixer_kernels.backends import validation
    args = cuda_args((2, 24, 32, 32), 9, torch.bfloat16, "nchw", training, True)
    monkeypatch.delenv(SWITCH, raising=False)
    default = kernel_forward(args)
    monkeypatch.setenv(SWITCH, "1" if validation.is_validated("dw_block_v2") else "0")
    expected = kernel_forward(args)
    for a, b in zip(default, expected):
        assert torch.equal(a, b)
    # the switch takes effect: v1 and v2 round the BN affine differently (float32 out)
    args32 = cuda_args((2, 24, 32, 32), 9, torch.float32, "nchw", training, True)
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_forward(args32)
    monkeypatch.setenv(SWITCH, "1")
    v2 = kernel_forward(args32)
    assert not torch.equal(v1[0], v2[0]), "v1 and v2 gave the same bits: the switch has no effect"


# ---- channels_last eval forward (csrc/cuda/dw_block_v2_cl.*) --------------------------------
# dw_block_forward_kernel runs cl_eval_kernel in eval for channels_last-contiguous x (not also
# NCHW-contiguous) with k in {3, 5, 7, 9}, C % 4 == 0 and a 16-byte aligned data pointer, any
# N, H, W (docs/cuda-depthwise.md, "v2 eval forward, channels_last"); other channels_last calls
# (C % 4 != 0, a misaligned pointer) stay on v1 and must still be right with the switch on.

def forward_both_cl(args):
    """The kernel op in eval against the reference (float32: against the float64 oracle with the
    tolerance rule; half precisions: against the reference in the same dtype), fresh inputs."""
    got = kernel_forward(args)
    want = reference.forward(DW_BLOCK, *args)
    dtype = args[0].dtype
    oracle = reference.forward(DW_BLOCK, *to_oracle(args)) if dtype == torch.float32 else (None,) * 4
    for name, g, w, o in zip(("out", "mean", "var", "preact"), got, want, oracle):
        check(name, g, w, dtype, o)
    assert got[0].is_contiguous(memory_format=output_memory_format(args[0]))
    if args[-1]:
        assert got[3].is_contiguous(memory_format=output_memory_format(args[0]))
    return got


# (shape, k): the headline-like 32x32 planes (two 16-pixel strips per row), CIFAR-like 16x16,
# W < 16 (one partial strip: W < the strip and the k-wide window), W not a multiple of 16,
# 1x1 planes (also NCHW-contiguous: the output is NCHW and the NCHW v2 kernel runs), N = 1, odd
# H and W, C not a multiple of the 128 channels of a block (idle lanes), H taller than W.
CL_SHAPES = [((2, 64, 32, 32), 9), ((4, 256, 16, 16), 5), ((2, 96, 32, 32), 7), ((2, 40, 32, 32), 3),
             ((1, 8, 1, 1), 3), ((3, 4, 1, 1), 9), ((1, 12, 17, 31), 7), ((3, 20, 33, 24), 9),
             ((2, 4, 9, 6), 5), ((1, 132, 15, 13), 3), ((5, 8, 40, 8), 7), ((1, 4, 3, 5), 9),
             ((2, 16, 7, 45), 9), ((1, 260, 5, 3), 5)]


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "nosave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", CL_SHAPES, ids=str)
def test_v2_cl_eval_matches_reference(shape, k, dtype, save_preact, activation):
    forward_both_cl(cuda_args(shape, k, dtype, "channels_last", False, save_preact, activation))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_v2_cl_cifar_shape(dtype):
    """N=128, C=256, 16x16, k=5, channels_last."""
    forward_both_cl(cuda_args((128, 256, 16, 16), 5, dtype, "channels_last", False, False))


def test_v2_cl_headline_shape():
    """N=64, C=1536, 32x32, k=9, bfloat16, channels_last (against the reference in bfloat16)."""
    forward_both_cl(cuda_args((64, 1536, 32, 32), 9, torch.bfloat16, "channels_last", False, False))


# Channels_last calls the kernels do not cover: C % 4 != 0 (v1).
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 6, 32, 32), 9), ((1, 3, 16, 16), 5), ((2, 13, 9, 7), 3),
                                     ((1, 2, 1, 1), 3)], ids=str)
def test_v2_cl_fallback_c_not_multiple_of_4(shape, k, dtype):
    forward_both_cl(cuda_args(shape, k, dtype, "channels_last", False, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_v2_cl_misaligned_pointer_falls_back(dtype):
    """A channels_last x whose data pointer is not 16-byte aligned runs v1, correctly."""
    args = list(cuda_args((2, 8, 32, 32), 9, dtype, "channels_last", False, True))
    n, c, h, w = args[0].shape
    base = torch.empty(args[0].numel() + 1, device="cuda", dtype=dtype)
    x = base[1:].view(n, h, w, c).permute(0, 3, 1, 2)
    x.copy_(args[0])
    assert x.is_contiguous(memory_format=torch.channels_last) and x.data_ptr() % 16 != 0
    args[0] = x
    forward_both_cl(tuple(args))




def test_v2_cl_nan_propagates():
    args = list(cuda_args((2, 8, 16, 16), 5, torch.float32, "channels_last", False, True, "relu"))
    args[0] = args[0].clone()
    args[0][0, 3, 4, 4] = float("nan")
    forward_both_cl(tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 24, 32, 32), 9), ((4, 32, 16, 16), 5), ((1, 12, 17, 31), 7)], ids=str)
def test_v2_cl_switch_and_agreement_with_v1(shape, k, dtype, monkeypatch):
    """=0 runs v1's conv_kernel on the same channels_last call: out agrees within the tolerance
    (BN as one FFMA here), the saved pre-activation is bitwise v1's (same tap order and
    rounding, finite weights), and in float32 the switch changes the bits of out."""
    args = cuda_args(shape, k, dtype, "channels_last", False, True)
    monkeypatch.setenv(SWITCH, "1")
    v2 = kernel_forward(args)
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_forward(args)
    for name, a, b in zip(("out", "mean", "var", "preact"), v2, v1):
        close(name, a, b, dtype)
    assert torch.equal(v2[3], v1[3])
    if dtype == torch.float32:
        assert not torch.equal(v2[0], v1[0]), "v1 and v2 gave the same bits: the channels_last path did not run"


# ---- channels_last train forward (cl_train_kernel, cl_finalize_kernel, cl_norm_kernel) -------
# The same calls as the channels_last eval forward, in training: batch statistics from per-block
# partials combined in a fixed order (docs/cuda-depthwise.md, "v2 train forward, channels_last").

# (shape, k): 32x32 (two strips per row), 16x16, W < 16, H and W > 32 (several strips per row,
# tall planes), odd H and W, C not a multiple of 128 (idle lanes), 1x1 planes (NCHW-contiguous
# too: the NCHW path), N = 1.
CL_TRAIN_SHAPES = [((2, 64, 32, 32), 9), ((4, 32, 16, 16), 5), ((2, 40, 32, 32), 3), ((1, 8, 1, 1), 3),
                   ((3, 20, 33, 24), 9), ((2, 4, 9, 6), 5), ((1, 132, 15, 13), 3), ((5, 8, 40, 8), 7),
                   ((2, 12, 70, 36), 5), ((1, 4, 3, 5), 9), ((3, 8, 17, 31), 7), ((2, 260, 37, 45), 9)]


@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "nosave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", CL_TRAIN_SHAPES, ids=str)
def test_v2_cl_train_matches_reference(shape, k, dtype, save_preact):
    """out, the batch mean and biased variance, the saved pre-activation (erf GELU)."""
    forward_both_cl(cuda_args(shape, k, dtype, "channels_last", True, save_preact, "gelu"))


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 64, 32, 32), 9), ((4, 32, 16, 16), 5), ((3, 20, 33, 24), 9),
                                     ((1, 132, 15, 13), 3)], ids=str)
def test_v2_cl_train_activations(shape, k, dtype, activation):
    forward_both_cl(cuda_args(shape, k, dtype, "channels_last", True, True, activation))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_v2_cl_no_bias_no_affine(dtype, training):
    """bias, BN weight and BN bias absent (nullptr paths of the staging and finalize)."""
    args = list(cuda_args((2, 24, 32, 32), 7, dtype, "channels_last", training, True))
    args[2] = args[3] = args[4] = None
    forward_both_cl(tuple(args))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_v2_cl_train_cifar_shape(dtype):
    forward_both_cl(cuda_args((128, 256, 16, 16), 5, dtype, "channels_last", True, False))


def test_v2_cl_train_headline_shape():
    forward_both_cl(cuda_args((64, 1536, 32, 32), 9, torch.bfloat16, "channels_last", True, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 6, 32, 32), 9), ((1, 3, 16, 16), 5), ((2, 13, 9, 7), 3)], ids=str)
def test_v2_cl_train_fallback_c_not_multiple_of_4(shape, k, dtype):
    forward_both_cl(cuda_args(shape, k, dtype, "channels_last", True, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 24, 32, 32), 9), ((4, 32, 16, 16), 5), ((1, 12, 37, 33), 7)],
                         ids=str)
def test_v2_cl_train_agrees_with_v1(shape, k, dtype, monkeypatch):
    """The pre-activation is bitwise v1's; statistics and out agree within the tolerance."""
    args = cuda_args(shape, k, dtype, "channels_last", True, True)
    v2 = kernel_forward(args)
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_forward(args)
    for name, a, b in zip(("out", "mean", "var", "preact"), v2, v1):
        close(name, a, b, dtype)
    assert torch.equal(v2[3], v1[3])


def test_v2_cl_train_deterministic():
    """No atomics: two runs give the same bits."""
    args = cuda_args((3, 40, 33, 32), 7, torch.bfloat16, "channels_last", True, False)
    a, b = kernel_forward(args), kernel_forward(args)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


# ---- channels_last backward (cl_elem_kernel, cl_dgrad_kernel, cl_wgrad_kernel) ----------------
# dw_block_backward_kernel runs the channels_last v2 backward when x, grad_out and a saved
# pre-activation are channels_last-contiguous (not NCHW-contiguous), 16-byte aligned, C % 4 == 0
# and k in {3, 5, 7, 9} (docs/cuda-depthwise.md, "v2 backward, channels_last"); the rest on v1.

def backward_args_cl(shape, k, dtype, training, save_preact, activation="gelu", mask=(True,) * 5,
                     affine=True):
    """backward_args with x, grad_out and the saved pre-activation channels_last."""
    args = list(cuda_args(shape, k, dtype, "channels_last", training, save_preact, activation))
    if not affine:
        args[2] = args[3] = args[4] = None
    out, mean, var, preact = reference.forward(DW_BLOCK, *args)
    cl = torch.channels_last
    grad = torch.randn(out.shape).to(args[0].device, dtype).contiguous(memory_format=cl)
    if preact.numel():
        preact = preact.contiguous(memory_format=cl)
    return (grad, args[0], args[1], args[2], args[3], mean, var, preact, training, 1e-5, activation,
            list(mask))


CL_BWD_SHAPES = [((2, 64, 32, 32), 9), ((4, 32, 16, 16), 5), ((2, 24, 32, 32), 7), ((2, 16, 32, 32), 3),
                 ((3, 20, 33, 24), 9), ((2, 4, 9, 6), 5), ((1, 132, 15, 13), 3), ((5, 8, 40, 8), 7),
                 ((2, 12, 70, 36), 5), ((1, 4, 3, 5), 9), ((3, 8, 17, 31), 7), ((2, 260, 37, 45), 9)]


@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", CL_BWD_SHAPES, ids=str)
def test_v2_cl_backward_matches_reference(shape, k, dtype, training, save_preact):
    """Every gradient against the float64 oracle (erf GELU)."""
    got = backward_both(backward_args_cl(shape, k, dtype, training, save_preact))
    if shape[2] * shape[3] > 1:
        assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 64, 32, 32), 9), ((3, 20, 33, 24), 9), ((1, 132, 15, 13), 3)],
                         ids=str)
def test_v2_cl_backward_activations(shape, k, dtype, training, activation):
    backward_both(backward_args_cl(shape, k, dtype, training, True, activation))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_v2_cl_backward_no_bias_no_affine(dtype, training):
    backward_both(backward_args_cl((2, 24, 32, 32), 7, dtype, training, False, affine=False))


@pytest.mark.parametrize("mask", [[True, False, False, False, False], [False, True, True, False, False],
                                  [False, False, True, True, True], [True, True, False, True, False],
                                  [False, True, False, False, False]], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_cl_backward_output_mask(mask, training):
    backward_both(backward_args_cl((2, 40, 32, 32), 9, torch.float32, training, True, mask=mask))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 6, 32, 32), 9), ((1, 3, 16, 16), 5), ((2, 13, 9, 7), 3)], ids=str)
def test_v2_cl_backward_fallback_c_not_multiple_of_4(shape, k, dtype, training):
    """C % 4 != 0: v1's backward, still right with the switch on."""
    backward_both(backward_args_cl(shape, k, dtype, training, True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_cl_backward_cifar_shape(training):
    bargs = backward_args_cl((128, 256, 16, 16), 5, torch.bfloat16, training, False)
    backward_both(bargs, oracle_device="cuda")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_cl_backward_headline_shape(training):
    bargs = backward_args_cl((64, 1536, 32, 32), 9, torch.bfloat16, training, True)
    backward_both(bargs, oracle_device="cuda")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_cl_backward_deterministic(training):
    """No atomics: two runs give the same bits."""
    bargs = backward_args_cl((3, 40, 33, 32), 7, torch.bfloat16, training, True)
    a, b = kernel_backward(bargs), kernel_backward(bargs)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_v2_cl_backward_agrees_with_v1(dtype, training, monkeypatch):
    bargs = backward_args_cl((2, 24, 32, 32), 9, dtype, training, True)
    v2 = kernel_backward(bargs)
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_backward(bargs)
    for name, a, b in zip(GRAD_NAMES, v2, v1):
        close(name, a, b, dtype)


# ---- generic NCHW path (csrc/cuda/dw_block_v2_generic.*) ------------------------------------
# Every NCHW call the templated kernels above do not take runs the generic v2 kernels when v2 is
# enabled (docs/cuda-depthwise.md, "v2 generic NCHW path"): k odd in 3..31 at run time (11, 13,
# 15, 31 here), W > 32 (column tiles of 32 with a halo: 33, 40, 64, 100), H > 32 (row tiles),
# and strided views of x, grad_out and preact (read through their strides, no copy), in eval,
# train and backward, float32 / bfloat16 / float16, with and without bias / BN affine.

# (shape, k): generic k on 32x32 and small planes (k wider than the plane), even W > 32 (the
# 16-byte path: 40, 64) and odd ones (33, 100 is even but 100 % 8 != 0: element path), H > 32,
# tiles partly outside the image on both axes.
GEN_SHAPES = [((2, 8, 32, 32), 11), ((2, 6, 20, 24), 15), ((1, 4, 40, 33), 31), ((2, 16, 64, 64), 7),
              ((2, 5, 33, 40), 9), ((1, 3, 70, 100), 5), ((3, 4, 13, 33), 3), ((1, 2, 7, 5), 31),
              ((2, 3, 45, 64), 13)]
GEN_SMALL = [((2, 6, 20, 24), 15), ((2, 5, 33, 40), 9), ((1, 2, 7, 5), 31), ((3, 4, 13, 33), 3)]


def strided_view(t, kind):
    """The same values as ``t`` (N, C, H, W) in a non-contiguous, non-channels_last view."""
    n, c, h, w = t.shape
    if kind == "w_step2":  # every other column of a wider tensor
        base = torch.empty(n, c, h, 2 * w, device=t.device, dtype=t.dtype).normal_()
        v = base[..., ::2]
    elif kind == "channel_slice":  # every other channel from 1 of a wider tensor (planes contiguous)
        base = torch.empty(n, 2 * c + 1, h, w, device=t.device, dtype=t.dtype).normal_()
        v = base[:, 1::2]
    elif kind == "transposed":  # H and W swapped in memory (unit stride along H)
        v = torch.empty(n, c, w, h, device=t.device, dtype=t.dtype).transpose(2, 3)
    elif kind == "row_padded":  # rows of pitch W + 3 (unit stride along W, unaligned rows)
        base = torch.empty(n, c, h, w + 3, device=t.device, dtype=t.dtype).normal_()
        v = base[..., :w]
    else:
        raise ValueError(kind)
    v.copy_(t)
    assert not v.is_contiguous() and not v.is_contiguous(memory_format=torch.channels_last)
    return v


def without_affine(args):
    """No conv bias, no BN weight and bias (affine=False)."""
    args = list(args)
    args[2] = args[3] = args[4] = None
    return tuple(args)


@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "nosave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", GEN_SHAPES, ids=str)
def test_v2_generic_eval_matches_reference(shape, k, dtype, save_preact):
    forward_both(cuda_args(shape, k, dtype, "nchw", False, save_preact, "gelu"))


@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "nosave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", GEN_SHAPES, ids=str)
def test_v2_generic_train_matches_reference(shape, k, dtype, save_preact):
    forward_both(cuda_args(shape, k, dtype, "nchw", True, save_preact, "gelu"))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", GEN_SMALL, ids=str)
def test_v2_generic_forward_activations(shape, k, dtype, activation, training):
    forward_both(cuda_args(shape, k, dtype, "nchw", training, True, activation))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 6, 20, 24), 15), ((2, 5, 33, 40), 9), ((2, 4, 32, 32), 7)], ids=str)
def test_v2_generic_forward_without_affine(shape, k, dtype, training):
    forward_both(without_affine(cuda_args(shape, k, dtype, "nchw", training, True)))


STRIDED_KINDS = ["w_step2", "channel_slice", "transposed", "row_padded"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", STRIDED_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 8, 32, 32), 9), ((2, 5, 24, 40), 7), ((1, 3, 17, 13), 11)], ids=str)
def test_v2_generic_strided_forward(shape, k, dtype, kind, training):
    """Strided x (k = 9, W = 32 would take the templated kernel if x were contiguous)."""
    args = list(cuda_args(shape, k, dtype, "nchw", training, True))
    args[0] = strided_view(args[0], kind)
    forward_both(tuple(args))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_v2_generic_conftest_strided_layout(dtype):
    """conftest's own 'strided' layout (x[..., 1::2] of an odd-width tensor), eval and train."""
    for training in (False, True):
        forward_both(cuda_args((2, 6, 20, 36), 7, dtype, "strided", training, True))


def test_v2_generic_headline_like_shape():
    """bf16, N=8, C=768, 64x64, k=7 (column tiles, the 16-byte path), eval and train."""
    for training in (False, True):
        forward_both(cuda_args((8, 768, 64, 64), 7, torch.bfloat16, "nchw", training, False))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 6, 20, 24), 15), ((2, 5, 33, 40), 9), ((1, 4, 40, 33), 31)],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_generic_agrees_with_v1(shape, k, dtype, training, monkeypatch):
    """=0 runs v1 on the same call: outputs agree within the tolerance, the saved pre-activation
    is bitwise v1's (same tap order and rounding), and in float32 the switch changes the bits of
    out (BN as one FFMA here): the generic path ran."""
    args = cuda_args(shape, k, dtype, "nchw", training, True)
    monkeypatch.setenv(SWITCH, "1")
    v2 = kernel_forward(args)
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_forward(args)
    for name, a, b in zip(("out", "mean", "var", "preact"), v2, v1):
        close(name, a, b, dtype)
    assert torch.equal(v2[3], v1[3])
    if dtype == torch.float32:
        assert not torch.equal(v2[0], v1[0]), "v1 and v2 gave the same bits: the generic path did not run"


def test_v2_generic_train_deterministic():
    args = cuda_args((3, 8, 40, 72), 11, torch.bfloat16, "nchw", True, False)
    a, b = kernel_forward(args), kernel_forward(args)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", GEN_SMALL + [((2, 8, 32, 32), 11), ((1, 3, 70, 100), 5)], ids=str)
def test_v2_generic_backward_matches_reference(shape, k, dtype, training, save_preact, monkeypatch):
    """Every gradient, erf GELU (the staging's 8-wide dz path)."""
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args(shape, k, dtype, training, save_preact, "gelu"))


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 6, 20, 24), 15), ((1, 3, 70, 100), 5)], ids=str)
def test_v2_generic_backward_activations(shape, k, dtype, training, activation, monkeypatch):
    """tanh GELU (its staging goes element by element) and ReLU."""
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args(shape, k, dtype, training, True, activation))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", STRIDED_KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 8, 32, 32), 9), ((1, 3, 17, 45), 11)], ids=str)
def test_v2_generic_strided_backward(shape, k, dtype, kind, training, monkeypatch):
    """Strided x, grad_out and saved preact (each a different kind of view)."""
    monkeypatch.setenv(SWITCH, "1")
    bargs = list(backward_args(shape, k, dtype, training, True))
    kinds = STRIDED_KINDS[STRIDED_KINDS.index(kind):] + STRIDED_KINDS[:STRIDED_KINDS.index(kind)]
    for i, kd in zip((1, 0, 7), kinds):
        bargs[i] = strided_view(bargs[i], kd)
    backward_both(tuple(bargs))


@pytest.mark.parametrize("mask", [[True, False, False, False, False], [False, True, True, False, False],
                                  [True, True, False, True, False], [False, True, False, False, False],
                                  [False, False, True, True, True], [False, False, True, False, False]],
                         ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_generic_backward_output_mask(mask, training, monkeypatch):
    """Every subset of gradients; without dx and dweight only the dz pass runs (no dz scratch,
    no gen_bwd_kernel)."""
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args((2, 5, 33, 40), 11, torch.float32, training, True, mask=mask))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((3, 2, 9, 13), 11), ((1, 2, 3, 263), 3), ((2, 3, 45, 70), 7)], ids=str)
def test_v2_generic_backward_dz_scratch_rows(shape, k, dtype, training, monkeypatch):
    """The dz scratch's rows padded to a multiple of 8 columns (W = 13, 263, 70: the padding
    columns hold 0 and the staging reads them as the zeros outside the image) and a row of more
    than 32 units (W = 263: one row per lane step in gen_dz_kernel)."""
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args(shape, k, dtype, training, True))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_generic_backward_no_bn_weight(training, monkeypatch):
    monkeypatch.setenv(SWITCH, "1")
    mask = (True, True, True, False, True)
    bargs = list(backward_args((2, 6, 20, 40), 13, torch.float32, training, True, mask=mask))
    bargs[4] = None
    backward_both(tuple(bargs))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_generic_backward_headline_like_shape(training, monkeypatch):
    """bf16, N=8, C=768, 64x64, k=7 (the float64 oracle on the GPU)."""
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args((8, 768, 64, 64), 7, torch.bfloat16, training, True), oracle_device="cuda")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v2_generic_backward_deterministic_and_agrees_with_v1(training, monkeypatch):
    """No atomics: two runs give the same bits; v1 (=0) agrees within the tolerance."""
    bargs = backward_args((3, 12, 40, 72), 15, torch.float32, training, True)
    monkeypatch.setenv(SWITCH, "1")
    first = kernel_backward(bargs)
    again = kernel_backward(bargs)
    for name, a, b in zip(GRAD_NAMES, first, again):
        assert torch.equal(a, b), name
    monkeypatch.setenv(SWITCH, "0")
    v1 = kernel_backward(bargs)
    for name, a, b in zip(GRAD_NAMES, first, v1):
        close(name, a, b, torch.float32)


def test_v2_generic_nan_propagates(monkeypatch):
    args = list(cuda_args((2, 4, 20, 40), 11, torch.float32, "nchw", False, True, "relu"))
    args[0] = args[0].clone()
    args[0][0, 3, 9, 20] = float("nan")
    forward_both(tuple(args))


# ---- generic path, channels_last outputs (issue 22 part 1) ----------------------------------
# Every channels_last call the templated channels_last kernels (dw_block_v2_cl*: k in {3, 5, 7,
# 9}, C % 4 == 0, 16-byte aligned) do not take runs the generic v2 kernels: x read through its
# strides, out / preact / dx written channels_last (docs/cuda-depthwise.md, "v2 generic path").
# (shape, k): generic k (11, 15) with C % 4 == 0 and != 0, C % 4 != 0 at k = 7 (the templated
# channels_last kernels' k), W > 32 and odd sizes.
GEN_CL_SHAPES = [((2, 8, 32, 32), 11), ((2, 6, 20, 24), 15), ((2, 6, 32, 32), 7), ((1, 3, 33, 40), 11),
                 ((2, 12, 17, 45), 15)]


def misaligned_cl(t):
    """The values of ``t`` in a channels_last-contiguous view whose data pointer is 2 elements past a
    16-byte boundary (not 16-byte aligned)."""
    n, c, h, w = t.shape
    base = torch.empty(t.numel() + 2, device=t.device, dtype=t.dtype)
    v = base[2:].view(n, h, w, c).permute(0, 3, 1, 2)
    v.copy_(t)
    assert v.is_contiguous(memory_format=torch.channels_last) and v.data_ptr() % 16 != 0
    return v


def w_slice_cl(t):
    """The values of ``t`` in a slice along W of a wider channels_last tensor (columns 1 .. W of
    W + 3: strides of channels_last, row pitch (W + 3) * C; neither layout is contiguous)."""
    n, c, h, w = t.shape
    base = torch.empty(n, c, h, w + 3, device=t.device, dtype=t.dtype).normal_()
    v = base.contiguous(memory_format=torch.channels_last)[..., 1:w + 1]
    v.copy_(t)
    assert not v.is_contiguous() and not v.is_contiguous(memory_format=torch.channels_last)
    return v


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "nosave"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", GEN_CL_SHAPES, ids=str)
def test_v2_generic_cl_forward_matches_reference(shape, k, dtype, save_preact, training):
    """channels_last x: out and preact channels_last (forward_both_cl checks the layout)."""
    forward_both_cl(cuda_args(shape, k, dtype, "channels_last", training, save_preact, "gelu"))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 6, 20, 24), 15), ((2, 6, 32, 32), 7)], ids=str)
def test_v2_generic_cl_forward_activations(shape, k, dtype, activation, training):
    forward_both_cl(cuda_args(shape, k, dtype, "channels_last", training, True, activation))


@pytest.mark.parametrize("view", ["misaligned", "w_slice"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 8, 32, 32), 9), ((1, 6, 17, 40), 11)], ids=str)
def test_v2_generic_cl_views_forward(shape, k, dtype, training, view):
    """A misaligned channels_last x (output channels_last) and a W slice of a channels_last tensor
    (output NCHW: output_format), k = 9 (the templated channels_last kernels' k) and 11."""
    args = list(cuda_args(shape, k, dtype, "channels_last", training, True))
    args[0] = misaligned_cl(args[0]) if view == "misaligned" else w_slice_cl(args[0])
    forward_both_cl(tuple(args))


@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", GEN_CL_SHAPES, ids=str)
def test_v2_generic_cl_backward_matches_reference(shape, k, dtype, training, save_preact, monkeypatch):
    """channels_last x, grad_out (and saved preact): dx channels_last."""
    monkeypatch.setenv(SWITCH, "1")
    got = backward_both(backward_args_cl(shape, k, dtype, training, save_preact))
    assert got[0].is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("activation", ["gelu_tanh", "relu"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_v2_generic_cl_backward_activations(dtype, training, activation, monkeypatch):
    monkeypatch.setenv(SWITCH, "1")
    backward_both(backward_args_cl((2, 6, 20, 24), 15, dtype, training, True, activation))


@pytest.mark.parametrize("view", ["misaligned", "w_slice"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 8, 32, 32), 9), ((1, 6, 17, 40), 11)], ids=str)
def test_v2_generic_cl_views_backward(shape, k, dtype, training, view, monkeypatch):
    """x, grad_out and the saved preact as misaligned channels_last views (dx channels_last) or W
    slices of channels_last tensors (dx NCHW)."""
    monkeypatch.setenv(SWITCH, "1")
    bargs = list(backward_args_cl(shape, k, dtype, training, True))
    make = misaligned_cl if view == "misaligned" else w_slice_cl
    for i in (0, 1, 7):
        bargs[i] = make(bargs[i])
    got = backward_both(tuple(bargs))
    assert got[0].is_contiguous(memory_format=output_memory_format(bargs[1]))
