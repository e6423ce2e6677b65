"""E2M1 element rounding, codes and nibble packing: golden bit patterns."""

import torch

from quantkit.formats import e2m1

VALUES = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0]


def test_every_positive_value_encodes_to_its_index():
    codes = e2m1.encode(torch.tensor(VALUES))
    assert codes.tolist() == list(range(8))


def test_every_negative_value_encodes_with_sign_bit_3():
    codes = e2m1.encode(-torch.tensor(VALUES[1:]))
    assert codes.tolist() == [8 + i for i in range(1, 8)]


def test_every_code_decodes_to_its_value():
    vals = e2m1.decode(torch.arange(16, dtype=torch.uint8))
    assert vals.tolist() == VALUES + [-v for v in VALUES]


def test_ties_round_to_even_code():
    x = torch.tensor([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
    assert e2m1.round_e2m1(x).tolist() == [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]


def test_spec_vector_from_algorithms_1_2():
    x = torch.tensor([0.25, 0.75, 1.25, 2.5, 3.5, 5.0, 7.0, -0.3])
    assert e2m1.round_e2m1(x).tolist() == [0, 1, 1, 2, 4, 4, 6, -0.5]


def test_values_just_off_a_tie_round_to_nearest():
    eps = 1e-6
    x = torch.tensor([0.25 + eps, 0.75 - eps, 1.25 + eps, 1.75 - eps, 2.5 + eps, 3.5 - eps, 5.0 + eps])
    assert e2m1.round_e2m1(x).tolist() == [0.5, 0.5, 1.5, 1.5, 3.0, 3.0, 6.0]


def test_magnitudes_beyond_six_saturate():
    x = torch.tensor([6.5, 100.0, float("inf"), -7.0, float("-inf")])
    assert e2m1.encode(x).tolist() == [7, 7, 7, 15, 15]


def test_exact_negative_zero_is_code_zero():
    assert e2m1.encode(torch.tensor([-0.0, 0.0])).tolist() == [0, 0]


def test_negatives_that_round_to_zero_keep_the_sign_as_code_eight():
    # formats.md "Verified bit for bit" 4: llm-compressor writes code 8 here, not 0
    x = torch.tensor([-1e-30, -0.25, -0.1, -1e-45])
    assert e2m1.encode(x).tolist() == [8, 8, 8, 8]


def test_code_eight_decodes_to_negative_zero():
    y = e2m1.decode(torch.tensor([8], dtype=torch.uint8))
    assert y.item() == 0.0 and torch.signbit(y).item()


def test_nan_encodes_to_zero():
    assert e2m1.encode(torch.tensor([float("nan"), 1.0])).tolist() == [0, 2]


def test_even_element_goes_in_low_nibble():
    packed = e2m1.pack(torch.tensor([[1, 7, 8 + 2, 3]], dtype=torch.uint8))
    assert packed.tolist() == [[0x71, 0x3A]]


def test_unpack_inverts_pack_for_every_byte():
    codes = torch.stack([torch.arange(256) & 0xF, torch.arange(256) >> 4], 1).reshape(1, -1).to(torch.uint8)
    assert torch.equal(e2m1.unpack(e2m1.pack(codes)), codes)


def test_decode_packed_matches_decode_of_unpacked_codes():
    packed = torch.arange(256, dtype=torch.uint8).reshape(4, 64)
    assert torch.equal(e2m1.decode_packed(packed), e2m1.decode(e2m1.unpack(packed)))
