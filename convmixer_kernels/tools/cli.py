"""CLI: ``python -m convmixer_kernels {bench,tune,profile,info} [options]``
(console script ``convmixer-bench`` = ``bench``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import bench, info, profile, tune


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m convmixer_kernels",
                                     description="Fused kernels for ConvMixer: benchmark, tune, profile, info.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    first = lambda doc: doc.split("\n\n")[0]
    bench.add_arguments(commands.add_parser(
        "bench", help="benchmark the fused ops and models against eager PyTorch and torch.compile",
        description=first(bench.__doc__)))
    tune.add_arguments(commands.add_parser(
        "tune", help="measure the fastest backend per op, mode, dtype, layout and shape; write "
        "the tuning table auto reads", description=first(tune.__doc__)))
    profile.add_arguments(commands.add_parser(
        "profile", help="run an op or model under torch.profiler: per-op table, Chrome trace",
        description=first(profile.__doc__)))
    info.add_arguments(commands.add_parser(
        "info", help="versions, device, and which backends can run each op", description=first(info.__doc__)))
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand."""
    args = build_parser().parse_args(argv)
    {"bench": bench.run_args, "tune": tune.run_args, "profile": profile.run_args,
     "info": info.run_args}[args.command](args)
    return 0


def bench_entry() -> int:
    """Entry point of ``convmixer-bench``: the same as ``python -m convmixer_kernels bench``."""
    bench.run_args(bench.build_parser("convmixer-bench").parse_args(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
