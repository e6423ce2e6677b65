"""FP8 E4M3, compressed-tensors convention (``float-quantized``), bit for bit.

Two weight layouts, as llm-compressor's presets:
  fp8        FP8_DYNAMIC: one scale per output row, [out, 1]
  fp8_block  FP8_BLOCK: one scale per 128x128 weight tile, [ceil(out/128), ceil(in/128)]; a partial
             tile at the edge is scaled by its own amax (compressed-tensors pads with zeros, which
             never change an amax)

Scale ``amax / 448`` computed and stored in the weight's dtype (a zero becomes that dtype's eps,
compressed-tensors' ``_get_dtype_eps``); codes ``fp8(clamp(w / scale, -448, 448))`` with the
division in the weight's dtype, so a bf16 weight rounds twice (to bf16, then to E4M3), as
compressed-tensors does. Dequantize: ``codes.to(scale dtype) * scale``.

Activations are dynamic: per token (fp8) or per 128-element group of each token (fp8_block),
with the same rule in the activation's dtype.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import FormatError
from quantkit.formats.base import FORMATS, Format, QTensor

FP8_MAX = 448.0  # largest float8_e4m3fn magnitude
FP8_DTYPE = torch.float8_e4m3fn
FP8_BLOCK = 128  # FP8_BLOCK's weight tile and activation group


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def calc_dtype(dtype: torch.dtype) -> torch.dtype:
    """compressed-tensors computes in the tensor's own float dtype; anything else in fp32."""
    return dtype if dtype in (torch.bfloat16, torch.float16, torch.float32) else torch.float32


def fp8_scale(amax: torch.Tensor) -> torch.Tensor:
    """``amax / 448`` in amax's dtype, zeros replaced by that dtype's eps (compressed-tensors)."""
    scale = amax / torch.tensor(FP8_MAX, dtype=amax.dtype, device=amax.device)
    eps = torch.finfo(scale.dtype).eps
    return torch.where(scale == 0, torch.full_like(scale, eps), scale)


def fp8_codes(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x / scale in x's dtype, clamped to +-448, cast to E4M3 (round to nearest even)."""
    return torch.clamp(x / scale, -FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def _tiles(rows: int, cols: int, block: int) -> tuple[int, int]:
    return -(-rows // block), -(-cols // block)


def _expand(scale: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """Tile scales [R, C] -> one per element [rows, cols] (edge tiles cropped)."""
    return scale.repeat_interleave(block, 0).repeat_interleave(block, 1)[:rows, :cols]


@dataclass(frozen=True)
class FP8Format(Format):
    """E4M3 elements with a scale per output row (block=None) or per block x block tile."""

    name: str
    block: int | None = None
    bits: float = 8.0

    def _amax(self, w: torch.Tensor) -> torch.Tensor:
        a = w.abs()
        if not bool(torch.isfinite(a.sum())):
            raise FormatError(f"{self.name}: the weight has NaN or Inf values; FP8 scales need finite weights")
        if self.block is None:
            return a.amax(dim=1, keepdim=True)  # [out, 1]
        rows, cols = w.shape
        r, c = _tiles(rows, cols, self.block)
        padded = torch.zeros(r * self.block, c * self.block, dtype=a.dtype, device=a.device)
        padded[:rows, :cols] = a
        return padded.reshape(r, self.block, c, self.block).amax(dim=(1, 3))  # [r, c]

    def quantize(self, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> QTensor:
        self.check_shape(w)
        x = w.to(calc_dtype(w.dtype))
        scale = fp8_scale(self._amax(x))
        full = scale if self.block is None else _expand(scale, *w.shape, self.block)
        codes = fp8_codes(x, full)
        return QTensor(self.name, codes, scale, tuple(w.shape), None, {"scale_dtype": _dtype_name(scale.dtype)})

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        # scales are kept in their original dtype (a model.float() may have cast the buffers; both
        # casts are exact), so the product rounds as compressed-tensors' does
        sdt = getattr(torch, q.meta.get("scale_dtype", _dtype_name(q.scale.dtype)))
        scale = q.scale.to(sdt)
        full = scale if self.block is None else _expand(scale, *q.shape, self.block)
        return (q.codes.to(FP8_DTYPE).to(sdt) * full).to(dtype)

    def fake_activation(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Dynamic per-token (fp8) or per-token-group-of-128 (fp8_block) quantize-dequantize."""
        dt = calc_dtype(x.dtype)
        v = x.to(dt)
        if self.block is not None:
            if x.shape[-1] % self.block:
                raise FormatError(
                    f"{self.name}: activation groups of {self.block} need the input dim to be a multiple of "
                    f"{self.block}, got {x.shape[-1]}; exclude this module or use fp8 (per-token) activations"
                )
            v = v.unflatten(-1, (x.shape[-1] // self.block, self.block))
        scale = fp8_scale(v.abs().amax(dim=-1, keepdim=True))
        out = fp8_codes(v, scale).to(dt) * scale
        return out.reshape(x.shape).to(x.dtype)


FP8 = FP8Format("fp8")
FP8_BLOCKWISE = FP8Format("fp8_block", FP8_BLOCK)
FORMATS.add(FP8.name, FP8)
FORMATS.add(FP8_BLOCKWISE.name, FP8_BLOCKWISE)
