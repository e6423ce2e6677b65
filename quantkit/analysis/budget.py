"""`--budget-bits B`: a per-module format choice from measured sensitivities, as a recipe.

Each module (fused q/k/v and gate/up groups move as one unit, since engines fuse them into one
layer with one scheme) may take any candidate format. Its expected damage in format f is its
measured sensitivity in the swept format, scaled by how much weight error f makes relative to
the swept format: ``e(f) = s * ||W - Q_f(W)||^2 / ||W - Q_base(W)||^2`` (so INT8 and BF16 are
nearly free, MXFP4 costs a bit more than NVFP4). Minimising the summed damage under the bit
budget is a multiple-choice knapsack, solved greedily along each unit's lower convex hull of
(bits, damage). Storage is counted with its scale overhead: NVFP4 4 + 8/16 (+ one fp32 global
scale per tensor), MXFP4 4 + 8/32, INT8 8 + 16/in_features (one bf16 scale per output row),
BF16 16 bits per weight.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import yaml
from torch import nn

from quantkit.arch import ArchInfo
from quantkit.errors import FormatError, QuantkitError
from quantkit.formats import get_format

if TYPE_CHECKING:
    from quantkit.analysis.sensitivity import SensitivityResult
    from quantkit.analysis.sweep import Sweep

CANDIDATES = ("int8", "bf16")  # formats a module may be raised to, besides the swept one
SAME_BITS_CANDIDATES = ("mxfp4", "nvfp4", "int8")  # adds a cheaper format to pay for upgrades at equal bits
HIGH_PRECISION = "bf16"  # left unquantized
BF16_BITS = 16.0
FP32_BITS = 32.0
SCALE_BITS = {"nvfp4": (8.0, 16), "mxfp4": (8.0, 32)}  # format -> (bits per block scale, block size)
ROW_SCALE_BITS = 16.0  # INT8 per-output-channel scale, stored in the weight dtype (bf16)

Unit = tuple[str, ...]


class BudgetError(QuantkitError):
    """The bit budget cannot be met."""


def bits_per_weight(fmt: str, out_features: int, in_features: int) -> float:
    numel = out_features * in_features
    if fmt == HIGH_PRECISION:
        return BF16_BITS
    if fmt in SCALE_BITS:
        scale_bits, block = SCALE_BITS[fmt]
        global_bits = FP32_BITS / numel if fmt == "nvfp4" else 0.0
        return 4.0 + scale_bits / block + global_bits
    if fmt == "int8":
        return 8.0 + ROW_SCALE_BITS / in_features
    return float(get_format(fmt).bits)  # other formats declare their own storage cost


def module_scores(result: SensitivityResult, names: list[str], arch: ArchInfo) -> tuple[dict[str, float], str]:
    """Per-module sensitivity (>= 0) in the swept format, and how it was obtained."""
    grid = {(r.component, r.block): r.score(result.metric) for r in result.runs_of("grid")}
    comp, block = result.component_scores(), result.block_scores()
    block_total = sum(max(v, 0.0) for v in block.values())
    out, how = {}, ""
    for n in names:
        b, c = arch.role_of(n)
        if (c, b) in grid:
            s, how = grid[(c, b)], "grid runs"
        elif comp and block and block_total > 0:
            # separable estimate: the component's total spread over blocks by the block profile
            s, how = comp.get(c, 0.0) * max(block.get(b, 0.0), 0.0) / block_total, "component x block profile"
        elif comp:
            s, how = comp.get(c, 0.0) / max(len(block) or result.num_layers, 1), "component runs / blocks"
        else:
            s, how = block.get(b, 0.0) / max(len(result.components), 1), "block runs / components"
        out[n] = max(s, 0.0)
    return out, how


def units_of(names: list[str], arch: ArchInfo) -> list[Unit]:
    fused = [tuple(g) for b in range(arch.num_layers) for g in arch.fused_groups(b) if all(n in names for n in g)]
    grouped = {n for g in fused for n in g}
    return fused + [(n,) for n in names if n not in grouped]


def _weights_in(model: nn.Module, arch: ArchInfo, names: list[str], fmt_name: str) -> dict[str, torch.Tensor]:
    from quantkit.analysis.sweep import fake_weights

    fused = [g for b in range(arch.num_layers) for g in arch.fused_groups(b)]
    return fake_weights(model, names, get_format(fmt_name), fused)


def error_ratios(
    model: nn.Module, arch: ArchInfo, names: list[str], base: str, formats: list[str]
) -> dict[str, dict[str, float]]:
    """name -> format -> squared weight error relative to the base format's."""
    err = {}
    for f in formats:
        if f == HIGH_PRECISION:
            err[f] = {n: 0.0 for n in names}
            continue
        fake = _weights_in(model, arch, names, f)
        err[f] = {n: float((model.get_submodule(n).weight.detach().float() - fake[n].float()).pow(2).sum()) for n in names}
    return {n: {f: err[f][n] / max(err[base][n], 1e-30) for f in formats} for n in names}


def _hull(options: list[tuple[float, float, str]]) -> list[tuple[float, float, str]]:
    """Lower convex hull of (bits, damage, format), cheapest first; dominated options dropped."""
    pts = []
    for bits, dmg, f in sorted(options):
        if pts and dmg >= pts[-1][1]:
            continue  # costs more and hurts no less
        while len(pts) >= 2:
            (b1, d1, _), (b2, d2, _) = pts[-2], pts[-1]
            # drop the middle point when it lies above the chord from pts[-2] to the new point
            if (d2 - d1) * (bits - b1) >= (dmg - d1) * (b2 - b1):
                pts.pop()
            else:
                break
        pts.append((bits, dmg, f))
    return pts


