"""What a benchmark row records about its machine, the long-format CSV, and the text table."""
from __future__ import annotations

import contextlib
import csv
import importlib.metadata
import os
import platform
import re
import subprocess
from typing import Optional, Sequence

import torch

__all__ = ["CSV_FIELDS", "environment", "device_name", "default_csv_path", "write_csv", "format_table"]

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RESULTS_DIR = os.path.join(REPO_ROOT, "benchmarks", "results")

CSV_FIELDS = (
    "run_id", "suite", "op", "provider", "kind", "backend", "mode", "dtype",
    "N", "C_in", "C_out", "H", "W", "k", "patch", "activation", "depth",
    "p50_ms", "p20_ms", "p80_ms", "img_per_s", "speedup_vs_best_baseline", "best_baseline",
    "gb_per_s", "tflop_per_s", "pct_roofline", "roofline_floor_ms", "flop", "bytes",
    "peak_mem_mb", "peak_mem_how", "max_abs_diff", "input_sets",
    "device", "device_type", "sm_count", "threads", "peak_copy_gb_per_s", "peak_matmul_tflop_per_s",
    "peak_fma_tflop_per_s", "peaks_how", "torch", "cuda", "cudnn", "triton", "git_commit", "timestamp",
)


def _version(dist: str) -> str:
    """An installed distribution's version without importing it (Triton stays unloaded)."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return ""


def git_commit() -> str:
    """Short commit of the source checkout (``-dirty`` with uncommitted changes); '' if none."""
    try:
        run = lambda *a: subprocess.run(["git", *a], cwd=REPO_ROOT, capture_output=True, text=True,
                                        timeout=10)
        head = run("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return ""
        dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return ""


def cpu_model() -> str:
    name = platform.processor()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            name = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), name)
    return name or platform.machine()


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()}, {torch.get_num_threads()} threads"


def environment(device: torch.device) -> dict:
    """The per-run columns: device, SM count (CPU: cores), versions, commit."""
    cuda = device.type == "cuda"
    cudnn = torch.backends.cudnn.version() if cuda and torch.backends.cudnn.is_available() else None
    return {
        "device": device_name(device), "device_type": device.type,
        "sm_count": torch.cuda.get_device_properties(device).multi_processor_count if cuda
        else os.cpu_count(),
        "threads": torch.get_num_threads(), "torch": torch.__version__,
        "cuda": torch.version.cuda or "", "cudnn": cudnn or "", "triton": _version("triton"),
        "git_commit": git_commit(),
    }


def default_csv_path(device: torch.device) -> str:
    """``benchmarks/results/<device>.csv`` in the source checkout: one file per device."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        name = f"cpu {cpu_model()} {os.cpu_count()}cores"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    return os.path.join(RESULTS_DIR, f"{slug}.csv")


def write_csv(path: str, rows: Sequence[dict]) -> None:
    """Append ``rows`` (long format, ``CSV_FIELDS``) to ``path``; header on a new file.
    A file with other columns (an older format) is left alone and reported."""
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    if not new:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if tuple(header) != CSV_FIELDS:
            raise SystemExit(f"error: argument --csv: {path} has other columns (an older format); "
                             "pass --csv with a new file")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerows(rows)


def _fmt(value: Optional[float], spec: str) -> str:
    return "" if value is None or value == "" else format(value, spec)


def format_table(rows: Sequence[dict]) -> str:
    """One line per row: text columns left-aligned, numbers right-aligned."""
    head = ("op", "shape", "mode", "dtype", "provider", "p50 ms", "p20-p80", "img/s", "GB/s", "TFLOP/s",
            "%roof", "peak MiB", "speedup", "max|diff|")
    table = [head]
    for r in rows:
        table.append((
            r["op"], r["shape"], r["mode"], r["dtype"], r["provider"], f"{r['p50_ms']:.3f}",
            f"{r['p20_ms']:.3f}-{r['p80_ms']:.3f}", _fmt(r["img_per_s"], ".1f"), _fmt(r["gb_per_s"], ".1f"),
            _fmt(r["tflop_per_s"], ".3f"), _fmt(r["pct_roofline"], ".1f"), _fmt(r["peak_mem_mb"], ".1f"),
            _fmt(r["speedup_vs_best_baseline"], ".2f") + ("x" if r["speedup_vs_best_baseline"] else ""),
            _fmt(r["max_abs_diff"], ".1e")))
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) if i < 5 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in table]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])
