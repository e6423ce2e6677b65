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
    from quantkit.verify.run_checks import check_runs
    from quantkit.verify.shape_checks import check_shapes
    from quantkit.verify.source_checks import check_source
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
    if run:
        dynamic_int = plan is not None and any(
            s.acts is not None and s.acts.get("type") == "int" and s.acts.get("dynamic") is True
            for s in plan.schemes.values())
        check_runs(ckpt, result, dynamic_int_acts=dynamic_int)
    if source is not None and plan is not None:
        check_source(ckpt, result, plan, source)
    if eval_windows and source is not None:
        from quantkit.verify.eval_checks import check_eval

        check_eval(ckpt, result, source, eval_windows)
    return result
