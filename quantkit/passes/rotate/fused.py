"""The value/output rotation, fused offline: no online op, so every engine runs the checkpoint.

Attention is linear in V per head: head h's output is A_h V_g(h), A_h the attention weights and
g(h) the kv head query head h reads (GQA shares one kv head among a group of query heads). With
an orthogonal R [d, d] (d = head_dim) applied to every kv head's values, V_g R, each query head's
output becomes A_h V_g R = o_h R, and o_proj's input columns for that head rotated by R undo it:
(o_h R)(W_o,h R)^T = o_h W_o,h^T. So:

  v_proj: W_v [kv*d, in] -> R^T W_v per kv head (and its bias b_v -> b_v R)
  o_proj: W_o [out, heads*d] -> W_o R per query head

R is block-diagonal Hadamard with block b dividing d, so "R per head" over every head is the same
block-diagonal matrix over the whole kv*d (or heads*d) dimension; GQA needs nothing more. The
gain: o_proj's input blocks (the ones NVFP4/MXFP4 scale) are rotated, like an online transform,
but for free. R is symmetric, so R^T = R.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.passes.rotate.hadamard import RotationError, check_block, rotate


@torch.no_grad()
def fuse_value_output(v_proj: nn.Module, o_proj: nn.Module, head_dim: int, block: int) -> None:
    """Rotate v_proj's output rows and o_proj's input columns by the same per-head R, in place."""
    for name, m in (("v", v_proj), ("o", o_proj)):
        if type(m) is not nn.Linear:
            raise RotationError(f"fuse_vo needs plain nn.Linear value/output projections; the {name} projection "
                                f"is {type(m).__name__}")
    if head_dim % block:
        raise RotationError(f"fuse_vo: Hadamard block size {block} does not divide head_dim {head_dim}")
    check_block(block, v_proj.out_features)
    check_block(block, o_proj.in_features)
    # W_v [kv*d, in]: R^T W_v = (W_v^T R)^T, i.e. rotate W_v^T's rows (the kv*d dimension)
    v_proj.weight.copy_(rotate(v_proj.weight.t(), block).t())
    if v_proj.bias is not None:
        v_proj.bias.copy_(rotate(v_proj.bias, block))
    o_proj.weight.copy_(rotate(o_proj.weight, block))  # W_o R: input columns
