"""Fused MoE experts: a module holding 3-D parameters [experts, out, in], one matrix per expert.

transformers 5 stores Mixtral/Qwen2-MoE experts this way (`experts.gate_up_proj` [E, 2I, H],
`experts.down_proj` [E, H, I]); the experts class records its layout in `is_transposed` (then
[E, in, out]) and `has_gate` (gate and up concatenated in one parameter).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ExpertsInfo:
    path: str  # relative to the block
    num_experts: int
    params: dict[str, str]  # role ("gate_up", "up", "down") -> parameter name
    transposed: bool  # parameters stored [E, in, out] instead of [E, out, in]

    def role_of_param(self, param: str) -> str | None:
        return next((r for r, p in self.params.items() if p == param), None)


def _weights3d(module: nn.Module) -> dict[str, tuple[int, ...]]:
    declared = getattr(module, "expert_shapes", None)  # a quantized stand-in (nn/qexperts.py) says so
    if isinstance(declared, dict):
        return dict(declared)
    return {n: tuple(p.shape) for n, p in module.named_parameters(recurse=False) if p.dim() == 3}


def _transposed(module: nn.Module) -> bool:
    layout = getattr(module, "layout", None)
    return bool(getattr(module, "is_transposed", False) or getattr(layout, "transposed", False))


def is_fused_experts(module: nn.Module) -> bool:
    shapes = _weights3d(module)
    return len(shapes) >= 2 and len({s[0] for s in shapes.values()}) == 1 and next(iter(shapes.values()))[0] > 1


def _assign(shapes: dict[str, tuple[int, ...]], hidden_size: int, transposed: bool) -> tuple[list[str], list[str]]:
    def io(shape):  # (out, in) of one expert's matrix
        return (shape[2], shape[1]) if transposed else (shape[1], shape[2])

    ins = [n for n, s in shapes.items() if io(s)[1] == hidden_size and io(s)[0] != hidden_size]
    outs = [n for n, s in shapes.items() if io(s)[0] == hidden_size and n not in ins]
    if len(ins) == 1 and len(outs) == 1 and io(shapes[ins[0]])[0] not in (io(shapes[outs[0]])[1], 2 * io(shapes[outs[0]])[1]):
        return [], []  # the input projection's width must be what the output one reads (or twice: gate_up)
    return ins, outs


def module_layout(module: nn.Module, path: str = "", hidden_size: int | None = None) -> ExpertsInfo:
    """describe_experts with the module's own hidden size (its hidden_dim, or its config's) unless given."""
    if hidden_size is None:
        hidden_size = getattr(module, "hidden_dim", None) or getattr(getattr(module, "config", None), "hidden_size", 0)
    return describe_experts(path, module, hidden_size)


def describe_experts(path: str, module: nn.Module, hidden_size: int) -> ExpertsInfo:
    """Roles from shapes: the input projection reads the hidden size, the output one writes it.

    The layout is [E, out, in] unless the module says `is_transposed`; a module that says nothing
    (Llama-4 stores [E, in, out]) is read whichever way gives one input and one output projection.
    """
    shapes = _weights3d(module)
    transposed = _transposed(module)
    num_experts = next(iter(shapes.values()))[0]
    ins, outs = _assign(shapes, hidden_size, transposed)
    declared = hasattr(module, "is_transposed") or hasattr(module, "layout")
    if (len(ins) != 1 or len(outs) != 1) and not declared:
        flipped = _assign(shapes, hidden_size, not transposed)
        if len(flipped[0]) == 1 and len(flipped[1]) == 1:
            (ins, outs), transposed = flipped, not transposed
    if len(ins) != 1 or len(outs) != 1:  # square experts (I == H): names break the tie
        ins = [n for n in shapes if "down" not in n and "w2" not in n]
        outs = [n for n in shapes if n not in ins]

    def io(shape):
        return (shape[2], shape[1]) if transposed else (shape[1], shape[2])

    params: dict[str, str] = {}
    if len(ins) == 1 and len(outs) == 1:
        packed = io(shapes[ins[0]])[0] == 2 * io(shapes[outs[0]])[1]
        params = {"gate_up" if packed else "up": ins[0], "down": outs[0]}
    else:  # separate gate and up parameters: the one named gate, else the first
        gate = next((n for n in ins if "gate" in n or "w1" in n), ins[0] if ins else None)
        params = {"gate": gate, **{"up": n for n in ins if n != gate}, "down": outs[0]} if gate and outs else {}
    return ExpertsInfo(path=path, num_experts=num_experts, params=params, transposed=transposed)
