"""MASA math: Matrix PCA, layer grouping, whitened refinement, parameter counts.

Pure functions on tensors (spec: algorithms.md §5). Nothing here touches a model; the
``masa`` pass and the bench call these. Matrix PCA always runs in float64 (the Gram route
squares the singular values, and it is cheap: an n x n eigenproblem). The per-layer
refinement (Cholesky, SVD, refit) runs in float64 when given float64 and in float32
otherwise: ~120 SVDs of 576 x 576 per model are several times faster in float32 on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

# the Gram route (eig of the n x n Gram matrix) is used once a vectorised matrix is this many
# times longer than the number of matrices; below that a direct thin SVD is as cheap
GRAM_ROUTE_MIN_ASPECT = 8
# singular values below this fraction of the largest are treated as zero (rank deficiency,
# e.g. identical layers): their atoms are undefined and are not kept. The Gram route resolves
# sigma only to about sqrt(float64 eps) * sigma_max ~ 1e-8, hence the margin.
RANK_RTOL = 1e-6
# Cholesky damping of the input Gram, as a fraction of its mean diagonal (spec §5.3 Step C)
DEFAULT_DAMP = 1e-2


def _work(t: torch.Tensor) -> torch.Tensor:
    """float64 stays float64; anything else computes in float32."""
    return t.detach().to(torch.float64 if t.dtype == torch.float64 else torch.float32)


@dataclass
class PCAResult:
    atoms: torch.Tensor  # [S, d_out, d_in], Frobenius-orthonormal (a centered mean atom first)
    coeffs: torch.Tensor  # [n, S]; W_l ~ sum_s coeffs[l, s] * atoms[s]
    singular_values: torch.Tensor  # [n] of the (centered) stacked matrix, descending


def matrix_pca(mats: torch.Tensor, n_atoms: int, *, center: bool = False, route: str = "auto") -> PCAResult:
    """Best n_atoms-term shared basis for the matrices mats [n, d_out, d_in] (Eckart-Young).

    center=True stores the mean matrix (normalised) as atom 0 and spends the other
    n_atoms - 1 on the centered residual; each layer's coefficient on it is ||mean||_F.
    Atoms whose singular value is numerically zero are dropped, so S can be < n_atoms.
    """
    n, d_out, d_in = mats.shape
    if n_atoms < 1:
        raise ValueError(f"n_atoms must be >= 1, got {n_atoms}")
    m = mats.reshape(n, d_out * d_in).to(torch.float64).T  # [d_out*d_in, n], one column per layer
    mean = None
    if center:
        mean = m.mean(dim=1, keepdim=True)  # [d, 1]
        m = m - mean
        n_atoms -= 1
    u, sigma, vt = _thin_svd(m, route)  # u [d, k], sigma [k], vt [k, n]
    keep = min(n_atoms, int((sigma > RANK_RTOL * sigma.max().clamp_min(1e-300)).sum()))
    atoms = u[:, :keep].T  # [S, d]
    coeffs = vt[:keep].T * sigma[:keep]  # [n, S] = V[:, :S] Sigma[:S]
    if mean is not None:
        norm = mean.norm()
        if norm > 0:
            atoms = torch.cat([(mean / norm).T, atoms])
            coeffs = torch.cat([norm.expand(n, 1), coeffs], dim=1)
    full = torch.zeros(n, dtype=torch.float64)
    full[: sigma.numel()] = sigma
    return PCAResult(atoms.reshape(-1, d_out, d_in), coeffs, full)


def _thin_svd(m: torch.Tensor, route: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    d, n = m.shape
    if route == "auto":
        route = "gram" if d >= GRAM_ROUTE_MIN_ASPECT * n else "svd"
    if route == "svd":
        return torch.linalg.svd(m, full_matrices=False)
    if route != "gram":
        raise ValueError(f"unknown route {route!r}; known: auto, gram, svd")
    gram = m.T @ m  # [n, n], K_ij = <W_i, W_j>_F
    evals, evecs = torch.linalg.eigh(gram)  # ascending
    evals, evecs = evals.flip(0), evecs.flip(1)
    sigma = evals.clamp_min(0).sqrt()
    # U = M V Sigma^-1; columns with sigma ~ 0 are garbage and get dropped by the caller
    u = (m @ evecs) / sigma.clamp_min(torch.finfo(sigma.dtype).tiny)
    return u, sigma, evecs.T


def reconstruct(atoms: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """W_l = sum_s coeffs[l, s] atoms[s]: [n, S] x [S, d_out, d_in] -> [n, d_out, d_in]."""
    return torch.einsum("ls,sij->lij", coeffs.to(atoms.dtype), atoms)


# ----------------------------------------------------------------------------- grouping


def uniform_groups(n_layers: int, group_size: int) -> list[list[int]]:
    """Contiguous groups of group_size layers (the last one may be shorter)."""
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1, got {group_size}")
    return [list(range(i, min(i + group_size, n_layers))) for i in range(0, n_layers, group_size)]


def kl_groups(boundary: torch.Tensor, n_groups: int, min_size: int = 1) -> list[list[int]]:
    """Cut L layers into n_groups contiguous groups at the largest boundary scores.

    boundary [L-1]: boundary[l] scores the change between layer l and l+1 (a cut after l).
    Cuts are taken largest first, skipping any that would leave a group under min_size.
    """
    n_layers = boundary.numel() + 1
    if not 1 <= n_groups <= n_layers:
        raise ValueError(f"n_groups must be in [1, {n_layers}], got {n_groups}")
    cuts: list[int] = []
    for b in torch.argsort(boundary, descending=True).tolist():
        if len(cuts) == n_groups - 1:
            break
        edges = sorted([-1, *cuts, b, n_layers - 1])
        if min(hi - lo for lo, hi in zip(edges, edges[1:])) >= min_size:
            cuts.append(b)
    edges = sorted([-1, *cuts, n_layers - 1])
    return [list(range(lo + 1, hi + 1)) for lo, hi in zip(edges, edges[1:])]


def logit_lens_kl(logp_next: torch.Tensor, logp_prev: torch.Tensor) -> torch.Tensor:
    """mean over tokens of KL(p_next || p_prev) from log-probabilities [T, V]."""
    return (logp_next.exp() * (logp_next - logp_prev)).sum(-1).mean()


# ----------------------------------------------------------------------------- refinement


def damped_gram(xtx: torch.Tensor, n_tokens: int, damp: float = DEFAULT_DAMP) -> torch.Tensor:
    """H = X^T X / N + lambda I with lambda = damp * mean(diag(X^T X / N))."""
    h = xtx.to(torch.float64) / max(n_tokens, 1)
    lam = damp * h.diagonal().mean().clamp_min(1e-12)
    return h + lam * torch.eye(h.shape[0], dtype=h.dtype)


def whitened_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """tr(dW H dW^T): the mean squared output error of dW on inputs with Gram H."""
    d = delta.detach().to(torch.float64)
    return torch.einsum("ij,jk,ik->", d, h.to(torch.float64), d)


def whitened_svd(delta: torch.Tensor, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SVD of dW R with H = R R^T (Cholesky): returns U, S, Vt, R."""
    d = _work(delta)
    r = torch.linalg.cholesky(h.to(d.dtype))  # lower triangular [d_in, d_in]
    u, s, vt = torch.linalg.svd(d @ r, full_matrices=False)
    return u, s, vt, r


