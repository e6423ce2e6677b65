"""`rotate`: block-diagonal Hadamard rotations before quantization (docs/rotation.md).

Two kinds, both per decoder block (the pass streams):
  fuse_vo  value/output rotation fused into v_proj and o_proj (fused.py): exact, no online op,
           the checkpoint stays a plain quantized model that every engine runs.
  online   weights rotated offline, inputs rotated at run time (online.py): written as a
           compressed-tensors transform_config (export/ct_transform.py). transformers 5 ignores
           transform_config on load, so only quantkit's runtime (and vLLM) serve it correctly.

The math is in hadamard.py. The residual-stream rotation (QuaRot/SpinQuant R1) is not built: measured in
the FP4 bench it hurt every FP4 scheme (docs/rotation.md).
"""

from __future__ import annotations

from typing import ClassVar

from pydantic import Field, field_validator

from quantkit.passes.base import Pass, register_pass
from quantkit.passes.input_stats import drop_kept, transform_kept
from quantkit.passes.rotate.fused import fuse_value_output
from quantkit.passes.rotate.hadamard import RotationError, rotate
from quantkit.passes.rotate.online import attach_online_rotation
from quantkit.targets import Targets


def _rotated_moments(h, block: int):
    """X^T X of x R: R^T (X^T X) R, in float64 (hadamard.rotate), returned in h's dtype."""
    return rotate(rotate(h, block).T.contiguous(), block)


@register_pass
class Rotate(Pass):
    """Block-diagonal Hadamard rotations of linear inputs (fused v/o, and optional online transforms)."""

    name: ClassVar[str] = "rotate"
    summary: ClassVar[str] = "block-diagonal Hadamard rotations: fused value/output, optional online input transforms"
    provides: ClassVar[frozenset[str]] = frozenset({"rotated"})
    execution: ClassVar[str] = "block"
    # kept X^T X (input_stats): an online-rotated linear's becomes R^T X^T X R; o_proj's under fuse_vo is dropped
    keeps_input_stats: ClassVar[bool] = True

    block_size: int = Field(32, gt=0)  # Hadamard block (power of two dividing each rotated input dim)
    fuse_vo: bool = True  # rotate v_proj's output and o_proj's input per head (offline, exact)
    online: bool = False  # also rotate the inputs of `targets` at run time (compressed-tensors transform_config)
    targets: Targets = Targets()  # the linears that get an online input rotation
    # online rotations only: a role's own block (e.g. {down: 512}: down_proj's wider input allows a larger one);
    # each distinct block is written as its own transform scheme ("v" for block_size, "v<block>" for others)
    block_sizes: dict[str, int] = {}

    @field_validator("block_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v < 1 or v & (v - 1):
            raise ValueError(f"Hadamard block size must be a power of two, got {v}")
        return v

    @field_validator("block_sizes")
    @classmethod
    def _powers_of_two(cls, v: dict[str, int]) -> dict[str, int]:
        for role, b in v.items():
            if b < 1 or b & (b - 1):
                raise ValueError(f"Hadamard block size must be a power of two, got {role}: {b}")
        return v

    def block_for(self, role: str | None) -> int:
        """The online rotation's block for a linear of this role."""
        return self.block_sizes.get(role, self.block_size) if role else self.block_size

    def group_for(self, block: int) -> str:
        from quantkit.export.ct_transform import SCHEME

        return SCHEME if block == self.block_size else f"{SCHEME}{block}"

    @classmethod
    def recipe_problem(cls, passes: list, save: bool, layout: str) -> str | None:
        rotations = [i for i, p in enumerate(passes) if p.name == cls.name]
        if not rotations:
            return None
        if len(rotations) > 1:
            return "one rotate pass per recipe (a second rotation would compose with the first)"
        first = rotations[0]
        if any("quantized" in p.provided_facts() for p in passes[:first]):
            return "rotate must come before the passes that quantize (it rotates dense weights)"
        if passes[first].online and any("act_stats" in p.provided_facts() for p in passes[:first]):
            return ("rotate (online) must come before calibrate: activation statistics must be taken on the rotated "
                    "inputs the quantized layers will see")
        if save and passes[first].online and layout != "compressed-tensors":
            return (f"online rotations are stored as a compressed-tensors transform_config, but this recipe writes a "
                    f"{layout} checkpoint; quantize the rotated linears, set online: false, or output.save: false")
        return None

    def _key(self) -> str:
        return f"{self.name}:{id(self)}"

    def begin(self, ctx) -> None:
        if ctx.quantized:  # a direct call (recipes are refused earlier): QLinear codes cannot be rotated
            raise RotationError("rotate: the model is already quantized; put the rotate pass before quantize/gptq")
        names = self.targets.select(ctx.model, ctx.arch) if self.online else []
        if self.block_sizes and not self.online:
            raise RotationError("rotate: block_sizes sets online rotations' blocks; set online: true or drop it")
        roles = {r[1] for r in map(ctx.arch.role_of, names) if r}
        unknown = sorted(set(self.block_sizes) - roles)
        if unknown:
            raise RotationError(f"rotate: block_sizes role(s) {', '.join(unknown)} match no rotated linear; "
                                f"the roles here are {', '.join(sorted(roles)) or 'none'}")
        ctx.scratch[self._key()] = {"online": names, "fused": 0, "rotated": 0}

    def run_block(self, blk, ctx) -> None:
        state, arch = ctx.scratch[self._key()], ctx.arch
        fused_o = None
        if self.fuse_vo:
            try:
                v, o = arch.module_name(blk.index, "v"), arch.module_name(blk.index, "o")
            except KeyError:
                raise RotationError(f"rotate: fuse_vo needs separate v and o projections; {arch.model_type} "
                                    f"has none in block {blk.index} (set fuse_vo: false)") from None
            fuse_value_output(blk.model.get_submodule(v), blk.model.get_submodule(o), arch.head_dim, self.block_size)
            drop_kept(blk, [o])  # o_proj now reads per-head rotated values
            state["fused"] += 1
            fused_o = o
        for name in blk.select(state["online"]):
            if name == fused_o:
                continue  # its input is already rotated by the fused R; a second R would undo it (R R = I)
            block = self.block_for((arch.role_of(name) or (None, None))[1])
            attach_online_rotation(name, blk.model.get_submodule(name), block, self.group_for(block))
            transform_kept(blk, name, lambda h, b=block: _rotated_moments(h, b))
            state["rotated"] += 1

    def finish(self, ctx) -> None:
        state = ctx.scratch[self._key()]
        ctx.record(self.name, block_size=self.block_size, fused_vo_blocks=state["fused"],
                   online_linears=state["rotated"], **({"block_sizes": dict(self.block_sizes)} if self.block_sizes else {}))
