"""Record the dataflow of one decoder block: which op made which tensor, which linear read which.

The block's inputs come from the model's own forward (stopped at the first block), so every
architecture prepares its rotary tables, masks and kwargs itself. A block whose weights are on
the meta device (the streaming skeleton) is traced on a CPU copy with small random weights:
structure does not depend on the values, and data-dependent code (MoE routing) needs real ones.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

from quantkit.errors import UnsupportedArchitectureError

TRACE_TOKENS = 8  # enough positions for masks and routing, small enough to be free


class _Stop(Exception):
    """Raised from the first block's pre-hook once its inputs are captured."""


def _is_meta(t) -> bool:
    return isinstance(t, torch.Tensor) and t.is_meta


def _concrete(t):
    """Replace a meta tensor from the skeleton's forward with a CPU stand-in of the same shape."""
    if not _is_meta(t):
        return t
    if t.dtype == torch.bool:
        return torch.ones(t.shape, dtype=t.dtype)
    if t.dtype.is_floating_point:
        return torch.randn(t.shape, generator=torch.Generator().manual_seed(0)).to(t.dtype) * 0.02
    return torch.zeros(t.shape, dtype=t.dtype)


@contextmanager
def _standins(model: nn.Module, blocks_path: str):
    """Meta tensors outside the decoder blocks (embeddings, rotary tables, norms of a skeleton) read
    as zeros for the duration: stride-0 views, so even a large embedding costs no memory."""
    swapped = []
    for mod_name, mod in model.named_modules():
        if mod_name == blocks_path or mod_name.startswith(blocks_path + "."):
            continue
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if _is_meta(t):
                    zero = torch.zeros((), dtype=t.dtype).expand(t.shape)
                    store[key] = nn.Parameter(zero, requires_grad=False) if isinstance(t, nn.Parameter) else zero
                    swapped.append((store, key, t))
    try:
        yield bool(swapped)
    finally:
        for store, key, t in swapped:
            store[key] = t


def _random_like(t):
    if isinstance(t, torch.Tensor) and t.dtype.is_floating_point and t.dim() >= 2:
        return torch.randn(t.shape, generator=torch.Generator().manual_seed(0)).to(t.dtype)
    return t


