"""Benchmark of the fused ops and models against stock PyTorch on one device.

Suites: ``ops`` (dw_block, pw_block, patch_embed and a whole ConvMixerLayer at the
ConvMixers' shapes), ``sweep`` (dw_block over kernel sizes 3..31), ``models`` (the four
ConvMixers; forward_backward is a training step with an SGD optimizer) and ``paper``
(inference img/s of the ConvMixers beside the timm models of the paper's table).
Modes: ``inference``, ``forward`` (training-mode forward), ``forward_backward``.

Providers: ``fused_<backend>`` for each available backend of ours (on GPU, for the
``layer`` op in ``inference`` mode, also ``fused_triton_layer``: the whole layer as one
Triton kernel, beside the two-kernel ``fused_triton``; in ``forward_backward`` mode also
``fused_<backend>_memsave``, the memory-saving training mode of the backend ``auto``
picks, to compare peak memory with ``--memory``), and the baselines
``eager_nchw``, ``eager_channels_last``, ``compile`` (torch.compile, default mode) and
``compile_max_autotune`` (with ``--max-autotune``); on GPU all run with
``torch.backends.cudnn.benchmark = True``. Speedup = best baseline median / the row's
median. Each row also reports achieved GB/s, TFLOP/s and percent of the roofline floor
(``convmixer_kernels.tools.roofline``) and peak memory, and is appended, as soon as it is
measured, to a long-format CSV per device under ``--out`` (default ``bench-results/``,
ignored by git; committing results is an explicit step: ``--csv benchmarks/results/...``).
A row whose p20-p80 spread exceeds 25 % of its median is measured again, and flagged in
the summary if it stays that wide. The run ends with a summary: ``fused_auto`` against
the best baseline per op/model and mode, the device named.

GPU times come from ``triton.testing.do_bench`` (Triton is imported only then), CPU
times from ``torch.utils.benchmark.Timer``. Shapes and providers come from one registry
(``convmixer_kernels.tools.cases``), shared with ``pytest benchmarks --benchmark-only``.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Callable, Optional, Sequence

import torch

from .. import backends
from . import report as _report
from .cases import (BASELINES, CHANNELS_LAST_SUFFIX, MODE_ALIASES, MODELS, MODES, OPS, SUITES, Case,
                    case_set, our_providers)
from .steps import build
from .roofline import Peaks, l2_cache_bytes, measure_peaks
from .timing import PEAK_MEMORY_HOW, peak_memory_mb, time_ms

__all__ = ["OPS", "MODES", "SUITES", "BASELINES", "DTYPES", "CSV_FIELDS", "add_arguments", "build_parser",
           "run", "run_args"]

CSV_FIELDS = _report.CSV_FIELDS
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
WARMUP_STEPS = 3
NOISY_SPREAD = 0.25  # (p80 - p20) / p50 above which a row is measured again, then flagged
# Seconds of timing per measurement: (quick, full).
MIN_RUN_TIME = {"cpu": (0.2, 1.0), "cuda": (0.1, 0.5)}


def _comma_list(choices: Sequence[str], aliases: Optional[dict] = None) -> Callable[[str], list[str]]:
    aliases = aliases or {}

    def parse(text: str) -> list[str]:
        items = [aliases.get(s.strip(), s.strip()) for s in text.split(",") if s.strip()]
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
    if device.type not in MIN_RUN_TIME:
        raise argparse.ArgumentTypeError(f"expected a cpu or cuda device, got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    return device


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (used by the CLI and ``build_parser``)."""
    pos_int, add = _positive(int), parser.add_argument
    add("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", dest="full", action="store_false", default=False,
                      help="(default) one shape per op, the CIFAR model, eager baselines: under "
                      "2 minutes on a 2-core CPU, under 1 minute on a GPU")
    size.add_argument("--full", dest="full", action="store_true",
                      help="every shape of docs/design.md (smaller on CPU), the kernel-size "
                      "sweep, all four models, torch.compile baselines")
    add("--suites", type=_comma_list(SUITES), default=None,
        help=f"comma list of {','.join(SUITES)} (default: ops,models; --full: ops,sweep,models)")
    add("--paper", action="store_true", help="the paper's comparison: inference img/s of the "
        "ConvMixers beside timm's resnet152, deit_base_patch16_224, resmlp_24_224, mixer_b16_224, "
        "convit_small (random weights), one table; same as --suites paper")
    add("--ops", type=_comma_list(OPS), default=None,
        help=f"comma list of {','.join(OPS)} (default: all; alone it selects the ops suite)")
    add("--models", type=_comma_list(tuple(MODELS)), default=None,
        help=f"comma list of {','.join(MODELS)} (alone it selects the models suite)")
    add("--modes", type=_comma_list(MODES, MODE_ALIASES), default=list(MODES),
        help=f"comma list of {','.join(MODES)} (eval, train_fwd, train_fwdbwd are accepted as aliases)")
    add("--dtypes", "--dtype", dest="dtypes", type=_comma_list(tuple(DTYPES), DTYPE_ALIASES), default=None,
        help="comma list of float32,bfloat16,float16 (bf16, fp16, fp32 accepted); default: float32 "
        "on CPU, bfloat16 on CUDA (--full on CUDA: all three)")
    add("--backends", "--backend", dest="backends", type=_comma_list(backends.names() + ("auto",)),
        default=None, help="comma list of our backends to time (default: every available one; "
        "triton is left out on CPU, where it runs only under TRITON_INTERPRET=1 and is very "
        "slow, unless named here)")
    add("--baselines", type=_comma_list(BASELINES), default=None,
        help=f"comma list of {','.join(BASELINES)} (default: eager_nchw,eager_channels_last, "
        "plus compile with --full or --compile, plus compile_max_autotune with --max-autotune)")
    add("--compile", dest="compile", action="store_true", default=None,
        help="add the torch.compile baseline to a --quick run")
    add("--no-compile", dest="compile", action="store_false", help="leave torch.compile out of --full")
    add("--max-autotune", action="store_true", help="add torch.compile(mode='max-autotune')")
    add("--batch", type=pos_int, help="override N of every case")
    add("--dim", type=pos_int, help="override the channels (ops) or width (models) of every case")
    add("--size", type=pos_int, help="override H = W of dw_block, pw_block and layer inputs")
    add("--kernel-size", type=_positive(int, odd=True), help="override the depthwise kernel size")
    add("--image-size", type=pos_int, help="override the image H = W of patch_embed and models")
    add("--patch-size", type=pos_int, help="override the patch size of patch_embed and models")
    add("--activation", choices=("gelu", "gelu_tanh", "relu"), default=None, help="override the activation")
    add("--threads", type=pos_int, default=None, help="CPU threads (default: torch's setting)")
    add("--min-run-time", type=_positive(float), default=None,
        help="seconds of timing per measurement (CUDA: do_bench's rep); default: 0.2 on CPU and "
        "0.1 on CUDA, --full: 1.0 and 0.5")
    add("--memory", dest="memory", action="store_true", default=None,
        help="measure peak memory (default: on, except --quick on CPU, where the profiler pass it "
        "takes costs more than the timing)")
    add("--no-memory", dest="memory", action="store_false", help="leave peak memory blank")
    add("--out", metavar="DIR", default="bench-results",
        help="directory for the CSV (<device>.csv, appended) (default: bench-results/)")
    csv_opts = parser.add_mutually_exclusive_group()
    csv_opts.add_argument("--csv", metavar="PATH", default=None,
                          help="append rows to this CSV instead (e.g. benchmarks/results/<device>.csv "
                          "to commit them)")
    csv_opts.add_argument("--no-csv", action="store_true", help="write no CSV")
    return parser


