"""scripts/gpu_check.sh's dry run on the CPU: every stage's plumbing with tiny shapes, the
files it leaves under $OUT, and the limits of what a device call brings back (at most 8
files, 16 MiB each, no more than 2 folders down, plain names).

The carry folder is a scratch one: a hand-made wheel (the wheel install), a BUILD_INFO for
another Python (the "would build" path) and a changed-tests list (the 'changed' piece)."""
from __future__ import annotations

import base64
import csv
import hashlib
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")


def _wheel(dest: Path) -> Path:
    """A minimal pure-Python wheel of a module ``gpu_check_probe``."""
    name, version = "gpu_check_probe", "0.1"
    files = {f"{name}.py": b"VALUE = 42\n",
             f"{name}-{version}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
             f"{name}-{version}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = []
    for path, data in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
        record.append(f"{path},sha256={digest},{len(data)}")
    record.append(f"{name}-{version}.dist-info/RECORD,,")
    files[f"{name}-{version}.dist-info/RECORD"] = ("\n".join(record) + "\n").encode()
    path = dest / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as z:
        for p, data in files.items():
            z.writestr(p, data)
    return path


def test_dry_run_writes_the_expected_files_within_the_limits(tmp_path):
    carry, out = tmp_path / "carry", tmp_path / "out"
    (carry / "wheels").mkdir(parents=True)
    (carry / "so").mkdir()
    _wheel(carry / "wheels")
    (carry / "BUILD_INFO").write_text("python_tag=.cpython-399-x86_64-linux-gnu.so\ntorch=0\nsource_hash=none\n")
    (carry / "changed-tests.txt").write_text("tests/test_schema.py\n")
    env = dict(os.environ, DRY_RUN="1", OUT=str(out), GPU_CARRY=str(carry), PYTHON=sys.executable,
               TMPDIR=str(tmp_path), CACHES_OUT="1",
               TEST_FILES="tests/test_schema.py", TEST_PIECES="1",
               MODELS="convmixer_768_32",
               DRY_OPS_ARGS="--ops pw_block --modes inference --batch 1 --dim 8 --size 8 "
                            "--min-run-time 0.001 --no-memory --baselines eager_nchw",
               DRY_MODELS_ARGS="--modes inference --batch 1 --dim 8 --image-size 32 --patch-size 4 "
                               "--min-run-time 0.001 --no-memory",
               PAPER_TIMEOUT="6")
    for key in ("STAGES", "GPU_CHECK_BUDGET", "TEST_ARGS", "BENCH_ARGS", "PYTHONPATH"):
        env.pop(key, None)
    proc = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=240)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]

    files = [p for p in out.rglob("*") if p.is_file()]
    names = {p.name for p in files}
    assert len(files) <= 8, names
    for p in files:
        rel = p.relative_to(out)
        assert len(rel.parts) - 1 <= 2, rel
        assert p.stat().st_size <= 16 * 1024 * 1024, rel
        assert re.fullmatch(r"[A-Za-z0-9._-]+", p.name), rel
    for expected in ("gpu-check.log", "stages.csv", "pytest.log", "ops.csv", "models.csv", "paper.csv",
                     "caches.tgz"):
        assert expected in names, (expected, names, log[-3000:])
    assert any(n.startswith("tuning-cpu") and n.endswith(".json") for n in names), names

    with open(out / "stages.csv") as f:
        steps = list(csv.DictReader(f))
    status = {(s["stage"], s["piece"]): s["status"] for s in steps}
    assert "failed" not in status.values(), steps
    for stage in ("setup", "info", "test", "tune", "bench", "models", "paper"):
        assert any(s["stage"] == stage for s in steps), (stage, steps)
    assert status[("test", "changed")] == "ok"           # the changed-tests list was read
    assert status[("paper", "all")] in ("ok", "timeout")  # cut by its limit, rows kept
    assert status[("models", "compile")] == "skipped"

    text = (out / "gpu-check.log").read_text()
    assert "wheels installed: gpu_check_probe-0.1-py3-none-any.whl" in text
    assert "would build the extension" in text            # BUILD_INFO for another Python
    with open(out / "models.csv") as f:
        assert any(r["op"] == "convmixer_768_32" for r in csv.DictReader(f))
