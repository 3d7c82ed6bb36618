"""The one registry of benchmark shapes and providers, shared by the CLI
(``python -m convmixer_kernels bench``) and the pytest-benchmark suite (``benchmarks/``).

A ``Case`` is one shape of one op or model; ``case_set`` gives the cases of each suite
for a device type (docs/design.md's shapes on GPU, smaller ones on CPU). Providers:

- ``fused_<backend>``: our modules run by one backend (``fused_auto`` where the
  automatic choice mixes backends across a layer's ops), on NCHW inputs and weights
  like ``eager_nchw``;
- ``fused_<backend>_cl`` (op cases): the same on channels_last inputs and weights, the
  layout ``ck.ConvMixer`` runs its trunk in (and that every fused op writes by default
  but ``dw_block``, which follows its input);
- ``fused_triton_layer`` (op ``layer``, mode ``inference``, GPU only): the
  ConvMixerLayer as ONE Triton kernel (``convmixer_kernels.ops.layer``: the depthwise
  block computed in the pointwise GEMM's prologue), to measure that split against the
  two-kernel ``fused_triton``;
- baselines, all with ``torch.backends.cudnn.benchmark = True`` on GPU:
  ``eager_nchw`` and ``eager_channels_last`` (the stock conv/act/BN modules, sharing
  the fused modules' parameters), ``compile`` (``torch.compile`` of that eager module)
  and ``compile_max_autotune`` (the same in mode ``max-autotune``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from .. import backends
from .roofline import IN_CHANS, Cost, model_cost, op_cost

__all__ = ["MEMORY_SAVING_SUFFIX", "CHANNELS_LAST_SUFFIX", "OPS", "MODES", "MODE_ALIASES", "SUITES", "MODELS", "TIMM_BASELINES", "BASELINES",
           "LAYER_FUSION_PROVIDER", "Case", "ModelSpec", "case_set", "our_providers"]

OPS = ("dw_block", "pw_block", "patch_embed", "layer")
MODES = ("inference", "forward", "forward_backward")
MODE_ALIASES = {"eval": "inference", "train_fwd": "forward", "train_fwdbwd": "forward_backward"}
SUITES = ("ops", "sweep", "models", "paper")
BASELINES = ("eager_nchw", "eager_channels_last", "compile", "compile_max_autotune")
TIMM_BASELINES = ("resnet152", "deit_base_patch16_224", "resmlp_24_224", "mixer_b16_224", "convit_small")
SWEEP_KERNEL_SIZES = tuple(range(3, 32, 2))
LAYER_FUSION_PROVIDER = "fused_triton_layer"  # one-kernel eval layer (inference mode only)
MEMORY_SAVING_SUFFIX = "_memsave"  # fused_<backend>_memsave: memory-saving training (forward_backward)
CHANNELS_LAST_SUFFIX = "_cl"  # fused_<backend>_cl: channels_last inputs and weights (op cases)
OP_USES = {"dw_block": ("dw_block",), "pw_block": ("pw_block",), "patch_embed": ("patch_embed",),
           "layer": ("dw_block", "pw_block")}


@dataclass(frozen=True)
class ModelSpec:
    dim: int
    depth: int
    kernel_size: int
    patch_size: int
    activation: str
    image_size: int
    num_classes: int = 1000


MODELS = {
    "convmixer_1536_20": ModelSpec(1536, 20, 9, 7, "gelu", 224),
    "convmixer_768_32": ModelSpec(768, 32, 7, 7, "relu", 224),
    "convmixer_1024_20_ks9_p14": ModelSpec(1024, 20, 9, 14, "gelu", 224),
    "convmixer_cifar_256_8": ModelSpec(256, 8, 5, 2, "gelu", 32, num_classes=10),
}


@dataclass(frozen=True)
class Case:
    """One shape. Ops: input (N, C_in, H, W) -> (N, C_out, H/p, W/p). Models: images
    (N, 3, H, W), width C_out, ``depth`` layers. timm baselines: images (N, 3, H, W)."""

    suite: str
    op: str  # one of OPS, a key of MODELS, or one of TIMM_BASELINES
    N: int
    C_in: int
    C_out: int
    H: int
    W: int
    k: int = 1
    p: int = 1
    activation: str = "gelu"
    depth: int = 0
    num_classes: int = 0

    @property
    def kind(self) -> str:
        return "op" if self.op in OPS else "model" if self.op in MODELS else "timm"

    @property
    def ops_used(self) -> tuple[str, ...]:
        return OP_USES.get(self.op, ("patch_embed", "dw_block", "pw_block"))

    @property
    def needs_input_grad(self) -> bool:
        return self.kind == "op" and self.op != "patch_embed"

    def label(self) -> str:
        if self.kind == "timm":
            return f"N{self.N} {self.H}px"
        if self.kind == "model":
            return f"N{self.N} {self.H}px d{self.C_out} x{self.depth} k{self.k} p{self.p} {self.activation}"
        if self.op == "patch_embed":
            return f"N{self.N} {self.C_in}->{self.C_out} {self.H}px p{self.p} {self.activation}"
        k = f" k{self.k}" if self.op != "pw_block" else ""
        return f"N{self.N} C{self.C_in} {self.H}x{self.W}{k} {self.activation}"

    def cost(self, mode: str, elem_bytes: int) -> Optional[Cost]:
        """FLOPs and compulsory bytes (``_roofline``); None for timm models."""
        if self.kind == "op":
            return op_cost(self.op, self.N, self.C_in, self.C_out, self.H, self.W, self.k, self.p,
                           elem_bytes, mode)
        if self.kind == "model":
            return model_cost(self.N, self.C_out, self.depth, self.H, self.k, self.p, self.num_classes,
                              elem_bytes, mode)
        return None

    def with_overrides(self, batch=None, dim=None, size=None, image_size=None, kernel_size=None,
                       patch_size=None, activation=None) -> Case:
        """The case with the CLI's shape options applied (None: keep)."""
        new: dict = {}
        if batch is not None:
            new["N"] = batch
        if self.kind == "timm":  # fixed 224 px models: only the batch changes
            return dataclasses.replace(self, **new)
        image = self.kind != "op" or self.op == "patch_embed"
        if dim is not None:
            new["C_out"] = dim
            if not image:
                new["C_in"] = dim
        if size is not None and not image:
            new["H"] = new["W"] = size
        if image_size is not None and image:
            new["H"] = new["W"] = image_size
        if kernel_size is not None and self.op not in ("pw_block", "patch_embed") and self.suite != "sweep":
            new["k"] = kernel_size
        if patch_size is not None and (self.op == "patch_embed" or self.kind == "model"):
            new["p"] = patch_size
        if activation is not None:
            new["activation"] = activation
        return dataclasses.replace(self, **new)