def build_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """The stand-alone parser of the benchmark's options."""
    return add_arguments(argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[0]))


def run(args_list: Optional[Sequence[str]] = None) -> list[dict]:
    """Parse ``args_list`` (default ``sys.argv[1:]``), run, print the table, return the rows."""
    return run_args(build_parser("python -m convmixer_kernels bench").parse_args(args_list))


def _select_cases(a: argparse.Namespace, device: torch.device) -> list[Case]:
    if a.suites is not None:
        suites = a.suites
    elif a.paper:
        suites = ["paper"]
    elif a.ops is not None or a.models is not None:
        suites = (["ops"] if a.ops is not None else []) + (["models"] if a.models is not None else [])
    else:
        suites = ["ops", "sweep", "models"] if a.full else ["ops", "models"]
    if a.paper and "paper" not in suites:
        suites.append("paper")
    overrides = {key: getattr(a, key) for key in ("batch", "dim", "size", "image_size", "kernel_size",
                                                  "patch_size", "activation")}
    cases = []
    for suite in suites:
        for case in case_set(device.type, suite, quick=not a.full):
            if suite in ("ops", "sweep") and a.ops is not None and case.op not in a.ops:
                continue
            if suite == "models" and a.models is not None and case.op not in a.models:
                continue
            cases.append(case.with_overrides(**overrides))
    return cases


