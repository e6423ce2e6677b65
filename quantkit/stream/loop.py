"""The block loop every block pass runs in, whole-model or streaming.

For each decoder block: onload it, let the reference evaluation see it unchanged, run each
pass's run_block on it (passes read the block's calibration inputs: the outputs of the blocks
before it, already quantized), propagate the calibration inputs through the finished block,
let the evaluation see the finished block, hand it to the writer, release it.

`whole` and `streaming` execution differ only in the residency (weights already in memory, or
read from the shards at onload and dropped at release), so both write the same bytes.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from quantkit.errors import RecipeError
from quantkit.passes.input_stats import KEPT, drop_kept
from quantkit.stream.capture import Call, capture, run_block
from quantkit.stream.plan import sweeps_first
from quantkit.stream.residency import WholeResidency


@dataclass
class BlockView:
    """One decoder block as the passes see it."""

    index: int
    prefix: str  # e.g. "model.layers.3"
    module: nn.Module
    model: nn.Module
    hidden: list[torch.Tensor] | None = None  # calibration inputs per batch, [b, s, h]
    calls: list[Call] | None = None  # the rest of each batch's call (masks, rotary tables)
    extra: dict = field(default_factory=dict)

    def owns(self, name: str) -> bool:
        return name.startswith(self.prefix + ".")

    def select(self, names: list[str]) -> list[str]:
        return [n for n in names if self.owns(n)]

    def forward(self) -> list[torch.Tensor]:
        """Run the block (as it is now) on its calibration inputs; -> outputs per batch."""
        if self.hidden is None:
            raise RuntimeError("internal: this block has no calibration inputs (no pass asked for them)")
        return run_block(self.module, self.hidden, self.calls)


def block_prefixes(ctx) -> list[str]:
    return [f"{ctx.arch.layers_path}.{i}" for i in range(ctx.arch.num_layers)]


def first_sweep_pass(passes) -> int | None:
    """Index of the first pass that needs every block's statistics before changing any (MASA), or None."""
    return next((k for k, p in enumerate(passes) if sweeps_first(p)), None)


def run_stage(passes, ctx, *, writer=None, evaluation=None, progress: Callable[[int], None] | None = None,
              only: range | None = None) -> None:
    """Run block passes over every decoder block (or the blocks in `only`: a rank's share), in order, once.

    A pass that needs every block first (it has observe_block/fit, e.g. MASA) splits the stage into
    two sweeps: sweep 1 runs the passes before it and its observe_block on every block, then its
    fit(); sweep 2 runs it (run_block) and the passes after it, with the writer and the evaluation.
    Between the sweeps a streaming run holds only what fit() kept, never the blocks.
    """
    model = ctx.model
    for i, p in enumerate(passes):
        ctx.needed = set().union(*(q.requirements() for q in passes[i + 1:])) | getattr(ctx, "needed_later", set())
        if any(q.reads_input_hessians for q in passes[i + 1:]):
            ctx.needed.add(KEPT)  # a later pass of this loop takes the X^T X this one may keep
        p.begin(ctx)
    ctx.needed = set()
    split = first_sweep_pass(passes)
    if split is not None:
        if only is not None:
            raise RecipeError(f"pass {passes[split].name!r} needs every block's statistics; it cannot split blocks "
                              "across processes")
        observer = passes[split]
        _sweep(passes[:split], ctx, observer=observer)
        observer.fit(ctx)
        passes_now = passes[split:]
    else:
        passes_now = passes
    _sweep(passes_now, ctx, writer=writer, evaluation=evaluation, progress=progress, only=only)
    for p in passes:
        if only is None or 0 in only:  # targets outside the blocks belong to the first rank
            p.run_rest(model, ctx)
        p.finish(ctx)
        ctx.provided |= set(p.provided_facts())


def _sweep(passes, ctx, *, observer=None, writer=None, evaluation=None,
           progress: Callable[[int], None] | None = None, only: range | None = None) -> None:
    """One pass over the blocks: onload, [reference eval], passes, [observer], propagate, [eval, write], release."""
    model, arch = ctx.model, ctx.arch
    residency = getattr(ctx, "residency", None) or WholeResidency(model)
    blocks = list(arch.layers(model))
    prefixes = block_prefixes(ctx)
    need_inputs = any(p.needs_inputs(ctx) for p in passes)
    if observer is not None:
        need_inputs = need_inputs or observer.observe_needs_inputs(ctx)
    captured = capture(model, blocks, ctx.calib_batches()) if need_inputs else None
    store = getattr(residency, "offload", None)  # --offload-dir: the calibration states live in files

    def keep(states: list[torch.Tensor]) -> list[torch.Tensor]:
        return [store.put(h, "calib") for h in states] if store is not None else states

    hidden = keep(captured.hidden) if captured else None
    device = ctx.device
    keep_original = any(p.needs_teacher for p in passes)
    for i, (prefix, block) in enumerate(zip(prefixes, blocks)):
        if only is not None and i not in only:
            continue
        residency.onload(prefix)
        if evaluation is not None:
            evaluation.reference(i, block)
        blk = BlockView(i, prefix, block, model, hidden, captured.calls[i] if captured else None)
        if keep_original:  # the block as loaded, for passes that compare against it (one block, not a model)
            blk.extra["original"] = copy.deepcopy(block).eval()
        for p in passes:
            ctx.progress = None
            p.run_block(blk, ctx)
            if not p.keeps_input_stats:
                drop_kept(blk)  # the pass may have changed the linears' inputs in a way no one tracked
        if observer is not None:
            observer.observe_block(blk, ctx)
        if captured is not None and i + 1 < len(blocks):
            # the observer, last to see the block, may already have run it on these inputs
            outputs = blk.extra.pop("outputs", None)
            outputs = [h.to(device) for h in (outputs if outputs is not None else blk.forward())]
            if store is not None:
                for h in hidden:  # this block's inputs are spent: their files go (mappings stay valid)
                    store.drop(h)
            hidden = keep(outputs)
        if evaluation is not None:
            evaluation.quantized(i, block)
        if writer is not None:
            writer.add_block(prefix, block)
        residency.release(prefix)
        if progress:
            progress(1)
