"""DictLinear runtime: materialised and mixed forward, sharing, cache, layout round trip."""

import copy

import torch
from torch import nn

from quantkit.export import masa_layout
from quantkit.export.quantkit_layout import install_modules, quantkit_state_dict, write_quantkit_config
from quantkit.nn.dict_linear import AtomBank, DictLinear, banks

S, OUT, IN, RANK = 3, 6, 5, 2


def _layer(seed=0, bank=None, rank=RANK, materialize=True):
    g = torch.Generator().manual_seed(seed)
    bank = bank or AtomBank(torch.randn(S, OUT, IN, generator=g))
    a = torch.randn(OUT, rank, generator=g) if rank else None
    b = torch.randn(rank, IN, generator=g) if rank else None
    return DictLinear(bank, "masa_banks.q_0", torch.randn(S, generator=g), torch.randn(OUT, generator=g), a, b,
                      materialize=materialize)


class _Toy(nn.Module):
    def __init__(self):
        super().__init__()
        bank = AtomBank(torch.randn(S, OUT, IN, generator=torch.Generator().manual_seed(9)))
        banks(self)["q_0"] = bank
        self.l0 = _layer(1, bank)
        self.l1 = _layer(2, bank, rank=0)


def test_dense_weight_is_coefficient_mix_plus_residual():
    m = _layer()
    expect = torch.einsum("s,sij->ij", m.coeffs, m.bank.atoms) + m.residual_a @ m.residual_b
    assert torch.allclose(m.dense_weight(), expect, atol=1e-6)


def test_forward_matches_dense_linear():
    m, x = _layer(), torch.randn(4, IN)
    assert torch.allclose(m(x), x @ m.dense_weight().T + m.bias, atol=1e-5)


def test_mixed_forward_equals_materialised():
    dense, mixed = _layer(materialize=True), _layer(materialize=False)
    x = torch.randn(2, 7, IN)
    assert torch.allclose(dense(x), mixed(x), atol=1e-5)


def test_cache_follows_in_place_atom_updates():
    m, x = _layer(), torch.randn(3, IN)
    before = m(x)
    with torch.no_grad():
        m.bank.atoms.mul_(2)
    assert not torch.allclose(m(x), before)
    assert torch.allclose(m(x), x @ m.dense_weight().T + m.bias, atol=1e-5)


def test_shared_atoms_stored_once():
    keys = [k for k in _Toy().state_dict() if k.endswith("atoms")]
    assert keys == ["masa_banks.q_0.atoms"]


def test_deepcopy_keeps_layers_pointing_at_the_copied_bank():
    toy = copy.deepcopy(_Toy())
    assert toy.l0.bank is toy.masa_banks["q_0"] and toy.l1.bank is toy.masa_banks["q_0"]


def test_layout_install_then_load_state_dict_round_trips():
    src = _Toy()
    qconfig = write_quantkit_config(src)
    assert qconfig["modules"]["l0"]["type"] == "masa"
    dst = nn.Module()
    dst.l0, dst.l1 = nn.Linear(IN, OUT), nn.Linear(IN, OUT)
    install_modules(dst, qconfig)
    dst.load_state_dict(quantkit_state_dict(src))  # what the checkpoint holds, guards included
    x = torch.randn(4, IN)
    assert torch.allclose(dst.l0(x), src.l0(x)) and torch.allclose(dst.l1(x), src.l1(x))
    assert dst.l0.bank is dst.masa_banks["q_0"]


def test_param_counts_from_model_and_config_agree():
    toy = _Toy()
    from_model = masa_layout.masa_param_counts(toy)
    from_config = masa_layout.masa_param_counts({"quantization_config": write_quantkit_config(toy)})
    assert from_model == from_config
    assert from_model["atoms"] == S * OUT * IN  # one bank, counted once for two layers
    assert from_model["stored"] == S * OUT * IN + 2 * S + RANK * (OUT + IN)
    assert from_model["original"] == 2 * OUT * IN
