"""Every bad input of docs/design.md (Bad input) gets a clear error naming the argument."""
from __future__ import annotations

import math

import pytest
import torch

import convmixer_kernels as ck

from conftest import backends_under_test


def good(op: str) -> dict:
    c, cout = 4, 4 if op == "dw_block" else 6
    k = {"dw_block": 3, "pw_block": 1, "patch_embed": 2}[op]
    return dict(x=torch.randn(2, c, 6, 6), weight=torch.randn(cout, 1 if op == "dw_block" else c, k, k),
                bias=torch.randn(cout), bn_weight=torch.rand(cout), bn_bias=torch.randn(cout),
                running_mean=torch.zeros(cout) + 0.1, running_var=torch.ones(cout), training=True,
                momentum=0.1, eps=1e-5, activation="gelu")


def with_(op: str, **changes) -> dict:
    kw = good(op)
    kw.update(changes)
    return kw


OPS = ["dw_block", "pw_block", "patch_embed"]
CASES = [
    # (ops, id, changes-builder, exception, message fragment)
    (OPS, "x rank 3", lambda kw: {"x": kw["x"][0]}, ValueError, "x: expected a 4-D"),
    (OPS, "x int", lambda kw: {"x": kw["x"].long()}, TypeError, "x: expected a floating-point"),
    (OPS, "x not a tensor", lambda kw: {"x": kw["x"].tolist()}, TypeError, "x: expected a torch.Tensor"),
    (OPS, "H=0", lambda kw: {"x": kw["x"][:, :, :0]}, ValueError, "x: C, H and W must be >= 1"),
    (OPS, "x nested", lambda kw: {"x": torch.nested.nested_tensor(list(kw["x"]))}, TypeError, "x: expected a dense .* nested"),
    (OPS, "x sparse", lambda kw: {"x": kw["x"].to_sparse()}, TypeError, "x: expected a dense .* layout torch.sparse_coo"),
    (OPS, "x mkldnn", lambda kw: {"x": kw["x"].to_mkldnn()}, TypeError, "x: expected a dense .* layout torch._mkldnn"),
    (OPS, "x quantized", lambda kw: {"x": torch.quantize_per_tensor(kw["x"], 0.1, 0, torch.quint8)}, TypeError, "x: expected a floating-point tensor, got a quantized"),
    (OPS, "weight sparse", lambda kw: {"weight": kw["weight"].to_sparse()}, TypeError, "weight: expected a dense"),
    (OPS, "running_mean requires grad", lambda kw: {"running_mean": kw["running_mean"].requires_grad_()}, RuntimeError, "running_mean: requires grad"),
    (OPS, "running_var requires grad (eval)", lambda kw: {"running_var": kw["running_var"].requires_grad_(), "training": False}, RuntimeError, "running_var: requires grad"),
    (OPS, "channel mismatch", lambda kw: {"x": torch.randn(2, 5, 6, 6)}, ValueError, "weight: expected"),
    (OPS, "weight rank", lambda kw: {"weight": kw["weight"][0]}, ValueError, "weight: expected a 4-D"),
    (OPS, "weight dtype", lambda kw: {"weight": kw["weight"].double()}, TypeError, "weight: expected x's dtype"),
    (OPS, "weight device", lambda kw: {"weight": kw["weight"].to("meta")}, ValueError, "weight: expected a tensor on x's device"),
    (OPS, "bias shape", lambda kw: {"bias": kw["bias"][:-1]}, ValueError, "bias: expected shape"),
    (OPS, "bias device", lambda kw: {"bias": kw["bias"].to("meta")}, ValueError, "bias: expected a tensor on x's device"),
    (OPS, "bn_weight shape", lambda kw: {"bn_weight": torch.rand(2, 3)}, ValueError, "bn_weight: expected shape"),
    (OPS, "running_mean int", lambda kw: {"running_mean": torch.zeros(kw["weight"].shape[0], dtype=torch.long)}, TypeError, "running_mean"),
    (OPS, "running_var missing", lambda kw: {"running_var": None}, ValueError, "running_mean, running_var"),
    (OPS, "eval without stats", lambda kw: {"training": False, "running_mean": None, "running_var": None}, ValueError, "required when training=False"),
    (OPS, "eps nan", lambda kw: {"eps": math.nan}, ValueError, "eps"),
    (OPS, "eps inf", lambda kw: {"eps": math.inf}, ValueError, "eps"),
    (OPS, "eps negative", lambda kw: {"eps": -1.0}, ValueError, "eps"),
    (OPS, "eps 0", lambda kw: {"eps": 0.0}, ValueError, "eps: .*must be positive"),
    (OPS, "momentum None", lambda kw: {"momentum": None}, TypeError, "momentum"),
    (OPS, "training not bool", lambda kw: {"training": "yes"}, TypeError, "training"),
    (OPS, "activation", lambda kw: {"activation": "swish"}, ValueError, "activation"),
    (OPS, "one value per channel", lambda kw: {"x": kw["x"][:1, :, :2, :2] if kw["weight"].shape[-1] == 2 else kw["x"][:1, :, :1, :1]}, ValueError, "more than one value per channel"),
    (["dw_block"], "not depthwise", lambda kw: {"weight": torch.randn(4, 4, 3, 3)}, ValueError, "depthwise weight of shape"),
    (["dw_block"], "even k", lambda kw: {"weight": torch.randn(4, 1, 4, 4)}, ValueError, "must be odd"),
    (["dw_block"], "zero k", lambda kw: {"weight": torch.randn(4, 1, 0, 0)}, ValueError, "kernel size must be >= 1"),
    (["dw_block"], "non-square k", lambda kw: {"weight": torch.randn(4, 1, 3, 5)}, ValueError, "square"),
    (["pw_block"], "pw not 1x1", lambda kw: {"weight": torch.randn(6, 4, 3, 3)}, ValueError, "1x1"),
    (["patch_embed"], "patch larger than image", lambda kw: {"x": torch.randn(2, 4, 1, 6)}, ValueError, "smaller than the patch size"),
]
PARAMS = [pytest.param(op, fn, exc, msg, id=f"{op}-{name}") for ops, name, fn, exc, msg in CASES for op in ops]


