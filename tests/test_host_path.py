"""The modules' per-call host path (issue 20, part 5; docs/design.md "The per-call path").

* ``native`` route: the stock child modules' ATen calls made directly; bitwise the stock
  modules' outputs, running statistics, counters and gradients.
* eager-inference shortcut: from a signature's second call, eval + no grad runs the
  backend's kernel without the op's autograd/dispatch layers; bitwise the op's result, and
  never taken with grad enabled, under a dispatch mode or a tracer.
* a conv whose geometry was changed after construction runs the stock modules.
* ``backends.env_backend`` follows ``os.environ``.
* the functional API's eager autograd path (``ops.block.eager_ok``): bitwise the registered
  op's results and gradients, never under a dispatch mode or a tracer, no double backward.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import convmixer_kernels.functional as ck_functional
from convmixer_kernels import backends, modules
from convmixer_kernels.modules import DepthwiseBlock, PatchEmbed, PointwiseBlock

KERNEL_BACKENDS = [b for b in ("cpu", "reference") if b in backends.names()
                   and backends.get(b).unavailable("dw_block", torch.empty(1, 1, 1, 1)) is None]


def _make(kind: str, backend: str, activation: str = "gelu", momentum=0.1):
    torch.manual_seed(0)
    if kind == "dw":
        m, x = DepthwiseBlock(6, 3, activation, momentum=momentum, backend=backend), torch.randn(2, 6, 5, 5)
    elif kind == "pw":
        m, x = PointwiseBlock(6, 5, activation, momentum=momentum, backend=backend), torch.randn(2, 6, 4, 4)
    else:
        m, x = PatchEmbed(3, 6, 2, activation, momentum=momentum, backend=backend), torch.randn(2, 3, 8, 8)
    with torch.no_grad():  # non-trivial BatchNorm state
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        for bn in (mm for mm in m.modules() if isinstance(mm, nn.BatchNorm2d)):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
    return m, x


def _stock(m: nn.Module) -> nn.Module:
    if isinstance(m, DepthwiseBlock):
        seq = copy.deepcopy(m.fn)

        class Residual(nn.Module):
            def __init__(self):
                super().__init__()
                self.fn = seq

            def forward(self, x):
                return self.fn(x) + x

        return Residual()
    return nn.Sequential(*[copy.deepcopy(c) for c in m])


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = modules._run_inference

    def wrapped(*args, **kwargs):
        calls.append(args[0].name)
        return real(*args, **kwargs)

    monkeypatch.setattr(modules, "_run_inference", wrapped)
    return calls


# --- native route ------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["dw", "pw", "patch"])
@pytest.mark.parametrize("activation,momentum", [("gelu", 0.1), ("relu", None), ("gelu_tanh", 0.3)])
def test_native_route_is_the_stock_modules_bit_for_bit(kind, activation, momentum):
    m, x = _make(kind, "native", activation, momentum)
    if kind != "dw":
        m.memory_format = None  # the stock modules' own layout
    ref = _stock(m)
    for training in (True, False, True):
        m.train(training)
        ref.train(training)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = m(xa), ref(xb)
        assert torch.equal(ya, yb) and ya.stride() == yb.stride()
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        assert torch.equal(xa.grad, xb.grad)
        for (na, pa), (nb, pb) in zip(m.named_parameters(), ref.named_parameters()):
            assert torch.equal(pa.grad, pb.grad), na
        for (na, ba), (nb, bb) in zip(m.named_buffers(), ref.named_buffers()):
            assert torch.equal(ba, bb), na
        with torch.no_grad():
            assert torch.equal(m(x), ref(x))


def test_native_route_relu_inplace_and_eval_without_running_stats():
    m, x = _make("pw", "native", "relu")
    m.memory_format = None
    m[1].inplace = True
    m[2].track_running_stats = False
    m[2].running_mean = m[2].running_var = None
    ref = _stock(m)
    m.eval()
    ref.eval()
    with torch.no_grad():
        assert torch.equal(m(x), ref(x))


# --- eager-inference shortcut --------------------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["dw", "pw", "patch"])
def test_inference_shortcut_equals_the_op(kind, backend, spy):
    m, x = _make(kind, backend)
    m.eval()
    with torch.no_grad():
        first = m(x)  # the functional API: validates this signature
        assert spy == []
        second = m(x)  # the shortcut
    assert spy == [{"dw": "dw_block", "pw": "pw_block", "patch": "patch_embed"}[kind]]
    assert torch.equal(first, second) and first.stride() == second.stride()
    ref = _stock(m).eval()
    with torch.no_grad():
        torch.testing.assert_close(second, ref(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inference_shortcut_not_taken_with_grad(backend, spy):
    m, x = _make("pw", backend)
    m.eval()
    m[0].weight.requires_grad_(False)  # only BN's affine parameters train
    m[0].bias.requires_grad_(False)
    with torch.no_grad():
        m(x)
    y = m(x)  # grad enabled: BN weight and bias need gradients
    assert spy == [] and y.requires_grad
    y.sum().backward()
    assert m[2].weight.grad is not None and m[0].weight.grad is None


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_inference_shortcut_not_taken_under_a_dispatch_mode_or_tracer(backend, spy):
    m, x = _make("dw", backend)
    m.eval()
    with torch.no_grad():
        m(x)
        m(x)
        assert len(spy) == 1
        with _Recorder() as rec:
            m(x)
    assert len(spy) == 1
    assert any("convmixer_kernels.dw_block_forward" in op for op in rec.ops), rec.ops
    from torch.fx.experimental.proxy_tensor import make_fx

    def f(t):
        with torch.no_grad():
            return m(t)

    gm = make_fx(f)(x)
    assert len(spy) == 1
    assert "convmixer_kernels.dw_block_forward" in gm.code


# --- geometry changed after construction -------------------------------------------

@pytest.mark.parametrize("backend", KERNEL_BACKENDS + ["native"])
def test_changed_conv_geometry_runs_the_stock_modules(backend):
    m, x = _make("dw", backend)
    m.eval()
    m.fn[0].padding_mode = "reflect"
    with torch.no_grad():
        assert torch.equal(m(x), m.fn(x) + x)
    p, img = _make("patch", backend)
    p.eval()
    p.memory_format = None
    p[0].stride = (1, 1)  # overlapping patches: no longer a patch embedding
    with torch.no_grad():
        assert torch.equal(p(img), nn.Sequential(*p)(img))


# --- the environment variable ------------------------------------------------------

def test_env_backend_follows_os_environ(monkeypatch):
    monkeypatch.delenv(backends.ENV_VAR, raising=False)
    assert backends.env_backend() is None
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert backends.env_backend() == "reference" == os.environ[backends.ENV_VAR]
    monkeypatch.setenv(backends.ENV_VAR, "")
    assert backends.env_backend() == ""
    with pytest.raises(ValueError, match=backends.ENV_VAR):
        backends.requested(None)
    monkeypatch.delenv(backends.ENV_VAR)
    assert backends.env_backend() is None and backends.requested(None) == "auto"


# --- eager autograd path of the functional API ----------------------------------------

def _functional_args(kind):
    m, x = _make(kind, "cpu")
    conv, bn = (m.fn[0], m.fn[2]) if kind == "dw" else (m[0], m[2])
    return ({"dw": ck_functional.dw_block, "pw": ck_functional.pw_block,
             "patch": ck_functional.patch_embed}[kind], x, conv, bn)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("kind", ["dw", "pw", "patch"])
def test_eager_path_equals_the_registered_op(kind, backend, monkeypatch):
    """Forward, running statistics and every gradient bitwise the same through
    ``BlockOp.eager`` and through the registered op (``eager_ok`` forced off)."""
    fn, x, conv, bn = _functional_args(kind)
    results = []
    for eager in (True, False):
        monkeypatch.setattr(ck_functional, "eager_ok", lambda *t, e=eager: e)
        xs = x.clone().requires_grad_()
        ps = [t.detach().clone().requires_grad_() for t in (conv.weight, conv.bias, bn.weight, bn.bias)]
        rm, rv = bn.running_mean.clone(), bn.running_var.clone()
        out = fn(xs, *ps, rm, rv, training=True, backend=backend)
        out.backward(torch.ones_like(out) * 0.5 + 0.1 * torch.arange(out.numel()).view_as(out).sin())
        results.append([out, rm, rv, xs.grad, *(p.grad for p in ps)])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_eager_path_taken_only_outside_modes_and_tracers(monkeypatch):
    fn, x, conv, bn = _functional_args("pw")
    calls = []
    op = ck_functional.BLOCK_OPS["pw_block"]
    orig = op.eager.fast_apply
    monkeypatch.setattr(op.eager, "fast_apply", lambda *a: calls.append(1) or orig(*a))
    args = (conv.weight, conv.bias, bn.weight, bn.bias, bn.running_mean.clone(), bn.running_var.clone())
    fn(x.clone().requires_grad_(), *args, training=True, backend="cpu")
    assert calls == [1]
    with _Recorder() as rec:
        fn(x.clone().requires_grad_(), *args, training=True, backend="cpu")
    assert calls == [1] and any("convmixer_kernels.pw_block_forward" in o for o in rec.ops)
    from torch.fx.experimental.proxy_tensor import make_fx
    gm = make_fx(lambda t: fn(t, *args, training=False, backend="cpu"))(x)
    assert calls == [1] and "convmixer_kernels.pw_block_forward" in gm.code


def test_eager_path_refuses_double_backward():
    fn, x, conv, bn = _functional_args("dw")
    xs = x.clone().requires_grad_()
    out = fn(xs, conv.weight, conv.bias, bn.weight, bn.bias, training=True, backend="cpu")
    (g,) = torch.autograd.grad(out.square().sum(), xs, create_graph=True)
    with pytest.raises(RuntimeError):
        g.sum().backward()


# --- eager-training shortcut ---------------------------------------------------------

TRAIN_CASES = ["default", "momentum_none", "no_running_stats", "bn_eval", "frozen_conv",
               "image_input"]


def _configure(m, case):
    bn = m.fn[2] if isinstance(m, DepthwiseBlock) else m[2]
    conv = m.fn[0] if isinstance(m, DepthwiseBlock) else m[0]
    m.train(case != "bn_eval")
    if case == "momentum_none":
        bn.momentum = None
    elif case == "no_running_stats":
        bn.track_running_stats = False
    elif case == "frozen_conv":
        conv.weight.requires_grad_(False)
        conv.bias.requires_grad_(False)
    return conv, bn


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("case", TRAIN_CASES)
@pytest.mark.parametrize("kind", ["dw", "pw", "patch"])
def test_training_shortcut_equals_the_functional_path(kind, case, backend, monkeypatch):
    """From a signature's second call a training forward skips the functional API's checks
    and choice: outputs, every gradient, running statistics and counters bitwise what the
    functional path gives the same module, in every BatchNorm configuration."""
    taken = []
    real = modules._run_training
    monkeypatch.setattr(modules, "_run_training", lambda *a: taken.append(1) or real(*a))
    a, x = _make(kind, backend)
    b = copy.deepcopy(a)
    conv_a, bn_a = _configure(a, case)
    conv_b, bn_b = _configure(b, case)
    fn = {"dw": ck_functional.dw_block, "pw": ck_functional.pw_block,
          "patch": ck_functional.patch_embed}[kind]
    layout = {} if kind == "dw" else {"memory_format": a.memory_format}
    for step in range(3):
        xin = x + 0.1 * step
        xa, xb = xin.clone(), xin.clone()
        if case != "image_input":
            xa.requires_grad_(), xb.requires_grad_()
        ya = a(xa)
        act_b = b.fn[1] if kind == "dw" else b[1]
        yb = modules._run_functional(fn, xb, conv_b, act_b, bn_b, b, layout)
        assert torch.equal(ya, yb) and ya.stride() == yb.stride(), step
        g = torch.randn_like(ya)
        ya.backward(g)
        yb.backward(g)
        if case != "image_input":
            assert torch.equal(xa.grad, xb.grad)
        for (na, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
            assert (pa.grad is None) == (pb.grad is None), na
            assert pa.grad is None or torch.equal(pa.grad, pb.grad), na
        for (na, ba), (_, bb) in zip(a.named_buffers(), b.named_buffers()):
            assert torch.equal(ba, bb), na
    assert len(taken) == 2  # the first call of the signature validates


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_training_shortcut_validates_new_tensors_and_stays_off_under_modes(backend, monkeypatch):
    taken = []
    real = modules._run_training
    monkeypatch.setattr(modules, "_run_training", lambda *a: taken.append(1) or real(*a))
    m, x = _make("pw", backend)
    m.train()
    x.requires_grad_()
    m(x), m(x)
    assert len(taken) == 1
    m[0].weight = nn.Parameter(torch.randn(5, 7, 1, 1))  # not this input's channels
    with pytest.raises(ValueError, match="weight"):
        m(x)
    m[0].weight = nn.Parameter(torch.randn(5, 6, 1, 1))
    m(x)  # validated again
    assert len(taken) == 1
    m(x)
    assert len(taken) == 2
    with _Recorder() as rec:
        m(x)
    assert len(taken) == 2 and any("convmixer_kernels.pw_block_forward" in o for o in rec.ops)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert m(x).dtype == torch.bfloat16
    assert len(taken) == 2
    m.memory_saving = True  # set after the route was kept: the functional API's memory saving
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        m(x)
    assert len(taken) == 2 and tuple(x.shape[:1]) + (5,) + tuple(x.shape[2:]) not in saved
