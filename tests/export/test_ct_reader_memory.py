"""Reading a compressed-tensors checkpoint never materializes a dense copy of the model: the
buffers the checkpoint does not hold (rotary inv_freq) come from a skeleton whose parameters
stay on meta (a dense random init of a 7B model is 13.5 GB)."""

import torch
from transformers import AutoModelForCausalLM

from quantkit.api import save_output
from quantkit.arch import arch_info
from quantkit.context import Context
from quantkit.export.ct_reader import load_ct_checkpoint
from quantkit.passes.quantize import Quantize
from tests.tiny_models import tiny_model


class _NoTokenizer:
    def save_pretrained(self, path):
        pass


def test_reader_builds_no_dense_parameters(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = tiny_model("llama", dtype=torch.bfloat16)
    ctx = Context(model=model, tokenizer=None, arch=arch_info(model), device=torch.device("cpu"))
    Quantize(format="nvfp4", mode="real").run(model, ctx)
    save_output(model, _NoTokenizer(), tmp_path)

    built = []
    real_from_config = AutoModelForCausalLM.from_config

    def recording_from_config(*args, **kwargs):
        m = real_from_config(*args, **kwargs)
        built.append([n for n, p in m.named_parameters() if not p.is_meta])
        return m

    monkeypatch.setattr(AutoModelForCausalLM, "from_config", recording_from_config)
    back = load_ct_checkpoint(tmp_path, torch.bfloat16)
    assert len(built) == 2  # the skeleton, then the one that supplies the rotary buffers
    assert built == [[], []]
    assert not any(t.is_meta for t in list(back.parameters()) + list(back.buffers()))
    ids = torch.randint(0, 256, (2, 12))
    with torch.inference_mode():
        assert torch.equal(back(ids).logits, model(ids).logits)
