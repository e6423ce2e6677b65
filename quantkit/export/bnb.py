"""bitsandbytes-compatible LLM.int8 checkpoints (formats.md §2.5).

Per quantized linear: ``weight`` int8 [out, in] (row absmax, ``round(W·127/absmax)``),
``SCB`` fp32 [out] (the row absmax) and ``weight_format`` uint8 0 ("row"), plus
``quantization_config = {"quant_method": "bitsandbytes", "load_in_8bit": true, ...}``.
transformers loads it with BitsAndBytesConfig; outliers are found at run time by bitsandbytes.
Only dynamic OutlierLinear modules with one shared threshold have this form.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from quantkit.errors import FormatError
from quantkit.export.quantkit_layout import quantkit_modules, saveable
from quantkit.nn.outlier_linear import OutlierLinear

ROW_FORMAT = 0  # bitsandbytes' weight_format code for row-major int8 ("row")
BNB_NO_DECOMPOSITION = 0.0  # bitsandbytes' threshold meaning "no outlier columns" (quantkit: inf)


def _bnb_threshold(mods: dict[str, OutlierLinear]) -> float:
    thresholds = {m.threshold for m in mods.values()}
    if len(thresholds) != 1:
        raise FormatError(f"bitsandbytes has one global threshold; the model uses {sorted(thresholds)}")
    t = thresholds.pop()
    return BNB_NO_DECOMPOSITION if math.isinf(t) else t


def bnb_int8_state_dict(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, quantization_config) in bitsandbytes' 8-bit layout."""
    from transformers import BitsAndBytesConfig

    found = quantkit_modules(model)
    mods = {n: m for n, (_, m) in found.items() if isinstance(m, OutlierLinear)}
    others = sorted(set(found) - set(mods))
    if others:
        raise FormatError(f"bitsandbytes cannot hold these quantkit modules: {', '.join(others[:3])}")
    if not mods:
        raise FormatError("no LLM.int8 (OutlierLinear) modules to export; run the llm_int8 pass first")
    static = [n for n, m in mods.items() if m.outliers == "static"]
    if static:
        raise FormatError(
            f"static outlier columns (exact 16-bit weights) have no bitsandbytes field, e.g. {static[0]}; "
            f"use outliers: dynamic, or the quantkit layout"
        )
    sd = dict(model.state_dict())
    for name, mod in mods.items():
        for key in ("weight_int8", "weight_absmax", "outlier_idx", "outlier_weight", "weight"):
            sd.pop(f"{name}.{key}", None)
        sd[f"{name}.weight"] = mod.weight_int8
        sd[f"{name}.SCB"] = mod.weight_absmax.float()
        sd[f"{name}.weight_format"] = torch.tensor(ROW_FORMAT, dtype=torch.uint8)
    # every linear left dense (lm_head included) must be named, or bitsandbytes converts it
    dense = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    config = BitsAndBytesConfig(
        load_in_8bit=True,
        llm_int8_threshold=_bnb_threshold(mods),
        llm_int8_skip_modules=dense,
        llm_int8_has_fp16_weight=False,
    ).to_dict()
    return saveable(sd), config


def export_bnb_int8(model: nn.Module, out_dir: str | Path) -> Path:
    """Write config.json + model.safetensors that load with bitsandbytes' LLM.int8."""
    from safetensors.torch import save_file

    tensors, qconfig = bnb_int8_state_dict(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    previous = getattr(config, "quantization_config", None)
    config.quantization_config = qconfig
    try:
        config.save_pretrained(out)
    finally:  # the in-memory model is still a quantkit model
        if previous is None:
            del config.quantization_config
        else:
            config.quantization_config = previous
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out


# --- `output.layout: bnb-int8` (recipe) / `quantkit apply --layout bnb-int8` (CLI) ---

BNB_LAYOUT = "bnb-int8"
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


def save_bnb_checkpoint(model: nn.Module, tokenizer, out_dir: str | Path) -> Path:
    """The whole bitsandbytes checkpoint: config.json, model.safetensors, tokenizer files."""
    if any(t.is_meta for t in model.parameters()) or any(t.is_meta for t in model.buffers()):
        raise FormatError(f"the {BNB_LAYOUT} layout is written from the whole model in memory; run with "
                          "execution: whole")
    out = export_bnb_int8(model, out_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out


def write_bnb_output(report, model: nn.Module, tokenizer, recipe, output: str | Path, force: bool) -> None:
    """Checkpoint + recipe + reports into `output`, atomically (as api.apply's save block does)."""
    from quantkit.io import atomic_dir, atomic_write_text
    from quantkit.report import write_report_html

    with atomic_dir(Path(output), force=force) as tmp:
        save_bnb_checkpoint(model, tokenizer, tmp)
        atomic_write_text(tmp / "recipe.yaml", recipe.to_yaml())
        report.output = str(output)
        report.details["layout"] = BNB_LAYOUT
        report.checkpoint_bytes = sum(p.stat().st_size for p in tmp.rglob("*") if p.is_file())
        write_report_html(report, tmp / "report.html", model=model)
        atomic_write_text(tmp / "report.json", report.to_json())
        atomic_write_text(tmp / "report.md", report.to_markdown())
