"""Models from user code: `quantkit apply --loader package.module:function` and
`quantkit.api.apply(recipe, model=<nn.Module>)`.

A loader is a function in an importable module (the current directory is on the path) or in a
Python file (`path/to/file.py:function`). It is called with no argument, or with the MODEL
argument when the command line gives one, and returns the model, or a tuple
`(model, tokenizer, calib)` (tokenizer and calib optional), or a dict with the keys `model`,
`tokenizer`, `calib`. `calib` is an iterable of calibration batches, each a LongTensor of
input_ids [batch, seq] (or [seq]) or a dict of tensors passed as `model(**batch)`; they replace
the recipe's calib data. Docs: docs/loaders.md.

Models that are not a transformers model themselves (a VLA: a language backbone plus an action
head) are walked through their transformers backbone: its decoder blocks are the block loop's
blocks, everything else is "the rest" (targets named by the recipe's globs).
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from quantkit.errors import ModelLoadError, QuantkitError, UnsupportedArchitectureError
from quantkit.targets import hf_config

_RESULT_KEYS = ("model", "tokenizer", "calib")


@dataclass
class Loaded:
    model: nn.Module
    tokenizer: Any = None
    calib: list | None = None  # batches: input_ids [b, s] or dicts of forward kwargs

    def adopt(self, dtype: str, device: torch.device):
        """-> (model, tokenizer, residency) as apply's loader would give them."""
        from quantkit.models import resolve_dtype
        from quantkit.stream.residency import WholeResidency

        want = resolve_dtype(dtype)
        model = self.model.to(device) if want == "auto" else self.model.to(device=device, dtype=want)
        return model.eval(), self.tokenizer, WholeResidency(model)

    def calib_config(self, recipe_calib):
        """The recipe's calib section, restated for the given batches (what the report shows)."""
        first = self.calib[0]
        ids = first.get("input_ids") if isinstance(first, dict) else first
        rows = sum(_rows(b) for b in self.calib)
        update = {"source": "loader", "n_samples": rows, "batch_size": _rows(first)}
        if isinstance(ids, torch.Tensor) and ids.dim() == 2:
            update["seq_len"] = int(ids.shape[1])
        return recipe_calib.model_copy(update=update)


def _rows(batch) -> int:
    if isinstance(batch, dict):
        ids = batch.get("input_ids")
        return int(ids.shape[0]) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else 1
    return int(batch.shape[0])


def in_memory(spec, model: nn.Module | None, tokenizer, calib, name: str | None) -> tuple[Loaded | None, str]:
    """apply()'s model arguments -> (the in-memory model or None, the name the report shows)."""
    if isinstance(spec, nn.Module):
        spec, model = None, spec if model is None else model
    if (spec is None) == (model is None):
        raise QuantkitError("apply needs one model: a spec (hub id, directory, .gguf) or model=<nn.Module>")
    if spec is not None and not isinstance(spec, str):
        raise QuantkitError(f"apply: the model spec must be a string or an nn.Module, not {type(spec).__name__}")
    batches = None if calib is None else calib_batches(calib)
    if model is None:
        if tokenizer is not None or batches is not None:
            raise QuantkitError("apply: tokenizer= and calib_batches= go with model=<nn.Module>")
        return None, spec
    return Loaded(model, tokenizer, batches), name or f"<in-memory {type(model).__name__}>"


# --- resolving and calling a --loader spec ----------------------------------------------------


@contextmanager
def _on_path(folder: str):
    """Put folder first on sys.path while the loader's module imports and runs (its own imports)."""
    added = folder not in sys.path
    if added:
        sys.path.insert(0, folder)
    try:
        yield
    finally:
        if added and folder in sys.path:
            sys.path.remove(folder)


def _split_spec(spec: str) -> tuple[str, str]:
    where, sep, name = spec.rpartition(":")
    if not sep or not where or not name or not name.isidentifier():
        raise ModelLoadError(f"--loader {spec!r}: expected package.module:function or path/to/file.py:function")
    return where, name


def _is_file(where: str) -> bool:
    return where.endswith(".py") or "/" in where or os.sep in where


