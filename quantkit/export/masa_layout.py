"""MASA in quantkit's own checkpoint layout: the ``masa`` and ``masa_bank`` module types.

config.json describes each DictLinear (its bank, atom count, residual rank) and each bank
(its shape); model.safetensors holds ``masa_banks.<role>_<group>.atoms`` once per bank and
each layer's ``coeffs``/``residual_a``/``residual_b`` under the layer's own name.
Also ``masa_param_counts`` for ``quantkit inspect``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from quantkit.export.quantkit_layout import ModuleHandler, register_module_type, set_module
from quantkit.nn.dict_linear import BANKS_ATTR, AtomBank, DictLinear, banks

MASA_TYPE = "masa"
BANK_TYPE = "masa_bank"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _ensure_bank(model: nn.Module, bank_name: str, n_atoms: int, d_out: int, d_in: int, dtype: str) -> AtomBank:
    """The bank at bank_name, created empty if absent (layers and banks install in any order)."""
    prefix = BANKS_ATTR + "."
    if not bank_name.startswith(prefix):
        raise ValueError(f"masa bank {bank_name!r} must live under {prefix}")
    container = banks(model)
    key = bank_name[len(prefix) :]
    if key not in container:
        container[key] = AtomBank.empty(n_atoms, d_out, d_in, getattr(torch, dtype))
    return container[key]


class MasaBankHandler(ModuleHandler):
    type_name = BANK_TYPE
    module_cls = AtomBank

    def config(self, module: AtomBank) -> dict[str, Any]:
        s, out, inp = module.atoms.shape
        return {"n_atoms": s, "out_features": out, "in_features": inp, "dtype": _dtype_name(module.atoms.dtype)}

    def install(self, model: nn.Module, module_name: str, cfg: dict[str, Any]) -> None:
        _ensure_bank(model, module_name, cfg["n_atoms"], cfg["out_features"], cfg["in_features"], cfg["dtype"])


class MasaLinearHandler(ModuleHandler):
    type_name = MASA_TYPE
    module_cls = DictLinear

    def config(self, module: DictLinear) -> dict[str, Any]:
        return {
            "in_features": module.in_features,
            "out_features": module.out_features,
            "bank": module.bank_name,
            "n_atoms": module.n_atoms,
            "rank": module.rank,
            "bias": module.bias is not None,
            "dtype": _dtype_name(module.bank.atoms.dtype),
            "materialize": module.materialize,
        }

    def install(self, model: nn.Module, module_name: str, cfg: dict[str, Any]) -> None:
        bank = _ensure_bank(model, cfg["bank"], cfg["n_atoms"], cfg["out_features"], cfg["in_features"], cfg["dtype"])
        module = DictLinear.empty(
            bank,
            cfg["bank"],
            rank=cfg["rank"],
            bias=cfg["bias"],
            dtype=getattr(torch, cfg["dtype"]),
            materialize=cfg.get("materialize", True),
        )
        set_module(model, module_name, module)


register_module_type(MasaBankHandler())
register_module_type(MasaLinearHandler())


# ----------------------------------------------------------------------------- inspect


def masa_param_counts(model_or_config: Any) -> dict[str, Any]:
    """Parameter counts of the MASA-shared layers, from a model or a (quantization) config.

    Returns layers, original (dense params of those layers), atoms, coefficients, residual,
    stored (the three together), reduction, and the same per projection role.
    """
    entries = _entries(model_or_config)
    roles: dict[str, dict[str, int]] = {}
    seen_banks: set[str] = set()
    for e in entries:
        role = e["bank"].rpartition(".")[2].rpartition("_")[0] or "?"  # masa_banks.<role>_<group>
        r = roles.setdefault(role, {"layers": 0, "original": 0, "atoms": 0, "coefficients": 0, "residual": 0})
        r["layers"] += 1
        r["original"] += e["out_features"] * e["in_features"]
        r["coefficients"] += e["n_atoms"]
        r["residual"] += e["rank"] * (e["out_features"] + e["in_features"])
        if e["bank"] not in seen_banks:
            seen_banks.add(e["bank"])
            r["atoms"] += e["n_atoms"] * e["out_features"] * e["in_features"]
    for r in roles.values():
        r["stored"] = r["atoms"] + r["coefficients"] + r["residual"]
    total = {k: sum(r[k] for r in roles.values()) for k in ("layers", "original", "atoms", "coefficients", "residual", "stored")}
    total["banks"] = len(seen_banks)
    total["reduction"] = 1.0 - total["stored"] / total["original"] if total["original"] else 0.0
    total["roles"] = roles
    return total


def _entries(obj: Any) -> list[dict[str, Any]]:
    if isinstance(obj, nn.Module):
        return [
            {"bank": m.bank_name, "n_atoms": m.n_atoms, "rank": m.rank, "out_features": m.out_features,
             "in_features": m.in_features}
            for m in obj.modules()
            if isinstance(m, DictLinear)
        ]
    qconfig = obj
    if not isinstance(obj, dict):  # a transformers PretrainedConfig
        qconfig = getattr(obj, "quantization_config", None) or {}
        if not isinstance(qconfig, dict):
            qconfig = qconfig.to_dict()
    qconfig = qconfig.get("quantization_config", qconfig)  # a whole config.json dict
    return [e for e in qconfig.get("modules", {}).values() if e.get("type") == MASA_TYPE]
