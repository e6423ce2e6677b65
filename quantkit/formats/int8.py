"""INT8, compressed-tensors convention (``int-quantized``).

Weights: symmetric per output row, ``scale = row_amax / 127.5`` computed and stored in the
weight's dtype, ``q = round_half_even(W / scale)`` with the division in the weight's dtype,
clamped to [-128, 127]. Activations: dynamic per token with the same rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats.base import FORMATS, Format, QTensor

INT8_MIN, INT8_MAX = -128, 127
CT_INT8_DIVISOR = 127.5  # compressed-tensors: (bit_max - bit_min) / 2 = 255 / 2, not 127


def _zero_to_eps(scale: torch.Tensor) -> torch.Tensor:
    # compressed-tensors replaces a zero scale by the dtype's eps so division stays finite
    eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def symmetric_int_scale(amax: torch.Tensor, divisor: float) -> torch.Tensor:
    """Scale for symmetric integer quantization, in amax's dtype; zeros become eps."""
    return _zero_to_eps(amax / torch.tensor(divisor, dtype=amax.dtype, device=amax.device))


def quantize_rows(x: torch.Tensor, divisor: float = CT_INT8_DIVISOR) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row int8 of x [rows, cols] -> (codes int8 [rows, cols], scale [rows, 1] in x.dtype)."""
    amax = x.abs().amax(dim=-1, keepdim=True)
    scale = symmetric_int_scale(amax, divisor)
    q = torch.round(x / scale).clamp_(INT8_MIN, INT8_MAX).to(torch.int8)
    return q, scale


@dataclass(frozen=True)
class Int8Format(Format):
    name: str = "int8"
    bits: float = 8.0

    def quantize(self, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> QTensor:
        self.check_shape(w)
        codes, scale = quantize_rows(w)
        return QTensor(self.name, codes, scale, tuple(w.shape))

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (q.codes.to(dtype) * q.scale.to(dtype)).reshape(q.shape)

    def fake_activation(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        codes, scale = quantize_rows(flat)
        return (codes.to(x.dtype) * scale).reshape(x.shape)


INT8 = Int8Format()
FORMATS.add(INT8.name, INT8)
