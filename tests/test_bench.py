"""Tests of the benchmark (convmixer_kernels.tools.bench) and its CLI, on CPU with tiny shapes.

The tiny run below covers every op, the CIFAR model and every mode once; torch.compile
is left out (its first compile on a 2-core CPU takes longer than this whole file)."""
from __future__ import annotations

import csv
import math
import os
import subprocess
import sys

import pytest
import torch

from convmixer_kernels.tools import bench
from convmixer_kernels.tools import cases as _bench_cases
from convmixer_kernels.tools.roofline import model_cost, op_cost

TINY = ["--device", "cpu", "--batch", "2", "--dim", "8", "--size", "8", "--kernel-size", "3",
        "--image-size", "14", "--patch-size", "7", "--min-run-time", "0.01", "--threads", "1"]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OURS = ("fused_cpu", "fused_auto")  # reference and native are not in the default run
PROVIDERS = OURS + ("eager_nchw", "eager_channels_last")


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "convmixer_kernels", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> tuple[list[dict], str]:
    """One tiny run of the ops and models suites, every mode, written to a CSV."""
    path = str(tmp_path_factory.mktemp("bench") / "bench.csv")
    return bench.run(TINY + ["--suites", "ops,models", "--memory", "--csv", path]), path


@pytest.fixture(scope="module")
def rows(tiny_run) -> list[dict]:
    return tiny_run[0]


def test_every_requested_row_present(rows):
    keys = sorted((r["op"], r["mode"], r["provider"]) for r in rows)
    ops = bench.OPS + ("convmixer_cifar_256_8",)
    want = [(op, mode, p) for op in ops for mode in bench.MODES for p in PROVIDERS]
    want += [(op, "forward_backward", "fused_cpu_memsave") for op in ops]  # auto's choice on CPU
    want += [(op, mode, p + "_cl") for op in bench.OPS for mode in bench.MODES for p in OURS]
    assert keys == sorted(want)


@pytest.mark.parametrize("provider,channels_last", [("fused_cpu", False), ("fused_cpu_cl", True),
                                                    ("fused_reference_cl", True)])
def test_provider_input_layout(provider, channels_last):
    """fused_<b>_cl times the fused module on channels_last inputs (and weights), as
    eager_channels_last does; fused_<b> gets NCHW inputs, as eager_nchw."""
    from convmixer_kernels.tools.steps import build

    case = next(c for c in _bench_cases.case_set("cpu", "ops", quick=True) if c.op == "dw_block")
    case = case.with_overrides(batch=2, dim=8, size=8, kernel_size=3)
    built = build(case, torch.device("cpu"), torch.float32, l2_bytes=1 << 20)
    seen = []
    hook = built.module.register_forward_pre_hook(
        lambda m, args: seen.append(args[0].is_contiguous(memory_format=torch.channels_last)
                                    and not args[0].is_contiguous()))
    try:
        with built.provider(provider, "cpu", "inference") as (step, _forward):
            step()
    finally:
        hook.remove()
    assert seen and all(v == channels_last for v in seen)


def test_memory_saving_provider_uses_less_memory(rows):
    """The memory-saving training mode's peak is below the default mode's: it keeps one
    activation-sized tensor less per block (the comparison with eager is the run's figure
    to report). The ops of the tiny run; a model at a size where its activations, not its
    parameters and optimizer state, decide the peak."""
    for op in ("dw_block", "pw_block", "layer"):
        peak = {r["provider"]: r["peak_mem_mb"] for r in rows
                if r["op"] == op and r["mode"] == "forward_backward"}
        print(op, peak)
        assert peak["fused_cpu_memsave"] < peak["fused_cpu"], op
    model_rows = bench.run(TINY + ["--suites", "models", "--dim", "32", "--image-size", "32",
                                   "--patch-size", "2", "--modes", "forward_backward",
                                   "--backends", "cpu", "--baselines", "eager_nchw", "--memory",
                                   "--no-csv"])
    peak = {r["provider"]: r["peak_mem_mb"] for r in model_rows}
    print("model", peak)
    assert peak["fused_cpu_memsave"] < peak["fused_cpu"]


def test_triton_left_out_on_cpu_by_default(rows):
    # tests/conftest.py sets TRITON_INTERPRET=1, so available_backends lists triton for dw_block
    import convmixer_kernels as ck
    assert "triton" in ck.available_backends("cpu", "dw_block")
    assert not any("triton" in r["provider"] for r in rows)


