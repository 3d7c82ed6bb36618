"""Output layout of the GEMM blocks (issue 5): ``pw_block`` and ``patch_embed`` write
channels_last by default, NCHW with ``memory_format=torch.contiguous_format`` and the
input's layout with ``torch.preserve_format``/None; ``dw_block`` follows its input.

For every backend that runs on the CPU here (reference, cpu, triton under the
interpreter: small shapes), every input layout (NCHW, channels_last, a strided view) and
every ``memory_format`` value: the output (and the saved pre-activation) is in the
requested layout and not merely in the other one, its values and the gradients match
the float64 oracle (docs/design.md (The tolerance rule), ``assert_close_to_oracle``), dx follows x's
layout, the fake and torch.compile give the eager layout, and a bad value raises a
ValueError naming the argument.
"""
from __future__ import annotations


import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import convmixer_kernels as ck
from convmixer_kernels import functional, reference
from convmixer_kernels.spec import out_memory_format, output_memory_format
from convmixer_kernels.ops import BLOCK_OPS

from conftest import (LAYOUTS, assert_close_to_oracle, backends_under_test, make_input,
                      stock_conv_layout)

OPS = ("pw_block", "patch_embed")
CASES = [(op, b) for op in OPS for b in backends_under_test("cpu", op)]
# memory_format values; "default" passes none
FORMATS = {"default": "default", "channels_last": torch.channels_last,
           "contiguous": torch.contiguous_format, "preserve": torch.preserve_format,
           "none": None}
CIN, COUT = 3, 6
# (N, Cin, H, W) and the kernel size: C > 1 and more than one output pixel, so the two
# layouts are different memory orders
SHAPES = {"pw_block": ((2, CIN, 5, 4), 1), "patch_embed": ((2, CIN, 7, 6), 2)}


def expected_format(fmt, x: torch.Tensor) -> torch.memory_format:
    if fmt == "default" or fmt is torch.channels_last:
        return torch.channels_last
    if fmt is torch.contiguous_format:
        return torch.contiguous_format
    return output_memory_format(x)  # preserve / None: x's layout (a strided view: NCHW)


def assert_layout(t: torch.Tensor, fmt: torch.memory_format, what: str = "out") -> None:
    other = (torch.contiguous_format if fmt == torch.channels_last else torch.channels_last)
    assert t.is_contiguous(memory_format=fmt), f"{what}: not {fmt}, strides {t.stride()}"
    assert not t.is_contiguous(memory_format=other), f"{what}: {other}, strides {t.stride()}"


def make_params(op: str, dtype=torch.float32):
    k = SHAPES[op][1]
    w = torch.randn(COUT, CIN, k, k, dtype=torch.float64) / (CIN * k * k) ** 0.5
    b = 0.5 * torch.randn(COUT, dtype=torch.float64)
    bw = torch.rand(COUT, dtype=torch.float64) + 0.5
    bb = torch.randn(COUT, dtype=torch.float64)
    rm, rv = 0.3 * torch.randn(COUT, dtype=torch.float64), torch.rand(COUT, dtype=torch.float64) + 0.5
    return [t.to(dtype) for t in (w, b, bw, bb)], [t.float() for t in (rm, rv)]


def call(op, x, params, stats, training, backend, fmt, **kw):
    fn = getattr(functional, op)
    fmt_kw = {} if fmt == "default" else {"memory_format": fmt}
    rm, rv = (t.clone() for t in stats)
    return fn(x, *params, rm, rv, training=training, backend=backend, **fmt_kw, **kw)


