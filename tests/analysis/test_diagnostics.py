import math

import numpy as np
import pytest
import torch

from quantkit.analysis import diagnostics as D

N_ANCHOR = 4_000_000  # the spec's anchor size; the histogram route fits it in under a second
SIGMA = 0.02


@pytest.fixture(scope="module")
def gaussian() -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randn(N_ANCHOR, generator=g, dtype=torch.float64) * SIGMA


def test_gaussian_k_matches_half_normal_anchor(gaussian):
    fit = D.weibull_fit(gaussian)
    assert abs(fit.k - D.K_INIT) < 0.005


def test_gaussian_lambda_is_0887_sigma(gaussian):
    assert abs(D.weibull_fit(gaussian).lam / SIGMA - 0.887) < 0.005


def test_gaussian_fit_is_straight(gaussian):
    assert D.weibull_fit(gaussian).r2 > 0.99


def test_laplace_k_is_one():
    g = torch.Generator().manual_seed(2)
    u = torch.rand(N_ANCHOR // 4, generator=g, dtype=torch.float64)
    laplace = torch.where(u < 0.5, 1.0, -1.0) * -torch.log(torch.rand(u.shape, generator=g, dtype=torch.float64))
    assert abs(D.weibull_fit(laplace).k - 1.0) < 0.01


def test_trim_matters_full_range_reads_lower(gaussian):
    assert D.weibull_fit(gaussian, "full_range").k < D.weibull_fit(gaussian, "mid_80").k - 0.03


def test_scale_equivariance_sample_route_is_exact(gaussian):
    w = gaussian[:200_000]
    base, scaled = D.weibull_fit_samples(w), D.weibull_fit_samples(w * 7.3)
    assert scaled.k == pytest.approx(base.k, rel=1e-9)
    assert scaled.lam == pytest.approx(base.lam * 7.3, rel=1e-9)


def test_scale_equivariance_histogram_route(gaussian):
    base, scaled = D.weibull_fit(gaussian), D.weibull_fit(gaussian * 37.0)
    assert abs(scaled.k - base.k) < 0.005
    assert scaled.lam / (base.lam * 37.0) == pytest.approx(1.0, abs=0.005)


def test_fewer_than_100_elements_is_nan_not_ok():
    for fit in (D.weibull_fit(torch.randn(99)), D.weibull_fit_samples(torch.randn(99))):
        assert not fit.ok and math.isnan(fit.k) and math.isnan(fit.lam)


def test_histogram_and_sample_routes_agree(gaussian):
    assert abs(D.weibull_fit(gaussian).k - D.weibull_fit_samples(gaussian).k) < 0.005


def test_histogram_counts_every_element_including_zeros():
    w = torch.cat([torch.zeros(10), torch.randn(1000)])
    counts, edges = D.abs_log_histogram(w)
    assert counts.sum() == 1010 and len(edges) == D.HIST_BINS + 1


@pytest.mark.parametrize(
    "k,r2,expected",
    [
        (1.18, 0.99, "transmission"),
        (1.21, 0.99, "transmission"),
        (1.19, 0.90, "non_weibull"),
        (1.2101, 0.99, "above_band"),
        (1.1799, 0.99, "mild_selection"),
        (0.95, 0.99, "mild_selection"),
        (0.9499, 0.99, "strong_selection"),
        (math.nan, math.nan, "unfit"),
    ],
)
def test_classifier_boundaries(k, r2, expected):
    assert D.classify(k, r2) == expected


def test_classifier_init_baseline_only_at_step_zero():
    assert D.classify(1.20, 0.99, at_init=True) == "init_baseline"
    assert D.classify(1.20, 0.99) == "transmission"


def test_tail_ratio_q90_q10_matches_closed_form(gaussian):
    # Q90/Q10 = 21.854 ** (1/k) for a Weibull; the half-normal is close to one in the body
    stats = D.tail_stats(*D.abs_log_histogram(gaussian))
    closed = 21.854 ** (1 / D.weibull_fit(gaussian).k)
    assert stats["q90_q10"] == pytest.approx(closed, rel=0.03)


def test_gini_of_constant_magnitude_is_zero():
    w = torch.full((4096,), 0.5) * torch.where(torch.rand(4096) < 0.5, 1.0, -1.0)
    assert D.tail_stats(*D.abs_log_histogram(w))["gini"] == pytest.approx(0.0, abs=1e-9)


def test_outlier_ratio_counts_beyond_six_sigma():
    w = torch.zeros(10_000, dtype=torch.float64)
    w[:2] = 1000.0  # two huge entries are far beyond 6 sigma of the whole tensor
    assert D.moment_stats(w)["outlier_6sigma"] == pytest.approx(2 / 10_000)


def test_gaussian_excess_kurtosis_is_zero(gaussian):
    assert abs(D.moment_stats(gaussian)["kurtosis"]) < 0.02


def test_matrix_diagnostics_has_report_columns():
    row = D.matrix_diagnostics(torch.randn(64, 128))
    for col in ("weibull_k", "weibull_lambda", "weibull_r2", "weibull_ks", "weibull_class", "dk_init",
                "q90_q10", "p999_p50", "gini", "rms", "lambda_over_rms", "kurtosis", "outlier_6sigma"):
        assert col in row


def test_activation_outlier_ratio():
    x = torch.tensor([0.0, 5.9, -6.1, 7.0])
    assert D.activation_outlier_ratio(x) == 0.5


def test_spearman_is_rank_based_and_skips_nan():
    assert D.spearman([1, 2, 3, math.nan], [10, 200, 3000, 1]) == pytest.approx(1.0)
    assert math.isnan(D.spearman([1, 2], [2, 1]))
    assert D.spearman(list(np.arange(5.0)), list(-np.arange(5.0) ** 3)) == pytest.approx(-1.0)