# (N, dim, tokens, k, activation, image, patch): the four ConvMixers' layer shapes.
_GPU_CONFIGS = ((64, 1536, 32, 9, "gelu", 224, 7), (64, 768, 32, 7, "relu", 224, 7),
                (64, 1024, 16, 9, "gelu", 224, 14), (512, 256, 16, 5, "gelu", 32, 2))
_CPU_CONFIGS = ((8, 256, 32, 9, "gelu", 224, 7), (8, 768, 32, 7, "relu", 224, 7),
                (8, 1024, 16, 9, "gelu", 224, 14), (64, 256, 16, 5, "gelu", 32, 2))
_CPU_QUICK_CONFIG = (4, 128, 32, 9, "gelu", 224, 7)
_MODEL_BATCH = {"cuda": {"convmixer_cifar_256_8": 512}, "cpu": {"convmixer_cifar_256_8": 32}}
_DEFAULT_MODEL_BATCH = {"cuda": 64, "cpu": 2}
_QUICK_MODEL_BATCH = {"cuda": 128, "cpu": 2}
_PAPER_BATCH = {"cuda": 64, "cpu": 2}


def _op_cases(config: tuple, suite: str = "ops") -> list[Case]:
    n, dim, tokens, k, act, image, p = config
    square = {"N": n, "C_in": dim, "C_out": dim, "H": tokens, "W": tokens, "activation": act}
    return [Case(suite, "dw_block", k=k, **square), Case(suite, "pw_block", **square),
            Case(suite, "patch_embed", n, IN_CHANS, dim, image, image, 1, p, act),
            Case(suite, "layer", k=k, **square)]


