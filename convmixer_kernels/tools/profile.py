"""``python -m convmixer_kernels profile``: one op or model under ``torch.profiler``.

Prints a per-op table (self time, share, calls, achieved GB/s and TFLOP/s where the
shapes give the counts: our block ops from ``roofline``'s formulas, aten convolutions
and matmuls from the profiler's FLOP counter and their input sizes), on GPU also the
kernel table, and writes a Chrome trace (open it in chrome://tracing or Perfetto). The
fused blocks show as ``convmixer_kernels.<op>`` ranges (NVTX ranges under
``torch.autograd.profiler.emit_nvtx``).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
from typing import Optional, Sequence

import torch

from .. import backends
from . import cases as _bench_cases
from .steps import build
from .roofline import Cost, l2_cache_bytes, op_cost
from .bench import DTYPE_ALIASES, DTYPES, _device, _positive

__all__ = ["add_arguments", "run_args", "known_cost"]

TARGETS = _bench_cases.OPS + tuple(_bench_cases.MODELS)
PROVIDERS = ("fused", "eager_nchw", "eager_channels_last", "compile")


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    pos_int, add = _positive(int), parser.add_argument
    add("--target", choices=TARGETS, default="layer", help="op or model to profile (default: layer)")
    add("--provider", choices=PROVIDERS, default="fused", help="what runs it (default: fused)")
    add("--backend", choices=backends.names() + ("auto",), default="auto",
        help="backend of the fused provider (default: auto)")
    add("--mode", choices=_bench_cases.MODES, default="forward_backward")
    add("--dtype", choices=tuple(DTYPES) + tuple(DTYPE_ALIASES), default=None,
        help="default: float32 on CPU, bfloat16 on CUDA")
    add("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    add("--steps", type=pos_int, default=3, help="profiled steps after 2 warm-up steps (default: 3)")
    add("--batch", type=pos_int, help="override N of the benchmark's quick shape")
    add("--dim", type=pos_int, help="override the channels (ops) or width (models)")
    add("--size", type=pos_int, help="override H = W of dw_block, pw_block and layer inputs")
    add("--kernel-size", type=_positive(int, odd=True), help="override the depthwise kernel size")
    add("--image-size", type=pos_int, help="override the image H = W of patch_embed and models")
    add("--patch-size", type=pos_int, help="override the patch size")
    add("--row-limit", type=pos_int, default=25, help="rows of each table (default: 25)")
    add("--trace", metavar="PATH", default=None,
        help="Chrome trace file (default: <--out>/convmixer-profile-<target>-<mode>.json)")
    add("--out", metavar="DIR", default="bench-results", help="directory of the default trace "
        "file (default: bench-results/, ignored by git)")
    return parser


def _shape_cost(name: str, shapes: Sequence, elem: int) -> Optional[Cost]:
    """Counts of one call of our block ops, from the shapes of x and the conv weight."""
    for op in ("dw_block", "pw_block", "patch_embed"):
        if name.startswith(f"convmixer_kernels::{op}_"):
            break
    else:
        return None
    if len(shapes) < 2 or len(shapes[0]) != 4 or len(shapes[1]) != 4:
        return None
    (n, c, h, w), (c_out, _, kh, _) = shapes[0], shapes[1]
    args = (op, n, c, c_out, h, w, kh, kh, elem)
    fwd = op_cost(*args, "inference")
    if "_backward" in name:
        both = op_cost(*args, "forward_backward")
        return Cost(both.gemm_flop - fwd.gemm_flop, both.simt_flop - fwd.simt_flop, both.bytes - fwd.bytes)
    return fwd


def known_cost(evt, elem: int) -> tuple[Optional[float], Optional[float]]:
    """(FLOPs, bytes) of all calls of a key-averaged event, where the shapes tell."""
    shapes = [s for s in (evt.input_shapes or []) if isinstance(s, (list, tuple))]
    cost = _shape_cost(evt.key, shapes, elem)
    if cost is not None:
        return cost.flop * evt.count, cost.bytes * evt.count
    flops = float(evt.flops) if getattr(evt, "flops", 0) else None
    tensors = [s for s in shapes if s]
    nbytes = sum(math.prod(s) for s in tensors) * elem * evt.count if flops and tensors else None
    return flops, nbytes


def op_table(prof, device: torch.device, elem: int, row_limit: int) -> str:
    """Self time per (op, input shapes), its share, calls and achieved rates."""
    cuda = device.type == "cuda"
    events = [e for e in prof.key_averages(group_by_input_shape=True)
              if (e.self_device_time_total if cuda else e.self_cpu_time_total) > 0]
    self_us = lambda e: e.self_device_time_total if cuda else e.self_cpu_time_total
    events.sort(key=self_us, reverse=True)
    total = sum(self_us(e) for e in events) or 1.0
    head = ("op", "input shapes", "calls", f"self {'GPU' if cuda else 'CPU'} ms", "share", "GB/s", "TFLOP/s")
    table = [head]
    for e in events[:row_limit]:
        flops, nbytes = known_cost(e, elem)
        seconds = self_us(e) * 1e-6
        shapes = str([list(s) for s in (e.input_shapes or []) if isinstance(s, (list, tuple)) and s])
        table.append((e.key[:48], shapes[:56], str(e.count), f"{self_us(e) / 1e3:.3f}",
                      f"{100 * self_us(e) / total:.1f}%",
                      f"{nbytes / seconds / 1e9:.1f}" if nbytes else "",
                      f"{flops / seconds / 1e12:.3f}" if flops else ""))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def run_args(a: argparse.Namespace) -> str:
    """Profile, print the tables, write the trace; return the trace's path."""
    # no "gpuGetDeviceCount failed" line from the profiler's GPU probe on a CPU machine
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from torch.profiler import ProfilerActivity, profile, record_function
    device = a.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype_name = DTYPE_ALIASES.get(a.dtype, a.dtype) or ("bfloat16" if device.type == "cuda" else "float32")
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if a.target in _bench_cases.OPS:
        case = next(c for c in _bench_cases.case_set(device.type, "ops", quick=True) if c.op == a.target)
    else:
        case = _bench_cases.model_case(a.target, _bench_cases._QUICK_MODEL_BATCH[device.type])
    case = case.with_overrides(batch=a.batch, dim=a.dim, size=a.size, image_size=a.image_size,
                               kernel_size=a.kernel_size, patch_size=a.patch_size)
    built = build(case, device, DTYPES[dtype_name], l2_cache_bytes(device))
    provider = "fused_" + a.backend if a.provider == "fused" else a.provider
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    trace = a.trace or os.path.join(a.out, f"convmixer-profile-{a.target}-{a.mode}.json")
    try:  # fail before profiling when the trace cannot be written
        os.makedirs(os.path.dirname(os.path.abspath(trace)), exist_ok=True)
        with open(trace, "a"):
            pass
    except OSError as exc:
        raise SystemExit(f"error: argument --trace: cannot write {trace}: {exc}") from None
    try:
        with built.provider(provider, a.backend if a.provider == "fused" else None, a.mode) as (step, _):
            for _ in range(2):
                step()
            with profile(activities=activities, record_shapes=True, with_flops=True, acc_events=True) as prof:
                for i in range(a.steps):
                    with record_function(f"step {i}"):
                        step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
    except backends.BackendUnavailable as e:
        raise SystemExit(f"error: argument --backend: {e}") from None
    print(f"convmixer_kernels profile | {case.op} [{case.label()}] | {a.mode} | {dtype_name} | "
          f"{provider} | {a.steps} steps on {device}")
    print(op_table(prof, device, built.elem_bytes, a.row_limit))
    if device.type == "cuda":
        print("\nGPU kernels:")
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=a.row_limit))
    prof.export_chrome_trace(trace)
    print(f"Chrome trace: {trace}", file=sys.stderr)
    return trace
