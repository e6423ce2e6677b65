"""Real-mode kernels for QLinear, chosen per format, device and input dtype (select.choose)."""

from __future__ import annotations

from torch import nn

from quantkit.nn.kernels.select import Choice, Device, choose

__all__ = ["Choice", "Device", "choose", "kernel_summary"]


def kernel_summary(model: nn.Module) -> list[dict]:
    """One row per quantized linear: which kernel its forward runs in its compute dtype, and why."""
    rows = []
    for name, module in model.named_modules():
        choice = getattr(module, "kernel", None)
        if isinstance(choice, Choice):
            rows.append({"module": name, "format": module.weight_format, "act": module.act_format,
                         "mode": module.mode, "dtype": str(module.compute_dtype).removeprefix("torch."),
                         "kernel": choice.label, "reason": choice.reason})
    return rows
