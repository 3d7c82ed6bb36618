"""The ``reference`` backend: the pure-PyTorch spec (``convmixer_kernels.reference``),
float32 accumulation whatever the storage dtype. Runs anywhere; the test oracle."""
from __future__ import annotations

from .. import reference
from .base import Backend, BlockForward, BlockGrads


class ReferenceBackend(Backend):
    name = "reference"
    device_types = ("cpu", "cuda", "meta")
    priority = 1000  # last resort in auto's order

    def unavailable(self, op, x):
        return None

    def block_forward(self, spec, *args):
        return BlockForward(*reference.forward(spec, *args))

    def block_backward(self, spec, *args):
        return BlockGrads(*reference.backward(spec, *args))
