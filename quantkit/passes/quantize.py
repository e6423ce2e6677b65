"""`quantize`: replace target linears by QLinear (fake or real) in one format."""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import field_validator, model_validator
from torch import nn

from quantkit.formats import FORMATS, get_format
from quantkit.nn.qlinear import QLinear, inherit_rotation, quantize_linear
from quantkit.passes.base import Pass, register_pass
from quantkit.targets import Conv1D, Targets, linear_weight, set_module  # noqa: F401  (re-exported)


@torch.inference_mode()
def _relative_error(linear: nn.Module, q: QLinear) -> float:
    """||W - deq(Q(W))||_F / ||W||_F in fp32, while both are in memory (report.html's chart)."""
    w = linear_weight(linear).float()
    norm = w.norm()
    return float((w - q.dequantized_weight(torch.float32)).norm() / norm) if norm > 0 else 0.0


def known_format(v: str | None) -> str | None:
    """A pass field's format name, checked against the registry (a pydantic validator's body)."""
    if v is not None and v not in FORMATS:
        raise ValueError(f"unknown format {v!r}; known: {', '.join(FORMATS)}")
    return v


def build_qlinear(linear: nn.Module, qweight, *, mode: str, act_format: str | None,
                  input_global_scale: torch.Tensor | None) -> QLinear:
    """The one way a pass turns a linear (nn.Linear or GPT-2 Conv1D) and its [out, in] codes into a QLinear."""
    if Conv1D and isinstance(linear, Conv1D):
        qweight.meta["conv1d"] = True  # weight stored [in, out]: the writer and runtime must know
    q = QLinear(qweight, linear.bias, mode=mode, act_format=act_format, input_global_scale=input_global_scale,
                compute_dtype=linear.weight.dtype)
    return inherit_rotation(q, linear)  # the rotate pass's online transform


@register_pass
class Quantize(Pass):
    """Weights (and optionally activations) to a number format, round-to-nearest or MSE search."""

    name: ClassVar[str] = "quantize"
    summary: ClassVar[str] = "quantize target linears to a format (fake or real)"
    provides: ClassVar[frozenset[str]] = frozenset({"quantized"})
    execution: ClassVar[str] = "block"
    output_layout: ClassVar[str | None] = "compressed-tensors"

    format: str
    act_format: str | None = None
    mode: Literal["fake", "real"] = "real"
    observer: str = "minmax"  # a name in quantkit.formats.observers.OBSERVERS
    # the observer's error weighted by this block's calibration inputs: "channel" E[x^2] per input
    # channel, "hessian" the 16x16 (NVFP4) / 32x32 (MXFP4) diagonal blocks of X^T X (passes/input_stats.py)
    weighting: Literal["none", "channel", "hessian"] = "none"
    targets: Targets = Targets()

    @field_validator("observer")
    @classmethod
    def _known_observer(cls, v: str) -> str:
        from quantkit.formats.observers import OBSERVERS

        if v not in OBSERVERS:
            raise ValueError(f"unknown observer {v!r}; known: {', '.join(OBSERVERS)}")
        return v

    @model_validator(mode="after")
    def _weighting_needs_a_search(self):
        if self.weighting != "none" and self.observer == "minmax":
            raise ValueError(f"weighting {self.weighting!r} needs a searching observer (minmax has nothing to weigh)")
        if self.weighting == "hessian" and self.observer == "mse":
            raise ValueError("observer mse weighs per channel only: use weighting 'channel', or observer e4m3_local/mx_exp")
        return self

    @field_validator("format", "act_format")
    @classmethod
    def _known_format(cls, v: str | None) -> str | None:
        return known_format(v)

    def requirements(self) -> frozenset[str]:
        needs = set(self.requires)
        if self.weighting != "none":
            needs.add("calib")  # the weighting comes from the blocks' calibration inputs
        if self.act_format is not None and get_format(self.act_format).activation_global_scale(torch.ones(1)) is not None:
            needs.add("act_stats")  # static activation global scale comes from calibration
            if not self.targets.roles or "experts" in self.targets.roles:
                needs.add("expert_stats")  # and, for fused MoE experts, one per expert (nn/expert_stats.py)
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

    # -- the block loop ---------------------------------------------------------------------------
    def begin(self, ctx) -> None:
        ctx.scratch[self._key()] = {"names": self.targets.select(ctx.model, ctx.arch), "modules": 0,
                                    "bytes_before": 0, "bytes_after": 0}
        ctx.scratch[self._key()]["experts"] = _experts_in(self, ctx)  # issue 14: fused MoE experts

    def _key(self) -> str:
        return f"{self.name}:{id(self)}"

    def needs_inputs(self, ctx) -> bool:
        return self.weighting != "none"

    def run_block(self, blk, ctx) -> None:
        names = blk.select(ctx.scratch[self._key()]["names"])
        if self.weighting != "none" and names:
            from quantkit.passes.input_stats import input_second_moments

            todo = [n for n in names if not isinstance(blk.model.get_submodule(n), QLinear)]
            if todo:  # a block forward only when some linear still needs its statistics
                ctx.scratch[self._key()]["importance"] = input_second_moments(blk, todo, self.weighting)
        self._quantize_names(blk.model, ctx, names)
        ctx.scratch[self._key()].pop("importance", None)
        _quantize_block_experts(self, blk, ctx)  # issue 14: fused MoE experts

    def run_rest(self, model: nn.Module, ctx) -> None:
        prefix = ctx.arch.layers_path + "."
        rest = [n for n in ctx.scratch[self._key()]["names"] if not n.startswith(prefix)]
        if rest and self.weighting != "none":  # no block inputs reach e.g. lm_head: say so rather than guess
            ctx.scratch[self._key()]["unweighted"] = rest
        if untie_quantized_head(model, rest):
            ctx.scratch[self._key()]["untied"] = True
        self._quantize_names(model, ctx, rest)

    def _quantize_names(self, model: nn.Module, ctx, names: list[str]) -> None:
        if not names:
            return
        state = ctx.scratch[self._key()]
        gscales = self._global_scales(model, ctx, names)
        act_fmt = None if self.act_format is None else get_format(self.act_format)
        amax = ctx.stats.get("act_amax", {})
        for name in names:
            linear = model.get_submodule(name)
            if isinstance(linear, QLinear):
                continue
            igs = None
            if act_fmt is not None and name in amax:
                igs = act_fmt.activation_global_scale(amax[name].to(linear.weight.dtype))
            q = self._quantized(linear, name, gscales, igs, ctx)
            state["bytes_before"] += linear.weight.numel() * linear.weight.element_size()
            state["bytes_after"] += q.qweight.nbytes
            state["modules"] += 1
            ctx.report.setdefault("layer_weight_error", {})[name] = _relative_error(linear, q)
            set_module(model, name, q)
            ctx.quantized[name] = {"format": self.format, "act_format": self.act_format, "mode": self.mode,
                                   **self._method_info()}

    def _method_info(self) -> dict:
        return {}

    def _quantized(self, linear: nn.Module, name: str, gscales: dict, igs, ctx) -> QLinear:
        if self.observer != "minmax":
            from quantkit.formats.observers import OBSERVERS

            importance = ctx.scratch[self._key()].get("importance", {}).get(name)
            qw = OBSERVERS.get(self.observer)(get_format(self.format), linear_weight(linear).detach().contiguous(),
                                              gscales.get(name), importance)
            return build_qlinear(linear, qw, mode=self.mode, act_format=self.act_format, input_global_scale=igs)
        return quantize_linear(linear, self.format, mode=self.mode, act_format=self.act_format,
                               global_scale=gscales.get(name), input_global_scale=igs)

    def finish(self, ctx) -> None:
        state = ctx.scratch[self._key()]
        ctx.record(
            self.name,
            format=self.format,
            act_format=self.act_format,
            mode=self.mode,
            modules=state["modules"],
            weight_bytes_before=state["bytes_before"],
            weight_bytes_after=state["bytes_after"],
            **({"untied_word_embeddings": True} if state.get("untied") else {}),
            **self._report_extra(ctx),
        )

    def _report_extra(self, ctx) -> dict:
        if self.observer == "minmax":
            return {}
        extra = {"observer": self.observer, "weighting": self.weighting}
        if ctx.scratch[self._key()].get("unweighted"):
            extra["unweighted_outside_blocks"] = ctx.scratch[self._key()]["unweighted"]
        return extra

    def work_units(self, ctx) -> int:
        return 0


