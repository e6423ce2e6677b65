"""GPTQ math: quantize a weight one input column at a time, spreading each column's rounding
error over the columns not yet quantized, weighted by the inverse Hessian ``H = sum X^T X``.

Scales (``static_scales``, the default): every block's stored scale is chosen once, before the
column loop, by the named observer (formats/observers.py) from the original weights, optionally
weighted by the Hessian's diagonal (``weighting="channel"``) or its diagonal blocks
(``"hessian"``). The loop then only rounds elements. This is what the llm-compressor FP4 work
found to matter: a scale refitted to error-updated weights chases the updates.
``static_scales=False`` keeps the earlier behaviour (a block's scale fixed from the updated
weights when the loop reaches its first column; minmax or mse observers only).

Static act-order (``act_order``): columns are visited in decreasing diag(H), and because the
scales were fixed beforehand in the original column layout, each column keeps its own block's
scale; the checkpoint layout is unchanged.

The result is an ordinary QTensor: the codes are exactly what the loop rounded to.
"""

from __future__ import annotations

from typing import Any

import torch

from quantkit.errors import SolverError
from quantkit.formats.base import Format, QTensor
from quantkit.formats.fp4 import FP4Format
from quantkit.formats.int4 import Int4Format
from quantkit.formats.search import mse_scales
from quantkit.threads import single_thread

MAX_DAMP_RETRIES = 3  # each retry multiplies the dampening by 10 before giving up on a layer
WEIGHTINGS = ("none", "channel", "hessian")


class _Stop(Exception):
    """Raised by the capture hook to end the model forward at the first decoder layer."""


def group_size(fmt: Format, in_features: int) -> int:
    if isinstance(fmt, FP4Format):
        return fmt.block
    if isinstance(fmt, Int4Format):
        return fmt.group or in_features
    raise ValueError(f"gptq does not know the block structure of format {fmt.name}")


def _block_scale(fmt: Format, w: torch.Tensor, gs: torch.Tensor | None, observer: str) -> torch.Tensor:
    """Stored scales [out, nb] for w [out, nb*g] in the weight's dtype (minmax or the mse grid)."""
    if observer == "mse":
        return mse_scales(fmt, w, gs)
    if observer != "minmax":
        raise ValueError(f"gptq with static_scales=False supports the minmax and mse observers, not {observer}")
    if isinstance(fmt, FP4Format):
        return fmt.block_scales(w.reshape(w.shape[0], -1, fmt.block), gs)
    return fmt.scales(fmt._groups(w))