def test_row_values(rows):
    for r in rows:
        assert set(bench.CSV_FIELDS) <= set(r), r
        for key in ("p20_ms", "p50_ms", "p80_ms", "speedup_vs_best_baseline", "gb_per_s", "tflop_per_s",
                    "pct_roofline", "flop", "bytes", "peak_copy_gb_per_s", "peak_matmul_tflop_per_s"):
            assert math.isfinite(r[key]) and r[key] > 0, (key, r)
        assert r["p20_ms"] <= r["p50_ms"] <= r["p80_ms"], r
        assert r["peak_mem_mb"] > 0 and r["peak_mem_how"]  # every step allocates its output
        assert r["max_abs_diff"] < 1e-4, r  # every provider computes the same thing
        assert r["device"] and r["device_type"] == "cpu" and r["sm_count"] == os.cpu_count()
        assert r["torch"] and r["dtype"] == "float32" and r["timestamp"] and r["run_id"]
        assert r["kind"] == ("ours" if r["provider"] in OURS + ("fused_cpu_memsave", "fused_cpu_cl",
                                                                 "fused_auto_cl") else "baseline")
        ours_backend = r["provider"][len("fused_"):].removesuffix("_memsave").removesuffix("_cl")
        if ours_backend == "auto":  # the backends auto chose, joined with '+'
            from convmixer_kernels import backends
            assert set(r["backend"].split("+")) <= set(backends.names()), r
        else:
            assert r["backend"] == (ours_backend if r["kind"] == "ours" else r["provider"])
        assert (r["img_per_s"] == "") == (r["op"] in bench.OPS)


def test_speedup_is_best_baseline_over_row(rows):
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["op"], r["mode"]), []).append(r)
    for group in groups.values():
        best = min(r["p50_ms"] for r in group if r["kind"] == "baseline")
        for r in group:
            assert r["speedup_vs_best_baseline"] == pytest.approx(best / r["p50_ms"])
            assert r["best_baseline"] in ("eager_nchw", "eager_channels_last")


def test_roofline_columns_follow_the_counts(rows):
    for r in rows:
        seconds = r["p50_ms"] * 1e-3
        assert r["gb_per_s"] == pytest.approx(r["bytes"] / seconds / 1e9)
        assert r["tflop_per_s"] == pytest.approx(r["flop"] / seconds / 1e12)
        assert r["pct_roofline"] == pytest.approx(100 * r["roofline_floor_ms"] / r["p50_ms"])
    dw = next(r for r in rows if r["op"] == "dw_block" and r["mode"] == "inference")
    assert dw["flop"] == 2 * 3 * 3 * 2 * 8 * 8 * 8  # 2 k^2 N C H W
    assert dw["bytes"] == 2 * (2 * 8 * 8 * 8) * 4 + 8 * 10 * 4  # x read, y written, weights + bias


def test_shapes_in_rows(rows):
    dw = next(r for r in rows if r["op"] == "dw_block")
    assert (dw["N"], dw["C_in"], dw["C_out"], dw["H"], dw["W"], dw["k"]) == (2, 8, 8, 8, 8, 3)
    patch = next(r for r in rows if r["op"] == "patch_embed")
    assert (patch["C_in"], patch["C_out"], patch["H"], patch["patch"]) == (3, 8, 14, 7)
    model = next(r for r in rows if r["op"] == "convmixer_cifar_256_8")
    assert (model["C_out"], model["depth"], model["k"], model["patch"]) == (8, 8, 3, 7)


def test_csv_is_well_formed(tiny_run):
    rows, path = tiny_run
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert tuple(read[0]) == bench.CSV_FIELDS
    assert len(read) == len(rows)
    for r, orig in zip(read, rows):
        assert (r["op"], r["mode"], r["provider"]) == (orig["op"], orig["mode"], orig["provider"])
        assert float(r["p50_ms"]) == pytest.approx(orig["p50_ms"])
        assert float(r["p20_ms"]) <= float(r["p50_ms"]) <= float(r["p80_ms"])
        assert math.isfinite(float(r["speedup_vs_best_baseline"])) and float(r["pct_roofline"]) > 0
        assert int(r["N"]) == 2 and r["torch"] and r["device"] and int(r["sm_count"]) >= 1


