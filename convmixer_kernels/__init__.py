"""Fused kernels for ConvMixer ("Patches Are All You Need?").

Importing the package loads neither Triton nor the compiled extension; backends
load them on first use. See README.md for the API.
"""
from . import backends, reference
from .backends import BACKEND_NAMES, BackendUnavailable, available_backends
from .convert import (ConvertReport, FusedSequential, convert, convert_sync_batchnorm, set_backend,
                      set_memory_saving, unconvert)
from .functional import dw_block, patch_embed, pw_block
from .modules import (ConvMixer, ConvMixerLayer, DepthwiseBlock, PatchEmbed, PointwiseBlock,
                      convmixer_768_32, convmixer_1024_20_ks9_p14, convmixer_1536_20)

__version__ = "0.1.0"

__all__ = [
    "dw_block", "pw_block", "patch_embed",
    "DepthwiseBlock", "PointwiseBlock", "PatchEmbed", "ConvMixerLayer", "ConvMixer",
    "convmixer_1536_20", "convmixer_768_32", "convmixer_1024_20_ks9_p14",
    "convert", "unconvert", "ConvertReport", "set_backend", "set_memory_saving",
    "convert_sync_batchnorm", "FusedSequential",
    "backends", "reference", "BACKEND_NAMES", "BackendUnavailable", "available_backends",
]
