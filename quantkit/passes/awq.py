"""`awq`: activation-aware per-input-channel scales (AWQ's search), folded offline (docs/quality.md).

For linears that read one tensor x (q/k/v after a norm, gate/up after a norm, down_proj after the
gate * up product), y = x W^T = (x diag(1/s)) (W diag(s))^T. The weights are scaled by s before
a later pass quantizes them, and 1/s is folded into whatever makes x: a norm's weight (and bias),
or the rows of the linear whose output is multiplied into x (up_proj for down_proj). The checkpoint
is the same architecture with other values: no extra tensor, no run-time op, any engine serves it.

s = a^alpha, a the RMS of each input channel over the block's calibration inputs, normalized so
that max(s) * min(s) = 1. alpha on a grid in [0, 1] minimizes the group's output error of
round-to-nearest in `format`, under the online Hadamard of a later rotate pass when `rotation` says so:

    sum over the group's target linears of tr(D H D^T),  D = deq(Q(W diag(s) R)) R^T diag(1/s) - W

with H = X^T X of the block's calibration inputs (the outputs of the blocks before it, as the
later passes see them). No scaling (s = 1) is always a candidate: the search never ends worse
than no scaling on its own objective.

Where to fold is discovered on each block, not looked up by model type: candidates are the module
whose output is x itself, the block's modules with a 1-D weight of x's width (norms), and the block's
linears whose output has x's width. A candidate is used only if it passes a check on the block:
with a test scale of powers of two (exact in every float format) on the group's weights and the
candidate, the block's output on one calibration batch must not change, while the group's weights
scaled alone must change it. Groups with no such candidate are left unscaled and reported, e.g.
o_proj under grouped-query attention (v_proj's rows are shared by several heads) or a norm that
also feeds fused MoE experts.

When a later pass of the block loop reads Hessians (gptq), the one statistics forward measures every
linear of the block and keeps the matrices, transformed by the scales, for that pass (input_stats).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, field_validator
from torch import nn

from quantkit.formats import get_format
from quantkit.passes.base import Pass, register_pass
from quantkit.passes.input_stats import KEPT, input_second_moments, keep_hessians, transform_kept
from quantkit.passes.quantize import known_format
from quantkit.nn.qlinear import rotate_input
from quantkit.stream.capture import block_output
from quantkit.targets import Targets, is_linear, linear_weight

# the fold check, as ||output - reference|| / ||reference - block input||: power-of-two scales are exact, so a valid
# fold changes nothing but kernel reordering; the group scaled alone (or a wrong fold) changes the output by O(1)
SAME, CHANGED = 1e-4, 1e-2


def _width_out(lin: nn.Module) -> int:
    return linear_weight(lin).shape[0]


@torch.no_grad()
def _scale_columns(lin: nn.Module, s: torch.Tensor) -> None:
    """W -> W diag(s) in the weight's own dtype (computed in float64)."""
    w = linear_weight(lin)
    w.copy_((w.double() * s.to(w.device)).to(w.dtype))


@torch.no_grad()
def _fold(kind: str, mod: nn.Module, s: torch.Tensor) -> None:
    """Divide what `mod` feeds the group by s. kind: "weight" (out = f(x) * w [+ b]), "offset" (out = f(x) * (1 + w),
    Gemma's norms), "rows" (a linear: its output rows and bias)."""
    if kind == "rows":
        w = linear_weight(mod)
        w.copy_((w.double() / s.to(w.device)[:, None]).to(w.dtype))
    else:
        w = mod.weight
        new = w.double() / s.to(w.device) if kind == "weight" else (1 + w.double()) / s.to(w.device) - 1
        w.copy_(new.to(w.dtype))
    b = getattr(mod, "bias", None)
    if isinstance(b, torch.Tensor):
        b.copy_((b.double() / s.to(b.device)).to(b.dtype))


