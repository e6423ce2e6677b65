"""`quantkit inspect`: what a checkpoint holds, read from config.json and safetensors headers."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

from quantkit.errors import ModelLoadError, QuantkitError

_IN_PER_ELEMENT = {"U8": 2, "I32": 8, "I8": 1}  # checkpoint elements -> weights along the input dim


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
    if qc.get("quant_method") == "compressed-tensors":
        info["kernels"] = _kernels(tensors, qc, config.get("torch_dtype") or config.get("dtype"))
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
    experts = _experts_summary(tensors, qmods)
    if experts:
        info["experts"] = experts
        info.setdefault("extra", {})["experts"] = _experts_line(experts)
    if info.get("kernels"):
        counts = Counter(k["kernel"] for k in info["kernels"])
        info.setdefault("extra", {})["kernels on this machine (quantkit runtime, cpu)"] = dict(counts)
    return info


_EXPERT_KEY = re.compile(r"^(?P<module>.*\.experts)\.(?P<e>\d+)\.(?P<proj>[^.]+)\.(?P<suffix>[^.]+)$")


def _experts_summary(tensors: dict, qmods: set[str]) -> list[dict]:
    """Per MoE experts module: how many experts it has and how many have every projection quantized.

    Per-expert checkpoint tensors are `<module>.experts.<e>.<proj>.<suffix>`; fused 3-D expert
    parameters (`<module>.experts.gate_up_proj`, [E, ...]) are experts left dense."""
    projs: dict[str, dict[int, dict[str, bool]]] = {}  # module -> expert -> projection -> quantized
    for key, meta in tensors.items():
        m = _EXPERT_KEY.match(key)
        if m:
            slot = projs.setdefault(m["module"], {}).setdefault(int(m["e"]), {})
            slot[m["proj"]] = f"{m['module']}.{m['e']}.{m['proj']}" in qmods  # the one notion of "quantized"
            continue
        module, _, leaf = key.rpartition(".")
        if module.endswith(".experts") and len(meta["shape"]) == 3:
            for e in range(meta["shape"][0]):
                projs.setdefault(module, {}).setdefault(e, {})[leaf] = False
    rows = []
    for module, experts in sorted(projs.items(), key=lambda kv: _natural(kv[0])):
        quantized = [e for e, p in sorted(experts.items()) if p and all(p.values())]
        rows.append({"module": module, "experts": len(experts), "quantized": len(quantized),
                     "projections": sorted({p for ps in experts.values() for p in ps}),
                     "dense_experts": sorted(set(experts) - set(quantized))})
    return rows


def _natural(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _experts_line(rows: list[dict]) -> str:
    """'8/8 quantized per layer (16 layers)', or the layers where some expert is not."""
    counts = {(r["quantized"], r["experts"]) for r in rows}
    if len(counts) == 1:
        q, n = counts.pop()
        return f"{q}/{n} quantized per layer ({len(rows)} layers)"
    return "; ".join(f"{r['module']}: {r['quantized']}/{r['experts']} quantized" for r in rows)


def _module_shape(tensors: dict, module: str) -> tuple[int, int] | None:
    """(out, in) of a compressed-tensors linear from its header shapes, or None if unknown."""
    for suffix in ("weight_packed", "weight"):
        meta = tensors.get(f"{module}.{suffix}")
        if meta and len(meta["shape"]) == 2 and meta["dtype"] in _IN_PER_ELEMENT:
            out_f, cols = meta["shape"]
            return out_f, cols * _IN_PER_ELEMENT[meta["dtype"]]
    return None


def _targets(group: dict, module: str) -> bool:
    """Whether a config group's targets name this linear (exact name, "re:" pattern or "Linear")."""
    return any(t in (module, "Linear") or (t.startswith("re:") and re.match(t[3:], module))
               for t in group.get("targets", []))


def _kernels(tensors: dict, qc: dict, dtype_name: str | None) -> list[dict]:
    """Per quantized linear: the kernel quantkit's real-mode runtime would run here, and why."""
    import torch

    from quantkit.export.ct_reader import act_format, weight_format
    from quantkit.nn.kernels.select import Device, choose

    dtype = getattr(torch, str(dtype_name or "bfloat16"), torch.bfloat16)
    device = Device.of("cpu")
    groups = list((qc.get("config_groups") or {}).values())
    modules = sorted({k.rpartition(".")[0] for k in tensors if k.endswith((".weight_scale", ".weight_packed"))})
    rows = []
    for module in modules:
        shape = _module_shape(tensors, module)
        group = next((g for g in groups if _targets(g, module)), None)
        if shape is None or group is None:
            continue
        try:
            fmt, act = weight_format(group["weights"]), act_format(group.get("input_activations"))
        except QuantkitError as exc:
            rows.append({"module": module, "kernel": "none", "reason": str(exc)})
            continue
        gsize = group["weights"].get("group_size")
        choice = choose(fmt, act, "real", shape, device, dtype, 0 if fmt == "int4_ch" else gsize)
        rows.append({"module": module, "format": fmt, "act": act, "kernel": choice.label, "reason": choice.reason})
    return rows
