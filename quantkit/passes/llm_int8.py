"""`llm_int8`: LLM.int8() — vector-wise int8 with 16-bit outlier feature columns.

dynamic (the paper, bitsandbytes): outlier columns are found in every forward from
``|X| >= threshold``; calibration, when present, is only used to report how many.
static: the columns whose calibration activations reach the threshold are fixed now, their
weights kept exactly in 16 bits; deterministic and exportable in quantkit's layout.
The report gives, per layer, the outlier column count and the share of multiply-adds done
in 8 bits (the paper: > 99.9% at scale).
"""

from __future__ import annotations

import math
from fnmatch import fnmatchcase
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from quantkit.export.quantkit_layout import set_module
from quantkit.nn.outlier_linear import DEFAULT_THRESHOLD, OutlierLinear
from quantkit.passes.base import Pass, register_pass
from quantkit.targets import Targets, as_linear, linear_weight

ALWAYS_SKIP = ("lm_head", "*.lm_head")  # bitsandbytes' default; the output head stays 16-bit


class _OutlierCounter:
    """Forward pre-hook state: union of outlier columns and per-forward counts."""

    def __init__(self, in_features: int, threshold: float, device: torch.device):
        self.threshold = threshold
        self.union = torch.zeros(in_features, dtype=torch.bool, device=device)
        self.per_forward: list[int] = []

    def __call__(self, _module: nn.Module, args: tuple) -> None:
        x = args[0].detach()
        hit = x.reshape(-1, x.shape[-1]).abs().amax(dim=0) >= self.threshold  # [in]
        self.union |= hit
        self.per_forward.append(int(hit.sum()))