def untie_quantized_head(model: nn.Module, names: list[str]) -> bool:
    """A tied model whose output head is among `names`: mark it untied; -> whether it was tied.

    The head gets its own codes while the input embeddings stay full precision, so the two are
    different tensors: the saved config must say tie_word_embeddings false and the checkpoint holds
    both (what llm-compressor writes, and what vLLM and transformers load). A config left tied would
    make engines drop the quantized head or load the embeddings in its place.
    """
    config = getattr(model, "config", None)
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    if not getattr(text, "tie_word_embeddings", False) or not hasattr(model, "get_output_embeddings"):
        return False
    head = model.get_output_embeddings()
    if head is None or not any(model.get_submodule(n) is head for n in names):
        return False
    for c in {id(config): config, id(text): text}.values():
        c.tie_word_embeddings = False
    return True


# -- fused MoE experts (issue 14; nn/qexperts.py, nn/expert_stats.py) ---------------------------------
def _experts_in(p: Quantize, ctx) -> list[str]:
    from quantkit.nn.qexperts import select_experts

    return select_experts(p.targets, ctx.model, ctx.arch)


def _quantize_block_experts(p: Quantize, blk, ctx) -> None:
    """Quantize the block's fused experts per expert; with a static activation format, per-expert
    input scales come from this block's calibration inputs sent through every expert."""
    from quantkit.nn.expert_stats import expert_statistics, input_global_scales
    from quantkit.nn.qexperts import quantize_named_experts

    state = ctx.scratch[p._key()]
    names = blk.select(state.get("experts", []))
    if not names:
        return
    scales = None
    static = p.act_format is not None and get_format(p.act_format).activation_global_scale(torch.ones(1)) is not None
    found = ctx.stats.get("expert_stats", {})  # the calibrate pass's, from this block's same inputs
    if static and blk.hidden is not None and not all(n in found for n in names):
        with expert_statistics(blk.module, prefix=blk.prefix) as found:
            blk.forward()
    if static and all(n in found for n in names):
        scales = {n: input_global_scales(found[n], blk.model.get_submodule(n), p.act_format, n) for n in names}
        for n in names:  # tokens the real routing sent to each expert, for the report
            ctx.report.setdefault("expert_tokens", {})[n] = found[n].tokens.tolist()
    before, after = quantize_named_experts(blk.model, names, p.format, p.mode, p.act_format, p.observer, scales,
                                           model_type=ctx.arch.model_type)
    state["bytes_before"] += before
    state["bytes_after"] += after
    state["modules"] += len(names)
    for n in names:
        ctx.quantized[n] = {"format": p.format, "act_format": p.act_format, "mode": p.mode, "experts": True}

