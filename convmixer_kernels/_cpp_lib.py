"""Guarded loaders for the compiled extensions.

``convmixer_kernels._C`` holds the production kernels; ``convmixer_kernels._C_testing``
(built from csrc/testing/) the test- and benchmark-only ops ``_axpb``, ``_cpu_activation``
and ``_cpu_fma_chains``. ``import convmixer_kernels`` loads neither; ``load()`` and
``load_testing()`` do on first need. A missing or mismatched build gives a message saying
what was found and what was expected; ``status()`` (``testing_status()``) returns that
message (None when the extension is usable).

The schemas of the block kernels (``{block}_{forward,backward}_kernel``) come from one
table, ``convmixer_kernels.schema.KERNEL_SCHEMAS``: they are defined here, on
``_LIB``, right before ``_C`` is imported, and the C++ only registers implementations
(``TORCH_LIBRARY_IMPL``).
"""
from __future__ import annotations

import functools
import importlib
import json
from types import ModuleType

import torch

from .schema import KERNEL_SCHEMAS

# The library fragment that holds the block kernels' schemas (kept alive for the process:
# dropping a Library object removes its definitions).
_LIB = torch.library.Library("convmixer_kernels", "FRAGMENT")
_DEFINED: set[str] = set()  # the names defined on _LIB


class ExtensionUnavailable(RuntimeError):
    """The compiled extension is missing or does not match this torch."""


def _define_kernel_schemas() -> None:
    """Define the block kernels' schemas on _LIB (once per process), before _C registers
    their implementations."""
    for name, schema in KERNEL_SCHEMAS.items():
        if name not in _DEFINED:
            _LIB.define(name + schema)
            _DEFINED.add(name)


def _import(name: str) -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module(f"convmixer_kernels.{name}")
    except ImportError as exc:  # not built, or built against another torch (undefined symbol)
        return None, (
            f"the compiled extension convmixer_kernels.{name} could not be imported ({exc}). "
            "Build it against the installed torch with `pip install --no-build-isolation -e .` "
            f"(installed torch: {torch.__version__})."
        )
    return module, None


@functools.lru_cache(maxsize=None)
def _try_load() -> tuple[ModuleType | None, str | None]:
    _define_kernel_schemas()
    module, reason = _import("_C")
    if module is None:
        return None, reason
    info = build_info_of()
    built = info.get("torch_version")
    if built != torch.__version__:
        return None, (f"convmixer_kernels._C was built against torch {built}, but torch "
                      f"{torch.__version__} is installed: rebuild with "
                      "`pip install --no-build-isolation -e .`")
    # The v2 CUDA kernels' gate: on only where the manifest validates this build's source
    # (convmixer_kernels.backends.validation); never raises.
    from .backends import validation
    validation.sync_extension()
    return module, None


@functools.lru_cache(maxsize=None)
def _try_load_testing() -> tuple[ModuleType | None, str | None]:
    _, reason = _try_load()  # the same build: a mismatched _C means a mismatched _C_testing
    if reason is not None:
        return None, reason
    module, reason = _import("_C_testing")
    if module is None:
        return None, reason
    _register_testing_fakes()
    return module, None


def _register_testing_fakes() -> None:
    """Shape-only implementations of the test ops, for torch.compile and opcheck."""
    torch.library.register_fake("convmixer_kernels::_axpb")(
        lambda x, a, b: torch.empty(x.shape, dtype=x.dtype, device=x.device))


def build_info_of() -> dict:
    """What the loaded extension was built with (torch version, CUDA, arch list)."""
    return json.loads(torch.ops.convmixer_kernels._build_info())


def status() -> str | None:
    """None if the extension is usable, else why not."""
    return _try_load()[1]


def testing_status() -> str | None:
    """None if the test-only extension (_C_testing) is usable, else why not."""
    return _try_load_testing()[1]


def load() -> ModuleType:
    module, reason = _try_load()
    if module is None:
        raise ExtensionUnavailable(reason)
    return module


def load_testing() -> ModuleType:
    """Load ``convmixer_kernels._C_testing``: the ops ``_axpb``, ``_cpu_activation``,
    ``_cpu_activation_into`` and ``_cpu_fma_chains`` (tests and the benchmark's roofline only; built beside ``_C``)."""
    module, reason = _try_load_testing()
    if module is None:
        raise ExtensionUnavailable(reason)
    return module


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was compiled with its CUDA sources."""
    return status() is None and bool(build_info_of().get("cuda"))
