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
    # how the pass runs: "block" = run_block() on each decoder block inside the shared block loop
    # (streams); "model" = run() on the whole model in memory (execution: whole only)
    execution: ClassVar[str] = "model"
    # the checkpoint layout the modules this pass creates need (None: it leaves dense weights)
    output_layout: ClassVar[str | None] = None
    # block passes: the Hessians an earlier pass kept in the block (passes/input_stats.py) are still right after
    # run_block, because the pass leaves the linears' inputs unchanged or transforms the kept ones as it changes
    # them; after any other pass the block loop drops them
    keeps_input_stats: ClassVar[bool] = False
    # block passes: run_block takes kept Hessians when an earlier pass of the loop kept them
    reads_input_hessians: ClassVar[bool] = False

    def run(self, model: nn.Module, ctx: Any) -> None:  # ctx: quantkit.context.Context
        """Whole model in memory. Block passes get this for free: the block loop over every block."""
        if self.execution != "block":
            raise NotImplementedError
        from quantkit.stream.loop import run_stage

        run_stage([self], ctx)

    # -- block passes --------------------------------------------------------------------------
    def begin(self, ctx: Any) -> None:
        """Before the first block (e.g. load the calibration buffer)."""

    def needs_inputs(self, ctx: Any) -> bool:
        """Whether run_block reads the blocks' calibration inputs (the loop then propagates them)."""
        return False

    def run_block(self, blk: Any, ctx: Any) -> None:  # blk: quantkit.stream.loop.BlockView
        raise NotImplementedError

    def run_rest(self, model: nn.Module, ctx: Any) -> None:
        """After the last block: targets outside the decoder blocks (e.g. an explicitly included lm_head)."""

    def finish(self, ctx: Any) -> None:
        """After every block: the pass's report row."""

    def work_units(self, ctx: Any) -> int:
        return 0

    @classmethod
    def recipe_problem(cls, passes: list, save: bool, layout: str) -> str | None:
        """Why this pass's instances in `passes` cannot run or be stored as the recipe orders them, or None
        (recipe validation, before any weight loads; layout: the output layout the recipe would write)."""
        return None

    def check_model(self, model: Any) -> None:
        """Right after loading, before any heavy work: raise a QuantkitError if this model cannot
        take the pass (e.g. QuantVLA's scope names modules it lacks). Default: nothing to check."""

    def requirements(self) -> frozenset[str]:
        """Facts this configured pass needs; override when they depend on fields."""
        return self.requires

    def provided_facts(self) -> frozenset[str]:
        """Facts this configured pass provides; override when they depend on fields."""
        return self.provides


PASSES: Registry[type[Pass]] = Registry("pass", RecipeError)


def register_pass(cls: type[Pass]) -> type[Pass]:
    PASSES.add(cls.name, cls)
    return cls
