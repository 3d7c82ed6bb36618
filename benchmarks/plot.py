"""Turn a benchmark CSV (``benchmarks/results/<device>.csv``) into PNG plots.

    python benchmarks/plot.py benchmarks/results/<device>.csv [--out DIR] [--run RUN_ID]

Plots the latest run in the file (or ``--run``), one PNG each where the run has rows:

- ``speedup-<mode>.png``: speedup over the best baseline per op and shape (suites ops, models);
- ``ksweep.png``: median time of dw_block against kernel size 3..31 (suite sweep);
- ``roofline.png``: achieved TFLOP/s against arithmetic intensity, under the measured
  bandwidth and compute ceilings;
- ``paper.png``: inference img/s of the ConvMixers beside the paper's timm baselines.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

MODES = ("inference", "forward", "forward_backward")


def read_rows(path: str, run_id: Optional[str] = None) -> list[dict]:
    """The rows of one run (default: the last run in the file)."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise SystemExit(f"error: {path} has no rows")
    if "run_id" not in rows[0]:
        raise SystemExit(f"error: {path} has no run_id column (an older format)")
    run_id = run_id or rows[-1]["run_id"]
    rows = [r for r in rows if r["run_id"] == run_id]
    if not rows:
        raise SystemExit(f"error: argument --run: no rows with run_id {run_id!r} in {path}")
    return rows


def _num(r: dict, key: str) -> Optional[float]:
    try:
        return float(r[key])
    except (KeyError, TypeError, ValueError):
        return None


def _shape(r: dict) -> str:
    if r["op"] == "patch_embed":
        return f"{r['op']}\n{r['C_in']}->{r['C_out']} {r['H']}px p{r['patch']}"
    if r["op"] in ("dw_block", "pw_block", "layer"):
        k = f" k{r['k']}" if r["op"] != "pw_block" else ""
        return f"{r['op']}\nC{r['C_in']} {r['H']}x{r['W']}{k}"
    return f"{r['op']}\nN{r['N']}"


def _title(rows: Sequence[dict], what: str) -> str:
    r = rows[0]
    return f"{what}\n{r['device']} | torch {r['torch']} | commit {r['git_commit'] or '-'} | run {r['run_id']}"


def plot_speedup(rows: list[dict], out: str) -> list[str]:
    written = []
    for mode in MODES:
        sel = [r for r in rows if r["suite"] in ("ops", "models") and r["mode"] == mode
               and _num(r, "speedup_vs_best_baseline")]
        if not sel:
            continue
        shapes = list(dict.fromkeys(_shape(r) + f"\n{r['dtype']}" for r in sel))
        providers = list(dict.fromkeys(r["provider"] for r in sel))
        value = {(_shape(r) + f"\n{r['dtype']}", r["provider"]): _num(r, "speedup_vs_best_baseline") for r in sel}
        fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(shapes)), 4.5))
        width = 0.8 / len(providers)
        for i, p in enumerate(providers):
            xs = [j + (i - (len(providers) - 1) / 2) * width for j in range(len(shapes))]
            ax.bar(xs, [value.get((s, p), 0.0) for s in shapes], width, label=p)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(shapes)), shapes, fontsize=7)
        ax.set_ylabel("speedup over the best baseline (x)")
        ax.set_title(_title(sel, f"speedup per shape, {mode}"), fontsize=8)
        ax.legend(fontsize=7)
        written.append(_save(fig, out, f"speedup-{mode}.png"))
    return written


def plot_ksweep(rows: list[dict], out: str) -> list[str]:
    sel = [r for r in rows if r["suite"] == "sweep"]
    if not sel:
        return []
    modes = [m for m in MODES if any(r["mode"] == m for r in sel)]
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series = defaultdict(list)
        for r in sel:
            if r["mode"] == mode:
                series[(r["provider"], r["dtype"])].append((int(r["k"]), _num(r, "p50_ms")))
        for (provider, dtype), points in series.items():
            points.sort()
            ax.plot([k for k, _ in points], [t for _, t in points], marker="o", label=f"{provider} {dtype}")
        ax.set_xlabel("kernel size k")
        ax.set_ylabel("median ms")
        ax.set_yscale("log")
        r = sel[0]
        ax.set_title(f"dw_block N{r['N']} C{r['C_in']} {r['H']}x{r['W']}, {mode}", fontsize=8)
        ax.legend(fontsize=7)
    fig.suptitle(_title(sel, "kernel-size sweep"), fontsize=8)
    return [_save(fig, out, "ksweep.png")]


