"""BatchNorm semantics, the reference composites, gradcheck and opcheck."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convmixer_kernels as ck
from convmixer_kernels import reference
from convmixer_kernels.ops import BLOCK_OPS

from conftest import backends_under_test, eager_copy, make_input, randomize_

OPS = ("dw_block", "pw_block", "patch_embed")
# (op, backend) pairs that run float32 / float64 inputs in this build
F32 = [(op, b) for op in OPS for b in backends_under_test("cpu", op)]
F64 = [(op, b) for op in OPS for b in backends_under_test("cpu", op, torch.float64)]


def module_for(op: str, **bn) -> nn.Module:
    if op == "dw_block":
        m = ck.DepthwiseBlock(4, 3)
        bn_mod = m.fn[2]
    elif op == "pw_block":
        m = ck.PointwiseBlock(4, 6)
        bn_mod = m[2]
    else:
        m = ck.PatchEmbed(4, 6, 2)
        bn_mod = m[2]
    if bn:
        new = nn.BatchNorm2d(bn_mod.num_features, **bn)
        if op == "dw_block":
            m.fn[2] = new
        else:
            m[2] = new
    return randomize_(m)


BN_CONFIGS = [
    {}, {"momentum": None}, {"momentum": 0.3, "eps": 1e-3}, {"affine": False},
    {"track_running_stats": False},
]


@pytest.mark.parametrize("bn", BN_CONFIGS, ids=str)
@pytest.mark.parametrize("op,backend", F32)
def test_batchnorm_bookkeeping_matches_nn(op, bn, backend):
    """Several train steps then eval: outputs, running stats and num_batches_tracked as nn's
    (float32 kernels compared with the stock modules in float64)."""
    fused = module_for(op, **bn)
    fused.backend = backend
    stock = eager_copy(fused, torch.float64)
    tol = {"rtol": 1e-5, "atol": 1e-5}
    for step in range(3):
        x = make_input((3, 4, 6, 5), torch.float32, "nchw")
        torch.testing.assert_close(fused.train()(x).double(), stock.train()(x.double()), **tol)
    for (name, a), (_, b) in zip(fused.named_buffers(), stock.named_buffers()):
        torch.testing.assert_close(a.to(b.dtype), b, msg=name, **tol)
    x = make_input((2, 4, 6, 5), torch.float32, "nchw")
    torch.testing.assert_close(fused.eval()(x).double(), stock.eval()(x.double()), **tol)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("op,backend", F64)
def test_functional_matches_reference_composite(op, training, backend):
    """ck.<op> equals reference.<op> (the F.conv2d/act/F.batch_norm lines), running stats included."""
    cin, cout, k = 5, 5 if op == "dw_block" else 7, {"dw_block": 5, "pw_block": 1, "patch_embed": 3}[op]
    x = torch.randn(2, cin, 9, 8, dtype=torch.float64)
    w = torch.randn(cout, 1 if op == "dw_block" else cin, k, k, dtype=torch.float64)
    b, bw, bb = (torch.randn(cout, dtype=torch.float64) for _ in range(3))
    rm, rv = torch.randn(cout, dtype=torch.float64), torch.rand(cout, dtype=torch.float64) + 0.5
    rm2, rv2 = rm.clone(), rv.clone()
    got = getattr(ck, op)(x, w, b, bw, bb, rm, rv, training, 0.2, 1e-4, "gelu_tanh", backend=backend)
    want = getattr(reference, op)(x, w, b, bw, bb, rm2, rv2, training, 0.2, 1e-4, "gelu_tanh")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(rm, rm2)
    torch.testing.assert_close(rv, rv2)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op,backend", F64)
def test_gradcheck_float64(op, training, backend):
    cin, cout = 3, 3 if op == "dw_block" else 4
    k = {"dw_block": 3, "pw_block": 1, "patch_embed": 2}[op]
    x = torch.randn(2, cin, 4, 5, dtype=torch.float64, requires_grad=True)
    params = [torch.randn(cout, 1 if op == "dw_block" else cin, k, k, dtype=torch.float64)] + [
        torch.randn(cout, dtype=torch.float64) for _ in range(3)]
    params = [p.requires_grad_() for p in params]
    rm, rv = torch.randn(cout, dtype=torch.float64), torch.rand(cout, dtype=torch.float64) + 0.5
    fn = getattr(ck, op)

    def f(x, w, b, bw, bb):
        return fn(x, w, b, bw, bb, rm.clone(), rv.clone(), training, 0.1, 1e-3, "gelu", backend=backend)

    assert torch.autograd.gradcheck(f, (x, *params))


def _sample_args(op: str, training: bool, layout: str, save_preact: bool, with_bias: bool):
    cin, cout = 3, 3 if op == "dw_block" else 5
    k = {"dw_block": 5, "pw_block": 1, "patch_embed": 2}[op]
    x = make_input((2, cin, 6, 7), torch.float32, layout)
    w = torch.randn(cout, 1 if op == "dw_block" else cin, k, k)
    b = torch.randn(cout) if with_bias else None
    bw, bb = torch.rand(cout) + 0.5, torch.randn(cout)
    rm, rv = (None, None) if training else (torch.randn(cout), torch.rand(cout) + 0.5)
    return x, w, b, bw, bb, rm, rv, training, 1e-5, "gelu", save_preact


@pytest.mark.parametrize("case", [(True, "nchw", True, True), (False, "channels_last", False, True),
                                  (True, "strided", False, False), (False, "nchw", True, False)],
                         ids=str)
@pytest.mark.parametrize("op,backend", F32)
def test_opcheck(op, case, backend):
    training, layout, save_preact, with_bias = case
    args = _sample_args(op, training, layout, save_preact, with_bias)
    fwd = BLOCK_OPS[op].forward
    x, w, b, bw, bb = (t.requires_grad_() if t is not None else None for t in args[:5])
    # the GEMM blocks' out_format: the layout the input is not in (strided: channels_last)
    fmt = BLOCK_OPS[op].fmt_args("contiguous" if layout == "channels_last" else "channels_last")
    fwd_args = (x, w, b, bw, bb, *args[5:], *fmt, backend)
    torch.library.opcheck(fwd, fwd_args)
    out, mean, var, preact = fwd(*(a.detach() if isinstance(a, torch.Tensor) else a for a in fwd_args))
    bwd_args = (torch.randn_like(out), x.detach(), w.detach(), None if b is None else b.detach(),
                bw.detach(), mean, var, preact, training, 1e-5, "gelu",
                [True, True, with_bias, True, False], backend)
    torch.library.opcheck(BLOCK_OPS[op].backward, bwd_args)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_compile_fullgraph_convmixer_layer(training):
    """torch.compile traces a ConvMixerLayer with no graph break; same results as eager."""
    torch._dynamo.reset()
    # the cpu kernels: auto under torch.compile does not run the stock path (see
    # backends._resolve_constant), so eager auto and compiled auto may differ in backend
    layer = randomize_(ck.ConvMixerLayer(8, 5, backend="cpu")).train(training)
    ref = copy.deepcopy(layer)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 8, 7, 6, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    out, want = compiled(x), ref(x2)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    out.backward(g)
    want.backward(g)
    torch.testing.assert_close(x.grad, x2.grad)
    for (name, p), (_, q) in zip(layer.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, p), (_, q) in zip(layer.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(p, q, msg=name)


def test_compile_inductor_eval():
    """The default (inductor) backend compiles the eval path with no graph break."""
    torch._dynamo.reset()
    layer = randomize_(ck.ConvMixerLayer(4, 3)).eval()
    x = torch.randn(1, 4, 5, 5)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(layer, fullgraph=True)(x), layer(x))


def test_no_grad_saves_no_preact():
    """Inference does not store the pre-activation for backward."""
    x, w, b, bw, bb, *_ = _sample_args("dw_block", True, "nchw", False, True)
    with torch.no_grad():
        _, _, _, preact = BLOCK_OPS["dw_block"].forward(x, w, b, bw, bb, None, None, True, 1e-5,
                                                        "gelu", False, "reference")
    assert preact.numel() == 0


@pytest.mark.parametrize("op,backend", F32)
def test_backward_fills_no_zero_gradients(op, backend):
    """The block's mean, var and preact outputs carry no gradient: autograd hands the
    backward None for them instead of a zero tensor (preact's as large as the output)."""
    from torch.profiler import ProfilerActivity, profile

    x, w, b, bw, bb, rm, rv, *rest = _sample_args(op, True, "nchw", True, True)
    x, w, b, bw, bb = (t.requires_grad_() for t in (x, w, b, bw, bb))
    fwd = BLOCK_OPS[op].forward
    fmt = BLOCK_OPS[op].fmt_args("contiguous")
    out, mean, var, preact = fwd(x, w, b, bw, bb, rm, rv, *rest, *fmt, backend)
    assert preact.shape == out.shape
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out.backward(torch.randn_like(out))
    big = [e for e in prof.events() if e.name in ("aten::zeros", "aten::zero_", "aten::fill_",
                                                  "aten::zeros_like")
           and any(list(s) == list(out.shape) for s in e.input_shapes)]
    assert not big, [(e.name, e.input_shapes) for e in big]
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("op,backend", F32)
def test_unused_output_gives_no_gradient(op, backend):
    """A loss on the statistics alone (the output unused) runs and gives no gradient:
    the statistics and the saved pre-activation are not differentiable outputs."""
    x, w, b, bw, bb, rm, rv, *rest = _sample_args(op, True, "nchw", True, True)
    x, w = x.requires_grad_(), w.requires_grad_()
    fwd = BLOCK_OPS[op].forward
    out, mean, var, preact = fwd(x, w, b, bw, bb, rm, rv, *rest, *BLOCK_OPS[op].fmt_args("contiguous"),
                                 backend)
    (mean.sum() + var.sum() + preact.sum()).backward()
    assert x.grad is None and w.grad is None


F32_ONLY = [(op, b) for op, b in F32 if (op, b) not in F64]


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("op,backend", F32_ONLY)
def test_directional_finite_differences_float32(op, training, backend):
    """For backends without float64 kernels: <grad, v> equals the central difference of
    <out, g> along a random direction v of every input, in float32."""
    cin, cout = 3, 3 if op == "dw_block" else 4
    k = {"dw_block": 3, "pw_block": 1, "patch_embed": 2}[op]
    inputs = [torch.randn(2, cin, 6, 5), torch.randn(cout, 1 if op == "dw_block" else cin, k, k)] + [
        torch.randn(cout) for _ in range(3)]
    rm, rv = torch.randn(cout), torch.rand(cout) + 0.5
    fn = getattr(ck, op)

    def f(*ts):
        return fn(*ts, rm.clone(), rv.clone(), training, 0.1, 1e-3, "gelu", backend=backend)

    # g drawn by shape, not randn_like: the draw must not depend on the output's layout
    # (the central difference's own error depends on it; 4% for one channels_last draw)
    g = torch.randn(f(*inputs).shape)
    leaves = [t.clone().requires_grad_() for t in inputs]
    grads = torch.autograd.grad((f(*leaves) * g).sum(), leaves)
    for idx, (t, grad) in enumerate(zip(inputs, grads)):
        v = torch.randn_like(t)
        eps = 1e-2
        plus = [u + eps * v if j == idx else u for j, u in enumerate(inputs)]
        minus = [u - eps * v if j == idx else u for j, u in enumerate(inputs)]
        numeric = ((f(*plus) - f(*minus)) * g).sum().double() / (2 * eps)
        analytic = (grad * v).sum().double()
        print(f"input {idx}: analytic={analytic:.5f} numeric={numeric:.5f}")
        assert abs(analytic - numeric) <= 2e-2 * max(1.0, abs(numeric)), idx
