"""Backend registry: which implementation runs a block op.

| backend     | device | kernels                                                 |
|-------------|--------|---------------------------------------------------------|
| ``cuda``      | GPU    | hand-written CUDA kernels of the compiled extension     |
| ``triton``    | GPU    | Triton kernels (CPU only under ``TRITON_INTERPRET=1``)  |
| ``cpu``       | CPU    | C++ kernels of the compiled extension                   |
| ``reference`` | any    | the composite PyTorch version (``convmixer_kernels.reference``) |

The choice comes from the ``backend=`` argument of a function or module, else from the
environment variable ``CONVMIXER_KERNELS_BACKEND``, else ``auto``. ``auto`` takes
the first usable backend in ``AUTO_ORDER`` for the input's device and logs once
which one it skipped and why; a backend named explicitly that cannot run raises
``BackendUnavailable`` with the reason.

A backend object implements ``unavailable(op, x)`` (None or a reason) and the
``forward``/``backward`` contract documented in ``convmixer_kernels.reference``.
"""
from __future__ import annotations

import importlib
import importlib.util
import logging
import os
from typing import Optional, Protocol

import torch
from torch import Tensor

from . import _cpp_lib, reference
from ._spec import SPECS

log = logging.getLogger("convmixer_kernels")

ENV_VAR = "CONVMIXER_KERNELS_BACKEND"
BACKEND_NAMES: tuple[str, ...] = ("cuda", "triton", "cpu", "reference")
AUTO_ORDER: dict[str, tuple[str, ...]] = {
    # cuda first: on an H100 its depthwise block ran 1.1-3.4x faster than triton's in every
    # mode but the channels_last training forward (benchmarks/GPU_NOTES.md); it has the
    # depthwise block only, so the GEMM blocks take triton.
    "cuda": ("cuda", "triton", "reference"),
    "cpu": ("cpu", "reference"),
}


class BackendUnavailable(RuntimeError):
    """An explicitly requested backend cannot run this op on this input."""


class Backend(Protocol):
    name: str

    def unavailable(self, op: str, x: Tensor) -> Optional[str]: ...

    def forward(self, op: str, *args) -> tuple[Tensor, Tensor, Tensor, Tensor]: ...

    def backward(self, op: str, *args) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]: ...


class ReferenceBackend:
    name = "reference"

    def unavailable(self, op: str, x: Tensor) -> Optional[str]:
        return None

    def forward(self, op: str, *args):
        return reference.forward(SPECS[op], *args)

    def backward(self, op: str, *args):
        return reference.backward(SPECS[op], *args)


class CompiledBackend:
    """Kernels of the compiled extension: the ops ``convmixer_kernels::{op}_forward_kernel``
    and ``{op}_backward_kernel``, whose CPU implementations (csrc/cpu) serve the ``cpu``
    backend and CUDA implementations (csrc/cuda) the ``cuda`` backend."""

    def __init__(self, name: str, device_type: str, dispatch_key: str, what: str,
                 dtypes: tuple[torch.dtype, ...]):
        self.name, self.device_type, self.dispatch_key, self.what = name, device_type, dispatch_key, what
        self.dtypes = dtypes

    def unavailable(self, op: str, x: Tensor) -> Optional[str]:
        if x.device.type != self.device_type:
            return f"it runs on {self.device_type} tensors, got a {x.device.type} tensor"
        ext = _cpp_lib.status()
        if ext is not None:
            return ext
        if not torch._C._dispatch_has_kernel_for_dispatch_key(
                f"convmixer_kernels::{op}_forward_kernel", self.dispatch_key):
            return f"this build of convmixer_kernels._C has no {self.what} for {op}"
        if x.dtype not in self.dtypes:
            names = ", ".join(str(d).replace("torch.", "") for d in self.dtypes)
            return f"its kernels take {names}, got {str(x.dtype).replace('torch.', '')}"
        return None

    def forward(self, op: str, *args):
        return getattr(torch.ops.convmixer_kernels, f"{op}_forward_kernel")(*args)

    def backward(self, op: str, *args):
        return getattr(torch.ops.convmixer_kernels, f"{op}_backward_kernel")(*args)


