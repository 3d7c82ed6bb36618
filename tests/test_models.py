"""Drop-in use: timm's ConvMixers and the paper's nn.Sequential ConvMixer, converted."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import convmixer_kernels as ck

from conftest import randomize_, unfuse_

timm = pytest.importorskip("timm")


class Residual(nn.Module):
    """The paper's Residual."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x) + x


def paper_convmixer(dim, depth, kernel_size=9, patch_size=7, n_classes=1000):
    """The paper's ConvMixer, verbatim in structure."""
    return nn.Sequential(
        nn.Conv2d(3, dim, kernel_size=patch_size, stride=patch_size), nn.GELU(), nn.BatchNorm2d(dim),
        *[nn.Sequential(
            Residual(nn.Sequential(
                nn.Conv2d(dim, dim, kernel_size, groups=dim, padding="same"), nn.GELU(),
                nn.BatchNorm2d(dim))),
            nn.Conv2d(dim, dim, kernel_size=1), nn.GELU(), nn.BatchNorm2d(dim),
        ) for _ in range(depth)],
        nn.AdaptiveAvgPool2d((1, 1)), nn.Flatten(), nn.Linear(dim, n_classes))


def check_converted(original: nn.Module, img: torch.Tensor, training: bool) -> None:
    """In float64: float32 rounding differences grow chaotically through 32 train-mode
    ReLU/BN layers, which would hide real mismatches behind loose tolerances."""
    original = randomize_(original).train(training).double()
    img = img.double()
    model = copy.deepcopy(original)
    keys = list(model.state_dict())
    params = {n: p for n, p in model.named_parameters()}
    assert ck.convert(model) is model
    assert list(model.state_dict()) == keys, "state_dict keys changed"
    assert {n: p for n, p in model.named_parameters()} == params, "parameters were not shared"
    assert all(m.training == training for m in model.modules())
    fused = [m for m in model.modules() if isinstance(m, (ck.DepthwiseBlock, ck.ConvMixerLayer))]
    assert fused, "nothing was converted"
    x1, x2 = img.clone().requires_grad_(), img.clone().requires_grad_()
    out, want = model(x1), original(x2)
    torch.testing.assert_close(out, want)
    out.sum().backward()
    want.sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad)
    for (name, p), (_, q) in zip(model.named_parameters(), original.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), (_, c) in zip(model.named_buffers(), original.named_buffers()):
        torch.testing.assert_close(b, c, msg=name)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", ["convmixer_768_32", "convmixer_1536_20"])
def test_timm_convert(name, training):
    """timm's model, its trunk cut to its first 3 layers (every layer has the same
    structure; the float64 comparison of all 20-32 took minutes of the CI budget)."""
    model = timm.create_model(name, pretrained=False)
    model.blocks = model.blocks[:3]
    check_converted(model, torch.randn(2, 3, 28, 35), training)
    converted = ck.convert(copy.deepcopy(model))
    assert isinstance(converted.blocks[0], ck.ConvMixerLayer)
    assert isinstance(converted.stem, ck.PatchEmbed)


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_paper_sequential_convert(training):
    model = paper_convmixer(16, 2, kernel_size=5, patch_size=4, n_classes=7)
    check_converted(model, torch.randn(2, 3, 20, 17), training)
    converted = ck.convert(copy.deepcopy(model))
    assert isinstance(converted, ck.FusedSequential)
    assert isinstance(converted[3], ck.ConvMixerLayer)


@pytest.mark.parametrize("name,factory", [("convmixer_768_32", ck.convmixer_768_32),
                                          ("convmixer_1536_20", ck.convmixer_1536_20),
                                          ("convmixer_1024_20_ks9_p14", ck.convmixer_1024_20_ks9_p14)])
def test_convmixer_loads_timm_state_dict(name, factory):
    ref = randomize_(timm.create_model(name, pretrained=False)).eval()
    ours = factory().eval()
    assert list(ours.state_dict()) == list(ref.state_dict())
    ours.load_state_dict(ref.state_dict())
    img = torch.randn(1, 3, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(img), ref(img), rtol=1e-4, atol=1e-4)


