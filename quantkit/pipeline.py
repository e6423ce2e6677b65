"""The pipeline: the recipe's passes as stages, each stage one block loop or one whole-model pass.

Consecutive block passes share one block loop (quantkit.stream.loop.run_stage); a pass that
needs the whole model (MASA, QuantVLA's ATM/OHB) is a stage of its own and runs on the model
in memory. Times each stage and drives progress.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from quantkit.context import Context

# a progress factory: (description, total units) -> context manager yielding advance(n)
ProgressFactory = Callable[[str, int], AbstractContextManager]


def null_progress(_description: str, _total: int) -> AbstractContextManager:
    return nullcontext(lambda _n=1: None)


def run_passes(stage_list: list[list], ctx: Context, progress: ProgressFactory = null_progress, *,
               writer=None, evaluation=None, only: range | None = None) -> list[dict]:
    """Run each stage in order; -> one timing row per pass. writer/evaluation ride the (single) block loop."""
    from quantkit.stream.loop import run_stage

    rows = []
    if any(p.needs_teacher and p.execution != "block" for stage in stage_list for p in stage):
        ctx.keep_teacher()  # whole-model passes compare against the model as loaded, before any pass
    for k, stage in enumerate(stage_list):
        later = [p for s in stage_list[k + 1:] for p in s]
        ctx.needed_later = set().union(*(q.requirements() for q in later)) if later else set()
        names = "+".join(p.name for p in stage)
        start = time.perf_counter()
        if stage[0].execution == "block":
            with progress(f"{names}: blocks", ctx.arch.num_layers) as advance:
                run_stage(stage, ctx, writer=writer, evaluation=evaluation, progress=advance, only=only)
        else:
            p = stage[0]
            ctx.needed = ctx.needed_later
            with progress(f"pass: {p.name}", p.work_units(ctx)) as advance:
                ctx.progress = advance
                p.run(ctx.model, ctx)
                ctx.progress = None
            ctx.provided |= set(p.provided_facts())
        elapsed = round(time.perf_counter() - start, 3)
        for p in stage:
            # passes sharing a block loop share its time: "seconds" is the stage's
            rows.append({"index": len(rows), "pass": p.name, "stage": k, "seconds": elapsed})
    ctx.teacher = None
    return rows
