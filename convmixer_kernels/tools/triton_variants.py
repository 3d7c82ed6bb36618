"""Ahead-of-time GPU compile check of every Triton kernel variant the package launches.

The backend's own ``forward``/``backward`` run on ``meta`` tensors with launches
recorded instead of executed (``_common._recorder``), for the benchmark shapes of
docs/design.md (Shapes) in every dtype, layout and mode (and the fused eval layer of
``layer.py`` at the layer shapes); each distinct (kernel,
signature, constexprs, launch options) is then compiled with ``triton.compile`` for
the requested GPU architectures. No GPU is needed, so CI runs it::

    python -m convmixer_kernels.tools.triton_variants --arch 90,80 [--jobs 2] [--quick]

Exit status 1 when any variant fails to compile (with its error), 0 otherwise; the
report lists registers, spills and shared memory per variant. Must run without
``TRITON_INTERPRET=1`` (the interpreter replaces the kernels).
"""
from __future__ import annotations

import argparse
import concurrent.futures
import sys
import time
from dataclasses import dataclass
from typing import Iterable

import torch

from ..spec import out_format_name, output_memory_format
from ..backends.triton import _common

# (op, N, C, H, W, k, activations): docs/design.md (Shapes) shapes and the sweep.
DW_SHAPES = [
    (64, 1536, 32, 32, 9, ("gelu",)),
    (64, 768, 32, 32, 7, ("gelu", "relu")),
    (64, 1024, 16, 16, 9, ("gelu",)),
    (512, 256, 16, 16, 5, ("gelu",)),
]
SWEEP_KS = tuple(range(3, 32, 2))
# (N, C_in, H, W, C_out, p): pointwise blocks at the depthwise shapes (p=1) and the
# patch embeddings of the four benchmark models.
PW_SHAPES = [(n, c, h, w, c, 1) for n, c, h, w, _, _ in DW_SHAPES]
PATCH_SHAPES = [(64, 3, 224, 224, 1536, 7), (64, 3, 224, 224, 768, 7),
                (64, 3, 224, 224, 1024, 14), (512, 3, 32, 32, 256, 2)]
DTYPES = (torch.bfloat16, torch.float16, torch.float32)
_CODES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16",
          torch.int64: "i64", torch.int32: "i32"}


@dataclass(frozen=True)
class Variant:
    kernel: object
    signature: tuple
    constexprs: tuple
    options: tuple
    aligned: tuple = ()  # argument indices the launcher marks divisible by 16

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__ if hasattr(self.kernel, "fn") else str(self.kernel)

    def describe(self) -> str:
        const = ", ".join(f"{k}={v}" for k, v in self.constexprs if v is not None)
        ptrs = ",".join(t for _, t in self.signature if t.startswith("*"))
        return f"{self.name}[{ptrs}]({const})"


def _variant(kernel, args: tuple, meta: dict) -> Variant:
    names = list(kernel.arg_names)
    values = dict(zip(names, args))
    options = {k: v for k, v in meta.items() if k in ("num_warps", "num_stages")}
    values.update({k: v for k, v in meta.items() if k not in options})
    missing = [n for n in names if n not in values]
    if missing:
        raise TypeError(f"{kernel.fn.__name__}: no value for {missing}")
    constexpr_names = {p.name for p in kernel.params if p.is_constexpr}
    signature, constexprs, aligned = [], [], []
    for i, n in enumerate(names):
        v = values[n]
        # Triton's launcher specialises None and integers equal to 1 as constants.
        if n in constexpr_names or v is None or (type(v) is int and v == 1):
            signature.append((n, "constexpr"))
            constexprs.append((n, v))
        elif isinstance(v, torch.Tensor):
            signature.append((n, "*" + _CODES[v.dtype]))
            aligned.append(i)  # allocations are 16-byte aligned (meta tensors: address 0)
        elif isinstance(v, bool):
            signature.append((n, "i1"))
        elif isinstance(v, int):
            signature.append((n, "i32" if -2 ** 31 <= v < 2 ** 31 else "i64"))
            if v % 16 == 0:
                aligned.append(i)
        elif isinstance(v, float):
            signature.append((n, "fp32"))
        else:
            raise TypeError(f"{kernel.fn.__name__}: argument {n} of type {type(v).__name__}")
    return Variant(kernel, tuple(signature), tuple(constexprs), tuple(sorted(options.items())),
                   tuple(aligned))


