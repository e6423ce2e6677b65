"""Tiny compressed-tensors checkpoints for verify tests, and tools to break them on purpose."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantkit.api import save_output
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.passes.quantize import Quantize
from tests.tiny_models import tiny_model


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


def write_ct(path: Path, fmt: str, act: str | None = None, arch: str = "llama", dtype: torch.dtype = torch.bfloat16,
             source: Path | None = None, **quantize_fields) -> Path:
    """A tiny model quantized by quantkit and written in the compressed-tensors layout
    (and, with source, the unquantized model saved there)."""
    torch.manual_seed(0)
    model = tiny_model(arch, dtype=dtype)
    if source is not None:
        model.save_pretrained(source)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    if act == "nvfp4":  # the static activation global scale the calibrate pass would record
        ctx.stats["act_amax"] = {n: torch.tensor([4.0]) for n, _ in model.named_modules()}
    Quantize(format=fmt, act_format=act, mode="fake", **quantize_fields).run(model, ctx)
    path.mkdir(parents=True, exist_ok=True)
    save_output(model, _NoTokenizer(), path)
    return path


def edit_tensors(path: Path, fn) -> None:
    """fn(dict of tensors) edits them in place; the file is rewritten."""
    f = path / "model.safetensors"
    tensors = load_file(f)
    fn(tensors)
    save_file(tensors, f, metadata={"format": "pt"})


def edit_config(path: Path, fn) -> None:
    f = path / "config.json"
    config = json.loads(f.read_text())
    fn(config)
    f.write_text(json.dumps(config, indent=2))
