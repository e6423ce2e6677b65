"""The checkpoint's own forward in fp32, on the model already loaded in bf16/fp16, without a copy.

The run check needs a reference that carries no 16-bit rounding: the same dequantized weights,
multiplied in fp32. Widening the whole model would double its memory (a 7B bf16 model: 14 GB
more). Instead each module that owns parameters is widened just for its own forward and narrowed
back afterwards; bf16/fp16 -> fp32 -> bf16/fp16 is exact, so the model leaves bitwise as it came
and the extra memory is one module's fp32 copy. Activations are fp32 from the embedding on, so
every op in between (norms, attention, rotary) runs in fp32 too.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


def _own_floats(module: nn.Module) -> list[tuple[dict, str]]:
    """(the dict holding it, its name) of each floating tensor the module owns directly, below fp32."""
    found = []
    for table in (module._parameters, module._buffers):
        for name, t in table.items():
            if t is not None and t.is_floating_point() and t.element_size() < 4:
                found.append((table, name))
    return found


@contextmanager
def fp32_forward(model: nn.Module) -> Iterator[None]:
    """Inside, model's forward computes in fp32; every tensor keeps its dtype and bits outside."""
    undo: dict[int, list] = {}  # id(module) -> what its post-hook puts back

    def widen(module: nn.Module, _args) -> None:
        restore = undo.setdefault(id(module), [])
        for table, name in _own_floats(module):
            t = table[name]
            if isinstance(t, nn.Parameter):
                # through .data: a tied weight (one Parameter in the embedding and the head) is
                # widened wherever it is read
                restore.append(lambda t=t, dtype=t.dtype: setattr(t, "data", t.data.to(dtype)))
                t.data = t.data.float()
            else:
                restore.append(lambda table=table, name=name, dtype=t.dtype:
                               table.__setitem__(name, table[name].to(dtype)))
                table[name] = t.float()

    def narrow(module: nn.Module, _args=None, _out=None) -> None:
        for put_back in reversed(undo.pop(id(module), [])):
            put_back()

    handles = []
    for module in model.modules():
        if _own_floats(module):
            handles.append(module.register_forward_pre_hook(widen))
            handles.append(module.register_forward_hook(narrow))
    try:
        yield
    finally:
        for h in handles:
            h.remove()
        for mid in list(undo):  # a forward that raised midway left these widened
            for put_back in reversed(undo.pop(mid)):
                put_back()
