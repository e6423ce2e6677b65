"""Pass ``masa``: share attention weights across layers through per-role atom dictionaries.

Training-free MASA (algorithms.md §5.3): per projection role and layer group, Matrix PCA
gives S shared atoms and per-layer coefficients; optionally each layer's coefficients are
refit and its residual gets a whitened low-rank correction, both in the metric of its own
calibration inputs. The budget is a reduction ratio of all attention parameters (q, k, v, o),
residual ranks included; roles not shared count as kept.
"""

from __future__ import annotations

from typing import ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import nn

from quantkit.passes.masa import fit as mm
from quantkit.errors import RecipeError, UnsupportedArchitectureError
from quantkit.export import masa_layout  # noqa: F401  registers the masa module types the writer needs
from quantkit.nn.dict_linear import AtomBank, DictLinear, banks
from quantkit.passes.base import Pass, register_pass
from quantkit.targets import set_module
from quantkit.passes.masa.stats import LensState, block_grams, finish_block_grams, grams_by_role

SHAREABLE_ROLES = ("q", "k", "v", "o")


@register_pass
class Masa(Pass):
    name: ClassVar[str] = "masa"
    summary: ClassVar[str] = "share q/k/v/o weights across layers via Matrix-PCA atom dictionaries"
    provides: ClassVar[frozenset[str]] = frozenset({"masa"})
    output_layout: ClassVar[str | None] = "quantkit"
    # every block's statistics are needed before any block changes: the block loop runs a first
    # sweep (observe_block) and fit() before the sweep that applies (run_block)
    execution: ClassVar[str] = "block"

    roles: list[Literal["q", "k", "v", "o"]] = ["q", "k", "v", "o"]
    # reduction of all attention parameters (0.2 = 20% fewer); None when `atoms` sets the budget
    ratio: float | None = Field(0.2, gt=0.0, lt=1.0)
    atoms: int | None = Field(None, ge=1)  # atoms per (role, group), instead of or with ratio
    grouping: Literal["uniform", "kl"] = "uniform"
    group_size: int | None = Field(None, ge=1)  # uniform: layers per group; None = one group
    n_groups: int = Field(1, ge=1)  # kl: number of groups
    min_group_size: int = Field(1, ge=1)  # kl: no group smaller than this
    allocation: Literal["uniform", "greedy"] = "uniform"  # S_G = round(rho |G|), or by energy
    center: bool = False  # store the mean matrix as an extra atom (counts toward S)
    refit: bool = False  # re-solve coefficients by whitened least squares
    residual_share: float = Field(0.0, ge=0.0, lt=1.0)  # kept budget given to whitened residuals
    rank_floor: dict[str, int] = {}  # minimum residual rank per role, e.g. {"o": 8}
    damp: float = Field(mm.DEFAULT_DAMP, gt=0.0)
    kl_max_tokens: int = Field(2048, ge=16)  # tokens used for the logit-lens KL boundaries
    materialize: bool = True  # DictLinear builds W_l once instead of mixing per forward

    @model_validator(mode="after")
    def _check_budget(self):
        if self.ratio is None and self.atoms is None:
            raise ValueError("masa needs a budget: set ratio or atoms")
        if self.residual_share and self.ratio is None:
            raise ValueError("residual_share needs ratio (the residual budget is what atoms leave of it)")
        if set(self.rank_floor) - set(SHAREABLE_ROLES):
            raise ValueError(f"rank_floor keys must be among {SHAREABLE_ROLES}")
        return self

    @property
    def uses_grams(self) -> bool:
        """Whether the fit reads calibration input Grams (refit or whitened residuals)."""
        return self.refit or self.residual_share > 0

    def requirements(self) -> frozenset[str]:
        return frozenset({"calib"}) if self.observe_needs_inputs(None) else frozenset()

    # ------------------------------------------------------------------ the two sweeps
    # Sweep 1 (observe_block, per block): hold the shared projections' weights, accumulate the
    # input Grams and logit-lens scores from the block's calibration inputs. fit(): the
    # dictionaries, from what sweep 1 held. Sweep 2 (run_block, per block): replace the block's
    # projections by DictLinears. The block loop (quantkit/stream/loop.py) runs both sweeps, in
    # whole-model and streaming execution alike, so both write the same bytes.

    def begin(self, ctx) -> None:
        arch = ctx.arch
        missing = [r for r in SHAREABLE_ROLES if r not in arch.roles]
        if missing:
            raise UnsupportedArchitectureError(
                f"masa needs separate q/k/v/o projections; {arch.model_type} lacks {', '.join(missing)}"
            )
        ctx.scratch[self.name] = {
            "weights": {r: [] for r in self.roles},  # role -> per layer [d_out, d_in], the model's dtype, CPU
            "shapes": {}, "dtype": {}, "device": {},
            "sums": {}, "counts": {}, "grams": {},  # input X^T X, then damped Grams, per (layer, "qkv" | "o")
            "lens": LensState(arch.num_layers, self.kl_max_tokens) if self.grouping == "kl" else None,
        }

    def observe_needs_inputs(self, ctx) -> bool:
        return self.uses_grams or self.grouping == "kl"

    def observe_block(self, blk, ctx) -> None:
        """Sweep 1: what the fit needs from this block. Sets blk.extra["outputs"] when it ran the block."""
        st, arch, layer = ctx.scratch[self.name], ctx.arch, blk.index
        for r in SHAREABLE_ROLES:
            lin = blk.model.get_submodule(arch.module_name(layer, r))
            if r in self.roles and not isinstance(lin, nn.Linear):
                raise RecipeError(f"masa: {arch.module_name(layer, r)} is {type(lin).__name__}, not a plain Linear")
            if layer == 0:
                st["shapes"][r] = tuple(lin.weight.shape)
                st["dtype"][r], st["device"][r] = lin.weight.dtype, lin.weight.device
            if r in self.roles:
                # a reference, not a copy: the block's release (or the DictLinear replacing the
                # Linear) drops the module's hold, so this is the only copy of the weight
                st["weights"][r].append(lin.weight.detach().cpu())
        if not self.observe_needs_inputs(ctx):
            return
        if self.uses_grams:
            outputs = block_grams(blk, arch, self.roles, st["sums"], st["counts"])
            finish_block_grams(st["sums"], st["counts"], layer, self.damp, st["grams"])
        else:
            outputs = blk.forward()
        if st["lens"] is not None:
            st["lens"].add_block(blk.model, layer, outputs)
        blk.extra["outputs"] = outputs  # the loop propagates these instead of running the block again

    def fit(self, ctx) -> None:
        """Between the sweeps: dictionaries, coefficients and residuals from sweep 1's statistics."""
        st, arch = ctx.scratch[self.name], ctx.arch
        n_layers = arch.num_layers
        shapes = st["shapes"]
        total = sum(mm.dense_params(*shapes[r], n_layers) for r in SHAREABLE_ROLES)
        unshared = sum(mm.dense_params(*shapes[r], n_layers) for r in SHAREABLE_ROLES if r not in self.roles)

        groups = self._groups(ctx, n_layers)
        # float32 on the CPU: PCA upcasts internally; the refinement runs in float32 (masa_math)
        weights = {}
        for r in self.roles:
            weights[r] = torch.stack([w.float() for w in st["weights"][r]])  # [L, d_out, d_in]
            st["weights"][r] = None  # the model-dtype copies are no longer needed
        full = {
            (r, g): mm.matrix_pca(weights[r][idx], len(idx) + self.center, center=self.center)
            for r in self.roles for g, idx in enumerate(groups)
        }
        role_shapes = {r: shapes[r] for r in self.roles}
        kept = None if self.ratio is None else int((1 - self.ratio) * total) - unshared
        if kept is not None and kept <= 0:
            raise RecipeError(f"masa: ratio {self.ratio} leaves no budget for the shared roles {self.roles}")
        plan = self._plan_atoms(role_shapes, groups, full, kept)
        atoms_cost = mm.atoms_cost(role_shapes, groups, plan)
        if kept is not None and atoms_cost > kept:
            raise RecipeError(
                f"masa: {self.atoms} atoms per group cost {atoms_cost} parameters, over the budget {kept} "
                f"of ratio {self.ratio}; lower atoms or ratio"
            )

        # per (layer, role): atoms (shared tensor), coefficients, residual factors
        fits: dict[tuple[int, str], dict] = {}
        grams = grams_by_role(st["grams"], n_layers, self.roles) if self.uses_grams else {}
        st["grams"] = None
        bank_atoms: dict[tuple[str, int], torch.Tensor] = {}
        for (r, g), res in full.items():
            s = plan[r, g]
            atoms = res.atoms[:s].float()
            bank_atoms[r, g] = atoms
            for i, l in enumerate(groups[g]):
                c = res.coeffs[i, :s].float()
                if self.refit:
                    c = mm.refit_coeffs(atoms, weights[r][l], grams[l, r]).float()
                fits[l, r] = {"group": g, "coeffs": c, "delta": weights[r][l] - mm.reconstruct(atoms, c[None])[0]}
        del full

        ranks = {}
        if self.residual_share > 0:
            ranks = self._residuals(fits, grams, weights, role_shapes, kept - atoms_cost)
        errors = self._errors(fits, grams, weights)
        for fit in fits.values():  # sweep 2 needs only coefficients and residual factors
            del fit["delta"]
        del weights, grams
        st["banks"] = self._make_banks(ctx.model, bank_atoms, st)
        st["fits"], st["ranks"] = fits, ranks
        st["summary"] = dict(total=total, unshared=unshared, groups=groups, plan=plan, errors=errors)

    def run_block(self, blk, ctx) -> None:
        """Sweep 2: this block's q/k/v/o become DictLinears over the shared atom banks."""
        st, arch = ctx.scratch[self.name], ctx.arch
        for r in self.roles:
            fit = st["fits"][blk.index, r]
            name = arch.module_name(blk.index, r)
            lin = blk.model.get_submodule(name)
            key, bank = st["banks"][r, fit["group"]]
            a, b = fit.get("residual", (None, None))
            wd = dict(device=lin.weight.device, dtype=lin.weight.dtype)
            module = DictLinear(
                bank,
                f"masa_banks.{key}",
                fit["coeffs"].to(lin.weight.device),
                lin.bias,
                None if a is None else a.to(**wd),
                None if b is None else b.to(**wd),
                materialize=self.materialize,
            )
            set_module(blk.model, name, module)

    def finish(self, ctx) -> None:
        st = ctx.scratch[self.name]
        self._report(ctx, st)
        st.clear()  # the per-layer fits and factors; the banks stay on the model

    # ------------------------------------------------------------------ steps

    def _groups(self, ctx, n_layers: int) -> list[list[int]]:
        if self.grouping == "uniform":
            return mm.uniform_groups(n_layers, self.group_size or n_layers)
        scores = ctx.scratch[self.name]["lens"].scores()
        ctx.record(self.name, kl_boundaries=[round(float(s), 5) for s in scores])
        return mm.kl_groups(scores, min(self.n_groups, n_layers), self.min_group_size)

    def _plan_atoms(self, shapes, groups, full, kept) -> dict:
        if self.atoms is not None:
            return {key: min(self.atoms, res.atoms.shape[0]) for key, res in full.items()}
        atom_budget = int((1 - self.residual_share) * kept)
        if self.allocation == "greedy":
            sig = {key: res.singular_values for key, res in full.items()}
            plan = mm.plan_atoms_greedy(shapes, groups, sig, atom_budget)
        else:
            plan = mm.plan_atoms_uniform(shapes, groups, atom_budget)
        if mm.atoms_cost(shapes, groups, plan) > kept:
            raise RecipeError(f"masa: ratio {self.ratio} is too high for one atom per role and group")
        # rank deficiency (e.g. identical layers) can leave fewer atoms than planned
        return {key: min(s, full[key].atoms.shape[0]) for key, s in plan.items()}

    def _residuals(self, fits, grams, weights, shapes, budget: int) -> dict:
        svds, spectra, costs, energy = {}, {}, {}, {}
        for key, fit in fits.items():
            u, s, vt, r = mm.whitened_svd(fit["delta"], grams[key])
            svds[key], spectra[key] = (u, s, vt, r), s
            costs[key] = sum(shapes[key[1]])
            # gains are shares of the layer's own whitened output energy, comparable across layers
            energy[key] = float(mm.whitened_error(weights[key[1]][key[0]], grams[key]))
        floors = {key: self.rank_floor.get(key[1], 0) for key in fits}
        ranks = mm.allocate_ranks(spectra, costs, max(budget, 0), floors, energy)
        for key, rank in ranks.items():
            if rank:
                fits[key]["residual"] = mm.lowrank_from_whitened(*svds[key], rank)
        return ranks

    def _make_banks(self, model, bank_atoms, st) -> dict:
        container = banks(model)
        out = {}
        for (r, g), atoms in bank_atoms.items():
            key = f"{r}_{g}"
            if key in container:
                raise RecipeError(f"masa: model already has an atom bank {key!r}; run masa once per model")
            container[key] = AtomBank(atoms.to(st["device"][r], st["dtype"][r]))
            out[r, g] = (key, container[key])
        return out

    def _errors(self, fits, grams, weights) -> dict:
        """Mean relative Frobenius (and whitened) error of the fitted layers, residuals included."""
        rel_err, w_err = [], []
        for (l, r), fit in fits.items():
            delta = fit["delta"]
            if "residual" in fit:
                a, b = fit["residual"]
                delta = delta - a @ b
            rel_err.append(float(delta.norm() / weights[r][l].norm()))
            if grams:
                w_err.append(float(mm.whitened_error(delta, grams[l, r]) / mm.whitened_error(weights[r][l], grams[l, r])))
        out = {"mean_rel_frobenius_error": round(sum(rel_err) / len(rel_err), 5)}
        if w_err:
            out["mean_rel_whitened_error"] = round(sum(w_err) / len(w_err), 5)
        return out

    def _report(self, ctx, st) -> None:
        sm, fits, ranks = st["summary"], st["fits"], st["ranks"]
        shapes = st["shapes"]
        # what the checkpoint stores: unshared roles dense, each atom once, per layer S coefficients
        # plus residual factors (counted from the fits: in streaming the layers are released by now)
        stored = sm["unshared"] + sum(bank.atoms.numel() for _, bank in st["banks"].values())
        stored += sum(f["coeffs"].numel() + ranks.get(key, 0) * sum(shapes[key[1]]) for key, f in fits.items())
        ctx.record(
            self.name,
            groups=sm["groups"],
            atoms={f"{r}_{g}": s for (r, g), s in sm["plan"].items()},
            residual_rank_total={r: sum(k for (_, rr), k in ranks.items() if rr == r) for r in self.roles},
            attention_params=sm["total"],
            stored_params=stored,
            reduction=round(mm.reduction(sm["total"], stored), 5),
            **sm["errors"],
        )
        ctx.quantized.update(
            {ctx.arch.module_name(l, r): {"method": "masa", "atoms": sm["plan"][r, f["group"]], "rank": ranks.get((l, r), 0)}
             for (l, r), f in fits.items()}
        )
