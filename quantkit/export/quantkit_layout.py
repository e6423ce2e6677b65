"""quantkit's own checkpoint layout (``quant_method: "quantkit"``).

For what compressed-tensors cannot hold (LLM.int8 outlier columns, MASA atoms and
coefficients). The checkpoint is a plain HF directory: ``model.safetensors`` holds the
state_dict as-is (module tensors under their own names) and ``config.json`` carries

    "quantization_config": {
        "quant_method": "quantkit",
        "version": "0.1.0",
        "modules": {"model.layers.0.self_attn.q_proj": {"type": "outlier_linear", ...}, ...}
    }

Loading (quantkit.hf_integration) builds the plain model on the meta device, then for each
entry calls the type's ``install(model, name, cfg)`` which puts an empty module of the right
shape at ``name``; transformers then loads the tensors into it by name.

A module type is registered once, by the module that owns the runtime class:

    class MyHandler(ModuleHandler):
        type_name = "my_linear"
        module_cls = MyLinear
        def config(self, module): return {"in_features": ..., "out_features": ...}
        def install(self, model, name, cfg): set_module(model, name, MyLinear.empty(**cfg))

    register_module_type(MyHandler())

Guard: a loader that does not know this layout must fail, never load garbage. transformers
only warns about an unknown ``quant_method`` and would load the checkpoint into the dense
model; so every quantkit module's ``<name>.weight`` is written as a zero-size tensor
(``GUARD_KEY``). The dense model expects ``[out, in]`` there, and transformers raises on the
size mismatch. Modules therefore must not hold a non-empty tensor named ``weight``;
``install_modules`` gives installed modules the zero-size guard buffer so it loads cleanly.

A handler may also install shared submodules (e.g. MASA's atom banks), either inside its
``install`` (idempotently) or by registering the bank's own module class as a type, so the
bank appears in ``modules``; give that handler ``order = -1`` so it is installed before the
layers that look it up (entries install by ascending ``order``, then in written order).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from quantkit.errors import FormatError, ModelLoadError
from quantkit.nn.outlier_linear import OutlierLinear
from quantkit.registry import Registry
from quantkit.targets import set_module  # noqa: F401  (re-exported for handlers)

QUANT_METHOD = "quantkit"
# layouts this reader understands; bump when a handler's config keys change incompatibly
LAYOUT_VERSION = 1
GUARD_KEY = "weight"  # the dense nn.Linear's key; written zero-size so plain loaders fail


class ModuleHandler:
    """How one quantkit runtime module type is described in config.json and rebuilt."""

    type_name: ClassVar[str] = ""
    module_cls: ClassVar[type[nn.Module]] = nn.Module
    # install priority: shared modules that others look up (atom banks) use a lower value
    order: ClassVar[int] = 0

    def matches(self, module: nn.Module) -> bool:
        return type(module) is self.module_cls

    def config(self, module: nn.Module) -> dict[str, Any]:
        """JSON-able description of module (shapes, options) sufficient for ``install``."""
        raise NotImplementedError

    def install(self, model: nn.Module, module_name: str, cfg: dict[str, Any]) -> None:
        """Put an empty module described by cfg at module_name (before weights load)."""
        raise NotImplementedError


QK_MODULE_TYPES: Registry[ModuleHandler] = Registry("quantkit module type", FormatError)


def register_module_type(handler: ModuleHandler) -> ModuleHandler:
    QK_MODULE_TYPES.add(handler.type_name, handler)
    return handler


def handler_for(module: nn.Module) -> ModuleHandler | None:
    for _, handler in QK_MODULE_TYPES.items():
        if handler.matches(module):
            return handler
    return None


def _package_version() -> str:
    try:
        import quantkit

        return str(quantkit.__version__)
    except (ImportError, AttributeError):
        from importlib.metadata import PackageNotFoundError, version

        try:
            return version("quantkit")
        except PackageNotFoundError:
            return "0+unknown"


def quantkit_modules(model: nn.Module) -> dict[str, tuple[ModuleHandler, nn.Module]]:
    """Registered-type modules in model, outermost only, in named_modules order."""
    found: dict[str, tuple[ModuleHandler, nn.Module]] = {}
    for name, module in model.named_modules():
        if any(name.startswith(p + ".") for p in found):
            continue  # a registered module owns its children
        handler = handler_for(module)
        if handler is not None:
            found[name] = (handler, module)
    return found


def has_quantkit_modules(model: nn.Module) -> bool:
    return bool(quantkit_modules(model))


def write_quantkit_config(model: nn.Module) -> dict[str, Any]:
    """The ``quantization_config`` dict for a model holding quantkit-layout modules."""
    return config_from(module_tensors("", model)[1])


def _guard() -> torch.Tensor:
    return torch.zeros(0, dtype=torch.uint8)


def add_guard(module: nn.Module) -> None:
    """Give module the zero-size ``weight`` buffer the checkpoint carries."""
    existing = getattr(module, GUARD_KEY, None)
    if existing is None:
        module.register_buffer(GUARD_KEY, _guard())
    elif not (isinstance(existing, torch.Tensor) and existing.numel() == 0):
        raise FormatError(
            f"{type(module).__name__} holds a non-empty '{GUARD_KEY}'; quantkit-layout modules must store "
            f"their tensors under other names so a dense loader fails on the checkpoint"
        )


def quantkit_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors to save: state_dict + guards, tied duplicates dropped, contiguous."""
    return saveable(module_tensors("", model)[0])