def whitened_lowrank(delta: torch.Tensor, h: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A [d_out, r], B [r, d_in] minimising tr((dW - AB) H (dW - AB)^T) (truncation-aware whitening)."""
    u, s, vt, r = whitened_svd(delta, h)
    return lowrank_from_whitened(u, s, vt, r, rank)


def lowrank_from_whitened(u, s, vt, r, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    a = u[:, :rank] * s[:rank]  # [d_out, r] = U_r Sigma_r
    # B = V_r^T R^-1, i.e. solve R^T B^T = V_r (R lower, so R^T is upper)
    b = torch.linalg.solve_triangular(r.T, vt[:rank].T, upper=True).T  # [r, d_in]
    return a, b


def lowrank_svd(w: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain truncated SVD W ~ A B (the per-layer baseline)."""
    u, s, vt = torch.linalg.svd(_work(w), full_matrices=False)
    return u[:, :rank] * s[:rank], vt[:rank]


def refit_coeffs(atoms: torch.Tensor, w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Coefficients c [S] minimising tr((W - sum c_s D_s) H (...)^T) with the atoms fixed.

    Solves G c = b with G[s,t] = tr(D_s H D_t^T), b[s] = tr(D_s H W^T).
    """
    d = _work(atoms)
    dh = d @ h.to(d.dtype)  # [S, d_out, d_in]
    # the S x S solve is tiny; do it in float64 whatever the matmuls ran in
    g = torch.einsum("sij,tij->st", dh, d).double()
    b = torch.einsum("sij,ij->s", dh, w.to(d.dtype)).double()
    # G is PSD; a tiny ridge keeps it solvable when atoms are nearly dependent in the H metric
    ridge = 1e-12 * g.diagonal().mean().clamp_min(1e-300)
    return torch.linalg.solve(g + ridge * torch.eye(g.shape[0], dtype=g.dtype), b)


def allocate_ranks(
    spectra: dict, costs: dict, budget: int, floors: dict | None = None, energy: dict | None = None
) -> dict:
    """Greedy rank allocation: rank-1 steps taken by (relative error reduction) / parameters.

    spectra[key]: whitened singular values (descending) of that matrix's residual; costs[key]:
    parameters per unit of rank (d_out + d_in); energy[key]: the normaliser that makes gains
    comparable across matrices (default: the residual's own energy). floors[key]: minimum
    rank granted first. Returns key -> rank; total cost never exceeds budget.
    """
    floors = floors or {}
    ranks = {k: 0 for k in spectra}
    spent = 0
    for k, f in floors.items():
        f = min(f, spectra[k].numel())
        if spent + f * costs[k] <= budget:
            ranks[k] = f
            spent += f * costs[k]
    items = []
    for k, s in spectra.items():
        norm = float(energy[k]) if energy else float((s.double() ** 2).sum())
        if norm <= 0:
            continue
        for i in range(ranks[k], s.numel()):
            items.append((float(s[i]) ** 2 / norm / costs[k], k, i))
    items.sort(key=lambda t: -t[0])
    for _, k, i in items:
        # gains are descending per key, so a key's next rank is always its current rank
        if i != ranks[k] or spent + costs[k] > budget:
            continue
        ranks[k] += 1
        spent += costs[k]
    return ranks


# ----------------------------------------------------------------------------- parameter counts


def masa_params(d_out: int, d_in: int, group_sizes: list[int], atoms: list[int]) -> int:
    """sum_g (S_g d_out d_in + L_g S_g): shared atoms plus per-layer coefficients."""
    return sum(s * d_out * d_in + g * s for g, s in zip(group_sizes, atoms))


def dense_params(d_out: int, d_in: int, n_layers: int) -> int:
    return n_layers * d_out * d_in


def lowrank_params(d_out: int, d_in: int, rank: int) -> int:
    return rank * (d_out + d_in)


def reduction(original: int, compressed: int) -> float:
    return 1.0 - compressed / original


def svd_rank_for_ratio(d_out: int, d_in: int, ratio: float) -> int:
    """Largest per-layer rank whose A, B keep at most (1 - ratio) of d_out * d_in."""
    return max(0, math.floor((1.0 - ratio) * d_out * d_in / (d_out + d_in)))


# ----------------------------------------------------------------------------- atom budgets


def atoms_cost(shapes: dict, groups: list[list[int]], atoms: dict) -> int:
    """Parameters of atoms[(role, g)] over all roles (shapes[role] = (d_out, d_in)) and groups."""
    return sum(
        masa_params(*shapes[role], [len(groups[g])], [s]) for (role, g), s in atoms.items()
    )


def plan_atoms_uniform(shapes: dict, groups: list[list[int]], budget: int) -> dict:
    """S_G = round(rho * |G|) for every role and group, with the largest rho that fits budget.

    At least one atom per (role, group): a group with none would have no weights at all.
    """
    def plan(rho: float) -> dict:
        return {(r, g): max(1, math.floor(rho * len(groups[g]) + 0.5)) for r in shapes for g in range(len(groups))}

    lo, hi = 0.0, 1.0
    if atoms_cost(shapes, groups, plan(hi)) <= budget:
        return plan(hi)
    for _ in range(60):  # bisection on a step function of rho; 60 halvings pin every step
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if atoms_cost(shapes, groups, plan(mid)) <= budget else (lo, mid)
    return plan(lo)


def plan_atoms_greedy(shapes: dict, groups: list[list[int]], sigmas: dict, budget: int) -> dict:
    """Atoms taken across roles and groups by (share of the role's energy) / parameters.

    sigmas[(role, g)]: singular values of the group's stacked matrices (descending). Every
    (role, group) keeps at least one atom.
    """
    energy = {r: sum(float((s.double() ** 2).sum()) for (rr, _), s in sigmas.items() if rr == r) for r in shapes}
    atoms = {key: 1 for key in sigmas}
    spent = atoms_cost(shapes, groups, atoms)
    items = []
    for (role, g), s in sigmas.items():
        d_out, d_in = shapes[role]
        cost = d_out * d_in + len(groups[g])
        for i in range(1, min(s.numel(), len(groups[g]))):
            items.append((float(s[i]) ** 2 / max(energy[role], 1e-300) / cost, (role, g), i, cost))
    items.sort(key=lambda t: -t[0])
    for _, key, i, cost in items:
        if i != atoms[key] or spent + cost > budget:
            continue
        atoms[key] += 1
        spent += cost
    return atoms
