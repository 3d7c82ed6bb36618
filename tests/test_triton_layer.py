"""The fused eval layer (convmixer_kernels/_triton/layer.py, op ``convmixer_kernels::layer_eval``)
against the two-op path (``functional.dw_block`` then ``pw_block``, backend triton) and the
float64 reference, under ``TRITON_INTERPRET=1`` on a machine without a GPU.

Shapes are tiny (the interpreter costs per program and per tap); they cover both
layouts and a strided view, float32/bfloat16/float16, every activation, k = 3, 5 and
one k > 9 (the run-time column loop), C_out below, equal to and above C, many tiles in
every GEMM dimension (forced small tiles), the int32 offset variant, NaN propagation,
the ``ConvMixerLayer`` route, bad input and ``torch.library.opcheck``.
"""
from __future__ import annotations

from unittest import mock

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels import backends, functional, reference
from convmixer_kernels.functional import layer_eval
from convmixer_kernels.modules import layer_blocker, layer_module_eval
from convmixer_kernels.ops import layer_eval_op

from conftest import assert_close_to_oracle, make_input, randomize_

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
_reason = backends.get("triton").unavailable("pw_block", torch.empty(1, 1, 1, 1, device=DEVICE))
pytestmark = pytest.mark.skipif(_reason is not None,
                                reason=f"triton backend unavailable: {_reason}")

# (N, C, C_out, H, W, k, activation, dtype, layout)
CASES = [
    (2, 8, 8, 5, 5, 3, "gelu", torch.float32, "nchw"),
    (2, 12, 20, 7, 6, 5, "relu", torch.float32, "channels_last"),
    (2, 9, 7, 6, 5, 3, "gelu_tanh", torch.float32, "strided"),
    (2, 24, 16, 9, 9, 11, "gelu_tanh", torch.bfloat16, "nchw"),
    (2, 8, 24, 6, 9, 5, "gelu", torch.bfloat16, "channels_last"),
    (1, 17, 5, 5, 7, 3, "relu", torch.float16, "channels_last"),
]


def make_args(N, C, COUT, H, W, k, dtype, layout):
    """Keyword arguments of ``layer_eval``: random weights, biases, BN affine and running
    statistics (never zeros or the defaults), BN parameters in float32 as modules hold
    them for a low-precision x under autocast-free inference."""
    def vec(n, lo, hi):
        return (torch.rand(n, dtype=torch.float64) * (hi - lo) + lo).float().to(DEVICE)

    x = make_input((N, C, H, W), dtype, layout, device=DEVICE)
    dw = (torch.randn(C, 1, k, k, dtype=torch.float64) / k).to(DEVICE, dtype)
    pw = (torch.randn(COUT, C, 1, 1, dtype=torch.float64) / C ** 0.5).to(DEVICE, dtype)
    return dict(x=x, dw_weight=dw, dw_bias=vec(C, -0.5, 0.5).to(dtype),
                bn1_weight=vec(C, 0.5, 1.5), bn1_bias=vec(C, -0.5, 0.5),
                bn1_mean=vec(C, -0.5, 0.5), bn1_var=vec(C, 0.5, 2.0),
                pw_weight=pw, pw_bias=vec(COUT, -0.5, 0.5).to(dtype),
                bn2_weight=vec(COUT, 0.5, 1.5), bn2_bias=vec(COUT, -0.5, 0.5),
                bn2_mean=vec(COUT, -0.5, 0.5), bn2_var=vec(COUT, 0.5, 2.0),
                eps1=1e-5, eps2=1e-3)


def two_op(a, act, backend="triton", cast=None):
    """dw_block then pw_block (functional API), optionally with every tensor cast."""
    a = {k: (v.to(cast) if cast is not None and isinstance(v, torch.Tensor) else v)
         for k, v in a.items()}
    y = functional.dw_block(a["x"], a["dw_weight"], a["dw_bias"], a["bn1_weight"],
                            a["bn1_bias"], a["bn1_mean"], a["bn1_var"], eps=a["eps1"],
                            activation=act, backend=backend)
    return functional.pw_block(y, a["pw_weight"], a["pw_bias"], a["bn2_weight"],
                               a["bn2_bias"], a["bn2_mean"], a["bn2_var"], eps=a["eps2"],
                               activation=act, backend=backend)


