"""``python -m convmixer_kernels tune``: measure which backend is fastest for every
block call the benchmark and the models make on this device, and write the tuning
table that ``auto`` reads (``convmixer_kernels.backends.tuning``).

1. Record: the benchmark's cases (``cases.case_set``: ops and models, quick and full
   sizes for this device) run once through the fused modules in each mode, with a
   recorder in place of the backend choice; every distinct block call (op, mode,
   dtype, layout, activation, shape, k) is kept.
2. Time: for each call, every usable backend but ``reference`` (and ``triton`` on a
   CPU, where it runs only under the interpreter) runs the same random inputs side by
   side in one process, interleaved, ``--repeats`` rounds: eval = a forward under
   no_grad with running statistics, train = a training forward plus backward (with the
   input's gradient for 'train', without it for 'train_no_input_grad': the mode the
   recorded call had, ``backends.block_mode``).
3. Keep: the fastest by median; a kernel of ours must beat ``native`` (the stock path)
   by ``--margin`` (default 3 %) or ``native`` is kept, so noise never picks a slower path.

``--ops`` times only the named ops' calls and keeps the other ops' entries of the table
already at the destination (its metadata is then this run's).

The table goes to the user's tuning directory (``~/.cache/convmixer_kernels/tuning``),
which ``auto`` reads before the shipped one, or to ``--out PATH``; ``--ship`` writes it
into the package (``convmixer_kernels/tuning/``) to be committed.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Iterator, Optional

import torch

from .. import backends, functional
from ..backends import tuning
from ..schema import has_out_format
from ..spec import SPECS
from . import report
from .cases import case_set

__all__ = ["add_arguments", "run_args", "record_calls", "time_call", "tune"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_TUNED_OPS = ("dw_block", "pw_block", "patch_embed")
MODES = {"inference": "eval", "forward_backward": "train"}


@contextlib.contextmanager
def record_calls() -> Iterator[set]:
    """Within the block, every backend choice is recorded (and answered with ``native``)."""
    seen: set = set()
    real = backends.choose

    def recorder(backend, op, x, mode="eval", activation="gelu", k=1, cout=0):
        if op != "layer_eval":
            seen.add((op, mode, tuning.dtype_name(x.dtype), tuning.layout_of(x), activation,
                      tuple(x.shape), k, cout or x.shape[1]))
        return "native", "recording"

    backends.choose = recorder
    backends.forget_choices()
    try:
        yield seen
    finally:
        backends.choose = real
        backends.forget_choices()


def _signatures(device: torch.device, dtype: str, full: bool) -> list[tuple]:
    from .steps import build
    sigs: set = set()
    cases = [c for suite in ("ops", "models") for quick in ((True, False) if full else (True,))
             for c in case_set(device.type, suite, quick=quick)]
    for case in dict.fromkeys(cases):
        built = build(case, device, DTYPES[dtype], 0)
        for mode in MODES:
            for provider in ("fused_auto", "fused_auto_cl") if case.kind == "op" else ("fused_auto",):
                with record_calls() as seen:
                    try:
                        with built.provider(provider, "auto", mode) as (step, _forward):
                            step()
                    except KeyError:  # no channels_last variant for this case
                        continue
                sigs |= seen
    # The host-bound end of the shape range: the block calls of tools/overhead.py, so that
    # the nearest-shape rule has a measured bucket where per-call host time decides (without
    # it, a tiny call took the choice measured at the smallest benchmark shape).
    for op, k in HOST_BOUND_CALLS:
        for mode in ("eval", "train", "train_no_input_grad"):
            sigs.add((op, mode, dtype, "contiguous", "gelu", HOST_BOUND_SHAPE, k, HOST_BOUND_SHAPE[1]))
    return sorted(sigs)


def _inputs(op: str, shape: tuple, k: int, cout: int, dtype: torch.dtype, layout: str,
            device: torch.device, mode: str):
    n, c, h, w = shape
    spec = SPECS[op]
    g = torch.Generator().manual_seed(0)

    def rnd(*s, scale=1.0):
        return (torch.randn(*s, generator=g) * scale).to(device=device, dtype=dtype)
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = rnd(n, c, h, w).contiguous(memory_format=fmt)
    weight = rnd(cout, 1 if spec.depthwise else c, k, k, scale=0.2)
    if layout == "channels_last":
        weight = weight.contiguous(memory_format=torch.channels_last)
    params = [weight, rnd(cout), rnd(cout), rnd(cout)]
    if mode != "eval":
        x.requires_grad_(mode == "train")  # 'train_no_input_grad': no gradient of x
        for p in params:
            p.requires_grad_(True)
    rm = torch.zeros(cout, device=device)
    rv = torch.ones(cout, device=device)
    return x, params, rm, rv


def time_call(op: str, backend: str, mode: str, activation: str, args) -> "callable":
    """A zero-argument callable running one block call (eval: forward; train: forward and
    backward) on ``backend``."""
    x, (weight, bias, bn_w, bn_b), rm, rv = args
    fn = getattr(functional, op)
    # The GEMM blocks write their output in x's layout, as the stock modules (and so a
    # converted model's stock route) do: with the functional default (channels_last) the
    # stock candidate would be charged a relayout copy our kernels do not make.
    layout = {"memory_format": None} if has_out_format(SPECS[op]) else {}
    if mode == "eval":
        def run():
            with torch.no_grad():
                return fn(x, weight, bias, bn_w, bn_b, rm, rv, training=False,
                          activation=activation, backend=backend, **layout)
        return run

    # The output's gradient: a random tensor in the output's layout, as a loss hands it on
    # (and as the benchmark does). out.sum().backward() would hand an expanded (stride 0)
    # gradient that some backward paths first copy and others do not.
    with torch.no_grad():
        out = fn(x, weight, bias, bn_w, bn_b, rm.clone(), rv.clone(), training=True,
                 activation=activation, backend=backend, **layout)
    grad = torch.randn_like(out)

    def run_train():
        fn(x, weight, bias, bn_w, bn_b, rm, rv, training=True, activation=activation,
           backend=backend, **layout).backward(grad)
        for t in (x, weight, bias, bn_w, bn_b):
            t.grad = None
    return run_train


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _measure(fns: dict, device: torch.device, repeats: int, min_s: float) -> dict:
    """Median ms of each callable, interleaved: each round runs every candidate for at
    least ``min_s`` seconds (at least one call)."""
    times: dict = {name: [] for name in fns}
    for fn in fns.values():  # warm-up (allocator, oneDNN primitives, Triton compile)
        fn(), fn()
    _sync(device)
    for _ in range(repeats):
        for name, fn in fns.items():
            calls, start = 0, time.perf_counter()
            while True:
                fn()
                calls += 1
                _sync(device)
                elapsed = time.perf_counter() - start
                if elapsed >= min_s:
                    break
            times[name].append(elapsed / calls * 1e3)
    return {name: statistics.median(v) for name, v in times.items()}


def candidates(op: str, x: torch.Tensor) -> list[str]:
    out = []
    for name in backends.names():
        if name == "reference" or (name == "triton" and x.device.type == "cpu"):
            continue
        if backends.get(name).unavailable(op, x) is None:
            out.append(name)
    return out


# tools/overhead.py's input and blocks (op, kernel size).
HOST_BOUND_SHAPE = (1, 8, 4, 4)
HOST_BOUND_CALLS = (("dw_block", 3), ("pw_block", 1))

# A kernel of ours that beats native by less than this is timed twice (tune's second pass).
CONFIRM_WITHIN = 0.25


def _pick(ms: dict, margin: float) -> str:
    """The fastest candidate, or native where it is within ``margin`` of the fastest."""
    fastest = min(ms, key=ms.get)
    if fastest != "native" and "native" in ms and ms["native"] < ms[fastest] * (1 + margin):
        return "native"
    return fastest


def _time_signature(sig: tuple, names: Optional[list], device: torch.device, repeats: int,
                    min_s: float) -> dict:
    """Median ms of each candidate (``names``, or every candidate) for one recorded call."""
    op, mode, dt, layout, act, shape, k, cout = sig
    args = _inputs(op, shape, k, cout, DTYPES[dt], layout, device, mode)
    fns = {b: time_call(op, b, mode, act, args) for b in names or candidates(op, args[0])}
    return _measure(fns, device, repeats, min_s)


def tune(device: torch.device, dtypes: list[str], full: bool, repeats: int, min_s: float,
         margin: float, log=print, ops: Optional[list[str]] = None) -> dict:
    entries = []
    for dtype in dtypes:
        sigs = [s for s in _signatures(device, dtype, full) if ops is None or s[0] in ops]
        log(f"tune: {len(sigs)} block calls to time for {dtype} on {device}")
        for i, (op, mode, dt, layout, act, shape, k, cout) in enumerate(sigs):
            ms = _time_signature((op, mode, dt, layout, act, shape, k, cout), None, device, repeats, min_s)
            best = _pick(ms, margin)
            n, c, h, w = shape
            entries.append({"op": op, "mode": mode, "dtype": dt, "layout": layout, "act": act,
                            "n": n, "c": c, "h": h, "w": w, "k": k, "cout": cout, "best": best,
                            "ms": {b: round(t, 4) for b, t in ms.items()}})
            log(f"[{i + 1}/{len(sigs)}] {op} {mode} {dt} {layout} {act} {shape} k={k} cout={cout}: "
                + ", ".join(f"{b} {t:.3f}" for b, t in ms.items()) + f" ms -> {best}")
        # A close win of ours is measured again after every call has been timed once
        # (minutes later), and kept only if it wins again: one burst of noise on the stock
        # candidate must not pick a slower path.
        close = [(s, e) for s, e in zip(sigs, entries[len(entries) - len(sigs):])
                 if e["best"] != "native" and "native" in e["ms"]
                 and e["ms"]["native"] < e["ms"][e["best"]] * (1 + CONFIRM_WITHIN)]
        for j, (sig, e) in enumerate(close):
            op, mode, dt, layout, act, shape, k, cout = sig
            again = _time_signature(sig, list(e["ms"]), device, repeats, min_s)
            first = e["best"]
            if _pick(again, margin) != first:
                e["best"] = "native"
            e["ms"] = {b: round((t + again[b]) / 2, 4) for b, t in e["ms"].items()}
            log(f"[confirm {j + 1}/{len(close)}] {op} {mode} {dt} {layout} {act} {shape} k={k} "
                f"cout={cout}: " + ", ".join(f"{b} {t:.3f}" for b, t in again.items())
                + f" ms -> {e['best']}" + ("" if e["best"] == first else f" (was {first})"))
    return {"format": tuning.FORMAT, "family": tuning.family(device), "device": report.device_name(device),
            "torch": torch.__version__, "commit": report.git_commit() or None, "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "margin": margin, "threads": torch.get_num_threads(), "entries": entries}


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    from .bench import _device
    add = parser.add_argument
    add("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    add("--dtypes", default=None, help="comma list of float32,bfloat16,float16 (default: float32 on "
        "CPU, bfloat16 on CUDA)")
    add("--full", action="store_true", help="also the full benchmark's shapes (default: quick ones)")
    add("--repeats", type=int, default=5, help="interleaved rounds per candidate (default 5)")
    add("--min-time", type=float, default=0.05, help="seconds per candidate per round (default 0.05)")
    add("--margin", type=float, default=0.03, help="how much faster than native a kernel of ours "
        "must be to be chosen (default 0.03 = 3%%)")
    add("--threads", type=int, default=None, help="CPU threads (default: torch's setting)")
    add("--ops", default=None, help="comma list of dw_block,pw_block,patch_embed: time only these "
        "ops' calls and keep the other ops' entries of the table already at the destination")
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--out", metavar="PATH", default=None, help="write the table here")
    where.add_argument("--ship", action="store_true", help="write it into the package "
                       "(convmixer_kernels/tuning/<family>.json), to commit")
    return parser


def run_args(a: argparse.Namespace) -> dict:
    device = a.device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if a.threads:
        torch.set_num_threads(a.threads)
    dtypes = a.dtypes.split(",") if a.dtypes else (["bfloat16"] if device.type == "cuda" else ["float32"])
    bad = [d for d in dtypes if d not in DTYPES]
    if bad:
        raise SystemExit(f"error: argument --dtypes: unknown {bad}; expected {list(DTYPES)}")
    fam = tuning.family(device)
    path = Path(a.out) if a.out else (tuning.SHIPPED_DIR if a.ship else tuning.user_dir()) / f"{fam}.json"
    try:  # refuse an unwritable destination before measuring
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        raise SystemExit(f"error: --out: cannot write {path}: {exc}") from None
    ops = a.ops.split(",") if a.ops else None
    unknown = [o for o in ops or () if o not in _TUNED_OPS]
    if unknown:
        raise SystemExit(f"error: argument --ops: unknown {unknown}; expected {list(_TUNED_OPS)}")
    kept = []
    if ops is not None and path.is_file() and path.stat().st_size:
        try:  # the other ops' entries of the table there
            kept = [e for e in tuning.validate(json.loads(path.read_text()), str(path))["entries"]
                    if e["op"] not in ops]
        except (OSError, ValueError) as exc:
            raise SystemExit(f"error: --ops: the table at {path} cannot be kept ({exc}); "
                             "tune every op instead") from None
    table = tune(device, dtypes, a.full, a.repeats, a.min_time, a.margin,
                 log=lambda s: print(s, file=sys.stderr, flush=True), ops=ops)
    table["entries"] = kept + table["entries"]
    path.write_text(json.dumps(table, indent=1) + "\n")
    tuning.clear_cache()
    backends.forget_choices()
    chosen = {}
    for e in table["entries"]:
        chosen[e["best"]] = chosen.get(e["best"], 0) + 1
    print(f"wrote {len(table['entries'])} entries for {fam} to {path}; chosen: {chosen}")
    return table
