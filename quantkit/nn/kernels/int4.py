"""INT4 weight-only on torch's CPU kernel (_weight_int4pack_mm_for_cpu).

torch computes w = (nibble - 8) * scale + zero per group, which is quantkit's (and
compressed-tensors') symmetric INT4 with zero = 0, since quantkit stores nibble = q + 8.
The kernel wants its own nibble layout, so the codes are repacked once ([out, in/2] uint8, the
same size as the canonical codes, which export still reads).
"""

from __future__ import annotations

import torch

from quantkit.formats import e2m1


def pack_for_cpu(codes: torch.Tensor) -> torch.Tensor:
    """Canonical packed nibbles uint8 [out, in/2] -> torch's CPU int4 layout uint8 [out, in/2]."""
    nibbles = e2m1.unpack(codes).to(torch.int32)  # [out, in] in 0..15
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 1)


def scales_and_zeros(scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Per-group scales [out, in/group] -> torch's [in/group, out, 2] (scale, zero=0)."""
    s = scale.reshape(scale.shape[0], -1).t().to(dtype)  # [ngroups, out]
    return torch.stack([s, torch.zeros_like(s)], dim=-1).contiguous()


def int4_linear(x: torch.Tensor, packed: torch.Tensor, group: int, sz: torch.Tensor, module) -> torch.Tensor:
    """x [T, in] -> [T, out] in x.dtype."""
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, group, sz)
    if module.output_scale is not None:
        y = y * module.output_scale.to(y.dtype)
    if module.bias is not None:
        y = y + module.bias.to(y.dtype)
    return y