def allocate(units: list[Unit], shapes: dict[str, tuple[int, int]], damage: dict[str, dict[str, float]],
             formats: list[str], budget: float) -> dict[str, str]:
    """Minimum summed damage with average bits per weight <= budget (greedy on hull segments)."""
    total = sum(math.prod(s) for s in shapes.values())
    hulls = {}
    for u in units:
        opts = [(sum(bits_per_weight(f, *shapes[n]) * math.prod(shapes[n]) for n in u), sum(damage[n][f] for n in u), f)
                for f in formats]
        hulls[u] = _hull(opts)
    floor = sum(h[0][0] for h in hulls.values())
    if budget * total < floor - 1e-6:
        raise BudgetError(f"--budget-bits {budget} is below {floor / total:.3f}, the cheapest candidate everywhere")
    level = {u: 0 for u in units}
    spent = floor
    # segments of one hull have decreasing damage-per-bit, so a global sort keeps each unit in order
    segments = sorted(
        ((h[i][1] - h[i + 1][1]) / (h[i + 1][0] - h[i][0]), u, i) for u, h in hulls.items() for i in range(len(h) - 1)
    )
    for _, u, i in reversed(segments):
        if level[u] != i:
            continue  # an earlier segment of this unit did not fit
        cost = hulls[u][i + 1][0] - hulls[u][i][0]
        if spent + cost <= budget * total + 1e-6:
            level[u] = i + 1
            spent += cost
    return {n: hulls[u][level[u]][2] for u in units for n in u}


def average_bits(choice: dict[str, str], shapes: dict[str, tuple[int, int]]) -> float:
    total = sum(math.prod(s) for s in shapes.values())
    return sum(bits_per_weight(choice[n], *shapes[n]) * math.prod(shapes[n]) for n in shapes) / total


def recipe_yaml(choice: dict[str, str], *, act_quant: bool, name: str) -> str:
    """Runnable recipe: one `quantize` pass per quantized format, listing its modules by name."""
    # activation quantization needs the calibrated input amax (NVFP4's static global scale)
    passes: list[dict[str, Any]] = [{"pass": "calibrate"}] if act_quant else []
    for fmt in sorted({f for f in choice.values() if f != HIGH_PRECISION}):
        p: dict[str, Any] = {"pass": "quantize", "format": fmt, "mode": "real"}
        if act_quant:
            p["act_format"] = fmt
        p["targets"] = {"include": sorted(n for n, f in choice.items() if f == fmt)}
        passes.append(p)
    kept = sum(1 for f in choice.values() if f == HIGH_PRECISION)
    head = f"# generated by quantkit sensitivity --budget-bits; {kept} block linears stay bf16\n"
    return head + yaml.safe_dump({"name": name, "passes": passes}, sort_keys=False)


def measure_choice(sweep: Sweep, model: nn.Module, arch: ArchInfo, choice: dict[str, str]):
    """Run the sweep's reference comparison with each module in its chosen format."""
    swaps = {}
    for fmt_name in sorted({f for f in choice.values() if f != HIGH_PRECISION}):
        mods = [n for n, f in choice.items() if f == fmt_name]
        weights = sweep.fake if fmt_name == sweep.fmt.name else _weights_in(model, arch, mods, fmt_name)
        swaps.update({n: (weights[n], get_format(fmt_name)) for n in mods})
    return sweep.measure(swaps)


def plan_budget(result: SensitivityResult, model: nn.Module, arch: ArchInfo, names: list[str], budget: float,
                formats: list[str] | None = None) -> dict[str, Any]:
    """Guided choice plus a control that ignores the measured sensitivities (equal scores)."""
    base = result.format
    formats = list(dict.fromkeys([*(formats or CANDIDATES), base]))
    usable = []
    for f in formats:
        try:
            if f != HIGH_PRECISION:
                _weights_in(model, arch, names[:1], f)
            usable.append(f)
        except FormatError:
            continue  # e.g. a block size that does not divide this model's dimensions
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for n in names}
    scores, how = module_scores(result, names, arch)
    ratios = error_ratios(model, arch, names, base, usable)
    units = units_of(names, arch)
    guided = allocate(units, shapes, {n: {f: scores[n] * ratios[n][f] for f in usable} for n in names}, usable, budget)
    mean = sum(scores.values()) / max(len(scores), 1)
    blind = allocate(units, shapes, {n: {f: mean * ratios[n][f] for f in usable} for n in names}, usable, budget)
    return {"base": base, "formats": usable, "scores_from": how, "shapes": shapes, "guided": guided, "blind": blind}


def budget_choice(result: SensitivityResult, sweep: Sweep, model: nn.Module, arch: ArchInfo, names: list[str],
                  budget: float) -> dict[str, Any]:
    """Choose, measure (uniform vs guided vs blind) and describe a mixed-format assignment."""
    plan = plan_budget(result, model, arch, names, budget)
    rows = {}
    uniform = {n: plan["base"] for n in names}
    for label, choice in (("uniform", uniform), ("guided", plan["guided"]), ("blind", plan["blind"])):
        m = measure_choice(sweep, model, arch, choice)
        rows[label] = {"avg_bits": average_bits(choice, plan["shapes"]), "ppl": m.ppl, "kl": m.kl,
                       "counts": {f: sum(1 for v in choice.values() if v == f) for f in sorted(set(choice.values()))}}
    return {
        "budget_bits": budget, "base_format": plan["base"], "candidates": plan["formats"], "scores_from": plan["scores_from"],
        "choice": plan["guided"], "evaluated_on": "the sweep's own token windows (in-sample)", "compare": rows,
        "recipe": recipe_yaml(plan["guided"], act_quant=sweep.act_quant, name=f"{plan['base']}-mixed-{budget:g}bits"),
    }
