"""`calibrate`: load the calibration buffer and record per-linear input statistics."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from torch import nn

from quantkit.calib import load_calib_config
from quantkit.passes.base import Pass, register_pass


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
    """Calibration buffer + input amax (per tensor and per input column) of every linear."""

    name: ClassVar[str] = "calibrate"
    summary: ClassVar[str] = "load the calibration buffer; record each linear's input amax"
    provides: ClassVar[frozenset[str]] = frozenset({"calib", "act_stats"})

    # "auto": run the calibration forwards only when a later pass needs activation statistics
    collect_stats: bool | Literal["auto"] = "auto"

    def _collect(self, ctx) -> bool:
        if self.collect_stats == "auto":
            return "act_stats" in ctx.needed
        return bool(self.collect_stats)

    @torch.inference_mode()
    def run(self, model: nn.Module, ctx) -> None:
        cfg = ctx.calib_config
        ctx.calib = load_calib_config(ctx.tokenizer, cfg)
        ctx.batch_size = cfg.batch_size
        if not self._collect(ctx):
            ctx.record(self.name, n_samples=cfg.n_samples, seq_len=cfg.seq_len, source=cfg.source,
                       statistics="skipped (no later pass needs them)")
            return
        amax: dict[str, torch.Tensor] = {}
        col_amax: dict[str, torch.Tensor] = {}

        def hook(name):
            def fn(_module, args):
                x = args[0].detach()
                cols = x.reshape(-1, x.shape[-1]).abs().amax(dim=0).float()  # [in]
                prev = col_amax.get(name)
                col_amax[name] = cols if prev is None else torch.maximum(prev, cols)

            return fn

        handles = [m.register_forward_pre_hook(hook(n)) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        try:
            for batch in ctx.calib_batches():
                forward_for_stats(model, batch)
                if ctx.progress:
                    ctx.progress(batch.shape[0])
        finally:
            for h in handles:
                h.remove()
        for name, cols in col_amax.items():
            amax[name] = cols.max().reshape(1)
        ctx.stats["act_amax"] = amax
        ctx.stats["act_col_amax"] = col_amax
        ctx.record(self.name, n_samples=cfg.n_samples, seq_len=cfg.seq_len, source=cfg.source, linears=len(amax))

    def work_units(self, ctx) -> int:
        return ctx.calib_config.n_samples if self._collect(ctx) else 0
