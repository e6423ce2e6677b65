"""Block-diagonal Hadamard rotations for a linear's input dimension.

A linear computes y = x W^T. With an orthogonal R [in, in], y = (x R)(W R)^T, so the weight can be
rotated offline (W R, then quantized) and the input online (x R); the product is unchanged in
exact arithmetic, while the rotated weight's blocks have their outliers spread out.

R here is block-diagonal: a normalized Sylvester Hadamard matrix H_b / sqrt(b) repeated along the
diagonal, b a power of two that divides in_features (16, 32, 64 for SmolLM2's 576). This is the
matrix compressed-tensors' ``hadamard`` transform builds (deterministic_hadamard_matrix, divided by
sqrt(head_dim)) when its scheme has ``head_dim = b``; H_b is symmetric, so R^-1 = R^T = R.
Shapes: x [..., in] is viewed as [..., in/b, b] and each b-chunk is multiplied by H_b / sqrt(b).
"""

from __future__ import annotations

import math

import torch

from quantkit.errors import QuantkitError
from quantkit.nn.qlinear import sylvester


class RotationError(QuantkitError):
    """A rotation that cannot be built for this size."""


def check_block(block: int, in_features: int, where: str = "the input dim", hint: str = "") -> None:
    """block is a power of two dividing in_features; where/hint name the dim and the fix in the message."""
    if block < 1 or block & (block - 1):
        raise RotationError(f"Hadamard block size must be a power of two, got {block}")
    if in_features % block:
        raise RotationError(f"Hadamard block size {block} does not divide {where} {in_features}{hint}")


def hadamard(block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Normalized Sylvester Hadamard matrix [block, block]: orthogonal and symmetric."""
    check_block(block, block)
    h = sylvester(block, torch.device("cpu")).to(torch.float64)  # +-1 entries: exact in any dtype
    return (h / math.sqrt(block)).to(dtype)


def block_hadamard(in_features: int, block: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """The dense block-diagonal R [in, in] (for tests and small matrices)."""
    check_block(block, in_features)
    return torch.block_diag(*[hadamard(block, dtype)] * (in_features // block))


def rotate(x: torch.Tensor, block: int, inverse: bool = False) -> torch.Tensor:
    """x [..., in] -> x R (or x R^T), computed in float64 and returned in x's dtype.

    Used for both the online input (x R) and the offline weight (W R: the rows of W are inputs).
    """
    n = x.shape[-1]
    check_block(block, n)
    h = hadamard(block, torch.float64).to(x.device)
    if inverse:
        h = h.T
    chunks = x.to(torch.float64).unflatten(-1, (n // block, block))  # [..., in/b, b]
    return (chunks @ h).flatten(-2).to(x.dtype)