def test_subset_table_progress_and_append(tmp_path, capsys):
    path = tmp_path / "bench.csv"
    args = TINY + ["--ops", "pw_block", "--modes", "eval,forward_backward", "--backend", "reference",
                   "--csv", str(path)]
    out_rows = bench.run(args)
    assert {(r["op"], r["mode"]) for r in out_rows} == {("pw_block", "inference"),
                                                        ("pw_block", "forward_backward")}
    assert {r["provider"] for r in out_rows} == {"fused_reference", "fused_reference_cl", "eager_nchw",
                                                 "eager_channels_last", "fused_reference_memsave"}
    assert {r["mode"] for r in out_rows if r["provider"].endswith("_memsave")} == {"forward_backward"}
    captured = capsys.readouterr()
    table_lines = [ln for ln in captured.out.splitlines() if ln.startswith("pw_block")]
    assert len(table_lines) == 9 and "fused_reference" in captured.out
    assert "roofline ceilings" in captured.out and "float32" in captured.out
    assert "[9/9]" in captured.err  # progress lines go to stderr
    bench.run(args)
    text = path.read_text()
    assert text.count("run_id,suite,op") == 1  # no second header
    with open(path, newline="") as f:
        read = list(csv.DictReader(f))
    assert len(read) == 18 and len({r["run_id"] for r in read}) >= 1


def test_csv_of_another_format_is_refused(tmp_path, capsys):
    path = tmp_path / "old.csv"
    path.write_text("op,provider,backend\n")
    with pytest.raises(SystemExit) as exc:
        bench.run(TINY + ["--ops", "dw_block", "--modes", "inference", "--backends", "cpu", "--csv", str(path)])
    assert "--csv" in str(exc.value)


def test_unavailable_backend_names_the_option(capsys):
    with pytest.raises(SystemExit) as exc:
        bench.run(TINY + ["--ops", "dw_block", "--backends", "cuda", "--no-csv"])
    assert "--backends" in str(exc.value) and "cuda" in str(exc.value)


def test_baseline_selection():
    parse = bench.build_parser().parse_args
    assert bench._baselines(parse([])) == ["eager_nchw", "eager_channels_last"]
    assert bench._baselines(parse(["--full"]))[-1] == "compile"
    assert bench._baselines(parse(["--compile"]))[-1] == "compile"
    assert "compile" not in bench._baselines(parse(["--full", "--no-compile"]))
    assert bench._baselines(parse(["--max-autotune"]))[-1] == "compile_max_autotune"


def test_registry_suites():
    quick_ops = _bench_cases.case_set("cpu", "ops", quick=True)
    assert [c.op for c in quick_ops] == list(bench.OPS)
    gpu = _bench_cases.case_set("cuda", "ops", quick=False)
    assert {(c.C_in, c.H, c.k) for c in gpu if c.op == "dw_block"} == {(1536, 32, 9), (768, 32, 7),
                                                                       (1024, 16, 9), (256, 16, 5)}
    assert [c.k for c in _bench_cases.case_set("cuda", "sweep", quick=False)] == list(range(3, 32, 2))
    assert {c.op for c in _bench_cases.case_set("cuda", "models", quick=False)} == set(_bench_cases.MODELS)
    paper = {c.op for c in _bench_cases.case_set("cpu", "paper", quick=True)}
    assert set(_bench_cases.TIMM_BASELINES) <= paper and "convmixer_1536_20" in paper
    # --kernel-size leaves the sweep alone; timm models keep their 224 px input
    sweep = [c.with_overrides(kernel_size=3) for c in _bench_cases.case_set("cpu", "sweep", quick=True)]
    assert len({c.k for c in sweep}) == 15
    timm_case = _bench_cases.model_case("resnet152", 2, "paper").with_overrides(batch=1, image_size=14, dim=8)
    assert (timm_case.N, timm_case.H) == (1, 224)


def test_cost_formulas():
    n, c, h, k = 2, 16, 8, 5
    inf = op_cost("dw_block", n, c, c, h, h, k, 1, 4, "inference")
    assert inf.simt_flop == 2 * k * k * n * c * h * h and inf.gemm_flop == 0
    both = op_cost("dw_block", n, c, c, h, h, k, 1, 4, "forward_backward")
    assert both.simt_flop == 3 * inf.simt_flop
    pw = op_cost("pw_block", n, c, 32, h, h, 1, 1, 2, "inference")
    assert pw.gemm_flop == 2 * n * h * h * c * 32 and pw.bytes == (n * c * h * h + n * 32 * h * h) * 2 + 32 * 17 * 2
    patch = op_cost("patch_embed", n, 3, c, 28, 28, 1, 7, 4, "forward_backward")
    assert patch.gemm_flop == 2 * (2 * n * 4 * 4 * c * 3 * 49)  # no input gradient for images
    model = model_cost(n, c, 2, 28, k, 7, 10, 4, "inference")
    parts = (op_cost("patch_embed", n, 3, c, 28, 28, 1, 7, 4, "inference")
             + op_cost("layer", n, c, c, 4, 4, k, 1, 4, "inference") * 2)
    assert model.flop == pytest.approx(parts.flop + 2 * n * c * 10)