class TritonBackend:
    """Triton kernels (``convmixer_kernels._triton``): CUDA tensors, or CPU tensors when
    ``TRITON_INTERPRET=1`` was set before the first use (Triton's interpreter, which
    the CPU test suite runs them under)."""

    name = "triton"
    MODULES = {"dw_block": "dw_block", "pw_block": "pw_block", "patch_embed": "patch_embed"}
    dtypes = (torch.float32, torch.bfloat16, torch.float16)

    def unavailable(self, op: str, x: Tensor) -> Optional[str]:
        if x.device.type == "cpu":
            if os.environ.get("TRITON_INTERPRET", "0") != "1":
                return ("it runs on cuda tensors (cpu tensors only under TRITON_INTERPRET=1, "
                        "Triton's interpreter)")
        elif x.device.type != "cuda":
            return f"it runs on cuda tensors, got a {x.device.type} tensor"
        if importlib.util.find_spec("triton") is None:
            return "the triton package is not installed"
        if op not in self.MODULES:
            return f"this version of convmixer_kernels has no Triton kernel for {op} yet"
        if x.dtype not in self.dtypes:
            return ("its kernels take float32, bfloat16, float16, got "
                    f"{str(x.dtype).replace('torch.', '')}")
        return None

    def _module(self, op: str):
        return importlib.import_module(f"{__package__}._triton.{self.MODULES[op]}")

    def forward(self, op: str, *args):
        return self._module(op).forward(*args)

    def backward(self, op: str, *args):
        return self._module(op).backward(*args)


_HALF_AND_FLOAT = (torch.float32, torch.bfloat16, torch.float16)
_REGISTRY: dict[str, Backend] = {
    "reference": ReferenceBackend(),
    "cpu": CompiledBackend("cpu", "cpu", "CPU", "C++ CPU kernel", _HALF_AND_FLOAT),
    "cuda": CompiledBackend("cuda", "cuda", "CUDA", "CUDA kernel", _HALF_AND_FLOAT),
    "triton": TritonBackend(),
}


def register(backend: Backend) -> None:
    """Install (or replace) the implementation behind one of ``BACKEND_NAMES``."""
    if backend.name not in BACKEND_NAMES:
        raise ValueError(f"backend.name: expected one of {BACKEND_NAMES}, got {backend.name!r}")
    _REGISTRY[backend.name] = backend
    _logged.clear()


def get(name: str) -> Backend:
    return _REGISTRY[name]


def check_name(backend: object, arg: str = "backend") -> str:
    if not isinstance(backend, str) or backend not in BACKEND_NAMES + ("auto",):
        raise ValueError(f"{arg}: expected one of {BACKEND_NAMES + ('auto',)}, got {backend!r}")
    return backend


_logged: set[tuple[str, str]] = set()


def _requested(backend: Optional[str]) -> str:
    if backend is not None:
        return check_name(backend)
    return check_name(os.environ.get(ENV_VAR, "auto"), arg=f"environment variable {ENV_VAR}")


def _resolve_eager(requested: str, op: str, x: Tensor) -> str:
    if requested != "auto":
        reason = _REGISTRY[requested].unavailable(op, x)
        if reason is not None:
            raise BackendUnavailable(f"backend {requested!r} cannot run {op}: {reason}")
        return requested
    order = AUTO_ORDER.get(x.device.type, ("reference",))
    for name in order:
        reason = _REGISTRY[name].unavailable(op, x)
        if reason is None:
            return name
        key = (x.device.type, name)
        if key not in _logged:
            _logged.add(key)
            log.warning("convmixer_kernels: backend %r skipped for %s on %s (%s); trying %r",
                        name, op, x.device.type, reason, order[order.index(name) + 1])
    raise AssertionError("the reference backend is always available")


def _resolve_constant(requested: str, op: str, x: Tensor) -> str:
    """``_resolve_eager`` as a compile-time constant for torch.compile (no graph break)."""
    return _resolve_eager(requested, op, x)


# What torch.compiler.assume_constant_result(fn) does is set this flag; setting it here
# keeps `import convmixer_kernels` from importing torch._dynamo (and with it Triton).
# tests/test_semantics.py compiles with fullgraph=True, so a torch that changes this fails CI.
_resolve_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]


def resolve(backend: Optional[str], op: str, x: Tensor) -> str:
    """The concrete backend name that will run ``op`` on ``x``."""
    requested = _requested(backend)
    if torch.compiler.is_compiling():
        return _resolve_constant(requested, op, x)
    return _resolve_eager(requested, op, x)


def available_backends(device: str | torch.device = "cpu", op: str = "dw_block",
                       dtype: torch.dtype = torch.float32) -> list[str]:
    """Backends that can run ``op`` on a ``dtype`` tensor of ``device``."""
    x = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
    return [n for n in BACKEND_NAMES if _REGISTRY[n].unavailable(op, x) is None]


def explain(device: str | torch.device = "cpu", op: str = "dw_block") -> dict[str, str]:
    """Each backend's status for ``op`` on ``device``: 'available' or the reason it is not."""
    x = torch.empty(1, 1, 1, 1, device=device)
    return {n: _REGISTRY[n].unavailable(op, x) or "available" for n in BACKEND_NAMES}


def run_forward(backend: str, op: str, *args: object):
    return _REGISTRY[backend].forward(op, *args)


def run_backward(backend: str, op: str, *args: object):
    return _REGISTRY[backend].backward(op, *args)


__all__ = ["BACKEND_NAMES", "ENV_VAR", "AUTO_ORDER", "BackendUnavailable", "register", "get",
           "resolve", "available_backends", "explain"]
