"""Triton kernels of the ``triton`` backend (imported on first use, never by
``import convmixer_kernels``). One module per block; each exposes ``forward`` and
``backward`` with the contract of ``convmixer_kernels.reference``."""
