"""The in-stream evaluation's fp32 arithmetic for 16-bit models: same model, untouched weights."""

import pytest
import torch

from quantkit.api import apply
from quantkit.recipe import load_recipe
from quantkit.stream.evaluation import compute_dtype_for, viewed_as
from tests.tiny_models import tiny_model

EVAL = ["calib.n_samples=2", "calib.seq_len=32", "eval.seq_len=64", "eval.max_windows=3"]


@pytest.fixture(scope="module")
def bf16_llama(tmp_path_factory, smollm2_tokenizer):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("bf16-llama")
    tiny_model("llama", vocab_size=len(smollm2_tokenizer), dtype=torch.bfloat16).save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path


def test_auto_is_fp32_for_half_models_on_cpu_only():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert compute_dtype_for("auto", torch.bfloat16, cpu) == torch.float32
    assert compute_dtype_for("auto", torch.float16, cpu) == torch.float32
    assert compute_dtype_for("auto", torch.bfloat16, cuda) == torch.bfloat16
    assert compute_dtype_for("auto", torch.float32, cpu) == torch.float32
    assert compute_dtype_for("model", torch.bfloat16, cpu) == torch.bfloat16
    assert compute_dtype_for("float32", torch.bfloat16, cuda) == torch.float32


def test_viewed_as_gives_back_the_very_same_storage():
    lin = torch.nn.Linear(8, 4).to(torch.bfloat16)
    lin.register_buffer("table", torch.randn(5))  # fp32, as rotary tables are: never cast
    ptrs = {n: t.data_ptr() for n, t in [*lin.named_parameters(), *lin.named_buffers()]}
    before = {n: t.clone() for n, t in lin.state_dict().items()}
    with viewed_as([*lin.parameters(), *lin.buffers()], torch.float32):
        assert lin.weight.dtype == torch.float32 and lin.table.dtype == torch.float32
        assert torch.equal(lin.weight.to(torch.bfloat16), before["weight"])  # bf16 -> fp32 is exact
        assert lin.table.data_ptr() == ptrs["table"]  # already fp32: not copied
    assert {n: t.data_ptr() for n, t in [*lin.named_parameters(), *lin.named_buffers()]} == ptrs
    assert all(torch.equal(lin.state_dict()[n], t) and lin.state_dict()[n].dtype == t.dtype for n, t in before.items())


@pytest.mark.parametrize(("recipe_name", "execution"), [("int8-w8a8", "streaming"), ("nvfp4-w4a4", "streaming"),
                                                       ("nvfp4-w4a4", "whole")])
def test_fp32_evaluation_measures_the_same_model_and_leaves_the_checkpoint_alone(recipe_name, execution, bf16_llama,
                                                                                 tmp_path):
    reports = {}
    for mode in ("auto", "model"):
        recipe = load_recipe(recipe_name, overrides=[*EVAL, f"eval.compute_dtype={mode}"])
        reports[mode] = apply(recipe, str(bf16_llama), output=tmp_path / mode, execution=execution)
    off = load_recipe(recipe_name, overrides=[*EVAL, "eval.enabled=false"])
    apply(off, str(bf16_llama), output=tmp_path / "off", execution=execution)

    fp32, bf16 = reports["auto"], reports["model"]
    assert fp32.details["eval_plan"]["compute_dtype"] == "float32"
    assert bf16.details["eval_plan"]["compute_dtype"] == "bfloat16"
    # the same weights with less rounding in the arithmetic: perplexities agree to bf16's precision,
    # but they are not computed the same way (bf16 hidden states between blocks round to 8 bits)
    assert fp32.ppl_before == pytest.approx(bf16.ppl_before, rel=2e-2) and fp32.ppl_before != bf16.ppl_before
    assert fp32.ppl_after == pytest.approx(bf16.ppl_after, rel=2e-2)
    assert fp32.kl == pytest.approx(bf16.kl, rel=0.25, abs=1e-4)
    # evaluating (in either dtype) never changes what is written
    for mode in ("auto", "model"):
        for f in sorted((tmp_path / "off").glob("*.safetensors")):
            assert (tmp_path / mode / f.name).read_bytes() == f.read_bytes(), (mode, f.name)


def test_reference_stream_keeps_the_original_head_when_a_pass_quantizes_it(bf16_llama, tmp_path):
    """lm_head is quantized after the blocks (run_rest); the 'before' numbers must not see that."""
    index = next(i for i, p in enumerate(load_recipe("int8-w8a16").passes) if p.name == "quantize")
    with_head = load_recipe("int8-w8a16", overrides=[*EVAL, f'passes.{index}.targets.include=["*_proj","lm_head"]'])
    without = load_recipe("int8-w8a16", overrides=EVAL)
    a = apply(with_head, str(bf16_llama), output=tmp_path / "head", execution="streaming")
    b = apply(without, str(bf16_llama), output=tmp_path / "nohead", execution="streaming")
    assert any(k.startswith("lm_head.weight_") for k in _keys(tmp_path / "head"))  # the head really was quantized
    assert a.ppl_before == b.ppl_before  # the same original model, bit for bit
    assert a.kl > b.kl  # the head's own quantization error is counted


def _keys(path):
    from safetensors import safe_open

    keys = set()
    for f in path.glob("*.safetensors"):
        with safe_open(f, "pt") as sf:
            keys.update(sf.keys())
    return keys


def test_the_budget_caps_the_default_window_count_but_not_an_explicit_one():
    from quantkit.stream.evaluation import window_count

    seven_b = 7e9
    assert window_count(load_recipe("int8-w8a8").eval, int(135e6)) == 16  # SmolLM2: the default
    assert window_count(load_recipe("int8-w8a8").eval, int(seven_b)) == 2  # a 7B: capped by the budget
    explicit = load_recipe("int8-w8a8", overrides=["eval.max_windows=64"]).eval
    assert window_count(explicit, int(seven_b)) == 64  # asked for: the user's cost, printed up front
    assert window_count(explicit, int(135e6)) == 64