@pytest.mark.parametrize("op,changes,exc,msg", PARAMS)
def test_functional_rejects(op, changes, exc, msg):
    kw = good(op)
    kw.update(changes(kw))
    with pytest.raises(exc, match=msg):
        getattr(ck, op)(**kw)


@pytest.mark.parametrize("op", OPS)
def test_backend_argument(op, monkeypatch):
    with pytest.raises(ValueError, match="backend: expected one of"):
        getattr(ck, op)(**good(op), backend="fastest")
    monkeypatch.setenv("CONVMIXER_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CONVMIXER_KERNELS_BACKEND"):
        getattr(ck, op)(**good(op))


# Triton runs on the CPU under its interpreter (TRITON_INTERPRET=1), so it is not always
# unavailable here; cuda is, on CPU tensors.
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton")
                                     if b not in backends_under_test("cpu", "dw_block")])
def test_unavailable_backend_raises_with_reason(backend):
    with pytest.raises(ck.BackendUnavailable, match=f"backend '{backend}' cannot run dw_block: .+"):
        ck.dw_block(**good("dw_block"), backend=backend)


# Every kernel backend (the reference and native backends are the composite itself; in float32 they
# inherits PyTorch's CPU GELU(+inf) = NaN).
NAN_CASES = [(op, b, tr) for op in OPS for b in backends_under_test("cpu", op) if b not in ("reference", "native")
             for tr in (False, True)]


@pytest.mark.parametrize("op,backend,training", NAN_CASES)
def test_nan_and_inf_propagate_as_in_reference(op, backend, training):
    """NaN/Inf propagate as in the reference composite run in float64 (PyTorch's float32
    CPU GELU returns NaN for +inf, where GELU(+inf) = +inf; the kernels follow the maths).
    In training mode a non-finite value spreads through its channel's batch statistics."""
    kw = with_(op, training=training)
    kw["x"][0, 1, 2, 3] = math.nan
    kw["x"][1, 0, 0, 0] = math.inf
    kw["x"][1, 2, 4, 4] = -math.inf
    got = getattr(ck, op)(**{k: v.clone() if isinstance(v, torch.Tensor) else v
                             for k, v in kw.items()}, backend=backend)
    want = getattr(ck.reference, op)(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                        for k, v in kw.items()})
    assert torch.isnan(want).any() and (training or torch.isinf(want).any())
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-5, atol=1e-5)


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="kernel_size"):
        ck.DepthwiseBlock(8, kernel_size=4)
    with pytest.raises(ValueError, match="activation"):
        ck.PointwiseBlock(8, activation="tanh")
    with pytest.raises(ValueError, match="backend"):
        ck.PatchEmbed(3, 8, 2, backend="gpu")
    with pytest.raises(TypeError, match="model"):
        ck.convert("not a model")


