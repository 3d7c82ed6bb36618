"""Guarded loader for the compiled extension ``convmixer_kernels._C``.

``import convmixer_kernels`` never loads it; ``load()`` does on first need. A missing
or mismatched build gives a message saying what was found and what was expected;
``status()`` returns that message (None when the extension is usable).
"""
from __future__ import annotations

import functools
import importlib
import json
from types import ModuleType

import torch


class ExtensionUnavailable(RuntimeError):
    """The compiled extension is missing or does not match this torch."""


@functools.lru_cache(maxsize=None)
def _try_load() -> tuple[ModuleType | None, str | None]:
    try:
        module = importlib.import_module("convmixer_kernels._C")
    except ImportError as exc:  # not built, or built against another torch (undefined symbol)
        return None, (
            f"the compiled extension convmixer_kernels._C could not be imported ({exc}). "
            "Build it against the installed torch with `pip install --no-build-isolation -e .` "
            f"(installed torch: {torch.__version__})."
        )
    info = build_info_of()
    built = info.get("torch_version")
    if built != torch.__version__:
        return None, (f"convmixer_kernels._C was built against torch {built}, but torch "
                      f"{torch.__version__} is installed: rebuild with "
                      "`pip install --no-build-isolation -e .`")
    _register_fakes()
    return module, None


def _register_fakes() -> None:
    """Shape-only implementations of the compiled ops, for torch.compile and opcheck."""
    torch.library.register_fake("convmixer_kernels::_axpb")(
        lambda x, a, b: torch.empty(x.shape, dtype=x.dtype, device=x.device))


def build_info_of() -> dict:
    """What the loaded extension was built with (torch version, CUDA, arch list)."""
    return json.loads(torch.ops.convmixer_kernels._build_info())


def status() -> str | None:
    """None if the extension is usable, else why not."""
    return _try_load()[1]


def load() -> ModuleType:
    module, reason = _try_load()
    if module is None:
        raise ExtensionUnavailable(reason)
    return module


def has_cuda_kernels() -> bool:
    """Whether the loaded extension was compiled with its CUDA sources."""
    return status() is None and bool(build_info_of().get("cuda"))
