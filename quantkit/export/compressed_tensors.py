"""Write (and read back) checkpoints in the compressed-tensors layout.

The config is built with compressed-tensors' own pydantic models so field names, defaults
and dtype serialization match what transformers and vLLM parse.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from quantkit.errors import QuantkitError
from quantkit.export import ct_int
from quantkit.nn.qlinear import QLinear

CHECKPOINT_FILE = "model.safetensors"


def codecs() -> dict:
    from quantkit.export import ct_fp4, ct_fp8  # imported, never guarded: a broken codec must fail loudly

    table = dict(ct_int.CODECS)
    table.update(ct_fp4.CODECS)
    table.update(ct_fp8.CODECS)
    return table


def _codec(fmt: str):
    table = codecs()
    if fmt not in table:
        raise QuantkitError(f"format {fmt} has no compressed-tensors layout; known: {', '.join(sorted(table))}")
    return table[fmt]


def scheme_dict(module: QLinear) -> dict:
    """{"format", "weights", "input_activations"} of the config group this module belongs to."""
    if module.qmeta.get("conv1d"):
        raise QuantkitError(
            "GPT-2 style Conv1D layers cannot be written in the compressed-tensors layout (engines expect "
            "nn.Linear); quantize in memory with --set output.save=false, or use a Linear-based model"
        )
    codec = _codec(module.weight_format)
    if isinstance(codec, ct_int.Int8Codec):
        return {
            "format": codec.ct_format(module.act_format),
            "weights": codec.weight_args(module.qweight),
            "input_activations": codec.act_args(module.act_format),
            **_transform_entry(module),
        }
    act = module.act_format
    int_weights_int8_acts = module.weight_format.startswith("int4") and act == "int8"  # W4A8
    s = codec.scheme(module.weight_format, None if int_weights_int8_acts else act, ("Linear",))
    if int_weights_int8_acts:
        s["input_activations"] = ct_int.Int8Codec().act_args("int8")
    return {"format": s["format"], "weights": s["weights"], "input_activations": s["input_activations"],
            **_transform_entry(module)}


def _transform_entry(module: QLinear) -> dict:
    """The online input rotation (rotate pass) travels with the scheme until config_from splits it off."""
    if not getattr(module, "input_rotation", None):
        return {}
    return {"input_transform": [module.input_rotation_group, module.input_rotation]}


def _to_ct(module: QLinear, qt) -> dict[str, torch.Tensor]:
    codec = _codec(module.weight_format)
    if isinstance(codec, ct_int.Int8Codec):
        return codec.to_ct(qt, module.act_format)
    return codec.to_ct(qt)


def quantization_config(model: nn.Module) -> dict:
    schemes, ignore = {}, []
    for name, module in model.named_modules():
        if isinstance(module, QLinear):
            schemes[name] = scheme_dict(module)
        elif isinstance(module, nn.Linear):
            ignore.append(name)
    return config_from(schemes, ignore)


def config_from(schemes: dict[str, dict], ignore: list[str]) -> dict:
    """The quantization_config from each quantized module's scheme and the unquantized linears."""
    from compressed_tensors import __version__ as ct_version
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme

    from quantkit.export.ct_transform import transform_config

    rotated = {n: tuple(s["input_transform"]) for n, s in schemes.items() if s.get("input_transform")}
    schemes = {n: {k: v for k, v in s.items() if k != "input_transform"} for n, s in schemes.items()}
    groups: dict[str, list[str]] = {}
    by_key: dict[str, dict] = {}
    for name, s in schemes.items():
        key = json.dumps(s, sort_keys=True)
        by_key[key] = s
        groups.setdefault(key, []).append(name)
    if not groups:
        raise QuantkitError("no quantized linear layers to export")
    single = len(groups) == 1
    config_groups = {}
    for i, (key, names) in enumerate(groups.items()):
        s = by_key[key]
        act = s["input_activations"]
        config_groups[f"group_{i}"] = QuantizationScheme(
            targets=["Linear"] if single else names,
            weights=QuantizationArgs(**s["weights"]),
            input_activations=None if act is None else QuantizationArgs(**act),
            format=s["format"],
        )
    formats = {s["format"] for s in by_key.values()}
    qc = QuantizationConfig(
        config_groups=config_groups,
        format=formats.pop() if len(formats) == 1 else "mixed-precision",
        quantization_status="compressed",
        ignore=list(ignore),
    )
    data = qc.model_dump(exclude=["quant_method"])
    return {"version": ct_version, "quant_method": "compressed-tensors", "sparsity_config": {},
            "transform_config": transform_config(rotated, list(schemes), list(ignore)), **data}


def _json_default(obj):
    if isinstance(obj, torch.dtype):
        return str(obj)
    raise TypeError(f"not JSON serializable: {type(obj).__name__}")


def folds_exactly(fmt: str) -> bool:
    """Whether a per-row output multiplier can move into this format's stored scales exactly:
    integer formats scale per row (kept in fp32); FP4/FP8 scales are coded and would re-round."""
    return fmt.startswith("int")


