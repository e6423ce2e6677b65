"""Second moments of each linear's calibration inputs, for activation-weighted scale observers.

Collected per decoder block from the block's calibration inputs (the outputs of the blocks
before it, already quantized: sequential calibration), before any linear of the block is
replaced. GPTQ's Hessians are the "hessian" kind.

  channel: E[x_j^2] per input channel            [in]
  hessian: X^T X summed over calibration tokens  [in, in] (the observers read its diagonal blocks)
"""

from __future__ import annotations

import torch

from quantkit.targets import is_linear

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
