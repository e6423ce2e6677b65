"""Calibration statistics that reach every MoE expert.

With real routing alone, an expert the calibration tokens rarely pick gets few or no inputs, and
a static activation scale from nothing is zero or non-finite, which vLLM rejects. Inside
`expert_statistics(..., all_experts=True)` (the default, like llm-compressor's
`moe_calibrate_all_experts`) every expert additionally sees every token for statistics, while the
module's real output, from the real routing, is what propagates to the next block.

Recorded per fused-experts module: routed-token counts per expert (real routing), and the input
amax of each expert's fused weights: `gate_up_proj` (its input is the hidden states) and
`down_proj` (its input is act(gate) * up, different per expert).

An expert with no observed input still gets a finite, positive scale (`input_amax`), derived
from weights, with a warning:
- input of gate/up: the hidden states are the same tensor for every expert, so the largest amax
  any expert of the layer saw; if none saw any, 1.0.
- input of down: the largest observed down-input amax of the layer, scaled by this expert's
  ||W_gate||_F * ||W_up||_F relative to the largest such product among observed experts; if no
  expert observed anything, the bound |silu(g) * u| <= |g| |u| <= (x_amax ||W_gate,i||_1)(x_amax ||W_up,i||_1)
  maximized over rows i.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.structure.experts import ExpertsInfo, is_fused_experts, module_layout


@dataclass
class ExpertStats:
    num_experts: int
    tokens: torch.Tensor = None  # [E] int64, tokens the real routing sent to each expert
    amax: dict[str, torch.Tensor] = field(default_factory=dict)  # fused param -> [E] fp32 input amax (0: unseen)

    def __post_init__(self):
        if self.tokens is None:
            self.tokens = torch.zeros(self.num_experts, dtype=torch.int64)

    def observe(self, param: str, e: int, x: torch.Tensor) -> None:
        if x.numel() == 0:
            return
        cur = self.amax.setdefault(param, torch.zeros(self.num_experts))
        cur[e] = torch.maximum(cur[e], x.detach().abs().amax().float().cpu())


def _matrix(module: nn.Module, layout: ExpertsInfo, role: str, e: int) -> torch.Tensor:
    w = getattr(module, layout.params[role])[e]
    return w.t() if layout.transposed else w  # [out, in]


def _routed_counts(layout: ExpertsInfo, top_k_index: torch.Tensor) -> torch.Tensor:
    """[E] tokens the real routing sends each expert."""
    return torch.bincount(top_k_index.reshape(-1).cpu(), minlength=layout.num_experts)[: layout.num_experts]


def _expert_inputs(module: nn.Module, layout: ExpertsInfo, x: torch.Tensor, top_k_index: torch.Tensor,
                   all_experts: bool) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
    """Per expert with input: (e, what its gate/up read [n, H], what its down projection reads [n, I]).
    Rows are every token (all_experts) or the tokens the real routing sends it."""
    roles = layout.params
    for e in range(layout.num_experts):
        rows = x if all_experts else x[(top_k_index == e).any(dim=-1)]
        if rows.shape[0] == 0:
            continue
        if "gate_up" in roles:
            gate, up = F.linear(rows, _matrix(module, layout, "gate_up", e)).chunk(2, dim=-1)
        else:
            up = F.linear(rows, _matrix(module, layout, "up", e))
            gate = F.linear(rows, _matrix(module, layout, "gate", e)) if "gate" in roles else None
        yield e, rows, (up if gate is None else module.act_fn(gate) * up)


@contextmanager
def _on_experts(root: nn.Module, prefix: str, make, record) -> Iterator[dict]:
    """A forward hook on every float fused-experts module under root: record(module, layout, state,
    x [tokens, H], top_k_index) on each routed forward; yields {name (prefixed): state = make(E)}."""
    found: dict = {}
    handles = []
    for name, module in root.named_modules():
        # float experts only: statistics are taken before quantization
        if not is_fused_experts(module) or not any(p.dim() == 3 for p in module.parameters(recurse=False)):
            continue
        layout = module_layout(module, name)
        full = f"{prefix}.{name}" if prefix and name else (name or prefix)
        state = found[full] = make(layout.num_experts)

        def hook(mod, args, _out, layout=layout, state=state):
            if len(args) >= 2:  # routed experts forward (hidden, top_k_index, ...); others: no statistics
                record(mod, layout, state, args[0].reshape(-1, args[0].shape[-1]), args[1])

        handles.append(module.register_forward_hook(hook))
    try:
        yield found
    finally:
        for h in handles:
            h.remove()


def expert_statistics(root: nn.Module, all_experts: bool = True, prefix: str = ""):
    """Record ExpertStats for every fused-experts module under root (names prefixed by `prefix`)."""

    @torch.no_grad()
    def record(module, layout, stats, x, top_k_index):
        stats.tokens += _routed_counts(layout, top_k_index)
        first = layout.params["gate_up"] if "gate_up" in layout.params else layout.params["up"]
        for e, rows, down_in in _expert_inputs(module, layout, x, top_k_index, all_experts):
            stats.observe(first, e, rows)
            stats.observe(layout.params["down"], e, down_in)

    return _on_experts(root, prefix, ExpertStats, record)


@torch.no_grad()
def input_amax(stats: ExpertStats, module: nn.Module, name: str = "experts") -> dict[str, torch.Tensor]:
    """Fused param -> [E] input amax, every entry finite and positive (fallbacks in the module doc)."""
    layout = module_layout(module, name)
    roles = layout.params
    first = roles["gate_up"] if "gate_up" in roles else roles["up"]
    down = roles["down"]
    E = layout.num_experts
    x_seen = stats.amax.get(first, torch.zeros(E))
    d_seen = stats.amax.get(down, torch.zeros(E))
    x_amax = float(x_seen.max()) if bool((x_seen > 0).any()) else 1.0
    out_first = torch.where(x_seen > 0, x_seen, torch.full_like(x_seen, x_amax))

    def gate_up_norms(e: int) -> tuple[torch.Tensor, torch.Tensor]:  # row-wise |W_gate|, |W_up| [I, H]
        if "gate_up" in roles:
            return _matrix(module, layout, "gate_up", e).float().abs().chunk(2)
        up = _matrix(module, layout, "up", e).float().abs()
        return (_matrix(module, layout, "gate", e).float().abs() if "gate" in roles else torch.ones_like(up)), up

    products = torch.tensor([float(g.norm() * u.norm()) for g, u in (gate_up_norms(e) for e in range(E))])
    seen = d_seen > 0
    if bool(seen.any()):
        ref = int(torch.argmax(torch.where(seen, products, torch.zeros_like(products))))
        est = d_seen.max() * products / products[ref].clamp_min(1e-30)
    else:
        est = torch.tensor([float((g.sum(1) * u.sum(1)).max()) * x_amax**2 for g, u in (gate_up_norms(e) for e in range(E))])
    out_down = torch.where(seen, d_seen, est)
    unseen = [e for e in range(E) if not bool(seen[e])]
    if unseen:
        warnings.warn(f"{name}: experts {unseen} saw no calibration input; their activation scales are "
                      "weight-derived (docs/architectures.md)", stacklevel=2)
    finite_max = torch.finfo(torch.float32).max
    clean = {first: out_first, down: out_down}
    return {p: torch.nan_to_num(a, nan=1.0, posinf=finite_max).clamp(min=torch.finfo(torch.float32).tiny)
            for p, a in clean.items()}


def input_global_scales(stats: ExpertStats, module: nn.Module, act_format: str, name: str = "experts") -> dict[str, torch.Tensor] | None:
    """Fused param -> [E] static activation global scales for quantize_experts, or None when the
    activation format has no static global scale (dynamic formats)."""
    from quantkit.formats import get_format

    fmt = get_format(act_format)
    amax = input_amax(stats, module, name)
    if fmt.activation_global_scale(torch.ones(1)) is None:
        return None
    # one scale per expert: the format reduces whatever it is given to one amax
    return {p: torch.cat([fmt.activation_global_scale(a[e:e + 1]) for e in range(a.numel())]) for p, a in amax.items()}


# -- GPTQ: a Hessian per expert from the tokens the real routing sends it -------------------------------
def _gram(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().float()  # [n, in]
    return x.T @ x


@dataclass
class ExpertHessians:
    """H = sum over tokens routed to expert e of x x^T, per fused parameter, fp32 ([in, in] or None: no token)."""

    num_experts: int
    tokens: torch.Tensor = None  # [E] int64 routed-token counts
    h: dict[str, list[torch.Tensor | None]] = field(default_factory=dict)

    def __post_init__(self):
        if self.tokens is None:
            self.tokens = torch.zeros(self.num_experts, dtype=torch.int64)

    def add(self, param: str, e: int, xtx: torch.Tensor) -> None:
        """Add one batch's X^T X [in, in] for expert e."""
        slots = self.h.setdefault(param, [None] * self.num_experts)
        slots[e] = xtx if slots[e] is None else slots[e] + xtx


def expert_hessians(root: nn.Module, prefix: str = ""):
    """Record ExpertHessians for every float fused-experts module under root (names prefixed by `prefix`)."""

    @torch.no_grad()
    def record(module, layout, hs, x, top_k_index):
        hs.tokens += _routed_counts(layout, top_k_index)
        roles = layout.params
        firsts = ["gate_up"] if "gate_up" in roles else [r for r in ("gate", "up") if r in roles]
        for e, rows, down_in in _expert_inputs(module, layout, x, top_k_index, all_experts=False):
            xtx = _gram(rows)  # gate and up read the same input: one Hessian, computed once
            for k, r in enumerate(firsts):  # kept per parameter (a copy: the solver damps in place)
                hs.add(roles[r], e, xtx if k == 0 else xtx.clone())
            hs.add(roles["down"], e, _gram(down_in))

    return _on_experts(root, prefix, ExpertHessians, record)
