""""It runs": the checkpoint loads in transformers and one short forward gives finite logits in the
declared dtype; for compressed-tensors, quantkit's own runtime gives the same logits.

Two stated tolerances. For weight-only and FP4 schemes, the largest logit difference relative
to the largest logit magnitude must be <= RUNTIME_RTOL (measured: 0.0 on every tiny-model scheme
and on llm-compressor's NVFP4). Schemes with dynamic per-token int8 activations (W8A8, W4A8) run
in quantkit's runtime with int32 accumulation; a per-token code on a .5 boundary rounds the other
way and redraws that token's noise, so on SmolLM2 (massive activations) the two runtimes differ
by a mean token KL of 0.06-0.10 with top-1 agreement 0.73-0.88 (measured, docs/verify.md). For
those the check is mean token KL <= DYNAMIC_INT_KL_TOL, which still catches a wrong layout or scale.

The forward reads a fixed English sentence through the checkpoint's tokenizer when it has one,
otherwise N_TOKENS seeded random ids.
"""

from __future__ import annotations

import warnings

import torch

from quantkit.errors import ModelLoadError
from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.result import VerifyResult

RUNTIME_RTOL = 2e-2  # max |logit difference| / max |logit|, transformers vs quantkit's runtime
DYNAMIC_INT_KL_TOL = 0.25  # mean token KL(transformers || quantkit runtime), dynamic int8 activations
N_TOKENS = 16
TEXT = ("The quick brown fox jumps over the lazy dog. A checkpoint that loads but is subtly wrong is the "
        "worst failure a quantization tool can have.")


def first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _tokens(ckpt: Checkpoint) -> torch.Tensor:
    try:
        from transformers import AutoTokenizer

        ids = AutoTokenizer.from_pretrained(ckpt.path)(TEXT, return_tensors="pt")["input_ids"]
        if ids.numel() >= 4:
            return ids
    except Exception:  # noqa: BLE001 - no tokenizer saved with the checkpoint: random ids serve as well
        pass
    vocab = int(ckpt.text_config().get("vocab_size") or 256)
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, max(2, vocab), (1, N_TOKENS), generator=g)


def load_in_transformers(ckpt: Checkpoint):
    """-> (model, None), or (None, the first line of why it does not load)."""
    from transformers import AutoModelForCausalLM

    # quant_method "quantkit" loads because importing quantkit registers it with transformers
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return AutoModelForCausalLM.from_pretrained(ckpt.path, dtype="auto").eval(), None
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        return None, first_line(e)


def check_forward(ckpt: Checkpoint, result: VerifyResult, model) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The loaded checkpoint's forward on a short input -> (ids, logits) when it gives finite logits."""
    ids = _tokens(ckpt)
    declared = ckpt.declared_dtype
    try:
        with torch.inference_mode():
            logits = model(ids).logits
    except Exception as e:  # noqa: BLE001
        result.error("run.forward", f"loads in transformers but a forward fails: {first_line(e)}")
        return None
    run: dict = {"tokens": int(ids.shape[1]), "logits_dtype": str(logits.dtype).removeprefix("torch.")}
    result.info["run"] = run
    if not torch.isfinite(logits).all():
        result.error("run.finite", f"transformers forward gives {int((~torch.isfinite(logits)).sum())} non-finite logits")
        return None
    if declared and run["logits_dtype"] != declared:
        result.error("run.dtype", f"config declares {declared} but transformers runs it in {run['logits_dtype']}")
    return ids, logits


def check_runtime(ckpt: Checkpoint, result: VerifyResult, ids: torch.Tensor, logits: torch.Tensor,
                  dynamic_int_acts: bool = False) -> None:
    """quantkit's own runtime on the ids transformers gave `logits` for (compressed-tensors only)."""
    if ckpt.quant_method != "compressed-tensors":
        return
    from quantkit.export.ct_reader import load_ct_checkpoint

    try:
        ours = load_ct_checkpoint(ckpt.path, dtype=logits.dtype)
    except ModelLoadError as e:
        # a scheme quantkit's runtime does not implement is quantkit's gap, not the checkpoint's
        result.warn("run.runtime", f"not compared with quantkit's runtime: {first_line(e)}")
        return
    try:
        with torch.inference_mode():
            ours_logits = ours(ids).logits
    except Exception as e:  # noqa: BLE001
        result.error("run.runtime", f"quantkit's runtime fails on it: {first_line(e)}")
        return
    ref, got = logits.float(), ours_logits.float()
    delta = float((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    lp, lq = ref.log_softmax(-1), got.log_softmax(-1)
    kl = float((lp.exp() * (lp - lq)).sum(-1).mean())
    run = result.info["run"]
    run.update(runtime_rel_max_diff=delta, runtime_kl=kl,
               runtime_top1_agreement=float((ref.argmax(-1) == got.argmax(-1)).float().mean()))
    if dynamic_int_acts:
        run["runtime_tolerance"] = {"kl": DYNAMIC_INT_KL_TOL}
        if not kl <= DYNAMIC_INT_KL_TOL:
            result.error("run.runtime", f"quantkit's runtime and transformers disagree: mean token KL {kl:.3g} "
                         f"(tolerance {DYNAMIC_INT_KL_TOL} for dynamic int8 activations)")
    else:
        run["runtime_tolerance"] = {"rel_max_diff": RUNTIME_RTOL}
        if not delta <= RUNTIME_RTOL:
            result.error("run.runtime", f"quantkit's runtime and transformers disagree: max logit difference is "
                         f"{delta:.3g} of the largest logit (tolerance {RUNTIME_RTOL})")
