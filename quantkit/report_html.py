"""report.html for `apply`: one self-contained page (inline SVG charts, inline CSS, no network).

Sections: summary (memory, size, perplexity before/after, KL), per-layer relative weight error
(one line per projection kind over the block index, plus the worst layers), time per stage, and
quality gates.
"""

from __future__ import annotations

import html
import io
import re
from collections import defaultdict

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#1d1d1f}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:13px} table{border-collapse:collapse;font-size:13px;margin:8px 0}
td,th{border:1px solid #ddd;padding:4px 10px;text-align:right} th{background:#f5f5f7} td:first-child,th:first-child{text-align:left}
.ok{color:#18794e;font-weight:600} .bad{color:#c62828;font-weight:600} .note{color:#666;font-size:13px}
.charts{display:flex;flex-wrap:wrap;gap:16px;align-items:flex-start} svg{max-width:100%;height:auto}
"""

_LAYER_RE = re.compile(r"\.(\d+)\.(.+)$")  # model.layers.<i>.<rest>


def _svg(fig) -> str:
    import matplotlib.pyplot as plt

    buf = io.StringIO()
    fig.savefig(buf, format="svg", bbox_inches="tight")
    plt.close(fig)
    text = buf.getvalue()
    return text[text.index("<svg"):]  # drop the XML prolog and DOCTYPE: inline in HTML


def _figure(w: float, h: float):
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    with matplotlib.rc_context({"svg.fonttype": "none", "font.size": 9}):
        fig, ax = plt.subplots(figsize=(w, h))
    return fig, ax


def error_chart(errors: dict[str, float]) -> str:
    """Relative weight error per layer: x = decoder block, one line per projection kind."""
    series: dict[str, list[tuple[int, float]]] = defaultdict(list)
    other: list[tuple[str, float]] = []
    for name, err in errors.items():
        m = _LAYER_RE.search(name)
        if m:
            series[m.group(2)].append((int(m.group(1)), err))
        else:
            other.append((name, err))
    fig, ax = _figure(8.5, 3.6)
    for kind in sorted(series):
        pts = sorted(series[kind])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", markersize=2.5, linewidth=1.2, label=kind)
    for name, err in other:  # modules outside the blocks (e.g. lm_head when quantized)
        ax.axhline(err, linestyle="--", linewidth=0.8, color="grey")
        ax.annotate(name, (0, err), fontsize=7, color="grey")
    ax.set_xlabel("decoder block")
    ax.set_ylabel("relative weight error")
    ax.grid(alpha=0.3)
    if series:
        ax.legend(fontsize=7, ncol=4, loc="upper left", bbox_to_anchor=(0, -0.18), frameon=False)
    return _svg(fig)


def ppl_chart(before: float, after: float) -> str:
    fig, ax = _figure(3.2, 2.6)
    bars = ax.bar(["before", "after"], [before, after], color=["#8e8e93", "#0a84ff"])
    ax.bar_label(bars, fmt="%.3f", fontsize=8)
    ax.set_ylabel("held-out perplexity")
    ax.set_ylim(0, max(before, after) * 1.2)
    return _svg(fig)


def time_chart(stages: list[tuple[str, float]]) -> str:
    fig, ax = _figure(5.2, 0.45 * len(stages) + 0.8)
    labels = [s for s, _ in stages][::-1]
    values = [v for _, v in stages][::-1]
    bars = ax.barh(labels, values, color="#34c759")
    ax.bar_label(bars, fmt="%.1f s", fontsize=8)
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(values) * 1.25 if values and max(values) > 0 else 1)
    return _svg(fig)


def _table(header: tuple[str, ...], rows: list[tuple]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _stages(report) -> list[tuple[str, float]]:
    """Time per stage (load, passes, eval, save), without the total."""
    return [(k, float(v)) for k, v in report.seconds.items() if k != "total" and isinstance(v, (int, float))]


def _pass_rows(report) -> list[tuple]:
    # passes that run together in one block loop share one time; the table says so rather
    # than charting the same seconds twice
    return [(html.escape(str(p.get("index", i))), html.escape(str(p.get("pass", "?"))),
             f"{p['seconds']:.1f} s" if isinstance(p.get("seconds"), (int, float)) else "-")
            for i, p in enumerate(report.passes)]


def render(report, errors: dict[str, float] | None) -> str:
    esc = html.escape
    parts = [f"<h1>quantkit report: {esc(report.recipe)} on {esc(report.model)}</h1>",
             f"<div class='meta'>output: {esc(str(report.output or '-'))} &middot; device: {esc(report.device)}"
             + (f" &middot; total {report.seconds['total']:.1f} s" if "total" in report.seconds else "") + "</div>"]

    parts.append("<h2>Summary</h2>")
    parts.append(_table(("metric", "before", "after"),
                        [tuple(esc(c) for c in row) for row in report.summary_rows() if not row[0].startswith("time:")]))
    if report.ppl_before is not None and report.ppl_after is not None:
        parts.append("<h2>Perplexity before / after</h2><div class='charts'>"
                     + ppl_chart(report.ppl_before, report.ppl_after) + "</div>")
    else:
        parts.append("<h2>Perplexity before / after</h2><p class='note'>not evaluated in this run (--no-eval)</p>")

    parts.append("<h2>Per-layer quantization error</h2>")
    if errors:
        worst = sorted(errors.items(), key=lambda kv: kv[1], reverse=True)[:10]
        mean = sum(errors.values()) / len(errors)
        parts.append(f"<p class='note'>relative weight error ||W &minus; Q(W)||<sub>F</sub> / ||W||<sub>F</sub> of "
                     f"{len(errors)} quantized layers against the source checkpoint; mean {mean:.4f}. Activation "
                     "error is not measured per layer in this run.</p>")
        parts.append("<div class='charts'>" + error_chart(errors) + "</div>")
        parts.append(_table(("most affected layers", "relative weight error"),
                            [(esc(n), f"{e:.4f}") for n, e in worst]))
    else:
        parts.append("<p class='note'>no per-layer weight error: the source checkpoint's safetensors were not "
                     "available (GGUF or hub model not cached), or no layer was quantized.</p>")

    stages = _stages(report)
    if stages:
        parts.append("<h2>Time per stage</h2><div class='charts'>" + time_chart(stages) + "</div>")
    if report.passes:
        parts.append("<p class='note'>passes (passes run in one block loop report that loop's time each)</p>"
                     + _table(("#", "pass", "seconds"), _pass_rows(report)))
    if report.gates:
        rows = [(esc(g["gate"]), esc(str(g["limit"])), f"{g['value']:.4f}" if g["value"] is not None else "-",
                 "<span class='ok'>pass</span>" if g["ok"] else "<span class='bad'>FAIL</span>") for g in report.gates]
        parts.append("<h2>Quality gates</h2>" + _table(("gate", "limit", "value", "result"), rows))
    body = "\n".join(parts)
    return (f"<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
            f"<title>quantkit: {esc(report.recipe)} on {esc(report.model)}</title><style>{CSS}</style></head>"
            f"<body>\n{body}\n</body></html>\n")
