"""Drop-in fidelity (issue 21): every PyTorch workflow on a converted model behaves as on
the stock timm model: same results (docs/design.md (The tolerance rule) tolerances for float32), same
running statistics and counters, same exception types where stock raises.

Each test builds the small timm ConvMixer (dim 32, depth 2, k 5, patch 2), a stock copy
and a converted copy with the same weights, runs the workflow on both and compares.
Backends: ``cpu`` (when the extension is built), ``native``, ``reference`` and ``auto``.
"""
from __future__ import annotations

import copy
import logging
import math
import warnings

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

import convmixer_kernels as ck

timm = pytest.importorskip("timm")

BACKENDS = [b for b in ("cpu", "native", "reference", "auto")
            if b == "auto" or b in ck.available_backends("cpu")]
SHAPES = [(2, 3, 16, 16), (3, 3, 10, 14)]
RTOL, ATOL = 1e-4, 1e-5


def stock_model() -> nn.Module:
    model = timm.models.convmixer.ConvMixer(dim=32, depth=2, kernel_size=5, patch_size=2,
                                            num_classes=10)
    with torch.no_grad():  # non-default BatchNorm state, so that eval mode means something
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    return model


def pair(backend: str, training: bool = True) -> tuple[nn.Module, nn.Module]:
    stock = stock_model().train(training)
    fused = ck.convert(copy.deepcopy(stock))
    ck.set_backend(fused, None if backend == "auto" else backend)
    return stock, fused


def assert_same_state(stock: nn.Module, fused: nn.Module) -> None:
    """Parameters, running statistics and num_batches_tracked agree (the keys too)."""
    a, b = stock.state_dict(), fused.state_dict()
    assert list(a) == list(b)
    for k in a:
        if a[k].dtype == torch.long:
            assert torch.equal(a[k], b[k]), f"{k}: {a[k]} != {b[k]}"
        else:
            torch.testing.assert_close(b[k], a[k], rtol=RTOL, atol=ATOL, msg=k)


def assert_same_grads(stock: nn.Module, fused: nn.Module) -> None:
    for (k, p), (_, q) in zip(stock.named_parameters(), fused.named_parameters()):
        assert (p.grad is None) == (q.grad is None), k
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-3, atol=1e-4, msg=k)


