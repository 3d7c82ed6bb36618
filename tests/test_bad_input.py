"""Every bad input of DESIGN.md section 7 gets a clear error naming the argument."""
from __future__ import annotations

import math

import pytest
import torch

import convmixer_kernels as ck


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
    (OPS, "N=0", lambda kw: {"x": kw["x"][:0]}, ValueError, "x: every dimension"),
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


@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_unavailable_backend_raises_with_reason(backend):
    with pytest.raises(ck.BackendUnavailable, match=f"backend '{backend}' cannot run dw_block: .+"):
        ck.dw_block(**good("dw_block"), backend=backend)


@pytest.mark.parametrize("op", OPS)
def test_nan_and_inf_propagate_as_in_reference(op):
    """NaN/Inf propagate as in the reference composite run in float64 (PyTorch's float32
    CPU GELU returns NaN for +inf, where GELU(+inf) = +inf; the kernels follow the maths)."""
    kw = with_(op, training=False)
    kw["x"][0, 1, 2, 3] = math.nan
    kw["x"][1, 0, 0, 0] = math.inf
    got = getattr(ck, op)(**kw)
    want = getattr(ck.reference, op)(**{k: v.double() if isinstance(v, torch.Tensor) else v
                                        for k, v in kw.items()})
    assert torch.isnan(want).any() and torch.isinf(want).any()
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


def test_module_input_errors_name_the_argument():
    block = ck.DepthwiseBlock(8, 3)
    with pytest.raises(ValueError, match="x: expected a 4-D"):
        block(torch.randn(8, 5, 5))
    with pytest.raises(ValueError, match="weight: expected a depthwise weight"):
        block(torch.randn(2, 3, 5, 5))
    with pytest.raises(TypeError, match="x: expected a floating-point"):
        block(torch.ones(2, 8, 5, 5, dtype=torch.int32))
