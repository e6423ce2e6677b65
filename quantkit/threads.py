"""torch's intra-op thread count, lowered for a block of code and restored after."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch


@contextmanager
def single_thread(active: bool = True) -> Iterator[None]:
    """One intra-op thread inside (when active). For many small ops: on a busy CPU, the threads
    spend more time in barriers than in work (measured in gptq's column loop and verify's scale
    checks; their callers say by how much)."""
    if not active:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
