"""Read a compressed-tensors checkpoint (quantkit's or llm-compressor's) into quantkit's runtime.

Each quantized Linear becomes a real-mode QLinear holding the checkpoint's own codes and scales
(nothing is re-quantized), so `quantkit eval --runtime quantkit` scores exactly what is on disk.
"""

from __future__ import annotations

import json
import re
from contextlib import nullcontext
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn

from quantkit.errors import ModelLoadError
from quantkit.export.compressed_tensors import codecs
from quantkit.nn.qlinear import QLinear
from quantkit.targets import set_module

_SUFFIXES = ("weight", "weight_packed", "weight_scale", "weight_global_scale", "weight_shape",
             "weight_zero_point", "input_global_scale")


def weight_format(args: dict) -> str:
    """compressed-tensors weight args -> quantkit format name."""
    bits, kind, group, strategy = args.get("num_bits"), args.get("type"), args.get("group_size"), args.get("strategy")
    if kind == "float" and bits == 4 and group == 16:
        return "nvfp4"
    if kind == "float" and bits == 4 and group == 32:
        return "mxfp4"
    if kind == "float" and bits == 8 and strategy in ("channel", "block"):
        return "fp8" if strategy == "channel" else "fp8_block"
    if kind == "int" and bits == 8 and strategy == "channel" and args.get("symmetric", True):
        return "int8"
    if kind == "int" and bits == 4 and args.get("symmetric", True):
        if strategy == "channel":
            return "int4_ch"
        names = {32: "int4", 64: "int4_g64", 128: "int4_g128"}
        if group in names:
            return names[group]
    raise ModelLoadError(f"quantkit's runtime has no format for compressed-tensors weights {args}")


def act_format(args: dict | None) -> str | None:
    if not args:
        return None
    bits, kind, group, strategy = args.get("num_bits"), args.get("type"), args.get("group_size"), args.get("strategy")
    if kind == "float" and bits == 4:
        return "nvfp4" if group == 16 else "mxfp4"
    if kind == "int" and bits == 8 and strategy == "token" and args.get("dynamic"):
        return "int8"
    if kind == "float" and bits == 8 and args.get("dynamic"):  # FP8_DYNAMIC (per token), FP8_BLOCK (per group)
        return "fp8" if strategy == "token" else "fp8_block"
    raise ModelLoadError(f"quantkit's runtime has no activation format for compressed-tensors args {args}")


def matches(name: str, module: nn.Module, targets: list[str]) -> bool:
    """compressed-tensors' target rule: a layer name, a class name ("Linear" also matches a QLinear
    standing in for one), or a "re:" regex."""
    for t in targets:
        if t == "Linear" and isinstance(module, QLinear):
            return True
        if t.startswith("re:") and re.match(t[3:], name):
            return True
        if t == name or t == type(module).__name__:
            return True
    return False


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint directory's safetensors files."""
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(f, "pt") as sf:
            for key in sf.keys():
                tensors[key] = sf.get_tensor(key)
    return tensors


def swap_quantized(model: nn.Module, tensors: dict[str, torch.Tensor], qc: dict, dtype: torch.dtype,
                   mode: str = "real") -> list[str]:
    """Replace every nn.Linear the config's groups quantize by a QLinear holding its checkpoint codes
    and scales (popped from `tensors`), drop the transform matrices (rebuilt from transform_config)
    and attach the online transforms; -> the names replaced. What is left in `tensors` is the
    model's plain state."""
    from quantkit.export.ct_transform import attach_online_transforms

    ignore = set(qc.get("ignore") or [])
    groups = list((qc.get("config_groups") or {}).values())
    table = codecs() if groups else {}
    swapped = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, nn.Linear) or name in ignore:
            continue
        group = next((g for g in groups if matches(name, module, g.get("targets", []))), None)
        if group is None or f"{name}.weight_scale" not in tensors:
            continue
        parts = {s: tensors.pop(f"{name}.{s}") for s in _SUFFIXES if f"{name}.{s}" in tensors}
        if "weight_zero_point" in parts:
            raise ModelLoadError(f"{name}: asymmetric (zero-point) weights are not supported by quantkit's runtime")
        qt = table[weight_format(group["weights"])].from_ct(parts, (module.out_features, module.in_features))
        bias = tensors.pop(f"{name}.bias", None)
        set_module(model, name, QLinear(qt, None if bias is None else bias.to(dtype), mode=mode,
                                        act_format=act_format(group.get("input_activations")),
                                        input_global_scale=parts.get("input_global_scale"), compute_dtype=dtype))
        swapped.append(name)
    suffixes = tuple(f".{g}_{loc}.weight" for g in ((qc.get("transform_config") or {}).get("config_groups") or {})
                     for loc in ("input", "output"))
    for key in [k for k in tensors if suffixes and k.endswith(suffixes)]:
        tensors.pop(key)
    attach_online_transforms(model, qc)
    return swapped


def load_ct_checkpoint(path: Path, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    config_data = json.loads((path / "config.json").read_text())
    qc = config_data.get("quantization_config") or {}
    if qc.get("quant_method") != "compressed-tensors":
        raise ModelLoadError(f"{path} is not a compressed-tensors checkpoint")
    config = AutoConfig.from_pretrained(path)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    tensors = read_tensors(path)
    swap_quantized(model, tensors, qc, dtype)
    missing = model.load_state_dict({k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()},
                                    strict=False, assign=True)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    still_meta = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if still_meta:
        # non-persistent buffers (rotary inv_freq) are rebuilt by a fresh init on the CPU; its
        # parameters stay on meta unless one is missing too (a full random init of a 7B model is
        # 13.5 GB and minutes, for a few KB of buffers)
        params = dict(model.named_parameters())
        need_params = any(n in params for n in still_meta)
        with nullcontext() if need_params else init_empty_weights(include_buffers=False):
            fresh = AutoModelForCausalLM.from_config(config, dtype=dtype)
        for n in still_meta:
            owner, _, leaf = n.rpartition(".")
            src = fresh.get_submodule(owner) if owner else fresh
            dst = model.get_submodule(owner) if owner else model
            value = getattr(src, leaf)
            if isinstance(value, nn.Parameter):
                setattr(dst, leaf, nn.Parameter(value.detach(), requires_grad=False))
            else:
                dst.register_buffer(leaf, value, persistent=False)
        if getattr(config, "tie_word_embeddings", False):
            model.tie_weights()
    del missing
    return model.eval()
