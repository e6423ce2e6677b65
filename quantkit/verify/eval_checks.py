"""--source with --eval-windows N: a short perplexity and KL check of the checkpoint against its
source, on the first N windows of quantkit's shipped held-out text (the windows `quantkit eval`
and apply's report use, so the numbers are comparable).

One model is in memory at a time: the source runs first and its log-probabilities for the N
windows are kept (N x seq_len x vocab fp32: 100 MB per window at a 49k vocabulary), then the
checkpoint loads in transformers, as an engine would read it, in its declared dtype. Each is
loaded once per verify run: the source model is the one the layer comparison read (when it
needed a model), the checkpoint the one the "it runs" checks use (verify/__init__.py).

Above KL_WARN (mean token KL(source || checkpoint), nats) the result carries a warning, not an
error: how much loss is acceptable is the user's call (apply's --max-kl gate). The threshold sits
above what correct 4-bit checkpoints cost on a small, sensitive model (SmolLM2-135M: NVFP4 W4A4
0.45, W4A8 with per-channel int4 weights 0.87 nats, bench/results/quantvla.md) and below what a
wrong scale or a mis-ordered layout costs (several nats: the output is noise).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from quantkit.eval import kl_sum, nll_sum
from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.result import VerifyResult
from quantkit.verify.source_model import SourceModel

KL_WARN = 1.5  # mean token KL(source || checkpoint) in nats above which verify warns
MAX_SEQ_LEN = 512  # tokens per window, or the model's context if shorter


def _seq_len(ckpt: Checkpoint) -> int:
    limit = ckpt.text_config().get("max_position_embeddings") or MAX_SEQ_LEN
    return int(min(MAX_SEQ_LEN, limit))


@torch.inference_mode()
def _logprobs(model, windows: torch.Tensor) -> list[torch.Tensor]:
    """Per window: log-softmax of the logits, fp32 [1, seq, vocab]."""
    return [F.log_softmax(model(input_ids=windows[i : i + 1], use_cache=False).logits.float(), -1)
            for i in range(windows.shape[0])]


def _ppl(logprobs: list[torch.Tensor], windows: torch.Tensor) -> float:
    """quantkit.eval's next-token NLL (log-probs are their own log-softmax)."""
    nll = sum(nll_sum(lp, windows[i : i + 1]) for i, lp in enumerate(logprobs))
    return math.exp(nll / windows[:, 1:].numel())


@dataclass
class Reference:
    """The source's side of the evaluation, kept while the checkpoint loads."""
    windows: torch.Tensor  # [N, seq_len] token ids
    logprobs: list[torch.Tensor]  # per window, fp32 [1, seq_len, vocab]


def reference(ckpt: Checkpoint, src: SourceModel, n_windows: int) -> Reference:
    from quantkit.eval import eval_windows

    model, tok = src.model()
    windows = eval_windows(model, tok, seq_len=_seq_len(ckpt), max_windows=n_windows)
    return Reference(windows, _logprobs(model, windows))


def measure(ref: Reference, model) -> dict:
    """Perplexities and KL of the checkpoint (loaded in transformers) against the reference."""
    windows = ref.windows
    out = _logprobs(model, windows)
    kl = sum(kl_sum(r, q) for r, q in zip(ref.logprobs, out)) / windows.numel()
    ppl_src, ppl_ckpt = _ppl(ref.logprobs, windows), _ppl(out, windows)
    return {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "ppl_source": ppl_src,
            "ppl_checkpoint": ppl_ckpt, "ppl_increase_pct": 100 * (ppl_ckpt / ppl_src - 1), "kl": kl,
            "kl_warn": KL_WARN}


def report(result: VerifyResult, info: dict | None, check: str = "", why: str = "") -> None:
    """info: measure's numbers, or None when there are none: then `check` ("eval.load",
    "eval.forward") is warned with `why`; the run checks report the failure itself as an error."""
    if info is None:
        result.warn(check, f"no perplexity/KL check: {why}")
        return
    result.info["eval"] = info
    kl = info["kl"]
    if not math.isfinite(kl) or kl > KL_WARN:
        result.warn("eval.kl", f"mean token KL vs the source is {kl:.3g} nats on {info['windows']} held-out windows "
                    f"(perplexity {info['ppl_source']:.3f} -> {info['ppl_checkpoint']:.3f}), above {KL_WARN}: more "
                    "loss than correct 4-bit checkpoints show; check the scales and the layout")