def _folder(where: str) -> str:
    """What goes on sys.path: the file's folder, or the current directory for a module."""
    return str(Path(where).resolve().parent) if _is_file(where) else os.getcwd()


def _import_file(spec: str, path: Path):
    if not path.is_file():
        raise ModelLoadError(f"--loader {spec!r}: file {path} does not exist")
    name = f"quantkit_loader_{abs(hash(str(path.resolve())))}"
    module_spec = importlib.util.spec_from_file_location(name, path)
    if module_spec is None or module_spec.loader is None:
        raise ModelLoadError(f"--loader {spec!r}: {path} is not a Python file")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module  # dataclasses and pickling look the module up by name
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        sys.modules.pop(name, None)
        raise ModelLoadError(f"--loader {spec!r}: importing {path} failed: {type(e).__name__}: {e}") from e
    return module


def _import_module(spec: str, dotted: str):
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as e:
        if e.name and (dotted == e.name or dotted.startswith(e.name + ".")):
            raise ModelLoadError(f"--loader {spec!r}: no module named {dotted!r} (run from the folder that "
                                 "holds it, or give path/to/file.py:function)") from e
        raise ModelLoadError(f"--loader {spec!r}: importing {dotted} failed: {type(e).__name__}: {e}") from e
    except Exception as e:
        raise ModelLoadError(f"--loader {spec!r}: importing {dotted} failed: {type(e).__name__}: {e}") from e


def resolve_loader(spec: str) -> Callable:
    """package.module:function or path/to/file.py:function -> the function."""
    where, name = _split_spec(spec)
    with _on_path(_folder(where)):
        module = _import_file(spec, Path(where)) if _is_file(where) else _import_module(spec, where)
    fn = getattr(module, name, None)
    if fn is None:
        raise ModelLoadError(f"--loader {spec!r}: {where} has no attribute {name!r}")
    if not callable(fn):
        raise ModelLoadError(f"--loader {spec!r}: {where}.{name} is a {type(fn).__name__}, not a function")
    return fn


def call_loader(spec: str, model_arg: str | None = None) -> Loaded:
    """Resolve and call the loader (with MODEL when given); -> its result, checked."""
    fn = resolve_loader(spec)
    try:
        with _on_path(_folder(_split_spec(spec)[0])):
            result = fn() if model_arg is None else fn(model_arg)
    except QuantkitError:
        raise
    except Exception as e:
        raise ModelLoadError(f"--loader {spec!r}: the loader raised {type(e).__name__}: {e}") from e
    return normalize(result, f"--loader {spec!r}")


def from_loader(spec: str, model_arg: str | None) -> tuple[Loaded, str]:
    """apply(loader=...): call the loader -> (what it gave, the name the report shows)."""
    if model_arg is not None and not isinstance(model_arg, str):
        raise QuantkitError(f"apply: with loader=, the model argument is passed to the loader as a string, "
                            f"not a {type(model_arg).__name__}")
    got = call_loader(spec, model_arg)
    return got, f"loader:{spec}" + (f"({model_arg})" if model_arg else "")


def normalize(result: Any, what: str) -> Loaded:
    """A loader's return value (module, tuple or dict) -> Loaded."""
    if isinstance(result, nn.Module):
        return Loaded(result)
    if isinstance(result, dict):
        unknown = sorted(set(result) - set(_RESULT_KEYS))
        if unknown:
            raise ModelLoadError(f"{what}: returned a dict with unknown key {unknown[0]!r}; known: "
                                 f"{', '.join(_RESULT_KEYS)}")
        parts = [result.get(k) for k in _RESULT_KEYS]
    elif isinstance(result, (tuple, list)) and 1 <= len(result) <= 3:
        parts = list(result) + [None] * (3 - len(result))
    else:
        raise ModelLoadError(f"{what}: returned {type(result).__name__}; expected an nn.Module, a tuple "
                             "(model, tokenizer, calib) or a dict with 'model'")
    model, tokenizer, calib = parts
    if not isinstance(model, nn.Module):
        raise ModelLoadError(f"{what}: the model it returned is a {type(model).__name__}, not a torch nn.Module")
    return Loaded(model, tokenizer, None if calib is None else calib_batches(calib, what))


