"""Self-contained HTML sensitivity page: matplotlib (Agg) figures embedded as base64 PNG."""

from __future__ import annotations

import base64
import html
import io
import math

from quantkit.analysis.diagnostics import K_INIT
from quantkit.analysis.report import budget_markdown, component_rows
from quantkit.analysis.sensitivity import SensitivityResult

DPI = 90  # small PNGs keep the page a few hundred KB


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # no display on CI machines; must precede pyplot's first import
    import matplotlib.pyplot as plt

    return plt


def sensitivity_matrix(result: SensitivityResult) -> tuple[list[list[float]], str]:
    """[component][block] sensitivity: measured grid runs, or the component x block-profile estimate."""
    comps, blocks = result.components, list(range(result.num_layers))
    grid = {(r.component, r.block): r.score(result.metric) for r in result.runs_of("grid")}
    if grid:
        return [[grid.get((c, b), math.nan) for b in blocks] for c in comps], "measured (grid runs)"
    comp, block = result.component_scores(), result.block_scores()
    total = sum(max(v, 0.0) for v in block.values())
    if not comp or not block or total <= 0:
        return [], ""
    est = [[comp.get(c, math.nan) * max(block.get(b, math.nan), 0.0) / total for b in blocks] for c in comps]
    return est, "estimated: component total x block profile (run --isolation grid to measure)"


def _diag_matrix(result: SensitivityResult, col: str) -> list[list[float]]:
    by = {(d["component"], d["block"]): d.get(col) for d in result.diagnostics}
    return [[by.get((c, b), math.nan) or math.nan for b in range(result.num_layers)] for c in result.components]


def _heatmap(plt, matrix, result: SensitivityResult, title: str, cmap: str, centre: float | None = None) -> str:
    fig, ax = plt.subplots(figsize=(max(6, 0.28 * result.num_layers + 2), 0.4 * len(result.components) + 1.4))
    limits = {}
    finite = [v for row in matrix for v in row if isinstance(v, float) and math.isfinite(v)]
    if centre is not None and finite:
        half = max(abs(v - centre) for v in finite) or 1.0
        limits = {"vmin": centre - half, "vmax": centre + half}  # diverging map centred on the anchor
    im = ax.imshow(matrix, aspect="auto", cmap=cmap, interpolation="nearest", **limits)
    ax.set_yticks(range(len(result.components)), result.components)
    ax.set_xlabel("block")
    ax.set_title(title, fontsize=10)
    fig.colorbar(im, ax=ax, fraction=0.03)
    return _png(fig)


def _bars(plt, labels: list[str], values: list[float], title: str, ylabel: str) -> str:
    fig, ax = plt.subplots(figsize=(max(5, 0.25 * len(labels) + 2), 2.8))
    ax.bar(range(len(values)), values, color="#3b6ea8")
    ax.set_xticks(range(len(labels)), labels, rotation=90 if len(labels) > 12 else 0, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    return _png(fig)


def figures(result: SensitivityResult) -> list[tuple[str, str]]:
    """(caption, data URI) for every figure the result supports."""
    plt = _plt()
    metric = "mean token KL" if result.metric == "kl" else "dPPL"
    out = []
    matrix, how = sensitivity_matrix(result)
    if matrix:
        out.append((f"Sensitivity ({metric}), components x blocks, {how}",
                    _heatmap(plt, matrix, result, f"{result.format} {result.mode}: {metric}", "magma")))
    if result.diagnostics:
        out.append(("Weibull shape k per matrix (white = 1.205, the Gaussian anchor; blue = heavier tails)",
                    _heatmap(plt, _diag_matrix(result, "weibull_k"), result, "Weibull k", "coolwarm", K_INIT)))
    comp = result.runs_of("component")
    if comp:
        scores = [r.score(result.metric) for r in comp]
        out.append((f"Component-wise {metric}",
                    _bars(plt, [r.component for r in comp], scores, "component in every block", metric)))
    for iso, title in (("block", "one block quantized"), ("block-complement", "all blocks but one quantized")):
        runs = result.runs_of(iso)
        if runs:
            out.append((f"Block-wise {metric}: {title}",
                        _bars(plt, [str(r.block) for r in runs], [r.score(result.metric) for r in runs], title, metric)))
    return out


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


_CSS = ("body{font-family:sans-serif;max-width:1100px;margin:2em auto;color:#222}"
        "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px}"
        "th{background:#eee}.pass{color:#186a1f}.fail{color:#a11}.na{color:#777}img{max-width:100%}")


def _rho(x: float | None) -> str:
    return "n/a" if x is None or not math.isfinite(x) else f"{x:+.3f}"


def to_html(result: SensitivityResult) -> str:
    checks = "".join(
        f"<tr><td>{c.id}</td><td>{html.escape(c.claim)}</td>"
        f"<td class='{ {True: 'pass', False: 'fail', None: 'na'}[c.passed] }'>"
        f"{ {True: 'pass', False: 'not reproduced', None: 'not evaluated'}[c.passed] }</td>"
        f"<td>{html.escape(c.detail)}</td></tr>"
        for c in result.checks
    )
    all_run = result.run("all")
    summary = (f"FP PPL {result.ppl_fp:.4f}" + (f"; ALL quantized PPL {all_run.ppl:.4f}, KL {all_run.kl:.4g}" if all_run else "")
               + f"; {result.samples} x {result.seq_len} tokens; ranking metric {result.metric}")
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>quantkit sensitivity</title><style>{_CSS}</style></head><body>",
        f"<h1>Sensitivity: {html.escape(result.model)} &mdash; {result.format} {result.mode}</h1><p>{html.escape(summary)}</p>",
        "<h2>Paper checks (soft, never fatal)</h2><table><tr><th>check</th><th>claim</th><th>result</th><th>detail</th></tr>"
        + checks + "</table>",
    ]
    if result.runs_of("component"):
        parts.append("<h2>Components</h2>" + _table(["component", "PPL", "dPPL", "rel dPPL", "KL", "share of ALL"],
                                                    component_rows(result)))
    header, rows = result.top_table()
    parts.append("<h2>Most sensitive runs</h2>" + _table(header, rows))
    for caption, uri in figures(result):
        cap = html.escape(caption)
        parts.append(f"<figure><img src='{uri}' alt='{cap}'><figcaption>{cap}</figcaption></figure>")
    if result.spearman:
        parts.append("<h2>Spearman rho: diagnostic vs sensitivity</h2>" + _table(
            ["level", "diagnostic", "n", "rho"],
            [[s["level"], s["diagnostic"], s["n"], _rho(s["rho"])] for s in result.spearman]))
    if result.budget:
        parts.append("<pre>" + html.escape(budget_markdown(result.budget)) + "</pre>")
        parts.append("<h3>Recipe</h3><pre>" + html.escape(result.budget["recipe"]) + "</pre>")
    if result.notes:
        parts.append("<ul>" + "".join(f"<li>{html.escape(n)}</li>" for n in result.notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)
