"""DictLinear: a linear layer whose weight is a mix of shared atoms (MASA).

    W_l = sum_s coeffs[s] * atoms[s] + residual_a @ residual_b      (+ bias)

The atoms live once in an ``AtomBank`` that the model owns (``model.masa_banks.<key>``); every
DictLinear of the group holds a plain reference to it, not a child module, so the state_dict
(and the checkpoint) stores each atom once. Default forward materialises W_l once and caches
it (memory is saved on disk and in transfer, not in FLOPs); ``materialize=False`` instead
computes x D_s^T for every atom and mixes, S times the FLOPs of a dense layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

BANKS_ATTR = "masa_banks"  # the ModuleDict on the top-level model that owns every AtomBank


class AtomBank(nn.Module):
    """S shared atoms [S, d_out, d_in] of one (projection role, layer group)."""

    def __init__(self, atoms: torch.Tensor):
        super().__init__()
        self.register_buffer("atoms", atoms)

    @classmethod
    def empty(cls, n_atoms: int, out_features: int, in_features: int, dtype=torch.float32) -> AtomBank:
        return cls(torch.empty(n_atoms, out_features, in_features, dtype=dtype))

    @property
    def n_atoms(self) -> int:
        return self.atoms.shape[0]

    def extra_repr(self) -> str:
        s, o, i = self.atoms.shape
        return f"atoms={s}, out={o}, in={i}"


def banks(model: nn.Module) -> nn.ModuleDict:
    """The model's bank container, created on first use."""
    if not hasattr(model, BANKS_ATTR):
        setattr(model, BANKS_ATTR, nn.ModuleDict())
    return getattr(model, BANKS_ATTR)


class DictLinear(nn.Module):
    def __init__(
        self,
        bank: AtomBank,
        bank_name: str,
        coeffs: torch.Tensor,
        bias: torch.Tensor | None = None,
        residual_a: torch.Tensor | None = None,
        residual_b: torch.Tensor | None = None,
        *,
        materialize: bool = True,
    ):
        super().__init__()
        _, self.out_features, self.in_features = bank.atoms.shape
        # a plain attribute, not a child: the model's masa_banks owns the bank, stored once
        object.__setattr__(self, "bank", bank)
        self.bank_name = bank_name
        self.materialize = materialize
        self.register_buffer("coeffs", coeffs.to(torch.float32))  # [S], kept fp32 (spec §5.3)
        self.register_buffer("residual_a", residual_a)  # [d_out, r] or None
        self.register_buffer("residual_b", residual_b)  # [r, d_in] or None
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self._dense: torch.Tensor | None = None
        self._dense_key: tuple | None = None

    @classmethod
    def empty(
        cls, bank: AtomBank, bank_name: str, *, rank: int = 0, bias: bool = False, dtype=torch.float32,
        materialize: bool = True,
    ) -> DictLinear:
        """Shapes only, for checkpoint loading (tensors are filled in by name afterwards)."""
        s, out, inp = bank.atoms.shape
        return cls(
            bank,
            bank_name,
            torch.empty(s, dtype=torch.float32),
            torch.empty(out, dtype=dtype) if bias else None,
            torch.empty(out, rank, dtype=dtype) if rank else None,
            torch.empty(rank, inp, dtype=dtype) if rank else None,
            materialize=materialize,
        )

    @property
    def rank(self) -> int:
        return 0 if self.residual_a is None else self.residual_a.shape[1]

    @property
    def n_atoms(self) -> int:
        return self.coeffs.numel()

    def dense_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """W_l [d_out, d_in], computed in fp32 then cast."""
        w = torch.einsum("s,sij->ij", self.coeffs.float(), self.bank.atoms.float())
        if self.residual_a is not None:
            w = w + self.residual_a.float() @ self.residual_b.float()
        return w.to(dtype)

    def drop_cache(self) -> None:
        """Forget the materialized W_l (derived from the bank and coefficients; rebuilt on demand)."""
        self._dense = self._dense_key = None

    def _key(self, dtype: torch.dtype) -> tuple:
        # a tensor replaced (new data_ptr) or written in place (new _version) invalidates the cache,
        # which covers load_state_dict, from_pretrained's assignment and .to()
        ts = [self.bank.atoms, self.coeffs, self.residual_a, self.residual_b]
        return (dtype, *((t.data_ptr(), t._version, t.device) for t in ts if t is not None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        if not self.materialize:
            return self._mixed_forward(x, bias)
        key = self._key(x.dtype)
        if self._dense is None or self._dense_key != key:
            self._dense, self._dense_key = self.dense_weight(x.dtype), key
        return F.linear(x, self._dense, bias)

    def _mixed_forward(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        s = self.n_atoms
        atoms = self.bank.atoms.to(x.dtype).reshape(s * self.out_features, self.in_features)
        per_atom = F.linear(x, atoms).unflatten(-1, (s, self.out_features))  # [..., S, d_out]
        y = torch.einsum("...so,s->...o", per_atom, self.coeffs.to(x.dtype))
        if self.residual_a is not None:
            y = y + F.linear(F.linear(x, self.residual_b.to(x.dtype)), self.residual_a.to(x.dtype))
        return y if bias is None else y + bias

    def stored_params(self) -> int:
        """Parameters this layer stores itself (its share of the atoms is counted on the bank)."""
        return sum(t.numel() for t in (self.coeffs, self.residual_a, self.residual_b) if t is not None)

    def extra_repr(self) -> str:
        return (
            f"in={self.in_features}, out={self.out_features}, bank={self.bank_name}, atoms={self.n_atoms}, "
            f"rank={self.rank}, materialize={self.materialize}"
        )
