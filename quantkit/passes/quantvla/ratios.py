"""QuantVLA arithmetic: ratio clipping, scope selection, and exact folding of α/β into a model.

Kept apart from the passes so the library API (calibrate_atm_ohb / apply_atm_ohb) and tests can
use it without a Context. See docs/quantvla.md for the decisions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fnmatch import fnmatchcase

import torch
from torch import nn

from quantkit.passes.quantvla.attn_capture import AttnSite, find_attention_sites
from quantkit.errors import QuantkitError, UnsupportedArchitectureError
from quantkit.nn.qlinear import QLinear

RATIO_EPS = 1e-6  # added to the student statistic in teacher/student ratios (authors' code)

# sub-model names that hold a VLA's diffusion/action expert (GR00T action_head, pi0.5 gemma_expert)
DIT_PATTERNS = ("*action_head*", "*action_expert*", "*gemma_expert*", "dit.*", "*.dit.*")
# never in any scope: the paper leaves the vision tower and projector in full precision
VISION_PATTERNS = ("*vision*", "*visual*", "*multi_modal_projector*", "*image_encoder*")
SCOPES = ("dit", "llm", "all")


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatchcase(name, p) for p in patterns)


def select_sites(
    model: nn.Module,
    scope: str,
    include: Sequence[str] = (),
    exclude: Sequence[str] = (),
    dit_patterns: Sequence[str] = DIT_PATTERNS,
) -> list[AttnSite]:
    """Attention modules in scope: dit (action head), llm (everything else), all; then globs.

    ``include`` globs narrow the scope to matching attention-module names, ``exclude`` removes.
    """
    if scope not in SCOPES:
        raise QuantkitError(f"unknown QuantVLA scope {scope!r}; known: {', '.join(SCOPES)}")
    chosen = []
    for site in find_attention_sites(model):
        if _matches(site.name, VISION_PATTERNS):
            continue
        is_dit = _matches(site.name, dit_patterns)
        if (scope == "dit" and not is_dit) or (scope == "llm" and is_dit):
            continue
        if include and not _matches(site.name, include):
            continue
        if _matches(site.name, exclude):
            continue
        chosen.append(site)
    if not chosen:
        hint = " (a decoder-only LLM has no DiT: set scope: llm)" if scope == "dit" else ""
        raise QuantkitError(f"QuantVLA scope {scope!r} matched no attention modules{hint}")
    return chosen


def clip_ratio(raw: torch.Tensor, lo: float, hi: float, neutral: float, domain: str = "linear") -> torch.Tensor:
    """Clamp a teacher/student ratio to [lo, hi], then snap to exactly 1 inside the neutral band.

    domain "linear": band |r - 1| < neutral (GR00T code). domain "log": band |log r| < neutral
    (paper text; OHB code), with the clamp applied to log r.
    """
    raw = raw.double()
    if domain == "linear":
        r = raw.clamp(lo, hi)
        return torch.where((r - 1).abs() < neutral, torch.ones_like(r), r).float()
    if domain == "log":
        lr = raw.log().clamp(math.log(lo), math.log(hi))
        return torch.where(lr.abs() < neutral, torch.ones_like(lr), lr.exp()).float()
    raise QuantkitError(f"unknown clip domain {domain!r}; known: linear, log")


def raw_ratio(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """teacher / (student + eps), and 1 where the student statistic is exactly 0."""
    teacher, student = teacher.double(), student.double()
    return torch.where(student == 0, torch.ones_like(student), teacher / (student + RATIO_EPS))


# --- applying a per-output-row multiplier -------------------------------------------------


def scale_rows(module: nn.Module, scale: torch.Tensor) -> None:
    """Multiply a projection's output rows by scale [out], in place and exactly where possible.

    QLinear: into its dequant scales (set_output_scale; the codes are untouched). nn.Linear:
    weight rows and bias, computed in fp32 then stored in the weight's dtype. GPT-2 Conv1D
    stores its weight transposed [in, out].
    """
    if isinstance(module, QLinear):
        module.set_output_scale(scale)
        return
    if isinstance(module, nn.Linear):
        w = module.weight
        w.data = (w.data.float() * scale.to(w.device)[:, None]).to(w.dtype)
    elif type(module).__name__ == "Conv1D":
        w = module.weight
        w.data = (w.data.float() * scale.to(w.device)[None, :]).to(w.dtype)
    else:
        raise UnsupportedArchitectureError(f"cannot fold a scale into {type(module).__name__}")
    if module.bias is not None:
        b = module.bias
        b.data = (b.data.float() * scale.to(b.device)).to(b.dtype)


class _OutputScale:
    """Forward hook: out * scale, broadcasting a per-head [H, 1] or per-row [out] multiplier."""

    def __init__(self, scale: torch.Tensor):
        self.scale = scale

    def __call__(self, _module, _inputs, out):
        return out * self.scale.to(device=out.device, dtype=out.dtype)


def add_runtime_scale(module: nn.Module, scale: torch.Tensor) -> None:
    """Non-persistent multiply of the module's output (kept across calls, lost on save)."""
    handle = module.register_forward_hook(_OutputScale(scale))
    module.__dict__.setdefault("_quantkit_scale_hooks", []).append(handle)


