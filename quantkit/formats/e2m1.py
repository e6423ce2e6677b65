"""E2M1 (FP4) elements: round, encode, pack, unpack, decode.

One implementation serves NVFP4 and MXFP4. A code is ``sign << 3 | idx`` where idx 0..7 maps to
``E2M1_VALUES``. Rounding is to nearest with ties to the even code, saturating at +-6. Two codes
share a byte: element 2j in the low nibble, 2j+1 in the high nibble (compressed-tensors,
modelopt, torchao; bitsandbytes is the opposite).
"""

from __future__ import annotations

import torch

E2M1_MAX = 6.0  # largest E2M1 magnitude, 1.5 * 2**2
E2M1_EMAX = 2  # exponent of E2M1_MAX; MX scales subtract it from the block's exponent
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)
SIGN_BIT = 8  # bit 3 of a code

# idx = number of boundaries strictly below |x|. The midpoints whose tie goes up to the even code
# (0.75 -> 1.0, 1.75 -> 2.0, 3.5 -> 4.0) are moved one fp32 ulp down, so the midpoint itself counts
# as "above"; the others (0.25 -> 0, 1.25 -> 1.0, 2.5 -> 2.0, 5 -> 4.0) round down as they are.
_TIE_DOWN = (0.25, 1.25, 2.5, 5.0)
_TIE_UP = (0.75, 1.75, 3.5)


# Module-level tables name the CPU explicitly: the first import can happen inside a caller's
# `with torch.device("meta")` (a model skeleton built on meta), which would make them data-less.
_CPU = torch.device("cpu")


def _boundaries() -> torch.Tensor:
    b = torch.tensor(sorted(_TIE_DOWN + _TIE_UP), dtype=torch.float32, device=_CPU)
    up = torch.tensor([v in _TIE_UP for v in sorted(_TIE_DOWN + _TIE_UP)], device=_CPU)
    return torch.where(up, torch.nextafter(b, torch.zeros((), device=_CPU)), b)


_BOUNDS = _boundaries()  # [7] fp32
# value of each of the 16 codes, sign in bit 3 (code 8 decodes to -0.0)
_CODE_LUT = torch.tensor(E2M1_VALUES + tuple(-v for v in E2M1_VALUES), dtype=torch.float32, device=_CPU)
# value pair of each of the 256 bytes: [256, 2], column 0 = low nibble = even element
_BYTES = torch.arange(256, device=_CPU)
_BYTE_LUT = torch.stack([_CODE_LUT[_BYTES & 0xF], _CODE_LUT[_BYTES >> 4]], dim=1)

_lut_cache: dict[tuple[torch.device, torch.dtype, str], torch.Tensor] = {}


_TABLES = {"code": _CODE_LUT, "byte": _BYTE_LUT, "bounds": _BOUNDS}


def _lut(kind: str, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    key = (device, dtype, kind)
    if key not in _lut_cache:
        _lut_cache[key] = _TABLES[kind].to(device=device, dtype=dtype)
    return _lut_cache[key]


def encode(x: torch.Tensor) -> torch.Tensor:
    """fp32 values already divided by their scale -> uint8 codes (one per element).

    Saturates at +-6 (so +-Inf -> +-6) and NaN -> code 0. A negative value that rounds to zero
    keeps its sign (code 8); only an exact -0.0 (and +0.0) is code 0. That is what
    compressed-tensors (0.19 and 0.20) writes: its rounding multiplies the rounded magnitude by
    ``sign(x)``, which is -1 for a tiny negative (-> -0.0, sign bit set) and 0 for -0.0 (-> +0.0).
    """
    x = x.float()
    idx = torch.bucketize(x.abs(), _lut("bounds", x.device, torch.float32)).to(torch.uint8)  # NaN -> 7, fixed below
    neg = x < 0  # False for -0.0 and NaN
    codes = idx | (neg.to(torch.uint8) << 3)
    if not _all_finite_fast(x):
        codes = torch.where(torch.isnan(x), torch.zeros_like(codes), codes)
    return codes


def _all_finite_fast(x: torch.Tensor) -> bool:
    # sum is NaN iff some element is NaN or +-Inf (or the sum overflows, which only costs a where)
    return bool(torch.isfinite(x.sum()))


def decode(codes: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 codes -> values (LUT gather)."""
    return _lut("code", codes.device, dtype)[codes.long()]


def round_e2m1(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest E2M1 value (ties to even, saturating), as fp32."""
    return decode(encode(x))


def pack(codes: torch.Tensor) -> torch.Tensor:
    """codes [..., n] (n even) -> bytes [..., n/2], element 2j in the low nibble."""
    pairs = codes.reshape(*codes.shape[:-1], codes.shape[-1] // 2, 2)  # [..., n/2, 2]
    return pairs[..., 0] | (pairs[..., 1] << 4)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """bytes [..., n/2] -> codes [..., n]."""
    pairs = torch.stack([packed & 0xF, packed >> 4], dim=-1)  # [..., n/2, 2]
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def decode_packed(packed: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """bytes [..., n/2] -> values [..., n] with one gather from a 256-entry byte LUT."""
    pairs = _lut("byte", packed.device, dtype)[packed.long()]  # [..., n/2, 2]
    return pairs.reshape(*packed.shape[:-1], packed.shape[-1] * 2)


def fast_round_e2m1(y: torch.Tensor) -> torch.Tensor:
    """Round y (a float tensor) to the nearest E2M1 value, ties to even, saturating (+-Inf -> +-6, NaN stays NaN): the same
    values as e2m1.round_e2m1 (tested, ties included; an exact -0.0 stays -0.0) in six elementwise ops and no
    table lookup, which dominate a search's time and a column loop's dispatch.

    The E2M1 grid is uniform with step 0.5 below 2, 1 in [2, 4) and 2 in [4, 6]: half of max(2^e, 1), with
    2^e = 2^floor(log2|y|) read from y's exponent bits. Within each range an even quotient is an even code,
    so round-half-even on the quotient is the tie rule; a quotient that rounds up to the next range's
    first value (1.9 -> 2.0) lands on the grid all the same.
    """
    as_int, exponent_bits = _EXPONENT_FIELD[y.dtype]
    y = y.clamp(-E2M1_MAX, E2M1_MAX)
    half_step = (y.view(as_int) & exponent_bits).view(y.dtype).clamp_min_(1.0).mul_(0.5)
    return torch.round(y / half_step).mul_(half_step)


# float dtype -> (the integer dtype of its width, the mask of its exponent field): the field alone is 2^floor(log2|y|)
_EXPONENT_FIELD = {torch.float32: (torch.int32, 0x7F800000), torch.float64: (torch.int64, 0x7FF0000000000000),
                   torch.bfloat16: (torch.int16, 0x7F80), torch.float16: (torch.int16, 0x7C00)}