def choose_static_scales(fmt: Format, w: torch.Tensor, gs: torch.Tensor | None, observer: str,
                  importance: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(stored scales [out, in/g], global scale) chosen once from w by the observer."""
    if observer == "minmax":  # importance cannot change a round-to-nearest scale
        return _block_scale(fmt, w, gs, "minmax"), gs
    from quantkit.formats.observers import OBSERVERS

    return OBSERVERS.get(observer).scales(fmt, w, gs, importance)


def _qdq_column(fmt: Format, col: torch.Tensor, scale: torch.Tensor, gs: torch.Tensor | None) -> torch.Tensor:
    """fp32 quantize-dequantize of one column [out] with its block's scales [out]."""
    return fmt.qdq_blocks(col[:, None, None], scale[:, None], gs)[:, 0, 0]


def _inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after dampening by damp * mean(diag H)."""
    h = h.clone()
    h.diagonal().add_(damp * h.diagonal().mean())
    hinv = torch.cholesky_inverse(torch.linalg.cholesky(h))
    return torch.linalg.cholesky(hinv, upper=True)


def _single_thread_on_cpu(device: torch.device):
    """The column loop is thousands of tiny ops; on a busy CPU, intra-op threads spend more time
    in barriers than in work (measured 120 ms vs 6.6 ms per column, 2 threads vs 1, 1536x576)."""
    return single_thread(device.type == "cpu")


def _importance(h: torch.Tensor, weighting: str) -> torch.Tensor | None:
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown gptq weighting {weighting!r}; known: {', '.join(WEIGHTINGS)}")
    if weighting == "none":
        return None
    return h.diagonal().clone() if weighting == "channel" else h


def gptq_quantize(
    fmt: Format,
    w: torch.Tensor,
    h: torch.Tensor,
    global_scale: torch.Tensor | None = None,
    *,
    block_size: int = 128,
    dampening: float = 0.01,
    observer: str = "minmax",
    static_scales: bool = True,
    act_order: bool = False,
    weighting: str = "none",
    refine_sweeps: int = 0,
    refine_dampening: float | None = None,
    refine_scale_rounds: int = 0,
) -> tuple[QTensor, dict[str, Any]]:
    """GPTQ-quantize w [out, in] given H [in, in] (sum of x x^T over calibration tokens).

    refine_sweeps > 0 (static scales): that many coordinate-descent sweeps over the rounded weights
    after the column loop (``refine``), on H dampened as GPTQ's was (or by refine_dampening).
    refine_scale_rounds > 0 (NVFP4): then that many rounds of one pass over the E4M3 block scales
    (``refine_block_scales``, codes fixed) followed by the code sweeps again."""
    check_refine(fmt, refine_sweeps, refine_scale_rounds)
    out_f, in_f = w.shape
    g = group_size(fmt, in_f)
    if isinstance(fmt, FP4Format) and fmt.has_global_scale and global_scale is None:
        global_scale = fmt.weight_global_scale(w)
    gs = None if global_scale is None else global_scale.float().reshape(1).to(w.device)
    block_size = max(g, block_size - block_size % g) if g < in_f else in_f  # blocks hold whole groups
    W = w.float().clone()
    h = h.float().clone()
    dead = h.diagonal() == 0
    h.diagonal()[dead] = 1.0
    W[:, dead] = 0.0
    if not static_scales:
        if refine_sweeps or refine_scale_rounds:
            raise ValueError("gptq refine_sweeps needs static scales (the grid it moves on is fixed beforehand)")
        if act_order:
            raise ValueError("gptq act_order needs static scales (scales fixed before the column loop)")
        return _dynamic(fmt, w, W, h, gs, g, block_size, dampening, observer)

    scales, gs = choose_static_scales(fmt, W.to(w.dtype), gs, observer, _importance(h, weighting))  # [out, in/g]
    perm = torch.argsort(h.diagonal(), descending=True, stable=True) if act_order else None
    h_cols = h  # in the checkpoint's column order (the refinement's)
    if perm is not None:
        W, h = W[:, perm], h[perm][:, perm]
    hinv, damp = _factor(h, dampening)
    col_group = (torch.arange(in_f, device=w.device) if perm is None else perm) // g  # [in] block of each visited column
    src = torch.empty_like(W)  # each column as it was when rounded; encode() reproduces the codes
    loss = torch.zeros(out_f, device=w.device)
    with _single_thread_on_cpu(W.device):
        for i1 in range(0, in_f, block_size):
            i2 = min(i1 + block_size, in_f)
            col_scales = scales[:, col_group[i1:i2]]  # [out, i2-i1]
            _static_block(fmt, W, hinv, src, loss, col_scales, i1, i2, gs)
    if perm is not None:
        unperm = torch.empty_like(src)
        unperm[:, perm] = src
        src = unperm
    info: dict[str, Any] = {"damp": damp, "loss": float(loss.sum()) / 2, "row_loss": loss / 2}
    if refine_sweeps:
        src, scales, info["refine"] = _refine_static(
            fmt, w.float().masked_fill(dead[None, :], 0.0), src, h_cols, scales, gs, g,
            damp if refine_dampening is None else refine_dampening, refine_sweeps, refine_scale_rounds)
    qt = fmt.encode(src, scales, gs)
    return qt, info


def check_refine(fmt: Format, sweeps: int, scale_rounds: int) -> None:
    """The refinement settings a format allows (the solver's and the gptq pass's check): scale rounds move
    E4M3 block scales (NVFP4 only) and alternate with code sweeps."""
    if scale_rounds and not (isinstance(fmt, FP4Format) and fmt.has_global_scale):
        raise ValueError(f"refine_scale_rounds is for nvfp4 only (E4M3 block scales), not {fmt.name}")
    if scale_rounds and not sweeps:
        raise ValueError("refine_scale_rounds needs refine_sweeps > 0 (the codes are refined between scale passes)")


def _refine_static(fmt, w, src, h, scales, gs, g, damp, sweeps,
                   scale_rounds: int = 0) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """refine() on the column loop's result: each column's grid from its block's static scale, H dampened by
    damp * mean(diag H); with scale_rounds, alternated with refine_block_scales. -> (values, scales, info)."""
    col_block = torch.arange(w.shape[1], device=w.device) // g
    hd = h.clone()
    hd.diagonal().add_(damp * h.diagonal().mean())
    what = fmt.dequantize(fmt.encode(src, scales, gs), torch.float32)  # the values GPTQ rounded to
    with _single_thread_on_cpu(w.device):
        what, info = refine(w, what, hd, _column_rounder(fmt, scales[:, col_block], gs), sweeps)
        for _ in range(scale_rounds):
            before = info["objective_after"]
            what, scales, changed = refine_block_scales(w, what, hd, scales, gs, g)
            info["scales_changed"] = info.get("scales_changed", 0) + changed
            if not changed:
                break
            what, again = refine(w, what, hd, _column_rounder(fmt, scales[:, col_block], gs), sweeps)
            info.update(objective_after=again["objective_after"], moved=info["moved"] + again["moved"],
                        sweeps=info["sweeps"] + again["sweeps"])
            if again["objective_after"] >= before:
                break
    return what, scales, info


def refine_block_scales(w: torch.Tensor, what: torch.Tensor, h: torch.Tensor, scales: torch.Tensor,
                        gs: torch.Tensor, g: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """One pass over NVFP4's E4M3 block scales, codes fixed, on tr((w - what) H (w - what)^T).

    Block b of a row holds what_B = d c (c its E2M1 values, d = scale / gs). Moving d by t changes the
    objective by -2 t (c . G_B) + t^2 (c H_BB c), G = (w - what) H: a parabola in t, so of the two E4M3
    values around its minimum one is the best representable scale; the block keeps its scale unless that
    one is strictly better. All rows at once, blocks in turn (G updated after each). -> (what, scales,
    blocks changed)."""
    from quantkit.formats.observers import E4M3_FIRST_CODE, E4M3_LAST_CODE

    what, scales = what.clone(), scales.clone()
    gsf = gs.float()
    d = scales.float() / gsf  # [out, nb], the divisor nvfp4_divisor computes
    lo_s = torch.tensor(E4M3_FIRST_CODE, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    hi_s = torch.tensor(E4M3_LAST_CODE, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    gr = (w - what) @ h
    changed = 0
    for b in range(scales.shape[1]):
        cols = slice(b * g, (b + 1) * g)
        c = what[:, cols] / d[:, b:b + 1]  # the E2M1 values (exact up to fp32 rounding; encode rounds them back)
        num = (gr[:, cols] * c).sum(1)
        den = ((c @ h[cols, cols]) * c).sum(1)
        live = den > 0
        target = ((d[:, b] + num / den.clamp_min(1e-30)) * gsf).clamp(lo_s, hi_s)
        near = target.to(torch.float8_e4m3fn)
        code = near.view(torch.uint8).to(torch.int16)
        other = (code + torch.where(near.float() < target, 1, -1)).clamp(E4M3_FIRST_CODE, E4M3_LAST_CODE)
        best_t = torch.zeros_like(num)
        best_gain = torch.zeros_like(num)  # objective decrease; 0 = keep the current scale
        for cand in (near.float(), other.to(torch.uint8).view(torch.float8_e4m3fn).float()):
            t = cand / gsf - d[:, b]
            gain = 2 * t * num - t * t * den
            better = live & (gain > best_gain)
            best_t, best_gain = torch.where(better, t, best_t), torch.where(better, gain, best_gain)
        move = best_t != 0
        if not move.any():
            continue
        rows = move.nonzero().squeeze(1)
        new_s = ((d[rows, b] + best_t[rows]) * gsf).to(torch.float8_e4m3fn)
        scales[rows, b] = new_s
        new_d = new_s.float() / gsf
        delta = c[rows] * (new_d - d[rows, b])[:, None]  # the block's values move with its scale
        what[rows, cols] += delta
        gr[rows] -= delta @ h[cols]
        d[rows, b] = new_d
        changed += int(rows.numel())
    return what, scales, changed


def refine(w: torch.Tensor, what: torch.Tensor, h: torch.Tensor, rounder, sweeps: int,
           block: int = 128) -> tuple[torch.Tensor, dict[str, Any]]:
    """Cyclic coordinate descent on tr((w - what) H (w - what)^T) with every element kept on its
    block's grid (scales fixed): for element (r, j) the objective is a 1-D quadratic in what[r, j]
    with minimum at what[r, j] + G[r, j] / H[j, j] (G = (w - what) H), and the nearest grid point
    to that minimum is the best grid point, so no step raises the objective. All rows move at
    once (they are independent); within a block of columns only the block's later columns of G
    are kept current (one rank-1 BLAS call per column), and all of G is updated from the block's
    deltas by one matmul at its end; stops early at a fixed point. The loop works on the
    transposes (one input column = one contiguous row).
    -> (what refined [out, in] fp32, {objective before, after, elements moved, sweeps run})."""
    n = w.shape[1]
    h = h.float()
    wt = w.float().T.contiguous()  # [in, out]
    qt = what.float().T.contiguous()
    gt = h @ (wt - qt)  # G^T (H symmetric)
    before = float(((wt - qt) * gt).sum())
    inv_hdiag = (1.0 / h.diagonal().double()).tolist()  # the step to the 1-D minimum: what + G * (1 / H_jj)
    moved = done = 0
    for _ in range(sweeps):
        moved_before = moved
        for i1 in range(0, n, block):
            i2 = min(i1 + block, n)
            g1 = gt[i1:i2].clone()  # the block's rows of G^T, kept current for the columns still to come
            h1 = h[i1:i2, i1:i2]
            q1 = qt[i1:i2]  # a view; each column is visited once per block, so it keeps its start value until
            d1 = torch.empty_like(q1)  # the block's deltas are added at its end
            for i in range(i2 - i1):
                torch.sub(rounder(torch.add(q1[i], g1[i], alpha=inv_hdiag[i1 + i]), i1 + i), q1[i], out=d1[i])
                g1[i + 1:].addr_(h1[i, i + 1:], d1[i], alpha=-1)
            q1 += d1
            moved += int((d1 != 0).sum())
            gt -= h[:, i1:i2] @ d1  # every row of G^T, the block's own included, from the block's deltas at once
        done += 1
        if moved == moved_before:  # a fixed point: later sweeps would not move anything either
            break
    what = qt.T.contiguous()
    wf = w.float()
    after = float(((wf - what) * ((wf - what) @ h)).sum())
    return what, {"objective_before": before, "objective_after": after, "moved": moved, "sweeps": done}


def _factor(h: torch.Tensor, dampening: float) -> tuple[torch.Tensor, float]:
    damp = dampening
    if not torch.isfinite(h).all():  # Cholesky of a NaN matrix may "succeed" and quantize to garbage
        raise SolverError("gptq: the calibration Hessian has NaN/Inf entries (non-finite activations); "
                          "check the model in full precision, raise gptq dampening or add calibration samples")
    for _ in range(MAX_DAMP_RETRIES + 1):
        try:
            return _inverse_hessian_factor(h, damp), damp
        except torch.linalg.LinAlgError:
            damp *= 10
    raise SolverError(f"gptq: the Hessian is not positive definite even with dampening {damp / 10:g} "
                      f"({MAX_DAMP_RETRIES} automatic x10 retries from {dampening:g}); "
                      "raise gptq dampening (e.g. 0.1) or add calibration samples (calib.n_samples)")


def _column_rounder(fmt: Format, col_scales: torch.Tensor, gs: torch.Tensor | None):
    """(column [out], index) -> its fp32 quantize-dequantize. FP4: the divisors of the whole block of
    columns [out, n] once, then e2m1.fast_round_e2m1 (six elementwise ops, tested equal to the format's
    rounding): the column loop is dispatch-bound, and this is the same value as qdq_blocks."""
    if isinstance(fmt, FP4Format):
        from quantkit.formats.e2m1 import fast_round_e2m1

        d = fmt.divisor(col_scales, gs).T.contiguous().unbind(0)  # [out] fp32 per column, contiguous
        return lambda c, i: fast_round_e2m1(c / d[i]).mul_(d[i])
    return lambda c, i: _qdq_column(fmt, c, col_scales[:, i], gs)


def _columns(W, hinv, src, loss, i1, i2, qdq) -> None:
    """Round columns i1..i2 one at a time, each pushing its error onto the block's later columns,
    then the block's error onto columns i2.. (lazy batch update). qdq(W1t, i) -> column i of the
    block, as updated so far, rounded; W1t [i2-i1, out] holds the block's columns as rows (contiguous,
    so each step is a few vector ops and one rank-1 BLAS update)."""
    W1t = W[:, i1:i2].T.contiguous()
    src1t = torch.empty_like(W1t)  # each column as it was when rounded
    err1t = torch.empty_like(W1t)
    Hinv1 = hinv[i1:i2, i1:i2]
    inv_d = (1.0 / Hinv1.diagonal().double()).tolist()
    for i in range(i2 - i1):
        c = W1t[i]
        src1t[i] = c
        err = torch.sub(c, qdq(W1t, i), out=err1t[i]).mul_(inv_d[i])
        W1t[i + 1:].addr_(Hinv1[i, i + 1:], err, alpha=-1)  # row i itself is done (its source is kept)
    src[:, i1:i2] = src1t.T
    loss += err1t.square().sum(0)
    W[:, i2:] -= err1t.T @ hinv[i1:i2, i2:]


def _static_block(fmt, W, hinv, src, loss, col_scales, i1, i2, gs) -> None:
    """Columns i1..i2 rounded with their fixed scales."""
    rounder = _column_rounder(fmt, col_scales, gs)
    _columns(W, hinv, src, loss, i1, i2, lambda W1t, i: rounder(W1t[i], i))


# -- the earlier dynamic-scale variant ------------------------------------------------------------
def _dynamic(fmt, w, W, h, gs, g, block_size, dampening, observer):
    out_f, in_f = W.shape
    hinv, damp = _factor(h, dampening)
    # block scales [out, 1] in column order; per channel: one, from the weights before any update
    picked: list[torch.Tensor] = [_block_scale(fmt, W.to(w.dtype), gs, observer)] if g == in_f else []
    src = torch.empty_like(W)
    loss = torch.zeros(out_f, device=w.device)
    with _single_thread_on_cpu(W.device):
        for i1 in range(0, in_f, block_size):
            _dynamic_block(fmt, W, hinv, src, loss, picked, i1, min(i1 + block_size, in_f), g, gs, observer, w.dtype)
    qt = fmt.encode(src, torch.cat(picked, dim=1), gs)  # scales [out, in/g]
    return qt, {"damp": damp, "loss": float(loss.sum()) / 2}


def _dynamic_block(fmt, W, hinv, src, loss, picked, i1, i2, g, gs, observer, dtype) -> None:
    """Columns i1..i2, each block's scale fixed from the updated weights when its first column comes."""
    per_channel = g == W.shape[1]

    def qdq(W1t, i):
        if (i1 + i) % g == 0 and not per_channel:  # a new block: fix its scale from the updated weights
            picked.append(_block_scale(fmt, W1t[i : i + g].T.to(dtype), gs, observer))  # [out, 1]
        return _qdq_column(fmt, W1t[i], picked[-1][:, 0], gs)

    _columns(W, hinv, src, loss, i1, i2, qdq)