def calib_batches(batches: Iterable, what: str = "calibration batches") -> list:
    """Materialize and check calibration batches (they are read more than once: capture, teacher, student)."""
    if isinstance(batches, (torch.Tensor, dict)):
        batches = [batches]  # one batch given bare
    try:
        items = list(batches)
    except TypeError:
        raise ModelLoadError(f"{what}: calib must be an iterable of batches, not {type(batches).__name__}") from None
    out = []
    for i, b in enumerate(items):
        if isinstance(b, torch.Tensor):
            if b.is_floating_point() or b.dim() not in (1, 2):
                raise ModelLoadError(f"{what}: calibration batch {i} is a {b.dtype} tensor of shape {tuple(b.shape)}; "
                                     "expected integer input_ids [batch, seq] or a dict of forward kwargs")
            out.append(b.unsqueeze(0) if b.dim() == 1 else b)  # [seq] -> [1, seq]
        elif isinstance(b, dict) and b:
            out.append(dict(b))
        else:
            raise ModelLoadError(f"{what}: calibration batch {i} is a {type(b).__name__}; expected input_ids "
                                 "[batch, seq] or a dict of forward kwargs")
    if not out:
        raise ModelLoadError(f"{what}: the calibration batches are empty")
    return out


# --- walking a model that is not itself a transformers model ---------------------------------


def arch_for(model: nn.Module):
    """ArchInfo of the model, or of its transformers backbone with block paths from the model's root."""
    from transformers import PreTrainedModel

    from quantkit.arch import arch_info

    if hf_config(model) is not None:
        return arch_info(model)
    tried = []
    for name, sub in model.named_modules():
        if not name or not isinstance(sub, PreTrainedModel):
            continue
        try:
            info = arch_info(sub)
        except QuantkitError as e:
            tried.append(f"{name}: {e}")
            continue
        return replace(info, layers_path=f"{name}.{info.layers_path}")
    why = f" ({tried[0]})" if tried else ""
    raise UnsupportedArchitectureError(
        f"{type(model).__name__} has no config and no transformers decoder backbone{why}; quantkit walks a model "
        "through its decoder blocks (docs/loaders.md)")


def evaluable(model: nn.Module, tokenizer) -> bool:
    """apply's perplexity/KL need a transformers causal LM (logits over a vocabulary) and its tokenizer."""
    from transformers import PreTrainedModel

    return (tokenizer is not None and isinstance(model, PreTrainedModel)
            and getattr(model, "get_output_embeddings", lambda: None)() is not None)


# --- reloading a checkpoint written from a loader's model --------------------------------------

def load_checkpoint(path: str | Path, model: nn.Module, mode: str = "real") -> nn.Module:
    """Load a checkpoint quantkit wrote (compressed-tensors or dense) into `model`, a fresh instance
    of the same architecture (e.g. from the same loader): quantized linears become QLinears
    holding the checkpoint's codes and scales. Every tensor must match: no missing, no extra."""
    from quantkit.export.ct_reader import read_tensors, swap_quantized
    from quantkit.export.writer import tied_names

    path = Path(path)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"{path} is not a checkpoint directory (config.json: {e})") from None
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method")
    if method not in (None, "compressed-tensors"):
        raise ModelLoadError(f"{path}: reloading a {method} checkpoint into a loader's model is not supported; "
                             "compressed-tensors and dense checkpoints are")
    tensors = read_tensors(path)
    first = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = first.dtype if first is not None else torch.float32
    # QLinears built from the file's tensors: their buffers are already filled
    swapped = [n + "." for n in swap_quantized(model, tensors, qc, dtype, mode)]
    state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False, assign=True)
    tied = tied_names(model)
    missing = [k for k in missing if k not in tied and not k.startswith(tuple(swapped))]
    if missing or unexpected:
        what = f"missing {missing[0]}" if missing else f"unexpected {unexpected[0]}"
        raise ModelLoadError(f"{path} does not fit this {type(model).__name__}: {len(missing)} missing, "
                             f"{len(unexpected)} unexpected tensors ({what})")
    if tied and hasattr(model, "tie_weights"):
        model.tie_weights()
    return model.eval()

