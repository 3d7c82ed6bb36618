"""Cost of the CPU GELU per element: the fused CPU kernels' GELU (the activation alone,
through the test op ``_cpu_activation_into``, in chunks over ``at::parallel_for`` as the
kernels call it per tile) against PyTorch's float32 ``gelu`` / ``gelu_backward`` on the
same tensor. ``python -m convmixer_kernels.tools.gelu_cost [--n N] [--rounds R]``

Forward: a = gelu(z). Forward + derivative: ours computes a and gelu'(z) in one pass;
PyTorch's is ``gelu`` then ``gelu_backward`` with a gradient of ones (what its autograd
runs). z = scale * randn (float32, contiguous; scale 3 by default); ns per element, median
of interleaved rounds with the min and max, for 1 thread and for every core.
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from .. import _cpp_lib


def _ns_per_elem(fn, n: int, calls: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - start) / calls / n * 1e9


def providers(z: torch.Tensor) -> dict:
    into = torch.ops.convmixer_kernels._cpu_activation_into
    a, d, g = torch.empty_like(z), torch.empty_like(z), torch.ones_like(z)
    return {
        ("forward", "torch"): lambda: torch.ops.aten.gelu.out(z, out=a),
        ("forward", "ours"): lambda: into(z, a, None, "gelu"),
        ("forward+deriv", "torch"): lambda: (torch.ops.aten.gelu.out(z, out=a),
                                             torch.ops.aten.gelu_backward.grad_input(g, z, grad_input=d)),
        ("forward+deriv", "ours"): lambda: into(z, a, d, "gelu"),
    }


def measure(n: int = 1 << 22, rounds: int = 7, calls: int = 5, threads=(1, None),
            scale: float = 3.0) -> list[tuple]:
    """[(threads, mode, provider, median ns/elem, min, max)] over `rounds` interleaved rounds."""
    _cpp_lib.load_testing()
    torch.manual_seed(0)
    z = torch.randn(n) * scale
    rows = []
    for t in threads:
        t = t or os.cpu_count()
        torch.set_num_threads(t)
        fns = providers(z)
        samples = {k: [] for k in fns}
        for _ in range(rounds):
            for k, fn in fns.items():
                samples[k].append(_ns_per_elem(fn, n, calls))
        rows += [(t, *k, statistics.median(v), min(v), max(v)) for k, v in samples.items()]
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1 << 22, help="elements (default 2^22)")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--scale", type=float, default=3.0, help="z = scale * randn (default 3)")
    args = parser.parse_args(argv)
    print(f"{'threads':>7} {'mode':<14} {'provider':<6} {'ns/elem':>8} {'min':>7} {'max':>7}")
    for t, mode, prov, med, lo, hi in measure(args.n, args.rounds, scale=args.scale):
        print(f"{t:>7} {mode:<14} {prov:<6} {med:8.3f} {lo:7.3f} {hi:7.3f}")


if __name__ == "__main__":
    main()
