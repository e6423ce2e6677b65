"""Dequantize a packed weight tile by tile into shared scratch buffers, matmul each tile.

Memory is the packed weight plus one tile: no layer ever holds its whole dense weight. A tile's
values are bitwise the reference dense weight's rows (the format's ``dequantize`` in fp32, one
rounding to the compute dtype); only the GEMM's blocking differs from one F.linear over the
whole weight (tolerance in docs/runtime.md).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.formats import e2m1, get_format
from quantkit.formats.base import QTensor
from quantkit.formats.fp4 import FP4Format

TILE_BYTES = 4 << 20  # dense bytes per tile: one L2/L3-sized GEMM operand per tile
MIN_TILE_ROWS = 64  # below this the per-tile Python overhead dominates a decode step

_scratch: dict[tuple[str, torch.device, torch.dtype], torch.Tensor] = {}


def tile_rows(out_features: int, in_features: int, dtype: torch.dtype) -> int:
    """Output rows per tile: TILE_BYTES of dense weight, at least MIN_TILE_ROWS, at most all."""
    per_row = in_features * torch.empty(0, dtype=dtype).element_size()
    return max(1, min(out_features, max(MIN_TILE_ROWS, TILE_BYTES // per_row)))


def scratch(role: str, numel: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """A flat buffer of at least numel elements, shared by every layer for (role, device, dtype).

    Shared on purpose: layers run one after another, so one tile of scratch serves the model.
    Not safe for two threads running forwards at once on the same device.
    """
    key = (role, torch.device(device), dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < numel:
        # a normal tensor even when first asked for under inference_mode: an inference tensor
        # could not be written in place by a later forward that runs under no_grad
        with torch.inference_mode(False):
            buf = torch.empty(numel, device=device, dtype=dtype)
        _scratch[key] = buf
    return buf[:numel]


def scratch_bytes() -> int:
    """Bytes held by all shared scratch buffers (the 'one tile' of the memory budget)."""
    return sum(b.numel() * b.element_size() for b in _scratch.values())


def release_scratch() -> None:
    _scratch.clear()


def row_slice(q: QTensor, r0: int, r1: int) -> QTensor:
    """Rows r0:r1 of a QTensor; every layout keeps output rows on dim 0 (codes and scales)."""
    return QTensor(q.format, q.codes[r0:r1], q.scale[r0:r1], (r1 - r0, q.shape[1]), q.global_scale, q.meta)


def _pair_lut(device: torch.device) -> torch.Tensor:
    """int32 [256]: byte -> its two E2M1 values as fp16 bit patterns (low nibble in the low half).

    One 4-byte gather per byte is ~5x faster on CPU than gathering [256, 2] rows.
    """
    key = ("fp4_pair_lut", torch.device(device), torch.int32)
    if key not in _scratch:
        pairs = e2m1._BYTE_LUT.to(torch.float16).contiguous()  # [256, 2], every E2M1 value exact in fp16
        _scratch[key] = pairs.view(torch.int32).reshape(256).to(device)
    return _scratch[key]


def _fp4_tile_into(out: torch.Tensor, fmt: FP4Format, q: QTensor) -> None:
    """Decode FP4 rows q into out [rows, in] without allocating a dense temporary.

    Same arithmetic as FP4Format.dequantize: exact E2M1 value * fp32 divisor, one rounding.
    """
    rows, cols = q.shape
    nb = cols // fmt.block
    idx = scratch("fp4_idx", rows * cols // 2, out.device, torch.int32)
    idx.copy_(q.codes.reshape(-1))  # uint8 bytes -> int32 gather indices
    pairs = scratch("fp4_pairs", rows * cols // 2, out.device, torch.int32)
    torch.index_select(_pair_lut(out.device), 0, idx, out=pairs)
    vals = scratch("fp4_f32", rows * cols, out.device, torch.float32)
    vals.copy_(pairs.view(torch.float16))  # [rows * cols] exact E2M1 values
    d = fmt.divisor(q.scale, q.global_scale)  # [rows, nb] fp32
    vals3 = vals.view(rows, nb, fmt.block)
    vals3.mul_(d[..., None])
    limit = torch.finfo(out.dtype).max
    if float(d.max()) * e2m1.E2M1_MAX > limit:  # as the format's _saturate: finite stays finite
        vals3.clamp_(-limit, limit)
    out.copy_(vals.view(rows, cols))


def dequant_tile_into(out: torch.Tensor, q: QTensor, output_scale: torch.Tensor | None) -> None:
    """Dense rows of q into out [rows, in] (out.dtype), bitwise QLinear.dequantized_weight's rows."""
    fmt = get_format(q.format)
    if isinstance(fmt, FP4Format):
        _fp4_tile_into(out, fmt, q)
    else:
        out.copy_(fmt.dequantize(q, out.dtype))  # int4/int8 fallbacks: one tile-sized temporary
    if output_scale is not None:
        out.mul_(output_scale.to(out.dtype)[:, None])


def tiled_linear(
    x: torch.Tensor, q: QTensor, bias: torch.Tensor | None, output_scale: torch.Tensor | None, fp32: bool = False
) -> torch.Tensor:
    """x [M, in] @ dequant(q).T + bias -> [M, out] in x.dtype, one tile of dense weight at a time.

    fp32: tiles hold the reference weight's x.dtype values, widened to fp32, and the GEMM runs in
    fp32 (exact products of bf16 values; only the summation order differs from a bf16 GEMM).
    """
    out_f, in_f = q.shape
    rows = tile_rows(out_f, in_f, x.dtype)
    b = None if bias is None else bias.to(torch.float32 if fp32 else x.dtype)
    buf = scratch("tile", rows * in_f, x.device, x.dtype)
    xm = x.float() if fp32 else x
    y = torch.empty(x.shape[0], out_f, dtype=xm.dtype, device=x.device)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        tile = buf[: (r1 - r0) * in_f].view(r1 - r0, in_f)  # [rows, in], reused every tile
        part = q if (r0, r1) == (0, out_f) else row_slice(q, r0, r1)
        dequant_tile_into(tile, part, None if output_scale is None else output_scale[r0:r1])
        if fp32:
            tile32 = scratch("tile_f32", tile.numel(), x.device, torch.float32).view_as(tile)
            tile = tile32.copy_(tile)
        if rows >= out_f:
            y = F.linear(xm, tile, b)  # one tile: the whole (small) weight, bias fused
            return y.to(x.dtype) if fp32 else y
        y[:, r0:r1] = F.linear(xm, tile)
    if b is not None:
        y += b
    return y.to(x.dtype) if fp32 else y
