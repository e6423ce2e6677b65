"""`quantkit sensitivity`: the typer command; cli.py registers it with app.command("sensitivity").

Imports only quantkit.cli_common (not quantkit.cli), so the two modules do not import each other.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from quantkit.cli_common import DeviceOpt, JsonOpt, ModelArg, TrustOpt, err_console, error_boundary
from quantkit.errors import OutputExistsError

FormatOpt = Annotated[str, typer.Option(
    "--format", help="nvfp4, mxfp4, int8 or int4; a comma list sweeps each (nvfp4,mxfp4 evaluates C3)")]
ModeOpt = Annotated[str, typer.Option("--mode", help="w4a16 (weights only) or w4a4 (linear inputs too)")]
IsolationOpt = Annotated[str, typer.Option("--isolation", help="comma list of component, block, block-complement, grid")]
MetricOpt = Annotated[str, typer.Option("--metric", help="ranking metric: kl (mean token KL) or ppl (dPPL)")]
SamplesOpt = Annotated[int, typer.Option("--samples", help="held-out windows measured per run")]
SeqLenOpt = Annotated[int, typer.Option("--seq-len", help="tokens per window")]
OutOpt = Annotated[Path, typer.Option("-o", "--output", help="report directory; one subfolder per format and mode")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="continue from the partial result in the output folder")]
BudgetOpt = Annotated[Optional[float], typer.Option(
    "--budget-bits", help="also write a mixed-format recipe averaging <= B bits/weight")]
CompareOpt = Annotated[Optional[Path], typer.Option("--compare", help="sensitivity.json of another model, for check C4")]
TopOpt = Annotated[int, typer.Option("--top", help="rows in the most-sensitive table")]


def sensitivity(
    model: ModelArg = "smollm2-135m",
    format: FormatOpt = "nvfp4",
    mode: ModeOpt = "w4a16",
    isolation: IsolationOpt = "component,block",
    metric: MetricOpt = "kl",
    samples: SamplesOpt = 16,
    seq_len: SeqLenOpt = 512,
    output: OutOpt = Path("sensitivity"),
    resume: ResumeOpt = False,
    budget_bits: BudgetOpt = None,
    compare: CompareOpt = None,
    top: TopOpt = 10,
    force: Annotated[bool, typer.Option("--force", help="overwrite existing reports")] = False,
    threads: Annotated[Optional[int], typer.Option("--threads", help="torch CPU threads (default: torch's)")] = None,
    device: DeviceOpt = "cpu",
    trust_remote_code: TrustOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Which components and blocks of MODEL hurt most when quantized to FORMAT.

    With --json the envelope's report is {"results": [one sensitivity result per format]}.
    """
    with error_boundary(as_json) as outcome:
        from quantkit.analysis.checks import add_cross_format_check
        from quantkit.analysis.report import write_reports
        from quantkit.analysis.sensitivity import SensitivityError, parse_isolation, run_sensitivity
        from quantkit.formats import get_format
        from quantkit.models import load_model

        formats = [f.strip() for f in format.split(",") if f.strip()]
        if not formats:
            raise SensitivityError("--format is empty")
        for f in formats:
            get_format(f)  # unknown names fail before the model loads
        parse_isolation(isolation)
        dirs = {f: output / f"{f}-{mode}" for f in formats}
        for d in dirs.values():
            if (d / "sensitivity.json").exists() and not (force or resume):
                raise OutputExistsError(f"{d} already holds a sensitivity report; pass --force or --resume")
        other = _load_compare(compare) if compare else None
        net, tok = load_model(model, device=device, trust_remote_code=trust_remote_code)
        results = []
        for f in formats:
            results.append(run_sensitivity(
                net, tok, format=f, mode=mode, isolation=isolation, metric=metric, samples=samples, seq_len=seq_len,
                out_dir=dirs[f], resume=resume, budget_bits=budget_bits, progress=True, model_name=model, compare=other,
                threads=threads,
            ))
        if len(results) > 1:
            add_cross_format_check(results)
            for f, r in zip(formats, results):
                write_reports(r, dirs[f])
        for f, r in zip(formats, results):
            _print(err_console, r, top, dirs[f])  # a summary of work done: stderr (data: --json, the reports)
        outcome.report = {"results": [r.to_dict() for r in results]}


def _load_compare(path: Path):
    from quantkit.analysis.sensitivity import SensitivityError, SensitivityResult

    try:
        return SensitivityResult.from_dict(json.loads(path.read_text()))
    except (OSError, json.JSONDecodeError, TypeError, KeyError) as e:
        raise SensitivityError(f"--compare {path}: not a readable sensitivity.json ({type(e).__name__})") from None


def _print(console, result, top: int, out_dir: Path) -> None:
    from rich.table import Table

    header, rows = result.top_table(top)
    all_run = result.run("all")
    title = f"{result.model} {result.format} {result.mode}: most sensitive (FP PPL {result.ppl_fp:.3f}"
    title += f", ALL {all_run.ppl:.3f})" if all_run else ")"
    table = Table(title=title)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 1 else "right")
    for row in rows:
        table.add_row(*row)
    console.print(table)
    for c in result.checks:
        verdict = {True: "[green]pass[/green]", False: "[yellow]not reproduced[/yellow]",
                   None: "[dim]not evaluated[/dim]"}[c.passed]
        console.print(f"{c.id} {verdict}: {c.claim} ({c.detail})", highlight=False)
    if result.budget:
        g = result.budget["compare"]["guided"]
        console.print(f"budget {result.budget['budget_bits']:g} bits: guided mix {g['avg_bits']:.3f} bits, "
                      f"PPL {g['ppl']:.4f}, KL {g['kl']:.4g}; recipe {out_dir / 'recipe_budget.yaml'}", highlight=False)
    console.print(f"reports in {out_dir}", highlight=False)
