"""Per-matrix weight statistics: two-parameter Weibull fit of |w|, tails, outlier ratios.

The Weibull fit is the "middle-80% probability-plot" protocol (specs/algorithms.md §6): the
empirical CDF of |w| is linearised as ``ln(-ln(1-F)) = k ln|w| - k ln(lambda)`` and fitted by
least squares over the central 80% of the mass only, because both tails bend away from a
straight line for real weights (the trim is what makes a Gaussian read k = 1.205, not 1.151).
Two routes give the same k: a 1024-bin log10 histogram (the library route, O(n), what the
sensitivity report uses) and sorted samples (O(n log n), a cross-check).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

HIST_BINS = 1024  # bins of log10|w|; the reference library's resolution
HIST_LOG10_RANGE = (-12.0, 2.0)  # covers fp32 weights from 1e-12 to 100
ABS_FLOOR = 1e-13  # exact zeros land in the first bin instead of -inf
MIN_ELEMENTS = 100  # below this the CDF is too coarse to fit
MIN_FIT_POINTS = 5  # bins (or samples) left after trimming
CDF_EPS = 1e-12  # keeps ln(1 - F) finite at F = 1
TRIMS = {"mid_80": 0.10, "mid_90": 0.05, "full_range": 0.0}  # tail mass dropped on each side
K_INIT = 1.205  # mid-80 k of a half-normal, i.e. of Gaussian-initialised weights
OUTLIER_SIGMAS = 6.0  # a weight is an outlier beyond 6 standard deviations
ACT_OUTLIER_THRESHOLD = 6.0  # LLM.int8()'s activation magnitude threshold

# classifier bands (NPM-Weibull core/classify.py; k above the band is labelled separately)
TRANSMISSION_K = (1.18, 1.21)
TRANSMISSION_MIN_R2 = 0.95
MILD_SELECTION_MIN_K = 0.95
INIT_TOLERANCE = 0.01


@dataclass(frozen=True)
class WeibullFit:
    k: float
    lam: float
    r2: float
    ks: float
    n_points: int
    ok: bool

    def as_dict(self) -> dict:
        return asdict(self)


_NAN_FIT = WeibullFit(math.nan, math.nan, math.nan, math.nan, 0, False)


def _flat_abs(w: torch.Tensor) -> torch.Tensor:
    return w.detach().reshape(-1).to(torch.float32).abs()


def abs_log_histogram(w: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(counts [1024] float64, log10 edges [1025]) of |w| clamped into the histogram range."""
    lo, hi = HIST_LOG10_RANGE
    logs = torch.log10(_flat_abs(w).clamp_min(ABS_FLOOR)).clamp_(lo, hi)
    counts = torch.histc(logs, bins=HIST_BINS, min=lo, max=hi).double().numpy()
    return counts, np.linspace(lo, hi, HIST_BINS + 1)


def _weighted_line(x: np.ndarray, y: np.ndarray, wt: np.ndarray) -> tuple[float, float, float]:
    """Weighted least squares y = a x + b -> (a, b, weighted R^2)."""
    sw = wt.sum()
    mx, my = (wt * x).sum() / sw, (wt * y).sum() / sw
    sxx = (wt * (x - mx) ** 2).sum()
    if sxx <= 0:
        return math.nan, math.nan, math.nan
    a = (wt * (x - mx) * (y - my)).sum() / sxx
    b = my - a * mx
    ss_res = (wt * (y - (a * x + b)) ** 2).sum()
    ss_tot = max((wt * (y - my) ** 2).sum(), CDF_EPS)
    return float(a), float(b), float(1.0 - ss_res / ss_tot)


def _finish(k: float, b: float, r2: float, n_points: int, ks_fn) -> WeibullFit:
    if not (math.isfinite(k) and k > 0 and math.isfinite(b)):
        return _NAN_FIT
    lam = math.exp(-b / k)
    if not (math.isfinite(lam) and lam > 0):
        return _NAN_FIT
    return WeibullFit(k, lam, r2, float(ks_fn(k, lam)), n_points, True)


