"""Tests of the tools around the benchmark on CPU: the plot script, the paper table, the
info and profile commands, the profiler ranges, and the pytest-benchmark suite's wiring."""
from __future__ import annotations

import copy
import csv
import json
import os
import subprocess
import sys
import tomllib

import pytest
import torch

import convmixer_kernels as ck
from convmixer_kernels.tools import bench
from convmixer_kernels.tools import paper as _paper
from convmixer_kernels.tools import report as _report
from convmixer_kernels.tools.cli import main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--device", "cpu", "--batch", "2", "--dim", "8", "--size", "8", "--kernel-size", "3",
        "--image-size", "14", "--patch-size", "7", "--min-run-time", "0.01", "--threads", "1"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def sample_csv(tmp_path_factory) -> str:
    """A CSV with rows of every suite: a real tiny run of dw_block (inference), plus copies
    of its rows relabelled as a kernel-size sweep and as paper rows."""
    path = str(tmp_path_factory.mktemp("plot") / "sample.csv")
    rows = bench.run(TINY + ["--ops", "dw_block", "--modes", "inference", "--backends", "cpu", "--no-csv"])
    extra = []
    for k in (3, 5, 7):
        for r in rows:
            extra.append({**copy.deepcopy(r), "suite": "sweep", "k": k, "p50_ms": r["p50_ms"] * k / 3})
    for model in ("convmixer_768_32", "resnet152"):
        for r in rows:
            if model == "resnet152" and r["kind"] == "ours":
                continue
            extra.append({**copy.deepcopy(r), "suite": "paper", "op": model, "img_per_s": 10.0})
    _report.write_csv(path, rows + extra)
    return path


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # pyparsing names used by matplotlib
def test_plot_renders_pngs(sample_csv, tmp_path):
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        import plot
    finally:
        sys.path.pop(0)
    written = plot.main([sample_csv, "--out", str(tmp_path)])
    names = sorted(os.path.basename(p) for p in written)
    assert names == ["ksweep.png", "paper.png", "roofline.png", "speedup-inference.png"]
    for path in written:
        with open(path, "rb") as f:
            data = f.read()
        assert data.startswith(PNG_MAGIC) and len(data) > 5000, path


def test_plot_cli_bad_input(tmp_path):
    script = os.path.join(ROOT, "benchmarks", "plot.py")
    proc = subprocess.run([sys.executable, script, str(tmp_path / "missing.csv")], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode != 0 and "missing.csv" in proc.stderr and "Traceback" not in proc.stderr


def test_paper_summary():
    rows = [{"op": "convmixer_768_32", "dtype": "float32", "N": 2, "provider": p, "img_per_s": v}
            for p, v in (("fused_cpu", 30.0), ("fused_reference", 10.0), ("eager_nchw", 12.0),
                         ("eager_channels_last", 15.0), ("compile", 20.0))]
    rows.append({"op": "resnet152", "dtype": "float32", "N": 2, "provider": "eager_nchw", "img_per_s": 40.0})
    summary = {s["model"]: s for s in _paper.paper_summary(rows)}
    cm = summary["convmixer_768_32"]
    assert (cm["fused"], cm["fused_provider"], cm["eager"], cm["compile"]) == (30.0, "fused_cpu", 15.0, 20.0)
    assert cm["fused_vs_best_baseline"] == pytest.approx(1.5)
    assert summary["resnet152"]["fused"] is None and summary["resnet152"]["eager"] == 40.0
    table = _paper.paper_table(rows)
    assert "resnet152" in table and "1.50" in table


def test_info_command(capsys):
    assert main(["info", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out and "cores" in out
    for op in ("dw_block", "pw_block", "patch_embed"):
        assert f"{op} float32" in out
    assert "cpu        available" in out
    assert "cuda       unavailable: " in out  # and the reason follows


def test_profile_command(tmp_path, capsys):
    trace = tmp_path / "trace.json"
    assert main(["profile", "--device", "cpu", "--target", "layer", "--batch", "2", "--dim", "8",
                 "--size", "8", "--kernel-size", "3", "--steps", "1", "--backend", "cpu",
                 "--trace", str(trace)]) == 0
    out = capsys.readouterr().out
    assert "convmixer_kernels::dw_block_forward" in out and "convmixer_kernels::pw_block_backward" in out
    assert "convmixer_kernels.dw_block" in out  # the block's profiler range
    assert "share" in out and "GB/s" in out
    with open(trace) as f:
        names = {e.get("name") for e in json.load(f)["traceEvents"]}
    assert "convmixer_kernels.pw_block" in names and "step 0" in names


def test_profile_bad_backend(tmp_path):
    with pytest.raises(SystemExit) as exc:
        main(["profile", "--device", "cpu", "--backend", "cuda", "--target", "dw_block", "--batch", "1",
              "--dim", "4", "--size", "4", "--trace", str(tmp_path / "t.json")])
    assert "--backend" in str(exc.value) and "cuda" in str(exc.value)


def test_block_ranges_only_under_a_profiler():
    from torch.profiler import ProfilerActivity, profile

    from convmixer_kernels._ranges import block_range
    assert type(block_range(ck.dw_block)).__name__ == "nullcontext"
    block = ck.DepthwiseBlock(4, 3, backend="reference").eval()
    x = torch.randn(1, 4, 5, 5)
    with profile(activities=[ProfilerActivity.CPU], acc_events=True) as prof:
        block(x)
    assert "convmixer_kernels.dw_block" in {e.name for e in prof.events()}


def test_microbenchmarks_share_the_registry_and_stay_out_of_the_test_run():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        testpaths = tomllib.load(f)["tool"]["pytest"]["ini_options"]["testpaths"]
    assert testpaths == ["tests"]  # `pytest` alone never collects benchmarks/
    proc = subprocess.run([sys.executable, "-m", "pytest", "benchmarks", "--collect-only", "-q",
                           "-p", "no:cacheprovider"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [ln for ln in proc.stdout.splitlines() if "test_microbench[" in ln]
    from convmixer_kernels.tools.cases import MODES, case_set, our_providers
    device = torch.device("cpu")
    expected = sum(len(our_providers(c, device, torch.float32, None)) + 2
                   for c in case_set("cpu", "ops", quick=True)) * len(MODES)
    assert len(ids) == expected and not any("triton" in i for i in ids)


def test_default_csv_path_is_per_device():
    path = _report.default_csv_path(torch.device("cpu"))
    assert os.path.dirname(path) == os.path.join(ROOT, "benchmarks", "results")
    assert path.endswith(f"{os.cpu_count()}cores.csv") and " " not in os.path.basename(path)


def test_sample_csv_has_the_documented_columns(sample_csv):
    with open(sample_csv, newline="") as f:
        header = next(csv.reader(f))
    for col in ("op", "provider", "mode", "dtype", "N", "C_in", "C_out", "H", "W", "k", "p50_ms", "p20_ms",
                "p80_ms", "gb_per_s", "tflop_per_s", "pct_roofline", "peak_mem_mb", "device", "sm_count",
                "torch", "cuda", "cudnn", "triton", "git_commit", "timestamp"):
        assert col in header, col
