"""``python -m convmixer_kernels.tools.validate {status,hash,record}``: the GPU validation
manifest's command line (convmixer_kernels/backends/validation.py has the logic and the
documentation). scripts/gpu_check.sh runs ``record`` after the GPU tests."""
import sys

from ..backends.validation import main
from .report import git_commit

if __name__ == "__main__":
    sys.exit(main(commit_fn=git_commit))
