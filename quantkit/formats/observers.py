"""Scale observers: how each block's stored scale is chosen, beyond round-to-nearest.

An observer picks, per block, one *legal stored scale* (an E4M3 code for NVFP4, an E8M0 exponent
for MXFP4); the elements are then rounded to nearest as usual, so the output is an ordinary
QTensor and the checkpoint is plain compressed-tensors with no extra tensors.

    OBSERVERS[name](fmt, w [out, in], global_scale, importance=None) -> QTensor
    OBSERVERS[name].scales(fmt, w, global_scale, importance=None) -> (scale [out, nb], global_scale)

The global scale is the caller's (the quantize pass takes the minimum over a fused q/k/v or
gate/up group first); only ``four_over_six`` rescales it, by the same constant for every member
of a group, so a group still shares one value.

Observers (every search starts from the minmax scale and only moves on a strictly lower error,
so it is never worse than minmax on its own objective):
  minmax        round-to-nearest from the block amax (the format's own rule)
  mse           the earlier amax-multiplier grid (search.py), kept for INT4 and old recipes
  e4m3_grid     NVFP4: every one of the 126 finite positive E4M3 values, on true dequantized values
  e4m3_local    NVFP4: the E4M3 codes from 4 below to 8 above the minmax code (see LOCAL_CODES_*)
  range_mse     NVFP4: block amax x 1.8 .. 0.8 (201 steps), error |e|^2.4, the search ignores the
                E4M3 rounding of the scale and the winner is cast to E4M3 at the end (llm-compressor
                PR #2950); its own objective is the unrounded one
  four_over_six NVFP4: map the block amax to 6 or to 4, whichever has the lower error; the global
                scale is taken with 256 instead of 448 (arXiv 2512.02010)
  mx_exp        MXFP4: exponent e-1, e, e+1 around the format's rule, on true dequantized values

Weighting (``importance``): None; a per-input-channel importance [in] (e.g. E[x^2] from
calibration) multiplies each element's error; or a Hessian [in, in] (X^T X), whose diagonal
block [B, B] per scale block gives the quadratic error e^T H_bb e (the power is then 2).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch

from quantkit.errors import FormatError
from quantkit.formats.base import Format, QTensor
from quantkit.formats.e2m1 import E2M1_MAX, fast_round_e2m1  # noqa: F401 (re-exported: solver, tests)
from quantkit.formats.fp4 import FP4Format, blocks
from quantkit.formats.scales import E4M3_MAX, E8M0_MAX_STORED, block_amax, mx_exponent, nvfp4_block_scales
from quantkit.registry import Registry

# positive finite float8_e4m3fn bit patterns: 0x00 is zero and 0x7F is NaN; the patterns are
# monotone in value, so code +- 1 is the neighbouring grid value
E4M3_FIRST_CODE, E4M3_LAST_CODE = 1, 126
# neighbourhood of the minmax E4M3 code searched by e4m3_local. The full grid's choice is
# bimodal: -2..+1 codes (clip a little) or +3..+7 (amax onto ~4, the four-over-six effect; E4M3
# has 8 codes per octave). Measured on SmolLM2 gate/q projections and Gaussian weights, no block
# chose outside [-2, +7]; the window leaves a margin on both sides.
LOCAL_CODES_BELOW = 4
LOCAL_CODES_ABOVE = 8
RANGE_MULTIPLIERS = torch.linspace(1.8, 0.8, 201)  # step 0.005, so 1.0 (minmax) is on the grid
RANGE_POWER = 2.4  # llm-compressor PR #2950's error exponent
FOUR_OVER_SIX_E4M3 = 256.0  # four-over-six's tensor-scale numerator: 448 leaves no room for amax/4
FOUR_SCALE = E2M1_MAX / 4.0  # mapping amax to 4 is a block scale 1.5x the minmax one
MX_OFFSETS = (-1, 1)  # exponents tried besides the rule's own
ROW_CHUNK = 256  # rows per search step: bounds the [rows, nb, B] temporaries


# -- objective --------------------------------------------------------------------------------
@dataclass(frozen=True)
class Objective:
    """Per-block error of a quantize-dequantize; shapes: e [rows, nb, B] -> [rows, nb]."""

    power: float = 2.0
    channel: torch.Tensor | None = None  # [nb, B] per-input-channel importance
    hessian: torch.Tensor | None = None  # [nb, B, B] diagonal blocks of X^T X

    def __call__(self, e: torch.Tensor) -> torch.Tensor:
        if self.hessian is not None:
            et = e.transpose(0, 1)  # [nb, rows, B]: one batched matmul per block column (einsum is ~10x slower)
            return (torch.bmm(et, self.hessian) * et).sum(-1).T
        a = e.abs()
        a = a.square() if self.power == 2.0 else a.pow(self.power)
        return (a if self.channel is None else a * self.channel).sum(-1)


def make_objective(importance: torch.Tensor | None, in_features: int, block: int, power: float) -> Objective:
    if importance is None:
        return Objective(power)
    imp = importance.detach().float()
    nb = in_features // block
    if imp.dim() == 1 and imp.numel() == in_features:
        return Objective(power, channel=imp.reshape(nb, block))
    if imp.dim() == 2 and imp.shape == (in_features, in_features):
        hb = imp.reshape(nb, block, nb, block).diagonal(dim1=0, dim2=2)  # [B, B, nb]
        return Objective(2.0, hessian=hb.permute(2, 0, 1).contiguous())
    raise FormatError(
        f"observer importance must be [in]={in_features} (per-channel) or [in, in] (Hessian), "
        f"got shape {tuple(imp.shape)}"
    )


# -- searches: (fmt, xb [rows, nb, B] fp32, gs, objective) -> (stored scale [rows, nb], gs) ---
# xw: the blocks in the weight's dtype (scales from an amax are taken there, as the format does);
# xb: the same blocks as finite fp32, the target of the error
Search = Callable[..., tuple[torch.Tensor, "torch.Tensor | None"]]


def _argmin(fmt: FP4Format, xb: torch.Tensor, gs, obj: Objective, start: torch.Tensor,
            candidates: Iterator[torch.Tensor]) -> torch.Tensor:
    """The candidate stored scale with the lowest error per block; ties keep the earlier one."""
    best = start.clone()
    best_err = obj(fmt.qdq_blocks(xb, start, gs).sub_(xb))
    for cand in candidates:
        err = obj(fmt.qdq_blocks(xb, cand, gs).sub_(xb))
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, cand, best)
    return best


def _need_nvfp4(fmt: Format, name: str) -> None:
    if not (isinstance(fmt, FP4Format) and fmt.has_global_scale):
        raise FormatError(f"observer {name} searches E4M3 block scales and needs nvfp4, not {fmt.name}")


def _minmax(fmt: FP4Format, xw, xb, gs, obj):
    return fmt.block_scales(xw, gs), gs


def _e4m3_codes(codes: torch.Tensor) -> torch.Tensor:
    return codes.to(torch.uint8).view(torch.float8_e4m3fn)


def _e4m3_grid(fmt: FP4Format, xw, xb, gs, obj):
    _need_nvfp4(fmt, "e4m3_grid")
    start = fmt.block_scales(xw, gs)
    full = lambda c: torch.full(start.shape, c, dtype=torch.uint8, device=xb.device)  # noqa: E731
    cands = (_e4m3_codes(full(c)) for c in range(E4M3_FIRST_CODE, E4M3_LAST_CODE + 1))
    return _argmin(fmt, xb, gs, obj, start, cands), gs


def _e4m3_local(fmt: FP4Format, xw, xb, gs, obj):
    _need_nvfp4(fmt, "e4m3_local")
    start = fmt.block_scales(xw, gs)
    c0 = start.view(torch.uint8).to(torch.int16)
    offsets = [k for k in range(-LOCAL_CODES_BELOW, LOCAL_CODES_ABOVE + 1) if k]
    cands = (_e4m3_codes((c0 + k).clamp(E4M3_FIRST_CODE, E4M3_LAST_CODE)) for k in offsets)
    return _argmin(fmt, xb, gs, obj, start, cands), gs


def range_multipliers(xb: torch.Tensor, obj: Objective) -> torch.Tensor:
    """range_mse's search: per block, the amax multiplier [rows, nb] with the lowest error when
    the divisor is the unrounded amax*m/6; 1.0 (minmax) is the start and wins ties."""
    best_m = torch.ones(xb.shape[:2], device=xb.device)
    best_err = range_mse_objective(xb, best_m, obj)
    for m in RANGE_MULTIPLIERS.tolist():
        e = range_mse_objective(xb, torch.full_like(best_m, m), obj)
        better = e < best_err
        best_err = torch.where(better, e, best_err)
        best_m = torch.where(better, torch.full_like(best_m, m), best_m)
    return best_m


def range_mse_objective(xb: torch.Tensor, multiplier: torch.Tensor, obj: Objective) -> torch.Tensor:
    """range_mse's own objective [rows, nb] at per-block multipliers [rows, nb]."""
    amax = block_amax(xb).float()
    d = (torch.where(amax > 0, amax, torch.ones_like(amax)) * multiplier / E2M1_MAX)[..., None]
    return obj(fast_round_e2m1(xb / d).mul_(d).sub_(xb))


