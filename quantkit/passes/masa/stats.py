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


def _gram_hooks(model: nn.Module, arch, roles, layers, sums: dict, counts: dict) -> list:
    """Forward pre-hooks summing X^T X (float64, CPU) of each layer's q/k/v and o inputs into
    sums[(layer, "qkv" | "o")], batch by batch, with token counts."""
    hooks = []
    for layer in layers:
        for kind in sorted({_SHARED_INPUT[r] for r in roles}):
            role = "q" if kind == "qkv" else kind

            def hook(_mod, args, key=(layer, kind)):
                x = args[0].detach().reshape(-1, args[0].shape[-1]).float()  # [tokens, d_in]
                xtx = (x.T @ x).double().cpu()
                sums[key] = sums[key] + xtx if key in sums else xtx
                counts[key] = counts.get(key, 0) + x.shape[0]

            hooks.append(model.get_submodule(arch.module_name(layer, role)).register_forward_pre_hook(hook))
    return hooks


@torch.no_grad()
def collect_input_grams(model: nn.Module, ctx, arch, roles, damp: float) -> dict[tuple[int, str], torch.Tensor]:
    """(layer, role) -> damped input Gram H = X^T X / N + lambda I (accumulated in float64, returned float32, CPU)."""
    sums: dict[tuple[int, str], torch.Tensor] = {}
    counts: dict[tuple[int, str], int] = {}
    hooks = _gram_hooks(model, arch, roles, range(arch.num_layers), sums, counts)
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
    hooks = _gram_hooks(blk.model, arch, roles, [blk.index], sums, counts)
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
    hidden states of every layer. Tokens: the first max_tokens calibration tokens, summed
    chunk by chunk in calibration order.
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
