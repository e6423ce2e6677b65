"""Register quantkit's checkpoint layout with transformers, lazily.

After ``import quantkit`` a checkpoint whose config.json has
``quantization_config.quant_method == "quantkit"`` loads with
``AutoModelForCausalLM.from_pretrained(path)`` (the quantizer is in quantkit.hf_quantizer).

Registering needs transformers' quantizer registry, and importing that registry imports every
quantizer transformers has, torchao's among them (seconds, and on a CPU-only machine torchao
logs failures to load its CUDA kernels). So ``import quantkit`` does not import it: if the
registry is already imported, quantkit registers at once; otherwise a one-shot import hook
registers right after transformers imports it, which from_pretrained always does first.

Without quantkit, transformers only warns about the unknown quant_method; the checkpoint's
zero-size ``<module>.weight`` guards then make it raise a size mismatch (see the layout).
vLLM rejects the unknown quant_method itself.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

# modules whose import registers quantkit-layout module types (handlers); a plugin appends here
HANDLER_MODULES: list[str] = ["quantkit.export.quantkit_layout", "quantkit.export.masa_layout"]

REGISTRY_MODULE = "transformers.quantizers.auto"


def register_now() -> None:
    """Register the quantizer (imports the registry). Idempotent."""
    from quantkit.hf_quantizer import register as _register

    _register()


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds REGISTRY_MODULE's real spec once and runs register_now after the module executes."""

    def find_spec(self, fullname, path, target=None):
        if fullname != REGISTRY_MODULE:
            return None
        _remove_hook()  # one shot; also lets the lookup below reach the normal finders
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module):
            run_module(module)
            register_now()

        spec.loader.exec_module = exec_module  # this spec's own loader instance only
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _RegisterAfterImport)]


def register() -> None:
    """Register now if transformers' registry is loaded, else as soon as it is. Idempotent."""
    if REGISTRY_MODULE in sys.modules:
        register_now()
        return
    if importlib.util.find_spec("transformers") is None:
        return  # transformers missing: quantkit's library API still works without it
    if not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())


register()
