"""The pipeline: a plain for-loop over passes that times each and drives progress."""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext

from quantkit.context import Context
from quantkit.passes.base import Pass

# a progress factory: (description, total units) -> context manager yielding advance(n)
ProgressFactory = Callable[[str, int], AbstractContextManager]


def null_progress(_description: str, _total: int) -> AbstractContextManager:
    return nullcontext(lambda _n=1: None)


def run_passes(passes: list[Pass], ctx: Context, progress: ProgressFactory = null_progress) -> list[dict]:
    """Run passes in order; returns one timing row per pass."""
    rows = []
    if any(p.needs_teacher for p in passes):
        ctx.keep_teacher()
    for i, p in enumerate(passes):
        # what the passes after this one still need (lets calibrate skip unneeded statistics)
        ctx.needed = set().union(*(q.requirements() for q in passes[i + 1 :]))
        total = p.work_units(ctx) if hasattr(p, "work_units") else 0
        start = time.perf_counter()
        with progress(f"pass {i}: {p.name}", total) as advance:
            ctx.progress = advance
            p.run(ctx.model, ctx)
            ctx.progress = None
        ctx.provided |= set(p.provides)
        rows.append({"index": i, "pass": p.name, "seconds": round(time.perf_counter() - start, 3)})
    ctx.teacher = None
    return rows