@pytest.mark.parametrize("fmt", list(FORMATS.values()), ids=list(FORMATS))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,backend", CASES)
def test_layout_values_and_gradients(op, backend, layout, fmt):
    """The requested layout, the oracle's values and gradients; dx in x's layout."""
    training = (LAYOUTS.index(layout) + list(FORMATS.values()).index(fmt)) % 2 == 0
    params, stats = make_params(op)
    x = make_input(SHAPES[op][0], torch.float32, layout, requires_grad=True)
    params = [p.requires_grad_() for p in params]
    out = call(op, x, params, stats, training, backend, fmt)
    want_fmt = expected_format(fmt, x)
    assert_layout(out, want_fmt)

    # oracle: the reference composite in float64; PyTorch's float32 run for the noise floor
    x64 = x.detach().double().requires_grad_()
    p64 = [p.detach().double().requires_grad_() for p in params]
    ref = getattr(reference, op)(x64, *p64, *(s.double() for s in stats), training=training)
    xl = x.detach().clone().requires_grad_()
    pl = [p.detach().clone().requires_grad_() for p in params]
    low = getattr(reference, op)(xl, *pl, *(s.clone() for s in stats), training=training)
    assert_close_to_oracle("out", out, ref, low)

    # grad_out in the layout the output is not in (autograd may hand any strides)
    other = torch.contiguous_format if want_fmt == torch.channels_last else torch.channels_last
    g = torch.randn(ref.shape, dtype=torch.float64)
    out.backward(g.float().contiguous(memory_format=other))
    ref.backward(g)
    low.backward(g.float())
    if layout == "strided":
        assert x.grad.is_contiguous()  # a view's dx is NCHW
    else:
        assert_layout(x.grad, output_memory_format(x), "dx")
    for name, got, want, lp in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"),
                                   (x, *params), (x64, *p64), (xl, *pl)):
        assert_close_to_oracle(name, got.grad, want.grad, lp.grad)


