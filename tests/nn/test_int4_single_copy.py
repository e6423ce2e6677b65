"""INT4 on torch's CPU kernel keeps its codes and scales once (issue 15): the first int4pack_mm
forward converts weight_codes in place to torch's layout and makes weight_scale a view of torch's
scale-and-zero table; qweight, state_dict and the tiled prefill path get the canonical codes and
scales back bit for bit."""

import pytest
import torch
from torch import nn

from quantkit.nn.kernels import int4 as k_int4
from quantkit.nn.qlinear import QLinear, quantize_linear

# (out, in): a full kernel block count, a partial last block (out % 32 == 16), SmolLM2 k_proj
SHAPES = [(64, 64), (80, 96), (192, 576)]


def _tensor_bytes(module: nn.Module) -> int:
    """Everything a QLinear holds: parameters, buffers and kernel caches, each storage once."""
    seen, total = set(), 0
    tensors = list(module.parameters()) + list(module.buffers()) + list(module._kcache.values())
    for t in tensors:
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            total += t.untyped_storage().nbytes()
    return total


def _q(shape, name="int4") -> tuple[nn.Linear, QLinear]:
    torch.manual_seed(0)
    lin = nn.Linear(shape[1], shape[0], bias=True).to(torch.bfloat16)
    return lin, quantize_linear(lin, name, mode="real")


@pytest.mark.parametrize("shape", SHAPES)
def test_cpu_layout_round_trips_bit_for_bit(shape):
    codes = torch.randint(0, 256, (shape[0], shape[1] // 2), dtype=torch.uint8)
    packed = k_int4.pack_for_cpu(codes)
    assert not torch.equal(packed, codes)  # a different layout, so the round trip means something
    assert torch.equal(k_int4.unpack_from_cpu(packed, *shape), codes)


@pytest.mark.parametrize("shape", SHAPES)
def test_decode_forward_keeps_one_copy_of_the_codes(shape):
    _, q = _q(shape)
    assert q.kernel_for(torch.bfloat16).for_rows(1) == "int4pack_mm"
    canonical = q.weight_codes.clone()
    scales = q.weight_scale.clone()
    code_bytes = canonical.numel() * canonical.element_size()
    bias_bytes = q.bias.numel() * q.bias.element_size()
    q(torch.randn(1, shape[1], dtype=torch.bfloat16))
    assert q._codes_layout == "int4_cpu" and "int4pack" not in q._kcache
    assert q.weight_codes.numel() == canonical.numel()  # converted in place, not beside the original
    # resident: the packed codes once, and the scales once, inside torch's [groups, out, 2]
    # scale-and-zero table (weight_scale is a view of its scale column; the zeros are the only extra)
    sz = q._kcache["int4pack_torch.bfloat16"]
    assert q.weight_scale.untyped_storage().data_ptr() == sz.untyped_storage().data_ptr()
    assert _tensor_bytes(q) == code_bytes + bias_bytes + sz.numel() * sz.element_size()
    assert sz.numel() == 2 * scales.numel()
    assert torch.equal(q.qweight.codes, canonical)
    assert torch.equal(q.qweight.scale, scales) and q.qweight.scale.is_contiguous()
    assert torch.equal(q.state_dict()["weight_codes"], canonical)
    assert torch.equal(q.state_dict()["weight_scale"], scales)


@pytest.mark.parametrize("shape", SHAPES)
def test_after_conversion_every_path_gives_the_same_outputs(shape, cpu_without_bf16_gemm):
    _, fresh = _q(shape)
    _, q = _q(shape)
    x1 = torch.randn(1, shape[1], dtype=torch.bfloat16)
    x40 = torch.randn(40, shape[1], dtype=torch.bfloat16)
    y1 = q(x1)  # converts
    assert torch.equal(y1, fresh(x1))
    assert q.kernel_for(torch.bfloat16).for_rows(40) == "tiled_f32"
    assert torch.equal(q(x40), fresh(x40))  # the tiled prefill reads the unpacked canonical codes
    assert torch.equal(q.dequantized_weight(torch.float32), fresh.dequantized_weight(torch.float32))


def test_state_dict_round_trip_resets_the_layout():
    _, q = _q((80, 96))
    _, other = _q((80, 96))
    q(torch.randn(1, 96, dtype=torch.bfloat16))
    other(torch.randn(1, 96, dtype=torch.bfloat16))
    sd = q.state_dict()
    other.load_state_dict(sd)
    assert other._codes_layout == "canonical"
    assert torch.equal(other.weight_codes, sd["weight_codes"])
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    assert torch.equal(other(x), q(x))  # converts again from the loaded canonical codes


def test_checkpoint_written_after_a_forward_equals_one_written_before(tmp_path):
    from quantkit.export.compressed_tensors import module_tensors

    _, q = _q((192, 576))
    before, _, _ = module_tensors("layer", q)
    q(torch.randn(1, 576, dtype=torch.bfloat16))
    after, _, _ = module_tensors("layer", q)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_model_to_after_a_forward_detaches_the_scales_from_the_dropped_table():
    _, q = _q((80, 96))
    scales = q.weight_scale.clone()
    q(torch.randn(1, 96, dtype=torch.bfloat16))
    q.to(torch.float32)  # drops kernel caches; the protected scales keep their dtype and bits
    assert q.weight_scale.is_contiguous() and q.weight_scale.dtype == torch.bfloat16
    assert torch.equal(q.weight_scale, scales)
    q.to(torch.bfloat16)
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    _, fresh = _q((80, 96))
    assert torch.equal(q(x), fresh(x))


def test_load_state_dict_after_a_forward_updates_the_kernel_scales():
    _, q = _q((80, 96))
    lin2 = nn.Linear(96, 80, bias=True).to(torch.bfloat16)
    other = quantize_linear(lin2, "int4", mode="real")
    x = torch.randn(1, 96, dtype=torch.bfloat16)
    q(x)  # converts, builds the table from q's own scales
    q.load_state_dict(other.state_dict())
    assert torch.equal(q(x), other(x))
