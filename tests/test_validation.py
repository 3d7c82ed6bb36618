"""The GPU validation gate (convmixer_kernels/backends/validation.py), on the CPU.

The source hash of the v2 CUDA kernels, the manifest that validates it (wrong hash, corrupt
file), recording a GPU run from a JUnit report, what the cuda backend runs by default, auto's
refusal of the unvalidated opt-in, and (where the extension is built with CUDA kernels) the
hash compiled into it and the flag Python sets in it. No GPU needed.
"""
from __future__ import annotations

import glob
import json
import logging
import os
import shutil

import pytest
import torch

from convmixer_kernels import _cpp_lib, backends
from convmixer_kernels.backends import validation

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILY = "dw_block_v2"
SWITCH = validation.SWITCHES[FAMILY]


def _copy_sources(dest):
    for rel in validation.KERNEL_SOURCES[FAMILY]:
        src = os.path.join(ROOT, rel)
        if os.path.exists(src):
            os.makedirs(os.path.dirname(os.path.join(dest, rel)), exist_ok=True)
            shutil.copy(src, os.path.join(dest, rel))
    return str(dest)


def _manifest(tmp_path, entry, name="m.json"):
    path = tmp_path / name
    path.write_text(json.dumps({"families": {FAMILY: entry} if entry is not None else {}}))
    return str(path)


# ---- the hash ------------------------------------------------------------------------------

def test_hash_is_stable_and_matches_the_tree(tmp_path):
    h = validation.source_hash(FAMILY)
    assert len(h) == 64 and h == validation.source_hash(FAMILY)
    assert validation.source_hash(FAMILY, _copy_sources(tmp_path)) == h  # a copy hashes the same


@pytest.mark.parametrize("rel", ["csrc/cuda/dw_block_v2.cuh", "csrc/cuda/dw_block.cu"])
def test_hash_changes_when_a_kernel_source_changes(tmp_path, rel):
    root = _copy_sources(tmp_path)
    before = validation.source_hash(FAMILY, root)
    with open(os.path.join(root, rel), "a") as f:
        f.write("\n// one more line\n")
    assert validation.source_hash(FAMILY, root) != before


def test_hash_changes_when_a_listed_file_appears(tmp_path):
    root = _copy_sources(tmp_path)
    listed = os.path.join(root, validation.KERNEL_SOURCES[FAMILY][-1])
    os.remove(listed)  # absent: hashed as absent
    before = validation.source_hash(FAMILY, root)
    with open(listed, "w") as f:  # present and empty: another hash
        f.write("")
    assert validation.source_hash(FAMILY, root) != before


def test_every_depthwise_cuda_file_is_hashed():
    listed = set(validation.KERNEL_SOURCES[FAMILY])
    for path in glob.glob(os.path.join(ROOT, "csrc", "cuda", "dw_block*")):
        rel = os.path.relpath(path, ROOT).replace(os.sep, "/")
        assert rel in listed, f"{rel} is not in validation.KERNEL_SOURCES[{FAMILY!r}]"


# ---- the manifest --------------------------------------------------------------------------

def test_shipped_manifest_parses_and_is_package_data():
    fams, problem = validation.load_manifest(validation.MANIFEST)
    assert problem is None and isinstance(fams, dict)
    with open(os.path.join(ROOT, "setup.py")) as f:
        assert '"validated/*.json"' in f.read()


def test_matching_hash_is_validated(tmp_path):
    path = _manifest(tmp_path, {"sha256": "a" * 64, "device": "H100", "commit": "c0ffee",
                                "tests_passed": 12, "date": "2026-12-06"})
    ok, why = validation.status(FAMILY, current="a" * 64, manifest=path)
    assert ok and "validated" in why and "H100" in why


def test_wrong_hash_is_not_validated(tmp_path):
    path = _manifest(tmp_path, {"sha256": "b" * 64, "device": "H100", "commit": "c", "tests_passed": 3})
    ok, why = validation.status(FAMILY, current="a" * 64, manifest=path)
    assert not ok and "not validated" in why and "bbbbbbbbbbbb" in why


def test_no_entry_and_no_hash_are_not_validated(tmp_path):
    assert not validation.is_validated(FAMILY, current="a" * 64, manifest=_manifest(tmp_path, None))
    path = _manifest(tmp_path, {"sha256": "a" * 64})
    assert not validation.status(FAMILY, current="", manifest=path)[0]


@pytest.mark.parametrize("text", ["{not json", '{"families": []}', '{"families": {"dw_block_v2": 3}}', "[]", ""])
def test_corrupt_manifest_is_not_validated_with_a_log_line(tmp_path, caplog, text):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="convmixer_kernels"):
        ok, why = validation.status(FAMILY, current="a" * 64, manifest=str(path))
    assert not ok and "unreadable" in why
    assert any("validation manifest" in r.getMessage() and "unvalidated" in r.getMessage()
               for r in caplog.records), caplog.text


def test_corrupt_manifest_from_the_environment_does_not_crash(tmp_path, monkeypatch):
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    monkeypatch.setenv(validation.MANIFEST_ENV, str(bad))
    d = validation.describe(FAMILY)
    assert d["validated"] is False and d["runs"].startswith("v1")
    x = torch.empty(1, 1, 1, 1)
    assert backends.explain(x, "dw_block")["cuda_dw_v2"]["validated"] is False


# ---- recording a GPU run -------------------------------------------------------------------

