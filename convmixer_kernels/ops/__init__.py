"""The registered ``torch.library`` ops: schema (``schema``), fake and autograd only.
One file per block (each ``define``s its pair of ops from ``block``) and the eval-only
fused layer (``layer``); the implementations are the backends'."""
from .dw_block import dw_block
from .layer import layer_eval_op
from .patch_embed import patch_embed
from .pw_block import pw_block

BLOCK_OPS = {op.spec.name: op for op in (dw_block, pw_block, patch_embed)}

__all__ = ["BLOCK_OPS", "dw_block", "pw_block", "patch_embed", "layer_eval_op"]
