"""Per-layer relative weight error of a quantized model against its source checkpoint.

    rel_err(layer) = ||W - deq(Q(W))||_F / ||W||_F      (fp32)

W is read from the source's safetensors one tensor at a time (no second copy of the model);
deq(Q(W)) is what the quantized module computes with. Used by report.html.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn


def source_dir(model_spec: str) -> Path | None:
    """The local safetensors folder behind a model spec, or None (GGUF, not cached, no shards)."""
    from quantkit.models import resolve_model_path

    try:
        target = resolve_model_path(model_spec)
    except Exception:  # the model loaded earlier; a spec we cannot map back just skips the chart
        return None
    path = Path(target)
    if path.is_dir():
        return path if any(path.glob("*.safetensors")) else None
    if path.suffix == ".gguf":
        return None
    try:
        from huggingface_hub import snapshot_download

        found = Path(snapshot_download(target, local_files_only=True, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:
        return None
    return found if any(found.glob("*.safetensors")) else None


def _tensor_files(folder: Path) -> dict[str, Path]:
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return {k: folder / v for k, v in weight_map.items()}
    from safetensors import safe_open

    files = {}
    for f in sorted(folder.glob("*.safetensors")):
        with safe_open(f, "pt") as st:
            files.update({k: f for k in st.keys()})
    return files


def _dequantized(module: nn.Module) -> torch.Tensor | None:
    """The dense weight a quantized module computes with, or None for other modules."""
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight(torch.float32)
    if hasattr(module, "weight_int8") and hasattr(module, "weight_absmax"):  # LLM.int8: row absmax / 127
        return module.weight_int8.float() * (module.weight_absmax.float().unsqueeze(1) / 127.0)
    return None


@torch.inference_mode()
def layer_weight_errors(model: nn.Module, folder: Path) -> dict[str, float]:
    """{module name: relative Frobenius weight error} for every quantized module found in `folder`."""
    from safetensors import safe_open

    files = _tensor_files(folder)
    handles = {f: safe_open(f, "pt") for f in set(files.values())}  # each shard opened once (mmap)
    errors: dict[str, float] = {}
    for name, module in model.named_modules():
        key = f"{name}.weight"
        if key not in files:
            continue
        try:
            deq = _dequantized(module)
        except (RuntimeError, NotImplementedError):  # meta / released (streamed) modules
            continue
        if deq is None or deq.is_meta:
            continue
        w = handles[files[key]].get_tensor(key).float()
        if w.shape != deq.shape:
            if w.t().shape == deq.shape:  # GPT-2 Conv1D stores [in, out]
                w = w.t()
            else:
                continue
        norm = w.norm()
        errors[name] = float((w - deq.to(w.device)).norm() / norm) if norm > 0 else 0.0
    return errors
