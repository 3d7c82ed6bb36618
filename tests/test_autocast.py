"""The fused modules under ``torch.autocast`` behave like the stock modules under the
same autocast: the same output dtype, values and gradients within the low-precision rule
of docs/design.md (The tolerance rule) (error against the float64 oracle at most 2x the stock autocast
composite's, plus one ulp at the output scale), float32 parameter gradients and float32
running statistics. CPU bfloat16 always; CUDA float16/bfloat16 marked ``cuda``.
"""
from __future__ import annotations

import copy

import pytest
import torch

import convmixer_kernels as ck

from conftest import (assert_close_to_oracle, backends_under_test, eager_copy, grads_of,
                      has_cuda, randomize_)


def build(kind: str) -> tuple[torch.nn.Module, tuple[int, ...]]:
    if kind == "dw_block":
        return ck.DepthwiseBlock(6, 5), (2, 6, 7, 9)
    if kind == "pw_block":
        return ck.PointwiseBlock(6, 10, activation="relu"), (2, 6, 5, 7)
    if kind == "patch_embed":
        return ck.PatchEmbed(3, 8, 2), (2, 3, 9, 8)
    if kind == "layer":
        return ck.ConvMixerLayer(6, 3), (2, 6, 6, 5)
    return ck.ConvMixer(8, 2, kernel_size=3, patch_size=2, num_classes=5), (3, 3, 8, 8)


def assert_lowp_close(name, actual, oracle, lows, dtype):
    """The low-precision rule for ``dtype`` also where the result is float32 but carries
    ``dtype`` precision (parameter gradients, running statistics, a residual output):
    compared after rounding to ``dtype``."""
    assert_close_to_oracle(name, actual.to(dtype), oracle, [t.to(dtype) for t in lows])


def check_autocast(kind: str, backend: str, training: bool, device: str, dtype: torch.dtype):
    fused, shape = build(kind)
    fused = randomize_(fused).train(training)
    oracle = eager_copy(fused, torch.float64)          # float64, no autocast
    stock = eager_copy(fused, torch.float32).to(device)  # stock modules, same autocast
    refb = copy.deepcopy(fused).to(device)             # the reference backend, same autocast
    ck.set_backend(refb, "reference")
    fused = fused.to(device)
    ck.set_backend(fused, backend)

    x = torch.randn(shape, dtype=torch.float64)
    x64 = x.clone().requires_grad_()
    xs = [x.to(device, torch.float32).requires_grad_() for _ in range(3)]
    ref = oracle(x64)
    with torch.autocast(device, dtype=dtype):
        out, *lows = [m(xi) for m, xi in zip((fused, stock, refb), xs)]
    assert out.dtype == lows[0].dtype, f"output dtype {out.dtype} != stock {lows[0].dtype}"
    assert_lowp_close("out", out, ref, lows, dtype)

    g = torch.randn(ref.shape, dtype=torch.float64)
    ref.backward(g)
    for o in (out, *lows):
        o.backward(g.to(device, o.dtype))
    want = grads_of(oracle, x64)
    got, *low_grads = [grads_of(m, xi) for m, xi in zip((fused, stock, refb), xs)]
    for name in want:
        assert got[name] is not None, f"no gradient for {name}"
        assert got[name].dtype == low_grads[0][name].dtype == torch.float32, name
        assert_lowp_close(f"grad {name}", got[name], want[name], [lg[name] for lg in low_grads], dtype)
    for (name, buf), (_, ref_buf), (_, stock_buf), (_, refb_buf) in zip(
            fused.named_buffers(), oracle.named_buffers(), stock.named_buffers(),
            refb.named_buffers()):
        assert buf.dtype == stock_buf.dtype, name
        if buf.is_floating_point():
            assert_lowp_close(name, buf, ref_buf, [stock_buf, refb_buf], dtype)
        else:
            assert torch.equal(buf.cpu(), ref_buf), name


KINDS = ["dw_block", "pw_block", "patch_embed", "layer", "model"]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("backend", backends_under_test("cpu"))
def test_cpu_bf16_autocast(backend, kind, training):
    check_autocast(kind, backend, training, "cpu", torch.bfloat16)


def test_functional_autocast_casts_conv_inputs_only():
    """Like F.conv2d under autocast: x/weight/bias in the low dtype, BatchNorm's float32
    running statistics updated in float32; a residual output keeps x's dtype."""
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 1, 1, requires_grad=True)
    rm, rv = torch.zeros(6), torch.ones(6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ck.pw_block(x, w, None, None, None, rm, rv, training=True)
        z = ck.dw_block(x, torch.randn(4, 1, 3, 3), running_mean=torch.zeros(4),
                        running_var=torch.ones(4), training=False)
    assert y.dtype == torch.bfloat16 and z.dtype == torch.float32
    assert rm.dtype == rv.dtype == torch.float32 and rm.abs().sum() > 0
    y.float().sum().backward()
    assert w.grad.dtype == torch.float32
    # float64 is left alone by autocast (as stock conv does).
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y64 = ck.pw_block(x.double(), w.detach().double(), training=True)
    assert y64.dtype == torch.float64


# The ops each kind runs: a backend is tested on a kind only where it runs every one of
# them (the cuda backend has the depthwise block only).
OPS_OF = {"dw_block": ("dw_block",), "pw_block": ("pw_block",), "patch_embed": ("patch_embed",),
          "layer": ("dw_block", "pw_block"), "model": ("patch_embed", "dw_block", "pw_block")}
CUDA_CASES = [(b, kind) for kind in KINDS for b in backends_under_test("cuda", OPS_OF[kind][0])
              if all(b in backends_under_test("cuda", op) for op in OPS_OF[kind])] if has_cuda() \
    else [("none", "none")]


@pytest.mark.cuda
@pytest.mark.skipif(not has_cuda(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend,kind", CUDA_CASES)
def test_cuda_autocast(backend, kind, training, dtype):
    check_autocast(kind, backend, training, "cuda", dtype)
