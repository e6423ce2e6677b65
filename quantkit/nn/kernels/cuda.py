"""CUDA: FP4 x FP4 block-scaled GEMM on torch._scaled_mm (sm_100+), for W4A4 QLinears.

Written against torch's documented block-scaled path: both operands float4_e2m1fn_x2 packed two
per byte (even element in the low nibble: quantkit's own packing), block scales float8_e4m3fn
(NVFP4, 16 elements) or float8_e8m0fnu (MXFP4, 32 elements), in cuBLAS's swizzled layout
(128-row x 4-block tiles). Untested on hardware here (the lab has no sm_100 device): the
routing and the scale swizzle are tested on CPU; see docs/runtime.md.
"""

from __future__ import annotations

import torch

from quantkit.formats import e2m1
from quantkit.formats.fp4 import FP4Format, blocks

SWIZZLE_ROWS, SWIZZLE_COLS = 128, 4  # cuBLAS block-scale tile: 128 rows x 4 scale columns


def swizzle_scales(scale: torch.Tensor) -> torch.Tensor:
    """Block scales [rows, nb] -> cuBLAS's blocked layout, flat, zero-padded to whole tiles.

    Each 128x4 tile is stored as 32 groups of (4 row-quarters x 4 columns): row r of the tile
    goes to group r % 32, quarter r // 32.
    """
    rows, cols = scale.shape
    pr = -(-rows // SWIZZLE_ROWS) * SWIZZLE_ROWS
    pc = -(-cols // SWIZZLE_COLS) * SWIZZLE_COLS
    padded = torch.zeros(pr, pc, dtype=scale.dtype, device=scale.device)
    padded[:rows, :cols] = scale
    # [row_tiles, 128, col_tiles, 4] -> [row_tiles, col_tiles, 128, 4]
    t = padded.view(pr // SWIZZLE_ROWS, SWIZZLE_ROWS, pc // SWIZZLE_COLS, SWIZZLE_COLS).permute(0, 2, 1, 3)
    # 128 rows = 4 quarters x 32: [tiles, 4, 32, 4] -> [tiles, 32, 4, 4]
    t = t.reshape(-1, 4, 32, SWIZZLE_COLS).transpose(1, 2)
    return t.reshape(-1)


def _scale_dtype(fmt: FP4Format) -> torch.dtype:
    return torch.float8_e4m3fn if fmt.has_global_scale else torch.float8_e8m0fnu


def quantize_fp4_activations(x: torch.Tensor, fmt: FP4Format, global_scale: torch.Tensor | None):
    """x [T, in] -> (packed codes uint8 [T, in/2], block scales [T, nb], global scale or None).

    The same codes and scales as fmt.fake_activation, so the GEMM multiplies what fake mode rounds to.
    """
    xb = blocks(x, fmt.block, fmt.name)  # [T, nb, block]
    gs = None
    if fmt.has_global_scale:
        gs = fmt.weight_global_scale(x) if global_scale is None else global_scale.float().reshape(1)
    scale = fmt.block_scales(xb, gs)  # [T, nb]
    codes = e2m1.encode(xb.float() / fmt.divisor(scale, gs)[..., None])
    return e2m1.pack(codes.reshape(x.shape)), scale, gs


def fp4_scaled_mm(x: torch.Tensor, module, fmt: FP4Format) -> torch.Tensor:
    """x [T, in] -> [T, out] in x.dtype via torch._scaled_mm on FP4 operands."""
    a_codes, a_scale, a_gs = quantize_fp4_activations(x, fmt, module.input_global_scale)
    fp4 = torch.float4_e2m1fn_x2
    a = a_codes.view(fp4)  # [T, in/2]
    b = module.weight_codes.view(fp4)  # [out, in/2]
    sd = _scale_dtype(fmt)
    sa = swizzle_scales(a_scale.view(sd) if a_scale.dtype == torch.uint8 else a_scale.to(sd))
    sb = swizzle_scales(module.weight_scale.view(sd) if module.weight_scale.dtype == torch.uint8 else module.weight_scale.to(sd))
    y = torch._scaled_mm(a, b.t(), sa, sb, out_dtype=torch.float32)
    if fmt.has_global_scale:  # values were code * scale / gs on both sides
        y = y / (a_gs.float() * module.weight_global_scale.float())
    if module.output_scale is not None:
        y = y * module.output_scale.float()
    if module.bias is not None:
        y = y + module.bias.float()
    return y.to(x.dtype)