def step(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = model(x)
    if torch.is_grad_enabled() and out.requires_grad:
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out.detach()


def same_exception(fn_stock, fn_fused) -> None:
    """Both raise, and the fused model's exception is an instance of the stock one's type."""
    with pytest.raises(Exception) as want:
        fn_stock()
    with pytest.raises(want.type):
        fn_fused()


# ---- training and eval ----------------------------------------------------------------

@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_backward(backend, training, shape):
    stock, fused = pair(backend, training)
    x = torch.randn(shape)
    for _ in range(2):  # the second step sees the first step's running statistics
        torch.testing.assert_close(step(fused, x), step(stock, x), rtol=RTOL, atol=ATOL)
    assert_same_grads(stock, fused)
    assert_same_state(stock, fused)


@pytest.mark.parametrize("transform", ["grad", "vmap_grad"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_torch_func_transforms(backend, transform):
    """torch.func over a converted model in eval (BatchNorm's running statistics; training
    mutates them, which torch.func refuses for the stock model too): the same gradients as
    the stock model, after calls that kept the module's routes."""
    from torch.func import functional_call, grad, vmap

    stock, fused = pair(backend, training=False)
    x = torch.randn(3, 3, 16, 16)
    for _ in range(2):  # the routes of plain eager calls, grad and no grad
        step(fused, x.requires_grad_())
    results = []
    for model in (stock, fused):
        params = {k: v.detach() for k, v in model.named_parameters()}

        def loss(p, xb, model=model):
            out = functional_call(model, p, (xb,))
            return (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum()
        if transform == "grad":
            results.append(grad(loss)(params, x.detach()))
        else:  # per-sample gradients
            results.append(vmap(grad(loss), in_dims=(None, 0))(params, x.detach()[:, None]))
    for k in results[0]:
        torch.testing.assert_close(results[1][k], results[0][k], rtol=1e-3, atol=1e-4, msg=k)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_forward_mode_ad(backend, training):
    """Forward-mode AD (dual numbers) through a converted model: the stock model's tangent
    (and, in training, the same running statistics)."""
    import torch.autograd.forward_ad as fwAD

    stock, fused = pair(backend, training)
    x = torch.randn(3, 3, 16, 16)
    for _ in range(2):
        step(fused, x.clone().requires_grad_()), step(stock, x.clone().requires_grad_())
    t = torch.randn_like(x)
    out = []
    for model in (stock, fused):
        with fwAD.dual_level():
            y = model(fwAD.make_dual(x, t))
            out.append(fwAD.unpack_dual(y))
    torch.testing.assert_close(out[1].primal, out[0].primal, rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(out[1].tangent, out[0].tangent, rtol=1e-3, atol=1e-4)
    assert_same_state(stock, fused)


def test_torch_func_grad_of_the_functional_api_under_auto():
    from torch.func import grad

    x, w = torch.randn(2, 4, 6, 6), torch.randn(4, 1, 3, 3)
    want = grad(lambda w: ck.dw_block(x, w, training=True, backend="native").square().sum())(w)
    got = grad(lambda w: ck.dw_block(x, w, training=True).square().sum())(w)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif("triton" not in ck.available_backends("cpu"),
                    reason="needs triton (under TRITON_INTERPRET=1, which conftest sets)")
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_forward_backward_triton_interpreter(training):
    """The triton backend under Triton's interpreter (slow: one small shape, one step)."""
    stock, fused = pair("triton", training)
    x = torch.randn(SHAPES[0])
    torch.testing.assert_close(step(fused, x), step(stock, x), rtol=RTOL, atol=ATOL)
    assert_same_grads(stock, fused)
    assert_same_state(stock, fused)


@pytest.mark.parametrize("backend", BACKENDS)
def test_momentum_none_and_no_running_stats(backend):
    stock, fused = pair(backend)
    for model in (stock, fused):
        model.blocks[0][0].fn[2].momentum = None
        bn = model.blocks[1][3]
        bn.track_running_stats, bn.running_mean, bn.running_var = False, None, None
    x = torch.randn(2, 3, 16, 16)
    for _ in range(2):
        torch.testing.assert_close(step(fused, x), step(stock, x), rtol=RTOL, atol=ATOL)
    assert_same_state(stock, fused)


# ---- hooks, parametrizations, spectral_norm, prune --------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
def test_hooks_on_inner_modules_fire(backend):
    stock, fused = pair(backend)
    calls = {"stock": [], "fused": []}
    for key, model in (("stock", stock), ("fused", fused)):
        log = calls[key]
        dw, pw = model.blocks[0][0].fn, model.blocks[1]
        dw[0].register_forward_hook(lambda m, i, o, log=log: log.append("dw conv") or o * 1.5)
        dw[1].register_forward_pre_hook(lambda m, i, log=log: log.append("dw act pre"))
        pw[3].register_full_backward_hook(lambda m, gi, go, log=log: log.append("pw bn bwd"))
        model.stem[2].register_forward_hook(lambda m, i, o, log=log: log.append("stem bn"))
        model.blocks[1][0].fn.register_forward_hook(lambda m, i, o, log=log: log.append("fn"))
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(step(fused, x), step(stock, x), rtol=RTOL, atol=ATOL)
    assert calls["fused"] == calls["stock"] and calls["stock"]
    assert_same_grads(stock, fused)
    assert_same_state(stock, fused)


def test_global_module_hooks_fire():
    stock, fused = pair("auto")
    seen = []
    handle = nn.modules.module.register_module_forward_hook(
        lambda m, i, o: seen.append(type(m).__name__))
    try:
        x = torch.randn(2, 3, 16, 16)
        want = step(stock, x)
        n_stock, seen[:] = list(seen), []
        got = step(fused, x)
    finally:
        handle.remove()
    torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    inner = ("Conv2d", "GELU", "BatchNorm2d")
    assert [s for s in seen if s in inner] == [s for s in n_stock if s in inner]


def _weight_transforms():
    from torch.nn.utils import parametrizations, prune, spectral_norm

    def _prune(m):
        prune.l1_unstructured(m, "weight", amount=0.5)

    return {
        "spectral_norm": lambda m: spectral_norm(m),
        "parametrizations.weight_norm": lambda m: parametrizations.weight_norm(m),
        "prune": _prune,
    }


@pytest.mark.parametrize("transform", list(_weight_transforms()))
@pytest.mark.parametrize("backend", BACKENDS)
def test_weight_transforms_on_inner_convs(backend, transform):
    """Applied after convert (the fused module runs its stock children) and before it
    (convert leaves a parametrized conv's block alone); both as the stock model."""
    apply = _weight_transforms()[transform]
    stock, fused = pair(backend)
    before = ck.convert(apply_to(copy.deepcopy(stock_model_from(stock)), apply))
    for model in (stock, fused):
        apply_to(model, apply)
    x = torch.randn(2, 3, 16, 16)
    for model in (fused, before):
        ck.set_backend(model, None if backend == "auto" else backend)
    want = step(stock, x)
    for model in (fused, before):
        torch.testing.assert_close(step(model, x), want, rtol=RTOL, atol=ATOL)
        assert_same_grads(stock, model)
        assert_same_state(stock, model)


def stock_model_from(model: nn.Module) -> nn.Module:
    return ck.unconvert(copy.deepcopy(model)) if any(
        isinstance(m, ck.DepthwiseBlock) for m in model.modules()) else model


def apply_to(model: nn.Module, apply) -> nn.Module:
    with torch.random.fork_rng():  # spectral_norm draws its u vector: the same in every model
        torch.manual_seed(0)
        apply(model.blocks[0][0].fn[0])  # a depthwise conv
        apply(model.blocks[1][1])        # a pointwise conv
    return model


# ---- checkpointing and saved-tensor hooks -----------------------------------------------

@pytest.mark.parametrize("region", ["per block", "whole trunk"])
@pytest.mark.parametrize("early_stop", [True, False], ids=["early_stop", "no_early_stop"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_non_reentrant_checkpoint(backend, early_stop, region):
    stock, fused = pair(backend)
    x = torch.randn(2, 3, 16, 16)

    def run(model):
        if region == "per block":
            h = model.stem(x)
            for blk in model.blocks:
                h = checkpoint(blk, h, use_reentrant=False)
        else:
            h = checkpoint(lambda t: model.blocks(model.stem(t)), x, use_reentrant=False)
        out = model.forward_head(h)
        out.sum().backward()
        return out.detach()

    with set_checkpoint_early_stop(early_stop):
        torch.testing.assert_close(run(fused), run(stock), rtol=RTOL, atol=ATOL)
    assert stock.blocks[0][3].num_batches_tracked.item() == 2  # forward and recompute
    assert_same_grads(stock, fused)
    assert_same_state(stock, fused)


def test_save_on_cpu_hooks():
    stock, fused = pair("auto")
    x = torch.randn(2, 3, 16, 16)
    with torch.autograd.graph.save_on_cpu():
        torch.testing.assert_close(step(fused, x), step(stock, x), rtol=RTOL, atol=ATOL)
    assert_same_grads(stock, fused)
    assert_same_state(stock, fused)


# ---- empty batch ------------------------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_batch(backend, training):
    stock, fused = pair(backend, training)
    x = torch.randn(0, 3, 16, 16)
    got, want = step(fused, x), step(stock, x)
    assert got.shape == want.shape == (0, 10)
    assert_same_state(stock, fused)


# ---- tracers, compilers, exporters ------------------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_torch_compile_fullgraph_dynamic(training):
    torch._dynamo.reset()
    stock, fused = pair("cpu" if "cpu" in BACKENDS else "reference", training)
    compiled = torch.compile(fused, fullgraph=True, dynamic=True, backend="aot_eager")
    for shape in SHAPES[:1]:
        x = torch.randn(shape)
        torch.testing.assert_close(step(compiled, x), step(stock, x), rtol=RTOL, atol=ATOL)
    assert_same_grads(stock, fused)
    assert_same_state(stock, fused)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_fx_symbolic_trace(training):
    stock, fused = pair("auto", training)
    gm_stock, gm_fused = torch.fx.symbolic_trace(stock), torch.fx.symbolic_trace(fused)
    ops = lambda gm: [(n.op, str(n.target)) for n in gm.graph.nodes]  # noqa: E731
    assert ops(gm_fused) == ops(gm_stock)  # the stock graph, call_module for every child
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(step(gm_fused, x), step(gm_stock, x), rtol=RTOL, atol=ATOL)
    assert_same_state(stock, fused)


def test_create_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    stock, fused = pair("auto", training=False)
    nodes = {"blocks.0": "b0", "blocks.1.0": "b1_dw"}
    x = torch.randn(2, 3, 16, 16)
    want = create_feature_extractor(stock, nodes)(x)
    got = create_feature_extractor(fused, nodes)(x)
    assert list(got) == list(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("warm_up", [False, True], ids=["cold", "warm"])
def test_jit_trace(warm_up):
    stock, fused = pair("auto", training=False)
    x = torch.randn(2, 3, 16, 16)
    if warm_up:
        with torch.no_grad():
            fused(x)
    traced = torch.jit.trace(fused, x)
    torch.testing.assert_close(traced(x), stock(x), rtol=RTOL, atol=ATOL)


def test_torch_export_keeps_fused_ops_and_reruns():
    backend = "cpu" if "cpu" in BACKENDS else "reference"
    stock, fused = pair(backend, training=False)
    x = torch.randn(2, 3, 16, 16)
    ep = torch.export.export(fused, (x,))
    assert any("convmixer_kernels" in str(n.target) for n in ep.graph.nodes)
    torch.testing.assert_close(ep.module()(x), stock(x), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize("dynamo", [False, True], ids=["legacy", "dynamo"])
def test_onnx_export_runs_in_onnxruntime(dynamo, tmp_path):
    onnx = pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    stock, fused = pair("auto", training=False)
    x = torch.randn(2, 3, 16, 16)
    results, op_types = [], []
    for name, model in (("stock", stock), ("fused", fused)):
        path = str(tmp_path / f"{name}.onnx")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (x,), path, dynamo=dynamo)
        op_types.append(sorted({n.op_type for n in onnx.load(path).graph.node}))
        sess = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        results.append(sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0])
    assert op_types[0] == op_types[1]  # standard ONNX ops only, as the stock model's
    torch.testing.assert_close(torch.from_numpy(results[1]), torch.from_numpy(results[0]),
                               rtol=RTOL, atol=ATOL)
    torch.testing.assert_close(torch.from_numpy(results[1]), stock(x).detach(), rtol=RTOL,
                               atol=ATOL)


# ---- unconvert and convert's report -----------------------------------------------------

def test_unconvert_round_trips_bit_for_bit():
    stock = stock_model().eval()
    reference = copy.deepcopy(stock)
    x = torch.randn(2, 3, 16, 16)
    tensors = {k: v.data_ptr() for k, v in stock.state_dict().items()}
    classes = [type(m) for m in stock.modules()]
    fused = ck.convert(stock)
    ck.set_backend(fused, "reference")
    fused.blocks[0].memory_format = torch.contiguous_format
    y_fused = fused(x)
    back = ck.unconvert(fused)
    assert back is stock and [type(m) for m in back.modules()] == classes
    assert {k: v.data_ptr() for k, v in back.state_dict().items()} == tensors  # shared
    assert all(not k.startswith("_ck") and k not in ("backend", "memory_format")
               for m in back.modules() for k in vars(m))
    assert torch.equal(back(x), reference(x))
    again = ck.convert(back)
    ck.set_backend(again, "reference")
    again.blocks[0].memory_format = torch.contiguous_format
    assert torch.equal(again(x), y_fused)
    for k, v in reference.state_dict().items():
        assert torch.equal(again.state_dict()[k], v)


def test_convert_reports(caplog):
    torchvision = pytest.importorskip("torchvision")
    with pytest.warns(UserWarning, match="nothing in this ResNet matched"):
        ck.convert(torchvision.models.resnet18())
    model = stock_model()
    model.blocks[1][1] = nn.Conv2d(32, 32, 1, padding_mode="reflect")
    model.blocks[0][0].fn[2] = nn.SyncBatchNorm(32)
    with caplog.at_level(logging.INFO, logger="convmixer_kernels"):
        got, report = ck.convert(model, report=True)
    assert got is model
    assert ("stem", "Sequential", "PatchEmbed") in report.swapped
    left = dict(report.left)
    assert "padding_mode is 'reflect'" in left["blocks.1"]
    assert "SyncBatchNorm" in left["blocks.0.0"]
    assert type(model.blocks[1]) is nn.Sequential and isinstance(model.blocks[1][0], ck.DepthwiseBlock)
    assert any("swapped" in r.getMessage() and "reflect" in r.getMessage() for r in caplog.records)


# ---- settings and inputs stock rejects, or takes ------------------------------------------

@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_settings_raise_as_stock(backend, training):
    x = torch.randn(2, 3, 16, 16)
    for setting in ("eps=0", "eps<0", "running_mean requires grad"):
        stock, fused = pair(backend, training)
        for model in (stock, fused):
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    if setting == "eps=0":
                        m.eps = 0.0
                    elif setting == "eps<0":
                        m.eps = -1e-5
                    else:
                        m.running_mean.requires_grad_()
        same_exception(lambda: stock(x), lambda: fused(x))


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_unusual_tensors_as_stock(training):
    """mkldnn inputs run as on the stock modules; sparse, nested and quantized ones raise
    the stock modules' exception (the fused modules hand them to their stock children)."""
    stock, fused = pair("auto", training)
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(fused.stem(x.to_mkldnn()).to_dense(),
                               stock.stem(x.to_mkldnn()).to_dense(), rtol=RTOL, atol=ATOL)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bad = [x.to_sparse(), torch.nested.nested_tensor(list(x)),
               torch.quantize_per_tensor(x, 0.1, 0, torch.quint8)]
    for t in bad:
        same_exception(lambda: stock(t), lambda: fused(t))


@pytest.mark.parametrize("tap", [(0, 0), (2, 2), (4, 1)], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_in_one_depthwise_weight(backend, tap):
    """A NaN tap leaves the border pixels it never reads finite, as in the stock conv (the
    cpu backend's zero-padded tiles would spread it: such a call runs the reference)."""
    stock, fused = pair(backend, training=False)
    for model in (stock, fused):
        with torch.no_grad():
            model.blocks[0][0].fn[0].weight[3, 0, tap[0], tap[1]] = math.nan
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        got = fused.blocks[0][0](fused.stem(x))
        want = stock.blocks[0][0](stock.stem(x))
    assert torch.equal(torch.isfinite(got), torch.isfinite(want))
