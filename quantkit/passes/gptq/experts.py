"""GPTQ for fused MoE experts (issue 14): one Hessian per expert from the tokens routed to it.

Every expert's matrix is solved on its own with the same column loop as a linear (solver.py):
gate/up (or packed gate_up) from H = sum x x^T over the hidden states the real routing sends to
that expert, down from its own input act(gate) * up over those tokens. An expert the routing
sends no calibration token has no Hessian: it is quantized round-to-nearest (the pass's
observer) with a warning, and listed in the report (`details.gptq_rtn_experts`).
"""

from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch

from quantkit.errors import SolverError
from quantkit.formats import get_format
from quantkit.nn.expert_stats import expert_hessians, expert_statistics, input_global_scales
from quantkit.nn.qexperts import _quantize_one, is_experts, quantize_named_experts
from quantkit.passes.gptq.solver import gptq_quantize

def gptq_block_experts(p, blk, ctx) -> None:
    """Quantize the block's selected fused experts with per-expert GPTQ (one extra block forward)."""
    state = ctx.scratch[p._key()]
    names = [n for n in blk.select(state.get("experts", [])) if is_experts(blk.model.get_submodule(n))]
    if not names:
        return
    fmt = get_format(p.format)
    static = p.act_format is not None and get_format(p.act_format).activation_global_scale(torch.ones(1)) is not None
    stats = ctx.stats.get("expert_stats", {})  # the calibrate pass's all-expert statistics, if it ran
    gather = static and not all(n in stats for n in names)
    with expert_hessians(blk.module, blk.prefix) as hess, \
            (expert_statistics(blk.module, prefix=blk.prefix) if gather else nullcontext({})) as own:
        blk.forward()
    stats = {**stats, **own}
    solvers, scales, rtn = {}, {}, {}
    for n in names:
        hs = hess[n]
        ctx.report.setdefault("expert_tokens", {})[n] = hs.tokens.tolist()
        if static:
            scales[n] = input_global_scales(stats[n], blk.model.get_submodule(n), p.act_format, n)
        rtn[n] = [e for e in range(hs.num_experts) if int(hs.tokens[e]) == 0]
        solvers[n] = _solver(p, fmt, n, hs, state)
    before, after = quantize_named_experts(blk.model, names, p.format, p.mode, p.act_format, p.observer,
                                           scales or None, model_type=ctx.arch.model_type, solvers=solvers)
    for n in names:
        if rtn[n]:
            warnings.warn(f"gptq: {n}: experts {rtn[n]} were routed no calibration token; quantized "
                          "round-to-nearest (no Hessian)", stacklevel=2)
            ctx.report.setdefault("gptq_rtn_experts", {})[n] = rtn[n]
        ctx.quantized[n] = {"format": p.format, "act_format": p.act_format, "mode": p.mode, "experts": True,
                            "method": "gptq"}
    state["bytes_before"] += before
    state["bytes_after"] += after
    state["modules"] += len(names)


def _solver(p, fmt, name: str, hs, state: dict):
    def solve(param: str, e: int, w: torch.Tensor, gs: torch.Tensor | None):
        h = hs.h.get(param, [None] * hs.num_experts)[e]
        if h is None:  # no routed token: nothing to compensate against
            return _quantize_one(fmt, w, p.observer, gs)
        try:
            qt, info = gptq_quantize(fmt, w, h, gs, block_size=p.block_size, dampening=p.dampening,
                                     observer=p.observer, act_order=p.act_order, weighting=p.weighting,
                                     **p.solver_refine())
        except SolverError as err:  # the solver's message names the knobs; add the expert
            raise SolverError(str(err).replace("gptq:", f"gptq ({name} expert {e}, {param}):", 1)) from None
        p.record(state, f"{name}.{e}.{param}", info)
        return qt

    return solve
