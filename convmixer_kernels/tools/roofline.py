"""Roofline: FLOP and byte counts of each op (the one place for these formulas) and the
device ceilings measured once per benchmark run.

Counts, for a case with batch N, input channels C, output channels C_out, input H x W,
kernel k, patch p and storage element size s bytes:

- FLOPs are the convolutions' multiply-adds (2 per MAC); bias, activation, BatchNorm
  and the residual are a few operations per element and are not counted.
  ``forward_backward`` counts the forward plus the input gradient (dgrad, same FLOPs
  as the forward) and the weight gradient (wgrad, same again), except that images
  (patch embedding, whole models) need no input gradient.
- Bytes are the compulsory traffic: every tensor the op must read or write, once
  (inputs, outputs, weights; backward: x and dy read, dx written). A fused kernel
  cannot move less; stock PyTorch moves several times more.
- Whole models add the classifier head and, in training, one SGD-with-momentum
  step (read param, grad, momentum; write param, momentum).

The floor time of a case is max(bytes / copy bandwidth, GEMM FLOPs / matmul rate +
depthwise FLOPs / FMA rate); "% of roofline" is floor / measured median.
"""
from __future__ import annotations

import glob
import os
from dataclasses import dataclass
from typing import Callable

import torch

from .timing import median_ms

__all__ = ["Cost", "Peaks", "case_cost", "measure_peaks", "l2_cache_bytes"]

IN_CHANS = 3


@dataclass(frozen=True)
class Cost:
    """FLOPs on GEMM units (1x1 conv, patch conv, head), FLOPs on vector FMA units
    (depthwise conv) and compulsory bytes moved."""

    gemm_flop: float = 0.0
    simt_flop: float = 0.0
    bytes: float = 0.0

    def __add__(self, other: Cost) -> Cost:
        return Cost(self.gemm_flop + other.gemm_flop, self.simt_flop + other.simt_flop,
                    self.bytes + other.bytes)

    def __mul__(self, n: float) -> Cost:
        return Cost(self.gemm_flop * n, self.simt_flop * n, self.bytes * n)

    @property
    def flop(self) -> float:
        return self.gemm_flop + self.simt_flop


@dataclass(frozen=True)
class Peaks:
    """Measured ceilings of the device: copy bandwidth (GB/s, read + write counted),
    matmul rate and vector FMA rate (TFLOP/s)."""

    copy_gbps: float
    matmul_tflops: float
    fma_tflops: float
    matmul_dtype: str
    how: str

    def floor_ms(self, cost: Cost) -> float:
        memory_s = cost.bytes / (self.copy_gbps * 1e9)
        compute_s = cost.gemm_flop / (self.matmul_tflops * 1e12) + cost.simt_flop / (self.fma_tflops * 1e12)
        return max(memory_s, compute_s) * 1e3


def _dw(n: int, c: int, h: int, w: int, k: int, s: int, mode: str) -> Cost:
    elems, flop = n * c * h * w, 2.0 * k * k * n * c * h * w
    weights = c * (k * k + 1) * s
    if mode == "forward_backward":  # x read, y written; backward: x, dy read, dx written
        return Cost(simt_flop=3 * flop, bytes=5 * elems * s + 3 * weights)
    return Cost(simt_flop=flop, bytes=2 * elems * s + weights)


def _gemm_block(n: int, c_in: int, c_out: int, h_out: int, w_out: int, taps: int, in_elems: int,
                s: int, mode: str, needs_dx: bool) -> Cost:
    """A conv as a GEMM (1x1 or p x p stride p): taps = kernel area."""
    out_elems = n * c_out * h_out * w_out
    flop = 2.0 * n * h_out * w_out * c_out * c_in * taps
    weights = c_out * (c_in * taps + 1) * s
    if mode == "forward_backward":
        passes = 3 if needs_dx else 2
        return Cost(gemm_flop=passes * flop,
                    bytes=((3 if needs_dx else 2) * in_elems + 2 * out_elems) * s + 3 * weights)
    return Cost(gemm_flop=flop, bytes=(in_elems + out_elems) * s + weights)


