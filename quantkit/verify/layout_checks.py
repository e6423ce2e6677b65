"""Checks for quantkit's own layout (quant_method "quantkit"): every entry names a known module type
and a module of the model, and carries the zero-size guard that makes dense loaders fail.
"""

from __future__ import annotations

from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.result import VerifyResult


def check_quantkit_layout(ckpt: Checkpoint, result: VerifyResult) -> None:
    from quantkit.export import masa_layout  # noqa: F401  (registers MASA's module types)
    from quantkit.export import quantkit_layout as layout
    entries = ckpt.qc.get("modules")
    if not isinstance(entries, dict) or not entries:
        result.error("config.layout", "quantkit layout has no 'modules' entries")
        return
    version = ckpt.qc.get("layout_version")
    if version is not None and version > layout.LAYOUT_VERSION:
        result.error("config.layout", f"layout_version {version} is newer than this quantkit reads ({layout.LAYOUT_VERSION})")
    known = set(layout.QK_MODULE_TYPES)
    for name, entry in entries.items():
        kind = entry.get("type") if isinstance(entry, dict) else None
        if kind not in known:
            result.error("config.layout", f"unknown module type {kind!r}; known: {', '.join(sorted(known))}", name)
        if ckpt.skeleton_note is None and name not in ckpt.modules:
            result.warn("config.layout", "names no module of the model (a shared bank, or a wrong name)", name)
        guard = ckpt.tensors.get(f"{name}.{layout.GUARD_KEY}")
        if name in ckpt.modules and ckpt.modules[name].is_linear and (guard is None or 0 not in guard.shape):
            result.error("tensors.guard", f"{name}.{layout.GUARD_KEY} is not the zero-size guard, so a loader "
                         "without quantkit would load this layer as dense", name)
    head = ckpt.lm_head
    if head is not None and head in entries:
        result.warn("config.lm_head", "lm_head is stored in quantkit's layout", head)
