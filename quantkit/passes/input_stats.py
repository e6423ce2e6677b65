"""Second moments of each linear's calibration inputs, for activation-weighted scale observers.

Collected per decoder block from the block's calibration inputs (the outputs of the blocks
before it, already quantized: sequential calibration), before any linear of the block is
replaced. GPTQ's Hessians are the "hessian" kind.

  channel: E[x_j^2] per input channel            [in]
  hessian: X^T X summed over calibration tokens  [in, in] (the observers read its diagonal blocks)

Kept Hessians: a pass that measures X^T X for its own use (awq) can keep them in the block for a later
pass of the same block loop (gptq), so the block is not run again for the same statistics. What a pass
keeps stays valid only while every pass in between keeps it current: passes that leave the linears'
inputs as they are (calibrate) or transform them in a known way (awq's per-channel scales: H -> S^-1 H S^-1;
rotate's online Hadamard: H -> R^T H R) declare `keeps_input_stats` and update the entries; after any
other pass the block loop drops them (quantkit.stream.loop). The kept matrices are the measured ones
transformed in float64, not a new measurement of the transformed block: they differ from one by the
rounding of the transformed weights and inputs to the model's dtype (fp32: 1e-5 relative; bf16: up to
2e-2 on a tiny model's 256 calibration tokens; tests/passes/test_kept_hessians.py).
"""

from __future__ import annotations

import torch

from quantkit.targets import is_linear

# BlockView.extra key of the kept Hessians ({linear name: X^T X [in, in]}), and the fact in ctx.needed that says a
# later pass of the block loop reads them (so a measuring pass keeps them)
KEPT = "input_hessians"
CALLS = "linear_calls"  # BlockView.extra key: {linear name: calls per forward of the block}, from one full forward


class _Enough(Exception):
    """Raised by a hook to end a block forward once every named linear has seen its input."""


def _stop_at(counts: dict[str, int] | None, names: list[str]) -> dict[str, int] | None:
    if counts is None or not all(counts.get(n, 0) > 0 for n in names):
        return None
    return {n: counts[n] for n in names}


@torch.no_grad()  # not inference_mode: GPTQ's solver damps the Hessians in place afterwards
def input_second_moments(blk, names: list[str], kind: str) -> dict[str, torch.Tensor]:
    """{name: E[x^2] [in] (kind "channel") or X^T X [in, in] ("hessian")}, fp32, for the named linears.

    Each batch's forward stops as soon as every named linear has received its input as many times as it did in a
    full forward (learned once per block, on the first batch of the first call: blk.extra[CALLS]). A stage that
    reads only q/k/v thus runs the block's norm, not its attention and MLP. A linear that a full forward never
    called (an expert no token was routed to) turns the early stop off: its count is unknown."""
    if kind not in ("channel", "hessian"):
        raise ValueError(f"unknown weighting {kind!r}; known: channel, hessian")
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    seen: dict[str, int] = {}
    last: dict[str, torch.Tensor] = {}  # the previous hook's input and its product
    if blk.hidden is None:
        raise RuntimeError("internal: this block has no calibration inputs (no pass asked for them)")
    counts = blk.extra.get(CALLS)
    stop: dict = {"at": _stop_at(counts, names)}
    hooks = []
    for name in names:
        def hook(_mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
            prev = last.get("x")
            if prev is not None and prev.shape == x.shape and torch.equal(prev, x):
                s = last["s"]  # q/k/v (gate/up) read equal inputs, each rotated by its own hook: one product
            else:
                s = x.square().sum(0) if kind == "channel" else x.T @ x
                # a copy when x is the module's own input tensor (fp32 models), which the forward could change later
                last.update(x=x.clone() if x.data_ptr() == args[0].data_ptr() else x, s=s)
            sums[name] = s.clone() if name not in sums else sums[name].add_(s)
            tokens[name] = tokens.get(name, 0) + x.shape[0]
            seen[name] = seen.get(name, 0) + 1
            if stop["at"] is not None and all(seen.get(n, 0) >= k for n, k in stop["at"].items()):
                raise _Enough
        hooks.append(blk.model.get_submodule(name).register_forward_pre_hook(hook))
    learned: dict[str, int] = {}
    if counts is None:  # count every linear of the block on the first batch, which runs whole
        hooks += [m.register_forward_pre_hook(lambda _m, _a, n=f"{blk.prefix}.{n}": learned.__setitem__(
            n, learned.get(n, 0) + 1)) for n, m in blk.module.named_modules() if n and is_linear(m)]
    try:
        for k, (h, c) in enumerate(zip(blk.hidden, blk.calls)):
            seen.clear()
            try:
                blk.module(h, *c.args, **c.kwargs)
            except _Enough:
                pass
            if k == 0 and counts is None:
                blk.extra[CALLS] = dict(learned)
                stop["at"] = _stop_at(learned, names)
                for hk in hooks[len(names):]:
                    hk.remove()
                hooks = hooks[:len(names)]
    finally:
        for hk in hooks:
            hk.remove()
    if kind == "channel":  # a mean, so the weighting does not grow with the number of samples
        return {n: s / tokens[n] for n, s in sums.items()}
    return sums


def keep_hessians(blk, hessians: dict[str, torch.Tensor]) -> None:
    """Keep X^T X of the named linears in the block for a later pass. The tensors themselves, not copies (a 7B
    block's are about 0.9 GB): the keeper may read them but must not change them in place, and the reader may
    (gptq damps its Hessians in place)."""
    blk.extra.setdefault(KEPT, {}).update(hessians)


def transform_kept(blk, name: str, fn) -> None:
    """A pass changed `name`'s input x -> x T: its kept X^T X becomes fn(X^T X) = T^T X^T X T (no-op if none kept)."""
    kept = blk.extra.get(KEPT)
    if kept and name in kept:
        kept[name] = fn(kept[name])


def drop_kept(blk, names: list[str] | None = None) -> None:
    """Forget the kept Hessians of `names` (all of them when None): their inputs changed in a way not tracked."""
    if names is None:
        blk.extra.pop(KEPT, None)
        return
    for n in names:
        blk.extra.get(KEPT, {}).pop(n, None)


def hessians(blk, names: list[str]) -> dict[str, torch.Tensor]:
    """X^T X for the named linears: the ones kept in the block (taken out of it), the rest measured now (the block
    forward then stops as soon as those have their inputs)."""
    kept = blk.extra.get(KEPT, {})
    out = {n: kept.pop(n) for n in names if n in kept}
    missing = [n for n in names if n not in out]
    if missing:
        out.update(input_second_moments(blk, missing, "hessian"))
    return out
