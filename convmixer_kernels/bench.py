"""Benchmark of the fused blocks against the eager PyTorch modules on one device.

For each op (``dw_block``, ``pw_block``, ``patch_embed``) and mode (``eval``,
``train_fwd``, ``train_fwdbwd``) it times three providers that share one set of
parameters:

- ``fused``: the ``convmixer_kernels`` module (backend from ``--backend``), NCHW input;
- ``eager_nchw``: the same stock child modules (conv, act, BN) on NCHW input;
- ``eager_channels_last``: the stock modules with weights and input in channels_last.

CPU times come from ``torch.utils.benchmark.Timer.blocked_autorange``, CUDA times
from ``triton.testing.do_bench`` (Triton is imported only then). Run it as
``python -m convmixer_kernels bench`` or ``convmixer-bench``; ``run()`` is the API.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import math
import os
import platform
import sys
import time
from typing import Callable, Iterator, Optional, Sequence

import torch
from torch import Tensor, nn

from . import backends
from .modules import DepthwiseBlock, PatchEmbed, PointwiseBlock

__all__ = ["OPS", "MODES", "PROVIDERS", "CSV_FIELDS", "add_arguments", "build_parser", "run",
           "run_args"]

OPS = ("dw_block", "pw_block", "patch_embed")
MODES = ("eval", "train_fwd", "train_fwdbwd")
PROVIDERS = ("fused", "eager_nchw", "eager_channels_last")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CSV_FIELDS = ("op", "provider", "backend", "mode", "dtype", "device", "N", "C", "C_out", "H", "W",
              "k", "p50_ms", "p20_ms", "p80_ms", "speedup_vs_best_eager", "max_abs_diff",
              "torch", "timestamp")
# Defaults that depend on the device type (the others are the same everywhere).
DEVICE_DEFAULTS = {
    "cpu": {"batch": 8, "dim": 256, "size": 32, "image_size": 112, "dtype": "float32"},
    "cuda": {"batch": 64, "dim": 1536, "size": 32, "image_size": 224, "dtype": "bfloat16"},
}
IN_CHANS = 3
MIN_SAMPLES = 5  # fewest timed blocks per CPU measurement


def _comma_list(choices: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        items = [s.strip() for s in text.split(",") if s.strip()]
        bad = [s for s in items if s not in choices]
        if bad or not items:
            raise argparse.ArgumentTypeError(
                f"{'unknown ' + ', '.join(map(repr, bad)) if bad else 'empty list'}; "
                f"expected a comma-separated list of {', '.join(choices)}")
        return list(dict.fromkeys(items))
    return parse


def _positive(kind: type, odd: bool = False) -> Callable[[str], float]:
    what = f"{'an odd' if odd else 'a'} positive {kind.__name__}"

    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or (odd and value % 2 == 0):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


def _device(text: str) -> torch.device:
    try:
        device = torch.device(text)
    except RuntimeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if device.type not in DEVICE_DEFAULTS:
        raise argparse.ArgumentTypeError(f"expected a cpu or cuda device, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (used by the CLI and ``build_parser``)."""
    pos_int = _positive(int)
    add = parser.add_argument
    add("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    add("--dtype", choices=tuple(DTYPES), default=None, help="default: float32 on CPU, bfloat16 on CUDA")
    add("--ops", type=_comma_list(OPS), default=list(OPS), help=f"comma list of {','.join(OPS)}")
    add("--modes", type=_comma_list(MODES), default=list(MODES), help=f"comma list of {','.join(MODES)}")
    add("--backend", choices=backends.BACKEND_NAMES + ("auto",), default=None,
        help="backend of the fused provider (default: auto)")
    add("--batch", type=pos_int, help="N (default: 8 on CPU, 64 on CUDA)")
    add("--dim", type=pos_int, help="channels C of dw/pw, output channels of patch_embed "
        "(default: 256 on CPU, 1536 on CUDA)")
    add("--size", type=pos_int, help="H = W of dw/pw inputs (default: 32)")
    add("--kernel-size", type=_positive(int, odd=True), default=9, help="depthwise kernel size (default: 9)")
    add("--image-size", type=pos_int, help="patch_embed image H = W (default: 112 on CPU, 224 on CUDA)")
    add("--patch-size", type=pos_int, default=7, help="patch_embed patch size (default: 7)")
    add("--activation", choices=("gelu", "relu"), default="gelu")
    add("--threads", type=pos_int, default=None, help="CPU threads (default: torch's setting)")
    add("--min-run-time", type=_positive(float), default=2.0,
        help="seconds of timing per measurement (CUDA: do_bench's rep) (default: 2.0)")
    add("--csv", metavar="PATH", default=None, help="append long-format rows to this CSV file")
    return parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The stand-alone parser of the benchmark's options."""
    return add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]))