def _folded_qweight(name: str, module: QLinear):
    """The QTensor with any exact per-row output multiplier (ATM/OHB folds) moved into its scales.

    Integer formats scale per row (or per row and group), so the fold is exact when the product
    is kept in fp32. FP4 block scales are E4M3/E8M0 codes: folding would re-round them, so refuse.
    """
    qt = module.qweight
    if module.output_scale is None:
        return qt
    if not folds_exactly(qt.format):
        raise QuantkitError(
            f"{name}: a per-row correction (ATM/OHB) on {qt.format} weights cannot be stored in the "
            "compressed-tensors layout without re-rounding its block scales; fold it before quantizing "
            "or use an integer format"
        )
    scale = qt.scale.float() * module.output_scale.float().reshape(-1, 1)
    return type(qt)(qt.format, qt.codes, scale, qt.shape, qt.global_scale, dict(qt.meta))


def _refuse_runtime_hooks(model: nn.Module) -> None:
    for name, m in model.named_modules():
        if m.__dict__.get("_quantkit_scale_hooks"):
            raise QuantkitError(
                f"{name or 'model'} carries a runtime correction (a forward hook) that a checkpoint cannot "
                "hold; use fold: true, or a model whose q-norm gain is per row"
            )


def module_tensors(prefix: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict], list[str]]:
    """One subtree in the compressed-tensors layout: (tensors by full name, scheme per quantized
    linear, unquantized linears). The writer calls it per decoder block and once for the rest."""
    _refuse_runtime_hooks(module)
    dot = prefix + "." if prefix else ""
    out: dict[str, torch.Tensor] = {}
    schemes: dict[str, dict] = {}
    ignore: list[str] = []
    qprefixes = []
    for sub, m in module.named_modules():
        name = dot + sub if sub else prefix
        if isinstance(m, QLinear):
            qprefixes.append(name + ".")
            schemes[name] = scheme_dict(m)
            for suffix, t in _to_ct(m, _folded_qweight(name, m)).items():
                out[f"{name}.{suffix}"] = t
            if m.bias is not None:
                out[f"{name}.bias"] = m.bias.detach()
            if m.input_global_scale is not None:
                out[f"{name}.input_global_scale"] = m.input_global_scale.float().reshape(1)
            if m.input_rotation:  # online input rotation: the matrix compressed-tensors registers
                from quantkit.export.ct_transform import tensor_name, transform_tensor

                out[tensor_name(name, m.input_rotation_group)] = transform_tensor(m.input_rotation)
        elif isinstance(m, nn.Linear):
            if getattr(m, "input_rotation", None):
                raise QuantkitError(f"{name} has an online input rotation but is not quantized; quantkit writes "
                                    "online rotations for quantized linears only: quantize it, or exclude it from the "
                                    "rotate pass's targets")
            ignore.append(name)
        elif hasattr(m, "expert_shapes"):  # issue 14: fused MoE experts, written per expert
            from quantkit.export.ct_experts import writer_entries

            tensors, expert_schemes = writer_entries(name, m, m.model_type)
            qprefixes.append(name + ".")
            out.update(tensors)
            schemes.update(expert_schemes)
    for key, t in module.state_dict(prefix=dot).items():
        if not any(key.startswith(q) for q in qprefixes):
            out[key] = t
    moe_type = next((m.model_type for m in module.modules() if hasattr(m, "expert_shapes")), None)
    if moe_type:  # the rest of an MoE block as the original checkpoints name it (Mixtral: block_sparse_moe)
        from quantkit.export.ct_experts import checkpoint_name

        out = {checkpoint_name(k, moe_type): v for k, v in out.items()}
        schemes = {checkpoint_name(k, moe_type): v for k, v in schemes.items()}
        ignore = [checkpoint_name(k, moe_type) for k in ignore]
    return out, schemes, ignore


def state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Named tensors in the compressed-tensors layout; tied weights stored once."""
    out, _, _ = module_tensors("", model)
    if getattr(model.config, "tie_word_embeddings", False):
        out.pop("lm_head.weight", None)
    result, seen = {}, set()
    for k, v in sorted(out.items()):
        v = v.detach().contiguous().cpu()
        ptr = v.untyped_storage().data_ptr()
        if ptr in seen:  # shared (e.g. one fused-group global scale): safetensors stores each once
            v = v.clone()
        seen.add(v.untyped_storage().data_ptr())
        result[k] = v
    return result


def save_checkpoint(model: nn.Module, out_dir: Path) -> dict:
    """Write model.safetensors + config.json (with quantization_config) into out_dir."""
    tensors = state_dict(model)
    save_file(tensors, str(Path(out_dir) / CHECKPOINT_FILE), metadata={"format": "pt"})
    config = model.config.to_dict()
    config["quantization_config"] = quantization_config(model)
    (Path(out_dir) / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True, default=_json_default) + "\n")
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return config["quantization_config"]
