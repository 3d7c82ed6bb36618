"""Tests of the benchmark (convmixer_kernels.bench) and its CLI, on CPU with tiny shapes."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest

from convmixer_kernels import bench

TINY = ["--device", "cpu", "--batch", "2", "--dim", "8", "--size", "8", "--kernel-size", "3",
        "--image-size", "14", "--patch-size", "7", "--min-run-time", "0.01"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convmixer_kernels", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    return bench.run(TINY)


def test_every_requested_row_present(rows):
    keys = [(r["op"], r["mode"], r["provider"]) for r in rows]
    expected = [(op, mode, p) for op in bench.OPS for mode in bench.MODES for p in bench.PROVIDERS]
    assert sorted(keys) == sorted(expected)  # each exactly once


def test_row_values(rows):
    for r in rows:
        assert set(bench.CSV_FIELDS) <= set(r), r
        for key in ("p20_ms", "p50_ms", "p80_ms", "speedup_vs_best_eager"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"], r
        assert r["device"] and r["dtype"] == "float32"
        assert r["max_abs_diff"] < 1e-4, r  # every provider computes the same thing
        if r["provider"] == "fused":
            assert r["backend"] in ("cpu", "reference")
        else:
            assert r["backend"] == "eager"


def test_speedup_is_best_eager_over_provider(rows):
    for op in bench.OPS:
        for mode in bench.MODES:
            by = {r["provider"]: r for r in rows if r["op"] == op and r["mode"] == mode}
            best = min(by["eager_nchw"]["p50_ms"], by["eager_channels_last"]["p50_ms"])
            assert by["fused"]["speedup_vs_best_eager"] == pytest.approx(best / by["fused"]["p50_ms"])
            assert max(by[p]["speedup_vs_best_eager"] for p in bench.PROVIDERS[1:]) == pytest.approx(1.0)


def test_shapes_in_rows(rows):
    dw = next(r for r in rows if r["op"] == "dw_block")
    assert (dw["N"], dw["C"], dw["C_out"], dw["H"], dw["W"], dw["k"]) == (2, 8, 8, 8, 8, 3)
    patch = next(r for r in rows if r["op"] == "patch_embed")
    assert (patch["C"], patch["C_out"], patch["H"], patch["k"]) == (3, 8, 14, 7)


def test_subset_and_table(capsys):
    out_rows = bench.run(TINY + ["--ops", "pw_block", "--modes", "eval,train_fwdbwd",
                                 "--backend", "reference"])
    assert {(r["op"], r["mode"]) for r in out_rows} == {("pw_block", "eval"), ("pw_block", "train_fwdbwd")}
    assert len(out_rows) == 2 * len(bench.PROVIDERS)
    assert {r["backend"] for r in out_rows if r["provider"] == "fused"} == {"reference"}
    captured = capsys.readouterr()
    table_lines = [ln for ln in captured.out.splitlines() if ln.startswith("pw_block")]
    assert len(table_lines) == 2 and "reference" in table_lines[0]
    assert "torch" in captured.out and "float32" in captured.out
    assert "[6/6]" in captured.err  # progress lines go to stderr


def test_csv_header_rows_and_append(tmp_path):
    path = tmp_path / "bench.csv"
    args = TINY + ["--ops", "dw_block", "--modes", "eval", "--csv", str(path)]
    first = bench.run(args)
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == len(first) == len(bench.PROVIDERS)
    assert tuple(read[0]) == bench.CSV_FIELDS
    for r, orig in zip(read, first):
        assert r["op"] == "dw_block" and r["mode"] == "eval" and r["provider"] == orig["provider"]
        assert float(r["p50_ms"]) == pytest.approx(orig["p50_ms"])
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert math.isfinite(float(r["speedup_vs_best_eager"]))
        assert int(r["N"]) == 2 and int(r["k"]) == 3

    bench.run(args)
    text = path.read_text()
    assert text.count("op,provider,backend") == 1  # no second header
    with open(path, newline="") as f:
        assert len(list(csv.DictReader(f))) == 2 * len(bench.PROVIDERS)


def test_cli_subprocess():
    proc = _cli("bench", *TINY, "--modes", "eval")
    assert proc.returncode == 0, proc.stderr
    for op in bench.OPS:
        assert any(ln.startswith(op) for ln in proc.stdout.splitlines()), proc.stdout
    assert "speedup" in proc.stdout


def test_cli_bad_argument():
    proc = _cli("bench", *TINY, "--ops", "nonsense")
    assert proc.returncode != 0
    assert "--ops" in proc.stderr and "nonsense" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("bad", [["--modes", "eval,fast"], ["--kernel-size", "4"], ["--batch", "0"],
                                 ["--min-run-time", "-1"], ["--dtype", "int8"], ["--device", "tpu"]])
def test_bad_argument(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.run(TINY + bad)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert bad[0] in err and bad[1].split(",")[-1] in err, err


def test_cli_needs_subcommand():
    assert _cli().returncode != 0


def test_bench_entry_matches_cli(monkeypatch, capsys):
    from convmixer_kernels.__main__ import bench_entry
    monkeypatch.setattr(sys, "argv", ["convmixer-bench", *TINY, "--ops", "patch_embed", "--modes", "eval"])
    assert bench_entry() == 0
    assert any(ln.startswith("patch_embed") for ln in capsys.readouterr().out.splitlines())


def test_import_does_not_load_triton():
    code = "import sys, convmixer_kernels.bench, convmixer_kernels.__main__; print('triton' in sys.modules)"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr
