"""bitsandbytes-compatible LLM.int8 checkpoints (formats.md §2.5), written by the one CheckpointWriter.

Per quantized linear: ``weight`` int8 [out, in] (row absmax, ``round(W·127/absmax)``),
``SCB`` fp32 [out] (the row absmax) and ``weight_format`` uint8 0 ("row"), plus
``quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": true, ...}``.
transformers loads it with BitsAndBytesConfig; outliers are found at run time by bitsandbytes.
Only dynamic OutlierLinear modules with one shared threshold have this form.

The writer (export/writer.py, layout ``bnb-int8``) calls `module_tensors` per subtree (block by
block, so this layout streams too) and `config_from` at the end; `export_bnb_int8` is the same
writer walked over a model held in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import FormatError
from quantkit.export.quantkit_layout import quantkit_modules
from quantkit.nn.outlier_linear import OutlierLinear

ROW_FORMAT = 0  # bitsandbytes' weight_format code for row-major int8 ("row")
BNB_NO_DECOMPOSITION = 0.0  # bitsandbytes' threshold meaning "no outlier columns" (quantkit: inf)
BNB_LAYOUT = "bnb-int8"
# OutlierLinear tensors that bitsandbytes' three fields replace
_OUTLIER_KEYS = ("weight_int8", "weight_absmax", "outlier_idx", "outlier_weight", "weight")


def module_tensors(prefix: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """One subtree in bitsandbytes' 8-bit layout: (tensors by full name, facts for the config).

    facts: {"thresholds": {name: threshold}, "dense": [names of linears left dense]}.
    """
    dot = prefix + "." if prefix else ""
    found = quantkit_modules(module)
    mods = {n: m for n, (_, m) in found.items() if isinstance(m, OutlierLinear)}
    others = sorted(set(found) - set(mods))
    if others:
        raise FormatError(f"bitsandbytes cannot hold these quantkit modules: "
                          f"{', '.join(dot + n if n else prefix for n in others[:3])}")
    static = [n for n, m in mods.items() if m.outliers == "static"]
    if static:
        raise FormatError(
            f"static outlier columns (exact 16-bit weights) have no bitsandbytes field, e.g. {dot + static[0]}; "
            f"use outliers: dynamic, or the quantkit layout"
        )
    sd = dict(module.state_dict(prefix=dot))
    thresholds = {}
    for sub, mod in mods.items():
        name = dot + sub if sub else prefix
        for key in _OUTLIER_KEYS:
            sd.pop(f"{name}.{key}", None)
        sd[f"{name}.weight"] = mod.weight_int8
        sd[f"{name}.SCB"] = mod.weight_absmax.float()
        sd[f"{name}.weight_format"] = torch.tensor(ROW_FORMAT, dtype=torch.uint8)
        thresholds[name] = mod.threshold
    # every linear left dense (lm_head included) must be named, or bitsandbytes converts it
    dense = [dot + n if n else prefix for n, m in module.named_modules() if isinstance(m, nn.Linear)]
    return sd, {"thresholds": thresholds, "dense": dense}


def config_from(thresholds: dict[str, float], dense: list[str]) -> dict:
    """The ``quantization_config`` for the whole checkpoint, from every subtree's facts."""
    from transformers import BitsAndBytesConfig

    if not thresholds:
        raise FormatError("no LLM.int8 (OutlierLinear) modules to export; run the llm_int8 pass first")
    values = set(thresholds.values())
    if len(values) != 1:
        raise FormatError(f"bitsandbytes has one global threshold; the model uses {sorted(values)}")
    t = values.pop()
    return BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=BNB_NO_DECOMPOSITION if math.isinf(t) else t,
        llm_int8_skip_modules=list(dense),
        llm_int8_has_fp16_weight=False,
    ).to_dict()


def export_bnb_int8(model: nn.Module, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors that load with bitsandbytes' LLM.int8 (no tokenizer).

    No temp-dir/rename here: `quantkit.api.apply` owns the atomic output; this is the library
    helper for a model quantized by hand.
    """
    from quantkit.export.writer import CheckpointWriter

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    writer = CheckpointWriter(out, BNB_LAYOUT)
    writer.add_rest(model, [])  # no block split: the model's top-level subtrees, in order
    writer.finish(model, None)
    return out


# --- `output.layout: bnb-int8` (recipe) / `quantkit apply --layout bnb-int8` (CLI) ---

_BNB_PASSES = {"calibrate", "llm_int8"}  # passes whose result bitsandbytes' 8-bit layout can hold


def check_bnb_plan(passes) -> None:
    """Before any weight loads: can these passes produce a bitsandbytes LLM.int8 checkpoint?"""
    names = [p.name for p in passes]
    others = [n for n in names if n not in _BNB_PASSES]
    if others:
        raise FormatError(f"output.layout {BNB_LAYOUT} holds only LLM.int8 (the llm_int8 pass); "
                          f"this recipe also runs {', '.join(others)}")
    int8 = [p for p in passes if p.name == "llm_int8"]
    if not int8:
        raise FormatError(f"output.layout {BNB_LAYOUT} needs an llm_int8 pass (see recipe llm-int8)")
    for p in int8:
        if getattr(p, "outliers", "dynamic") != "dynamic":
            raise FormatError(f"output.layout {BNB_LAYOUT} needs llm_int8 outliers: dynamic (bitsandbytes finds "
                              "outlier columns at run time); static outlier weights have no bitsandbytes field")
