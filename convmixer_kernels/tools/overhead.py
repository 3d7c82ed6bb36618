"""Host time of one block call on tiny tensors: the Python and dispatcher path, which does
not depend on the device. ``python -m convmixer_kernels.tools.overhead``

Times the stock modules (``Residual(Sequential(conv, act, BN))`` and
``Sequential(conv1x1, act, BN)``) against the fused modules with each backend, in eval
(no_grad) and training forward, on a (1, 8, 4, 4) float32 input with 1 thread; prints
microseconds per call (median of interleaved rounds) and the ratio to stock.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from .. import backends
from ..modules import DepthwiseBlock, PointwiseBlock
from .tune import HOST_BOUND_CALLS, HOST_BOUND_SHAPE  # the calls tune measures for this end


class _Residual(nn.Module):
    def __init__(self, fn: nn.Module):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return x + self.fn(x)


def _per_call_us(fn, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls * 1e6


def measure(rounds: int = 7, calls: int = 2000, names=None) -> list[tuple[str, str, str, float, float]]:
    """[(block, mode, provider, us per call, ratio to stock)]."""
    torch.set_num_threads(1)
    x = torch.randn(*HOST_BOUND_SHAPE)
    c = HOST_BOUND_SHAPE[1]
    rows = []
    for block, fused in (("dw_block", DepthwiseBlock(c, dict(HOST_BOUND_CALLS)["dw_block"])),
                         ("pw_block", PointwiseBlock(c))):
        stock = (_Residual(copy.deepcopy(fused.fn)) if block == "dw_block"
                 else nn.Sequential(*[copy.deepcopy(m) for m in fused]))
        providers = {"stock": stock}
        for name in names or ("auto",) + tuple(n for n in backends.names() if n != "triton"):
            m = copy.deepcopy(fused)
            if name != "auto":
                m.backend = name
            if backends.get(name if name != "auto" else "reference").unavailable(block, x) is None:
                providers[name] = m
        if block == "pw_block":  # the stock output layout, as the stock block writes it
            for m in providers.values():
                if isinstance(m, PointwiseBlock):
                    m.memory_format = None
        for mode in ("eval", "train"):
            fns = {}
            for name, m in providers.items():
                m.train(mode == "train")
                if mode == "eval":
                    fns[name] = (lambda m=m: _nograd(m, x))
                else:
                    fns[name] = (lambda m=m: m(x))
            times = {n: [] for n in fns}
            for f in fns.values():
                _per_call_us(f, 50)
            for _ in range(rounds):
                for n, f in fns.items():
                    times[n].append(_per_call_us(f, calls))
            med = {n: statistics.median(v) for n, v in times.items()}
            for n, us in med.items():
                rows.append((block, mode, n, us, us / med["stock"]))
    return rows


def _nograd(m, x):
    with torch.no_grad():
        return m(x)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--calls", type=int, default=2000)
    a = p.parse_args(argv)
    print(f"{'block':<9} {'mode':<6} {'provider':<10} {'us/call':>8} {'vs stock':>9}")
    for block, mode, name, us, ratio in measure(a.rounds, a.calls):
        print(f"{block:<9} {mode:<6} {name:<10} {us:8.1f} {ratio:8.2f}x")


if __name__ == "__main__":
    main()
