"""INT4, symmetric, weight-only; per group along the input dim or per output channel.

Follows compressed-tensors' W4A16 arithmetic: ``scale = amax / 7.5`` (its symmetric divisor is
(7 - (-8)) / 2), computed and stored in the weight's dtype, ``q = round_half_even(W / scale)``
with the division in the weight's dtype, clamped to [-8, 7]. Codes are stored offset to unsigned
(q + 8) and packed two per byte, element 2j in the low nibble: read as little-endian int32 these
bytes are exactly compressed-tensors' ``pack-quantized`` ``weight_packed``.

QTensor layout: codes uint8 [out, in/2], scale [out, in/group] (or [out, 1]) in the weight dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.formats import e2m1
from quantkit.formats.base import FORMATS, Format, QTensor
from quantkit.formats.fp4 import blocks
from quantkit.formats.int8 import symmetric_int_scale
from quantkit.formats.scales import finite_abs

INT4_MIN, INT4_MAX = -8, 7
INT4_OFFSET = 8  # stored nibble = q + 8, as compressed-tensors' pack_to_int32
CT_INT4_DIVISOR = 7.5  # compressed-tensors: (7 - (-8)) / 2, not 7
CHANNEL = 0  # group size meaning "one scale per output row"


@dataclass(frozen=True)
class Int4Format(Format):
    name: str
    group: int  # elements per scale along the input dim; CHANNEL = whole row

    @property
    def bits(self) -> float:  # 4-bit code + a 16-bit scale per group
        return 4.0 + (16.0 / self.group if self.group else 0.0)

    def _groups(self, w: torch.Tensor) -> torch.Tensor:
        g = self.group or w.shape[-1]
        if self.group == CHANNEL:
            blocks(w, 2, self.name)  # packing still needs an even row
        return blocks(w, g, self.name)  # [out, in/g, g]

    def scales(self, wg: torch.Tensor) -> torch.Tensor:
        """Round-to-nearest scales [out, ngroups] in the weight dtype."""
        return symmetric_int_scale(finite_abs(wg).amax(dim=-1), CT_INT4_DIVISOR)

    def quantize(self, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> QTensor:
        return self.encode(w, self.scales(self._groups(w)))

    def encode(self, w: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> QTensor:
        wg = self._groups(w)
        w_clean = torch.nan_to_num(wg, nan=0.0)  # NaN -> 0; +-Inf saturate in the clamp below
        q = torch.round(w_clean / scale[..., None].to(w.dtype)).clamp_(INT4_MIN, INT4_MAX)
        codes = (q.to(torch.int16) + INT4_OFFSET).to(torch.uint8).reshape(w.shape)
        return QTensor(self.name, e2m1.pack(codes), scale, tuple(w.shape), None, {"group": self.group})

    def qdq_blocks(self, wg: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """fp32 quantize-dequantize of groups wg [out, ngroups, g] with given scales."""
        s = scale[..., None].to(wg.dtype)
        q = torch.round(torch.nan_to_num(wg, nan=0.0) / s).clamp_(INT4_MIN, INT4_MAX)
        return q.float() * s.float()

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = q.shape
        g = self.group or cols
        codes = e2m1.unpack(q.codes).to(torch.int16) - INT4_OFFSET  # [rows, cols]
        vals = codes.reshape(rows, cols // g, g).to(torch.float32) * q.scale.float()[..., None]
        return vals.reshape(rows, cols).to(dtype)


INT4_GROUPS = {"int4": 32, "int4_g64": 64, "int4_g128": 128, "int4_ch": CHANNEL}
for _name, _group in INT4_GROUPS.items():
    FORMATS.add(_name, Int4Format(_name, _group))