def _baselines(a: argparse.Namespace) -> list[str]:
    if a.baselines is not None:
        chosen = list(a.baselines)
    else:
        chosen = ["eager_nchw", "eager_channels_last"] + (["compile"] if (a.full if a.compile is None
                                                                            else a.compile) else [])
    if a.max_autotune and "compile_max_autotune" not in chosen:
        chosen.append("compile_max_autotune")
    return chosen


def _plan(a: argparse.Namespace, device: torch.device, cases: list[Case]) -> list[tuple]:
    """[(case, dtype name, mode, [(provider, backend), ...])] in run order."""
    plan = []
    for case in cases:
        modes = ["inference"] if case.suite == "paper" else a.modes
        for dtype in a.dtypes:
            for mode in modes:  # some providers run in one mode only (fused_triton_layer)
                ours = our_providers(case, device, DTYPES[dtype], a.backends, mode)
                if a.backends is not None:
                    missing = [b for b in a.backends if b != "auto" and ("fused_" + b, b) not in ours]
                    if missing and case.kind != "timm":
                        reasons = "; ".join(_why(b, case, device, DTYPES[dtype]) for b in missing)
                        raise SystemExit(f"error: argument --backends: {reasons}")
                plan.append((case, dtype, mode, ours + [(b, None) for b in _baselines(a)]))
    return plan


def _why(backend: str, case: Case, device: torch.device, dtype: torch.dtype) -> str:
    x = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
    for op in case.ops_used:
        reason = backends.get(backend).unavailable(op, x)
        if reason is not None:
            return f"backend {backend!r} cannot run {op}: {reason}"
    return f"backend {backend!r} is not available"


def _row(case: Case, dtype: str, mode: str, provider: str, backend: Optional[str], times: tuple,
         built, peaks: Peaks, mem: float, diff: float, device: torch.device) -> dict:
    p50, p20, p80 = times
    cost = case.cost(mode, built.elem_bytes)
    row = {"suite": case.suite, "op": case.op, "shape": case.label(), "provider": provider,
           "kind": "ours" if provider.startswith("fused_") else "baseline", "mode": mode, "dtype": dtype,
           "N": case.N, "C_in": case.C_in, "C_out": case.C_out, "H": case.H, "W": case.W, "k": case.k,
           "patch": case.p, "activation": case.activation, "depth": case.depth,
           "p50_ms": p50, "p20_ms": p20, "p80_ms": p80,
           "img_per_s": case.N / (p50 * 1e-3) if case.kind != "op" else "",
           "gb_per_s": "", "tflop_per_s": "", "pct_roofline": "", "roofline_floor_ms": "", "flop": "",
           "bytes": "", "peak_mem_mb": "" if mem is None else mem,
           "peak_mem_how": PEAK_MEMORY_HOW[device.type] if mem is not None else "not measured (--no-memory, "
           "or --quick on CPU; pass --memory)",
           "max_abs_diff": diff, "input_sets": len(built.inputs),
           "peak_copy_gb_per_s": peaks.copy_gbps, "peak_matmul_tflop_per_s": peaks.matmul_tflops,
           "peak_fma_tflop_per_s": peaks.fma_tflops, "peaks_how": peaks.how}
    if backend is not None:
        x0 = built.inputs[0]  # the case's input, in the layout this provider feeds
        if provider.endswith(CHANNELS_LAST_SUFFIX):
            x0 = x0.contiguous(memory_format=torch.channels_last)
        row["backend"] = backend if backend != "auto" else _auto_choice(case, mode, x0)
    else:
        row["backend"] = provider
    if cost is not None:
        floor = peaks.floor_ms(cost)
        row.update(gb_per_s=cost.bytes / (p50 * 1e-3) / 1e9, tflop_per_s=cost.flop / (p50 * 1e-3) / 1e12,
                   pct_roofline=100.0 * floor / p50, roofline_floor_ms=floor, flop=cost.flop, bytes=cost.bytes)
    return row