def plot_roofline(rows: list[dict], out: str) -> list[str]:
    sel = [r for r in rows if _num(r, "flop") and _num(r, "bytes") and _num(r, "tflop_per_s")]
    if not sel:
        return []
    bw, mm, fma = (_num(sel[0], k) for k in ("peak_copy_gb_per_s", "peak_matmul_tflop_per_s",
                                               "peak_fma_tflop_per_s"))
    fig, ax = plt.subplots(figsize=(7, 5))
    intensity = [_num(r, "flop") / _num(r, "bytes") for r in sel]
    lo, hi = min(intensity) / 2, max(intensity) * 2
    xs = [lo * (hi / lo) ** (i / 99) for i in range(100)]
    for peak, name in ((mm, "matmul"), (fma, "FMA")):
        if peak:
            ax.plot(xs, [min(peak, bw * x / 1e3) for x in xs], linestyle="--", linewidth=1,
                    label=f"ceiling: {bw:.0f} GB/s, {name} {peak:.2f} TFLOP/s")
    providers = list(dict.fromkeys(r["provider"] for r in sel))
    for p in providers:
        pts = [(x, _num(r, "tflop_per_s")) for x, r in zip(intensity, sel) if r["provider"] == p]
        ax.scatter([x for x, _ in pts], [y for _, y in pts], s=14, label=p)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP per compulsory byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(_title(sel, "roofline"), fontsize=8)
    ax.legend(fontsize=7)
    return [_save(fig, out, "roofline.png")]


def plot_paper(rows: list[dict], out: str) -> list[str]:
    sel = [r for r in rows if r["suite"] == "paper" and _num(r, "img_per_s")]
    if not sel:
        return []
    models = list(dict.fromkeys(r["op"] for r in sel))
    providers = list(dict.fromkeys(r["provider"] for r in sel))
    value = {(r["op"], r["provider"]): _num(r, "img_per_s") for r in sel}
    fig, ax = plt.subplots(figsize=(8, 0.6 * len(models) * max(1, len(providers) / 2) + 1.5))
    height = 0.8 / len(providers)
    for i, p in enumerate(providers):
        ys = [j + (i - (len(providers) - 1) / 2) * height for j in range(len(models))]
        ax.barh(ys, [value.get((m, p), 0.0) for m in models], height, label=p)
    ax.set_yticks(range(len(models)), models, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlabel(f"inference img/s (batch {sel[0]['N']}, {sel[0]['dtype']})")
    ax.set_title(_title(sel, "ConvMixers vs the paper's baselines (random weights)"), fontsize=8)
    ax.legend(fontsize=7)
    return [_save(fig, out, "paper.png")]


def _save(fig, out: str, name: str) -> str:
    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, name)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: Optional[Sequence[str]] = None) -> list[str]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", help="a CSV written by python -m convmixer_kernels bench")
    parser.add_argument("--out", default=None, help="output folder (default: <csv without .csv>-plots)")
    parser.add_argument("--run", default=None, help="run_id to plot (default: the last run in the file)")
    a = parser.parse_args(argv)
    if not os.path.exists(a.csv):
        parser.error(f"argument csv: no such file: {a.csv}")
    rows = read_rows(a.csv, a.run)
    out = a.out or os.path.splitext(a.csv)[0] + "-plots"
    written = plot_speedup(rows, out) + plot_ksweep(rows, out) + plot_roofline(rows, out) + plot_paper(rows, out)
    for path in written:
        print(path)
    return written


if __name__ == "__main__":
    main(sys.argv[1:])
