"""`quantkit inspect`: what a checkpoint holds, read from config.json and safetensors headers."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from quantkit.errors import ModelLoadError


def _header(path: Path) -> dict:
    """The safetensors JSON header (names, dtypes, shapes, offsets) without reading tensor data."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header


def _part(key: str, quantized_prefixes: set[str]) -> str:
    module, _, suffix = key.rpartition(".")
    if "embed" in key:
        return "embeddings"
    if "norm" in key:
        return "norms"
    if module in quantized_prefixes:
        return f"quantized: {suffix}"
    return f"dense: {suffix}"


def inspect_checkpoint(path: Path) -> dict:
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.exists():
        raise ModelLoadError(f"{path} is not a checkpoint directory (no config.json in it)")
    config = json.loads(config_file.read_text())
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelLoadError(f"{path} has no .safetensors files")
    qc = config.get("quantization_config") or {}
    tensors = {}
    for f in files:
        tensors.update(_header(f))
    # modules that carry quantization tensors
    qmods = {k.rpartition(".")[0] for k in tensors if k.rpartition(".")[2] in
             ("weight_packed", "weight_scale", "weight_global_scale", "SCB", "weight_codes", "row_scale")}
    qmods |= set((qc.get("modules") or {}).keys())
    parts: dict[str, dict] = {}
    total = 0
    for key, meta in tensors.items():
        start, end = meta["data_offsets"]
        size = end - start
        total += size
        row = parts.setdefault(_part(key, qmods), {"tensors": 0, "bytes": 0, "dtypes": set()})
        row["tensors"] += 1
        row["bytes"] += size
        row["dtypes"].add(meta["dtype"])
    for row in parts.values():
        row["dtypes"] = sorted(row["dtypes"])
    info = {
        "path": str(path),
        "model_type": config.get("model_type"),
        "quant_method": qc.get("quant_method", "none"),
        "format": qc.get("format"),
        "tensors": len(tensors),
        "total_bytes": total,
        "quantized_modules": len(qmods),
        "parts": dict(sorted(parts.items())),
        "groups": [],
    }
    for name, group in (qc.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        a = group.get("input_activations")
        summary = f"{group.get('format')}: weights {w.get('type')}{w.get('num_bits')} {w.get('strategy')}"
        if w.get("group_size"):
            summary += f" g{w['group_size']}"
        summary += ", activations " + ("none" if not a else f"{a.get('type')}{a.get('num_bits')} {a.get('strategy')}"
                                       f"{' dynamic' if a.get('dynamic') else ' static'}")
        targets = group.get("targets", [])
        info["groups"].append({"name": name, "summary": summary,
                               "targets": targets if len(targets) <= 4 else f"{len(targets)} modules"})
    if qc.get("quant_method") == "quantkit":
        types = Counter(m.get("type") for m in (qc.get("modules") or {}).values())
        info["extra"] = {"module_types": dict(types)}
        try:
            from quantkit.export.masa_layout import masa_param_counts
        except ImportError:
            pass
        else:
            if types.get("masa") or any("masa" in str(t) for t in types):
                info["extra"]["masa"] = masa_param_counts(qc)
    return info
