"""``python -m convmixer_kernels info``: versions, device, and which backend can run
each op in each dtype (and, where one cannot, why)."""
from __future__ import annotations

import argparse
import os
import platform

import torch

from .. import _cpp_lib, backends
from ..backends import tuning
from . import report as _report
from .cases import OP_USES
from .bench import DTYPES, _device

__all__ = ["add_arguments", "run_args", "report"]

BLOCK_OPS = tuple(dict.fromkeys(op for ops in OP_USES.values() for op in ops))


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("--device", type=_device, default=None, help="default: cuda if available, else cpu")
    return parser


def report(device: torch.device) -> str:
    """The text ``info`` prints."""
    from .. import __version__
    env = _report.environment(device)
    ext = _cpp_lib.status()
    lines = [
        f"convmixer_kernels {__version__} (commit {env['git_commit'] or '-'})",
        f"python {platform.python_version()} | torch {env['torch']} | CUDA {env['cuda'] or '-'} | "
        f"cuDNN {env['cudnn'] or '-'} | triton {env['triton'] or 'not installed'}",
        f"device: {device} = {env['device']} | {'SMs' if device.type == 'cuda' else 'cores'} "
        f"{env['sm_count']} | threads {env['threads']}",
        f"CUDA available: {torch.cuda.is_available()} | TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}"
        f" | {backends.ENV_VAR}={os.environ.get(backends.ENV_VAR, '')!r}",
        "compiled extension: " + ("loaded " + str(_cpp_lib.build_info_of()) if ext is None else ext),
    ]
    v2 = backends.validation.describe("dw_block_v2")
    lines.append(f"cuda depthwise v2 kernels: {v2['why']}; the cuda backend runs {v2['runs']}")
    table, where = tuning.load(tuning.family(device))
    if table is None:
        lines.append(f"tuning table: none used ({where}); auto runs the first usable backend in "
                     "priority order (native: the stock path)")
    else:
        chosen = {}
        for e in table["entries"]:
            chosen[e["best"]] = chosen.get(e["best"], 0) + 1
        lines.append(f"tuning table: {where} ({len(table['entries'])} entries, measured on "
                     f"{table['device']} with torch {table['torch']}; chosen: {chosen})")
    lines += ["", f"backends on {device.type} (auto: for a 1x1x1x1 input; "
              "`ck.backends.explain(x, op)` for yours):"]
    for op in BLOCK_OPS:
        for dtype_name, dtype in DTYPES.items():
            x = torch.empty(1, 1, 1, 1, device=device, dtype=dtype)
            auto = backends.resolve("auto", op, x)
            lines.append(f"  {op} {dtype_name} (auto -> {auto}):")
            for name in backends.names():
                reason = backends.get(name).unavailable(op, x)
                lines.append(f"    {name:<10} {'available' if reason is None else 'unavailable: ' + reason}")
    return "\n".join(lines)


def run_args(a: argparse.Namespace) -> str:
    text = report(a.device or torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    print(text)
    return text
