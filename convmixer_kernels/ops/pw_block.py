"""Registered op of the pointwise block ``BN(act(conv1x1(x) + b))``."""
from ..spec import PW_BLOCK
from .block import define

pw_block = define(PW_BLOCK)