def _unscale(h: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """X^T X of x / s: S^-1 H S^-1, computed in float64, returned in h's dtype."""
    inv = 1.0 / s.double().to(h.device)
    return (h.double() * inv[:, None] * inv[None, :]).to(h.dtype)


class _Group:
    def __init__(self, names: list[str], width: int):
        self.names, self.width = names, width
        self.producer: str | None = None  # the module whose output is the group's input, when one is
        self.fold: tuple[str, str] | None = None  # (kind, module name relative to the block)


@register_pass
class Awq(Pass):
    """AWQ's per-channel weight scales searched against a format's round-to-nearest, folded into norms/linears."""

    name: ClassVar[str] = "awq"
    summary: ClassVar[str] = "activation-aware per-channel scales (AWQ's search), folded offline into norms and linears"
    requires: ClassVar[frozenset[str]] = frozenset({"calib"})
    provides: ClassVar[frozenset[str]] = frozenset({"scaled"})
    execution: ClassVar[str] = "block"
    keeps_input_stats: ClassVar[bool] = True  # the kept X^T X of a scaled group become S^-1 X^T X S^-1

    format: str  # the weight format the search quantizes with (the later quantize/gptq pass's)
    rotation: int = Field(0, ge=0)  # a later rotate pass's online Hadamard block (0: none)
    rotation_sizes: dict[str, int] = {}  # its per-role blocks (the rotate pass's block_sizes)
    grid: int = Field(20, gt=0)  # alpha in 0, 1/grid, ..., 1
    coarse: int = Field(4, ge=1)  # the search's first stride over the grid (search(); 1: every point)
    # llm-compressor's duo scaling: s = a^alpha / w^(1 - alpha), w the row-normalized weight magnitude per input
    # channel (no scaling stays a candidate); measured on SmolLM2 in docs/quality.md, session 9
    duo_scaling: bool = False
    targets: Targets = Targets()  # the linears whose quantization error the search counts

    _known_format = field_validator("format")(classmethod(lambda _cls, v: known_format(v)))

    @classmethod
    def recipe_problem(cls, passes: list, save: bool, layout: str) -> str | None:
        for i, p in enumerate(passes):
            if p.name != cls.name:
                continue
            if any("quantized" in q.provided_facts() for q in passes[:i]):
                return "awq must come before the passes that quantize (it scales dense weights)"
            if any(q.name == "rotate" for q in passes[:i]):
                return "awq must come before rotate (its scales act on the unrotated input, x / s, then x R)"
            later = [q for q in passes[i + 1:] if q.name == "rotate" and q.online]
            block = later[0].block_size if later else 0
            if p.rotation != block:
                return (f"awq searches under rotation {p.rotation} but the recipe's online Hadamard block is {block}: "
                        f"set awq's rotation: {block}")
            sizes = dict(later[0].block_sizes) if later else {}
            if dict(p.rotation_sizes) != sizes:
                return (f"awq searches under rotation_sizes {dict(p.rotation_sizes) or '{}'} but the rotate pass's "
                        f"block_sizes are {sizes or '{}'}: set awq's rotation_sizes to match")
        return None

    def _key(self) -> str:
        return f"{self.name}:{id(self)}"

    def needs_inputs(self, ctx) -> bool:
        return True

    def begin(self, ctx) -> None:
        # share: a later pass of the block loop (gptq) takes X^T X, so measure every linear of the block in the one
        # forward this pass runs anyway (o_proj's input is on the way to down_proj's) and keep them current
        ctx.scratch[self._key()] = {"names": set(self.targets.select(ctx.model, ctx.arch)), "folds": {},
                                   "alphas": [], "unscaled": 0, "no_fold": 0, "share": KEPT in ctx.needed}

    # -- discovery ---------------------------------------------------------------------------
    @torch.no_grad()
    def _groups(self, blk) -> tuple[list[_Group], torch.Tensor]:
        """Linears of the block grouped by the tensor they read (one calibration batch), with that tensor's producer;
        and the block's output on that batch (the fold checks' reference)."""
        block, first_in, out_of, alive = blk.module, {}, {}, []

        def reader(n):
            def hook(_m, args):
                if args and torch.is_tensor(args[0]) and n not in first_in:
                    first_in[n] = args[0]
            return hook

        def producer(n):
            def hook(_m, _args, out):
                if torch.is_tensor(out) and id(out) not in out_of:  # the innermost module that returned it
                    out_of[id(out)] = n
                    alive.append(out)  # keep it, so that its id is not reused during this forward
            return hook

        hooks = [m.register_forward_pre_hook(reader(n)) for n, m in block.named_modules() if n and is_linear(m)]
        hooks += [m.register_forward_hook(producer(n)) for n, m in block.named_modules() if n]
        try:
            ref = self._run0(blk)
            by_input: dict[int, _Group] = {}
            for n, x in first_in.items():
                g = by_input.setdefault(id(x), _Group([], x.shape[-1]))
                g.names.append(n)
                g.producer = out_of.get(id(x))
        finally:
            for h in hooks:
                h.remove()
        return list(by_input.values()), ref

    def _candidates(self, blk, g: _Group) -> list[tuple[str, str]]:
        mods = dict(blk.module.named_modules())
        out: list[tuple[str, str]] = []
        norms = [n for n, m in mods.items() if n and not is_linear(m) and isinstance(getattr(m, "weight", None), torch.Tensor)
                 and m.weight.dim() == 1 and m.weight.shape[0] == g.width]
        if g.producer in norms:  # the module whose output is the input itself first
            norms.remove(g.producer)
            norms.insert(0, g.producer)
        for n in norms:
            out += [("weight", n), ("offset", n)]
        out += [("rows", n) for n, m in mods.items() if n and is_linear(m) and n not in g.names and _width_out(m) == g.width]
        return out

    @torch.no_grad()
    def _check(self, blk, g: _Group, fold: tuple[str, str], ref: torch.Tensor) -> bool:
        """With a power-of-two test scale on the group's weights, the block's output on batch 0 changes, and with the
        fold as well it does not (relative to the block's own contribution, output - input)."""
        mods = dict(blk.module.named_modules())
        gen = torch.Generator().manual_seed(0)
        # factors 1/8..8: exact in every float format, and far enough from 1 that a fold through a nonlinearity
        # (gate_proj's rows through SiLU, nearly linear for small pre-activations) fails
        s = torch.exp2(torch.randint(-3, 4, (g.width,), generator=gen).double())
        s[0] = 8.0  # never all ones
        base = (ref.float() - blk.hidden[0].float()).norm().clamp_min(1e-12)

        def rel(out: torch.Tensor) -> float:
            return float((out.float() - ref.float()).norm() / base) if torch.isfinite(out).all() else float("inf")

        touched = [*{id(t): t for n in (*g.names, fold[1]) for t in mods[n].parameters(recurse=False)}.values()]
        saved = [t.detach().clone() for t in touched]  # restored bit for bit: (1 + w)/s - 1 does not invert exactly
        ok = False
        try:
            for n in g.names:
                _scale_columns(mods[n], s)
            if rel(self._run0(blk)) > CHANGED:  # the batch exercises the group at all
                _fold(fold[0], mods[fold[1]], s)
                ok = rel(self._run0(blk)) < SAME
        finally:
            for t, v in zip(touched, saved):
                t.copy_(v)
        return ok

    @staticmethod
    @torch.no_grad()
    def _run0(blk) -> torch.Tensor:
        c = blk.calls[0]
        return block_output(blk.module(blk.hidden[0], *c.args, **c.kwargs))

    def _find_fold(self, blk, g: _Group, ref: torch.Tensor, cache: dict) -> tuple[str, str] | None:
        key = (type(blk.module).__name__, tuple(g.names), g.width)
        if key not in cache:
            cache[key] = next((f for f in self._candidates(blk, g) if self._check(blk, g, f, ref)), None)
        return cache[key]

    # -- the search --------------------------------------------------------------------------
    @torch.no_grad()
    def search(self, weights: list[torch.Tensor], h: torch.Tensor, rms: torch.Tensor | None = None,
               rotation: int | None = None) -> tuple[float | None, torch.Tensor, dict[int, float]]:
        """(alpha, s, {k: error of alpha = k / grid} for the grid points evaluated) for [out, in] weights (the
        group's targets) reading an input with X^T X = h. alpha is None when no scaling (s = 1) has the lowest
        error: with `duo_scaling` alpha 0 is 1/w. rms: the input's per-channel RMS if the caller has it (default:
        from h's diagonal). rotation: the group's Hadamard block (default: the pass's `rotation`).

        Coarse to fine: every `coarse`-th grid point (and the last), then every point within coarse - 1 of the
        best of those, so the whole bracket between its coarse neighbours. That is the full grid's choice
        whenever the error is unimodal in alpha (docs/quality.md, session 13); coarse: 1 evaluates every point."""
        h = h.double()
        # the RMS up to a constant factor (sqrt of the token count), which s's normalization removes
        a = (h.diagonal().clamp_min(0).sqrt() if rms is None else rms.double()).clamp_min(1e-8)
        if self.duo_scaling:  # the row-normalized weight magnitude per input channel
            wn = torch.cat([w.double().abs() / w.double().abs().amax(1, keepdim=True).clamp_min(1e-12)
                            for w in weights]).mean(0).clamp_min(1e-8)
        h32 = h.float()  # the error evaluations run in fp32 (_error)
        errs: dict[int, float] = {}
        scales: dict[int, torch.Tensor] = {}

        def evaluate(ks) -> None:
            for k in ks:
                if k not in errs:
                    alpha = k / self.grid
                    sk = a**alpha / (wn ** (1 - alpha) if self.duo_scaling else 1.0)
                    scales[k] = sk / (sk.max() * sk.min()).sqrt()
                    errs[k] = self._error(weights, h32, scales[k], rotation)

        stride = min(self.coarse, self.grid)
        evaluate(sorted({*range(0, self.grid + 1, stride), self.grid}))
        kb = min(sorted(errs), key=errs.__getitem__)
        evaluate(range(max(0, kb - stride + 1), min(self.grid, kb + stride - 1) + 1))
        ones = torch.ones_like(a)
        # without duo scaling alpha 0 is s = 1 itself
        none_err = errs[0] if not self.duo_scaling else self._error(weights, h32, ones, rotation)
        best = (none_err, None, ones)
        for k in sorted(errs):
            if errs[k] < best[0]:
                best = (errs[k], k / self.grid, scales[k])
        return best[1], best[2], errs

    def _error(self, weights: list[torch.Tensor], h: torch.Tensor, s: torch.Tensor,
               rotation: int | None = None) -> float:
        """sum of tr(D H D^T), D = deq(Q(W diag(s) R)) R^T diag(1/s) - W, in fp32 (each trace summed in float64):
        the format's round-to-nearest of W diag(s) R rounded to the weight's dtype, as the checkpoint holds it;
        R applied as the runtime applies it (qlinear.rotate_input, fp32; R^T = R)."""
        fmt, e = get_format(self.format), 0.0
        rotation = self.rotation if rotation is None else rotation
        h, s = h.float(), s.float()
        for w in weights:
            w32 = w.float()
            ws = w32 * s
            if rotation:
                ws = rotate_input(ws, rotation)
            deq = fmt.qdq(ws.to(w.dtype), torch.float32)
            if rotation:
                deq = rotate_input(deq, rotation)
            d = deq.div_(s).sub_(w32)
            e += float(((d @ h) * d).sum(dtype=torch.float64))
        return e

    # -- the block ---------------------------------------------------------------------------
    def run_block(self, blk, ctx) -> None:
        state = ctx.scratch[self._key()]
        mods = dict(blk.module.named_modules())
        groups, ref = self._groups(blk)
        plans = []
        for g in groups:
            if not any(f"{blk.prefix}.{n}" in state["names"] for n in g.names):
                continue
            fold = self._find_fold(blk, g, ref, state["folds"])
            if fold is None:
                state["no_fold"] += 1
            else:
                plans.append((g, fold))
        if not plans:
            return
        # the searched groups' inputs; when sharing, every linear of every group (one product per tensor read)
        measured = [n for g in groups for n in g.names] if state["share"] else [g.names[0] for g, _ in plans]
        hs = input_second_moments(blk, [f"{blk.prefix}.{n}" for n in measured], "hessian")
        if state["share"]:
            keep_hessians(blk, hs)
        # down_proj's group folds into up_proj's rows; scale it before up_proj's own group is searched
        plans.sort(key=lambda p: p[1][0] != "rows")
        for g, (kind, target) in plans:
            h = hs[f"{blk.prefix}.{g.names[0]}"]
            counted = [linear_weight(mods[n]).detach() for n in g.names if f"{blk.prefix}.{n}" in state["names"]]
            role = ctx.arch.role_of(f"{blk.prefix}.{g.names[0]}")
            block = self.rotation_sizes.get(role[1] if role else None, self.rotation)  # the group's own Hadamard
            alpha, s, _errs = self.search(counted, h, rotation=block)
            if alpha is None or bool((s == 1).all()):
                state["alphas"].append(0.0)
                state["unscaled"] += 1
                continue
            state["alphas"].append(alpha)
            for n in g.names:
                _scale_columns(mods[n], s)
                transform_kept(blk, f"{blk.prefix}.{n}", lambda h: _unscale(h, s))  # the input is now x / s
            _fold(kind, mods[target], s)
            self._rescale_stats(ctx, blk, g, s)

    @staticmethod
    def _rescale_stats(ctx, blk, g: _Group, s: torch.Tensor) -> None:
        """Activation amax a calibrate pass recorded before this pass: the input is now x / s."""
        cols, amax = ctx.stats.get("act_col_amax", {}), ctx.stats.get("act_amax", {})
        for n in g.names:
            full = f"{blk.prefix}.{n}"
            if full in cols:
                cols[full] = (cols[full].double() / s.to(cols[full].device)).float()
                amax[full] = cols[full].max().reshape(1)

    def finish(self, ctx) -> None:
        state = ctx.scratch[self._key()]
        alphas = state["alphas"]
        ctx.record(self.name, format=self.format, rotation=self.rotation, grid=self.grid,
                   groups_searched=len(alphas), groups_scaled=len(alphas) - state["unscaled"],
                   mean_alpha=round(sum(alphas) / len(alphas), 4) if alphas else None,
                   folds={f"{k[0]}:{','.join(k[1])}": (f"{v[0]} of {v[1]}" if v else "none passed the check")
                          for k, v in state["folds"].items()},
                   groups_without_fold=state["no_fold"])
