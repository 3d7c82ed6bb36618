"""Registered op of the patch embedding ``BN(act(conv_p_stride_p(img) + b))``."""
from ..spec import PATCH_EMBED
from .block import define

patch_embed = define(PATCH_EMBED)