def test_convmixer_cifar_train_step():
    """A small CIFAR-style ConvMixer trains: forward, backward, optimizer step, like the stock one."""
    ours = randomize_(ck.ConvMixer(32, 2, kernel_size=5, patch_size=2, num_classes=10))
    stock = unfuse_(copy.deepcopy(ours))
    img, target = torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))
    for model in (ours, stock):
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for _ in range(2):
            opt.zero_grad()
            nn.functional.cross_entropy(model(img), target).backward()
            opt.step()
    for (name, p), (_, q) in zip(ours.state_dict().items(), stock.state_dict().items()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_convert_leaves_unsupported_modules_alone():
    seq = nn.Sequential(nn.Conv2d(3, 3, 3, dilation=2, padding=2), nn.GELU(), nn.BatchNorm2d(3))
    res = Residual(nn.Sequential(nn.Conv2d(4, 4, 4, groups=4, padding="same"), nn.GELU(),
                                 nn.BatchNorm2d(4)))
    silu = nn.Sequential(nn.Conv2d(3, 3, 1), nn.SiLU(), nn.BatchNorm2d(3))
    for m in (seq, res, silu):
        cls = type(m)
        ck.convert(m)
        assert type(m) is cls


def test_set_backend_reaches_every_fused_module():
    model = ck.ConvMixer(8, 2, kernel_size=3, patch_size=2, num_classes=3)
    ck.set_backend(model, "reference")
    fused = [m for m in model.modules() if isinstance(m, (ck.DepthwiseBlock, ck.PatchEmbed,
                                                          ck.PointwiseBlock, ck.ConvMixerLayer))]
    assert fused and all(m.backend == "reference" for m in fused)
    ck.set_backend(model, None)
    assert all(m.backend is None for m in fused)
    with pytest.raises(ValueError, match="backend"):
        ck.set_backend(model, "fastest")


@pytest.mark.parametrize("fmt,want_cl", [("default", True), (torch.contiguous_format, False),
                                         (None, False)])
def test_convmixer_trunk_layout(fmt, want_cl):
    """The trunk runs channels_last by default (every block's output in that layout) and
    NCHW on request; None keeps the image's layout. Logits agree to rounding."""
    kw = {} if fmt == "default" else {"memory_format": fmt}
    model = randomize_(ck.ConvMixer(8, 2, kernel_size=3, patch_size=2, num_classes=5, **kw)).eval()
    nchw = randomize_(ck.ConvMixer(8, 2, kernel_size=3, patch_size=2, num_classes=5,
                                   memory_format=torch.contiguous_format)).eval()
    nchw.load_state_dict(model.state_dict())
    layouts = []
    for m in (model.stem, *model.blocks):
        m.register_forward_hook(lambda mod, inp, out: layouts.append(
            out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()))
    img = torch.randn(2, 3, 12, 12)
    with torch.no_grad():
        out = model(img)
        torch.testing.assert_close(out, nchw(img), rtol=1e-5, atol=1e-5)
    assert layouts == [want_cl] * 3
    with pytest.raises(ValueError, match="memory_format"):
        ck.ConvMixer(8, 1, memory_format=torch.preserve_format)


@pytest.mark.parametrize("which", ["ConvMixer", "converted timm"])
def test_whole_model_torch_save_load_and_deepcopy_after_calls(which, tmp_path):
    """torch.save of the whole module (pickle protocol 2) and copy.deepcopy work after
    training and eval calls, as for the stock model; the copy computes the same."""
    torch.manual_seed(0)
    if which == "ConvMixer":
        model = ck.ConvMixer(16, 2, kernel_size=3, patch_size=2, num_classes=10,
                             memory_format=torch.contiguous_format)
    else:
        timm = pytest.importorskip("timm")
        model = ck.convert(timm.models.convmixer.ConvMixer(dim=16, depth=2, kernel_size=3,
                                                           patch_size=2, num_classes=10))
    ck.set_backend(model, "cpu")
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    for _ in range(2):
        model.train()(x).sum().backward()
        with torch.no_grad():
            model.eval()(x)
    torch.save(model, tmp_path / "m.pt")
    loaded = torch.load(tmp_path / "m.pt", weights_only=False)
    copied = copy.deepcopy(model)
    with torch.no_grad():
        want = model(x)
        for other in (loaded, copied):
            assert torch.equal(other(x), want)
    if which == "ConvMixer":
        assert loaded.memory_format is torch.contiguous_format
    loaded.train()(x).sum().backward()
