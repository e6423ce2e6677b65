"""Block-diagonal Hadamard: orthogonal, rotate-then-unrotate is the identity, linears unchanged."""

import pytest
import torch

from quantkit.passes.rotate.hadamard import RotationError, block_hadamard, hadamard, rotate


@pytest.mark.parametrize("block", [1, 2, 16, 32, 64, 128])
def test_hadamard_is_orthogonal_and_symmetric(block):
    h = hadamard(block)
    assert torch.allclose(h @ h.T, torch.eye(block, dtype=torch.float64), atol=1e-12)
    assert torch.equal(h, h.T)
    assert bool((h.abs() == 1 / block**0.5).all())  # a Hadamard matrix: every entry +-1/sqrt(b)


def test_matches_compressed_tensors_deterministic_hadamard():
    from compressed_tensors.transform.utils.hadamard import deterministic_hadamard_matrix

    ref = deterministic_hadamard_matrix(64, torch.float64) / 8.0
    assert torch.equal(hadamard(64), ref)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_block_rotation_is_orthogonal_and_matches_the_dense_matrix(block):
    r = block_hadamard(576, block)
    assert torch.allclose(r @ r.T, torch.eye(576, dtype=torch.float64), atol=1e-12)
    x = torch.randn(3, 5, 576, dtype=torch.float64)
    assert torch.allclose(rotate(x, block), x @ r, atol=1e-12)


@pytest.mark.parametrize("block", [16, 32, 64])
def test_rotate_then_unrotate_is_the_identity(block):
    x = torch.randn(7, 576, dtype=torch.float64)
    assert torch.allclose(rotate(rotate(x, block), block, inverse=True), x, atol=1e-12)


def test_rotated_weight_and_input_leave_the_linear_unchanged():
    w, x = torch.randn(48, 576, dtype=torch.float64), torch.randn(9, 576, dtype=torch.float64)
    assert torch.allclose(rotate(x, 32) @ rotate(w, 32).T, x @ w.T, atol=1e-9)


def test_rotation_spreads_a_block_outlier():
    w = torch.randn(4, 64, dtype=torch.float64) * 0.01
    w[:, 5] = 10.0  # one outlier column
    r = rotate(w, 64)
    assert r.abs().amax() < w.abs().amax() / 4


@pytest.mark.parametrize("block,n", [(24, 576), (128, 576), (0, 64)])
def test_bad_block_sizes_are_refused(block, n):
    with pytest.raises(RotationError):
        rotate(torch.randn(2, n), block)
