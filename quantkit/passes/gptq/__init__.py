"""`gptq` pass: GPTQ weight quantization from calibration inputs, in the shared block loop.

The column-loop math lives in solver.py."""

from __future__ import annotations

from typing import ClassVar

import torch
from pydantic import Field
from torch import nn

from quantkit.formats import get_format
from quantkit.nn.qlinear import QLinear
from quantkit.passes.base import register_pass
from quantkit.passes.gptq.solver import _Stop, gptq_quantize
from quantkit.passes.quantize import Quantize, set_module


def capture_layer_inputs(model: nn.Module, layer0: nn.Module, batches) -> list[tuple[tuple, dict]]:
    """(args, kwargs) of the first decoder layer for each calibration batch."""
    store: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        store.append((args, kwargs))
        raise _Stop

    handle = layer0.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for ids in batches:
                try:
                    model(input_ids=ids, use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return store


def _layer_forward(layer: nn.Module, inputs: list[tuple[tuple, dict]]) -> list[tuple[tuple, dict]]:
    outs = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = layer(*args, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            outs.append(((y, *args[1:]), kwargs))
    return outs


@register_pass
class Gptq(Quantize):
    """GPTQ: error-compensating weight quantization from calibration inputs.

    Same fields as `quantize` (format, act_format, mode, observer, targets), plus the GPTQ knobs.
    """

    name: ClassVar[str] = "gptq"
    summary: ClassVar[str] = "GPTQ weight quantization (any format), layer by layer from calibration inputs"
    requires: ClassVar[frozenset[str]] = frozenset({"calib"})
    provides: ClassVar[frozenset[str]] = frozenset({"quantized"})

    block_size: int = Field(128, gt=0)  # columns updated together (lazy batch updates); rounded to whole blocks
    dampening: float = Field(0.01, ge=0)  # fraction of mean(diag H) added to the diagonal

    def requirements(self) -> frozenset[str]:
        return self.requires | super().requirements()

    def run(self, model: nn.Module, ctx) -> None:
        arch, fmt = ctx.arch, get_format(self.format)
        names = set(self.targets.select(model, arch))
        gscales = Quantize(format=self.format, targets=self.targets)._global_scales(model, ctx, sorted(names))
        act_fmt = None if self.act_format is None else get_format(self.act_format)
        amax = ctx.stats.get("act_amax", {})
        layers = arch.layers(model)
        inputs = capture_layer_inputs(model, layers[0], ctx.calib_batches())
        losses: dict[str, float] = {}
        for idx, layer in enumerate(layers):
            prefix = f"{arch.layers_path}.{idx}."
            mine = [n for n in names if n.startswith(prefix)]
            if mine:
                hessians = self._hessians(model, layer, mine, inputs)
                for name in sorted(mine):
                    linear = model.get_submodule(name)
                    qt, info = gptq_quantize(fmt, linear.weight.detach(), hessians.pop(name), gscales.get(name),
                                             block_size=self.block_size, dampening=self.dampening, observer=self.observer)
                    igs = None
                    if act_fmt is not None and name in amax:
                        igs = act_fmt.activation_global_scale(amax[name].to(linear.weight.dtype))
                    set_module(model, name, QLinear(qt, linear.bias, mode=self.mode, act_format=self.act_format,
                                                    input_global_scale=igs, compute_dtype=linear.weight.dtype))
                    ctx.quantized[name] = {"format": self.format, "act_format": self.act_format, "mode": self.mode,
                                           "method": "gptq"}
                    losses[name] = info["loss"]
                    if getattr(ctx, "progress", None):
                        ctx.progress(1)
            inputs = _layer_forward(layer, inputs)
        ctx.record(self.name, format=self.format, act_format=self.act_format, mode=self.mode, modules=len(losses),
                   observer=self.observer, dampening=self.dampening, block_size=self.block_size,
                   gptq_loss_total=round(sum(losses.values()), 6))

    @staticmethod
    def _hessians(model: nn.Module, layer: nn.Module, names: list[str], inputs) -> dict[str, torch.Tensor]:
        """H = sum over calibration tokens of x x^T for each named linear's input, fp32."""
        hs: dict[str, torch.Tensor] = {}
        hooks = []
        for name in names:
            def hook(_mod, args, name=name):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
                h = x.T @ x
                hs[name] = h if name not in hs else hs[name] + h
            hooks.append(model.get_submodule(name).register_forward_pre_hook(hook))
        try:
            _layer_forward(layer, inputs)
        finally:
            for hk in hooks:
                hk.remove()
        return hs

    def work_units(self, ctx) -> int:
        return len(self.targets.select(ctx.model, ctx.arch))
