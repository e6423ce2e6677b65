"""QExperts: a fused MoE experts module whose 3-D weights are per-expert QTensors.

transformers 5 keeps Mixtral/Qwen2-MoE experts as parameters [E, out, in] (`gate_up_proj`,
`down_proj`) inside one module whose forward does the routing loop. QExperts keeps that module
(`inner`) and swaps its parameters for dequantized tensors, so routing, activation and the
experts implementation transformers picked stay exactly the original's:

- mode "fake": the dequantized weights are cached as non-persistent buffers of `inner`.
- mode "real": only codes and scales are held; each forward dequantizes all experts into a
  temporary [E, out, in] (one layer's experts dense for the duration of the call).
With an activation format, the forward is the eager per-expert loop (the same computation as
transformers' eager experts) with each expert's inputs quantize-dequantized first.

Every expert is quantized on its own: block scales never cross experts, and each expert has its
own NVFP4 global scale. A packed gate_up matrix is quantized as one matrix, so gate and up share
their expert's global scale, as vLLM requires of fused layers; separate gate and up parameters
get the minimum of the two.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.errors import FormatError
from quantkit.formats import get_format
from quantkit.formats.base import QTensor
from quantkit.structure.experts import ExpertsInfo, is_fused_experts, module_layout


def is_experts(module: nn.Module) -> bool:
    """A fused-experts module still holding its float 3-D weights."""
    return not isinstance(module, QExperts) and is_fused_experts(module)


class QExperts(nn.Module):
    def __init__(self, inner: nn.Module, layout: ExpertsInfo, qweights: dict[str, list[QTensor]], *,
                 mode: str, act_format: str | None, input_global_scales: dict[str, torch.Tensor] | None,
                 compute_dtype: torch.dtype, model_type: str = ""):
        super().__init__()
        self.layout = layout
        self.model_type = model_type  # the checkpoint writer names per-expert tensors after it
        self.mode = mode
        self.act_format = act_format
        self.compute_dtype = compute_dtype
        self.weight_format = next(iter(qweights.values()))[0].format
        self.qmeta = {p: dict(q[0].meta) for p, q in qweights.items()}
        self.shapes = {p: tuple(q[0].shape) for p, q in qweights.items()}  # one expert's [out, in]
        for param, qs in qweights.items():
            # stacked over experts: codes [E, ...], scale [E, ...], global scale [E, 1] (NVFP4)
            self.register_buffer(f"{param}_codes", torch.stack([q.codes for q in qs]))
            self.register_buffer(f"{param}_scale", torch.stack([q.scale for q in qs]))
            gs = None if qs[0].global_scale is None else torch.stack([q.global_scale.reshape(1) for q in qs])
            self.register_buffer(f"{param}_global_scale", gs)
            igs = None if input_global_scales is None else input_global_scales.get(param)
            self.register_buffer(f"{param}_input_global_scale", igs)  # [E] static activation scale or None
            del inner._parameters[param]
        self.inner = inner
        if mode == "fake":
            self._install(self._dense_weights(compute_dtype), persistent_cache=True)

    # --- structure discovery reads these instead of 3-D parameters ---------------------------
    @property
    def expert_shapes(self) -> dict[str, tuple[int, ...]]:
        """[E, out, in] (or [E, in, out] when the layout is transposed) of each fused weight."""
        e = self.layout.num_experts
        return {p: (e, *(s[::-1] if self.layout.transposed else s)) for p, s in self.shapes.items()}

    def qweights(self, param: str) -> list[QTensor]:
        """One QTensor per expert, [out, in], exactly as quantized."""
        gs = getattr(self, f"{param}_global_scale")
        return [
            QTensor(self.weight_format, getattr(self, f"{param}_codes")[e], getattr(self, f"{param}_scale")[e],
                    self.shapes[param], None if gs is None else gs[e], dict(self.qmeta[param]))
            for e in range(self.layout.num_experts)
        ]

    def dequantized(self, param: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[E, out, in] (transposed layouts: [E, in, out], as the original parameter)."""
        fmt = get_format(self.weight_format)
        w = torch.stack([fmt.dequantize(q, dtype) for q in self.qweights(param)])
        return w.transpose(1, 2) if self.layout.transposed else w

    def _dense_weights(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return {p: self.dequantized(p, dtype) for p in self.shapes}

    def _install(self, weights: dict[str, torch.Tensor], persistent_cache: bool = False) -> None:
        for param, w in weights.items():
            if persistent_cache:
                self.inner.register_buffer(param, w, persistent=False)
            else:
                setattr(self.inner, param, w)

    def _apply(self, fn, recurse=True):
        # like QLinear: a dtype change rebuilds the fake cache from the codes instead of casting it
        super()._apply(fn, recurse)
        if self.mode == "fake":
            any_code = getattr(self, f"{next(iter(self.shapes))}_codes")
            probe = fn(torch.zeros(1, dtype=self.compute_dtype, device=any_code.device))
            self.compute_dtype = probe.dtype
            self._install({p: w.to(probe.device) for p, w in self._dense_weights(probe.dtype).items()}, True)
        return self

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):
        """The original experts forward, whatever its signature; with an activation format, the
        routed (hidden_states, top_k_index, top_k_weights) one."""
        real = self.mode == "real"
        if real:
            self._install(self._dense_weights(hidden_states.dtype))
        try:
            if self.act_format is None:
                return self.inner(hidden_states, *args, **kwargs)
            if len(args) != 2:
                raise FormatError(f"activation quantization of {type(self.inner).__name__} needs its routed "
                                  "(hidden_states, top_k_index, top_k_weights) forward")
            return self._eager_with_activations(hidden_states, *args)
        finally:
            if real:
                for param in self.shapes:
                    delattr(self.inner, param)

    def _weight(self, role: str, e: int) -> torch.Tensor:
        w = getattr(self.inner, self.layout.params[role])[e]
        return w.t() if self.layout.transposed else w  # [out, in]

    def _eager_with_activations(self, x, top_k_index, top_k_weights):
        """transformers' eager experts loop, each expert's inputs quantize-dequantized first."""
        fmt = get_format(self.act_format)
        roles = self.layout.params
        first = "gate_up" if "gate_up" in roles else "up"
        out = torch.zeros_like(x)
        for e in range(self.layout.num_experts):
            # [n] top-k slot and row of each token routed to e, in transformers' order (slot-major), so
            # the matmuls see the same rows in the same order and agree bit for bit
            pos, tok = torch.where(top_k_index.t() == e)
            if tok.numel() == 0:
                continue
            h = fmt.fake_activation(x[tok], self._input_scale(roles[first], e))
            y = F.linear(h, self._weight(first, e))
            if first == "gate_up":
                gate, up = y.chunk(2, dim=-1)
            else:
                up = y
                gate = F.linear(h, self._weight("gate", e)) if "gate" in roles else None
            y = up if gate is None else self.inner.act_fn(gate) * up
            y = F.linear(fmt.fake_activation(y, self._input_scale(roles["down"], e)), self._weight("down", e))
            out.index_add_(0, tok, (y * top_k_weights[tok, pos, None]).to(out.dtype))
        return out

    def _input_scale(self, param: str, e: int) -> torch.Tensor | None:
        igs = getattr(self, f"{param}_input_global_scale")
        return None if igs is None else igs[e]

    def extra_repr(self) -> str:
        return (f"experts={self.layout.num_experts}, weights={sorted(self.shapes)}, format={self.weight_format}, "
                f"act={self.act_format}, mode={self.mode}")


