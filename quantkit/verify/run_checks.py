""""It runs": the checkpoint loads in transformers and one short forward gives finite logits in the
declared dtype; for compressed-tensors, quantkit's own runtime gives the same logits.

The tolerance is on the largest logit difference relative to the largest logit magnitude.
transformers decompresses each layer to a dense weight and quantkit's runtime computes from the
packed codes, so weight-only schemes agree to rounding order; W4A4 and W8A8 quantize activations
on the fly, where a value on a rounding boundary can round the other way.
"""

from __future__ import annotations

import warnings

import torch

from quantkit.errors import ModelLoadError
from quantkit.verify.checkpoint import Checkpoint
from quantkit.verify.result import VerifyResult

RUNTIME_RTOL = 2e-2  # max |logit difference| / max |logit|, transformers vs quantkit's runtime
N_TOKENS = 16


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0][:200]}" if text else type(e).__name__


def _tokens(ckpt: Checkpoint) -> torch.Tensor:
    vocab = int(ckpt.text_config().get("vocab_size") or 256)
    g = torch.Generator().manual_seed(0)
    return torch.randint(1, max(2, vocab), (1, N_TOKENS), generator=g)


def check_runs(ckpt: Checkpoint, result: VerifyResult) -> None:
    from transformers import AutoModelForCausalLM

    # quant_method "quantkit" loads because importing quantkit registers it with transformers
    ids = _tokens(ckpt)
    declared = ckpt.declared_dtype
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(ckpt.path, dtype="auto").eval()
    except Exception as e:  # noqa: BLE001 - any failure to load is the finding
        result.error("run.load", f"does not load in transformers: {_first_line(e)}")
        return
    try:
        with torch.inference_mode():
            logits = model(ids).logits
    except Exception as e:  # noqa: BLE001
        result.error("run.forward", f"loads in transformers but a forward fails: {_first_line(e)}")
        return
    finally:
        del model
    run: dict = {"tokens": N_TOKENS, "logits_dtype": str(logits.dtype).removeprefix("torch.")}
    result.info["run"] = run
    if not torch.isfinite(logits).all():
        result.error("run.finite", f"transformers forward gives {int((~torch.isfinite(logits)).sum())} non-finite logits")
        return
    if declared and run["logits_dtype"] != declared:
        result.error("run.dtype", f"config declares {declared} but transformers runs it in {run['logits_dtype']}")
    if ckpt.quant_method != "compressed-tensors":
        return
    from quantkit.export.ct_reader import load_ct_checkpoint

    try:
        ours = load_ct_checkpoint(ckpt.path, dtype=logits.dtype)
    except ModelLoadError as e:
        # a scheme quantkit's runtime does not implement is quantkit's gap, not the checkpoint's
        result.warn("run.runtime", f"not compared with quantkit's runtime: {_first_line(e)}")
        return
    try:
        with torch.inference_mode():
            ours_logits = ours(ids).logits
    except Exception as e:  # noqa: BLE001
        result.error("run.runtime", f"quantkit's runtime fails on it: {_first_line(e)}")
        return
    ref = logits.float()
    delta = float((ours_logits.float() - ref).abs().max() / ref.abs().max().clamp_min(1e-30))
    run["runtime_rel_max_diff"] = delta
    run["runtime_tolerance"] = RUNTIME_RTOL
    if not delta <= RUNTIME_RTOL:
        result.error("run.runtime", f"quantkit's runtime and transformers disagree: max logit difference is {delta:.3g} "
                     f"of the largest logit (tolerance {RUNTIME_RTOL})")
