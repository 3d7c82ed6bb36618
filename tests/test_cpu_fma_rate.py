"""The CPU roofline's FMA ceiling: ``convmixer_kernels::_cpu_fma_chains(iters)`` (csrc/testing/
fma_rate.cpp) and its use by ``_roofline.measure_peaks`` on CPU."""
from __future__ import annotations

import pytest
import torch

from convmixer_kernels import _cpp_lib
from convmixer_kernels.tools import roofline as _roofline
from convmixer_kernels.tools.timing import median_ms

_REASON = _cpp_lib.testing_status()
if _REASON is not None:
    pytest.skip(f"compiled extension unavailable: {_REASON}", allow_module_level=True)
_cpp_lib.load_testing()
chains = torch.ops.convmixer_kernels._cpu_fma_chains
CHAINS = 12  # independent chains per thread (fma_rate.cpp)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("iters", [1, 7, 1000])
def test_flop_count_and_checksum(iters, threads):
    """FLOPs = 2 x iters x chains x lanes x threads; every lane of every chain follows
    a <- 0.999 a + 1e-6 from its start value (chain i of thread t starts at i + t)."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        flops, checksum = chains(iters).tolist()
    finally:
        torch.set_num_threads(old)
    lanes = flops / (2 * iters * CHAINS * threads)
    # vector widths a build may run: 1 (no AVX2/FMA), 8 (AVX2), 16 (AVX-512)
    assert lanes in (1, 8, 16), f"flops {flops} do not match whole vectors ({lanes} lanes)"
    m, c = 0.999, 1e-6
    want = sum((m ** iters) * (i + t) + c * (1 - m ** iters) / (1 - m)
               for t in range(threads) for i in range(CHAINS)) * lanes
    print(f"iters={iters} threads={threads} lanes={lanes:g} checksum={checksum} expected={want}")
    assert checksum == pytest.approx(want, rel=1e-4, abs=1e-6)


def test_isa_switch_selects_the_vector_width(monkeypatch):
    """CONVMIXER_KERNELS_CPU_ISA=avx2 (read at each call) runs 8-lane chains where the
    default ran 16 (an AVX-512 CPU); elsewhere both ask for the same width."""
    monkeypatch.delenv("CONVMIXER_KERNELS_CPU_ISA", raising=False)
    default = chains(10)[0].item()
    monkeypatch.setenv("CONVMIXER_KERNELS_CPU_ISA", "avx2")
    forced = chains(10)[0].item()
    assert forced == default or forced * 2 == default


@pytest.mark.parametrize("iters", [0, -3])
def test_bad_iters(iters):
    with pytest.raises(ValueError, match="iters"):
        chains(iters)


def test_cpu_peaks_use_the_chains():
    """measure_peaks on CPU: the FMA rate is the chains' (at least the GEMM's), named in
    peaks_how, and positive."""
    cpu = torch.device("cpu")
    peaks = _roofline._measure_peaks(cpu, median_ms(cpu, 0.05))
    assert "FMA chains" in peaks.how
    assert peaks.fma_tflops >= peaks.matmul_tflops > 0

