"""NVFP4 and MXFP4: one E2M1 implementation, two specs.

NVFP4: blocks of 16 along the input dim, E4M3 block scale, fp32 per-tensor global scale stored as
compressed-tensors' multiplier ``448*6/amax``. MXFP4: blocks of 32, E8M0 shared exponent stored as a
biased uint8, no global scale. Codes and scales equal compressed-tensors' bit for bit for finite
bf16/fp32 weights (MXFP4 with the ``even`` rule); docs/formats.md lists the rules and edge cases.

QTensor layout: codes uint8 [out, in/2] (packed), scale float8_e4m3fn [out, in/16] (NVFP4) or
uint8 biased exponent [out, in/32] (MXFP4), global_scale fp32 [1] (NVFP4 only).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from quantkit.errors import FormatError
from quantkit.formats import e2m1
from quantkit.formats.base import FORMATS, Format, QTensor
from quantkit.formats.scales import (
    block_amax,
    finite_abs,
    mx_exponent,
    mx_scale_value,
    nvfp4_block_scales,
    nvfp4_divisor,
    nvfp4_global_scale,
)

NVFP4_BLOCK = 16  # elements per E4M3 scale
MXFP4_BLOCK = 32  # elements per E8M0 scale (OCP MX v1.0)


def blocks(x: torch.Tensor, block: int, name: str) -> torch.Tensor:
    """[rows, cols] -> [rows, cols/block, block], or a FormatError naming the fix."""
    if x.dim() != 2:
        raise FormatError(f"{name}: expected a 2-D tensor, got shape {tuple(x.shape)}")
    rows, cols = x.shape
    if cols % block:
        raise FormatError(
            f"{name}: input dim {cols} of shape {tuple(x.shape)} is not a multiple of the block "
            f"size {block}; exclude this module from the recipe's targets or pick a smaller block"
        )
    return x.reshape(rows, cols // block, block)


def _saturate(values: torch.Tensor, divisor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Clamp to dtype's finite range, only when the largest block could overflow it.

    A block max within a rounding step of the dtype's max (e.g. bf16 3.39e38) can decode a hair
    above it; a finite input must never come back as Inf.
    """
    limit = torch.finfo(dtype).max
    if float(divisor.max()) * e2m1.E2M1_MAX > limit:
        return values.clamp(-limit, limit)
    return values


