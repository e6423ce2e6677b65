"""--source with --eval-windows N: a short perplexity and KL check of the checkpoint against its
source, on the first N windows of quantkit's shipped held-out text (the windows `quantkit eval`
and apply's report use, so the numbers are comparable).

One model is in memory at a time: the source runs first and its log-probabilities for the N
windows are kept (N x seq_len x vocab fp32: 100 MB per window at a 49k vocabulary), then the
checkpoint loads in transformers, as an engine would read it, in its declared dtype.

Above KL_WARN (mean token KL(source || checkpoint), nats) the result carries a warning, not an
error: how much loss is acceptable is the user's call (apply's --max-kl gate). The threshold sits
above what correct 4-bit checkpoints cost on a small, sensitive model (SmolLM2-135M: NVFP4 W4A4
0.45, W4A8 with per-channel int4 weights 0.87 nats, bench/results/quantvla.md) and below what a
wrong scale or a mis-ordered layout costs (several nats: the output is noise).
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from quantkit.eval import kl_sum, nll_sum
from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.result import VerifyResult

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


def check_eval(ckpt: Checkpoint, result: VerifyResult, source: str, n_windows: int) -> None:
    from transformers import AutoModelForCausalLM

    from quantkit.eval import eval_windows
    from quantkit.models import load_model

    model, tok = load_model(source, dtype="auto")
    windows = eval_windows(model, tok, seq_len=_seq_len(ckpt), max_windows=n_windows)
    ref = _logprobs(model, windows)
    del model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype="auto").eval()
        except Exception as e:  # noqa: BLE001 - check_runs reports the load failure itself
            result.warn("eval.load", f"no perplexity/KL check: the checkpoint does not load ({type(e).__name__})")
            return
    out = _logprobs(model, windows)
    del model
    kl = sum(kl_sum(r, q) for r, q in zip(ref, out)) / windows.numel()
    ppl_src, ppl_ckpt = _ppl(ref, windows), _ppl(out, windows)
    info = {"windows": int(windows.shape[0]), "seq_len": int(windows.shape[1]), "ppl_source": ppl_src,
            "ppl_checkpoint": ppl_ckpt, "ppl_increase_pct": 100 * (ppl_ckpt / ppl_src - 1), "kl": kl,
            "kl_warn": KL_WARN}
    result.info["eval"] = info
    if not math.isfinite(kl) or kl > KL_WARN:
        result.warn("eval.kl", f"mean token KL vs the source is {kl:.3g} nats on {info['windows']} held-out windows "
                    f"(perplexity {ppl_src:.3f} -> {ppl_ckpt:.3f}), above {KL_WARN}: more loss than correct 4-bit "
                    "checkpoints show; check the scales and the layout")
