"""Block scales for FP4: NVFP4's E4M3 scale with an FP32 global scale, MXFP4's E8M0 exponent.

The order of operations and the dtype of each intermediate follow compressed-tensors exactly
(see docs/formats.md, "bit-exactness"); a different order changes bytes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.errors import FormatError
from quantkit.formats.e2m1 import E2M1_EMAX, E2M1_MAX

E4M3_MAX = 448.0  # largest float8_e4m3fn value
NVFP4_GS_NUMERATOR = E4M3_MAX * E2M1_MAX  # 2688: global scale = 448*6/amax (a multiplier)
ZERO_BLOCK_SCALE = 0.125  # compressed-tensors stores a zero E4M3 block scale as 0.125 (its "eps")
E8M0_BIAS = 127
# 255 is E8M0's NaN and 6 * 2**(253-127) overflows fp32, so a finite block can't dequantize to Inf;
# compressed-tensors allows up to 255, which only matters for block maxima >= 1.75 * 2**127
E8M0_MAX_STORED = 252
MX_RULES = ("floor", "even", "rceil", "ceil")
_F32_MANTISSA = 23
_EVEN_ADD = 1 << (_F32_MANTISSA - 2)  # half an E2M1 mantissa step: a mantissa >= 1.75 rounds up


def calc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype the scale arithmetic runs in: the weight's own for bf16/fp32 (as compressed-tensors).

    fp16 would overflow 2688/amax for amax < 0.041 (compressed-tensors then silently falls back
    to a global scale of 1), so fp16 and anything else compute in fp32.
    """
    return dtype if dtype in (torch.bfloat16, torch.float32) else torch.float32


def finite_abs(x: torch.Tensor) -> torch.Tensor:
    """|x| with NaN and +-Inf replaced by 0, so they never set a scale."""
    a = x.abs()
    if not bool(torch.isfinite(a.sum())):
        a = torch.where(torch.isfinite(a), a, torch.zeros_like(a))
    return a


def block_amax(xb: torch.Tensor) -> torch.Tensor:
    """Finite absolute max of blocks xb [rows, nb, block] -> [rows, nb] in xb's dtype (exact).

    max_pool1d is several times faster on CPU than amax over a short last dim.
    """
    rows, nb, block = xb.shape
    a = finite_abs(xb.float()).reshape(1, rows, nb * block)
    return F.max_pool1d(a, block, block).reshape(rows, nb).to(xb.dtype)


def nvfp4_global_scale(amax: torch.Tensor) -> torch.Tensor:
    """fp32 [1] global scale ``448*6/amax`` from a (finite) amax, computed in amax's dtype."""
    dt = calc_dtype(amax.dtype)
    amax = amax.to(dt).reshape(-1).amax()
    amax = torch.clamp(amax, min=torch.finfo(dt).tiny)
    gs = NVFP4_GS_NUMERATOR / amax
    return torch.nan_to_num(gs, nan=1.0, posinf=1.0, neginf=1.0).to(torch.float32).reshape(1)


def nvfp4_block_scales(block_amax: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """Block amax (weight dtype) -> E4M3 block scales; a zero scale is stored as 0.125."""
    dt = calc_dtype(block_amax.dtype)
    local = block_amax.to(dt) / torch.tensor(E2M1_MAX, dtype=dt)  # rounded in the weight dtype
    s = torch.clamp(global_scale.float() * local.float(), -E4M3_MAX, E4M3_MAX)
    s = s.to(torch.float8_e4m3fn).float()
    s = torch.where(s == 0, torch.full_like(s, ZERO_BLOCK_SCALE), s)
    return s.to(torch.float8_e4m3fn)


def nvfp4_divisor(scale: torch.Tensor, global_scale: torch.Tensor) -> torch.Tensor:
    """fp32 effective scale ``block_scale / global_scale``: elements are divided by it."""
    return scale.float() / global_scale.float()


def mx_exponent(block_amax: torch.Tensor, rule: str) -> torch.Tensor:
    """Block amax -> biased E8M0 exponent (uint8) under one of MX_RULES.

    floor: OCP, ``floor(log2(amax)) - 2``; the block max may clip to 6.
    even:  compressed-tensors / torchao EVEN: round amax up to the next power of two when its
           mantissa is >= 1.75, then floor.
    rceil: torchao/cuBLAS RCEIL, ``ceil(log2(amax / 6))``: never clips.
    ceil:  torchao CEIL, ``ceil(log2(amax)) - 2``: never clips, often wastes the top code.
    """
    if rule not in MX_RULES:
        raise FormatError(f"unknown MX exponent rule {rule!r}; known: {', '.join(MX_RULES)}")
    bits = block_amax.float().view(torch.int32)  # amax >= 0, so the sign bit is 0
    if rule == "even":
        bits = bits + _EVEN_ADD
    field = (bits >> _F32_MANTISSA) & 0xFF  # biased fp32 exponent; 0 for zero and subnormals
    mant = bits & ((1 << _F32_MANTISSA) - 1)
    if rule in ("floor", "even"):
        e = field - E2M1_EMAX
    elif rule == "ceil":
        e = field + (mant > 0).to(torch.int32) - E2M1_EMAX
    else:  # rceil: amax = 1.m * 2**E; 6 * 2**k >= amax  <=>  k >= E - 2 when 1.m <= 1.5, else E - 1
        e = field - E2M1_EMAX + (mant > (1 << (_F32_MANTISSA - 1))).to(torch.int32)
    # zero / subnormal amax: the smallest scale (2**-127); E8M0 has no zero
    e = torch.where(field == 0, torch.zeros_like(e), e)
    return torch.clamp(e, 0, E8M0_MAX_STORED).to(torch.uint8)


def mx_scale_value(exponent: torch.Tensor) -> torch.Tensor:
    """Biased E8M0 exponent (uint8) -> fp32 power of two, exact (2**-127 is a subnormal)."""
    e = exponent.to(torch.int32)
    bits = torch.where(e > 0, e << _F32_MANTISSA, torch.full_like(e, 1 << (_F32_MANTISSA - 1)))
    return bits.view(torch.float32)