@dataclass(frozen=True)
class FP4Format(Format):
    """E2M1 elements in blocks along the input dim; ``scale`` selects the spec."""

    name: str
    block: int
    scale_kind: str  # "e4m3" (NVFP4, with a global scale) or "e8m0" (MXFP4)
    rule: str = "even"  # MX exponent rule; unused for NVFP4

    @property
    def bits(self) -> float:  # storage bits per element: 4-bit code + an 8-bit scale per block
        return 4.0 + 8.0 / self.block

    @property
    def has_global_scale(self) -> bool:
        return self.scale_kind == "e4m3"

    # -- scales ---------------------------------------------------------------------------------
    def weight_global_scale(self, w: torch.Tensor) -> torch.Tensor | None:
        if not self.has_global_scale:
            return None
        return nvfp4_global_scale(finite_abs(w).amax())

    def activation_global_scale(self, amax: torch.Tensor) -> torch.Tensor | None:
        if not self.has_global_scale:
            return None
        # in amax's own dtype, as compressed-tensors' static_minmax observer + generate_gparam
        return nvfp4_global_scale(torch.nan_to_num(amax, nan=0.0, posinf=0.0))

    def block_scales(self, xb: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        """Stored scales for blocks xb [rows, nb, block] (round to nearest scale choice)."""
        amax = block_amax(xb)  # [rows, nb] in x's dtype
        if self.has_global_scale:
            return nvfp4_block_scales(amax, global_scale)
        return mx_exponent(amax, self.rule)

    def divisor(self, scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        """fp32 [rows, nb]: what each block's elements are divided by."""
        if self.has_global_scale:
            return nvfp4_divisor(scale, global_scale)
        return mx_scale_value(scale)

    def qdq_blocks(self, xb: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None) -> torch.Tensor:
        """fp32 quantize-dequantize of blocks xb [rows, nb, block] with given stored scales."""
        d = self.divisor(scale, global_scale)[..., None]
        return e2m1.fast_round_e2m1(xb.float() / d).mul_(d)  # round_e2m1's values (tests/formats)

    # -- weights --------------------------------------------------------------------------------
    def _rtn_scales(self, w: torch.Tensor, global_scale: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(stored block scales, fp32 global scale or None) of round-to-nearest for w [rows, cols]."""
        if self.has_global_scale and global_scale is None:
            global_scale = self.weight_global_scale(w)
        gs = global_scale.float().reshape(1).to(w.device) if self.has_global_scale else None
        return self.block_scales(blocks(w, self.block, self.name), gs), gs

    def quantize(self, w: torch.Tensor, global_scale: torch.Tensor | None = None) -> QTensor:
        return self.encode(w, *self._rtn_scales(w, global_scale))

    def encode(self, w: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None) -> QTensor:
        """Quantize w with given stored block scales (RTN elements); used by scale searches too."""
        wb = blocks(w, self.block, self.name)
        codes = e2m1.encode(wb.float() / self.divisor(scale, global_scale)[..., None])  # [rows, nb, block]
        packed = e2m1.pack(codes.reshape(w.shape))  # [rows, cols/2]
        meta = {} if self.has_global_scale else {"rule": self.rule}
        return QTensor(self.name, packed, scale, tuple(w.shape), global_scale, meta)

    def qdq(self, w: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """dequantize(quantize(w), dtype) without packing: the same scales, and the arithmetic E2M1 rounding
        (e2m1.fast_round_e2m1, the same values as the codes' decode; tests/formats check equality)."""
        scale, gs = self._rtn_scales(w, None)
        out = self.qdq_blocks(blocks(w, self.block, self.name), scale, gs).reshape(w.shape)
        return _saturate(out, self.divisor(scale, gs), dtype).to(dtype)

    def dequantize(self, q: QTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows, cols = q.shape
        vals = e2m1.decode_packed(q.codes)  # [rows, cols] fp32
        d = self.divisor(q.scale, q.global_scale)  # [rows, nb]
        out = (vals.reshape(rows, cols // self.block, self.block) * d[..., None]).reshape(rows, cols)
        return _saturate(out, d, dtype).to(dtype)

    # -- activations ----------------------------------------------------------------------------
    def fake_activation(self, x: torch.Tensor, global_scale: torch.Tensor | None = None) -> torch.Tensor:
        """Dynamic per-block quantize-dequantize of x [..., in] in x's dtype.

        NVFP4 uses the given static global scale (input_global_scale), or a dynamic per-tensor one.
        """
        flat = x.reshape(-1, x.shape[-1])
        xb = blocks(flat, self.block, self.name)  # [T, in/block, block]
        gs = None
        if self.has_global_scale:
            gs = self.weight_global_scale(flat) if global_scale is None else global_scale.float().reshape(1)
        scale = self.block_scales(xb, gs)  # [T, nb]
        out = self.qdq_blocks(xb, scale, gs).reshape(x.shape)
        return _saturate(out, self.divisor(scale, gs), x.dtype).to(x.dtype)


NVFP4 = FP4Format("nvfp4", NVFP4_BLOCK, "e4m3")
MXFP4_DEFAULT_RULE = "even"  # chosen by measured reconstruction error; docs/formats.md
MXFP4 = FP4Format("mxfp4", MXFP4_BLOCK, "e8m0", MXFP4_DEFAULT_RULE)

FORMATS.add(NVFP4.name, NVFP4)
FORMATS.add(MXFP4.name, MXFP4)
# every exponent rule under its own name, for comparison and for recipes that pin one
for _rule in ("floor", "even", "rceil", "ceil"):
    FORMATS.add(f"mxfp4_{_rule}", FP4Format(f"mxfp4_{_rule}", MXFP4_BLOCK, "e8m0", _rule))
