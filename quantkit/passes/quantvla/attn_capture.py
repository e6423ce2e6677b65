"""Find attention modules and capture what QuantVLA's ATM/OHB measure, without model-specific code.

Post-RoPE (and post q/k-norm) queries and keys are read where every transformers model hands
them over: the attention function returned by ``AttentionInterface.get_interface``. While a
capture is active that method is wrapped at class level, so the model's own eager function,
SDPA, flash or flex are all wrapped the same way and run unchanged; nothing is copied out of
any modeling file and ``config._attn_implementation`` is left alone (so mask creation is
untouched). Attention outputs (o_proj, before the residual add) are read with forward hooks.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn
from transformers.modeling_utils import AttentionInterface, PreTrainedModel

# child names, tried in order; fused projections hold q in their first H*d output rows
Q_NAMES = ("q_proj", "to_q", "query", "q")
QKV_NAMES = ("qkv_proj", "c_attn", "to_qkv")  # Phi-3, GPT-2, fused DiT attention
O_NAMES = ("o_proj", "out_proj", "to_out.0", "c_proj", "dense")
QNORM_NAMES = ("q_norm", "query_norm", "q_layernorm", "norm_q")

MASK_VALID_MIN = -1e4  # additive-mask entries at or above this count as attended (authors' rule)
RMS_EPS = 1e-12  # inside the sqrt of the per-call RMS, as in the authors' code


@dataclass(frozen=True)
class AttnSite:
    """One attention module and the paths (relative to it) of the parts ATM/OHB touch."""

    name: str
    q_path: str
    fused_qkv: bool
    o_path: str
    qnorm_path: str | None


def _child(module: nn.Module, names: Iterable[str]) -> str | None:
    for n in names:
        try:
            module.get_submodule(n)
        except AttributeError:
            continue
        return n
    return None


def find_attention_sites(model: nn.Module) -> list[AttnSite]:
    """Every module with a query projection and an output projection, in module order."""
    sites = []
    for name, module in model.named_modules():
        q = _child(module, Q_NAMES)
        qkv = None if q else _child(module, QKV_NAMES)
        o = _child(module, O_NAMES)
        if (q or qkv) and o and (q or qkv) != o:
            sites.append(AttnSite(name, q or qkv, q is None, o, _child(module, QNORM_NAMES)))
    return sites


def _valid_mask(mask: torch.Tensor | None, causal: bool, b: int, sq: int, sk: int, device) -> torch.Tensor | None:
    """Bool [H or 1, sq, sk] of attended logits for batch row b, or None when all are."""
    if mask is not None:
        m = mask[..., :sk]
        m = m[b if m.shape[0] > 1 else 0]  # [H or 1, sq, sk]
        return m if m.dtype == torch.bool else m >= MASK_VALID_MIN
    if causal and sq > 1:
        # SDPA's is_causal is aligned top-left (it crops keys to sq when there are more)
        return torch.ones(sq, sk, dtype=torch.bool, device=device).tril().unsqueeze(0)
    return None


def logit_std(
    query: torch.Tensor, key: torch.Tensor, mask: torch.Tensor | None, scaling: float, causal: bool
) -> torch.Tensor:
    """Per-head population std of the valid pre-softmax logits, averaged over the batch -> [H].

    query [b, H, sq, d], key [b, Hkv, sk, d]; k is repeated to the q heads for GQA.
    """
    b, heads, sq, _ = query.shape
    rep = heads // key.shape[1]
    out = torch.zeros(heads, dtype=torch.float32, device=query.device)
    for i in range(b):  # one row at a time bounds memory at H*sq*sk floats
        k = key[i].float().repeat_interleave(rep, dim=0)  # [H, sk, d]
        logits = torch.matmul(query[i].float(), k.transpose(-1, -2)) * scaling  # [H, sq, sk]
        valid = _valid_mask(mask, causal, i, sq, k.shape[1], query.device)
        if valid is None:
            out += logits.flatten(1).std(dim=1, unbiased=False)
            continue
        w = valid.expand_as(logits).float()
        n = w.sum(dim=(1, 2)).clamp_min(1.0)
        mean = (logits * w).sum(dim=(1, 2)) / n
        var = (((logits - mean[:, None, None]) * w) ** 2).sum(dim=(1, 2)) / n
        out += var.sqrt()
    return out / b


class StatMean:
    """Mean of per-call statistics (a mean of stds, not a pooled std, as the authors' StdCollector)."""

    def __init__(self):
        self.total: dict[str, torch.Tensor] = {}
        self.calls: dict[str, int] = {}
        self.heads: dict[str, tuple[int, int]] = {}  # name -> (H, head_dim), from the captured query

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float().cpu()
        self.total[name] = self.total.get(name, 0) + value
        self.calls[name] = self.calls.get(name, 0) + 1

    def means(self) -> dict[str, torch.Tensor]:
        return {n: t / self.calls[n] for n, t in self.total.items()}


def _is_causal(module: nn.Module, kwargs: dict) -> bool:
    flag = kwargs.get("is_causal")
    return bool(getattr(module, "is_causal", True) if flag is None else flag)


@contextmanager
def capture_logit_std(model: nn.Module, names: Iterable[str], stats: StatMean) -> Iterator[None]:
    """While active, every attention call of a module in ``names`` adds its per-head logit std."""
    wanted = {id(model.get_submodule(n)): n for n in names}
    original = AttentionInterface.get_interface

    def get_interface(self, attn_implementation, default):
        fn = original(self, attn_implementation, default)

        def capturing(module, query, key, value, attention_mask, *args, **kwargs):
            name = wanted.get(id(module))
            if name is not None:
                scaling = kwargs.get("scaling")
                scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
                with torch.no_grad():
                    stats.add(name, logit_std(query, key, attention_mask, scaling, _is_causal(module, kwargs)))
                stats.heads[name] = (query.shape[1], query.shape[-1])
            return fn(module, query, key, value, attention_mask, *args, **kwargs)

        return capturing

    AttentionInterface.get_interface = get_interface
    try:
        yield
    finally:
        AttentionInterface.get_interface = original


@contextmanager
def capture_output_rms(model: nn.Module, names: dict[str, str], stats: StatMean) -> Iterator[None]:
    """names: key -> module path; every forward of that module adds RMS(output) under key."""

    def hook_for(key: str) -> Callable:
        def hook(_module, _inputs, output):
            z = output[0] if isinstance(output, tuple) else output
            stats.add(key, (z.detach().float().pow(2).mean() + RMS_EPS).sqrt())

        return hook

    handles = [model.get_submodule(path).register_forward_hook(hook_for(key)) for key, path in names.items()]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def run_batches(model: nn.Module, batches: Iterable | Callable[[], None],
                progress: Callable[[int], None] | None = None) -> None:
    """Forward every calibration batch (token ids [b, seq] or a dict of model inputs); `batches` may
    also be a callable that runs the forwards itself (one decoder block on its inputs)."""
    if callable(batches):
        with torch.no_grad():
            batches()
        return
    with torch.no_grad():
        for batch in batches:
            if isinstance(batch, dict):
                model(**batch)
            elif isinstance(model, PreTrainedModel):
                model(input_ids=batch, use_cache=False)  # no KV cache: it is never reused here
            else:
                model(batch)
            if progress is not None:
                rows = batch.get("input_ids", next(iter(batch.values()))) if isinstance(batch, dict) else batch
                progress(len(rows))
