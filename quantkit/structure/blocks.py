"""Where the decoder blocks are: the repeated ModuleList of the class transformers names in
`_no_split_modules` (the unit it never splits across devices, i.e. one decoder block)."""

from __future__ import annotations

from torch import nn

from quantkit.errors import UnsupportedArchitectureError


def _no_split_classes(model: nn.Module) -> set[str]:
    names: set[str] = set()
    for mod in model.modules():  # a wrapper (VLM, LM head model) may hold the list on a child
        found = getattr(mod, "_no_split_modules", None)
        if found:
            names.update(found)
    return names


def find_blocks(model: nn.Module) -> str:
    """Dotted path of the ModuleList holding the decoder blocks."""
    block_classes = _no_split_classes(model)
    candidates: list[tuple[int, str]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        kinds = {type(child).__name__ for child in mod}
        if block_classes and kinds <= block_classes:
            candidates.append((len(mod), name))
    if not candidates and not block_classes:
        # no metadata: the longest list of one repeated class that holds parameters
        for name, mod in model.named_modules():
            if isinstance(mod, nn.ModuleList) and len(mod) > 1 and len({type(c) for c in mod}) == 1:
                if any(True for _ in mod[0].parameters()):
                    candidates.append((len(mod), name))
    if not candidates:
        what = f"no ModuleList of {', '.join(sorted(block_classes))}" if block_classes else (
            "no _no_split_modules and no ModuleList of repeated blocks")
        raise UnsupportedArchitectureError(f"cannot find the decoder blocks of {type(model).__name__}: {what}")
    # the longest list wins; on a tie the outermost (shortest path) one
    return min(candidates, key=lambda c: (-c[0], c[1].count("."), c[1]))[1]
