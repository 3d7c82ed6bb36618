"""Backends: which implementation runs an op.

| backend     | device | what runs                                                          |
|-------------|--------|--------------------------------------------------------------------|
| ``cuda``      | GPU    | hand-written CUDA kernels of the compiled extension (``compiled``) |
| ``triton``    | GPU    | Triton kernels (CPU only under ``TRITON_INTERPRET=1``) (``triton``)|
| ``cpu``       | CPU    | C++ kernels of the compiled extension (``compiled``)               |
| ``native``    | any    | the stock modules' own composite: conv2d, act, batch_norm in the   |
|             |        | storage dtype (cuDNN/oneDNN), exactly what nn.Conv2d+BN run (``native``) |
| ``reference`` | any    | the float32-accumulating spec and test oracle (``reference``)      |

The choice comes from the ``backend=`` argument of a function or module, else from the
environment variable ``CONVMIXER_KERNELS_BACKEND``, else ``auto``. ``auto`` asks the
tuning table (``convmixer_kernels.backends.tuning``: the fastest path measured on this
kind of device for the op, mode, dtype, layout and nearest shape) and otherwise takes
the first usable backend in priority order. A backend named explicitly that cannot run
raises ``BackendUnavailable`` with the reason. ``explain(x, op)`` says what runs and why.

GPU kernels that have not passed the GPU test grid on their current source stay off by
default (``validation``: a committed manifest of source hashes): the cuda backend runs its
register-blocked depthwise kernels (v2) only where the manifest validates them or where the
user opts in with ``backend="cuda"`` and ``CONVMIXER_KERNELS_CUDA_DW_V2=1``; otherwise the
first kernels (v1). ``auto`` never picks the cuda backend while that opt-in asks it to run
unvalidated kernels. ``explain`` reports the state under ``'cuda_dw_v2'``.

The registry is open: ``register(MyBackend())`` adds a backend (``base.Backend`` is
the contract; ``docs/adding-a-backend.md`` has the steps).
"""
from __future__ import annotations

import logging
import os
from typing import Optional

import torch
from torch import Tensor

from . import tuning, validation
from .base import OPS, Backend, BackendUnavailable, BlockForward, BlockGrads
from .compiled import CPU, CUDA
from .native import NATIVE
from .reference import ReferenceBackend
from .triton import TRITON

log = logging.getLogger("convmixer_kernels")

ENV_VAR = "CONVMIXER_KERNELS_BACKEND"
_REGISTRY: dict[str, Backend] = {}

# What a block call will do, for the choice: 'eval' (a forward with running statistics),
# 'train' (batch statistics and/or a backward that wants the input's gradient),
# 'train_no_input_grad' (the same with an input that needs no gradient: a model's image
# into patch_embed, where the stock path skips the whole input-gradient GEMM).
MODES = ("eval", "train", "train_no_input_grad")


def block_mode(train: bool, input_grad: bool) -> str:
    """The mode of a block call (``MODES``): ``train`` for batch statistics or any gradient,
    ``input_grad`` whether the input itself will get a gradient."""
    if not train:
        return "eval"
    return "train" if input_grad else "train_no_input_grad"


_resolved: dict[tuple, str] = {}  # (backend asked, input signature) -> backend name
_generation = [0]  # bumped whenever a cached choice may be stale (register, tune)


def generation() -> int:
    """A counter that changes whenever cached backend choices must be made again."""
    return _generation[0]


def forget_choices() -> None:
    """Drop every cached choice (after ``register``, a new tuning table, ...)."""
    _resolved.clear()
    _generation[0] += 1


def register(backend: Backend) -> Backend:
    """Add (or replace) a backend under ``backend.name``; returns it."""
    if not isinstance(backend, Backend):
        raise TypeError(f"backend: expected a convmixer_kernels.backends.Backend, "
                        f"got {type(backend).__name__}")
    if not isinstance(backend.name, str) or not backend.name.isidentifier() or backend.name == "auto":
        raise ValueError(f"backend.name: expected an identifier other than 'auto', got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    forget_choices()
    return backend


def unregister(name: str) -> None:
    """Remove a backend added with ``register``."""
    _REGISTRY.pop(name, None)
    forget_choices()


for _b in (CUDA, TRITON, CPU, NATIVE, ReferenceBackend()):
    register(_b)


def names() -> tuple[str, ...]:
    """The registered backends, in ``auto``'s fallback order (priority)."""
    return tuple(sorted(_REGISTRY, key=lambda n: (_REGISTRY[n].priority, n)))


BACKEND_NAMES: tuple[str, ...] = names()  # the built-in ones


def get(name: str) -> Backend:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"backend: expected one of {names() + ('auto',)}, got {name!r}") from None