def _range_mse(fmt: FP4Format, xw, xb, gs, obj):
    """Continuous scale search, cast to E4M3 once at the end (llm-compressor PR #2950)."""
    _need_nvfp4(fmt, "range_mse")
    return nvfp4_block_scales(block_amax(xb).float() * range_multipliers(xb, obj), gs), gs


def four_over_six_global_scale(gs: torch.Tensor) -> torch.Tensor:
    """448*6/amax -> 256*6/amax: the same factor for every member of a fused group."""
    return (gs.float() * (FOUR_OVER_SIX_E4M3 / E4M3_MAX)).reshape(1)


def _four_over_six(fmt: FP4Format, xw, xb, gs, obj):
    _need_nvfp4(fmt, "four_over_six")
    gs46 = four_over_six_global_scale(gs)
    six = fmt.block_scales(xw, gs46)
    four = nvfp4_block_scales(block_amax(xw).float() * FOUR_SCALE, gs46)
    return _argmin(fmt, xb, gs46, obj, six, iter([four])), gs46


def _mx_exp(fmt: FP4Format, xw, xb, gs, obj):
    if not (isinstance(fmt, FP4Format) and not fmt.has_global_scale):
        raise FormatError(f"observer mx_exp searches E8M0 exponents and needs an mxfp4 format, not {fmt.name}")
    start = fmt.block_scales(xw, None)
    e0 = start.to(torch.int16)
    cands = ((e0 + k).clamp(0, E8M0_MAX_STORED).to(torch.uint8) for k in MX_OFFSETS)
    return _argmin(fmt, xb, None, obj, start, cands), None


