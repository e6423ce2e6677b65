"""`quantkit verify`: the typer command; cli.py registers it with app.command("verify").

Exit codes: 0 clean (warnings allowed), 1 errors found, 2 bad input. Findings go to stderr;
with --json the report (VerifyResult.to_dict) is the envelope's "report".
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from quantkit.cli_common import JsonOpt, err_console, error_boundary

SourceOpt = Annotated[str | None, typer.Option(
    "--source", help="the unquantized model (hub id, directory, GGUF or alias): compare every layer with it")]
CheapOpt = Annotated[bool, typer.Option("--cheap", help="config, tensor headers and scales only; no load or forward")]
LmHeadOpt = Annotated[bool, typer.Option("--allow-quantized-lm-head", help="a quantized lm_head is intended")]
EvalOpt = Annotated[int, typer.Option("--eval-windows", help="with --source: perplexity and KL vs the source on N "
                                      "held-out windows (0: off); a KL above the documented threshold warns")]


def verify(
    checkpoint: Annotated[Path, typer.Argument(help="a compressed-tensors or quantkit-layout checkpoint directory")],
    source: SourceOpt = None,
    cheap: CheapOpt = False,
    allow_quantized_lm_head: LmHeadOpt = False,
    eval_windows: EvalOpt = 0,
    as_json: JsonOpt = False,
) -> None:
    """Check a checkpoint: config, tensors, shapes, that it runs, and (with --source) every layer's error."""
    with error_boundary(as_json) as outcome:
        from quantkit.verify import VerifyFailed, verify_checkpoint

        result = verify_checkpoint(checkpoint, source=source, cheap=cheap,
                                   allow_quantized_lm_head=allow_quantized_lm_head, eval_windows=eval_windows)
        _print(result)
        outcome.report = result.to_dict()
        if not result.ok:
            raise VerifyFailed(result)


def _print(result) -> None:
    console = err_console
    for f in result.errors + result.warnings:
        colour = "red" if f.severity == "error" else "yellow"
        where = f"{f.module}: " if f.module else ""
        console.print(f"[{colour}]{f.severity}[/{colour}] " + escape(f"[{f.check}] {where}{f.message}"),
                      highlight=False, soft_wrap=True)
    tp = result.info.get("tensor_parallel")
    if tp:
        limit = f" (limited by {tp['limited_by'][0]})" if tp["limited_by"] else ""
        console.print(f"largest tensor-parallel degree: {tp['max_degree']}{limit}; all supported: {tp['degrees']}",
                      highlight=False, markup=False)
    run = result.info.get("run")
    if run and "runtime_rel_max_diff" in run:
        tol = ", ".join(f"{k} <= {v:.3g}" for k, v in run["runtime_tolerance"].items())
        console.print(f"quantkit runtime vs transformers on {run['tokens']} tokens: max logit difference "
                      f"{run['runtime_rel_max_diff']:.3g} of the largest logit, mean token KL {run['runtime_kl']:.3g}, "
                      f"top-1 agreement {run['runtime_top1_agreement']:.3f} (tolerance {tol})",
                      highlight=False, markup=False)
        ref = run.get("fp32_reference")
        if ref:
            console.print(f"vs the fp32 forward: transformers KL {ref['transformers_kl']:.3g} (the noise floor), "
                          f"quantkit runtime KL {ref['quantkit_kl']:.3g}", highlight=False, markup=False)
    src = result.info.get("source")
    if src:
        console.print(f"vs source: median relative error {src['median_rel_err']:.4g}, max {src['max_rel_err']:.4g} "
                      f"over {len(src['layers'])} layers", highlight=False, markup=False)
    ev = result.info.get("eval")
    if ev:
        console.print(f"vs source on {ev['windows']} held-out windows of {ev['seq_len']} tokens: perplexity "
                      f"{ev['ppl_source']:.3f} -> {ev['ppl_checkpoint']:.3f} ({ev['ppl_increase_pct']:+.1f}%), mean "
                      f"token KL {ev['kl']:.4g} (warns above {ev['kl_warn']})", highlight=False, markup=False)
    if result.ok:
        console.print(f"ok {result.summary()}", highlight=False, markup=False)