def weibull_fit_hist(counts: np.ndarray, edges: np.ndarray, trim: str = "mid_80") -> WeibullFit:
    """Fit from a log10|w| histogram; bin counts weight the probability-plot points."""
    margin = TRIMS[trim]
    total = counts.sum()
    if total < MIN_ELEMENTS:
        return _NAN_FIT
    cum_upper = np.cumsum(counts) / total
    f_mid = cum_upper - counts / (2 * total)  # CDF at the bin centre
    centres_ln = (edges[:-1] + edges[1:]) / 2 * math.log(10.0)
    if margin > 0:
        keep = (f_mid >= margin) & (f_mid <= 1 - margin) & (counts > 0)
    else:
        keep = (counts > 0) & (f_mid > 0) & (f_mid < 1)
    if keep.sum() < MIN_FIT_POINTS:
        return _NAN_FIT
    x = centres_ln[keep]
    y = np.log(-np.log(1 - f_mid[keep] + CDF_EPS))
    k, b, r2 = _weighted_line(x, y, counts[keep])

    def ks(k_: float, lam: float) -> float:
        fitted = 1.0 - np.exp(-((np.exp(centres_ln) / lam) ** k_))
        return float(np.abs(cum_upper - fitted).max())

    return _finish(k, b, r2, int(keep.sum()), ks)


def weibull_fit_samples(w: torch.Tensor, trim: str = "mid_80") -> WeibullFit:
    """Fit from sorted samples with plotting positions F_i = (i - 0.5) / n (unweighted)."""
    margin = TRIMS[trim]
    a = np.sort(_flat_abs(w).double().numpy())
    n = a.size
    if n < MIN_ELEMENTS:
        return _NAN_FIT
    f = (np.arange(1, n + 1) - 0.5) / n
    keep = (f >= margin) & (f <= 1 - margin) & (a > 0)
    if keep.sum() < MIN_FIT_POINTS:
        return _NAN_FIT
    x, y = np.log(a[keep]), np.log(-np.log(1 - f[keep]))
    k, b, r2 = _weighted_line(x, y, np.ones_like(x))

    def ks(k_: float, lam: float) -> float:
        fitted = 1.0 - np.exp(-((a / lam) ** k_))
        emp_hi, emp_lo = np.arange(1, n + 1) / n, np.arange(n) / n
        return float(max(np.abs(emp_hi - fitted).max(), np.abs(emp_lo - fitted).max()))

    return _finish(k, b, r2, int(keep.sum()), ks)


def weibull_fit(w: torch.Tensor, trim: str = "mid_80") -> WeibullFit:
    """The report's route: histogram of |w|."""
    return weibull_fit_hist(*abs_log_histogram(w), trim=trim)


def classify(k: float, r2: float, *, at_init: bool = False) -> str:
    """Weibull class of a matrix from its mid-80 k and R^2."""
    if not math.isfinite(k):
        return "unfit"
    if at_init and abs(k - K_INIT) < INIT_TOLERANCE:
        return "init_baseline"
    lo, hi = TRANSMISSION_K
    if lo <= k <= hi:
        # k in band but a poor fit (e.g. bimodal shallow FFN) is not a Weibull transmission matrix
        return "transmission" if r2 >= TRANSMISSION_MIN_R2 else "non_weibull"
    if k > hi:
        return "above_band"
    if k >= MILD_SELECTION_MIN_K:
        return "mild_selection"
    return "strong_selection"


def _hist_quantile(counts: np.ndarray, edges: np.ndarray, p: float) -> float:
    """|w| at CDF p, interpolated linearly in log10 inside the bin."""
    cum = np.cumsum(counts) / counts.sum()
    i = int(np.searchsorted(cum, p))
    i = min(i, len(counts) - 1)
    below = cum[i - 1] if i > 0 else 0.0
    frac = (p - below) / max(cum[i] - below, CDF_EPS)
    return float(10.0 ** (edges[i] + frac * (edges[i + 1] - edges[i])))


