"""Module selection: fnmatch include/exclude globs over module names, plus roles.

Defaults users expect: lm_head, embeddings, norms and MoE routers are never selected unless a
recipe includes them explicitly.
"""

from __future__ import annotations

from fnmatch import fnmatchcase

from pydantic import BaseModel, ConfigDict
from torch import nn

from quantkit.arch import ArchInfo

DEFAULT_EXCLUDE = ("lm_head", "*embed*", "*norm*", "*.router", "*.mlp.gate", "*.block_sparse_moe.gate")


try:  # GPT-2 style blocks use Conv1D: a linear with its weight stored [in, out]
    from transformers.pytorch_utils import Conv1D
except ImportError:  # pragma: no cover
    Conv1D = ()


def is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def hf_config(model: nn.Module):
    """The model's transformers config, or None for a plain nn.Module (a --loader model, docs/loaders.md)."""
    config = getattr(model, "config", None)
    return config if hasattr(config, "to_dict") else None


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put module at dotted path name, replacing what is there or adding a new child."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def linear_weight(module: nn.Module):
    """The weight as [out, in], whatever the module stores."""
    if Conv1D and isinstance(module, Conv1D):
        return module.weight.t()
    return module.weight


def as_linear(module: nn.Module) -> nn.Module:
    """An nn.Linear view of a GPT-2 Conv1D (weight transposed to [out, in]); nn.Linear unchanged."""
    if not (Conv1D and isinstance(module, Conv1D)):
        return module
    w = module.weight.t()  # [out, in]
    lin = nn.Linear(w.shape[1], w.shape[0], bias=module.bias is not None, device="meta", dtype=w.dtype)
    lin.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if module.bias is not None:
        lin.bias = module.bias
    return lin


class Targets(BaseModel):
    """Which linears a pass acts on. Empty include means every block linear."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    include: list[str] = []
    exclude: list[str] = []
    roles: list[str] = []  # e.g. ["q", "k", "v", "o"]; empty = all roles
    layers: list[int] = []  # empty = all layers

    def covers(self, name: str, layer: int, component: str) -> bool:
        """Whether these targets take a block module that is not a plain linear (MoE experts,
        routers): `include` must name it when given, `exclude` drops, `roles` and `layers` filter."""
        if self.include and not any(fnmatchcase(name, p) for p in self.include):
            return False
        if any(fnmatchcase(name, p) for p in self.exclude):
            return False
        return (not self.roles or component in self.roles) and (not self.layers or layer in self.layers)

    def select(self, model: nn.Module, arch: ArchInfo, kind=is_linear) -> list[str]:
        names = []
        for name, module in model.named_modules():
            if not kind(module):
                continue
            explicit = any(fnmatchcase(name, p) for p in self.include)
            if self.include and not explicit:
                continue
            if not explicit and any(fnmatchcase(name, p) for p in DEFAULT_EXCLUDE):
                continue
            if any(fnmatchcase(name, p) for p in self.exclude):
                continue
            where = arch.role_of(name)
            if not self.include and where is None:
                continue  # only decoder-block linears unless named explicitly
            if self.roles and (where is None or where[1] not in self.roles):
                continue
            if self.layers and (where is None or where[0] not in self.layers):
                continue
            names.append(name)
        return names