def _auto_choice(case: Case, mode: str, x: torch.Tensor) -> str:
    """What auto runs for the case's op-level calls ('+'-joined), e.g. 'cpu+native'. For
    models, the blocks' own inputs differ from the image: their shapes come from the case."""
    chosen = set()
    for op in case.ops_used:
        # the image into patch_embed needs no gradient (in the op rows too: needs_input_grad)
        frozen = op == "patch_embed" and (case.kind != "op" or not case.needs_input_grad)
        tmode = "eval" if mode == "inference" else backends.block_mode(True, not frozen)
        if case.kind == "op":
            xin = x
        else:  # a model: the trunk's block input (N, dim, H/p, W/p), in the trunk's layout
            side = max(case.H // max(case.p or 1, 1), 1)
            xin = torch.empty(case.N, case.C_in if op == "patch_embed" else case.C_out,
                              case.H if op == "patch_embed" else side,
                              case.W if op == "patch_embed" else side,
                              dtype=x.dtype, device=x.device).contiguous(memory_format=torch.channels_last)
        k = (case.k if op == "dw_block" else case.p if op == "patch_embed" else 1) or 1
        chosen.add(backends.choose("auto", op, xin, tmode, case.activation, k, case.C_out)[0])
    return "+".join(sorted(chosen))


def _measure_group(case: Case, dtype: str, mode: str, providers: list, built, peaks: Peaks,
                   device: torch.device, budget_s: float, memory: bool,
                   progress: Callable[[str, float], None]) -> list[dict]:
    rows, reference = [], None
    for provider, backend in providers:
        what = f"{case.suite} {case.op} [{case.label()}] {mode} {dtype} {provider}"
        try:
            with built.provider(provider, backend, mode) as (step, forward):
                out = forward()
                reference = out if reference is None else reference
                diff = (out - reference).abs().max().item()
                del out
                for _ in range(WARMUP_STEPS):  # compilation, allocator, cudnn.benchmark
                    step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times = time_ms(step, device, budget_s)
                mem = peak_memory_mb(step, device) if memory else None
        except Exception as e:  # one provider failing (compile, OOM) must not lose the others
            print(f"warning: {what} failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
            progress(what + " FAILED", float("nan"))
            continue
        p50, p20, p80 = times
        if p50 > 0 and (p80 - p20) / p50 > NOISY_SPREAD:  # too wide to trust: once more
            with built.provider(provider, backend, mode) as (step, forward):
                step()
                times = time_ms(step, device, budget_s)
        progress(what, times[0])
        rows.append(_row(case, dtype, mode, provider, backend, times, built, peaks, mem, diff, device))
    baselines = [r["p50_ms"] for r in rows if r["kind"] == "baseline"]
    best = min(baselines) if baselines else None
    best_name = next((r["provider"] for r in rows if r["kind"] == "baseline" and r["p50_ms"] == best), "")
    for r in rows:
        r["speedup_vs_best_baseline"] = best / r["p50_ms"] if best else ""
        r["best_baseline"] = best_name
    return rows


def _defaults(a: argparse.Namespace) -> torch.device:
    device = a.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.dtypes is None:
        a.dtypes = (["bfloat16", "float16", "float32"] if a.full else ["bfloat16"]) \
            if device.type == "cuda" else ["float32"]
    if a.memory is None:
        a.memory = a.full or device.type == "cuda"
    if a.min_run_time is None:
        a.min_run_time = MIN_RUN_TIME[device.type][1 if a.full else 0]
    if a.threads is not None:
        torch.set_num_threads(a.threads)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    return device


def run_args(a: argparse.Namespace) -> list[dict]:
    """Run the benchmark for parsed options ``a``; print the table; append the CSV; return
    one dict per (case, dtype, mode, provider) with the ``CSV_FIELDS`` keys (and ``shape``)."""
    threads = torch.get_num_threads()
    try:
        return _run(a)
    finally:
        torch.set_num_threads(threads)  # --threads holds for this run only


def _run(a: argparse.Namespace) -> list[dict]:
    device = _defaults(a)
    cases = _select_cases(a, device)
    plan = _plan(a, device, cases)
    total, done, start = sum(len(p[3]) for p in plan), 0, time.monotonic()

    def progress(what: str, ms: float) -> None:
        nonlocal done
        done += 1
        elapsed = time.monotonic() - start
        eta = elapsed / done * (total - done)
        print(f"[{done}/{total}] {elapsed:5.0f}s, ~{eta:.0f}s left | {what}: {ms:.3f} ms",
              file=sys.stderr, flush=True)

    env = _report.environment(device)
    csv_path = None if a.no_csv else (a.csv or os.path.join(a.out, os.path.basename(
        _report.default_csv_path(device))))
    if csv_path is not None:  # refuse an unwritable destination before measuring
        try:
            os.makedirs(os.path.dirname(os.path.abspath(csv_path)), exist_ok=True)
            with open(csv_path, "a"):
                pass
        except OSError as exc:
            raise SystemExit(f"error: argument --out/--csv: cannot write {csv_path}: {exc}") from None
    print(f"measuring the roofline ceilings of {env['device']} ...", file=sys.stderr, flush=True)
    peaks = measure_peaks(device, min(a.min_run_time, 0.5))
    l2, rows, run_id = l2_cache_bytes(device), [], time.strftime("%Y%m%dT%H%M%S")
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    built_key, built = None, None
    try:
        for case, dtype, mode, providers in plan:
            if built_key != (case, dtype):
                built_key, built = (case, dtype), None  # free the previous case first
                built = build(case, device, DTYPES[dtype], l2)
            group = _measure_group(case, dtype, mode, providers, built, peaks, device, a.min_run_time,
                                   a.memory, progress)
            for r in group:
                r.update(env, run_id=run_id, timestamp=stamp)
            if csv_path is not None and group:
                _report.write_csv(csv_path, group)  # as measured: Ctrl-C keeps what was measured
            rows += group
    except KeyboardInterrupt:
        print(f"interrupted: keeping the {len(rows)} rows measured", file=sys.stderr, flush=True)
    built = None
    _print_report(rows, env, peaks, a)
    if csv_path is not None and rows:
        print(f"appended {len(rows)} rows to {csv_path}", file=sys.stderr)
    if done != len(rows) and not rows:
        raise SystemExit("error: every measurement failed (see the warnings above)")
    return rows


_SAME_LAYOUT = {"fused_auto": "eager_nchw", "fused_auto" + CHANNELS_LAST_SUFFIX: "eager_channels_last"}
_GROUP = ("suite", "op", "mode", "dtype", "N", "C_in", "C_out", "H", "W", "k", "patch", "activation", "depth")


def summary(rows: list[dict], device_name: str) -> str:
    """fused_auto (NCHW inputs) and fused_auto_cl (channels_last inputs) against eager in
    the same layout (the never-slower rule: a converted model against the stock model it
    replaced, fed the same inputs) and against the best baseline, per op/model and mode."""
    lines = [f"summary on {device_name}: fused_auto (what a converted model runs) vs eager in "
             "the same input layout, and vs the best baseline; >1 is faster"]
    eager = {(tuple(r[k] for k in _GROUP), r["provider"]): r["p50_ms"] for r in rows
             if r["provider"] in _SAME_LAYOUT.values()}
    for r in rows:
        if r["provider"] not in _SAME_LAYOUT or r["speedup_vs_best_baseline"] == "":
            continue
        same = eager.get((tuple(r[k] for k in _GROUP), _SAME_LAYOUT[r["provider"]]))
        same_txt = f"{same / r['p50_ms']:5.2f}x" if same and r["p50_ms"] > 0 else "    -"
        noisy = r["p50_ms"] > 0 and (r["p80_ms"] - r["p20_ms"]) / r["p50_ms"] > NOISY_SPREAD
        lines.append(f"  {r['op']:<24} {r['mode']:<17} {r['dtype']:<9} {r['provider']:<14} "
                     f"{same_txt} vs {_SAME_LAYOUT[r['provider']]:<20} "
                     f"{r['speedup_vs_best_baseline']:5.2f}x vs {r['best_baseline']:<20} "
                     f"({r['p50_ms']:.3f} ms, backends {r['backend']})"
                     + ("  NOISY: p20-p80 spread over 25% of the median" if noisy else ""))
    return "\n".join(lines)


def _print_report(rows: list[dict], env: dict, peaks: Peaks, a: argparse.Namespace) -> None:
    from .paper import paper_table
    print(f"convmixer_kernels bench | {env['device_type']}: {env['device']} | SMs/cores {env['sm_count']} | "
          f"torch {env['torch']} | commit {env['git_commit'] or '-'}")
    print(f"roofline ceilings: copy {peaks.copy_gbps:.1f} GB/s, {peaks.matmul_dtype} matmul "
          f"{peaks.matmul_tflops:.3f} TFLOP/s, FMA {peaks.fma_tflops:.3f} TFLOP/s ({peaks.how})")
    print(f"speedup = best baseline p50 / row p50 (baselines: {', '.join(_baselines(a))}"
          f"{'; cudnn.benchmark on' if env['device_type'] == 'cuda' else ''})"
          + ("; triton left out on CPU (name it in --backends)" if env["device_type"] == "cpu"
             and a.backends is None else ""))
    print(_report.format_table([r for r in rows if r["suite"] != "paper"]), flush=True)
    paper = [r for r in rows if r["suite"] == "paper"]
    if paper:
        print("\nThe paper's comparison (inference img/s):")
        print(paper_table(paper), flush=True)
    if rows:
        print("\n" + summary(rows, env["device"]), flush=True)
