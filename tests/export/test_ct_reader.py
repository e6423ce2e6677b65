"""compressed-tensors checkpoints read back into quantkit's real-quant runtime, codes untouched."""

import pytest
import torch

from quantkit.api import save_output
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.export.ct_reader import load_ct_checkpoint
from quantkit.nn.qlinear import QLinear
from quantkit.passes.quantize import Quantize
from tests.tiny_models import tiny_model


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


@pytest.mark.parametrize("fmt,act", [("nvfp4", None), ("mxfp4", "mxfp4"), ("int4", None), ("int8", "int8")])
def test_reader_restores_codes_and_outputs(tmp_path, fmt, act):
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Quantize(format=fmt, act_format=act, mode="real").run(model, ctx)
    save_output(model, _NoTokenizer(), tmp_path)
    back = load_ct_checkpoint(tmp_path, torch.bfloat16)
    ours = dict(model.named_modules())
    n = 0
    for name, m in back.named_modules():
        if isinstance(m, QLinear):
            n += 1
            assert m.mode == "real" and m.act_format == act
            assert torch.equal(m.weight_codes, ours[name].weight_codes)
    assert n == 14
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        assert torch.equal(back(ids).logits, model(ids).logits)