def check_name(backend: object, arg: str = "backend") -> str:
    if not isinstance(backend, str) or (backend != "auto" and backend not in _REGISTRY):
        raise ValueError(f"{arg}: expected one of {names() + ('auto',)}, got {backend!r}")
    return backend


# os.environ.get costs about 1 us (key encoding, a Mapping method); the per-call paths read
# the variable through os.environ's own store (kept in step with os.environ by os itself)
# where there is one.
_ENV_STORE = getattr(os.environ, "_data", None)
_ENV_KEY = os.environ.encodekey(ENV_VAR) if hasattr(os.environ, "encodekey") else None


def env_backend() -> Optional[str]:
    """The value of ``CONVMIXER_KERNELS_BACKEND`` now (None when unset); read at each call."""
    if _ENV_STORE is not None and _ENV_KEY is not None:
        v = _ENV_STORE.get(_ENV_KEY)
        return None if v is None else os.environ.decodevalue(v)
    return os.environ.get(ENV_VAR)


def requested(backend: Optional[str]) -> str:
    """The backend asked for: the argument, else the environment variable, else 'auto'."""
    if backend is not None:
        return check_name(backend)
    env = env_backend()
    return check_name("auto" if env is None else env, arg=f"environment variable {ENV_VAR}")


def _auto_refusal(name: str, op: str) -> Optional[str]:
    """Why ``auto`` must not pick backend ``name`` for ``op`` (None: it may): the cuda backend
    while CONVMIXER_KERNELS_CUDA_DW_V2=1 would make it run unvalidated v2 kernels."""
    if name != "cuda" or op not in ("dw_block", "layer_eval"):
        return None
    switch = validation.SWITCHES["dw_block_v2"]
    if os.environ.get(switch) != "1" or validation.is_validated("dw_block_v2"):
        return None
    return (f"{switch}=1 opts into the unvalidated v2 depthwise kernels, which auto never runs "
            "(ask for backend='cuda')")


def _auto_unavailable(name: str, op: str, x: Tensor) -> Optional[str]:
    return _REGISTRY[name].unavailable(op, x) or _auto_refusal(name, op)


def _fallback(op: str, x: Tensor) -> tuple[str, str]:
    skipped = []
    for name in names():
        reason = _auto_unavailable(name, op, x)
        if reason is None:
            why = "first usable backend in priority order"
            return name, why + ("" if not skipped else " (skipped: " + "; ".join(skipped) + ")")
        skipped.append(f"{name}: {reason}")
    raise AssertionError("the reference backend is always available")


def first_kernel(op: str, x: Tensor) -> str:
    """The first usable backend in priority order that runs our ops (not the stock
    composite): for what the stock path cannot do (memory saving, torch.compile)."""
    for name in names():
        b = _REGISTRY[name]
        if not getattr(b, "runs_composite", False) and _auto_unavailable(name, op, x) is None:
            return name
    raise AssertionError("the reference backend is always available")


def choose(backend: Optional[str], op: str, x: Tensor, mode: str = "eval",
           activation: str = "gelu", k: int = 1, cout: int = 0) -> tuple[str, str]:
    """(backend name, why) for running ``op`` on ``x``. ``mode``: one of ``MODES``
    (``block_mode``); ``k``: the conv's
    kernel (or patch) size; ``cout``: its output channels (0: x's channels)."""
    want = requested(backend)
    if want != "auto":
        reason = _REGISTRY[want].unavailable(op, x)
        if reason is not None:
            raise BackendUnavailable(f"backend {want!r} cannot run {op}: {reason}")
        return want, "requested" if backend is not None else f"{ENV_VAR}={want}"
    entry = tuning.lookup(op, x, mode, activation, k, cout or x.shape[1])
    if entry is not None:
        name, why = entry
        if name in _REGISTRY and _auto_unavailable(name, op, x) is None:
            return name, why
    return _fallback(op, x)