_NCHW, _BOTH = (torch.contiguous_format,), (torch.contiguous_format, torch.channels_last)


def _dw_cases(quick: bool) -> Iterable[tuple]:
    """The benchmark suite feeds NCHW tensors; the first (headline) shape of each op is
    also checked in channels_last, the layout the stem hands on for channels_last images."""
    shapes = DW_SHAPES[:1] if quick else DW_SHAPES
    for i, (n, c, h, w, k, acts) in enumerate(shapes):
        for dtype in DTYPES:
            for act in acts:
                yield n, c, h, w, k, dtype, act, _BOTH if i == 0 else _NCHW
    if not quick:
        n, c, h, w, _, _ = DW_SHAPES[1]
        for k in SWEEP_KS:
            yield n, c, h, w, k, torch.bfloat16, "gelu", _NCHW


def _run_dw(n, c, h, w, k, dtype, act, layouts) -> None:
    """What the modules launch: inference (eval, nothing saved), the training forward
    (pre-activation saved) and the training backward of every gradient."""
    from ..backends.triton import dw_block

    meta = dict(device="meta", dtype=dtype)
    for layout in layouts:
        x = torch.empty(n, c, h, w, memory_format=layout, **meta)
        wt, vec = torch.empty(c, 1, k, k, **meta), torch.empty(c, **meta)
        stats = torch.empty(c, device="meta", dtype=torch.float32)
        dw_block.forward(x, wt, vec, vec, vec, stats, stats, False, 1e-5, act, False)
        out, mean, var, pre = dw_block.forward(x, wt, vec, vec, vec, stats, stats, True, 1e-5,
                                               act, True)
        g = torch.empty(x.shape, memory_format=output_memory_format(x), **meta)
        dw_block.backward(g, x, wt, vec, vec, mean, var, pre, True, 1e-5, act, [True] * 5)


def _gemm_cases(quick: bool) -> Iterable[tuple]:
    for op, shapes in (("pw_block", PW_SHAPES), ("patch_embed", PATCH_SHAPES)):
        for i, (n, cin, h, w, cout, p) in enumerate(shapes[:1] if quick else shapes):
            for dtype in DTYPES:
                for act in ("gelu", "relu") if cout == 768 else ("gelu",):
                    yield op, n, cin, h, w, cout, p, dtype, act, _BOTH if i == 0 else _NCHW


def _run_gemm(op, n, cin, h, w, cout, p, dtype, act, layouts) -> None:
    import importlib

    module = importlib.import_module(f"convmixer_kernels.backends.triton.{op}")
    meta = dict(device="meta", dtype=dtype)
    for layout in layouts:
        x = torch.empty(n, cin, h, w, memory_format=layout, **meta)
        wt, vec = torch.empty(cout, cin, p, p, **meta), torch.empty(cout, **meta)
        stats = torch.empty(cout, device="meta", dtype=torch.float32)
        # ConvMixer(memory_format=layout) writes every block's output in that layout
        fmt = out_format_name(layout)
        module.forward(x, wt, vec, vec, vec, stats, stats, False, 1e-5, act, False, fmt)
        out, mean, var, pre = module.forward(x, wt, vec, vec, vec, stats, stats, True, 1e-5,
                                             act, True, fmt)
        g = torch.empty(out.shape, memory_format=output_memory_format(x), **meta)
        # the stem's image needs no gradient: models train with output_mask[0] False there
        mask = [op != "patch_embed", True, True, True, True]
        module.backward(g, x, wt, vec, vec, mean, var, pre, True, 1e-5, act, mask)


def _layer_cases(quick: bool) -> Iterable[tuple]:
    """The fused eval layer (``layer.py``) at the benchmark's layer shapes (the depthwise
    shapes, C_out = C) in bf16, the headline shape also in channels_last and in fp16 and
    fp32 (the layout and dtypes of ``bench --full``)."""
    shapes = DW_SHAPES[:1] if quick else DW_SHAPES
    for i, (n, c, h, w, k, acts) in enumerate(shapes):
        for dtype in DTYPES if i == 0 else (torch.bfloat16,):
            for act in acts:
                layouts = _BOTH if i == 0 and dtype == torch.bfloat16 else _NCHW
                yield n, c, h, w, k, dtype, act, layouts


