"""The online input rotation of one linear: the weight rotated offline (W R), the input at run time (x R).

While the linear is still an nn.Linear a forward pre-hook (first in line, so calibration and
GPTQ's Hessian hooks see rotated inputs) rotates its input; `input_rotation` marks it, and the
QLinear that `quantize`/`gptq` build from it inherits the mark and applies the same op itself
(quantkit.nn.qlinear.rotate_input, bit-for-bit compressed-tensors' hadamard input transform).
The compressed-tensors writer turns the mark into a transform_config entry (export/ct_transform.py).

With `keep_original` (rotate's `select: true`) the unrotated weight stays on the linear as
`unrotated_weight` until `gptq` decides, per group, whether the rotation stays
(gptq/rotation_choice.py); `undo_online_rotation` takes it back.
"""

from __future__ import annotations

import torch
from torch import nn

from quantkit.nn.qlinear import QLinear, rotate_input
from quantkit.passes.rotate.hadamard import RotationError, check_block, rotate


@torch.no_grad()
def attach_online_rotation(name: str, linear: nn.Module, block: int, keep_original: bool = False) -> None:
    if isinstance(linear, QLinear):
        raise RotationError(f"rotate: {name} is already quantized; put the rotate pass before quantize/gptq")
    if type(linear) is not nn.Linear:
        raise RotationError(f"rotate: {name} is a {type(linear).__name__}, not an nn.Linear; online rotations "
                            "are written for nn.Linear layers only (exclude it in targets)")
    if getattr(linear, "input_rotation", None):
        raise RotationError(f"rotate: {name} already has an online input rotation")
    check_block(block, linear.in_features)
    if keep_original:
        linear.unrotated_weight = linear.weight.detach().clone()
    linear.weight.copy_(rotate(linear.weight, block))  # W R, computed in float64
    linear.input_rotation = block
    linear.input_rotation_hook = linear.register_forward_pre_hook(
        lambda _m, args: (rotate_input(args[0], block), *args[1:]), prepend=True)


@torch.no_grad()
def undo_online_rotation(linear: nn.Module) -> None:
    """Back to the weight and input the linear had before attach_online_rotation(keep_original=True)."""
    original = getattr(linear, "unrotated_weight", None)
    if original is None:
        raise RotationError("undo_online_rotation: the unrotated weight was not kept (rotate select: true keeps it)")
    linear.weight.copy_(original)
    linear.input_rotation_hook.remove()
    linear.input_rotation = None
    del linear.unrotated_weight, linear.input_rotation_hook


def forget_original(linear: nn.Module) -> None:
    """The rotation stays: drop the kept unrotated weight."""
    if hasattr(linear, "unrotated_weight"):
        del linear.unrotated_weight
