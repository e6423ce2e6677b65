"""`quantkit verify`: check that a checkpoint is what engines expect, before anyone serves it.

    result = verify_checkpoint("out/qwen-nvfp4", source="Qwen/Qwen2.5-0.5B")
    result.errors, result.warnings, result.to_dict()

``cheap=True`` reads the config and the tensor headers and scales only (what ``apply`` runs on its
output before the final rename); the default also loads the checkpoint and runs a forward.
"""

from __future__ import annotations

from pathlib import Path

from quantkit.verify.checkpoint import Checkpoint, VerifyInputError
from quantkit.verify.result import Finding, VerifyFailed, VerifyResult

__all__ = ["Finding", "VerifyFailed", "VerifyInputError", "VerifyResult", "verify_checkpoint"]


def verify_checkpoint(
    path: str | Path,
    *,
    source: str | None = None,
    run: bool = True,
    cheap: bool = False,
    allow_quantized_lm_head: bool = False,
    eval_windows: int = 0,
) -> VerifyResult:
    """Check a compressed-tensors or quantkit-layout checkpoint; bad input raises VerifyInputError.

    ``eval_windows`` > 0 (needs ``source``): perplexity and KL against the source on that many
    held-out windows (eval_checks.py).
    """
    if eval_windows and source is None:
        raise VerifyInputError("--eval-windows compares against the source model: pass --source too")
    if eval_windows < 0:
        raise VerifyInputError(f"--eval-windows must be 0 (off) or a positive number of windows, not {eval_windows}")
    from quantkit.verify.config_checks import check_config
    from quantkit.verify.layout_checks import check_quantkit_layout
    from quantkit.verify.shape_checks import check_shapes
    from quantkit.verify.tensor_checks import check_tensors
    from quantkit.verify.transform_checks import check_transforms

    ckpt = Checkpoint(Path(path))
    result = VerifyResult(path=str(path), quant_method=ckpt.quant_method)
    if ckpt.skeleton_note:
        result.warn("skeleton", ckpt.skeleton_note + "; module names and shapes come from the tensor names")
    if ckpt.quant_method == "compressed-tensors":
        plan = check_config(ckpt, result, allow_quantized_lm_head=allow_quantized_lm_head)
        check_transforms(ckpt, result)
        check_tensors(ckpt, result, plan)
        check_shapes(ckpt, result, plan)
    else:
        plan = None
        check_quantkit_layout(ckpt, result)
    if cheap:
        return result
    dynamic_int = plan is not None and any(
        s.acts is not None and s.acts.get("type") == "int" and s.acts.get("dynamic") is True
        for s in plan.schemes.values())
    # the reference goes straight to _loaded_checks, which drops it before quantkit's runtime loads
    reads_source = source is not None and (plan is not None or eval_windows > 0)
    ref = _source_checks(ckpt, result, plan, source, eval_windows) if reads_source else None
    if run or ref is not None:
        _loaded_checks(ckpt, result, run, ref, dynamic_int)
    return result


def _source_checks(ckpt: Checkpoint, result: VerifyResult, plan, source: str, eval_windows: int):
    """The checks that read the source, on one load of it: the layer comparison and, with
    eval_windows, the evaluation's reference (returned); the source is released before the
    checkpoint loads, so one model is in memory at a time."""
    from quantkit.verify.source_checks import check_source
    from quantkit.verify.source_model import SourceModel

    src = SourceModel(source)
    if plan is not None:
        check_source(ckpt, result, plan, src)
    if not eval_windows:
        return None
    from quantkit.verify.eval_checks import reference

    try:
        return reference(ckpt, src, eval_windows)
    finally:
        src.release()


def _loaded_checks(ckpt: Checkpoint, result: VerifyResult, run: bool, ref, dynamic_int: bool) -> None:
    """The checks that need the checkpoint loaded in transformers, on one load of it: the forward
    ("it runs") and the evaluation against the source's reference; then quantkit's runtime, loaded
    after transformers' copy and the reference are released."""
    from quantkit.verify import eval_checks
    from quantkit.verify.run_checks import (apply_online_transforms, check_forward, check_runtime, first_line,
                                           load_in_transformers)

    model, failure = load_in_transformers(ckpt)
    if model is None:
        if run:
            result.error("run.load", f"does not load in transformers: {failure}")
        if ref is not None:
            eval_checks.report(result, None, "eval.load", f"the checkpoint does not load ({failure})")
        return
    try:
        if apply_online_transforms(ckpt, model):
            result.warn("run.transform", "transformers' from_pretrained ignores transform_config, so plain "
                        "transformers gives wrong outputs on this checkpoint; the run and eval checks apply the "
                        "online transforms with compressed-tensors' apply_transform_config after loading, as vLLM does")
    except Exception as e:  # noqa: BLE001 - a transform compressed-tensors cannot apply is the finding
        result.error("run.transform", f"compressed-tensors cannot apply its transform_config: {first_line(e)}")
        return
    ran = check_forward(ckpt, result, model) if run else None
    scores, why = None, ""
    if ref is not None:
        try:
            scores = eval_checks.measure(ref, model)
        except Exception as e:  # noqa: BLE001 - the run checks report a failing forward as an error
            why = f"a forward on the held-out windows fails ({first_line(e)})"
    del model, ref
    if ran is not None:
        check_runtime(ckpt, result, *ran, dynamic_int_acts=dynamic_int)
    if scores is not None or why:
        eval_checks.report(result, scores, "eval.forward", why)
