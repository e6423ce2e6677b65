"""Findings of one verify run: errors fail it (exit 1), warnings are listed, info is context."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from quantkit.errors import QuantkitError

ERROR, WARNING, INFO = "error", "warning", "info"


@dataclass(frozen=True)
class Finding:
    severity: str  # error | warning | info
    check: str  # e.g. "config.ignore", "tensors.scale"
    message: str
    module: str | None = None


@dataclass
class VerifyResult:
    path: str
    quant_method: str | None = None
    findings: list[Finding] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)  # measured facts: TP degrees, logit deltas, per-layer errors

    def add(self, severity: str, check: str, message: str, module: str | None = None) -> None:
        self.findings.append(Finding(severity, check, message, module))

    def error(self, check: str, message: str, module: str | None = None) -> None:
        self.add(ERROR, check, message, module)

    def warn(self, check: str, message: str, module: str | None = None) -> None:
        self.add(WARNING, check, message, module)

    @property
    def errors(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == ERROR]

    @property
    def warnings(self) -> list[Finding]:
        return [f for f in self.findings if f.severity == WARNING]

    @property
    def ok(self) -> bool:
        return not self.errors

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "quant_method": self.quant_method,
            "ok": self.ok,
            "errors": [asdict(f) for f in self.errors],
            "warnings": [asdict(f) for f in self.warnings],
            "info": self.info,
        }

    def summary(self) -> str:
        return f"{Path(self.path).name}: {len(self.errors)} error(s), {len(self.warnings)} warning(s)"


class VerifyFailed(QuantkitError):
    """verify found errors in the checkpoint. Exit code 1 (a check failed, not bad input)."""

    exit_code = 1

    def __init__(self, result: VerifyResult):
        first = result.errors[0]
        where = f"{first.module}: " if first.module else ""
        super().__init__(f"verify found {len(result.errors)} error(s) in {result.path}; first: {where}{first.message}")
        self.report = result
