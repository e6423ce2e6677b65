"""`quantize`: replace target linears by QLinear (fake or real) in one format."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import field_validator
from torch import nn

from quantkit.formats import FORMATS, get_format
from quantkit.nn.qlinear import QLinear, quantize_linear
from quantkit.passes.base import Pass, register_pass
from quantkit.targets import Targets, linear_weight, set_module  # noqa: F401  (re-exported)


@register_pass
class Quantize(Pass):
    """Weights (and optionally activations) to a number format, round-to-nearest or MSE search."""

    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "quantize target linears to a format (fake or real)"
    provides: ClassVar[frozenset[str]] = frozenset({"quantized"})

    format: str
    act_format: str | None = None
    mode: Literal["fake", "real"] = "real"
    observer: Literal["minmax", "mse"] = "minmax"
    targets: Targets = Targets()

    @field_validator("format", "act_format")
    @classmethod
    def _known_format(cls, v: str | None) -> str | None:
        if v is not None and v not in FORMATS:
            raise ValueError(f"unknown format {v!r}; known: {', '.join(FORMATS)}")
        return v

    def requirements(self) -> frozenset[str]:
        needs = set(self.requires)
        if self.act_format is not None and get_format(self.act_format).activation_global_scale(torch.ones(1)) is not None:
            needs.add("act_stats")  # static activation global scale comes from calibration
        return frozenset(needs)

    def _global_scales(self, model: nn.Module, ctx, names: list[str]) -> dict[str, torch.Tensor]:
        """Per-module weight global scale; fused groups (q/k/v, gate/up) share the minimum."""
        fmt = get_format(self.format)
        scales = {}
        for n in names:
            gs = fmt.weight_global_scale(linear_weight(model.get_submodule(n)).detach())
            if gs is not None:
                scales[n] = gs
        if not scales:
            return scales
        chosen = set(names)
        for layer in range(ctx.arch.num_layers):
            for group in ctx.arch.fused_groups(layer):
                if all(g in chosen for g in group):
                    shared = torch.stack([scales[g] for g in group]).amin(dim=0)
                    for g in group:
                        scales[g] = shared
        return scales

    def run(self, model: nn.Module, ctx) -> None:
        names = self.targets.select(model, ctx.arch)
        gscales = self._global_scales(model, ctx, names)
        act_fmt = None if self.act_format is None else get_format(self.act_format)
        amax = ctx.stats.get("act_amax", {})
        bytes_before = bytes_after = 0
        for name in names:
            linear = model.get_submodule(name)
            if isinstance(linear, QLinear):
                continue
            igs = None
            if act_fmt is not None and name in amax:
                igs = act_fmt.activation_global_scale(amax[name].to(linear.weight.dtype))
            if self.observer == "mse":
                from quantkit.formats.search import mse_quantize

                qw = mse_quantize(get_format(self.format), linear_weight(linear).detach().contiguous(),
                                  global_scale=gscales.get(name))
                q = QLinear(qw, linear.bias, mode=self.mode, act_format=self.act_format, input_global_scale=igs,
                            compute_dtype=linear.weight.dtype)
            else:
                q = quantize_linear(linear, self.format, mode=self.mode, act_format=self.act_format,
                                    global_scale=gscales.get(name), input_global_scale=igs)
            bytes_before += linear.weight.numel() * linear.weight.element_size()
            bytes_after += q.qweight.nbytes
            set_module(model, name, q)
            ctx.quantized[name] = {"format": self.format, "act_format": self.act_format, "mode": self.mode}
            if ctx.progress:
                ctx.progress(1)
        ctx.record(
            self.name,
            format=self.format,
            act_format=self.act_format,
            mode=self.mode,
            modules=len(names),
            weight_bytes_before=bytes_before,
            weight_bytes_after=bytes_after,
        )

    def work_units(self, ctx) -> int:
        return len(self.targets.select(ctx.model, ctx.arch))