def _hist_gini(counts: np.ndarray, edges: np.ndarray) -> float:
    """Gini coefficient of |w| with every element at its bin centre."""
    values = 10.0 ** ((edges[:-1] + edges[1:]) / 2)
    mass = counts * values
    total_mass = mass.sum()
    if total_mass <= 0:
        return math.nan
    lorenz = np.cumsum(mass) / total_mass
    lorenz_prev = np.concatenate([[0.0], lorenz[:-1]])
    return float(1.0 - ((counts / counts.sum()) * (lorenz + lorenz_prev)).sum())


def tail_stats(counts: np.ndarray, edges: np.ndarray) -> dict[str, float]:
    """Distribution-free shape statistics, used where the Weibull fit is poor."""
    if counts.sum() < MIN_ELEMENTS:
        return {"q90_q10": math.nan, "q99_q50": math.nan, "p999_p50": math.nan, "gini": math.nan}
    q = {p: _hist_quantile(counts, edges, p) for p in (0.10, 0.50, 0.90, 0.99, 0.999)}
    return {
        "q90_q10": q[0.90] / q[0.10],
        "q99_q50": q[0.99] / q[0.50],
        "p999_p50": q[0.999] / q[0.50],
        "gini": _hist_gini(counts, edges),
    }


def moment_stats(w: torch.Tensor) -> dict[str, float]:
    """rms, excess kurtosis and frac(|w - mean| > 6 sigma), in float64 for stability."""
    x = w.detach().reshape(-1).double()
    if x.numel() < 2:
        return {"rms": math.nan, "kurtosis": math.nan, "outlier_6sigma": math.nan}
    mean = x.mean()
    centred = x - mean
    var = centred.pow(2).mean()
    std = var.sqrt()
    kurt = (centred.pow(4).mean() / var.pow(2) - 3.0).item() if var > 0 else math.nan
    outliers = (centred.abs() > OUTLIER_SIGMAS * std).double().mean().item() if var > 0 else 0.0
    return {"rms": x.pow(2).mean().sqrt().item(), "kurtosis": kurt, "outlier_6sigma": outliers}


def matrix_diagnostics(w: torch.Tensor) -> dict[str, float | str | bool]:
    """All per-matrix columns of the sensitivity report (spec §6.4)."""
    counts, edges = abs_log_histogram(w)
    fit = weibull_fit_hist(counts, edges)
    moments = moment_stats(w)
    row: dict[str, float | str | bool] = {
        "weibull_k": fit.k,
        "weibull_lambda": fit.lam,
        "weibull_r2": fit.r2,
        "weibull_ks": fit.ks,
        "weibull_ok": fit.ok,
        "weibull_class": classify(fit.k, fit.r2),
        "dk_init": fit.k - K_INIT,
    }
    row.update(tail_stats(counts, edges))
    row.update(moments)
    rms = moments["rms"]
    row["lambda_over_rms"] = fit.lam / rms if rms and math.isfinite(rms) and rms > 0 else math.nan
    return row


def activation_outlier_ratio(x: torch.Tensor, threshold: float = ACT_OUTLIER_THRESHOLD) -> float:
    """frac(|x| > threshold) over every element of a linear's input."""
    return float((x.detach().abs() > threshold).double().mean().item()) if x.numel() else math.nan


def spearman(x: list[float], y: list[float]) -> float:
    """Spearman rank correlation over pairs where both are finite; NaN below 3 pairs or constant input."""
    from scipy.stats import spearmanr

    pairs = [(a, b) for a, b in zip(x, y) if math.isfinite(a) and math.isfinite(b)]
    if len(pairs) < 3:
        return math.nan
    xs, ys = zip(*pairs)
    if len(set(xs)) < 2 or len(set(ys)) < 2:
        return math.nan
    return float(spearmanr(xs, ys).statistic)