@pytest.mark.parametrize("op", OPS)
def test_functional_takes_an_empty_batch(op):
    """N = 0 returns an empty result and leaves the running statistics, as F.batch_norm."""
    kw = good(op)
    kw["x"] = kw["x"][:0]
    mean, var = kw["running_mean"].clone(), kw["running_var"].clone()
    out = getattr(ck, op)(**kw)
    assert out.shape[0] == 0
    assert torch.equal(kw["running_mean"], mean) and torch.equal(kw["running_var"], var)


def test_module_input_errors_name_the_argument():
    block = ck.DepthwiseBlock(8, 3)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        block(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="weight: expected a depthwise weight"):
        block(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        block(torch.ones(2, 8, 5, 5, dtype=torch.int32))


# ---- every module and convert(), table-driven (docs/design.md (Bad input)) -----------------
# name -> (constructor taking keyword overrides, a good input shape)
MODULES = {
    "DepthwiseBlock": (lambda **kw: ck.DepthwiseBlock(4, kw.pop("kernel_size", 3), **kw), (2, 4, 6, 6)),
    "PointwiseBlock": (lambda **kw: ck.PointwiseBlock(4, 6, **kw), (2, 4, 6, 6)),
    "PatchEmbed": (lambda **kw: ck.PatchEmbed(3, 6, kw.pop("patch_size", 2), **kw), (2, 3, 6, 6)),
    "ConvMixerLayer": (lambda **kw: ck.ConvMixerLayer(4, kw.pop("kernel_size", 3), **kw), (2, 4, 6, 6)),
    "ConvMixer": (lambda **kw: ck.ConvMixer(4, 1, num_classes=3, **{"kernel_size": 3, "patch_size": 2, **kw}),
                  (2, 3, 6, 6)),
}
CONVERTED = {  # a stock model that convert() fuses, and its good input shape
    "convert(stock)": (lambda: ck.convert(_stock_convmixer()), (2, 3, 6, 6)),
}


def _stock_convmixer() -> torch.nn.Module:
    from conftest import unfuse_
    return unfuse_(ck.ConvMixer(4, 1, kernel_size=3, patch_size=2, num_classes=3))


# (id, input builder from the good shape, exception, message fragment)
INPUT_CASES = [
    ("rank 3", lambda s: torch.randn(s[1:]), ValueError, "x: expected a 4-D"),
    ("rank 5", lambda s: torch.randn((1,) + s), ValueError, "x: expected a 4-D"),
    ("channel mismatch", lambda s: torch.randn(s[0], s[1] + 1, *s[2:]), ValueError, "weight: expected"),
    ("int dtype", lambda s: torch.ones(s, dtype=torch.int32), TypeError, "x: expected a floating-point"),
    ("complex dtype", lambda s: torch.ones(s, dtype=torch.complex64), TypeError, "x: expected a floating-point"),
    ("not a tensor", lambda s: torch.randn(s).tolist(), TypeError, "x: expected a torch.Tensor"),
    ("mixed devices (meta x, cpu weights)", lambda s: torch.randn(s, device="meta"), ValueError,
     "weight: expected a tensor on x's device"),
    ("dtype differs from the weights", lambda s: torch.randn(s, dtype=torch.float16), TypeError,
     "weight: expected x's dtype"),
]
ENTRY_POINTS = {**{k: v for k, v in MODULES.items()}, **CONVERTED}


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("case", INPUT_CASES, ids=[c[0] for c in INPUT_CASES])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_module_rejects_input(entry, case, training):
    make, shape = ENTRY_POINTS[entry]
    _, build_x, exc, msg = case
    module = make().train(training)
    with pytest.raises(exc, match=msg):
        module(build_x(shape))


# (id, constructor overrides, exception, message fragment); modules that do not take an
# argument are left out of its rows.
CONSTRUCTOR_CASES = [
    ("even kernel", {"kernel_size": 4}, ValueError, "kernel_size: expected an odd size"),
    ("zero kernel", {"kernel_size": 0}, ValueError, "kernel_size: expected an odd size"),
    ("zero patch", {"patch_size": 0}, ValueError, "patch_size: expected a size >= 1"),
    ("activation name", {"activation": "swish"}, ValueError, "activation: expected one of"),
    ("activation type", {"activation": 3}, ValueError, "activation: expected one of"),
    ("backend name", {"backend": "gpu"}, ValueError, "backend: expected one of"),
]
TAKES = {"kernel_size": {"DepthwiseBlock", "ConvMixerLayer", "ConvMixer"},
         "patch_size": {"PatchEmbed", "ConvMixer"}}
CTOR_PARAMS = [pytest.param(m, kw, exc, msg, id=f"{m}-{name}")
               for name, kw, exc, msg in CONSTRUCTOR_CASES for m in MODULES
               if all(m in TAKES.get(k, MODULES) for k in kw)]


@pytest.mark.parametrize("entry,overrides,exc,msg", CTOR_PARAMS)
def test_module_constructor_rejects(entry, overrides, exc, msg):
    make, _ = MODULES[entry]
    with pytest.raises(exc, match=msg):
        make(**overrides)


# Settings a module takes but its forward checks (as nn.BatchNorm2d takes any eps).
FORWARD_SETTINGS = [
    ("eps nan", {"eps": math.nan}, ValueError, "eps: expected a finite float"),
    ("eps inf", {"eps": math.inf}, ValueError, "eps: expected a finite float"),
    ("eps negative", {"eps": -1e-5}, ValueError, "eps: expected a finite float"),
]


@pytest.mark.parametrize("case", FORWARD_SETTINGS, ids=[c[0] for c in FORWARD_SETTINGS])
@pytest.mark.parametrize("entry", list(MODULES))
def test_module_forward_rejects_setting(entry, case):
    make, shape = MODULES[entry]
    _, overrides, exc, msg = case
    with pytest.raises(exc, match=msg):
        make(**overrides)(torch.randn(shape))


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_module_backend_attribute_and_set_backend(entry, monkeypatch):
    make, shape = ENTRY_POINTS[entry]
    module = make()
    with pytest.raises(ValueError, match="backend: expected one of"):
        ck.set_backend(module, "fastest")
    for m in module.modules():  # an attribute set by hand is checked when the op runs
        if "backend" in type(m).__dict__ or hasattr(type(m), "backend"):
            m.backend = "fastest"
    with pytest.raises(ValueError, match="backend: expected one of"):
        module(torch.randn(shape))
    module = make()
    monkeypatch.setenv("CONVMIXER_KERNELS_BACKEND", "fastest")
    with pytest.raises(ValueError, match="CONVMIXER_KERNELS_BACKEND"):
        module(torch.randn(shape))


@pytest.mark.parametrize("bad,exc,msg", [
    ("not a model", TypeError, "model: expected an nn.Module"),
    (None, TypeError, "model: expected an nn.Module"),
    (torch.randn(2), TypeError, "model: expected an nn.Module"),
])
def test_convert_rejects(bad, exc, msg):
    with pytest.raises(exc, match=msg):
        ck.convert(bad)


def test_convert_rejects_backend_name():
    with pytest.raises(ValueError, match="backend: expected one of"):
        ck.convert(_stock_convmixer(), backend="gpu")


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
def test_module_nan_and_inf_propagate_as_stock(entry, training):
    """A module's output has the NaN/Inf pattern of the same stock modules in float64, or,
    where auto runs the stock path (``native``), of the stock modules in x's dtype
    (PyTorch's float32 CPU GELU(+inf) is NaN)."""
    from conftest import eager_copy, randomize_

    make, shape = ENTRY_POINTS[entry]
    module = randomize_(make()).train(training)
    stock = eager_copy(module, torch.float64)
    x = torch.randn(shape)
    x[0, 1, 2, 3] = math.nan
    x[1, 0, 0, 0] = math.inf
    got, want = module(x), stock(x.double())
    assert not torch.isfinite(want).all()
    if not torch.equal(torch.isnan(got), torch.isnan(want)):  # the stock path in float32
        want = eager_copy(module, torch.float32)(x).double()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = torch.isfinite(want)
    torch.testing.assert_close(got[finite].double(), want[finite], rtol=1e-4, atol=1e-4)
