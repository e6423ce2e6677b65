"""Perplexity on held-out text, mean token KL against a reference, and tensor error metrics."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from quantkit.calib import DEFAULT_SOURCE, read_texts, token_stream
from quantkit.errors import CalibrationError

DEFAULT_EVAL_WINDOWS = 64
_stream_cache: dict[tuple, torch.Tensor] = {}


def needs_bos(tokenizer) -> bool:
    """Whether evaluation windows start with BOS: whatever the tokenizer itself does.

    Its ``add_bos_token`` when it states one; otherwise whether encoding text with special tokens
    puts BOS first (fast tokenizers configure that in their post-processor). A model trained with
    BOS at the start of every sequence ships a tokenizer that adds it, so no family list is needed.
    """
    if getattr(tokenizer, "bos_token_id", None) is None:
        return False
    flag = getattr(tokenizer, "add_bos_token", None)
    if isinstance(flag, bool):
        return flag
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == tokenizer.bos_token_id


def eval_windows(
    model: nn.Module,
    tokenizer,
    *,
    source: str = DEFAULT_SOURCE,
    seq_len: int = 512,
    max_windows: int | None = DEFAULT_EVAL_WINDOWS,
) -> torch.Tensor:
    """Fixed, non-overlapping windows of the held-out text -> LongTensor [W, seq_len].

    With the BOS policy on, each window is BOS + (seq_len - 1) text tokens.
    """
    # what identifies the tokenizer (an object id can be reused after the tokenizer is freed)
    key = (type(tokenizer).__name__, getattr(tokenizer, "name_or_path", ""), getattr(tokenizer, "vocab_size", None), source)
    stream = _stream_cache.get(key)
    if stream is None:
        texts = read_texts(source, "eval")
        stream = _stream_cache[key] = token_stream(tokenizer, texts)
    bos = needs_bos(tokenizer)
    body = seq_len - 1 if bos else seq_len
    n = stream.numel() // body
    if max_windows is not None:
        n = min(n, max_windows)
    if n == 0:
        raise CalibrationError(f"evaluation text has {stream.numel()} tokens, fewer than one window of {seq_len}")
    windows = stream[: n * body].view(n, body)
    if bos:
        windows = torch.cat([torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long), windows], dim=1)
    return windows


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def _batched_logits(model: nn.Module, windows: torch.Tensor, batch_size: int) -> Iterable[tuple[torch.Tensor, torch.Tensor]]:
    dev = _device_of(model)
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(dev)
        yield ids, model(input_ids=ids, use_cache=False).logits.float()


def perplexity(
    model: nn.Module,
    tokenizer,
    text_source: str = DEFAULT_SOURCE,
    *,
    seq_len: int = 512,
    max_windows: int | None = DEFAULT_EVAL_WINDOWS,
    batch_size: int = 4,
    progress: Callable[[int], None] | None = None,
) -> float:
    """exp(mean next-token NLL) over fixed windows of the held-out text."""
    windows = eval_windows(model, tokenizer, source=text_source, seq_len=seq_len, max_windows=max_windows)
    nll, count = 0.0, 0
    for ids, logits in _batched_logits(model, windows, batch_size):
        nll += nll_sum(logits, ids)
        count += ids[:, 1:].numel()
        if progress:
            progress(ids.shape[0])
    return math.exp(nll / count)


@torch.inference_mode()
def mean_kl(
    model: nn.Module,
    reference: nn.Module,
    token_batches: Iterable[torch.Tensor],
    progress: Callable[[int], None] | None = None,
) -> float:
    """Mean over tokens of KL(p_reference || p_model), in fp32."""
    total, count = 0.0, 0
    for ids in token_batches:
        ref = reference(input_ids=ids.to(_device_of(reference)), use_cache=False).logits.float()
        out = model(input_ids=ids.to(_device_of(model)), use_cache=False).logits.float().to(ref.device)
        total += kl_sum(ref, out)
        count += ids.numel()
        if progress:
            progress(ids.shape[0])
    return total / count


def nll_sum(logits: torch.Tensor, ids: torch.Tensor) -> float:
    """Sum over positions of the next-token negative log-likelihood (logits [b, s, V], ids [b, s])."""
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1),
                           reduction="sum").item()


def kl_sum(ref_logits: torch.Tensor, logits: torch.Tensor) -> float:
    lp_ref = F.log_softmax(ref_logits.float(), dim=-1)
    lp = F.log_softmax(logits.float(), dim=-1)
    return (lp_ref.exp() * (lp_ref - lp)).sum().item()


def sqnr_db(reference: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio in dB."""
    noise = (reference.float() - approx.float()).pow(2).sum()
    return float(10 * torch.log10(reference.float().pow(2).sum() / noise.clamp_min(1e-30)))


def cosine(reference: torch.Tensor, approx: torch.Tensor) -> float:
    return float(F.cosine_similarity(reference.float().flatten(), approx.float().flatten(), dim=0))