def _junit(tmp_path, cases):
    body = []
    for name, outcome in cases:
        child = {"pass": "", "fail": "<failure message='x'/>", "skip": "<skipped message='no GPU'/>",
                 "error": "<error message='x'/>"}[outcome]
        body.append(f'<testcase classname="tests.test_cuda_dw_block_v2" name="{name}" time="0.1">{child}</testcase>')
    body.append('<testcase classname="tests.test_other" name="t" time="0.1"><failure message="x"/></testcase>')
    path = tmp_path / "junit.xml"
    path.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest">' + "".join(body)
                    + "</testsuite></testsuites>")
    return str(path)


def test_record_writes_an_entry_that_validates_that_hash(tmp_path):
    junit = _junit(tmp_path, [("a", "pass"), ("b", "pass"), ("c", "pass")])
    out = tmp_path / "out" / "validated-cuda.json"
    code, msg = validation.record(junit, str(out), FAMILY, device="NVIDIA H100", commit="abc123",
                                  current="d" * 64, base_manifest=_manifest(tmp_path, None))
    assert code == 0, msg
    entry = json.loads(out.read_text())["families"][FAMILY]
    assert entry["sha256"] == "d" * 64 and entry["tests_passed"] == 3
    assert entry["device"] == "NVIDIA H100" and entry["commit"] == "abc123" and entry["date"]
    assert validation.is_validated(FAMILY, current="d" * 64, manifest=str(out))
    assert not validation.is_validated(FAMILY, current="e" * 64, manifest=str(out))


@pytest.mark.parametrize("bad", ["fail", "skip", "error"])
def test_record_refuses_a_run_with_a_failed_or_skipped_test(tmp_path, bad):
    junit = _junit(tmp_path, [("a", "pass"), ("b", bad)])
    out = tmp_path / "v.json"
    code, msg = validation.record(junit, str(out), FAMILY, device="d", commit="c", current="d" * 64)
    assert code == 1 and "NOT validated" in msg and not out.exists()


def test_record_without_the_family_tests_writes_nothing(tmp_path):
    out = tmp_path / "v.json"
    code, _ = validation.record(_junit(tmp_path, []), str(out), FAMILY, device="d", commit="c", current="d" * 64)
    assert code == 5 and not out.exists()
    code, _ = validation.record(str(tmp_path / "missing.xml"), str(out), FAMILY, current="d" * 64)
    assert code == 5 and not out.exists()


# ---- what runs -------------------------------------------------------------------------------

def test_default_runs_v1_and_the_switch_is_reported(monkeypatch):
    monkeypatch.delenv(SWITCH, raising=False)
    assert validation.what_runs(FAMILY, validated=False).startswith("v1")
    assert validation.what_runs(FAMILY, validated=True).startswith("v2")
    monkeypatch.setenv(SWITCH, "1")
    assert "unvalidated" in validation.what_runs(FAMILY, validated=False)
    monkeypatch.setenv(SWITCH, "0")
    assert validation.what_runs(FAMILY, validated=True).startswith("v1")


def test_auto_refuses_the_unvalidated_opt_in(monkeypatch):
    monkeypatch.setattr(validation, "is_validated", lambda *a, **k: False)
    monkeypatch.delenv(SWITCH, raising=False)
    assert backends._auto_refusal("cuda", "dw_block") is None
    monkeypatch.setenv(SWITCH, "1")
    assert "unvalidated" in backends._auto_refusal("cuda", "dw_block")
    assert backends._auto_refusal("cuda", "pw_block") is None
    assert backends._auto_refusal("triton", "dw_block") is None
    monkeypatch.setattr(validation, "is_validated", lambda *a, **k: True)
    assert backends._auto_refusal("cuda", "dw_block") is None


def test_info_and_explain_say_what_runs():
    from convmixer_kernels.tools import info
    d = backends.explain(torch.empty(1, 1, 1, 1), "dw_block")["cuda_dw_v2"]
    assert set(d) >= {"validated", "why", "runs"}
    assert "cuda depthwise v2 kernels:" in info.report(torch.device("cpu"))


# ---- the built extension (CUDA kernels compiled in; no GPU needed) -------------------------

needs_cuda_build = pytest.mark.skipif(
    _cpp_lib.status() is not None or not hasattr(torch.ops.convmixer_kernels, "_cuda_dw_v2_source_hash"),
    reason="the extension is not built with the CUDA kernels")


@needs_cuda_build
def test_extension_reports_the_source_hash_it_was_built_from():
    built = validation.built_hash(FAMILY)
    assert built is not None
    if built != validation.source_hash(FAMILY):
        pytest.skip("the sources changed since the extension was built (rebuild to compare)")
    assert built == validation.source_hash(FAMILY)


@needs_cuda_build
def test_extension_flag_follows_the_manifest(tmp_path, monkeypatch):
    built = validation.built_hash(FAMILY)
    try:
        monkeypatch.setenv(validation.MANIFEST_ENV, _manifest(tmp_path, {"sha256": built, "tests_passed": 1}))
        assert validation.sync_extension() is True
        assert torch.ops.convmixer_kernels._cuda_dw_v2_set_validated(True) is True  # was set
        monkeypatch.setenv(validation.MANIFEST_ENV, _manifest(tmp_path, {"sha256": "0" * 64}, "w.json"))
        assert validation.sync_extension() is False
        assert torch.ops.convmixer_kernels._cuda_dw_v2_set_validated(False) is False  # was cleared
        bad = tmp_path / "bad.json"
        bad.write_text("{")
        monkeypatch.setenv(validation.MANIFEST_ENV, str(bad))
        assert validation.sync_extension() is False
    finally:
        monkeypatch.delenv(validation.MANIFEST_ENV)
        validation.sync_extension()