@pytest.mark.parametrize("fmt", ["channels_last", "contiguous"])
@pytest.mark.parametrize("op,backend", CASES)
def test_memory_saving_gradients(op, backend, fmt):
    """Without a saved pre-activation the backward recomputes it (in grad_out's layout,
    here the output's): the gradients are the same bits as with it saved."""
    params, stats = make_params(op)
    x = make_input(SHAPES[op][0], torch.float32, "nchw", requires_grad=True)
    grads = []
    for saving in (False, True):
        xs = x.detach().clone().requires_grad_()
        ps = [p.detach().clone().requires_grad_() for p in params]
        out = call(op, xs, ps, stats, True, backend, FORMATS[fmt], memory_saving=saving)
        assert_layout(out, out_memory_format(fmt))
        g = torch.linspace(-1, 1, out.numel()).view(out.shape)
        out.backward(g.contiguous(memory_format=out_memory_format(fmt)))
        grads.append([xs.grad, *(p.grad for p in ps)])
    for a, b in zip(*grads):  # the same bits (functional's memory_saving promise)
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("out_format", ["channels_last", "contiguous"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("op,backend", CASES)
def test_op_preact_and_fake_layout(op, backend, layout, out_format):
    """The registered op: out and the saved pre-activation in out_format's layout, and the
    fake (FakeTensorMode) gives the same layouts as the kernel."""
    params, stats = make_params(op)
    x = make_input(SHAPES[op][0], torch.float32, layout)
    fwd = BLOCK_OPS[op].forward
    args = (x, *params, *stats, True, 1e-5, "gelu", True, out_format, backend)
    out, mean, var, preact = fwd(*args)
    fmt = out_memory_format(out_format)
    assert_layout(out, fmt)
    assert_layout(preact, fmt, "preact")
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        f_out, _, _, f_pre = fwd(*fake)
    assert f_out.stride() == out.stride() and f_pre.stride() == preact.stride()


@pytest.mark.parametrize("fmt", ["default", "contiguous", "none"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("op", OPS)
def test_compile_fullgraph_layout(op, layout, fmt):
    """torch.compile(fullgraph=True) of the functional call gives the eager layout and values."""
    backend = "cpu" if "cpu" in backends_under_test("cpu", op) else "reference"
    torch._dynamo.reset()
    params, stats = make_params(op)
    x = make_input(SHAPES[op][0], torch.float32, layout)

    def f(x, w, b, bw, bb, rm, rv):
        kw = {} if fmt == "default" else {"memory_format": FORMATS[fmt]}
        return getattr(functional, op)(x, w, b, bw, bb, rm, rv, training=False,
                                       backend=backend, **kw)

    eager = f(x, *params, *stats)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(x, *params, *stats)
    assert_layout(eager, expected_format(FORMATS[fmt], x))
    assert compiled.stride() == eager.stride()
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("bad", [torch.channels_last_3d, "channels_last", 1, torch.strided])
@pytest.mark.parametrize("op", OPS)
def test_bad_memory_format(op, bad):
    params, stats = make_params(op)
    x = make_input(SHAPES[op][0], torch.float32, "nchw")
    with pytest.raises(ValueError, match="memory_format"):
        call(op, x, params, stats, False, "reference", bad)
    m = ck.PointwiseBlock(CIN, COUT) if op == "pw_block" else ck.PatchEmbed(CIN, COUT, 2)
    m.memory_format = bad
    with pytest.raises(ValueError, match="memory_format"):
        m(x)


@pytest.mark.parametrize("op,backend", CASES)
def test_op_rejects_bad_out_format(op, backend):
    params, stats = make_params(op)
    x = make_input(SHAPES[op][0], torch.float32, "nchw")
    with pytest.raises(ValueError, match="out_format"):
        BLOCK_OPS[op].forward(x, *params, *stats, True, 1e-5, "gelu", False, "nhwc", backend)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_dw_block_follows_its_input(layout):
    x = make_input((2, 4, 5, 6), torch.float32, layout)
    w = torch.randn(4, 1, 3, 3)
    for backend in backends_under_test("cpu", "dw_block"):
        out = functional.dw_block(x, w, training=True, backend=backend)
        assert out.is_contiguous(memory_format=output_memory_format(x))
    with pytest.raises(TypeError):
        functional.dw_block(x, w, memory_format=torch.channels_last)


def test_modules_memory_format():
    """PointwiseBlock/PatchEmbed/ConvMixerLayer default to the stock modules' layout with
    every backend (a converted model's layouts must not depend on what ``auto`` picked);
    the attribute changes it; ConvMixer(memory_format=...) sets it on its blocks, also
    later."""
    x = make_input((2, 4, 6, 6), torch.float32, "nchw")
    for m in (ck.PointwiseBlock(4, 5), ck.PatchEmbed(4, 5, 2), ck.ConvMixerLayer(4, 3)):
        m.eval()
        assert m.memory_format is None
        conv = m[1] if isinstance(m, ck.ConvMixerLayer) else m[0]  # (the depthwise block keeps x's layout)
        for backend in ("native", "reference", "cpu"):
            ck.set_backend(m, backend)
            for inp in (x, x.contiguous(memory_format=torch.channels_last)):
                with torch.no_grad():
                    assert_layout(m(inp), stock_conv_layout(inp, conv))
        ck.set_backend(m, "reference")
        m.memory_format = torch.channels_last
        assert_layout(m(x), torch.channels_last)
        m.memory_format = torch.contiguous_format
        assert_layout(m(x.contiguous(memory_format=torch.channels_last)), torch.contiguous_format)
        m.memory_format = None
        assert_layout(m(x), torch.contiguous_format)
        ck.set_backend(m, "native")  # set on the module: the stock path follows it too
        m.memory_format = torch.channels_last
        assert_layout(m(x), torch.channels_last)
    # a channels_last weight with an NCHW input: the stock conv writes channels_last (p > 1)
    for backend in ("native", "reference", "cpu"):
        m = ck.PatchEmbed(4, 5, 2).eval()
        m.to(memory_format=torch.channels_last)
        ck.set_backend(m, backend)
        assert stock_conv_layout(x, m[0]) == torch.channels_last
        with torch.no_grad():
            assert_layout(m(x), torch.channels_last)

    model = ck.ConvMixer(8, 2, kernel_size=3, patch_size=2, num_classes=3,
                         memory_format=torch.contiguous_format)
    blocks = [model.stem, *model.blocks]
    assert all(b.memory_format == torch.contiguous_format for b in blocks)
    model.memory_format = None
    assert all(b.memory_format is None for b in blocks)
    model.memory_format = torch.channels_last
    assert all(b.memory_format == torch.channels_last for b in blocks)
    with pytest.raises(ValueError, match="memory_format"):
        model.memory_format = torch.channels_last_3d


LAYER_BACKENDS = [b for b in ("triton", "reference")
                  if b == "reference" or "triton" in backends_under_test("cpu", "pw_block")]


@pytest.mark.parametrize("fmt", ["default", "contiguous", "none"])
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
@pytest.mark.parametrize("backend", LAYER_BACKENDS)
def test_layer_eval_layout(backend, layout, fmt):
    """The fused eval layer writes the pointwise block's layout (channels_last by default)
    and equals the two-op path."""
    from convmixer_kernels.functional import layer_eval
    c, k = 4, 3
    x = make_input((2, c, 5, 6), torch.float32, layout)
    dw = dict(dw_weight=torch.randn(c, 1, k, k), dw_bias=torch.randn(c),
              bn1_weight=torch.rand(c) + 0.5, bn1_bias=torch.randn(c),
              bn1_mean=torch.randn(c), bn1_var=torch.rand(c) + 0.5)
    (_, b, bw, bb), (rm, rv) = make_params("pw_block")
    w = torch.randn(COUT, c, 1, 1) / c ** 0.5
    kw = {} if fmt == "default" else {"memory_format": FORMATS[fmt]}
    with torch.no_grad():
        out = layer_eval(x, **dw, pw_weight=w, pw_bias=b, bn2_weight=bw, bn2_bias=bb,
                         bn2_mean=rm, bn2_var=rv, backend=backend, **kw)
        y = functional.dw_block(x, dw["dw_weight"], dw["dw_bias"], dw["bn1_weight"],
                                dw["bn1_bias"], dw["bn1_mean"], dw["bn1_var"],
                                backend="reference")
        want = functional.pw_block(y, w, b, bw, bb, rm, rv, backend="reference", **kw)
    assert_layout(out, expected_format(FORMATS[fmt], x))
    assert out.stride() == want.stride()
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="memory_format"):
        layer_eval(x, **dw, pw_weight=torch.randn(COUT, c, 1, 1), pw_bias=None, bn2_weight=None,
                   bn2_bias=None, bn2_mean=rm, bn2_var=rv, backend=backend,
                   memory_format=torch.channels_last_3d)


DW_CASES = [b for b in backends_under_test("cpu", "dw_block")]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("backend", DW_CASES)
def test_dw_block_preact_and_fake_layout(backend, layout, dtype):
    """dw_block: out follows x's layout; the saved pre-activation follows it too, except on
    the cpu backend in float32, which keeps it NCHW (``preact_format``); the fake gives the
    kernel's strides, and the backward from the saved pre-activation gives the same bits as
    the one that recomputes it (memory saving)."""
    c, k = 16, 3
    x = make_input((2, c, 5, 6), dtype, layout)
    w = (torch.randn(c, 1, k, k) / k).to(dtype)
    b, bw, bb = (torch.randn(c).to(dtype) for _ in range(3))
    rm, rv = torch.zeros(c), torch.ones(c)
    op = BLOCK_OPS["dw_block"]
    args = (x, w, b, bw, bb, rm, rv, True, 1e-5, "gelu", True, backend)
    out, mean, var, preact = op.forward(*args)
    fmt = output_memory_format(x)
    want = (torch.contiguous_format if backend == "cpu" and dtype == torch.float32 else fmt)
    assert out.is_contiguous(memory_format=fmt), f"out strides {out.stride()}"
    assert preact.is_contiguous(memory_format=want), f"preact strides {preact.stride()}, expected {want}"
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
        f_out, _, _, f_pre = op.forward(*fake)
    assert f_out.stride() == out.stride() and f_pre.stride() == preact.stride()
    g = torch.randn_like(out)
    mask = [True] * 5
    saved = op.backward(g, x, w, b, bw, mean, var, preact, True, 1e-5, "gelu", mask, backend)
    recomputed = op.backward(g, x, w, b, bw, mean, var, x.new_empty(0), True, 1e-5, "gelu", mask, backend)
    for name, s, r in zip(("dx", "dweight", "dbias", "dbn_weight", "dbn_bias"), saved, recomputed):
        torch.testing.assert_close(s, r, rtol=0, atol=0, msg=lambda m: f"{name}: {m}")
