"""Report: the result of `apply` as JSON and Markdown."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return str(n)


@dataclass
class Report:
    model: str
    recipe: str
    output: str | None = None
    device: str = "cpu"
    passes: list[dict] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    model_bytes_before: int | None = None
    model_bytes_after: int | None = None
    checkpoint_bytes: int | None = None
    ppl_before: float | None = None
    ppl_after: float | None = None
    kl: float | None = None
    seconds: dict[str, float] = field(default_factory=dict)
    gates: list[dict] = field(default_factory=list)

    @property
    def ppl_increase_pct(self) -> float | None:
        if self.ppl_before is None or self.ppl_after is None:
            return None
        return 100.0 * (self.ppl_after - self.ppl_before) / self.ppl_before

    def to_dict(self) -> dict:
        data = asdict(self)
        data["ppl_increase_pct"] = self.ppl_increase_pct
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str) + "\n"

    def summary_rows(self) -> list[tuple[str, str, str]]:
        """(metric, before, after) rows for the terminal table and Markdown."""
        def ppl(v):
            return "-" if v is None else f"{v:.3f}"

        ratio = ""
        if self.model_bytes_before and self.model_bytes_after:
            ratio = f" ({self.model_bytes_after / self.model_bytes_before:.2f}x)"
        rows = [
            ("model memory", _fmt_bytes(self.model_bytes_before), _fmt_bytes(self.model_bytes_after) + ratio),
            ("checkpoint size", "-", _fmt_bytes(self.checkpoint_bytes)),
            ("perplexity (held-out)", ppl(self.ppl_before), ppl(self.ppl_after)
             + ("" if self.ppl_increase_pct is None else f" ({self.ppl_increase_pct:+.2f}%)")),
            ("mean token KL vs original", "-", "-" if self.kl is None else f"{self.kl:.5f}"),
        ]
        rows += [(f"time: {k}", "", f"{v:.1f} s") for k, v in self.seconds.items()]
        return rows

    def to_markdown(self) -> str:
        lines = [f"# quantkit report: {self.recipe} on {self.model}", ""]
        if self.output:
            lines += [f"Output: `{self.output}`", ""]
        lines += ["| metric | before | after |", "|---|---|---|"]
        lines += [f"| {a} | {b} | {c} |" for a, b, c in self.summary_rows()]
        lines += ["", "## Passes", "", "| # | pass | seconds |", "|---|---|---|"]
        lines += [f"| {p['index']} | {p['pass']} | {p['seconds']:.2f} |" for p in self.passes]
        if self.gates:
            lines += ["", "## Quality gates", "", "| gate | limit | value | ok |", "|---|---|---|---|"]
            lines += [f"| {g['gate']} | {g['limit']} | {g['value']:.4f} | {'yes' if g['ok'] else 'NO'} |" for g in self.gates]
        if self.details:
            lines += ["", "## Pass details", "", "```json", json.dumps(self.details, indent=2, default=str)[:20000], "```"]
        return "\n".join(lines) + "\n"


def write_report_html(report: Report, path, model=None) -> None:
    """Write report.html (self-contained). With the quantized model, per-layer relative weight
    errors are measured against the source checkpoint (report.details["layer_weight_error"])."""
    from pathlib import Path

    from quantkit.io import atomic_write_text
    from quantkit.report_html import render

    errors = report.details.get("layer_weight_error")
    if errors is None and model is not None:
        from quantkit.report_errors import layer_weight_errors, source_dir

        folder = source_dir(report.model)
        errors = layer_weight_errors(model, folder) if folder is not None else {}
        report.details["layer_weight_error"] = errors
    atomic_write_text(Path(path), render(report, errors))
