"""`gptq` pass: GPTQ weight quantization from calibration inputs, in the shared block loop.

The column-loop math lives in solver.py."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field, model_validator
from torch import nn

from quantkit.formats import get_format
from quantkit.nn.qlinear import QLinear
from quantkit.passes.base import register_pass
from quantkit.errors import QuantkitError, SolverError
from quantkit.passes.gptq.solver import check_refine, gptq_quantize
from quantkit.passes.input_stats import drop_kept, hessians
from quantkit.passes.quantize import Quantize, build_qlinear
from quantkit.targets import linear_weight


def input_stages(ctx, index: int, names: list[str]) -> list[list[str]]:
    """`sequential: true`: names as groups sharing one input (fused q/k/v and gate/up whole, the other linears
    alone) in data-flow order (the structure's role order: q/k/v before o, gate/up before down; linears it
    cannot place after them, in call order)."""
    order = {n: k for k, (n, _role, _kind) in enumerate(ctx.arch.linears(index))} if ctx.arch.blocks else {}
    names = sorted(names, key=lambda n: order.get(n, len(order)))
    fused = {n: g for g in ctx.arch.fused_groups(index) if all(m in names for m in g) for n in g}
    stages: list[list[str]] = []
    for n in names:
        g = fused.get(n, [n])
        if g not in stages:
            stages.append(g)
    return stages


@register_pass
class Gptq(Quantize):
    """GPTQ: error-compensating weight quantization from calibration inputs.

    Same fields as `quantize` (format, act_format, mode, observer, targets), plus the GPTQ knobs.
    Runs in the shared block loop: the Hessians of block i come from its calibration inputs,
    the outputs of blocks 0..i-1 already quantized (sequential, as llm-compressor).
    """

    name: ClassVar[str] = "gptq"
    summary: ClassVar[str] = "GPTQ weight quantization (any format), block by block from calibration inputs"
    requires: ClassVar[frozenset[str]] = frozenset({"calib"})
    provides: ClassVar[frozenset[str]] = frozenset({"quantized"})
    reads_input_hessians: ClassVar[bool] = True  # takes X^T X an earlier pass of the block loop kept (input_stats)

    block_size: int = Field(128, gt=0)  # columns updated together (lazy batch updates); rounded to whole blocks
    # fraction of mean(diag H) added to the diagonal; 0.1 had the lowest development-text output error of
    # 0.01/0.05/0.1, with and without act-order (bench/results/fp4_quality_gptq_s4.md, docs/quality.md)
    dampening: float = Field(0.1, ge=0)
    act_order: bool = False  # static act-order: columns by decreasing diag(H), scales fixed beforehand (solver.py)
    # true-sequential inside a block: one stage per group of linears sharing an input (q/k/v, o, gate/up, down),
    # each stage's Hessians taken with the stages before it already quantized; False: the whole block at once
    sequential: bool = False
    # after the column loop: cyclic coordinate-descent sweeps over the rounded weights (each element moved to the
    # grid point nearest its one-dimensional optimum, scales fixed; never raises the layer objective), on H
    # dampened by refine_dampening (None: as the column loop's); solver.refine, docs/quality.md
    refine_sweeps: int = Field(0, ge=0)
    refine_dampening: float | None = Field(None, ge=0)
    # NVFP4: rounds of one pass over the E4M3 block scales (codes fixed, each block's scale moved to the best
    # representable value for its codes) alternated with the sweeps; solver.refine_block_scales
    refine_scale_rounds: int = Field(0, ge=0)

    @model_validator(mode="after")
    def _scale_rounds(self):
        check_refine(get_format(self.format), self.refine_sweeps, self.refine_scale_rounds)
        return self

    def requirements(self) -> frozenset[str]:
        return self.requires | super().requirements()

    def needs_inputs(self, ctx) -> bool:
        return True

    def begin(self, ctx) -> None:
        super().begin(ctx)
        ctx.scratch[self._key()]["losses"] = {}
        ctx.scratch[self._key()]["refined"] = [0.0, 0.0, 0]  # objective before, after refinement; scales moved

    def run_block(self, blk, ctx) -> None:
        names = [n for n in blk.select(ctx.scratch[self._key()]["names"])
                 if not isinstance(blk.model.get_submodule(n), QLinear)]
        state = ctx.scratch[self._key()]
        for stage in (input_stages(ctx, blk.index, names) if self.sequential else [names] if names else []):
            state["hessians"] = hessians(blk, stage)  # what an earlier pass kept (awq), the rest measured
            drop_kept(blk)  # the stage's linears are quantized next: later stages' inputs change
            self._quantize_names(blk.model, ctx, stage)
            state.pop("hessians", None)
        # fused MoE experts after the block's linears, from inputs that went through them quantized
        from quantkit.passes.gptq.experts import gptq_block_experts

        gptq_block_experts(self, blk, ctx)

    def run_rest(self, model: nn.Module, ctx) -> None:
        prefix = ctx.arch.layers_path + "."
        rest = [n for n in ctx.scratch[self._key()]["names"] if not n.startswith(prefix)]
        if rest:
            raise QuantkitError(f"gptq has no calibration inputs for {rest[0]} (outside the decoder blocks); "
                                "quantize it with a `quantize` pass instead")

    def _quantized(self, linear: nn.Module, name: str, gscales: dict, igs, ctx) -> QLinear:
        state = ctx.scratch[self._key()]
        solved = state.setdefault("solved", {})
        if name not in solved:
            partners = self._partners(name, state["hessians"], gscales, ctx.model)
            solved.update(self._solve(partners, [linear_weight(ctx.model.get_submodule(n)).detach() for n in partners],
                                      state["hessians"][name], gscales.get(name)))
            for n in partners:
                state["hessians"].pop(n)
        qt, info = solved.pop(name)
        self.record(state, name, info)
        return build_qlinear(linear, qt, mode=self.mode, act_format=self.act_format, input_global_scale=igs)

    @staticmethod
    def _partners(name: str, hessians: dict, gscales: dict, model: nn.Module) -> list[str]:
        """name and the linears still to quantize that read the same input (equal Hessians) with the same global
        scale (fused q/k/v, gate/up): GPTQ's rows are independent given H, so they are solved as one matrix, which
        gives the same codes in fewer column steps (the loop is bound by per-column dispatch, not by rows)."""
        h, gs = hessians[name], gscales.get(name)
        out = [name]
        for n, hn in hessians.items():
            if n == name or hn.shape != h.shape or not torch.equal(hn, h):
                continue
            gn = gscales.get(n)
            if (gn is None) != (gs is None) or (gs is not None and not torch.equal(gn, gs)):
                continue
            if linear_weight(model.get_submodule(n)).dtype == linear_weight(model.get_submodule(name)).dtype:
                out.append(n)
        return out

    def _solve(self, names: list[str], weights: list[torch.Tensor], h: torch.Tensor, gs) -> dict:
        """{name: (QTensor, solver info)} for linears sharing h and gs, their rows stacked into one solve."""
        try:
            qt, info = gptq_quantize(get_format(self.format), torch.cat(weights), h, gs, block_size=self.block_size,
                                     dampening=self.dampening, observer=self.observer, act_order=self.act_order,
                                     weighting=self.weighting, **self.solver_refine())
        except SolverError as e:  # the solver's message names the knobs; add the layer(s)
            raise SolverError(str(e).replace("gptq:", f"gptq ({', '.join(names)}):", 1)) from None
        out, r = {}, 0
        for k, (n, w) in enumerate(zip(names, weights)):
            rows = slice(r, r + w.shape[0])
            part = {"damp": info["damp"], "loss": float(info["row_loss"][rows].sum())}
            if k == 0 and "refine" in info:  # the refinement's totals once per solve
                part["refine"] = info["refine"]
            out[n] = (qt.rows(rows), part)
            r += w.shape[0]
        return out

    def solver_refine(self) -> dict:
        return {"refine_sweeps": self.refine_sweeps, "refine_dampening": self.refine_dampening,
                "refine_scale_rounds": self.refine_scale_rounds}

    @staticmethod
    def record(state: dict, key: str, info: dict) -> None:
        """The solver's loss for the report, and the refinement's objective totals when it ran."""
        state["losses"][key] = info["loss"]
        if "refine" in info:
            state["refined"][0] += info["refine"]["objective_before"]
            state["refined"][1] += info["refine"]["objective_after"]
            state["refined"][2] += info["refine"].get("scales_changed", 0)

    def _method_info(self) -> dict:
        return {"method": "gptq"}

    def _report_extra(self, ctx) -> dict:
        losses = ctx.scratch[self._key()]["losses"]
        return {"observer": self.observer, "weighting": self.weighting, "act_order": self.act_order,
                "dampening": self.dampening, "block_size": self.block_size, "sequential": self.sequential,
                "gptq_loss_total": round(sum(losses.values()), 6), **self._refine_report(ctx)}

    def _refine_report(self, ctx) -> dict:
        if not self.refine_sweeps:
            return {}
        before, after, moved_scales = ctx.scratch[self._key()]["refined"]
        scales = {"refine_scale_rounds": self.refine_scale_rounds, "refine_scales_changed": moved_scales} \
            if self.refine_scale_rounds else {}
        return {"refine_sweeps": self.refine_sweeps, "refine_dampening": self.refine_dampening,
                "refine_objective_ratio": round(after / before, 6) if before else None, **scales}