def module_tensors(prefix: str, module: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, Any]]]:
    """One subtree in quantkit's layout: (tensors by full name with guards, config per quantkit module)."""
    dot = prefix + "." if prefix else ""
    sd = dict(module.state_dict(prefix=dot))
    modules: dict[str, dict[str, Any]] = {}
    for sub, (handler, m) in quantkit_modules(module).items():
        name = dot + sub if sub else prefix
        key = f"{name}.{GUARD_KEY}" if name else GUARD_KEY
        existing = sd.get(key)
        if existing is not None and existing.numel() > 0:
            raise FormatError(
                f"{handler.type_name} module {name!r} stores a non-empty '{GUARD_KEY}'; rename it so that a "
                f"loader without quantkit fails instead of loading it into a dense Linear"
            )
        sd[key] = _guard()
        cfg = handler.config(m)
        if "type" in cfg:
            raise FormatError(f"{handler.type_name}: config() must not set the reserved key 'type'")
        modules[name] = {"type": handler.type_name, **cfg}
    return sd, modules


def config_from(modules: dict[str, dict[str, Any]]) -> dict[str, Any]:
    out = {
        "quant_method": QUANT_METHOD,
        "version": _package_version(),
        "layout_version": LAYOUT_VERSION,
        "modules": modules,
    }
    try:
        json.dumps(out, allow_nan=False)
    except (TypeError, ValueError) as e:  # a handler returned tensors or other non-JSON values
        raise FormatError(f"quantkit layout config is not JSON-serializable: {e}") from None
    return out


def saveable(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Tensors safetensors can write: tied duplicates dropped (first name kept), contiguous, CPU."""
    out: dict[str, torch.Tensor] = {}
    seen: set[tuple] = set()
    for key, t in sd.items():
        if t.numel() > 0:  # tied weights (embed_tokens / lm_head) share storage
            ident = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)
            if ident in seen:
                continue
            seen.add(ident)
        out[key] = t.detach().contiguous().cpu()
    return out


def save_quantkit_checkpoint(model: nn.Module, out_dir: str | Path) -> Path:
    """Write config.json (with the quantkit quantization_config) and model.safetensors.

    No temp-dir/rename or overwrite policy here: callers own that (the CLI's writer).
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    config.quantization_config = write_quantkit_config(model)
    config.save_pretrained(out)
    generation_config = getattr(model, "generation_config", None)
    if generation_config is not None:
        generation_config.save_pretrained(out)
    save_file(quantkit_state_dict(model), out / "model.safetensors", metadata={"format": "pt"})
    return out


def install_modules(model: nn.Module, qconfig: dict[str, Any]) -> list[str]:
    """Install every module described in a quantkit ``quantization_config``; returns names.

    Module construction honours the ambient device (transformers calls this on meta).
    """
    if qconfig.get("layout_version", LAYOUT_VERSION) > LAYOUT_VERSION:
        raise ModelLoadError(
            f"checkpoint uses quantkit layout version {qconfig['layout_version']}, this quantkit "
            f"reads up to {LAYOUT_VERSION}; upgrade quantkit"
        )
    todo = []
    for name, entry in qconfig.get("modules", {}).items():
        entry = dict(entry)
        type_name = entry.pop("type", None)
        if type_name is None or type_name not in QK_MODULE_TYPES:
            known = ", ".join(QK_MODULE_TYPES) or "none"
            raise ModelLoadError(
                f"checkpoint module {name!r} has quantkit type {type_name!r}, which this quantkit "
                f"does not know (known: {known}); upgrade quantkit or import the plugin that defines it"
            )
        todo.append((QK_MODULE_TYPES.get(type_name), name, entry))
    todo.sort(key=lambda item: item[0].order)  # stable: written order within one priority
    for handler, name, entry in todo:
        handler.install(model, name, entry)
        add_guard(model.get_submodule(name))
    return [name for _, name, _ in todo]


# -- built-in module types -------------------------------------------------------------------


class OutlierLinearHandler(ModuleHandler):
    """LLM.int8() (quantkit.nn.outlier_linear.OutlierLinear)."""

    type_name = "outlier_linear"

    module_cls = OutlierLinear

    def config(self, module: nn.Module) -> dict[str, Any]:
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bias": module.bias is not None,
            "threshold": None if math.isinf(module.threshold) else module.threshold,  # strict JSON has no inf
            "outliers": module.outliers,
            "n_static": int(module.outlier_idx.numel()),
            "bnb_compat": module.bnb_compat,
            "dtype": str(module.dtype).removeprefix("torch."),
        }

    def install(self, model: nn.Module, module_name: str, cfg: dict[str, Any]) -> None:
        cfg = dict(cfg)
        if cfg.get("threshold") is None:
            cfg["threshold"] = math.inf
        dtype = getattr(torch, cfg.pop("dtype"))
        in_f, out_f = cfg.pop("in_features"), cfg.pop("out_features")
        set_module(model, module_name, OutlierLinear(in_f, out_f, dtype=dtype, **cfg))


register_module_type(OutlierLinearHandler())