def model_case(name: str, batch: int, suite: str = "models") -> Case:
    if name in MODELS:
        s = MODELS[name]
        return Case(suite, name, batch, IN_CHANS, s.dim, s.image_size, s.image_size, s.kernel_size,
                    s.patch_size, s.activation, s.depth, s.num_classes)
    return Case(suite, name, batch, IN_CHANS, 0, 224, 224)


def case_set(device_type: str, suite: str, quick: bool) -> list[Case]:
    """The cases of ``suite`` for a device type; ``quick`` keeps one shape per op."""
    gpu = device_type == "cuda"
    configs = _GPU_CONFIGS if gpu else _CPU_CONFIGS
    if suite == "ops":
        if quick:
            return _op_cases(_GPU_CONFIGS[0] if gpu else _CPU_QUICK_CONFIG)
        return [c for config in configs for c in _op_cases(config)]
    if suite == "sweep":
        n, dim, tokens, _, act, _, _ = _GPU_CONFIGS[1] if gpu else _CPU_QUICK_CONFIG
        return [Case("sweep", "dw_block", n, dim, dim, tokens, tokens, k, 1, act) for k in SWEEP_KERNEL_SIZES]
    if suite == "models":
        if quick:
            return [model_case("convmixer_cifar_256_8", _QUICK_MODEL_BATCH[device_type])]
        return [model_case(name, _MODEL_BATCH[device_type].get(name, _DEFAULT_MODEL_BATCH[device_type]))
                for name in MODELS]
    if suite == "paper":
        names = [n for n, s in MODELS.items() if s.image_size == 224] + list(TIMM_BASELINES)
        return [model_case(name, _PAPER_BATCH[device_type], "paper") for name in names]
    raise ValueError(f"suite: expected one of {SUITES}, got {suite!r}")


def _backend_covers(backend: str, case: Case, device: torch.device, dtype: torch.dtype) -> bool:
    return all(backend in backends.available_backends(device, op, dtype) for op in case.ops_used)


def our_providers(case: Case, device: torch.device, dtype: torch.dtype,
                  requested: Optional[list[str]], mode: Optional[str] = None) -> list[tuple[str, str]]:
    """(provider name, backend) of our modules for ``case``: each requested backend (default:
    every available kernel backend, except ``triton`` on CPU, where it runs only under
    Triton's interpreter, and ``reference``/``native``) that can run every op of the case,
    plus ``fused_auto`` (the automatic choice: what a user gets), plus ``fused_triton_layer`` for a ``layer`` case in
    ``mode == "inference"`` on a GPU where ``fused_triton`` runs, plus, for an op case,
    ``fused_<b>_cl`` for each backend ``b`` (channels_last inputs and weights), plus, in
    ``mode == "forward_backward"``, ``fused_<b>_memsave``: the memory-saving training mode
    (``set_memory_saving``) of the backend ``b`` that ``auto`` picks (or the first one
    listed), whose peak memory the run compares with the default mode's and eager's
    (None: only the providers of every mode)."""
    if case.kind == "timm":
        return []
    if requested is None:
        # our kernel backends; not reference (the slow spec) nor native (the stock path,
        # which the eager baselines already time); fused_auto (what users get) always
        names = [b for b in backends.names() if b not in ("reference", "native")
                 and not (b == "triton" and device.type == "cpu")]
    else:
        names = [b for b in requested if b != "auto"]
    out = [(f"fused_{b}", b) for b in names if _backend_covers(b, case, device, dtype)]
    if (mode == "inference" and case.op == "layer" and device.type != "cpu"
            and ("fused_triton", "triton") in out):
        out.append((LAYER_FUSION_PROVIDER, "triton"))
    x = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
    plain = [b for p, b in out if p == f"fused_{b}"]  # not the layer-fusion provider's
    if case.kind == "op":
        out += [(f"fused_{b}{CHANNELS_LAST_SUFFIX}", b) for b in plain]
    if mode == "forward_backward" and plain:
        preferred = backends.resolve("auto", case.ops_used[0], x)
        b = preferred if preferred in plain else plain[0]
        out.append((f"fused_{b}{MEMORY_SAVING_SUFFIX}", b))
    if "auto" in (requested or ()) or requested is None:
        out.append(("fused_auto", "auto"))
        if case.kind == "op":
            out.append((f"fused_auto{CHANNELS_LAST_SUFFIX}", "auto"))
    return out
