"""quantkit's transformers quantizer: loads quantkit-layout checkpoints (quant_method "quantkit").

The quantizer builds the dense skeleton, installs each quantkit module
(quantkit.export.quantkit_layout.install_modules) on the meta device, and transformers loads the
tensors into them by name. Importing this module imports transformers' quantizer registry (and,
through it, torchao when installed), so quantkit.hf_integration imports it only when
transformers itself imports that registry.
"""

from __future__ import annotations

import importlib
from typing import Any

import torch
from transformers.quantizers.auto import (
    AUTO_QUANTIZATION_CONFIG_MAPPING,
    AUTO_QUANTIZER_MAPPING,
    register_quantization_config,
    register_quantizer,
)
from transformers.quantizers.base import HfQuantizer
from transformers.utils.quantization_config import QuantizationConfigMixin

from quantkit.export.quantkit_layout import LAYOUT_VERSION, QUANT_METHOD, install_modules
from quantkit.hf_integration import HANDLER_MODULES


class QuantkitConfig(QuantizationConfigMixin):
    """``quantization_config`` of a quantkit-layout checkpoint (plain data, see the layout)."""

    def __init__(
        self,
        modules: dict[str, dict[str, Any]] | None = None,
        version: str | None = None,
        layout_version: int = LAYOUT_VERSION,
        **kwargs: Any,
    ):
        self.quant_method = QUANT_METHOD
        self.version = version
        self.layout_version = layout_version
        self.modules = dict(modules or {})
        kwargs.pop("quant_method", None)
        # unknown keys from a newer writer are kept so a re-save does not drop them
        for key, value in kwargs.items():
            setattr(self, key, value)

    def layout_dict(self) -> dict[str, Any]:
        return self.to_dict()


class QuantkitHfQuantizer(HfQuantizer):
    """Loads pre-quantized quantkit checkpoints; cannot quantize on the fly."""

    requires_calibration = True  # quantization happens in `quantkit apply`, not at load

    def validate_environment(self, *args: Any, **kwargs: Any) -> None:
        for name in HANDLER_MODULES:
            importlib.import_module(name)

    def _process_model_before_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        install_modules(model, self.quantization_config.layout_dict())
        return model

    def _process_model_after_weight_loading(self, model: torch.nn.Module, **kwargs: Any) -> torch.nn.Module:
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False


def register() -> None:
    """Idempotent: safe if quantkit is imported twice or the module is reloaded."""
    if QUANT_METHOD not in AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(QuantkitConfig)
    if QUANT_METHOD not in AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(QuantkitHfQuantizer)