def run(args_list: Optional[Sequence[str]] = None) -> list[dict]:
    """Parse ``args_list`` (default ``sys.argv[1:]``), run, print the table, return the rows."""
    return run_args(build_parser("python -m convmixer_kernels bench").parse_args(args_list))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return f"{name or platform.machine()}, {torch.get_num_threads()} threads"


def _percentile(sorted_values: Sequence[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo, hi = math.floor(pos), math.ceil(pos)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


def _time_ms(step: Callable[[], object], device: torch.device, min_run_time: float) -> tuple[float, ...]:
    """(p50, p20, p80) in milliseconds of ``step()``."""
    if device.type == "cuda":
        from triton.testing import do_bench  # lazily: importing the package never loads Triton
        return tuple(do_bench(step, rep=min_run_time * 1e3, quantiles=[0.5, 0.2, 0.8]))
    from torch.utils.benchmark import Timer
    timer = Timer("step()", globals={"step": step}, num_threads=torch.get_num_threads())
    measurement = timer.blocked_autorange(min_run_time=min_run_time)
    times = list(measurement.times)  # seconds per call, one entry per block
    while len(times) < MIN_SAMPLES:  # a slow call gives few blocks: add some for the percentiles
        times += timer.timeit(measurement.number_per_run).times
    times = sorted(t * 1e3 for t in times)
    return tuple(_percentile(times, q) for q in (0.5, 0.2, 0.8))


def _build(op: str, a: argparse.Namespace, device: torch.device, dtype: torch.dtype
           ) -> tuple[nn.Module, Callable[[Tensor], Tensor], tuple[int, int, int, int], int, int]:
    """(fused module, eager function sharing its children, input shape, C_out, kernel size)."""
    dd = {"device": device, "dtype": dtype}
    if op == "dw_block":
        m = DepthwiseBlock(a.dim, a.kernel_size, a.activation, backend=a.backend, **dd)
        return m, (lambda x: x + m.fn(x)), (a.batch, a.dim, a.size, a.size), a.dim, a.kernel_size
    if op == "pw_block":
        m = PointwiseBlock(a.dim, a.dim, a.activation, backend=a.backend, **dd)
        shape, k = (a.batch, a.dim, a.size, a.size), 1
    else:
        m = PatchEmbed(IN_CHANS, a.dim, a.patch_size, a.activation, backend=a.backend, **dd)
        shape, k = (a.batch, IN_CHANS, a.image_size, a.image_size), a.patch_size
    return m, (lambda x: nn.Sequential.forward(m, x)), shape, a.dim, k


@torch.no_grad()
def _randomize_bn(module: nn.Module) -> None:
    for bn in (mod for mod in module.modules() if isinstance(mod, nn.BatchNorm2d)):
        bn.weight.uniform_(0.5, 1.5), bn.bias.normal_(0.0, 0.5)
        bn.running_mean.normal_(0.0, 0.5), bn.running_var.uniform_(0.5, 1.5)


@contextlib.contextmanager
def _memory_format(module: nn.Module, fmt: torch.memory_format) -> Iterator[None]:
    """Hold ``module``'s 4-D weights in ``fmt`` (same Parameter objects), then restore NCHW."""
    module.to(memory_format=fmt)
    try:
        yield
    finally:
        module.to(memory_format=torch.contiguous_format)


def _step(f: Callable[[Tensor], Tensor], x: Tensor, mode: str, params: list[nn.Parameter],
          grad: Optional[Tensor]) -> Callable[[], object]:
    """One timed iteration of ``mode`` (identical bookkeeping for every provider)."""
    def forward() -> object:
        with torch.set_grad_enabled(mode != "eval"):
            return f(x)

    def forward_backward() -> None:
        for p in (*params, x):
            p.grad = None
        f(x).backward(grad)
    return forward_backward if mode == "train_fwdbwd" else forward


def _measure_case(op: str, mode: str, a: argparse.Namespace, device: torch.device,
                  dtype: torch.dtype, progress: Callable[[str, float], None]) -> list[dict]:
    torch.manual_seed(0)
    module, eager, shape, c_out, k = _build(op, a, device, dtype)
    _randomize_bn(module)
    module.train(mode != "eval")
    params = list(module.parameters())
    x_nchw = torch.randn(shape, device=device, dtype=dtype)
    try:
        backend = backends.resolve(a.backend, op, x_nchw)
    except backends.BackendUnavailable as e:
        raise SystemExit(f"error: argument --backend: {e}") from None
    grad_base: Optional[Tensor] = None
    reference: Optional[Tensor] = None
    rows = []
    for provider in PROVIDERS:
        channels_last = provider == "eager_channels_last"
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        f = module if provider == "fused" else eager
        x = x_nchw.detach().clone(memory_format=fmt).requires_grad_(mode == "train_fwdbwd")
        with _memory_format(module, fmt) if channels_last else contextlib.nullcontext():
            with torch.set_grad_enabled(mode != "eval"):
                out = f(x)
            if grad_base is None:
                grad_base = torch.randn(out.shape, device=device, dtype=dtype)
            if reference is None:
                reference = out.detach().float()
            diff = (out.detach().float() - reference).abs().max().item()
            grad = torch.empty_like(out).copy_(grad_base) if mode == "train_fwdbwd" else None
            del out
            step = _step(f, x, mode, params, grad)
            for _ in range(3):  # warm-up (kernel compilation, allocator, cudnn.benchmark)
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            p50, p20, p80 = _time_ms(step, device, a.min_run_time)
        progress(f"{op} {mode} {provider}", p50)
        n, c, h, w = shape
        rows.append({"op": op, "provider": provider, "backend": backend if provider == "fused" else "eager",
                     "mode": mode, "dtype": a.dtype, "N": n, "C": c,
                     "C_out": c_out, "H": h, "W": w, "k": k, "p50_ms": p50, "p20_ms": p20,
                     "p80_ms": p80, "max_abs_diff": diff})
    best_eager = min(r["p50_ms"] for r in rows if r["provider"] != "fused")
    for r in rows:
        r["speedup_vs_best_eager"] = best_eager / r["p50_ms"]
    return rows


def _table(rows: list[dict]) -> str:
    """One line per (op, mode): text columns left-aligned, numbers right-aligned."""
    table = [("op", "mode", "backend", "fused ms", "fused p20-p80", "eager_nchw ms", "eager_cl ms",
              "speedup", "max|diff|")]
    cases: dict[tuple[str, str], dict[str, dict]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["mode"]), {})[r["provider"]] = r
    for (op, mode), by in cases.items():
        fused = by["fused"]
        table.append((op, mode, fused["backend"], f"{fused['p50_ms']:.3f}",
                      f"{fused['p20_ms']:.3f}-{fused['p80_ms']:.3f}", f"{by['eager_nchw']['p50_ms']:.3f}",
                      f"{by['eager_channels_last']['p50_ms']:.3f}", f"{fused['speedup_vs_best_eager']:.2f}x",
                      f"{max(r['max_abs_diff'] for r in by.values()):.1e}"))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _write_csv(path: str, rows: list[dict]) -> None:
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        if new:
            writer.writeheader()
        writer.writerows({k: r[k] for k in CSV_FIELDS} for r in rows)


def run_args(a: argparse.Namespace) -> list[dict]:
    """Run the benchmark for parsed options ``a``; print the table; return one dict per
    (op, mode, provider) with the ``CSV_FIELDS`` keys."""
    device = a.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    for key, value in DEVICE_DEFAULTS[device.type].items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    dtype = DTYPES[a.dtype]
    total, done = len(a.ops) * len(a.modes) * len(PROVIDERS), 0

    def progress(what: str, ms: float) -> None:
        nonlocal done
        done += 1
        print(f"[{done}/{total}] {what}: {ms:.3f} ms", file=sys.stderr, flush=True)

    rows = [r for op in a.ops for mode in a.modes
            for r in _measure_case(op, mode, a, device, dtype, progress)]
    stamp, name = time.strftime("%Y-%m-%dT%H:%M:%S%z"), _device_name(device)
    for r in rows:
        r.update(device=name, torch=torch.__version__, timestamp=stamp)
    print(f"convmixer_kernels bench | {device.type}: {name} | dtype {a.dtype} | "
          f"torch {torch.__version__}")
    print(f"dw/pw: N={a.batch} C={a.dim} H=W={a.size} k={a.kernel_size} | patch_embed: "
          f"N={a.batch} {IN_CHANS}->{a.dim} image {a.image_size} patch {a.patch_size} | "
          f"{a.activation} | fused input NCHW; speedup = best eager p50 / fused p50")
    print(_table(rows), flush=True)
    if a.csv:
        _write_csv(a.csv, rows)
    return rows
