"""Invariants of the MASA math (algorithms.md §5.3 unit tests)."""

import math

import pytest
import torch

from quantkit.passes.masa import fit as mm


def _mats(n=6, d_out=12, d_in=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d_out, d_in, generator=g, dtype=torch.float64)


def _gram(d_in=10, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(200, d_in, generator=g, dtype=torch.float64) * torch.linspace(0.1, 3, d_in, dtype=torch.float64)
    return mm.damped_gram(x.T @ x, 200)


def test_full_rank_reconstructs_exactly():
    w = _mats()
    res = mm.matrix_pca(w, n_atoms=w.shape[0])
    assert torch.allclose(mm.reconstruct(res.atoms, res.coeffs), w, atol=1e-10)


@pytest.mark.parametrize("route", ["gram", "svd"])
def test_error_equals_tail_singular_values(route):
    w = _mats()
    res = mm.matrix_pca(w, n_atoms=3, route=route)
    err = (mm.reconstruct(res.atoms, res.coeffs) - w).norm()
    tail = res.singular_values[3:].pow(2).sum().sqrt()
    assert err.item() == pytest.approx(tail.item(), rel=1e-9)


def test_gram_and_svd_routes_agree():
    w = _mats()
    a = mm.matrix_pca(w, 4, route="gram")
    b = mm.matrix_pca(w, 4, route="svd")
    assert torch.allclose(mm.reconstruct(a.atoms, a.coeffs), mm.reconstruct(b.atoms, b.coeffs), atol=1e-9)


def test_atoms_are_frobenius_orthonormal():
    res = mm.matrix_pca(_mats(), n_atoms=4)
    flat = res.atoms.reshape(4, -1)
    assert torch.allclose(flat @ flat.T, torch.eye(4, dtype=flat.dtype), atol=1e-10)


def test_identical_layers_one_atom_is_exact():
    w = _mats(n=1).expand(5, -1, -1).clone()
    res = mm.matrix_pca(w, n_atoms=1)
    assert torch.allclose(mm.reconstruct(res.atoms, res.coeffs), w, atol=1e-10)


def test_rank_deficient_stack_drops_undefined_atoms():
    w = _mats(n=1).expand(5, -1, -1).clone()
    assert mm.matrix_pca(w, n_atoms=3).atoms.shape[0] == 1


def test_centered_mean_atom_counts_toward_budget():
    w = _mats() + 5.0  # a large shared mean, which centering is meant for
    res = mm.matrix_pca(w, n_atoms=3, center=True)
    assert res.atoms.shape[0] == 3
    assert torch.allclose(res.coeffs[:, 0], res.coeffs[0, 0].expand(6))


def test_centered_full_rank_reconstructs_exactly():
    w = _mats()
    res = mm.matrix_pca(w, n_atoms=w.shape[0] + 1, center=True)
    assert torch.allclose(mm.reconstruct(res.atoms, res.coeffs), w, atol=1e-9)


def test_param_count_matches_paper_example():
    # 700M model: L = 24, d = 1536, S = 8 = L/3 over Q, K, V, O (algorithms.md §5.2)
    original = 4 * mm.dense_params(1536, 1536, 24)
    shared = 4 * mm.masa_params(1536, 1536, [24], [8])
    assert original == 226_492_416
    assert shared == 4 * (8 * 1536**2 + 24 * 8) == 75_498_240
    assert mm.reduction(original, shared) == pytest.approx(1 - 8 / 24 - 8 / 1536**2)


def test_grouped_param_count_formula():
    assert mm.masa_params(4, 3, [2, 3], [1, 2]) == (1 * 12 + 2 * 1) + (2 * 12 + 3 * 2)


def test_whitened_refinement_with_identity_is_truncated_svd():
    delta = _mats(n=1)[0]
    a, b = mm.whitened_lowrank(delta, torch.eye(10, dtype=torch.float64), rank=4)
    a2, b2 = mm.lowrank_svd(delta, 4)
    assert torch.allclose(a @ b, a2 @ b2, atol=1e-10)


def test_whitened_refinement_never_increases_objective():
    h = _gram()
    for seed in range(5):
        delta = _mats(n=1, seed=seed)[0]
        before = mm.whitened_error(delta, h)
        for rank in (1, 3, 10):
            a, b = mm.whitened_lowrank(delta, h, rank)
            assert mm.whitened_error(delta - a @ b, h) <= before + 1e-12


def test_whitened_refinement_beats_plain_svd_in_whitened_metric():
    h, delta = _gram(), _mats(n=1)[0]
    a, b = mm.whitened_lowrank(delta, h, 3)
    a2, b2 = mm.lowrank_svd(delta, 3)
    assert mm.whitened_error(delta - a @ b, h) <= mm.whitened_error(delta - a2 @ b2, h)


def test_refit_never_increases_whitened_objective():
    w, h = _mats(), _gram()
    res = mm.matrix_pca(w, n_atoms=3)
    for layer in range(w.shape[0]):
        before = mm.whitened_error(w[layer] - mm.reconstruct(res.atoms, res.coeffs[layer : layer + 1])[0], h)
        c = mm.refit_coeffs(res.atoms, w[layer], h)
        after = mm.whitened_error(w[layer] - mm.reconstruct(res.atoms, c[None])[0], h)
        assert after <= before + 1e-12


def test_refit_with_identity_keeps_pca_coefficients():
    w = _mats()
    res = mm.matrix_pca(w, n_atoms=3)
    c = mm.refit_coeffs(res.atoms, w[2], torch.eye(10, dtype=torch.float64))
    assert torch.allclose(c, res.coeffs[2], atol=1e-10)


def test_uniform_groups_are_contiguous_and_cover():
    assert mm.uniform_groups(7, 3) == [[0, 1, 2], [3, 4, 5], [6]]


def test_kl_groups_cut_at_largest_boundaries():
    scores = torch.tensor([0.1, 5.0, 0.2, 0.3, 4.0])  # cuts after layer 1 and after layer 4
    assert mm.kl_groups(scores, 3) == [[0, 1], [2, 3, 4], [5]]


def test_kl_groups_respect_min_size():
    scores = torch.tensor([0.1, 5.0, 0.2, 0.3, 4.0])
    groups = mm.kl_groups(scores, 3, min_size=2)
    assert min(len(g) for g in groups) >= 2 and sum(map(len, groups)) == 6


def test_logit_lens_kl_is_zero_for_equal_distributions():
    logp = torch.log_softmax(torch.randn(4, 9), -1)
    assert mm.logit_lens_kl(logp, logp).abs() < 1e-7


def test_allocate_ranks_respects_budget_and_floor():
    spectra = {"q": torch.tensor([10.0, 1.0, 0.5]), "o": torch.tensor([0.1, 0.05, 0.01])}
    costs = {"q": 5, "o": 4}
    ranks = mm.allocate_ranks(spectra, costs, budget=14, floors={"o": 1})
    assert ranks["o"] >= 1
    assert sum(ranks[k] * costs[k] for k in ranks) <= 14


def test_allocate_ranks_prefers_larger_relative_gain():
    spectra = {"a": torch.tensor([10.0, 0.1]), "b": torch.tensor([1.0, 1.0])}
    ranks = mm.allocate_ranks(spectra, {"a": 1, "b": 1}, budget=2)
    assert ranks == {"a": 1, "b": 1}


def test_uniform_atom_plan_fits_budget():
    shapes = {"q": (8, 8), "k": (4, 8)}
    groups = mm.uniform_groups(6, 3)
    budget = int(0.6 * (6 * 64 + 6 * 32))
    plan = mm.plan_atoms_uniform(shapes, groups, budget)
    assert mm.atoms_cost(shapes, groups, plan) <= budget
    assert len({s for s in plan.values()}) == 1  # one rho, equal groups -> equal S


def test_greedy_atom_plan_fits_budget_and_keeps_one_atom():
    shapes = {"q": (8, 8), "k": (4, 8)}
    groups = mm.uniform_groups(6, 3)
    sig = {(r, g): torch.tensor([3.0, 2.0, 1.0]) for r in shapes for g in range(2)}
    budget = 400
    plan = mm.plan_atoms_greedy(shapes, groups, sig, budget)
    assert mm.atoms_cost(shapes, groups, plan) <= budget and min(plan.values()) >= 1


def test_svd_rank_for_ratio_keeps_budget():
    k = mm.svd_rank_for_ratio(576, 576, 0.2)
    assert mm.lowrank_params(576, 576, k) <= 0.8 * 576 * 576 < mm.lowrank_params(576, 576, k + 1)
    assert k == math.floor(0.8 * 576 / 2)
