"""Which GPU kernel families have passed the GPU test grid on their current source.

DESIGN rule: ``auto`` runs a GPU kernel only if its source has passed the GPU tests in a
recorded GPU run. A *family* (today ``dw_block_v2``: the register-blocked CUDA depthwise
kernels) is identified by the sha256 of its source files, listed once, here, in
``KERNEL_SOURCES``. A GPU run that passes the family's tests (``KERNEL_TESTS``) writes an
entry into the manifest ``convmixer_kernels/validated/cuda.json`` (shipped as package data):
family -> {sha256, device, commit, tests_passed, date, ...}; committing that file validates
exactly that source.

Where the hash comes from (the robust choice): setup.py computes ``source_hash`` at build
time and compiles it into the extension (``-DCONVMIXER_DW_V2_SOURCE_HASH``, read back with
the op ``convmixer_kernels::_cuda_dw_v2_source_hash``). So the hash describes the binary that
runs, not the files next to it: a wheel without the .cu files, or an editable install whose
sources changed after the build, still reports what was compiled. A build without the define
(``"unknown"``) is never validated.

The gate (``csrc/cuda/dw_block_v2.cu``, ``dw_block_v2_enabled``), read at each call:
- ``CONVMIXER_KERNELS_CUDA_DW_V2=0``: v1 everywhere;
- ``CONVMIXER_KERNELS_CUDA_DW_V2=1``: v2 where it covers the call, validated or not (the
  explicit opt-in; use it with ``backend="cuda"``);
- otherwise: v2 only when this module found the build's hash validated in the manifest and
  told the extension so (``sync_extension``, run when the extension loads); else v1.
A corrupt or unreadable manifest counts as "nothing validated" (a warning in the log).

``python -m convmixer_kernels.tools.validate record --junit J --out F`` (run by
scripts/gpu_check.sh after the GPU tests) writes the updated manifest when every test of the
family's test files ran and passed; ``... status`` prints the state here.

Only the standard library is imported at module level: setup.py loads this file by path.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import logging
import os
import sys
from typing import Optional

log = logging.getLogger("convmixer_kernels")

# family -> the files (relative to the repository root) whose bytes make its hash. Every
# csrc/cuda/dw_block* file belongs here (tests/test_validation.py checks it): the v2 kernels,
# the shared device helpers, the host launcher that decides what runs, and the v2 backward
# files (hashed as absent until they exist).
KERNEL_SOURCES: dict[str, tuple[str, ...]] = {
    "dw_block_v2": (
        "csrc/cuda/dw_block.cu",
        "csrc/cuda/dw_block_common.cuh",
        "csrc/cuda/dw_block_kernels.cuh",
        "csrc/cuda/dw_block_v2.h",
        "csrc/cuda/dw_block_v2.cu",
        "csrc/cuda/dw_block_v2.cuh",
        "csrc/cuda/dw_block_v2_units.cuh",
        "csrc/cuda/dw_block_v2_backward.h",
        "csrc/cuda/dw_block_v2_backward.cu",
        "csrc/cuda/dw_block_v2_backward.cuh",
        "csrc/cuda/dw_block_v2_cl.h",
        "csrc/cuda/dw_block_v2_cl.cu",
        "csrc/cuda/dw_block_v2_cl.cuh",
        "csrc/cuda/dw_block_v2_cl_train.cuh",
        "csrc/cuda/dw_block_v2_cl_backward.h",
        "csrc/cuda/dw_block_v2_cl_backward.cu",
        "csrc/cuda/dw_block_v2_cl_backward.cuh",
        "csrc/cuda/dw_block_v2_generic.h",
        "csrc/cuda/dw_block_v2_generic.cu",
        "csrc/cuda/dw_block_v2_generic.cuh",
        "csrc/cuda/dw_block_v2_generic_backward.cuh",
        "csrc/common/checks.h",
    ),
}

# family -> the GPU test files whose complete passing run validates it
KERNEL_TESTS: dict[str, tuple[str, ...]] = {
    "dw_block_v2": ("tests/test_cuda_dw_block_v2.py",),
}

# family -> the environment switch the C++ gate reads (0: off, 1: explicit opt-in)
SWITCHES: dict[str, str] = {"dw_block_v2": "CONVMIXER_KERNELS_CUDA_DW_V2"}

PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MANIFEST = os.path.join(PACKAGE_DIR, "validated", "cuda.json")
MANIFEST_ENV = "CONVMIXER_KERNELS_VALIDATION_MANIFEST"  # another manifest file (tests, a user's own)


def repo_root() -> Optional[str]:
    """The source tree next to the package (None for an installed wheel without csrc/)."""
    root = os.path.dirname(PACKAGE_DIR)
    return root if os.path.isdir(os.path.join(root, "csrc")) else None


def source_hash(family: str = "dw_block_v2", root: Optional[str] = None) -> str:
    """sha256 (hex) of the family's source files under ``root`` (default: the repository):
    per listed path, in list order, the path and the sha256 of its bytes ('absent' if missing)."""
    if family not in KERNEL_SOURCES:
        raise ValueError(f"family: expected one of {tuple(KERNEL_SOURCES)}, got {family!r}")
    root = root or repo_root()
    if root is None:
        raise FileNotFoundError("no source tree (csrc/) next to the package: use built_hash()")
    h = hashlib.sha256()
    for rel in KERNEL_SOURCES[family]:
        path = os.path.join(root, *rel.split("/"))
        try:
            with open(path, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
        except FileNotFoundError:
            digest = "absent"
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()


def built_hash(family: str = "dw_block_v2") -> Optional[str]:
    """The hash compiled into the loaded extension (None: no extension with CUDA kernels, or
    built without the hash)."""
    if family != "dw_block_v2":
        return None
    try:
        from .. import _cpp_lib
        if _cpp_lib.status() is not None:
            return None
    except Exception as exc:  # noqa: BLE001 - a query, never a crash
        log.debug("convmixer_kernels: no built hash for %s (%s)", family, exc)
        return None
    return _op_hash()


def _op_hash() -> Optional[str]:
    """The hash the already loaded extension reports (no loading here: _cpp_lib calls
    sync_extension while it loads)."""
    try:
        import torch
        op = getattr(torch.ops.convmixer_kernels, "_cuda_dw_v2_source_hash", None)
        value = op() if op is not None else None
    except Exception as exc:  # noqa: BLE001
        log.debug("convmixer_kernels: no built dw_block_v2 hash (%s)", exc)
        return None
    return value if value and value != "unknown" else None


def load_manifest(path: Optional[str] = None) -> tuple[dict, Optional[str]]:
    """(families dict, problem) of a manifest file; problem is None when it was read cleanly.
    A missing, unreadable or malformed manifest gives ({}, reason) and a warning in the log."""
    path = path or os.environ.get(MANIFEST_ENV) or MANIFEST
    try:
        with open(path) as f:
            data = json.load(f)
        fams = data["families"]
        if not isinstance(fams, dict) or not all(isinstance(v, dict) for v in fams.values()):
            raise ValueError("'families' must map a family name to an object")
        return fams, None
    except FileNotFoundError:
        return {}, f"no manifest at {path}"
    except (OSError, ValueError, KeyError, TypeError) as exc:
        problem = f"the validation manifest {path} is unreadable ({type(exc).__name__}: {exc})"
        log.warning("convmixer_kernels: %s: every GPU kernel family counts as unvalidated", problem)
        return {}, problem


def status(family: str = "dw_block_v2", current: Optional[str] = None,
           manifest: Optional[str] = None) -> tuple[bool, str]:
    """(validated, why) for the family: validated when the manifest's entry holds the
    ``current`` hash (default: the built extension's)."""
    current = current if current is not None else built_hash(family)
    fams, problem = load_manifest(manifest)
    entry = fams.get(family)
    if not current:
        return False, ("not validated: the loaded extension has no CUDA source hash for "
                       f"{family} (no CUDA build, or built without setup.py's hash)")
    if entry is None:
        return False, (f"not validated: {problem}" if problem else
                       f"not validated: no recorded GPU run for {family} in the manifest")
    if entry.get("sha256") != current:
        return False, (f"not validated: the manifest's run was for source {str(entry.get('sha256'))[:12]}, "
                       f"this build is {current[:12]}")
    return True, (f"validated: source {current[:12]} passed {entry.get('tests_passed')} GPU tests on "
                  f"{entry.get('device')} (commit {str(entry.get('commit'))[:12]}, {entry.get('date')})")


def is_validated(family: str = "dw_block_v2", current: Optional[str] = None,
                 manifest: Optional[str] = None) -> bool:
    return status(family, current, manifest)[0]


def what_runs(family: str = "dw_block_v2", validated: Optional[bool] = None) -> str:
    """What the cuda backend runs for the calls the family covers, as the C++ gate decides."""
    switch = SWITCHES[family]
    if validated is None:
        validated = is_validated(family)
    v = os.environ.get(switch)
    if v == "0":
        return f"v1 ({switch}=0)"
    if v == "1":
        return f"v2 where it covers the call ({switch}=1: explicit opt-in{'' if validated else ', unvalidated'})"
    if validated:
        return "v2 where it covers the call (validated)"
    return f"v1 (v2 unvalidated; opt in with backend='cuda' and {switch}=1)"


def describe(family: str = "dw_block_v2") -> dict:
    ok, why = status(family)
    return {"family": family, "validated": ok, "why": why, "runs": what_runs(family, ok)}


def sync_extension() -> Optional[bool]:
    """Tell the loaded extension whether its dw_block_v2 source is validated (the C++ gate's
    default). Returns the value set, None when there is no such extension. Never raises."""
    try:
        import torch
        op = getattr(torch.ops.convmixer_kernels, "_cuda_dw_v2_set_validated", None)
        if op is None:
            return None
        ok, why = status("dw_block_v2", current=_op_hash() or "")
        op(ok)
        log.debug("convmixer_kernels: dw_block_v2 %s", why)
        return ok
    except Exception as exc:  # noqa: BLE001 - the gate stays at its default (v1)
        log.warning("convmixer_kernels: could not set the dw_block_v2 gate (%s): v1 stays the default", exc)
        return None


# ---- recording a GPU run -------------------------------------------------------------------

def junit_counts(junit_path: str, test_files: tuple[str, ...]) -> dict:
    """{'passed', 'failed', 'skipped'} over the test cases of ``test_files`` in a pytest
    JUnit XML report (xdist's merged report included)."""
    import xml.etree.ElementTree as ET

    mods = {os.path.splitext(os.path.basename(f))[0] for f in test_files}
    counts = {"passed": 0, "failed": 0, "skipped": 0}
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        parts = set((case.get("classname") or "").split("."))
        fname = case.get("file") or ""
        if not (parts & mods or os.path.splitext(os.path.basename(fname))[0] in mods):
            continue
        tags = {child.tag for child in case}
        if tags & {"failure", "error"}:
            counts["failed"] += 1
        elif "skipped" in tags:
            counts["skipped"] += 1
        else:
            counts["passed"] += 1
    return counts


def record(junit_path: str, out_path: str, family: str = "dw_block_v2", device: Optional[str] = None,
           commit: Optional[str] = None, current: Optional[str] = None,
           base_manifest: Optional[str] = None) -> tuple[int, str]:
    """Write the manifest with this run's entry to ``out_path`` when every test case of the
    family's test files passed (none failed, none skipped, at least one ran). Returns
    (exit code, message): 0 written, 5 nothing ran (nothing written), 1 refused."""
    tests = KERNEL_TESTS[family]
    try:
        counts = junit_counts(junit_path, tests)
    except Exception as exc:  # noqa: BLE001 - a missing/broken report records nothing
        return 5, f"no readable test report {junit_path} ({exc}): nothing recorded"
    if counts["passed"] + counts["failed"] + counts["skipped"] == 0:
        return 5, f"no test of {', '.join(tests)} ran: nothing recorded"
    if counts["failed"] or counts["skipped"]:
        return 1, (f"{family} NOT validated: {counts['failed']} failed, {counts['skipped']} skipped, "
                   f"{counts['passed']} passed in {', '.join(tests)}")
    if current is None:
        current = built_hash(family)
        if current is None:
            return 1, f"{family} NOT recorded: the loaded extension has no source hash"
        root = repo_root()
        if root is not None and source_hash(family, root) != current:
            return 1, (f"{family} NOT recorded: the extension was built from source {current[:12]}, "
                       f"the tree here is {source_hash(family, root)[:12]} (rebuild, rerun)")
    if device is None:
        try:
            import torch
            device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "unknown"
        except Exception:  # noqa: BLE001
            device = "unknown"
    commit = commit or "unknown"
    fams, _ = load_manifest(base_manifest or MANIFEST)
    try:
        import torch
        torch_version = torch.__version__
    except Exception:  # noqa: BLE001
        torch_version = "unknown"
    fams = dict(fams)
    fams[family] = {"sha256": current, "device": device, "commit": commit,
                    "tests_passed": counts["passed"], "test_files": list(tests),
                    "torch": torch_version,
                    "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    data = {"about": "GPU kernel families whose source passed the GPU test grid "
                     "(convmixer_kernels/backends/validation.py; written by scripts/gpu_check.sh)",
            "families": dict(sorted(fams.items()))}
    os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
    with open(out_path, "w") as f:
        json.dump(data, f, indent=2)
        f.write("\n")
    return 0, (f"{family} validated: {counts['passed']} tests passed on {device}, source {current[:12]}; "
               f"manifest written to {out_path} (commit it as convmixer_kernels/validated/cuda.json)")


def main(argv: Optional[list] = None, commit_fn=None) -> int:
    """The command line; ``commit_fn()``: the git commit when --commit is not given
    (convmixer_kernels.tools.validate passes tools.report.git_commit)."""
    p = argparse.ArgumentParser(prog="python -m convmixer_kernels.tools.validate",
                                description="GPU kernel validation manifest: status, hash, record")
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("status", help="what is validated and what runs")
    s.add_argument("--family", default="dw_block_v2")
    h = sub.add_parser("hash", help="the source hash of a family from the files here")
    h.add_argument("--family", default="dw_block_v2")
    h.add_argument("--root", default=None)
    r = sub.add_parser("record", help="write the manifest after a passing GPU test run")
    r.add_argument("--junit", required=True)
    r.add_argument("--out", required=True)
    r.add_argument("--family", default="dw_block_v2")
    r.add_argument("--device", default=None)
    r.add_argument("--commit", default=None)
    args = p.parse_args(argv)
    if args.cmd == "hash":
        print(source_hash(args.family, args.root))
        return 0
    if args.cmd == "status":
        d = describe(args.family)
        print(f"{d['family']}: {d['why']}; cuda backend runs: {d['runs']}")
        return 0
    commit = args.commit or (commit_fn() if commit_fn is not None else None)
    code, msg = record(args.junit, args.out, args.family, args.device, commit)
    print(msg)
    return code


if __name__ == "__main__":
    sys.exit(main())
