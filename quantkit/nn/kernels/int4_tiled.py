"""Tiled prefill straight from torch's CPU int4 layout (INT4 and FP4 "int4x2" after conversion).

Once a layer's codes live in the INT4 kernel's layout (converted in place on a decode forward),
the fp32 prefill path decodes a tile of output rows from that layout directly, instead of first
unpacking the whole layer back to canonical codes and decoding those (two passes, and for FP4 an
int64 gather per weight: 10x slower at 32 rows on Llama shapes, measured in the first bench run).

A tile's values are the reference dense weight's rows (the format's ``dequantize``: exact element
value times its fp32 scale in fp32, one rounding to the compute dtype):
- INT4: (nibble - 8) * scale;
- FP4 int4x2: (a + b) * (d/2) = (2 * e2m1) * (d/2), the same fp32 product as e2m1 * d (a power
  of two apart, so the same rounding), except that a negative zero decodes to +0.0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from quantkit.formats.int4 import INT4_OFFSET  # torch's kernel reads a nibble n as n - 8, as stored
from quantkit.nn.kernels import int4 as k_int4
from quantkit.nn.kernels import tiled

ROW_ALIGN = 64  # tiles start on a multiple of every kernel BLOCK_N (32 AVX2, 64 AVX512)


def _tile_values(nib: torch.Tensor, scale: torch.Tensor, in_f: int, block: int, halves: bool) -> torch.Tensor:
    """nibbles uint8 [rows, cols] in the int4 layout's column order -> fp32 values [rows, in_f].

    scale: fp32 [rows, in_f/block]; halves: columns are [a-block | b-block] pairs (FP4 int4x2).
    """
    rows = nib.shape[0]
    if halves:
        pairs = nib.view(rows, in_f // block, 2, block)  # [rows, nb, a|b, B]
        vals = pairs[:, :, 0].to(torch.float32).add_(pairs[:, :, 1]).sub_(2 * INT4_OFFSET)  # 2*e2m1, exact
    else:
        vals = nib.view(rows, in_f // block, block).to(torch.float32).sub_(INT4_OFFSET)  # [rows, ng, g]
    return vals.mul_(scale[:, :, None]).view(rows, in_f)


def int4_layout_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    shape: tuple[int, int],
    block: int,
    scale: torch.Tensor,
    halves: bool,
    bias: torch.Tensor | None,
    output_scale: torch.Tensor | None,
) -> torch.Tensor:
    """x [T, in] @ W.T (+ bias) -> [T, out] in x.dtype, fp32 GEMM one tile of decoded rows at a time.

    packed: torch's int4 layout of [out, cols] nibbles (cols = in, or 2*in with halves);
    scale: fp32 [out, in/block] (INT4 scales, or FP4 divisors halved for halves).
    """
    out_f, in_f = shape
    cols = 2 * in_f if halves else in_f
    per_row = cols // 2  # bytes
    rows = max(ROW_ALIGN, tiled.tile_rows(out_f, in_f, x.dtype) // ROW_ALIGN * ROW_ALIGN)
    layout = k_int4.cpu_layout()
    flat = packed.reshape(-1)
    x32 = x.float()
    limit = torch.finfo(x.dtype).max
    saturates = halves and float(scale.max()) * 12 > limit  # once per call, not per tile
    y = torch.empty(x.shape[0], out_f, dtype=torch.float32, device=x.device)
    for r0 in range(0, out_f, rows):
        r1 = min(out_f, r0 + rows)
        nib = k_int4._unpack(flat[r0 * per_row : r1 * per_row], r1 - r0, cols, layout)  # [rows, cols]
        w32 = _tile_values(nib, scale[r0:r1], in_f, block, halves)
        if saturates:  # FP4 saturates as the format's dequantize
            w32.clamp_(-limit, limit)
        w = w32.to(x.dtype)  # the reference's one rounding
        if output_scale is not None:
            w.mul_(output_scale[r0:r1].to(x.dtype)[:, None])  # as tiled.dequant_tile_into
        y[:, r0:r1] = F.linear(x32, w.float())
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
