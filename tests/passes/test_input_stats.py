"""input_second_moments: each batch's block forward stops once the named linears have their inputs, with the same
statistics bit for bit as a whole forward."""

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from quantkit.passes.input_stats import CALLS, input_second_moments
from quantkit.stream.capture import capture
from quantkit.stream.loop import BlockView

STAGES = [["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], ["self_attn.o_proj"],
          ["mlp.gate_proj", "mlp.up_proj"], ["mlp.down_proj"]]


def _block():
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, vocab_size=128, max_position_embeddings=64)
    model = LlamaForCausalLM(cfg).eval()
    batches = [torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(k)) for k in range(3)]
    blocks = list(model.model.layers)
    cap = capture(model, blocks, batches)
    return model, BlockView(0, "model.layers.0", blocks[0], model, cap.hidden, cap.calls[0])


def _whole_forward(blk, names):
    """The statistics with hooks and every batch's forward run to the end."""
    out = {}

    def hook_for(n):
        def hook(_m, a):
            x = a[0].reshape(-1, a[0].shape[-1]).float()
            out[n] = out.get(n, 0) + x.T @ x
        return hook

    hooks = [blk.model.get_submodule(n).register_forward_pre_hook(hook_for(n)) for n in names]
    with torch.no_grad():
        for h, c in zip(blk.hidden, blk.calls):
            blk.module(h, *c.args, **c.kwargs)
    for hk in hooks:
        hk.remove()
    return out


def test_early_stopped_statistics_equal_a_whole_forward_and_the_rest_of_the_block_is_skipped():
    model, blk = _block()
    calls = {}
    for n, m in blk.module.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda _m, _a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    for k, stage in enumerate(STAGES):
        names = [f"model.layers.0.{n}" for n in stage]
        calls.clear()
        got = input_second_moments(blk, names, "hessian")
        ran = dict(calls)
        ref = _whole_forward(blk, names)
        for n in names:
            assert torch.equal(got[n], ref[n]), n
        if k == 0:  # the first call learns each linear's calls per forward on its first batch, which runs whole
            assert blk.extra[CALLS] == {f"model.layers.0.{n}": 1 for s in STAGES for n in s}
        else:  # later calls stop every batch right after the stage's linears: nothing after them runs
            later = [n for s in STAGES[k + 1:] for n in s]
            assert all(ran.get(n, 0) == 0 for n in later), ran
    # the first call stops too, after its first batch: q/k/v's stage ran o_proj on one batch of three
    calls.clear()
    _model, blk2 = _block()
    for n, m in blk2.module.named_modules():
        if isinstance(m, torch.nn.Linear):
            m.register_forward_pre_hook(lambda _m, _a, n=n: calls.__setitem__(n, calls.get(n, 0) + 1))
    input_second_moments(blk2, [f"model.layers.0.{n}" for n in STAGES[0]], "channel")
    assert calls["self_attn.q_proj"] == 3 and calls["self_attn.o_proj"] == 1 and calls["mlp.down_proj"] == 1


def test_a_linear_the_forward_never_called_turns_the_early_stop_off():
    model, blk = _block()
    blk.extra[CALLS] = {"model.layers.0.self_attn.q_proj": 1, "model.layers.0.mlp.down_proj": 0}
    seen = []
    blk.module.mlp.down_proj.register_forward_pre_hook(lambda *_: seen.append(1))
    input_second_moments(blk, ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"], "channel")
    assert len(seen) == len(blk.hidden)  # every batch ran whole
