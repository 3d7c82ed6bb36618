"""Runnable examples (``python -m convmixer_kernels.examples.<name>``)."""
