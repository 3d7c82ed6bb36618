"""Named ranges around each fused block, free when no profiler runs.

Inside ``torch.profiler.profile`` the ranges show in the table and the Chrome trace;
under ``torch.autograd.profiler.emit_nvtx`` (e.g. with Nsight Systems) they become NVTX
ranges. Without a profiler, and while torch.compile traces, no range is opened.
"""
from __future__ import annotations

import contextlib
from typing import Callable, ContextManager

import torch

__all__ = ["block_range"]


def block_range(fn: Callable) -> ContextManager:
    """``record_function("convmixer_kernels.<op>")`` when a profiler is active, else a no-op."""
    if torch.compiler.is_compiling() or not torch.autograd._profiler_enabled():
        return contextlib.nullcontext()
    return torch.profiler.record_function(f"convmixer_kernels.{fn.__name__}")
