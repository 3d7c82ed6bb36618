"""The registered ``torch.library`` ops, one file per block (see ``_block`` for the schema)."""
from .dw_block import dw_block
from .patch_embed import patch_embed
from .pw_block import pw_block

BLOCK_OPS = {op.spec.name: op for op in (dw_block, pw_block, patch_embed)}

__all__ = ["BLOCK_OPS", "dw_block", "pw_block", "patch_embed"]
