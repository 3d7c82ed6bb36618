"""Timing and peak memory of one benchmark step.

GPU: ``triton.testing.do_bench`` (warm-up, L2 flush between calls, quantiles); Triton
is imported only here and only for CUDA devices. CPU: ``torch.utils.benchmark.Timer``
(``blocked_autorange``; percentiles over its blocks).
"""
from __future__ import annotations

import json
import math
import os
import tempfile
from typing import Callable, Sequence

import torch

__all__ = ["time_ms", "peak_memory_mb", "PEAK_MEMORY_HOW", "MIN_SAMPLES"]

MIN_SAMPLES = 3  # fewest timed blocks per CPU measurement (a slow step gets only one block)
PEAK_MEMORY_HOW = {
    "cuda": "torch.cuda.max_memory_allocated during one step (params, inputs and grads included)",
    "cpu": "peak of torch CPU allocations during one step above the tensors live before it "
           "(torch.profiler profile_memory)",
}


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def time_ms(step: Callable[[], object], device: torch.device, budget_s: float) -> tuple[float, float, float]:
    """(p50, p20, p80) in milliseconds of ``step()``; ``budget_s`` seconds of timing
    (CPU: ``min_run_time``; GPU: do_bench's ``rep``, with a quarter of it as warm-up)."""
    if device.type == "cuda":
        from triton.testing import do_bench  # lazily: importing the package never loads Triton
        with torch.cuda.device(device):
            p50, p20, p80 = do_bench(step, warmup=max(1.0, budget_s * 250), rep=budget_s * 1e3,
                                     quantiles=[0.5, 0.2, 0.8])
        return p50, p20, p80
    from torch.utils.benchmark import Timer
    timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=budget_s)
    times = list(measurement.times)  # seconds per call, one entry per block
    while len(times) < MIN_SAMPLES:  # a slow call gives few blocks: add some for the percentiles
        times += timer.timeit(measurement.number_per_run).times
    times = sorted(t * 1e3 for t in times)
    p50, p20, p80 = (_percentile(times, q) for q in (0.5, 0.2, 0.8))
    return p50, p20, p80


def median_ms(device: torch.device, budget_s: float) -> Callable[[Callable[[], object]], float]:
    """``fn -> p50 ms`` with this device and budget (what the roofline measurement takes)."""
    def measure(fn: Callable[[], object]) -> float:
        for _ in range(2):
            fn()
        return time_ms(fn, device, budget_s)[0]
    return measure


def peak_memory_mb(step: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of ``step`` in MiB (see ``PEAK_MEMORY_HOW``)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    # no "gpuGetDeviceCount failed" line from the profiler's GPU probe on a CPU machine
    if not torch.cuda.is_available():
        os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, acc_events=True) as prof:
        step()
    # Every allocation and free is a "[memory]" instant event of the trace, with its size.
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    deltas = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                    if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0)
    live = peak = 0
    for _, delta in deltas:
        live += delta
        peak = max(peak, live)
    return peak / 2 ** 20
