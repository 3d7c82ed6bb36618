"""Registered op of the residual depthwise block ``x + BN(act(dwconv_k(x) + b))``."""
from ..spec import DW_BLOCK
from .block import define

dw_block = define(DW_BLOCK)
