"""Run every CUDA depthwise-block kernel once per case, small shapes, for compute-sanitizer.

    compute-sanitizer --tool memcheck  python scripts/cuda_sanitize.py
    compute-sanitizer --tool racecheck python scripts/cuda_sanitize.py --quick

Cases cover the unrolled and run-time kernel sizes, planes smaller than a tile and not a
multiple of it, NCHW / channels_last / strided inputs, the three storage dtypes, train and
eval, saved and recomputed pre-activation. Each case's results are checked against the
reference backend as well (loosely: this is a memory checker's driver, the tolerances are
tests/test_cuda_backend.py's job), so a kernel that reads the wrong memory cannot pass quietly.
Exit status 1 on any mismatch."""
from __future__ import annotations

import argparse
import sys

import torch

import convmixer_kernels as ck
from convmixer_kernels import _cpp_lib, reference
from convmixer_kernels.spec import DW_BLOCK

CASES = [((2, 19, 9, 13), 5), ((1, 3, 32, 32), 3), ((2, 17, 33, 5), 9), ((3, 8, 1, 1), 7),
         ((1, 5, 40, 37), 31), ((2, 24, 16, 16), 13)]
TOL = {torch.float32: 1e-3, torch.bfloat16: 5e-2, torch.float16: 1e-2}


def make(shape, dtype, layout, gen, dev):
    n, c, h, w = shape
    if layout == "strided":  # a view with gaps: every other column of a wider tensor
        x = torch.randn(n, c, h, 2 * w, generator=gen)[..., ::2]
    else:
        x = torch.randn(shape, generator=gen)
    x = x.to(dev, dtype)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    return x


def worst(got, want):
    scale = want.float().abs().max().item() + 1e-12
    return (got.float() - want.float()).abs().max().item() / max(scale, 1.0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="float32 and bfloat16 only, gelu only")
    ap.add_argument("--backend", default="cuda", help="backend to run (cpu: a smoke test of this driver)")
    args = ap.parse_args()
    dev = "cpu" if args.backend == "cpu" else "cuda"
    _cpp_lib.load()
    cuda = ck.backends.get(args.backend)
    gen = torch.Generator().manual_seed(0)
    dtypes = [torch.float32, torch.bfloat16] + ([] if args.quick else [torch.float16])
    acts = ["gelu"] if args.quick else ["gelu", "relu"]
    bad = 0
    runs = 0
    for shape, k in CASES:
        c = shape[1]
        for dtype in dtypes:
            for layout in ("nchw", "channels_last", "strided"):
                for training in (True, False):
                    for save in ((True, False) if training else (True,)):
                        for act in acts:
                            x = make(shape, dtype, layout, gen, dev)
                            w = (torch.randn(c, 1, k, k, generator=gen) / k).to(dev, dtype)
                            b = torch.randn(c, generator=gen).to(dev, dtype)
                            bw = (torch.rand(c, generator=gen) + 0.5).to(dev)
                            bb = torch.randn(c, generator=gen).to(dev)
                            rm, rv = ((None, None) if training else
                                      (torch.randn(c, generator=gen).to(dev),
                                       (torch.rand(c, generator=gen) + 0.5).to(dev)))
                            fargs = (x, w, b, bw, bb, rm, rv, training, 1e-5, act, save)
                            got = cuda.block_forward(DW_BLOCK, *fargs)
                            want = reference.forward(DW_BLOCK, *fargs)
                            out, mean, var, pre = want
                            dy = make(tuple(out.shape), dtype, layout, gen, dev)
                            bargs = (dy, x, w, b, bw, mean, var, pre, training, 1e-5, act, [True] * 5)
                            got_b = cuda.block_backward(DW_BLOCK, *bargs)
                            want_b = reference.backward(DW_BLOCK, *bargs)
                            if dev == "cuda":
                                torch.cuda.synchronize()
                            runs += 1
                            for name, g, r in zip(("out", "dx", "dw", "db", "dbnw", "dbnb"),
                                                  (got[0], *got_b), (want[0], *want_b)):
                                e = worst(g, r)
                                if not e <= TOL[dtype]:
                                    bad += 1
                                    print(f"MISMATCH {name} {shape} k={k} {dtype} {layout} "
                                          f"train={training} save={save} {act}: {e:.3e}")
    print(f"{runs} forward+backward cases, {bad} mismatches")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
