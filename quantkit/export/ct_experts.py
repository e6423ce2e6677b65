"""Fused experts in a compressed-tensors checkpoint: one quantized linear per expert and projection.

Engines and the original checkpoints store experts per expert (Mixtral
`block_sparse_moe.experts.{e}.w1/w2/w3`, Qwen2-MoE `mlp.experts.{e}.gate_proj/up_proj/down_proj`);
transformers 5 re-fuses them into `experts.gate_up_proj` [E, 2I, H] / `experts.down_proj` on load.
The on-disk names are read from transformers' own conversion mapping for the model type (the
WeightConverter that merges them, and any WeightRenaming such as `.block_sparse_moe.` -> `.mlp.`),
so a model type transformers knows gets exactly the names its original checkpoints use.
"""

from __future__ import annotations

import re
from functools import lru_cache

import torch
from torch import nn

from quantkit.formats.base import QTensor
from quantkit.nn.qexperts import QExperts

# names used when transformers has no conversion mapping for the model type
_DEFAULT_SPLIT = {"gate_up": ("gate_proj", "up_proj"), "up": ("up_proj",), "gate": ("gate_proj",), "down": ("down_proj",)}
_EXPERT_SOURCE = re.compile(r"experts\.\*\.(.+)\.weight$")


@lru_cache(maxsize=64)
def _mapping(model_type: str) -> tuple[dict[str, tuple[str, ...]], tuple[tuple[str, str], ...]]:
    """(fused param -> per-expert checkpoint linear names in concatenation order,
    renamings as (model fragment, checkpoint fragment))."""
    try:
        from transformers.conversion_mapping import get_checkpoint_conversion_mapping
    except ImportError:  # pragma: no cover - transformers < 5
        return {}, ()
    split: dict[str, tuple[str, ...]] = {}
    renames: list[tuple[str, str]] = []
    for conv in get_checkpoint_conversion_mapping(model_type) or []:
        sources = list(getattr(conv, "_original_source_patterns", conv.source_patterns))
        targets = list(getattr(conv, "_original_target_patterns", conv.target_patterns))
        if type(conv).__name__ == "WeightRenaming":
            if len(sources) == 1 and len(targets) == 1 and not re.search(r"[\\^$()*\[\]|?+]", sources[0] + targets[0]):
                renames.append((targets[0], sources[0]))
            continue
        names = [m.group(1) for s in sources if (m := _EXPERT_SOURCE.search(s))]
        if len(names) == len(sources) and len(targets) == 1 and ".experts." in "." + targets[0]:
            split[targets[0].rsplit(".", 1)[-1]] = tuple(names)
    return split, tuple(renames)


def checkpoint_name(name: str, model_type: str) -> str:
    """A model tensor/module name as the model type's original checkpoints spell it."""
    for model_part, ckpt_part in _mapping(model_type)[1]:
        name = name.replace(model_part, ckpt_part) if model_part.startswith(".") else name
    return name


def _split_names(module: QExperts, model_type: str) -> dict[str, tuple[str, ...]]:
    """Fused parameter -> per-expert linear names, in the order their rows are concatenated."""
    known = _mapping(model_type)[0]
    out = {}
    for role, param in module.layout.params.items():
        out[param] = known.get(param) or _DEFAULT_SPLIT[role]
    return out


def _row_split(qt: QTensor, parts: int) -> list[QTensor]:
    """Split an [out, in] QTensor into `parts` equal row blocks; scales are per row (or per row
    block along in), so the slices are exactly what quantizing each part with the same global
    scale gives."""
    rows = qt.shape[0] // parts
    return [QTensor(qt.format, qt.codes[i * rows:(i + 1) * rows], qt.scale[i * rows:(i + 1) * rows],
                    (rows, qt.shape[1]), qt.global_scale, dict(qt.meta)) for i in range(parts)]


def _per_expert(prefix: str, module: QExperts, model_type: str) -> list[tuple[str, str, int, QTensor]]:
    """(checkpoint name, fused parameter, expert, QTensor [out, in]) of every per-expert linear."""
    out = []
    for param, names in _split_names(module, model_type).items():
        for e, qt in enumerate(module.qweights(param)):
            for name, part in zip(names, _row_split(qt, len(names))):
                out.append((checkpoint_name(f"{prefix}.{e}.{name}", model_type), param, e, part))
    return out


def expert_module_names(prefix: str, module: QExperts, model_type: str = "") -> list[str]:
    """Names of the per-expert linears, for the compressed-tensors config targets."""
    return [name for name, *_ in _per_expert(prefix, module, model_type)]


def expert_tensors(prefix: str, module: QExperts, model_type: str = "") -> dict[str, torch.Tensor]:
    """Every per-expert tensor under its checkpoint name, in the compressed-tensors layout."""
    from quantkit.export import ct_int
    from quantkit.export.compressed_tensors import _codec

    codec = _codec(module.weight_format)
    out: dict[str, torch.Tensor] = {}
    for name, param, e, qt in _per_expert(prefix, module, model_type):
        tensors = codec.to_ct(qt, module.act_format) if isinstance(codec, ct_int.Int8Codec) else codec.to_ct(qt)
        for suffix, t in tensors.items():
            out[f"{name}.{suffix}"] = t.contiguous()
        igs = getattr(module, f"{param}_input_global_scale")
        if igs is not None:
            out[f"{name}.input_global_scale"] = igs[e].float().reshape(1)
    return out


def expert_scheme(module: QExperts) -> dict:
    """The config group of every per-expert linear (same shape as compressed_tensors.scheme_dict)."""
    from quantkit.export.compressed_tensors import scheme_dict

    probe = _SchemeProbe(module)
    return scheme_dict(probe)


class _SchemeProbe(nn.Module):
    """What scheme_dict reads from a QLinear, for one expert matrix."""

    def __init__(self, module: QExperts):
        super().__init__()
        param = next(iter(module.shapes))
        self.weight_format = module.weight_format
        self.act_format = module.act_format
        self.qmeta = dict(module.qmeta[param])
        self.qweight = module.qweights(param)[0]


def writer_entries(name: str, module: nn.Module, model_type: str) -> tuple[dict[str, torch.Tensor], dict[str, dict]] | None:
    """The CT writer's hook: for a QExperts at `name`, (tensors, scheme per per-expert linear), both
    under checkpoint names; None for any other module. The writer must also skip the module's own
    buffers (`name.` prefix) and pass every other key through `checkpoint_name`."""
    if not isinstance(module, QExperts):
        return None
    scheme = expert_scheme(module)
    return expert_tensors(name, module, model_type), {n: scheme for n in expert_module_names(name, module, model_type)}