def _key(backend, op, x, mode, activation, k, cout) -> tuple:
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return (backend, env_backend(), os.environ.get(validation.SWITCHES["dw_block_v2"]), op,
            x.device.type, x.dtype, cl, tuple(x.shape),
            mode, activation, k, cout)


def _resolve_eager(backend, op, x, mode="eval", activation="gelu", k=1, cout=0) -> str:
    key = _key(backend, op, x, mode, activation, k, cout)
    name = _resolved.get(key)
    if name is None:
        name, why = choose(backend, op, x, mode, activation, k, cout)
        if len(_resolved) > 4096:
            _resolved.clear()
        _resolved[key] = name
        log.debug("convmixer_kernels: %s on %s -> %s (%s)", op, tuple(x.shape), name, why)
    return name


def _resolve_constant(backend, op, x, mode="eval", activation="gelu", k=1, cout=0) -> str:
    """``_resolve_eager`` as a compile-time constant for torch.compile (no graph break).

    Where ``auto`` would pick ``native``, the next backend in priority order runs
    instead: a compiled ConvMixerLayer whose depthwise block ran the stock composite
    updated that block's running statistics wrongly in training (torch 2.11, every
    torch.compile backend; tests/test_semantics.py), which the custom ops do not."""
    name = choose(backend, op, x, mode, activation, k, cout)[0]
    if getattr(_REGISTRY[name], "runs_composite", False) and requested(backend) == "auto":
        return first_kernel(op, x)
    return name


# What torch.compiler.assume_constant_result(fn) does is set this flag; setting it here
# keeps `import convmixer_kernels` from importing torch._dynamo (and with it Triton).
# tests/test_semantics.py compiles with fullgraph=True, so a torch that changes this fails CI.
_resolve_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve(backend: Optional[str], op: str, x: Tensor, mode: str = "eval",
            activation: str = "gelu", k: int = 1, cout: int = 0) -> str:
    """The concrete backend name that will run ``op`` on ``x`` (cached per input signature)."""
    if torch.compiler.is_compiling():
        return _resolve_constant(backend, op, x, mode, activation, k, cout)
    return _resolve_eager(backend, op, x, mode, activation, k, cout)


def available_backends(device: str | torch.device = "cpu", op: str = "dw_block",
                       dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run ``op`` on a ``dtype`` tensor of ``device``."""
    x = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
    return [n for n in names() if _REGISTRY[n].unavailable(op, x) is None]


def explain(x: Tensor, op: str = "dw_block", mode: str = "eval", activation: str = "gelu",
            k: int = 1, cout: int = 0, backend: Optional[str] = None) -> dict:
    """What runs ``op`` on the tensor ``x`` (an input, not a device or a backend name) and
    why: ``{'chosen': name, 'why': sentence, 'backends': {name: 'available' or reason}}``,
    and for the depthwise ops ``'cuda_dw_v2'``: whether the cuda backend's v2 kernels are
    validated (``validated``, ``why``) and what the cuda backend runs (``runs``: v1 or v2).
    ``mode``: one of ``MODES`` ('eval', 'train', 'train_no_input_grad'); ``k``: the conv's kernel or patch size (1 for pw_block);
    ``cout``: its output channels (0: x's)."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x: expected an input tensor (explain takes the tensor the op would "
                        f"run on; for a device use available_backends(device)), got {type(x).__name__}")
    if op not in OPS:
        raise ValueError(f"op: expected one of {OPS}, got {op!r}")
    if mode not in MODES:
        raise ValueError(f"mode: expected one of {MODES}, got {mode!r}")
    name, why = choose(backend, op, x, mode, activation, k, cout)
    out = {"chosen": name, "why": why,
           "backends": {n: _REGISTRY[n].unavailable(op, x) or "available" for n in names()}}
    if op in ("dw_block", "layer_eval"):
        out["cuda_dw_v2"] = validation.describe("dw_block_v2")
    return out


__all__ = ["BACKEND_NAMES", "ENV_VAR", "OPS", "Backend", "BackendUnavailable", "BlockForward",
           "BlockGrads", "register", "unregister", "names", "get", "check_name", "resolve",
           "choose", "block_mode", "MODES", "first_kernel", "available_backends", "explain", "tuning", "validation", "generation",
           "forget_choices"]
