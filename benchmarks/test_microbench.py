"""pytest-benchmark microbenchmarks of the fused ops against the baselines.

    pytest benchmarks --benchmark-only [--benchmark-json out.json]

Shapes and providers come from the registry the CLI uses
(``convmixer_kernels.tools.cases``): the quick ``ops`` cases of the current device
(cuda if available), every mode, our available backends (not ``triton`` on CPU) and the
eager baselines; ``CONVMIXER_BENCH_COMPILE=1`` adds ``torch.compile``. The repository's
normal ``pytest`` run (testpaths = tests) does not collect this file.
"""
from __future__ import annotations

import os

import pytest
import torch

from convmixer_kernels.tools.cases import MODES, case_set, our_providers
from convmixer_kernels.tools.steps import build
from convmixer_kernels.tools.roofline import l2_cache_bytes

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
CASES = case_set(DEVICE.type, "ops", quick=True)
BASELINES = ["eager_nchw", "eager_channels_last"] + (
    ["compile"] if os.environ.get("CONVMIXER_BENCH_COMPILE") == "1" else [])
PARAMS = [pytest.param(case, provider, backend, mode, id=f"{case.op}-{mode}-{provider}")
          for case in CASES for mode in MODES
          for provider, backend in our_providers(case, DEVICE, DTYPE, None) + [(b, None) for b in BASELINES]]

if DEVICE.type == "cuda":
    torch.backends.cudnn.benchmark = True


@pytest.fixture(scope="module")
def built_cases() -> dict:
    return {}


@pytest.mark.parametrize("case, provider, backend, mode", PARAMS)
def test_microbench(benchmark, built_cases, case, provider, backend, mode):
    if case not in built_cases:
        built_cases.clear()  # one case's tensors at a time
        built_cases[case] = build(case, DEVICE, DTYPE, l2_cache_bytes(DEVICE))
    built = built_cases[case]
    with built.provider(provider, backend, mode) as (step, forward):
        assert torch.isfinite(forward()).all()
        for _ in range(3):
            step()
        if DEVICE.type == "cuda":
            def timed() -> None:
                step()
                torch.cuda.synchronize(DEVICE)
        else:
            timed = step
        benchmark.extra_info.update(op=case.op, shape=case.label(), mode=mode, provider=provider,
                                    dtype=str(DTYPE).replace("torch.", ""))
        benchmark(timed)
