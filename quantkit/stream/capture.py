"""What each decoder block is called with, captured from the model's own forward.

The model's forward computes, before and between its blocks, everything a block needs besides
the hidden states: rotary tables, causal/sliding masks (which differ per layer type), position
ids. To get them without running any block, every block's `forward` is swapped for a catcher
that records its call and hands the hidden states straight through. The blocks' weights are
never touched, so this works on the streaming skeleton (blocks on the meta device) and costs
one embedding lookup and one head position per batch.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from quantkit.targets import hf_config


@dataclass
class Call:
    """One batch's call of one block, without the hidden states."""

    args: tuple
    kwargs: dict


@dataclass
class Captured:
    hidden: list[torch.Tensor]  # per batch: the first block's input hidden states [b, s, h]
    calls: list[list[Call]]  # calls[block][batch]
    ids: list[torch.Tensor]  # per batch: the token ids [b, s]


def _split(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Call]:
    if args:
        return args[0], Call(tuple(args[1:]), dict(kwargs))
    kwargs = dict(kwargs)
    return kwargs.pop("hidden_states"), Call((), kwargs)


@contextmanager
def swapped_forwards(blocks: Sequence[nn.Module], make):
    """Temporarily replace each block's forward by make(index)."""
    saved = [block.__dict__.get("forward") for block in blocks]  # an instance-level forward, if any
    for i, block in enumerate(blocks):
        block.forward = make(i)
    try:
        yield
    finally:
        for block, old in zip(blocks, saved):
            if old is None:
                del block.forward  # back to the class's forward
            else:
                block.forward = old


def model_call(model: nn.Module, ids: torch.Tensor | dict, keep_all_logits: bool = False):
    if isinstance(ids, dict):  # a --loader's calibration batch: the model's own forward kwargs
        return model(**ids)
    if hf_config(model) is None:  # a plain nn.Module (docs/loaders.md)
        return model(ids)
    kwargs = dict(input_ids=ids, use_cache=False)
    if not keep_all_logits:
        kwargs["logits_to_keep"] = 1
    if "logits_to_keep" not in kwargs:
        return model(**kwargs)
    try:
        return model(**kwargs)
    except (TypeError, IndexError):  # a forward without logits_to_keep, or one that mis-slices it (Falcon)
        kwargs.pop("logits_to_keep")
        return model(**kwargs)


# the call convention of a model's decoder blocks, learnt at the first capture: most transformers 5
# blocks return the hidden states, some (Falcon and ~30 others) a tuple that starts with them
_TUPLE_ATTR = "_quantkit_blocks_return_tuple"


def _passthrough(model: nn.Module, h: torch.Tensor):
    return (h,) if getattr(model, _TUPLE_ATTR, False) else h


@torch.inference_mode()
def capture(model: nn.Module, blocks: Sequence[nn.Module], id_batches: Iterable[torch.Tensor]) -> Captured:
    batches = list(id_batches)
    conventions = [getattr(model, _TUPLE_ATTR)] if hasattr(model, _TUPLE_ATTR) else [False, True]
    for k, as_tuple in enumerate(conventions):
        setattr(model, _TUPLE_ATTR, as_tuple)
        try:
            return _capture(model, blocks, batches)
        except (IndexError, RuntimeError, ValueError, TypeError):
            if k + 1 == len(conventions):
                raise
    raise AssertionError("unreachable")


def _capture(model: nn.Module, blocks: Sequence[nn.Module], batches: list[torch.Tensor]) -> Captured:
    hidden: list[torch.Tensor] = []
    calls: list[list[Call]] = [[] for _ in blocks]

    def make(i):
        def catcher(*args, **kwargs):
            h, call = _split(args, kwargs)
            if i == 0:
                hidden.append(h)
            calls[i].append(call)
            return _passthrough(model, h)

        return catcher

    with swapped_forwards(blocks, make):
        for ids in batches:
            model_call(model, ids)
    return Captured(hidden, calls, batches)


def block_output(out):
    """Decoder blocks return the hidden states, or a tuple that starts with them."""
    return out[0] if isinstance(out, (tuple, list)) else out


@torch.inference_mode()
def run_block(block: nn.Module, hidden: list[torch.Tensor], calls: list[Call]) -> list[torch.Tensor]:
    """The block's outputs for each batch."""
    return [block_output(block(h, *c.args, **c.kwargs)) for h, c in zip(hidden, calls)]


@torch.inference_mode()
def head_logits(model: nn.Module, blocks: Sequence[nn.Module], ids: torch.Tensor, final_hidden: torch.Tensor) -> torch.Tensor:
    """Logits [b, s, V] of the model's own tail (final norm, head, softcapping) on given last-block outputs."""
    last = len(blocks) - 1

    def make(i):
        def passthrough(*args, **kwargs):
            h, _ = _split(args, kwargs)
            return _passthrough(model, final_hidden if i == last else h)

        return passthrough

    with swapped_forwards(blocks, make):
        return model_call(model, ids, keep_all_logits=True).logits
