"""Beyond round-to-nearest scales: per-block MSE-optimal scale search.

Round-to-nearest sets each block's scale from its absolute max. Clipping the largest value a
little often lowers the block's total squared error (more resolution for the rest), and for
NVFP4/MXFP4 the scale's own rounding (E4M3, power of two) makes a neighbouring scale better about
as often. ``mse_quantize`` tries a grid of candidate scales per block and keeps, per block, the
one with the lowest (optionally column-weighted) squared error. The result is an ordinary QTensor
of the same format: every candidate is a legal stored scale, so export is unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from quantkit.errors import FormatError
from quantkit.formats.base import Format, QTensor
from quantkit.formats.fp4 import FP4Format, blocks
from quantkit.formats.int4 import CT_INT4_DIVISOR, Int4Format
from quantkit.formats.int8 import symmetric_int_scale
from quantkit.formats.scales import E8M0_MAX_STORED, finite_abs, mx_exponent, nvfp4_block_scales

# amax multipliers tried for E4M3 (NVFP4) and integer scales; 1.0 is round-to-nearest, values
# above 1 let E4M3 round the scale up instead of clipping the block max
NVFP4_GRID = tuple(round(0.60 + 0.025 * i, 3) for i in range(19))  # 0.60 .. 1.05
INT4_GRID = tuple(round(0.60 + 0.025 * i, 3) for i in range(17))  # 0.60 .. 1.00
MX_OFFSETS = (-1, 0, 1)  # exponent offsets around the format's rule


def _candidates(
    fmt: Format, xb: torch.Tensor, gs: torch.Tensor | None, grid: Sequence[float] | None
) -> Iterator[torch.Tensor]:
    amax = finite_abs(xb).amax(dim=-1)  # [rows, nb] in x's dtype
    if isinstance(fmt, FP4Format) and fmt.has_global_scale:
        for c in grid or NVFP4_GRID:
            yield nvfp4_block_scales(amax * c, gs)
    elif isinstance(fmt, FP4Format):
        e0 = mx_exponent(amax, fmt.rule).to(torch.int16)
        for off in grid or MX_OFFSETS:
            yield torch.clamp(e0 + int(off), 0, E8M0_MAX_STORED).to(torch.uint8)
    elif isinstance(fmt, Int4Format):
        for c in grid or INT4_GRID:
            yield symmetric_int_scale(amax * c, CT_INT4_DIVISOR)
    else:
        raise FormatError(f"no scale search for format {fmt.name}")


def _block_view(fmt: Format, w: torch.Tensor) -> torch.Tensor:
    if isinstance(fmt, Int4Format):
        return fmt._groups(w)
    return blocks(w, fmt.block, fmt.name)


def mse_scales(
    fmt: Format,
    w: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    grid: Sequence[float] | None = None,
    col_weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """Stored block scales [rows, nb] minimizing sum_j col_weight[j] * (w - qdq(w))**2 per block."""
    xb = _block_view(fmt, w)  # [rows, nb, block]
    cw = None if col_weight is None else col_weight.float().reshape(1, xb.shape[1], xb.shape[2])
    target = torch.nan_to_num(xb.float(), nan=0.0, posinf=0.0, neginf=0.0)
    best_scale, best_err = None, None
    for cand in _candidates(fmt, xb, global_scale, grid):
        sq = (fmt.qdq_blocks(xb, cand, global_scale) - target).square_()
        err = (sq if cw is None else sq * cw).sum(-1)  # [rows, nb]
        if best_err is None:
            best_scale, best_err = cand.clone(), err
            continue
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best_scale = torch.where(better, cand, best_scale)
    return best_scale


def mse_quantize(
    fmt: Format,
    w: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    grid: Sequence[float] | None = None,
    col_weight: torch.Tensor | None = None,
) -> QTensor:
    """Quantize w with per-block MSE-optimal scales (elements still round to nearest).

    grid: amax multipliers (NVFP4, INT4) or exponent offsets (MXFP4); defaults above.
    col_weight [in]: optional per-input-column importance, e.g. mean x**2 from calibration.
    """
    if isinstance(fmt, FP4Format) and fmt.has_global_scale and global_scale is None:
        global_scale = fmt.weight_global_scale(w)
    gs = global_scale.float().reshape(1).to(w.device) if global_scale is not None else None
    scale = mse_scales(fmt, w, gs, grid, col_weight)
    return fmt.encode(w, scale, gs)
