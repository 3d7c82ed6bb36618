"""Build the modules of a benchmark ``Case`` and one timed step per (provider, mode).

Every provider of a case shares one set of parameters: the fused module, and the stock
child modules it holds (conv, activation, BatchNorm) run eagerly for the baselines.
Parameters and buffers are restored before each provider, so each starts from the same
state. Inputs are drawn at random; when one input set fits in the device's L2 cache,
steps rotate through several so that no call finds its input already cached.
"""
from __future__ import annotations

import contextlib
import copy
import math
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cases import CHANNELS_LAST_SUFFIX, LAYER_FUSION_PROVIDER, MEMORY_SAVING_SUFFIX, Case
from ..convert import set_backend, set_memory_saving
from ..modules import ConvMixer, ConvMixerLayer, DepthwiseBlock, PatchEmbed, PointwiseBlock, _FusedTriple

__all__ = ["Built", "build", "eager_forward", "EagerTwin", "LayerFusion"]

MAX_INPUT_SETS = 8


def eager_forward(m: nn.Module, x: Tensor) -> Tensor:
    """``m``'s computation with its stock children (conv, act, BN), run eagerly."""
    if isinstance(m, DepthwiseBlock):
        return x + m.fn(x)
    if isinstance(m, ConvMixerLayer):
        x = x + m[0].fn(x)
        return m[3](m[2](m[1](x)))
    if isinstance(m, _FusedTriple):
        return nn.Sequential.forward(m, x)
    if isinstance(m, ConvMixer):
        x = eager_forward(m.stem, x)
        for layer in m.blocks:
            x = eager_forward(layer, x)
        return m.forward_head(x)
    return m(x)


class EagerTwin(nn.Module):
    """The stock-module version of a fused module, sharing its parameters."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.fused = fused

    def forward(self, x: Tensor) -> Tensor:
        return eager_forward(self.fused, x)


class LayerFusion(nn.Module):
    """A ``ConvMixerLayer`` in eval run as one fused-layer op (``fused_triton_layer``);
    raises, naming the reason, where the layer cannot be fused (never times the two-op
    path under this name)."""

    def __init__(self, layer: nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: Tensor) -> Tensor:
        from ..modules import layer_blocker, layer_module_eval

        reason = layer_blocker(self.layer, x)
        if reason is not None:
            raise RuntimeError(f"{LAYER_FUSION_PROVIDER}: the layer cannot run fused: {reason}")
        return layer_module_eval(self.layer, x)


@torch.no_grad()
def _randomize_bn(module: nn.Module) -> None:
    for bn in (mod for mod in module.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0.0, 0.5)
        bn.running_mean.normal_(0.0, 0.5), bn.running_var.uniform_(0.5, 1.5)


def _make_module(case: Case, device: torch.device, dtype: torch.dtype) -> nn.Module:
    dd = {"device": device, "dtype": dtype}
    act = case.activation
    if case.op == "dw_block":
        return DepthwiseBlock(case.C_in, case.k, act, **dd)
    if case.op == "pw_block":
        return PointwiseBlock(case.C_in, case.C_out, act, **dd)
    if case.op == "patch_embed":
        return PatchEmbed(case.C_in, case.C_out, case.p, act, **dd)
    if case.op == "layer":
        return ConvMixerLayer(case.C_in, case.k, act, **dd)
    if case.kind == "model":
        return ConvMixer(case.C_out, case.depth, case.k, case.p, case.num_classes, act, **dd)
    import timm  # timm baselines of the paper's table, random weights
    return timm.create_model(case.op, pretrained=False).to(**dd)


@contextlib.contextmanager
def _memory_format(module: nn.Module, fmt: torch.memory_format) -> Iterator[None]:
    """Hold ``module``'s 4-D weights in ``fmt`` (same Parameter objects), then restore NCHW."""
    if fmt == torch.contiguous_format:
        yield
        return
    module.to(memory_format=fmt)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