@torch.no_grad()
def capture_block_inputs(model: nn.Module, blocks_path: str, vocab_size: int) -> tuple[tuple, dict]:
    """(args, kwargs) the model passes to its first decoder block for a short prompt."""
    seen: dict[str, tuple] = {}
    first_block = model.get_submodule(blocks_path)[0]

    def grab(_mod, args, kwargs):
        seen["call"] = (args, kwargs)
        raise _Stop

    handle = first_block.register_forward_pre_hook(grab, with_kwargs=True)
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    weight = getattr(emb, "weight", None)
    device = weight.device if isinstance(weight, torch.Tensor) and not weight.is_meta else torch.device("cpu")
    ids = (torch.arange(TRACE_TOKENS, device=device) % max(vocab_size, 1))[None]  # [1, T]
    try:
        with _standins(model, blocks_path) as stood_in:
            try:
                model(input_ids=ids, use_cache=False)
            except TypeError as exc:  # a forward without a use_cache argument
                if "use_cache" not in str(exc):
                    raise
                model(input_ids=ids)
    except _Stop:
        pass
    except Exception as exc:  # noqa: BLE001 - any failure here means the structure is unknown
        raise UnsupportedArchitectureError(
            f"cannot run {type(model).__name__} up to its first decoder block to trace it: "
            f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        handle.remove()
    if "call" not in seen:
        raise UnsupportedArchitectureError(f"{type(model).__name__}'s forward never called its decoder blocks")
    args, kwargs = seen["call"]
    args, kwargs = tree_map(_concrete, args), tree_map(_concrete, kwargs)
    if stood_in:  # zero embeddings make zero hidden states: give the trace varied ones
        if args:
            args = (_random_like(args[0]), *args[1:])
        elif "hidden_states" in kwargs:
            kwargs = {**kwargs, "hidden_states": _random_like(kwargs["hidden_states"])}
    return args, kwargs


def materialized(block: nn.Module, large: int = 1 << 20) -> nn.Module:
    """The block itself if it holds real weights, else a CPU copy with stand-in weights.

    Tensors up to `large` elements get small random values; larger ones (a big MoE block's
    experts) are stride-0 views of one zero, so tracing a skeleton block costs no weight memory.
    """
    if not any(_is_meta(t) for t in [*block.parameters(), *block.buffers()]):
        return block
    twin = copy.deepcopy(block)  # still on meta: copying costs nothing
    gen = torch.Generator().manual_seed(0)
    for mod in twin.modules():
        for store in (mod._parameters, mod._buffers):
            for key, t in store.items():
                if not _is_meta(t):
                    continue
                if t.numel() > large:
                    value = torch.zeros((), dtype=t.dtype).expand(t.shape)
                elif t.dtype.is_floating_point:
                    value = (torch.randn(t.shape, generator=gen) * 0.02).to(t.dtype)
                else:
                    value = torch.zeros(t.shape, dtype=t.dtype)
                store[key] = nn.Parameter(value, requires_grad=False) if isinstance(t, nn.Parameter) else value
        config = getattr(mod, "config", None)
        if getattr(config, "_experts_implementation", None) not in (None, "eager"):
            # grouped kernels reject stride-0 weights; the copy's config is the copy's own
            config._experts_implementation = "eager"
    return twin


@dataclass
class Op:
    name: str
    inputs: list[int]  # ids of tensor arguments, in call order
    outputs: list[int]


@dataclass
class Trace:
    """Tensor ids are Python object ids; every traced tensor is kept alive so none is reused."""

    ops: list[Op] = field(default_factory=list)
    producers: dict[int, list[int]] = field(default_factory=dict)  # tensor id -> op indices
    consumers: dict[int, list[int]] = field(default_factory=dict)  # tensor id -> op indices
    linear_in: dict[str, int] = field(default_factory=dict)  # linear path -> input tensor id (first call)
    linear_out: dict[str, int] = field(default_factory=dict)  # linear path -> output tensor id
    call_order: list[str] = field(default_factory=list)
    shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    keep: list[torch.Tensor] = field(default_factory=list)

    def add(self, name: str, inputs: list[torch.Tensor], outputs: list[torch.Tensor]) -> None:
        idx = len(self.ops)
        in_ids = [id(t) for t in inputs]
        out_ids = [id(t) for t in outputs]
        self.ops.append(Op(name, in_ids, out_ids))
        self.keep.extend(inputs + outputs)
        for t in inputs + outputs:
            self.shapes.setdefault(id(t), tuple(t.shape))
        for i in in_ids:
            self.consumers.setdefault(i, []).append(idx)
        for o in out_ids:  # an in-place op is one more producer of its tensor
            self.producers.setdefault(o, []).append(idx)


def _tensors(obj) -> list[torch.Tensor]:
    leaves, _ = tree_flatten(obj)
    return [x for x in leaves if isinstance(x, torch.Tensor)]


class _Recorder(TorchFunctionMode):
    def __init__(self, trace: Trace):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = getattr(func, "__name__", str(func))
        if name not in ("__get__", "__set__", "dim", "size", "numel", "__len__"):
            ins = _tensors((args, kwargs))
            self.trace.add(name, ins, [t for t in _tensors(out) if all(t is not i for i in ins)] or _tensors(out))
        return out


@torch.no_grad()
def trace_block(block: nn.Module, args: tuple, kwargs: dict, linears: dict[str, nn.Module]) -> Trace:
    """Run block(*args, **kwargs) recording every torch op and each linear's input/output tensor."""
    trace = Trace()
    hooks = []
    for path, mod in linears.items():
        def pre(_m, a, path=path):
            if path not in trace.linear_in and a and isinstance(a[0], torch.Tensor):
                trace.linear_in[path] = id(a[0])
                trace.keep.append(a[0])
                trace.call_order.append(path)

        def post(_m, _a, out, path=path):
            if path not in trace.linear_out and isinstance(out, torch.Tensor):
                trace.linear_out[path] = id(out)
                trace.keep.append(out)
                trace.shapes.setdefault(id(out), tuple(out.shape))

        hooks += [mod.register_forward_pre_hook(pre), mod.register_forward_hook(post)]

    try:
        with _Recorder(trace):
            block(*args, **kwargs)
    except UnsupportedArchitectureError:
        raise
    except Exception as exc:  # noqa: BLE001
        raise UnsupportedArchitectureError(
            f"cannot trace decoder block {type(block).__name__}: {type(exc).__name__}: "
            f"{str(exc).splitlines()[0] if str(exc) else ''}"
        ) from exc
    finally:
        for h in hooks:
            h.remove()
    return trace
