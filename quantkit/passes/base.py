"""Pass base class and registry.

A pass is a frozen pydantic model: its fields are its configuration, ``run(model, ctx)`` is
its behaviour. ``requires``/``provides`` name context facts (e.g. ``calib``, ``act_stats``,
``quantized``) so that a recipe in the wrong order is rejected before any weights load.
State lives in the Context, never on the pass.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import nn

from quantkit.errors import RecipeError
from quantkit.registry import Registry


class Pass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ClassVar[str] = ""
    summary: ClassVar[str] = ""
    requires: ClassVar[frozenset[str]] = frozenset()
    provides: ClassVar[frozenset[str]] = frozenset()
    # passes that compare against the unmodified model set this; the pipeline keeps a copy
    needs_teacher: ClassVar[bool] = False

    def run(self, model: nn.Module, ctx: Any) -> None:  # ctx: quantkit.context.Context
        raise NotImplementedError

    def requirements(self) -> frozenset[str]:
        """Facts this configured pass needs; override when they depend on fields."""
        return self.requires


PASSES: Registry[type[Pass]] = Registry("pass", RecipeError)


def register_pass(cls: type[Pass]) -> type[Pass]:
    PASSES.add(cls.name, cls)
    return cls