# -- registry ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Observer:
    name: str
    search: Search | None  # None: delegate to search.py's mse (INT4 and FP4, the earlier grid)
    power: float = 2.0

    def scales(self, fmt: Format, w: torch.Tensor, global_scale: torch.Tensor | None = None,
               importance: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(stored scales [out, nb], global scale to store) for w [out, in]; rows are independent."""
        gs = _resolve_global_scale(fmt, w, global_scale)
        if self.search is None:
            from quantkit.formats.search import mse_scales

            cw = None if importance is None or importance.dim() != 1 else importance
            return mse_scales(fmt, w, gs, col_weight=cw), gs
        if not isinstance(fmt, FP4Format):
            raise FormatError(f"observer {self.name} is for nvfp4/mxfp4 weights, not {fmt.name}")
        xb_all = blocks(w, fmt.block, fmt.name)  # [out, nb, B] in w's dtype
        obj = make_objective(importance, w.shape[1], fmt.block, self.power)
        parts, out_gs = [], gs
        for r0 in range(0, w.shape[0], ROW_CHUNK):
            xw = xb_all[r0 : r0 + ROW_CHUNK]
            target = torch.nan_to_num(xw.float(), nan=0.0, posinf=0.0, neginf=0.0)
            s, out_gs = self.search(fmt, xw, target, gs, obj)
            parts.append(s)
        return torch.cat(parts, dim=0), out_gs

    def __call__(self, fmt: Format, w: torch.Tensor, global_scale: torch.Tensor | None = None,
                 importance: torch.Tensor | None = None) -> QTensor:
        if self.name == "minmax":
            return fmt.quantize(w, global_scale)
        scale, gs = self.scales(fmt, w, global_scale, importance)
        return fmt.encode(w, scale, gs)


def _resolve_global_scale(fmt: Format, w: torch.Tensor, gs: torch.Tensor | None) -> torch.Tensor | None:
    if isinstance(fmt, FP4Format) and fmt.has_global_scale:
        gs = fmt.weight_global_scale(w) if gs is None else gs
        return gs.float().reshape(1).to(w.device)
    return None


OBSERVERS: Registry[Observer] = Registry("observer", FormatError)
for _obs in (
    Observer("minmax", _minmax),
    Observer("mse", None),
    Observer("e4m3_grid", _e4m3_grid),
    Observer("e4m3_local", _e4m3_local),
    Observer("range_mse", _range_mse, RANGE_POWER),
    Observer("four_over_six", _four_over_six),
    Observer("mx_exp", _mx_exp),
):
    OBSERVERS.add(_obs.name, _obs)


def observe(name: str, fmt: Format, w: torch.Tensor, global_scale: torch.Tensor | None = None,
            importance: torch.Tensor | None = None) -> QTensor:
    """Quantize w with the named observer's scales (elements round to nearest)."""
    return OBSERVERS.get(name)(fmt, w, global_scale, importance)
