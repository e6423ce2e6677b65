"""Evaluation windows: BOS follows the tokenizer's own behaviour, not a model-family list."""

import pytest
import torch
from transformers import GemmaConfig, LlamaConfig

from quantkit.eval import eval_windows, needs_bos


class _Tok:
    """A word-level tokenizer: enough for the windowing code, with a configurable BOS policy."""

    name_or_path = "fake"
    vocab_size = 100
    bos_token_id = 1
    eos_token_id = 2

    def __init__(self, add_bos_token=None, post_processor_bos=False):
        if add_bos_token is not None:
            self.add_bos_token = add_bos_token
        self.post_processor_bos = post_processor_bos

    def __call__(self, text, add_special_tokens=True, **kw):
        ids = [3 + (hash(w) % 90) for w in text.split()]
        if add_special_tokens and self.post_processor_bos:
            ids = [self.bos_token_id] + ids
        return {"input_ids": ids}


class _Model:
    def __init__(self, config):
        self.config = config


@pytest.mark.parametrize("tok,expected", [
    (_Tok(add_bos_token=True), True),
    (_Tok(add_bos_token=False, post_processor_bos=True), False),  # an explicit flag wins
    (_Tok(post_processor_bos=True), True),  # no flag: what encoding does
    (_Tok(), False),
])
def test_bos_follows_the_tokenizer(tok, expected):
    assert needs_bos(tok) is expected


def test_no_bos_token_means_no_bos():
    tok = _Tok(add_bos_token=True)
    tok.bos_token_id = None
    assert needs_bos(tok) is False


def test_smollm2_tokenizer_adds_no_bos(smollm2_tokenizer):
    assert smollm2_tokenizer.add_bos_token is False and needs_bos(smollm2_tokenizer) is False


def _windows(model_config, tok, monkeypatch):
    import quantkit.eval as E

    monkeypatch.setattr(E, "read_texts", lambda source, split: ["w" * (i % 7 + 1) for i in range(400)])
    monkeypatch.setattr(E, "token_stream", lambda tok, texts: torch.arange(3, 403))
    E._stream_cache.clear()
    return eval_windows(_Model(model_config), tok, seq_len=16, max_windows=4)


def test_llama_whose_tokenizer_adds_bos_gets_bos_windows(monkeypatch):
    w = _windows(LlamaConfig(), _Tok(add_bos_token=True), monkeypatch)
    assert w.shape == (4, 16) and (w[:, 0] == 1).all()


def test_gemma_whose_tokenizer_adds_no_bos_gets_plain_windows(monkeypatch):
    w = _windows(GemmaConfig(), _Tok(add_bos_token=False), monkeypatch)
    assert w.shape == (4, 16) and (w[:, 0] != 1).all()
    assert torch.equal(w.flatten(), torch.arange(3, 3 + 64))