def runtime_handles(model: nn.Module) -> set[int]:
    """Ids of the runtime scale hooks present now (to remove only later ones)."""
    return {h.id for m in model.modules() for h in m.__dict__.get("_quantkit_scale_hooks", [])}


def remove_runtime_scales(model: nn.Module, keep: set[int] = frozenset()) -> int:
    """Remove runtime scale hooks except those whose ids are in keep; returns how many went."""
    n = 0
    for m in model.modules():
        handles = m.__dict__.get("_quantkit_scale_hooks")
        if not handles:
            continue
        for h in [h for h in handles if h.id not in keep]:
            h.remove()
            handles.remove(h)
            n += 1
    return n


def _gain_is_linear(norm: nn.Module, width: int) -> bool:
    """True when the norm's output is weight * f(x) with a weight of `width` entries.

    Probed numerically, so Gemma-style (1 + weight) gains and shared per-head gains say no.
    """
    w = getattr(norm, "weight", None)
    if not isinstance(w, torch.Tensor) or w.numel() != width:
        return False
    gen = torch.Generator(device=w.device).manual_seed(0)  # leave the global RNG alone
    x = torch.randn(2, width, generator=gen, device=w.device).to(w.dtype)
    saved = w.data.clone()
    with torch.no_grad():
        y1 = norm(x)
        w.data.mul_(2)
        y2 = norm(x)
    w.data.copy_(saved)
    return torch.allclose(y2.float(), 2 * y1.float(), rtol=1e-2, atol=1e-6)


def apply_alpha(model: nn.Module, site: AttnSite, alpha: torch.Tensor, head_dim: int, fold: bool = True) -> str:
    """Scale head h's query by alpha[h] (logits by alpha[h]); returns where it was applied.

    Without a q-norm the query projection's rows are scaled (RoPE is linear, so before it is
    exact). A q-norm after q_proj would cancel that, so alpha goes after the norm: folded into
    its gain when the gain has one entry per q row and is linear, otherwise as a runtime
    multiply on the norm's output (per head, [.., H, d] layout).
    """
    heads = alpha.numel()
    attn = model.get_submodule(site.name)
    rows = alpha.float().repeat_interleave(head_dim)  # [H*d] one factor per q row
    if site.qnorm_path is not None:
        norm = attn.get_submodule(site.qnorm_path)
        if fold and _gain_is_linear(norm, heads * head_dim):
            norm.weight.data = (norm.weight.data.float() * rows.to(norm.weight.device)).to(norm.weight.dtype)
            return "q_norm gain"
        w = getattr(norm, "weight", None)
        per_head = isinstance(w, torch.Tensor) and w.numel() == head_dim
        add_runtime_scale(norm, alpha.float().view(heads, 1) if per_head else rows)
        return "q_norm runtime"
    proj = attn.get_submodule(site.q_path)
    out = _out_features(proj)
    if site.fused_qkv:
        rows = torch.cat([rows, torch.ones(out - rows.numel())])  # k and v rows keep 1
    elif out != rows.numel():
        raise UnsupportedArchitectureError(
            f"{site.name}.{site.q_path} has {out} rows, expected heads*head_dim = {rows.numel()}"
        )
    if fold:
        scale_rows(proj, rows)
        return "q scales" if isinstance(proj, QLinear) else "q weights"
    add_runtime_scale(proj, rows)
    return "q runtime"


def apply_beta(model: nn.Module, site: AttnSite, beta: float, fold: bool = True) -> str:
    """Scale the attention output projection (before the residual add) by beta."""
    proj = model.get_submodule(f"{site.name}.{site.o_path}")
    scale = torch.full((_out_features(proj),), float(beta))
    if fold:
        scale_rows(proj, scale)
        return "o scales" if isinstance(proj, QLinear) else "o weights"
    add_runtime_scale(proj, scale)
    return "o runtime"


def _out_features(proj: nn.Module) -> int:
    if isinstance(proj, (nn.Linear, QLinear)):
        return proj.out_features
    if type(proj).__name__ == "Conv1D":
        return proj.nf
    raise UnsupportedArchitectureError(f"cannot scale the rows of {type(proj).__name__}")
