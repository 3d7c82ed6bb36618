"""``python -m convmixer_kernels {bench,tune,profile,info}``: see ``convmixer_kernels.tools.cli``."""
import sys

from .tools.cli import main

if __name__ == "__main__":
    sys.exit(main())
