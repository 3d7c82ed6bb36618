"""The CUDA depthwise-block kernels (cuda backend, csrc/cuda/dw_block.cu).

On any machine: the extension built with its CUDA sources has CUDA kernels registered
for the kernel ops, and the block op's fake (shape) path runs for the cuda backend on
fake cuda tensors. On a GPU (marked ``cuda``): forward and backward against the
reference backend over shapes, kernel sizes (unrolled and run-time k), dtypes, layouts,
train/eval, saved/recomputed pre-activation and output masks, and bitwise run-to-run
determinism."""
from __future__ import annotations

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import _cpp_lib, reference
from convmixer_kernels.spec import DW_BLOCK, output_memory_format

from conftest import assert_close_to_oracle, has_cuda, make_input

KERNEL_OPS = ("convmixer_kernels::dw_block_forward_kernel", "convmixer_kernels::dw_block_backward_kernel")
needs_cuda_build = pytest.mark.skipif(not _cpp_lib.has_cuda_kernels(),
                                      reason=f"extension not built with CUDA kernels: {_cpp_lib.status()}")
needs_gpu = pytest.mark.skipif(not has_cuda() or not _cpp_lib.has_cuda_kernels(),
                               reason="needs a CUDA GPU and the CUDA kernels")

# Relative to the output scale (max |reference|), as tests/test_cpu_dw_block.py.
TOL = {torch.float32: 5e-5, torch.bfloat16: 1e-2, torch.float16: 2e-3}


@needs_cuda_build
@pytest.mark.parametrize("name", KERNEL_OPS)
def test_cuda_kernel_registered(name):
    _cpp_lib.load()
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(name, "CPU")


@needs_cuda_build
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fake_cuda_tensors(layout, training):
    """The registered op's shape path for backend="cuda": no kernel runs, no GPU needed."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    ops = torch.ops.convmixer_kernels
    with FakeTensorMode():
        x = torch.empty(2, 12, 9, 7, device="cuda", dtype=torch.bfloat16)
        if layout == "channels_last":
            x = x.contiguous(memory_format=torch.channels_last)
        w = torch.empty(12, 1, 9, 9, device="cuda", dtype=torch.bfloat16)
        b, bnw, bnb = (torch.empty(12, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        rm = rv = None if training else torch.empty(12, device="cuda")
        out, mean, var, preact = ops.dw_block_forward(x, w, b, bnw, bnb, rm, rv, training, 1e-5,
                                                      "gelu", True, "cuda")
        assert out.device.type == "cuda" and out.shape == x.shape and out.dtype == x.dtype
        assert out.is_contiguous(memory_format=output_memory_format(x))
        assert mean.shape == var.shape == (12,) and mean.dtype == torch.float32
        assert preact.shape == x.shape
        grads = ops.dw_block_backward(torch.empty_like(out), x, w, b, bnw, mean, var, preact,
                                      training, 1e-5, "gelu", [True, True, True, True, False], "cuda")
        dx, dw, db, dbnw, dbnb = grads
        assert dx.shape == x.shape and dx.device.type == "cuda"
        assert dw.shape == w.shape and db.shape == (12,) and dbnw.shape == (12,)
        assert dbnb.numel() == 0


# ---- on a GPU ----------------------------------------------------------------------------

def cuda_args(shape, k, dtype, layout, training, save_preact, activation="gelu"):
    n, c, h, w = shape
    dev = "cuda"
    x = make_input(shape, dtype, layout, device=dev)
    wt = (torch.randn(c, 1, k, k) / k).to(dev, dtype)
    b = torch.randn(c).to(dev, dtype)
    bw, bb = (torch.rand(c) + 0.5).to(dev), torch.randn(c).to(dev)
    rm, rv = (None, None) if training else ((torch.randn(c)).to(dev), (torch.rand(c) + 0.5).to(dev))
    return (x, wt, b, bw, bb, rm, rv, training, 1e-5, activation, save_preact)


def close(name, got, want, dtype):
    assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape} {got.dtype}"
    if want.numel() == 0:
        return
    assert torch.equal(torch.isnan(got), torch.isnan(want)), f"{name}: NaN pattern differs"
    scale = want.float().nan_to_num().abs().max().item() + 1e-12
    err = (got.float() - want.float()).nan_to_num().abs().max().item()
    print(f"{name}: err={err:.3e} scale={scale:.3e}")
    assert err <= TOL[dtype] * max(scale, 1.0), f"{name}: {err:.3e} > {TOL[dtype]} x {scale:.3e}"


def to_oracle(args):
    """The arguments on the CPU in float64 (docs/design.md (The tolerance rule): the error measure's oracle)."""
    return tuple(a.detach().cpu().double() if torch.is_tensor(a) and a.is_floating_point() else a
                 for a in args)


def check(name, got, want, dtype, oracle=None):
    """float32: the docs/design.md (The tolerance rule) rule against the float64 oracle, with the reference
    backend's own float32 result as PyTorch's rounding noise (BatchNorm over a few values
    cancels large terms in the bias gradient, an error every float32 implementation has).
    Half precisions, and results with NaN (whose pattern ``close`` compares): against the
    reference run in the same dtype (TOL)."""
    if oracle is None or torch.isnan(want).any():
        close(name, got, want, dtype)
    else:
        assert got.shape == want.shape and got.dtype == want.dtype, f"{name}: {got.shape} {got.dtype}"
        assert_close_to_oracle(name, got, oracle, lowp=want)


def run_both(args, activation, mask=(True,) * 5):
    cuda = ck.backends.get("cuda")
    got = cuda.block_forward(DW_BLOCK, *args)
    want = reference.forward(DW_BLOCK, *args)
    dtype = args[0].dtype
    exact = dtype == torch.float32
    oracle = reference.forward(DW_BLOCK, *to_oracle(args)) if exact else (None,) * 4
    for name, g, w, o in zip(("out", "mean", "var", "preact"), got, want, oracle):
        check(name, g, w, dtype, o)
    assert got[0].is_contiguous(memory_format=output_memory_format(args[0]))
    out, mean, var, preact = want
    layout = "channels_last" if args[0].is_contiguous() else "nchw"
    grad = make_input(tuple(out.shape), dtype, layout, device="cuda")
    bargs = (grad, args[0], args[1], args[2], args[3], mean, var, preact, args[7], 1e-5, activation,
             list(mask))
    got_b = cuda.block_backward(DW_BLOCK, *bargs)
    want_b = reference.backward(DW_BLOCK, *bargs)
    oracle_b = reference.backward(DW_BLOCK, *to_oracle(bargs)) if exact else (None,) * 5
    for name, m, g, w, o in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"), mask, got_b,
                                want_b, oracle_b):
        assert (g.numel() > 0) == bool(m), name
        check(name, g, w, dtype, o if o is None or o.numel() else None)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh", "relu"])
