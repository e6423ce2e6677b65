"""The online input rotation of one linear: the weight rotated offline (W R), the input at run time (x R).

While the linear is still an nn.Linear a forward pre-hook (first in line, so calibration and
GPTQ's Hessian hooks see rotated inputs) rotates its input; `input_rotation` marks it, and the
QLinear that `quantize`/`gptq` build from it inherits the mark and applies the same op itself
(quantkit.nn.qlinear.rotate_input, bit-for-bit compressed-tensors' hadamard input transform).
The compressed-tensors writer turns the mark into a transform_config entry (export/ct_transform.py).
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.nn.qlinear import QLinear, rotate_input
from quantkit.passes.rotate.hadamard import RotationError, check_block, rotate


@torch.no_grad()
def attach_online_rotation(name: str, linear: nn.Module, block: int, group: str = "v") -> None:
    """group: the compressed-tensors transform scheme the rotation is written under (one block size each)."""
    if isinstance(linear, QLinear):
        raise RotationError(f"rotate: {name} is already quantized; put the rotate pass before quantize/gptq")
    if type(linear) is not nn.Linear:
        raise RotationError(f"rotate: {name} is a {type(linear).__name__}, not an nn.Linear; online rotations "
                            "are written for nn.Linear layers only (exclude it in targets)")
    if getattr(linear, "input_rotation", None):
        raise RotationError(f"rotate: {name} already has an online input rotation")
    check_block(block, linear.in_features, f"{name}'s input dim",
                "; set the rotate pass's block_size (or block_sizes for its role) to a power of two that does")
    linear.weight.copy_(rotate(linear.weight, block))  # W R, computed in float64
    linear.input_rotation = block
    linear.input_rotation_group = group
    linear.register_forward_pre_hook(lambda _m, args: (rotate_input(args[0], block), *args[1:]), prepend=True)