def test_cli_subprocess():
    proc = _cli("bench", *TINY, "--ops", "dw_block,patch_embed", "--modes", "inference", "--no-csv")
    assert proc.returncode == 0, proc.stderr
    for op in ("dw_block", "patch_embed"):
        assert any(ln.startswith(op) for ln in proc.stdout.splitlines()), proc.stdout
    assert "speedup" in proc.stdout


def test_cli_bad_argument():
    proc = _cli("bench", *TINY, "--ops", "nonsense")
    assert proc.returncode != 0
    assert "--ops" in proc.stderr and "nonsense" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("bad", [["--modes", "eval,fast"], ["--kernel-size", "4"], ["--batch", "0"],
                                 ["--min-run-time", "-1"], ["--dtype", "int8"], ["--device", "tpu"],
                                 ["--suites", "everything"], ["--baselines", "onnx"], ["--models", "vgg"]])
def test_bad_argument(bad, capsys):
    with pytest.raises(SystemExit) as exc:
        bench.run(TINY + bad)
    assert exc.value.code != 0
    err = capsys.readouterr().err
    assert bad[0] in err and bad[1].split(",")[-1] in err, err


def test_cli_needs_subcommand(capsys):
    from convmixer_kernels.tools.cli import main
    with pytest.raises(SystemExit) as exc:
        main([])
    assert exc.value.code != 0 and "COMMAND" in capsys.readouterr().err


def test_bench_entry_matches_cli(monkeypatch, capsys):
    from convmixer_kernels.tools.cli import bench_entry
    monkeypatch.setattr(sys, "argv", ["convmixer-bench", *TINY, "--ops", "patch_embed", "--modes", "eval",
                                      "--no-csv"])
    assert bench_entry() == 0
    assert any(ln.startswith("patch_embed") for ln in capsys.readouterr().out.splitlines())


def test_import_does_not_load_triton():
    code = ("import sys, convmixer_kernels.tools.bench, convmixer_kernels.__main__, convmixer_kernels.tools.profile; "
            "print('triton' in sys.modules)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.strip() == "False", proc.stderr


def test_summary_gives_the_same_layout_ratio(rows):
    """The summary line of each fused_auto row: eager in the same input layout over the row
    (the never-slower rule), beside the best-baseline ratio."""
    text = bench.summary(rows, "test")
    checked = 0
    for r in rows:
        if r["provider"] not in ("fused_auto", "fused_auto_cl") or r["suite"] != "ops":
            continue
        twin = "eager_nchw" if r["provider"] == "fused_auto" else "eager_channels_last"
        e = next(q for q in rows if q["provider"] == twin and q["op"] == r["op"]
                 and q["mode"] == r["mode"] and q["N"] == r["N"] and q["C_in"] == r["C_in"])
        want = f"{e['p50_ms'] / r['p50_ms']:5.2f}x vs {twin}"
        line = next(ln for ln in text.splitlines()
                    if f" {r['mode']} " in ln and ln.split()[0] == r["op"] and f" {r['provider']} " in ln)
        assert want in line, (want, line)
        checked += 1
    assert checked >= 6


def test_auto_backend_column_asks_for_the_providers_input_layout(monkeypatch):
    """The 'backend' column of fused_auto_cl asks auto about a channels_last input (the
    choice may differ by layout), of fused_auto about the NCHW one."""
    seen = []
    real = bench._auto_choice
    monkeypatch.setattr(bench, "_auto_choice", lambda case, mode, x: seen.append(
        x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()) or real(case, mode, x))
    rows = bench.run(TINY + ["--ops", "pw_block", "--modes", "inference", "--baselines", "eager_nchw",
                             "--no-csv"])
    providers = [r["provider"] for r in rows if r["provider"].startswith("fused_auto")]
    assert sorted(providers) == ["fused_auto", "fused_auto_cl"]
    assert sorted(seen) == [False, True]
