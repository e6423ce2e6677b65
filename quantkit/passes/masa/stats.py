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


# ----------------------------------------------------------------------------- per block (streaming)
# The same statistics, gathered one decoder block at a time from the block's calibration inputs
# (the block loop's first sweep), so the whole model never has to be in memory. Both execution
# modes use these; the whole-model functions above remain for benches and tests that hold a model.


@torch.no_grad()
def block_grams(blk, arch, roles, sums: dict, counts: dict) -> list[torch.Tensor]:
    """Accumulate X^T X (float64, CPU) of one block's q/k/v and o inputs; -> the block's outputs per batch.

    sums/counts are keyed like collect_input_grams's (layer, "qkv" | "o") and summed batch by batch
    in the same order, so the Grams equal the whole-model forward's bit for bit.
    """
    hooks = []
    for kind in sorted({_SHARED_INPUT[r] for r in roles}):
        role = "q" if kind == "qkv" else kind
        key = (blk.index, kind)

        def hook(_mod, args, key=key):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, d_in]
            xtx = (x.T @ x).double().cpu()
            sums[key] = sums[key] + xtx if key in sums else xtx
            counts[key] = counts.get(key, 0) + x.shape[0]

        hooks.append(blk.model.get_submodule(arch.module_name(blk.index, role)).register_forward_pre_hook(hook))
    try:
        return blk.forward()
    finally:
        for h in hooks:
            h.remove()


def finish_block_grams(sums: dict, counts: dict, layer: int, damp: float, grams: dict) -> None:
    """Once a block's batches are all in: its float64 sums become damped float32 Grams (half the memory)."""
    for key in [k for k in sums if k[0] == layer]:
        grams[key] = mm.damped_gram(sums.pop(key), counts[key], damp).float()


def grams_by_role(grams: dict, n_layers: int, roles) -> dict[tuple[int, str], torch.Tensor]:
    return {(layer, r): grams[layer, _SHARED_INPUT[r]] for layer in range(n_layers) for r in roles}


class LensState:
    """Logit-lens boundary scores accumulated block by block.

    Holds the previous block's log-probabilities for the first max_tokens calibration tokens
    ([max_tokens, vocab] float32: 400 MB at 2048 tokens and a 49k vocabulary), never the
    hidden states of every layer. Token selection and summation order follow
    logit_lens_boundaries exactly.
    """

    def __init__(self, n_layers: int, max_tokens: int):
        self.totals = torch.zeros(n_layers - 1, dtype=torch.float64)
        self.max_tokens = max_tokens
        self.prev: list[torch.Tensor] | None = None
        self.seen = 0

    @torch.no_grad()
    def add_block(self, model: nn.Module, layer: int, outputs: list[torch.Tensor]) -> None:
        norm, head = final_norm(model), model.get_output_embeddings()
        current: list[torch.Tensor] = []
        seen = 0
        for out in outputs:  # per batch [b, s, hidden]
            if seen >= self.max_tokens:
                break
            take = min(self.max_tokens - seen, out.shape[0] * out.shape[1])
            h = out.reshape(-1, out.shape[-1])[:take]
            for start in range(0, take, LENS_CHUNK):
                logp = torch.log_softmax(head(norm(h[start : start + LENS_CHUNK])).float(), dim=-1)
                if self.prev is not None:
                    n = logp.shape[0]
                    self.totals[layer - 1] += float(mm.logit_lens_kl(logp, self.prev[len(current)])) * n
                current.append(logp)
            seen += take
        self.prev, self.seen = current, seen

    def scores(self) -> torch.Tensor:
        return self.totals / max(self.seen, 1)
