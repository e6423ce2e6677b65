"""Calibration statistics for the masa pass: input Grams per projection, logit-lens KL per layer."""

from __future__ import annotations

import torch
from torch import nn

from quantkit.passes.masa import fit as mm
from quantkit.errors import UnsupportedArchitectureError

# logit-lens tokens per lm_head matmul: bounds the [tokens, vocab] fp32 buffers (~100 MB at 49k vocab)
LENS_CHUNK = 512
# q, k and v read the same normed hidden states, so one Gram per layer serves all three
_SHARED_INPUT = {"q": "qkv", "k": "qkv", "v": "qkv", "o": "o"}


@torch.no_grad()
def collect_input_grams(model: nn.Module, ctx, arch, roles, damp: float) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, role) -> damped input Gram H = X^T X / N + lambda I (accumulated in float64, returned float32, CPU)."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts: dict[tuple[int, str], int] = {}
    hooks = []
    for layer in range(arch.num_layers):
        for kind in sorted({_SHARED_INPUT[r] for r in roles}):
            role = "q" if kind == "qkv" else kind
            key = (layer, kind)

            def hook(_mod, args, key=key):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, d_in]
                xtx = (x.T @ x).double().cpu()
                sums[key] = sums[key] + xtx if key in sums else xtx
                counts[key] = counts.get(key, 0) + x.shape[0]

            mod = model.get_submodule(arch.module_name(layer, role))
            hooks.append(mod.register_forward_pre_hook(hook))
    try:
        for batch in ctx.calib_batches():
            model(input_ids=batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    grams = {key: mm.damped_gram(s, counts[key], damp).float() for key, s in sums.items()}
    return {(layer, r): grams[layer, _SHARED_INPUT[r]] for layer in range(arch.num_layers) for r in roles}


def final_norm(model: nn.Module) -> nn.Module:
    base = model.base_model
    for path in ("norm", "ln_f", "final_layernorm", "decoder.final_layer_norm"):
        try:
            return base.get_submodule(path)
        except AttributeError:
            continue
    raise UnsupportedArchitectureError(f"masa kl grouping: no final norm found on {type(base).__name__}")


@torch.no_grad()
def logit_lens_boundaries(model: nn.Module, ctx, max_tokens: int) -> torch.Tensor:
    """d[l] = mean_tokens KL(p_{l+1} || p_l), p_l = softmax(lm_head(norm(h_l))) after block l. [L-1]"""
    arch = ctx.arch
    layers = arch.layers(model)
    norm, head = final_norm(model), model.get_output_embeddings()
    totals = torch.zeros(len(layers) - 1, dtype=torch.float64)
    seen = 0
    for batch in ctx.calib_batches():
        if seen >= max_tokens:
            break
        outs: list[torch.Tensor] = []
        hooks = [
            layer.register_forward_hook(lambda _m, _a, out: outs.append((out[0] if isinstance(out, tuple) else out).detach()))
            for layer in layers
        ]
        try:
            model(input_ids=batch, use_cache=False)
        finally:
            for h in hooks:
                h.remove()
        take = min(max_tokens - seen, batch.numel())
        hs = [o.reshape(-1, o.shape[-1])[:take] for o in outs]  # L x [take, hidden]
        for start in range(0, take, LENS_CHUNK):
            prev = None
            for layer, h in enumerate(hs):
                logp = torch.log_softmax(head(norm(h[start : start + LENS_CHUNK])).float(), dim=-1)
                if prev is not None:
                    n = logp.shape[0]
                    totals[layer - 1] += float(mm.logit_lens_kl(logp, prev)) * n
                prev = logp
        seen += take
    return totals / max(seen, 1)
