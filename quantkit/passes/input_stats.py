"""Second moments of each linear's calibration inputs, for activation-weighted scale observers.

Collected per decoder block from the block's calibration inputs (the outputs of the blocks
before it, already quantized: sequential calibration), before any linear of the block is
replaced. GPTQ's Hessians are the "hessian" kind.

  channel: E[x_j^2] per input channel            [in]
  hessian: X^T X summed over calibration tokens  [in, in] (the observers read its diagonal blocks)
"""

from __future__ import annotations

import torch

@torch.no_grad()  # not inference_mode: GPTQ's solver damps the Hessians in place afterwards
def input_second_moments(blk, names: list[str], kind: str) -> dict[str, torch.Tensor]:
    """{name: E[x^2] [in] (kind "channel") or X^T X [in, in] ("hessian")}, fp32, for the named linears."""
    if kind not in ("channel", "hessian"):
        raise ValueError(f"unknown weighting {kind!r}; known: channel, hessian")
    sums: dict[str, torch.Tensor] = {}
    tokens: dict[str, int] = {}
    hooks = []
    for name in names:
        def hook(_mod, args, name=name):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, in]
            s = x.square().sum(0) if kind == "channel" else x.T @ x
            sums[name] = s if name not in sums else sums[name] + s
            tokens[name] = tokens.get(name, 0) + x.shape[0]
        hooks.append(blk.model.get_submodule(name).register_forward_pre_hook(hook))
    try:
        blk.forward()
    finally:
        for hk in hooks:
            hk.remove()
    if kind == "channel":  # a mean, so the weighting does not grow with the number of samples
        return {n: s / tokens[n] for n, s in sums.items()}
    return sums