@register_pass
class LlmInt8(Pass):
    """Replace target linears by OutlierLinear (int8 weights, outlier columns in 16 bits)."""

    name: ClassVar[str] = "llm_int8"
    summary: ClassVar[str] = "LLM.int8(): vector-wise int8 + 16-bit outlier columns (dynamic or static)"
    provides: ClassVar[frozenset[str]] = frozenset({"quantized"})
    execution: ClassVar[str] = "block"
    output_layout: ClassVar[str | None] = "quantkit"

    threshold: float = Field(DEFAULT_THRESHOLD, ge=0)  # .inf = no decomposition (bnb's threshold 0)
    outliers: Literal["dynamic", "static"] = "dynamic"
    skip_modules: list[str] = []  # globs; lm_head is always skipped
    targets: Targets = Targets()
    bnb_compat: bool = False  # bitsandbytes' row scale: zero outlier elements, not columns

    def requirements(self) -> frozenset[str]:
        return frozenset({"calib"}) if self.outliers == "static" else self.requires

    def select(self, model: nn.Module, ctx) -> list[str]:
        skip = (*ALWAYS_SKIP, *self.skip_modules)
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        names = []
        for name in self.targets.select(model, ctx.arch):
            module = model.get_submodule(name)
            if module is head or any(fnmatchcase(name, p) for p in skip):
                continue
            names.append(name)
        return names

    def begin(self, ctx) -> None:
        _refuse_experts(self, ctx)
        measure = ctx.calib is not None and not math.isinf(self.threshold)
        ctx.scratch[self.name] = {"names": self.select(ctx.model, ctx), "measure": measure, "layers": {},
                                  "macs_total": 0.0, "macs_16bit": 0.0}

    def needs_inputs(self, ctx) -> bool:
        return ctx.scratch[self.name]["measure"]

    @torch.inference_mode()
    def _count_outliers(self, blk, names: list[str]) -> dict[str, _OutlierCounter]:
        counters, handles = {}, []
        for name in names:
            module = blk.model.get_submodule(name)
            in_features = linear_weight(module).shape[1]
            counters[name] = _OutlierCounter(in_features, self.threshold, module.weight.device)
            handles.append(module.register_forward_pre_hook(counters[name]))
        try:
            blk.forward()
        finally:
            for h in handles:
                h.remove()
        return counters

    def run_block(self, blk, ctx) -> None:
        state = ctx.scratch[self.name]
        names = blk.select(state["names"])
        counters = self._count_outliers(blk, names) if state["measure"] and names else {}
        self._replace(blk.model, ctx, names, counters)

    def run_rest(self, model: nn.Module, ctx) -> None:
        prefix = ctx.arch.layers_path + "."
        self._replace(model, ctx, [n for n in ctx.scratch[self.name]["names"] if not n.startswith(prefix)], {})

    def _replace(self, model: nn.Module, ctx, names: list[str], counters: dict) -> None:
        state = ctx.scratch[self.name]
        for name in names:
            linear = as_linear(model.get_submodule(name))  # GPT-2 Conv1D: the same weight as [out, in]
            counter = counters.get(name)
            idx = None
            if self.outliers == "static":
                idx = counter.union.nonzero().flatten().cpu() if counter else torch.zeros(0, dtype=torch.int64)
            q = OutlierLinear.from_linear(
                linear, threshold=self.threshold, outliers=self.outliers, outlier_idx=idx, bnb_compat=self.bnb_compat
            )
            set_module(model, name, q)
            row = self._layer_row(q, counter)
            state["layers"][name] = row
            if row["outlier_cols"] is not None:
                state["macs_total"] += q.in_features * q.out_features
                state["macs_16bit"] += row["outlier_cols"] * q.out_features
            ctx.quantized[name] = {
                "method": "llm_int8",
                "threshold": self.threshold,
                "outliers": self.outliers,
                "outlier_cols": row["outlier_cols"],
            }

    def finish(self, ctx) -> None:
        state = ctx.scratch[self.name]
        ctx.record(
            self.name,
            threshold=self.threshold,
            outliers=self.outliers,
            bnb_compat=self.bnb_compat,
            modules=len(state["layers"]),
            # dynamic counts are per calibration forward of batch_size x seq_len tokens
            int8_share=None if state["macs_total"] == 0 else 1.0 - state["macs_16bit"] / state["macs_total"],
            layers=state["layers"],
        )

    def _layer_row(self, q: OutlierLinear, counter: _OutlierCounter | None) -> dict:
        if math.isinf(self.threshold):
            return {"outlier_cols": 0, "outlier_cols_max": 0, "int8_share": 1.0}
        if counter is None:  # dynamic without calibration: nothing measured
            return {"outlier_cols": None, "outlier_cols_max": None, "int8_share": None}
        if self.outliers == "static":
            k = int(q.outlier_idx.numel())
            return {"outlier_cols": k, "outlier_cols_max": k, "int8_share": 1.0 - k / q.in_features}
        counts = counter.per_forward or [0]
        mean = sum(counts) / len(counts)
        return {
            "outlier_cols": mean,
            "outlier_cols_max": max(counts),
            "outlier_cols_union": int(counter.union.sum()),  # what static mode would fix
            "int8_share": 1.0 - mean / q.in_features,
        }

    def work_units(self, ctx) -> int:
        return 0


def _refuse_experts(p: LlmInt8, ctx) -> None:
    """Fused MoE experts are refused rather than silently left in 16 bits (docs/architectures.md).

    LLM.int8's decomposition finds outlier feature columns in each matmul's input over the whole
    batch and runs those columns in 16 bits. Inside a fused experts module there is no such
    matmul: each expert multiplies its own routed subset of tokens in a grouped kernel, so the
    outlier set would differ per expert and per batch, and neither bitsandbytes nor any serving
    engine implements that decomposition for grouped experts (bitsandbytes replaces nn.Linear only).
    """
    from quantkit.errors import RecipeError
    from quantkit.nn.qexperts import select_experts

    experts = select_experts(p.targets, ctx.model, ctx.arch)
    if experts:
        more = f" and {len(experts) - 1} more" if len(experts) > 1 else ""
        raise RecipeError(f"llm_int8 cannot decompose fused MoE experts ({experts[0]}{more}): use an int8 "
                          "recipe such as int8-w8a16 for MoE models, or leave the experts in 16 bits with "
                          "`targets: {exclude: ['*.experts']}` on this pass")