@pytest.mark.parametrize("save_preact", [True, False], ids=["saved", "recomputed"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shape,k", [((2, 19, 9, 13), 5), ((1, 3, 32, 32), 3), ((2, 17, 33, 5), 9),
                                     ((3, 8, 1, 1), 7), ((2, 9, 17, 21), 11), ((1, 5, 40, 37), 31),
                                     ((2, 24, 16, 16), 13)], ids=str)
def test_matches_reference(shape, k, dtype, layout, training, save_preact, activation):
    args = cuda_args(shape, k, dtype, layout, training, save_preact, activation)
    run_both(args, activation)


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("mask", [[True, False, False, False, False], [False, True, True, False, False],
                                  [False, False, False, True, True], [True, True, False, True, False],
                                  [False] * 5])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_output_mask(mask, training):
    args = cuda_args((2, 10, 12, 11), 7, torch.float32, "nchw", training, False)
    run_both(args, "gelu", mask)


@pytest.mark.cuda
@needs_gpu
def test_nan_propagates():
    args = list(cuda_args((2, 8, 10, 10), 5, torch.float32, "nchw", False, True))
    args[0] = args[0].clone()
    args[0][0, 3, 4, 4] = float("nan")
    run_both(tuple(args), "relu")


@pytest.mark.cuda
@needs_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_bitwise_deterministic(dtype, layout):
    """No atomics: every partial sum is reduced in a fixed order."""
    cuda = ck.backends.get("cuda")
    args = cuda_args((8, 96, 32, 32), 9, dtype, layout, True, False)
    out, mean, var, preact = cuda.block_forward(DW_BLOCK, *args)
    grad = torch.randn_like(out)
    bargs = (grad, *args[:4], mean, var, preact, True, 1e-5, "gelu", [True] * 5)
    first = cuda.block_forward(DW_BLOCK, *args) + cuda.block_backward(DW_BLOCK, *bargs)
    for _ in range(3):
        again = cuda.block_forward(DW_BLOCK, *args) + cuda.block_backward(DW_BLOCK, *bargs)
        for a, b in zip(first, again):
            assert torch.equal(a, b)


@pytest.mark.cuda
@needs_gpu
def test_rejects_what_it_cannot_run():
    cuda = ck.backends.get("cuda")
    x = torch.randn(2, 4, 8, 8, device="cuda", dtype=torch.float64)
    w = torch.randn(4, 1, 3, 3, device="cuda", dtype=torch.float64)
    with pytest.raises(RuntimeError, match="float32, bfloat16 or float16"):
        cuda.block_forward(DW_BLOCK, x, w, None, None, None, None, None, True, 1e-5, "gelu", False)
    with pytest.raises(RuntimeError, match="activation must be one of"):
        cuda.block_forward(DW_BLOCK, x.float(), w.float(), None, None, None, None, None, True, 1e-5, "tanh", False)
    with pytest.raises(RuntimeError, match="k odd"):
        cuda.block_forward(DW_BLOCK, x.float(), torch.randn(4, 1, 4, 4, device="cuda"), None, None, None, None,
                     None, True, 1e-5, "gelu", False)


def test_sanitize_driver_runs_on_the_cpu_backend():
    """scripts/cuda_sanitize.py (compute-sanitizer's driver on a GPU) runs its cases and checks
    them against the reference; on the cpu backend it runs anywhere, so it cannot rot."""
    import pathlib
    import subprocess
    import sys

    script = pathlib.Path(__file__).resolve().parents[1] / "scripts" / "cuda_sanitize.py"
    r = subprocess.run([sys.executable, str(script), "--backend", "cpu", "--quick"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "108 forward+backward cases, 0 mismatches" in r.stdout
