"""The FP4 paper's findings C1-C4 (spec §3.2) as soft checks: reported, never fatal.

A check is passed True/False, or None when this sweep cannot evaluate it (e.g. C3 needs both
FP4 formats, C4 a second model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from quantkit.analysis.diagnostics import spearman

if TYPE_CHECKING:
    from quantkit.analysis.sensitivity import SensitivityResult

EARLY_FRACTION = 0.10  # "the first ~10% of blocks"
TOP_QUARTILE = 0.25
C4_MIN_RHO = 0.7  # "broadly stable" rankings [DERIVED threshold]
ATTN = ("q", "k", "v", "o")


@dataclass
class Check:
    id: str
    claim: str
    passed: bool | None
    detail: str


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def check_c1(result: SensitivityResult) -> Check:
    claim = "min(up, down) > gate > max(q, k, v, o)"
    s = result.component_scores()
    need = ("up", "down", "gate", *ATTN)
    if not all(c in s for c in need):
        return Check("C1", claim, None, "needs component-wise runs over q, k, v, o, gate, up, down")
    ok = _c1_holds(s)
    mlp, gate, attn = min(s["up"], s["down"]), s["gate"], max(s[c] for c in ATTN)
    detail = f"min(up,down)={_fmt(mlp)} gate={_fmt(gate)} max(attn)={_fmt(attn)} ({result.metric})"
    # the paper's metric is unknown, so say how the other metric ranks too
    other = "ppl" if result.metric == "kl" else "kl"
    s_other = {r.component: r.score(other) for r in result.runs_of("component")}
    detail += f"; by {'dPPL' if other == 'ppl' else 'KL'}: {'holds' if _c1_holds(s_other) else 'does not hold'}"
    return Check("C1", claim, ok, detail)


def _c1_holds(s: dict[str, float]) -> bool:
    return bool(min(s["up"], s["down"]) > s["gate"] > max(s[c] for c in ATTN))


def check_c2(result: SensitivityResult) -> Check:
    claim = "an early block (first 10%) is in the top quartile of block sensitivity"
    if result.format == "mxfp4":
        claim += " (the paper's MXFP4 finding)"
    s = result.block_scores()
    if len(s) < 4:
        return Check("C2", claim, None, "needs block-wise runs over at least 4 blocks")
    n_early = max(1, math.ceil(EARLY_FRACTION * len(s)))
    blocks = sorted(s)
    ranked = sorted(blocks, key=lambda b: -s[b])
    top = set(ranked[: max(1, math.ceil(TOP_QUARTILE * len(s)))])
    early = blocks[:n_early]
    hit = [b for b in early if b in top]
    detail = (f"argmax block {ranked[0]} of {len(s)} (last is {blocks[-1]}); early blocks {early}; "
              f"top quartile {sorted(top)}")
    return Check("C2", claim, bool(hit), detail)


def check_c3(results: list[SensitivityResult]) -> Check:
    claim = "Delta_all(MXFP4) > Delta_all(NVFP4)"
    by_fmt = {(r.format, r.mode): r for r in results}
    for mode in {r.mode for r in results}:
        mx, nv = by_fmt.get(("mxfp4", mode)), by_fmt.get(("nvfp4", mode))
        if mx and nv and mx.run("all") and nv.run("all"):
            a, b = mx.run("all").score(mx.metric), nv.run("all").score(nv.metric)
            return Check("C3", claim, bool(a > b), f"mxfp4 {_fmt(a)} vs nvfp4 {_fmt(b)} ({mx.metric}, {mode})")
    return Check("C3", claim, None, "needs mxfp4 and nvfp4 sweeps in one invocation (--format nvfp4,mxfp4)")


def check_c4(result: SensitivityResult, other: SensitivityResult | None) -> Check:
    claim = f"component ranking stable across models (Spearman rho >= {C4_MIN_RHO})"
    if other is None:
        return Check("C4", claim, None, "needs a sweep of a second model (--compare RESULT.json)")
    a, b = result.component_scores(), other.component_scores()
    common = [c for c in a if c in b]
    rho = spearman([a[c] for c in common], [b[c] for c in common])
    if not math.isfinite(rho):
        return Check("C4", claim, None, f"fewer than 3 shared components with {other.model}")
    return Check("C4", claim, bool(rho >= C4_MIN_RHO), f"rho={rho:.3f} vs {other.model} over {len(common)} components")


def single_result_checks(result: SensitivityResult) -> list[Check]:
    return [check_c1(result), check_c2(result), check_c3([result])]


def cross_model_checks(result: SensitivityResult, other: SensitivityResult | None) -> list[Check]:
    return [check_c4(result, other)]


def add_cross_format_check(results: list[SensitivityResult]) -> None:
    """Replace each result's C3 with the cross-format verdict once several formats are measured."""
    c3 = check_c3(results)
    for r in results:
        r.checks = [c3 if c.id == "C3" else c for c in r.checks]