def stock(a, act, dtype):
    """The stock PyTorch composite (``convmixer_kernels.reference``'s blocks) in ``dtype``
    (BN parameters in float32 for the low-precision dtypes, as F.batch_norm takes them)."""
    def c(t, bn=False):
        return t.to(torch.float64 if dtype == torch.float64 else (torch.float32 if bn else dtype))
    y = reference.dw_block(c(a["x"]).cpu(), c(a["dw_weight"]).cpu(), c(a["dw_bias"]).cpu(),
                           c(a["bn1_weight"], True).cpu(), c(a["bn1_bias"], True).cpu(),
                           c(a["bn1_mean"], True).cpu(), c(a["bn1_var"], True).cpu(),
                           eps=a["eps1"], activation=act)
    return reference.pw_block(y.to(c(a["x"]).dtype), c(a["pw_weight"]).cpu(),
                              c(a["pw_bias"]).cpu(), c(a["bn2_weight"], True).cpu(),
                              c(a["bn2_bias"], True).cpu(), c(a["bn2_mean"], True).cpu(),
                              c(a["bn2_var"], True).cpu(), eps=a["eps2"], activation=act)


def run_fused(a, act):
    with torch.no_grad():
        return layer_eval(**a, act1=act, backend="triton")


def check_case(N, C, COUT, H, W, k, act, dtype, layout):
    a = make_args(N, C, COUT, H, W, k, dtype, layout)
    out = run_fused(a, act)
    assert out.shape == (N, COUT, H, W) and out.dtype == dtype
    assert out.is_contiguous(memory_format=torch.channels_last)  # layer_eval's default
    assert torch.isfinite(out).all()
    # the two-op path stores the same y: equal up to float32 summation order
    with torch.no_grad():
        ops2 = two_op(a, act)
    scale = max(ops2.abs().max().item(), 1.0)
    diff = (out.double() - ops2.double()).abs().max().item()
    tol = 1e-5 if dtype == torch.float32 else 2 * (2.0 ** -7 if dtype == torch.bfloat16
                                                  else 2.0 ** -10)
    print(f"fused vs two-op: max diff {diff:.3e} (scale {scale:.3e})")
    assert diff <= tol * scale, f"fused vs two-op: {diff:.3e} > {tol * scale:.3e}"
    # and the float64 reference, with the project's tolerance rule
    oracle = stock(a, act, torch.float64)
    lowp = None if dtype == torch.float32 else stock(a, act, dtype)
    assert_close_to_oracle(f"layer_eval {dtype} {layout} k={k} {act}", out.cpu(), oracle, lowp)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c[7]}-{c[8]}-k{c[5]}-{c[6]}")
def test_matches_two_op_path_and_reference(case):
    check_case(*case)


def small_tiles():
    from convmixer_kernels.backends.triton import layer
    cfg = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, GROUP_M=2, num_warps=4)
    return mock.patch.object(layer, "layer_config", lambda *a: dict(cfg))


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_many_tiles(layout):
    """4 row tiles (grouped order), 3 column tiles and 3 K steps, the last of each partial."""
    with small_tiles():
        check_case(2, 40, 36, 5, 6, 3, "gelu", torch.float32, layout)


def test_int32_offsets():
    """The int32 offset variant (what a GPU runs below 2**31 elements; the interpreter
    takes the int64 one by default) computes the same."""
    from convmixer_kernels.backends.triton import layer
    if layer.interpreting():
        a = make_args(1, 2, 2, 2, 2, 3, torch.float32, "nchw")
        assert layer.use_int64(a["x"], a["x"], 2)
    with mock.patch.object(layer, "use_int64", lambda *a: False):
        check_case(2, 12, 10, 6, 7, 5, "relu", torch.float32, "strided")


def test_nan_propagates_like_two_op_path():
    a = make_args(2, 8, 12, 5, 6, 3, torch.float32, "channels_last")
    a["x"] = a["x"].clone()
    a["x"][1, 2, 3, 4] = float("nan")
    out = run_fused(a, "gelu")
    with torch.no_grad():
        want = two_op(a, "gelu")
    assert torch.isnan(out).any()
    assert torch.equal(torch.isnan(out), torch.isnan(want))
    assert torch.equal(out.nan_to_num(), want.nan_to_num())


