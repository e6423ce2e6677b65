"""`calibrate`: load the calibration buffer and record per-linear input statistics."""

from __future__ import annotations

from contextlib import nullcontext
from typing import ClassVar, Literal

import torch
from torch import nn

from quantkit.calib import load_calib_config
from quantkit.passes.base import Pass, register_pass
from quantkit.targets import is_linear


def forward_for_stats(model: nn.Module, batch: torch.Tensor) -> None:
    """A forward for input statistics only: logits for the last position alone.

    Full logits of a 4 x 512 batch with a 49k vocabulary are 400 MB of fp32 nobody reads.
    """
    try:
        model(input_ids=batch, use_cache=False, logits_to_keep=1)
    except TypeError:  # models whose forward has no logits_to_keep
        model(input_ids=batch, use_cache=False)


@register_pass
class Calibrate(Pass):
    """Calibration buffer + input amax (per tensor and per input column) of every linear.

    In the block loop the statistics of block i come from its calibration inputs, which are the
    outputs of blocks 0..i-1 already quantized (sequential calibration, as llm-compressor's
    sequential pipeline): static activation scales then match what the quantized model feeds.
    """

    name: ClassVar[str] = "calibrate"
    summary: ClassVar[str] = "load the calibration buffer; record each linear's input amax"
    # expert_stats: per-expert input amax of fused MoE experts (nn/expert_stats.py), gathered only
    # when a later pass asks for it (a static activation format on the experts); "auto" or not,
    # every expert's forward for statistics costs a block's MLP once per expert
    provides: ClassVar[frozenset[str]] = frozenset({"calib", "act_stats", "expert_stats"})
    execution: ClassVar[str] = "block"
    keeps_input_stats: ClassVar[bool] = True  # it only observes the linears' inputs

    # "auto": run the calibration forwards only when a later pass needs activation statistics
    collect_stats: bool | Literal["auto"] = "auto"
    # MoE: every calibration token also goes through every expert for statistics (the real routing
    # still decides what the next block sees), so rarely routed experts get input scales from data
    # (as llm-compressor's moe_calibrate_all_experts; nn/expert_stats.py, docs/architectures.md)
    moe_calibrate_all_experts: bool = True

    def provided_facts(self) -> frozenset[str]:
        return frozenset({"calib"}) if self.collect_stats is False else self.provides

    def _collect(self, ctx) -> bool:
        if self.collect_stats == "auto":
            return "act_stats" in ctx.needed
        return bool(self.collect_stats)

    def begin(self, ctx) -> None:
        cfg = ctx.calib_config
        given = getattr(ctx, "given_calib", None)  # a --loader's batches replace the recipe's calib data
        ctx.calib = given if given is not None else load_calib_config(ctx.tokenizer, cfg)
        ctx.batch_size = cfg.batch_size
        collect = self._collect(ctx)
        ctx.scratch[self.name] = {"collect": collect, "experts": collect and "expert_stats" in ctx.needed,
                                  "linears": 0}
        if ctx.scratch[self.name]["collect"]:
            ctx.stats.setdefault("act_amax", {})
            ctx.stats.setdefault("act_col_amax", {})

    def needs_inputs(self, ctx) -> bool:
        return ctx.scratch[self.name]["collect"]

    @torch.inference_mode()
    def run_block(self, blk, ctx) -> None:
        if not ctx.scratch[self.name]["collect"]:
            return
        col_amax: dict[str, torch.Tensor] = {}

        def hook(name):
            def fn(_module, args):
                x = args[0].detach()
                cols = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # [in]
                prev = col_amax.get(name)
                col_amax[name] = cols if prev is None else torch.maximum(prev, cols)

            return fn

        handles = [m.register_forward_pre_hook(hook(f"{blk.prefix}.{n}"))
                   for n, m in blk.module.named_modules() if is_linear(m)]
        from quantkit.nn.expert_stats import expert_statistics

        gather = ctx.scratch[self.name]["experts"]
        try:
            with (expert_statistics(blk.module, self.moe_calibrate_all_experts, blk.prefix) if gather
                  else nullcontext({})) as experts:
                blk.forward()
        finally:
            for h in handles:
                h.remove()
        for name, st in experts.items():  # issue 14: per-expert statistics and routed-token counts
            ctx.stats.setdefault("expert_stats", {})[name] = st
            ctx.report.setdefault("expert_tokens", {})[name] = st.tokens.tolist()
        for name, cols in col_amax.items():
            ctx.stats["act_amax"][name] = cols.max().reshape(1)
            ctx.stats["act_col_amax"][name] = cols
        ctx.scratch[self.name]["linears"] += len(col_amax)

    def finish(self, ctx) -> None:
        cfg = ctx.calib_config
        if not ctx.scratch[self.name]["collect"]:
            ctx.record(self.name, n_samples=cfg.n_samples, seq_len=cfg.seq_len, source=cfg.source,
                       statistics="skipped (no later pass needs them)")
            return
        experts = ctx.stats.get("expert_stats", {})
        moe = {"moe_calibrate_all_experts": self.moe_calibrate_all_experts, "experts_modules": len(experts),
               "experts_without_tokens": sum(int((s.tokens == 0).sum()) for s in experts.values())} if experts else {}
        ctx.record(self.name, n_samples=cfg.n_samples, seq_len=cfg.seq_len, source=cfg.source,
                   linears=ctx.scratch[self.name]["linears"], calibration="sequential", **moe)

    def work_units(self, ctx) -> int:
        return ctx.calib_config.n_samples