@dataclass
class Built:
    """A case's module and inputs on one device and dtype."""

    case: Case
    device: torch.device
    dtype: torch.dtype
    module: nn.Module
    inputs: list[Tensor]
    targets: list[Tensor]
    state: dict

    @property
    def elem_bytes(self) -> int:
        return torch.empty((), dtype=self.dtype).element_size()

    @contextlib.contextmanager
    def provider(self, provider: str, backend: Optional[str], mode: str,
                 ) -> Iterator[tuple[Callable[[], object], Callable[[], Tensor]]]:
        """Within the context: (step, forward) of ``provider`` in ``mode``; ``forward()``
        runs one forward on the first input set (for the cross-provider check)."""
        self.module.load_state_dict(self.state)
        self.module.train(mode != "inference")
        channels_last = provider == "eager_channels_last" or provider.endswith(CHANNELS_LAST_SUFFIX)
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with _memory_format(self.module, fmt):
            f = self._callable(provider, backend)
            grad_x = mode != "inference" and self.case.needs_input_grad
            xs = [x.detach().clone(memory_format=fmt).requires_grad_(grad_x) for x in self.inputs]
            yield _step(self, f, xs, mode), (lambda: _forward(f, xs[0], mode))

    def _callable(self, provider: str, backend: Optional[str]) -> Callable[[Tensor], Tensor]:
        set_memory_saving(self.module, provider.endswith(MEMORY_SAVING_SUFFIX))
        if provider == LAYER_FUSION_PROVIDER:
            set_backend(self.module, backend)
            return LayerFusion(self.module)
        if provider.startswith("fused_"):
            set_backend(self.module, backend)
            return self.module
        twin = EagerTwin(self.module) if self.case.kind != "timm" else self.module
        if provider.startswith("compile"):
            torch._dynamo.reset()  # a fresh cache per provider: no recompile limit across cases
            return torch.compile(twin, mode="max-autotune" if provider == "compile_max_autotune" else None)
        return twin


def _forward(f: Callable[[Tensor], Tensor], x: Tensor, mode: str) -> Tensor:
    with torch.set_grad_enabled(mode != "inference"):
        return f(x).detach().float()


def _step(built: Built, f: Callable[[Tensor], Tensor], xs: list[Tensor], mode: str) -> Callable[[], object]:
    """One timed iteration of ``mode``, rotating through the input sets."""
    counter = iter(range(1 << 62))
    n_sets = len(xs)
    if mode == "inference":
        def step() -> object:
            with torch.no_grad():
                return f(xs[next(counter) % n_sets])
        return step
    if mode == "forward":
        def step() -> object:
            with torch.enable_grad():
                return f(xs[next(counter) % n_sets])
        return step
    params = [p for p in built.module.parameters() if p.requires_grad]
    if built.case.kind != "op":  # whole models: a training step with an optimizer
        opt = torch.optim.SGD(params, lr=1e-4, momentum=0.9)
        targets = built.targets

        def train_step() -> None:
            i = next(counter) % n_sets
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(f(xs[i]).float(), targets[i]).backward()
            opt.step()
        return train_step
    with torch.no_grad():
        out = f(xs[0])
    grad = torch.randn_like(out)  # in the output's memory format
    del out

    def forward_backward() -> None:
        x = xs[next(counter) % n_sets]
        for p in (*params, x):
            p.grad = None
        f(x).backward(grad)
    return forward_backward


def build(case: Case, device: torch.device, dtype: torch.dtype, l2_bytes: int, seed: int = 0) -> Built:
    """The module of ``case`` with random parameters and BN statistics, and its input sets."""
    torch.manual_seed(seed)
    module = _make_module(case, device, dtype)
    _randomize_bn(module)
    shape = (case.N, case.C_in, case.H, case.W)
    one_set = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    n_sets = 1 if one_set >= l2_bytes else min(MAX_INPUT_SETS, math.ceil(2 * l2_bytes / one_set))
    inputs = [torch.randn(shape, device=device, dtype=dtype) for _ in range(n_sets)]
    classes = case.num_classes or 1000
    targets = [torch.randint(0, classes, (case.N,), device=device) for _ in range(n_sets)]
    return Built(case, device, dtype, module, inputs, targets, copy.deepcopy(module.state_dict()))