def test_absent_optional_parameters():
    """No biases, no BN affine: the reference computes the same."""
    a = make_args(2, 8, 12, 5, 5, 3, torch.float32, "nchw")
    for name in ("dw_bias", "bn1_weight", "bn1_bias", "pw_bias", "bn2_weight", "bn2_bias"):
        a[name] = None
    out = run_fused(a, "gelu")
    with torch.no_grad():
        want = layer_eval_op(a["x"], a["dw_weight"], None, None, None, a["bn1_mean"],
                             a["bn1_var"], a["eps1"], "gelu", a["pw_weight"], None, None, None,
                             a["bn2_mean"], a["bn2_var"], a["eps2"], "gelu", "channels_last",
                             "reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_two_activations():
    """act1 and act2 are independent constexprs."""
    a = make_args(2, 8, 8, 5, 5, 3, torch.float32, "nchw")
    with torch.no_grad():
        out = layer_eval(**a, act1="relu", act2="gelu_tanh")
        want = layer_eval(**a, act1="relu", act2="gelu_tanh", backend="reference")
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_conv_mixer_layer_route(layout):
    """A ConvMixerLayer in eval, no grad, triton: layer_module_eval == layer(x); the blocker
    names why training, grad mode or another backend are not fused."""
    layer = randomize_(ck.ConvMixerLayer(12, kernel_size=5, activation="gelu",
                                         backend="triton")).to(DEVICE).eval()
    x = make_input((2, 12, 6, 5), torch.float32, layout, device=DEVICE)
    with torch.no_grad():
        assert layer_blocker(layer, x) is None
        got, want = layer_module_eval(layer, x), layer(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert "grad" in layer_blocker(layer, x)  # parameters require grad, grad mode on
    with torch.no_grad():
        layer.train()
        assert "training" in layer_blocker(layer, x)
        layer.eval()
        ck.set_backend(layer, "reference")
        assert "reference" in layer_blocker(layer, x)


def test_fake_and_opcheck():
    a = make_args(2, 8, 12, 5, 6, 3, torch.float32, "channels_last")
    args = (a["x"], a["dw_weight"], a["dw_bias"], a["bn1_weight"], a["bn1_bias"], a["bn1_mean"],
            a["bn1_var"], 1e-5, "gelu", a["pw_weight"], a["pw_bias"], a["bn2_weight"],
            a["bn2_bias"], a["bn2_mean"], a["bn2_var"], 1e-3, "relu", "channels_last", "triton")
    torch.library.opcheck(layer_eval_op, args)  # schema, autograd registration, fake, aot
    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(t) if isinstance(t, torch.Tensor) else t for t in args]
        out = layer_eval_op(*fake)
    assert out.shape == (2, 12, 5, 6)
    assert out.is_contiguous(memory_format=torch.channels_last)


# ---- bad input ------------------------------------------------------------------------

def test_refuses_training_mode():
    a = make_args(1, 4, 4, 3, 3, 3, torch.float32, "nchw")
    with pytest.raises(ValueError, match="training: layer_eval is inference only"):
        layer_eval(**a, training=True)
    with pytest.raises(TypeError, match="training: expected a bool"):
        layer_eval(**a, training=1)


@pytest.mark.parametrize("name", ["x", "dw_weight", "bn2_bias"])
def test_refuses_inputs_requiring_grad(name):
    a = make_args(1, 4, 4, 3, 3, 3, torch.float32, "nchw")
    a[name] = a[name].detach().requires_grad_(True)
    with pytest.raises(ValueError, match=f"^{name}: requires grad"):
        layer_eval(**a)
    with torch.no_grad():  # parameters requiring grad are fine under no_grad
        layer_eval(**a)


@pytest.mark.parametrize("change,match", [
    (dict(pw_weight=torch.randn(4, 5, 1, 1)), "weight: expected 4 input channels"),
    (dict(pw_weight=torch.randn(4, 4, 3, 3)), "weight: expected a 1x1 weight"),
    (dict(dw_weight=torch.randn(4, 1, 2, 2)), "weight: depthwise kernel size must be odd"),
    (dict(bn1_mean=None), "bn1_mean: required"),
    (dict(bn2_var=torch.ones(3)), "running_var: expected shape"),
    (dict(eps2=float("nan")), "eps: expected a finite float"),
    (dict(x=torch.randn(4, 3, 3)), "x: expected a 4-D"),
    (dict(x=torch.randn(1, 4, 3, 3, dtype=torch.float64)), "weight: expected x's dtype"),
    (dict(backend="nope"), "backend: expected one of"),
    (dict(act1="silu"), "activation: expected one of"),
])
def test_bad_input(change, match):
    a = make_args(1, 4, 4, 3, 3, 3, torch.float32, "nchw")
    a.update({k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in change.items()})
    with pytest.raises((ValueError, TypeError), match=match):
        with torch.no_grad():
            layer_eval(**a)


def test_float64_needs_reference_backend():
    """The Triton kernels take fp32/bf16/fp16: float64 raises with the reason; the
    reference backend runs it."""
    a = {k: v.double() if isinstance(v, torch.Tensor) else v
         for k, v in make_args(1, 4, 4, 3, 3, 3, torch.float32, "nchw").items()}
    with pytest.raises(backends.BackendUnavailable, match="triton.*float32, bfloat16, float16"):
        layer_eval(**a, backend="triton")
    with torch.no_grad():
        out = layer_eval(**a, backend="reference")
    torch.testing.assert_close(out.cpu(), stock(a, "gelu", torch.float64), rtol=1e-12, atol=1e-12)


# ---- the benchmark provider -----------------------------------------------------------

def test_bench_provider_offered_for_gpu_layer_inference_only():
    from convmixer_kernels.tools.cases import LAYER_FUSION_PROVIDER, MODES, case_set, our_providers
    for device in ("cpu",) + (("cuda",) if torch.cuda.is_available() else ()):
        dev = torch.device(device)
        dtype = torch.bfloat16 if device == "cuda" else torch.float32
        for case in case_set(device, "ops", quick=True):
            for mode in (None,) + MODES:
                names = [p for p, _ in our_providers(case, dev, dtype, None, mode)]
                offered = LAYER_FUSION_PROVIDER in names
                assert len(names) == len(set(names)), names
                want = (device == "cuda" and case.op == "layer" and mode == "inference"
                        and "fused_triton" in names)
                assert offered == want, (device, case.op, mode, names)
    # on CPU not even when triton (the interpreter) is requested explicitly; without the
    # interpreter (a GPU machine) triton cannot run CPU tensors at all
    case = next(c for c in case_set("cpu", "ops", quick=True) if c.op == "layer")
    names = [p for p, _ in our_providers(case, torch.device("cpu"), torch.float32, ["triton"],
                                         "inference")]
    want = ["fused_triton", "fused_triton_cl"] if "triton" in ck.available_backends("cpu") else []
    assert names == want


def test_bench_provider_runs_the_fused_layer():
    """Built.provider('fused_triton_layer') runs the layer through layer_eval (a tiny case,
    here under the interpreter) and matches the two-op fused_triton provider."""
    import dataclasses

    from convmixer_kernels.tools import steps as _bench_steps
    from convmixer_kernels.tools.cases import LAYER_FUSION_PROVIDER, case_set
    case = next(c for c in case_set("cpu", "ops", quick=True) if c.op == "layer")
    case = dataclasses.replace(case, N=2, C_in=8, C_out=8, H=5, W=6, k=3)
    built = _bench_steps.build(case, torch.device(DEVICE), torch.float32, l2_bytes=1)
    calls = []
    real = _bench_steps.LayerFusion.forward

    def spy(self, x):
        calls.append(x.shape)
        return real(self, x)

    with mock.patch.object(_bench_steps.LayerFusion, "forward", spy):
        with built.provider(LAYER_FUSION_PROVIDER, "triton", "inference") as (step, forward):
            fused = forward()
            step()
    assert len(calls) == 2
    with built.provider("fused_triton", "triton", "inference") as (step, forward):
        two = forward()
    torch.testing.assert_close(fused, two, rtol=1e-5, atol=1e-5)
    with pytest.raises(RuntimeError, match="fused_triton_layer: the layer cannot run fused"):
        with built.provider(LAYER_FUSION_PROVIDER, "triton", "forward") as (step, forward):
            forward()


def test_proposed_forward_route_compiles_fullgraph():
    """The ConvMixerLayer.forward route (``layer_blocker`` then ``layer_module_eval``) traces
    with no graph break under torch.compile and gives the two-op result."""
    class Fusing(ck.ConvMixerLayer):
        def forward(self, x):
            if layer_blocker(self, x) is None:
                return layer_module_eval(self, x)
            return super().forward(x)

    layer = randomize_(Fusing(8, kernel_size=3, activation="relu", backend="triton"))
    layer = layer.to(DEVICE).eval()
    x = make_input((2, 8, 5, 5), torch.float32, "channels_last", device=DEVICE)
    with torch.no_grad():
        out = torch.compile(layer, fullgraph=True)(x)
        want = ck.ConvMixerLayer.forward(layer, x)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)


def test_layer_fusion_switch_routes_conv_mixer_layer():
    """``ConvMixerLayer.layer_fusion = True``: eval + no grad runs one layer_eval call and
    gives the two-op result; with grad mode it falls back to the two ops."""
    from convmixer_kernels import modules as layer_mod

    layer = randomize_(ck.ConvMixerLayer(8, kernel_size=3, backend="triton")).to(DEVICE).eval()
    x = make_input((2, 8, 5, 5), torch.float32, "nchw", device=DEVICE)
    with torch.no_grad():
        want = layer(x)
    layer.layer_fusion = True
    calls = []
    real = layer_mod.layer_module_eval
    with mock.patch.object(layer_mod, "layer_module_eval", lambda *a: calls.append(1) or real(*a)):
        with torch.no_grad():
            got = layer(x)
        assert len(calls) == 1
        layer(x)  # grad mode, parameters require grad: the two ops
        assert len(calls) == 1
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