def _quantize_one(fmt, w: torch.Tensor, observer: str, global_scale: torch.Tensor | None) -> QTensor:
    if observer == "minmax":
        return fmt.quantize(w, global_scale=global_scale)
    from quantkit.formats.observers import OBSERVERS  # the same registry the quantize pass uses

    return OBSERVERS.get(observer)(fmt, w, global_scale)


@torch.no_grad()
def quantize_experts(module: nn.Module, fmt_name: str, mode: str = "real", act_format: str | None = None, *,
                     input_global_scales: dict[str, torch.Tensor] | None = None, observer: str = "minmax",
                     hidden_size: int | None = None, model_type: str = "", solver=None) -> QExperts:
    """Replace a fused-experts module by a QExperts (the caller puts it at the module's path).

    input_global_scales: parameter name -> [E] static activation global scales (NVFP4 W4A4), if
    calibrated; without them activations use dynamic per-tensor scales.
    solver: (parameter name, expert, weight [out, in], global scale or None) -> QTensor, to
    quantize each expert's matrix another way than round-to-nearest (gptq); None: the observer.
    """
    if not is_experts(module):
        raise FormatError(f"{type(module).__name__} is not a fused-experts module (no 3-D expert weights)")
    if any(p.dim() != 3 for p in module.parameters(recurse=False)):
        names = [n for n, p in module.named_parameters(recurse=False) if p.dim() != 3]
        raise FormatError(f"experts with bias parameters ({', '.join(names)}) are not supported yet")
    layout = _layout_of(module, hidden_size)
    fmt = get_format(fmt_name)
    dtype = next(module.parameters()).dtype
    qweights = _expert_qweights(module, layout, fmt, observer, solver)
    return QExperts(module, layout, qweights, mode=mode, act_format=act_format,
                    input_global_scales=input_global_scales, compute_dtype=dtype, model_type=model_type)


