"""Model structure discovered from the model itself: decoder blocks, their linears with roles,
fused groups, MoE experts and routers. See docs/architectures.md."""

from __future__ import annotations

import torch
from torch import nn
from torch.utils._pytree import tree_map

from quantkit.errors import UnsupportedArchitectureError
from quantkit.structure.blocks import find_blocks
from quantkit.structure.experts import ExpertsInfo, describe_experts, is_fused_experts
from quantkit.structure.roles import ROLE_ORDER, BlockStructure, LinearInfo, assign_roles, find_routers
from quantkit.structure.trace import capture_block_inputs, materialized, trace_block

try:  # GPT-2 style blocks use Conv1D: a linear with its weight stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()

__all__ = ["BlockStructure", "ExpertsInfo", "LinearInfo", "ROLE_ORDER", "discover", "is_linear_like"]


def is_linear_like(module: nn.Module) -> bool:
    """nn.Linear, Conv1D, or a quantized stand-in for one (it declares in/out features)."""
    if isinstance(module, (nn.Linear, Conv1D)):
        return True
    return isinstance(getattr(module, "in_features", None), int) and isinstance(getattr(module, "out_features", None), int)


def _linears(block: nn.Module, experts: list[ExpertsInfo]) -> dict[str, nn.Module]:
    found = {}
    for name, mod in block.named_modules():
        if not name or not is_linear_like(mod):
            continue
        if any(name.startswith(p + ".") for p in found):
            continue  # a wrapper's own inner linear (e.g. an outlier split) is not another linear
        if any(name == e.path or name.startswith(e.path + ".") for e in experts):
            continue
        found[name] = mod
    return found


def _signature(block: nn.Module) -> tuple:
    """Blocks with equal signatures have equal structure (MoE models may mix dense and MoE blocks)."""
    return tuple((n, type(m).__name__, tuple((pn, tuple(p.shape)) for pn, p in m.named_parameters(recurse=False)))
                 for n, m in block.named_modules())


def _to_cpu(t):
    return t.cpu() if isinstance(t, torch.Tensor) else t


def describe_block(block: nn.Module, args: tuple, kwargs: dict, hidden_size: int) -> BlockStructure:
    experts = [describe_experts(n, m, hidden_size) for n, m in block.named_modules() if n and is_fused_experts(m)]
    for e in experts:
        if not e.params:
            raise UnsupportedArchitectureError(
                f"cannot tell the input and output projections of the experts at {e.path} from their shapes")
    twin = materialized(block)
    if twin is not block:  # the stand-in lives on the CPU, whatever device the skeleton's embeddings use
        args, kwargs = tree_map(_to_cpu, (args, kwargs))
    linears = _linears(twin, experts)
    if not linears and not experts:
        raise UnsupportedArchitectureError(f"decoder block {type(block).__name__} has no linear layers")
    routers = find_routers(twin, experts)
    trace = trace_block(twin, args, kwargs, linears)
    structure = assign_roles(trace, linears, experts, routers)
    if not any(li.kind == "attention" for li in structure.linears):
        raise UnsupportedArchitectureError(
            f"no attention found in {type(block).__name__}: no scaled-dot-product or q.k product of two linears' outputs")
    return structure


def discover(model: nn.Module, hidden_size: int, vocab_size: int) -> tuple[str, list[BlockStructure]]:
    """(path of the decoder-block list, structure of every block)."""
    layers_path = find_blocks(model)
    blocks = model.get_submodule(layers_path)
    args, kwargs = capture_block_inputs(model, layers_path, vocab_size)
    by_signature: dict[tuple, BlockStructure] = {}
    out = []
    for block in blocks:
        sig = _signature(block)
        if sig not in by_signature:
            by_signature[sig] = describe_block(block, args, kwargs, hidden_size)
        out.append(by_signature[sig])
    return layers_path, out
