"""Sensitivity result -> JSON, CSV, Markdown, HTML and a budget recipe, written into one directory."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from quantkit.analysis.sensitivity import SensitivityResult

RUN_COLUMNS = ("model", "format", "mode", "isolation", "component", "block", "n_modules", "ppl", "dppl", "rel", "kl",
               "seconds")
DIAG_COLUMNS = ("module", "component", "block", "numel", "weibull_k", "weibull_lambda", "weibull_r2", "weibull_ks",
                "weibull_class", "dk_init", "q90_q10", "q99_q50", "p999_p50", "gini", "rms", "lambda_over_rms",
                "kurtosis", "outlier_6sigma", "act_outlier_ratio")
TOP_N = 10  # rows of the "most sensitive" table


def _json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None  # JSON has no NaN; null reads as "not measured"
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def to_json(result: SensitivityResult) -> str:
    return json.dumps(_json_safe(result.to_dict()), indent=2)


def runs_csv(result: SensitivityResult) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(RUN_COLUMNS)
    w.writerow([result.model, result.format, result.mode, "fp", "", "", 0, result.ppl_fp, 0.0, 0.0, 0.0, 0.0])
    for r in result.runs:
        w.writerow([result.model, result.format, result.mode, r.isolation, r.component or "",
                    "" if r.block is None else r.block, r.n_modules, r.ppl, r.dppl, r.rel, r.kl, r.seconds])
    return buf.getvalue()


def diagnostics_csv(result: SensitivityResult) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=DIAG_COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(result.diagnostics)
    return buf.getvalue()


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _g(x: float | None, spec: str = ".4g") -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, spec)


def _mark(passed: bool | None) -> str:
    return {True: "pass", False: "FAIL (soft)", None: "not evaluated"}[passed]


def component_rows(result: SensitivityResult) -> list[list[str]]:
    all_run = result.run("all")
    total = all_run.score(result.metric) if all_run else math.nan
    rows = []
    for r in result.ranking("component"):
        share = r.score(result.metric) / total if total and math.isfinite(total) and total > 0 else math.nan
        rows.append([r.component, _g(r.ppl, ".3f"), _g(r.dppl, "+.4f"), _g(r.rel, "+.2%"), _g(r.kl, ".4g"),
                     _g(share, ".1%")])
    return rows


def to_markdown(result: SensitivityResult) -> str:
    all_run = result.run("all")
    parts = [
        f"# Sensitivity: {result.model}, {result.format} {result.mode}",
        f"{result.samples} x {result.seq_len} held-out tokens; ranking metric `{result.metric}`; "
        f"FP PPL {result.ppl_fp:.4f}"
        + (f"; ALL quantized PPL {all_run.ppl:.4f} (dPPL {all_run.dppl:+.4f}, KL {all_run.kl:.4g})" if all_run else ""),
        "",
        "## Paper checks (soft)",
        _md_table(["check", "claim", "result", "detail"], [[c.id, c.claim, _mark(c.passed), c.detail] for c in result.checks]),
    ]
    if result.runs_of("component"):
        parts += ["", "## Components (all blocks)",
                  _md_table(["component", "PPL", "dPPL", "rel dPPL", "KL", "share of ALL"], component_rows(result))]
    for iso, title in (("block", "Blocks (all components)"), ("block-complement", "All blocks but one")):
        if result.runs_of(iso):
            rows = [[str(r.block), _g(r.ppl, ".3f"), _g(r.dppl, "+.4f"), _g(r.rel, "+.2%"), _g(r.kl, ".4g")]
                    for r in result.ranking(iso)]
            parts += ["", f"## {title}, most sensitive first", _md_table(["block", "PPL", "dPPL", "rel dPPL", "KL"], rows)]
    header, rows = result.top_table(TOP_N)
    parts += ["", f"## Top {TOP_N} isolation runs", _md_table(header, rows)]
    if result.spearman:
        rho = [[s["level"], s["diagnostic"], str(s["n"]), _g(s["rho"], "+.3f")] for s in result.spearman]
        parts += ["", "## Spearman rho: diagnostic vs measured sensitivity", _md_table(["level", "diagnostic", "n", "rho"], rho)]
    if result.budget:
        parts += ["", budget_markdown(result.budget)]
    if result.notes:
        parts += ["", "## Notes", *[f"- {n}" for n in result.notes]]
    parts += ["", f"Timings: {', '.join(f'{k} {v:.1f}s' for k, v in result.timings.items())}", ""]
    return "\n".join(parts)


def budget_markdown(budget: dict) -> str:
    rows = [[label, _g(r["avg_bits"], ".3f"), _g(r["ppl"], ".4f"), _g(r["kl"], ".4g"),
             ", ".join(f"{k}:{v}" for k, v in r["counts"].items())] for label, r in budget["compare"].items()]
    return "\n".join([
        f"## Budget {budget['budget_bits']:g} bits/weight (scores from {budget['scores_from']})",
        f"Measured on {budget['evaluated_on']}. `guided` spends the bits where measured sensitivity x relative "
        "weight error is largest; `blind` solves the same budget with every module equally sensitive (a control); "
        f"candidates: {', '.join(budget.get('candidates', []))}.",
        _md_table(["assignment", "avg bits", "PPL", "KL", "modules per format"], rows),
    ])


def write_reports(result: SensitivityResult, out_dir: str | Path) -> dict[str, Path]:
    """Write every report file; returns name -> path."""
    from quantkit.analysis.report_html import to_html

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = {
        "json": ("sensitivity.json", to_json(result)),
        "csv": ("sensitivity.csv", runs_csv(result)),
        "diagnostics": ("diagnostics.csv", diagnostics_csv(result)),
        "md": ("sensitivity.md", to_markdown(result)),
        "html": ("sensitivity.html", to_html(result)),
    }
    if result.budget:
        files["recipe"] = ("recipe_budget.yaml", result.budget["recipe"])
    written = {}
    for key, (name, text) in files.items():
        path = out / name
        tmp = path.with_suffix(path.suffix + ".tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
        written[key] = path
    return written