def op_cost(op: str, n: int, c: int, c_out: int, h: int, w: int, k: int, p: int, s: int, mode: str,
            needs_dx: bool = True) -> Cost:
    """Cost of one block op (``dw_block``, ``pw_block``, ``patch_embed``, ``layer``)."""
    if op == "dw_block":
        return _dw(n, c, h, w, k, s, mode)
    if op == "pw_block":
        return _gemm_block(n, c, c_out, h, w, 1, n * c * h * w, s, mode, needs_dx)
    if op == "patch_embed":
        return _gemm_block(n, c, c_out, h // p, w // p, p * p, n * c * h * w, s, mode, needs_dx=False)
    if op == "layer":
        return _dw(n, c, h, w, k, s, mode) + op_cost("pw_block", n, c, c, h, w, 1, 1, s, mode)
    raise ValueError(f"op: expected dw_block, pw_block, patch_embed or layer, got {op!r}")


def model_cost(n: int, dim: int, depth: int, image: int, k: int, p: int, num_classes: int, s: int,
               mode: str) -> Cost:
    """Cost of a whole ConvMixer (stem, depth layers, pooling + head, SGD step in training)."""
    tokens = image // p
    cost = op_cost("patch_embed", n, IN_CHANS, dim, image, image, 1, p, s, mode)
    cost = cost + op_cost("layer", n, dim, dim, tokens, tokens, k, 1, s, mode) * depth
    head = Cost(gemm_flop=2.0 * n * dim * num_classes, bytes=(dim * num_classes + n * dim) * s)
    cost = cost + head * (3 if mode == "forward_backward" else 1)
    if mode == "forward_backward":
        params = (IN_CHANS * p * p + 3) * dim + depth * dim * (k * k + dim + 6) + (dim + 1) * num_classes
        cost = cost + Cost(bytes=5 * params * s)
    return cost


def l2_cache_bytes(device: torch.device) -> int:
    """Size of the last-level-but-one cache the benchmark rotates inputs against (GPU: L2;
    CPU: one core's L2 from sysfs, 1 MiB if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    for index in sorted(glob.glob("/sys/devices/system/cpu/cpu0/cache/index*")):
        try:
            with open(os.path.join(index, "level")) as f:
                if f.read().strip() != "2":
                    continue
            with open(os.path.join(index, "size")) as f:
                text = f.read().strip().upper()
        except OSError:
            continue
        scale = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        return int(text.rstrip("KMG")) * scale
    return 1 << 20


def _fma_rate_cuda(device: torch.device, time_ms: Callable[[Callable[[], object]], float]) -> float:
    """TFLOP/s of fp32 FMA chains in registers (a Triton kernel: the CUDA cores' ceiling)."""
    import triton
    import triton.language as tl

    @triton.jit
    def fma_chains(out_ptr, ITERS: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        a = offs.to(tl.float32) * 1e-9
        b, c, d = a + 0.5, a + 0.25, a + 0.125
        for _ in range(ITERS):  # four independent dependency chains per thread
            a = a * 0.999 + 0.001
            b = b * 0.999 + 0.001
            c = c * 0.999 + 0.001
            d = d * 0.999 + 0.001
        tl.store(out_ptr + offs, a + b + c + d)

    block, iters = 1024, 4096
    blocks = torch.cuda.get_device_properties(device).multi_processor_count * 64
    out = torch.empty(blocks * block, device=device)
    ms = time_ms(lambda: fma_chains[(blocks,)](out, ITERS=iters, BLOCK=block))
    return 2.0 * 4 * iters * out.numel() / (ms * 1e-3) / 1e12


def _fma_rate_cpu(time_ms: Callable[[Callable[[], object]], float]) -> float | None:
    """TFLOP/s of fp32 FMA chains in registers on every thread (the compiled extension's
    ``_cpu_fma_chains``, on the widest vectors the cpu kernels use), or None without the
    extension. torch's fp32 GEMM is no ceiling for the vector units: its BLAS may not use
    the widest vectors a CPU has."""
    from .. import _cpp_lib

    if _cpp_lib.testing_status() is not None:
        return None
    _cpp_lib.load_testing()
    chains = torch.ops.convmixer_kernels._cpu_fma_chains
    iters = 1 << 20
    flops = float(chains(1)[0]) * iters  # FLOPs per call grow linearly with iters
    return flops / (time_ms(lambda: chains(iters)) * 1e-3) / 1e12


_PEAKS: dict[tuple[str, float], Peaks] = {}


def measure_peaks(device: torch.device, budget_s: float) -> Peaks:
    """Measure the device's ceilings once per process: a large copy, a large matmul (bf16
    on GPU, fp32 on CPU) and an FMA rate (GPU: a Triton FMA-chain kernel; CPU: the
    extension's FMA chains on every thread, or the fp32 GEMM's rate if higher or if the
    extension is not built). Each is the median of ``budget_s``
    seconds of timing."""
    key = (str(device), budget_s)
    if key not in _PEAKS:
        _PEAKS[key] = _measure_peaks(device, median_ms(device, budget_s))
    return _PEAKS[key]


def _measure_peaks(device: torch.device, time_ms: Callable[[Callable[[], object]], float]) -> Peaks:
    cuda = device.type == "cuda"
    copy_bytes = (1 << 30) if cuda else (128 << 20)
    src = torch.rand(copy_bytes // 4, device=device)
    dst = torch.empty_like(src)
    copy_gbps = 2 * copy_bytes / (time_ms(lambda: dst.copy_(src)) * 1e-3) / 1e9
    del src, dst
    size = 8192 if cuda else 1024
    mm_dtype = torch.bfloat16 if cuda else torch.float32
    a = torch.randn(size, size, device=device, dtype=mm_dtype)
    b = torch.randn(size, size, device=device, dtype=mm_dtype)
    matmul = 2.0 * size ** 3 / (time_ms(lambda: torch.mm(a, b)) * 1e-3) / 1e12
    if cuda:
        fma, how = _fma_rate_cuda(device, time_ms), "copy 1 GiB; bf16 mm 8192^3; Triton fp32 FMA chains"
    else:
        chains = _fma_rate_cpu(time_ms)
        if chains is None:
            fma, how = matmul, "copy 128 MiB; fp32 mm 1024^3; FMA rate = fp32 mm rate (no extension)"
        else:  # the higher of the two: both run on the vector FMA units
            fma, how = max(matmul, chains), "copy 128 MiB; fp32 mm 1024^3; fp32 FMA chains (extension)"
    return Peaks(copy_gbps, matmul, fma, str(mm_dtype).replace("torch.", ""), how)
