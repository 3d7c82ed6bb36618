"""The tuning table: which backend ``auto`` runs, measured on this kind of device.

A table is a small JSON file per device family (``family()``: ``cpu-avx512``,
``cpu-avx2``, ``cpu-default``, or ``cuda-<device name>``), written by
``python -m convmixer_kernels tune``, which times every candidate backend side by side
in one process for each op, mode, dtype, layout and shape the benchmark and the models
run, and keeps the fastest (a kernel of ours must beat the stock path by the table's
``margin`` to be chosen). Two places are read, the first found wins:

1. the user's table: ``$CONVMIXER_KERNELS_TUNING_DIR/<family>.json``, default
   ``~/.cache/convmixer_kernels/tuning/`` (``$XDG_CACHE_HOME`` respected);
2. the shipped table: ``convmixer_kernels/tuning/<family>.json`` in the package.

Lookup rule for an input: entries of the same op, mode ('eval', 'train' or
'train_no_input_grad': a training call whose input needs no gradient, e.g. a model's image
into patch_embed; without entries of that mode, the 'train' ones), dtype and layout
('channels_last' or 'contiguous'); among them, those with the same activation
if any; then the nearest shape by
``|log2 P - log2 P'| + |log2 C - log2 C'| + |log2 Co - log2 Co'| + |k - k'| / 2``
(P = N*H*W input pixels, C = input channels, Co = output channels, k = kernel or patch
size; ties: the first in the file). No table, or no entry of that op/mode/dtype/layout: ``auto`` falls back to
the priority order (the ``native`` stock path first). A table that cannot be read, has
another format, unknown keys or was measured with another torch major.minor is ignored
with one log line.
"""
from __future__ import annotations

import functools
import json
import logging
import math
import os
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

log = logging.getLogger("convmixer_kernels")

FORMAT = 1
ENTRY_KEYS = frozenset({"op", "mode", "dtype", "layout", "act", "n", "c", "h", "w", "k", "cout",
                        "best", "ms"})
TABLE_KEYS = frozenset({"format", "family", "device", "torch", "commit", "created", "margin",
                        "threads", "entries"})
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "tuning"


def family(device: torch.device | str = "cpu") -> str:
    """The device family a table is kept for."""
    device = torch.device(device)
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        return "cuda-" + "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")
    if device.type == "cpu":
        return "cpu-" + torch.backends.cpu.get_cpu_capability().lower()
    return device.type


def user_dir() -> Path:
    env = os.environ.get("CONVMIXER_KERNELS_TUNING_DIR")
    if env:
        return Path(env)
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "convmixer_kernels" / "tuning"


def layout_of(x: Tensor) -> str:
    cl = x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    return "channels_last" if cl else "contiguous"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def validate(table: object, path: str = "table") -> dict:
    """The table if it is well formed and current; ValueError saying what is wrong."""
    if not isinstance(table, dict):
        raise ValueError(f"{path}: expected a JSON object")
    if table.get("format") != FORMAT:
        raise ValueError(f"{path}: format {table.get('format')!r}, expected {FORMAT}")
    unknown = set(table) - TABLE_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}")
    ours = ".".join(torch.__version__.split(".")[:2])
    theirs = ".".join(str(table.get("torch", "")).split(".")[:2])
    if theirs != ours:
        raise ValueError(f"{path}: measured with torch {table.get('torch')!r}, this is torch "
                         f"{torch.__version__} (run `python -m convmixer_kernels tune`)")
    entries = table.get("entries")
    if not isinstance(entries, list):
        raise ValueError(f"{path}: 'entries' must be a list")
    for i, e in enumerate(entries):
        if not isinstance(e, dict) or set(e) != ENTRY_KEYS:
            got = sorted(e) if isinstance(e, dict) else type(e).__name__
            raise ValueError(f"{path}: entry {i} has keys {got}, expected {sorted(ENTRY_KEYS)}")
        if not all(isinstance(e[k], int) and e[k] >= 1 for k in ("n", "c", "h", "w", "k", "cout")):
            raise ValueError(f"{path}: entry {i}: n, c, h, w, k, cout must be positive integers")
        if not isinstance(e["best"], str):
            raise ValueError(f"{path}: entry {i}: 'best' must be a backend name")
    return table


@functools.lru_cache(maxsize=None)
def load(fam: str) -> tuple[Optional[dict], str]:
    """(table, where it came from) for a device family; (None, why not) if there is none."""
    for where in (user_dir() / f"{fam}.json", SHIPPED_DIR / f"{fam}.json"):
        if not where.is_file():
            continue
        try:
            return validate(json.loads(where.read_text()), str(where)), str(where)
        except (OSError, ValueError) as exc:  # json.JSONDecodeError is a ValueError
            log.warning("convmixer_kernels: ignoring the tuning table %s (%s); auto falls back "
                        "to the priority order", where, exc)
            return None, f"the table {where} was ignored ({exc})"
    return None, f"no tuning table for {fam}"


def clear_cache() -> None:
    load.cache_clear()


def _distance(e: dict, pixels: int, c: int, k: int, cout: int) -> float:
    return (abs(math.log2(e["n"] * e["h"] * e["w"]) - math.log2(max(pixels, 1)))
            + abs(math.log2(e["c"]) - math.log2(max(c, 1)))
            + abs(math.log2(e["cout"]) - math.log2(max(cout, 1))) + abs(e["k"] - k) / 2)


def lookup(op: str, x: Tensor, mode: str, activation: str, k: int,
           cout: int) -> Optional[tuple[str, str]]:
    """(backend, why) from the table for this input, or None (no table, no entry)."""
    if x.device.type not in ("cpu", "cuda"):
        return None
    table, where = load(family(x.device))
    if table is None:
        return None
    dt, lay = dtype_name(x.dtype), layout_of(x)
    rows = [e for e in table["entries"]
            if e["op"] == op and e["mode"] == mode and e["dtype"] == dt and e["layout"] == lay]
    if not rows and mode == "train_no_input_grad":  # a table measured without the mode
        rows = [e for e in table["entries"]
                if e["op"] == op and e["mode"] == "train" and e["dtype"] == dt and e["layout"] == lay]
    if not rows:
        return None
    same_act = [e for e in rows if e["act"] == activation]
    rows = same_act or rows
    n, c, h, w = x.shape
    best = min(rows, key=lambda e: _distance(e, n * h * w, c, k, cout))
    exact = (best["n"], best["c"], best["h"], best["w"], best["k"], best["cout"]) == (n, c, h, w, k, cout)
    shape = f"N={best['n']} C={best['c']} {best['h']}x{best['w']} k={best['k']} Cout={best['cout']}"
    return best["best"], (f"tuning table {where}: {'measured at this shape' if exact else 'nearest measured shape ' + shape}"
                          f" ({best['act']}), times ms {best['ms']}")
