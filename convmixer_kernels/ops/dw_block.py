"""Registered op of the residual depthwise block ``x + BN(act(dwconv_k(x) + b))``."""
from .._spec import DW_BLOCK
from ._block import define

dw_block = define(DW_BLOCK)
