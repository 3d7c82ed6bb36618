"""CLI: ``python -m convmixer_kernels bench [options]`` (console script ``convmixer-bench``)."""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from . import bench


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse ``argv`` (default ``sys.argv[1:]``) and run the chosen subcommand."""
    parser = argparse.ArgumentParser(prog="python -m convmixer_kernels",
                                     description="Fused kernels for ConvMixer.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    bench.add_arguments(commands.add_parser("bench", help="benchmark the fused blocks against eager "
                                            "PyTorch", description=bench.__doc__.split("\n\n")[0]))
    args = parser.parse_args(argv)
    bench.run_args(args)
    return 0


def bench_entry() -> int:
    """Entry point of ``convmixer-bench``: the same as ``python -m convmixer_kernels bench``."""
    bench.run_args(bench.build_parser("convmixer-bench").parse_args(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