def _layout_of(module: nn.Module, hidden_size: int | None = None) -> ExpertsInfo:
    layout = module_layout(module, "", hidden_size)
    if not layout.params:
        raise FormatError(f"cannot tell the input and output projections of {type(module).__name__}")
    return layout


def _expert_qweights(module: nn.Module, layout: ExpertsInfo, fmt, observer: str, solver) -> dict[str, list[QTensor]]:
    """Parameter name -> one QTensor [out, in] per expert; separate gate/up share a global scale per expert."""

    def matrices(param: str) -> torch.Tensor:  # [E, out, in]
        w = getattr(module, param).detach()
        return (w.transpose(1, 2) if layout.transposed else w).contiguous()

    shared: dict[str, torch.Tensor | None] = {p: None for p in layout.params.values()}
    if "gate" in layout.params and "up" in layout.params:  # separate gate/up: one global scale per expert
        g, u = matrices(layout.params["gate"]), matrices(layout.params["up"])
        scales = [fmt.weight_global_scale(g[e]) for e in range(g.shape[0])]
        if scales[0] is not None:
            both = torch.stack([torch.minimum(s, fmt.weight_global_scale(u[e])) for e, s in enumerate(scales)])
            shared[layout.params["gate"]] = shared[layout.params["up"]] = both
    qweights = {}
    for param in layout.params.values():
        w = matrices(param)
        gs = shared[param]
        qweights[param] = [solver(param, e, w[e], None if gs is None else gs[e]) if solver else
                           _quantize_one(fmt, w[e], observer, None if gs is None else gs[e]) for e in range(w.shape[0])]
    return qweights


@torch.no_grad()
def fake_quantized_experts(module: nn.Module, fmt_name: str, hidden_size: int | None = None) -> dict[str, torch.Tensor]:
    """Parameter name -> dequantize(quantize(W)) of every expert (exactly QExperts' weights), in the
    parameter's own shape and dtype, for code that swaps weights in place (the sensitivity sweep)."""
    layout = _layout_of(module, hidden_size)
    fmt = get_format(fmt_name)
    out = {}
    for param, qs in _expert_qweights(module, layout, fmt, "minmax", None).items():
        w = torch.stack([fmt.dequantize(q, torch.float32) for q in qs])  # [E, out, in]
        orig = getattr(module, param)
        out[param] = (w.transpose(1, 2) if layout.transposed else w).to(orig.dtype).contiguous()
    return out


def select_experts(targets, model: nn.Module, arch) -> list[str]:
    """Fused-experts modules a quantize pass's Targets covers, with Targets' own semantics: `roles`
    empty or naming "experts", `layers` empty or naming the block, `exclude` globs drop, and a
    non-empty `include` must name the module."""
    return [name for layer in range(arch.num_layers) for name, _ in arch.experts(layer)
            if targets.covers(name, layer, "experts") and is_experts(model.get_submodule(name))]


def quantize_named_experts(model: nn.Module, names: list[str], fmt_name: str, mode: str = "real",
                           act_format: str | None = None, observer: str = "minmax",
                           input_global_scales: dict[str, dict[str, torch.Tensor]] | None = None,
                           model_type: str = "", solvers: dict | None = None) -> tuple[int, int]:
    """Swap each named experts module for its QExperts in place; (bytes before, bytes after).

    The quantize pass calls this beside its linears loop (one block's names in the streaming loop).
    input_global_scales: module name -> {parameter name: [E] scales}, from calibration.
    solvers: module name -> a `solver` for quantize_experts (gptq's per-expert Hessians).
    """
    from quantkit.targets import set_module

    before = after = 0
    for name in names:
        module = model.get_submodule(name)
        before += sum(p.numel() * p.element_size() for p in module.parameters(recurse=False))
        q = quantize_experts(module, fmt_name, mode, act_format, observer=observer,
                             input_global_scales=(input_global_scales or {}).get(name), model_type=model_type,
                             solver=(solvers or {}).get(name))
        after += sum(t.numel() * t.element_size() for n, t in q.named_buffers(recurse=False)
                     if n.endswith(("_codes", "_scale")))
        set_module(model, name, q)
    return before, after
