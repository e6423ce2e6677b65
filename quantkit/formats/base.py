"""Format protocol and QTensor: plain data, no tensor subclass.

A Format is a named, frozen spec with pure functions. Fake quant is
``dequantize(quantize(x))`` and has no code of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from quantkit.errors import FormatError
from quantkit.registry import Registry


@dataclass
class QTensor:
    """Quantized weight as plain tensors.

    codes: int8 [out, in] for integer formats, uint8 [out, in/2] for packed 4-bit.
    scale: per-channel or per-block scales in the dtype they are stored in.
    global_scale: fp32 [1] multiplier (compressed-tensors convention), or None.
    """

    format: str
    codes: torch.Tensor
    scale: torch.Tensor
    shape: tuple[int, ...]
    global_scale: torch.Tensor | None = None
    meta: dict = field(default_factory=dict)

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"codes": self.codes, "scale": self.scale}
        if self.global_scale is not None:
            out["global_scale"] = self.global_scale
        return out

    def rows(self, rows: slice) -> QTensor:
        """The quantized rows `rows` of a weight whose codes and scales are stored per row ([out, ...])."""
        n = len(range(*rows.indices(self.shape[0])))
        return QTensor(self.format, self.codes[rows].clone(), self.scale[rows].clone(), (n, *self.shape[1:]),
                       self.global_scale, dict(self.meta))

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    def to(self, device: torch.device | str) -> QTensor:
        return QTensor(
            self.format,
            self.codes.to(device),
            self.scale.to(device),
            self.shape,
            None if self.global_scale is None else self.global_scale.to(device),
            dict(self.meta),
        )


class Format:
    """A weight/activation number format. Subclasses are frozen dataclasses."""

    name: str
    bits: float  # storage bits per weight element, scales included

    def quantize(self, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> QTensor:
        raise NotImplementedError

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        raise NotImplementedError

    def weight_global_scale(self, w: torch.Tensor) -> torch.Tensor | None:
        """Per-tensor global scale for w (fp32 [1]), or None for formats without one.

        The quantize pass takes the minimum over a fused group (q/k/v, gate/up) and passes it
        back to ``quantize(w, global_scale=...)``.
        """
        return None

    def activation_global_scale(self, amax: torch.Tensor) -> torch.Tensor | None:
        """Static activation global scale from a calibrated amax, or None if not used."""
        return None

    def fake(self, w: torch.Tensor) -> torch.Tensor:
        """Quantize-dequantize, returned in w's dtype."""
        return self.dequantize(self.quantize(w), w.dtype)

    def qdq(self, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Round-to-nearest quantize-dequantize of w in `dtype`: dequantize(quantize(w), dtype), which formats
        may compute without building the packed codes (scale searches call it many times)."""
        return self.dequantize(self.quantize(w), dtype)

    def fake_activation(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Dynamic quantize-dequantize of a linear's input [..., in], in x's dtype."""
        raise FormatError(f"format {self.name} has no activation quantizer")

    def check_shape(self, w: torch.Tensor) -> None:
        if w.dim() != 2:
            raise FormatError(f"{self.name}: expected a 2-D weight, got shape {tuple(w.shape)}")


FORMATS: Registry[Format] = Registry("format", FormatError)


def get_format(name: str) -> Format:
    return FORMATS.get(name)