def _run_layer(n, c, h, w, k, dtype, act, layouts) -> None:
    """What ``ConvMixerLayer`` launches with layer fusion in eval (inference only)."""
    from ..backends.triton import layer

    meta = dict(device="meta", dtype=dtype)
    for fmt in layouts:
        x = torch.empty(n, c, h, w, memory_format=fmt, **meta)
        dw, pw, vec = (torch.empty(c, 1, k, k, **meta), torch.empty(c, c, 1, 1, **meta),
                       torch.empty(c, **meta))
        stats = torch.empty(c, device="meta", dtype=torch.float32)
        layer.forward(x, dw, vec, vec, vec, stats, stats, 1e-5, act, pw, vec, vec, vec,
                      stats, stats, 1e-5, act, out_format_name(fmt))


def collect(quick: bool = False) -> list[Variant]:
    """Every distinct kernel variant launched for the benchmark cases, in launch order."""
    found: dict[Variant, None] = {}

    def record(kernel, grid, args, meta):
        found.setdefault(_variant(kernel, args, meta), None)

    if _common.interpreting():
        raise RuntimeError("the compile check needs the real kernels: unset TRITON_INTERPRET")
    _common._recorder = record
    try:
        for case in _dw_cases(quick):
            _run_dw(*case)
        for case in _gemm_cases(quick):
            _run_gemm(*case)
        for case in _layer_cases(quick):
            _run_layer(*case)
    finally:
        _common._recorder = None
    return list(found)


def compile_variant(v: Variant, arch: int) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    # the launcher's specialisation: None and 1 are constants, 16-divisible values and
    # aligned pointers carry tt.divisibility (what vectorised loads rely on)
    src = ASTSource(fn=v.kernel, signature=dict(v.signature), constexprs=dict(v.constexprs),
                    attrs={(i,): [["tt.divisibility", 16]] for i in v.aligned})
    start = time.perf_counter()
    k = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=dict(v.options))
    ptx = k.asm["ptx"]
    return dict(shared=k.metadata.shared, seconds=time.perf_counter() - start,
                mma="mma" in ptx, **_resources(k.asm["cubin"]))


def _resources(cubin: bytes) -> dict:
    """Registers and spill stores of a cubin, from cuobjdump (bundled with Triton)."""
    import os
    import re
    import subprocess
    import tempfile

    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                        "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    regs = re.search(r"REG:(\d+)", text)
    spills = re.search(r"STACK:(\d+)", text)
    return dict(n_regs=int(regs.group(1)) if regs else -1,
                stack=int(spills.group(1)) if spills else -1)


def _compile_job(job: tuple[int, int]) -> tuple[int, int, dict | str]:
    index, arch = job
    try:
        return index, arch, compile_variant(_VARIANTS[index], arch)
    except Exception as exc:  # reported with the variant, then the run fails
        return index, arch, f"{type(exc).__name__}: {exc}"


_VARIANTS: list[Variant] = []


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="90,80",
                        help="comma-separated compute capabilities, e.g. 90,80 (default)")
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--quick", action="store_true",
                        help="only the first benchmark shape (no kernel-size sweep)")
    args = parser.parse_args(argv)
    try:
        archs = [int(a) for a in args.arch.split(",") if a.strip()]
    except ValueError:
        parser.error(f"--arch: expected comma-separated integers such as 90,80, got {args.arch!r}")
    if not archs or args.jobs < 1:
        parser.error("--arch needs at least one architecture and --jobs must be >= 1")

    _VARIANTS[:] = collect(args.quick)
    jobs = [(i, a) for i in range(len(_VARIANTS)) for a in archs]
    print(f"{len(_VARIANTS)} kernel variants x {len(archs)} architectures", flush=True)
    failures = 0
    start = time.perf_counter()
    with concurrent.futures.ProcessPoolExecutor(args.jobs) as pool:
        for index, arch, res in pool.map(_compile_job, jobs):
            v = _VARIANTS[index]
            if isinstance(res, str):
                failures += 1
                print(f"FAIL sm_{arch} {v.describe()}: {res}", flush=True)
            else:
                print(f"ok   sm_{arch} {v.describe()}: regs={res['n_regs']} "
                      f"stack={res['stack']} smem={res['shared']} "
                      f"{res['seconds']:.1f}s", flush=True)
    print(f"{len(jobs) - failures}/{len(jobs)} compiled in {time.perf_counter() - start:.0f}s")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
