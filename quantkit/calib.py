"""Calibration text -> fixed-length token batches, seeded, deterministic and cached on disk.

Sources (recipe `calib.source`): "default" (the shipped Wikipedia split), a local
.jsonl/.json/.csv/.parquet/.txt file, or a Hugging Face hub dataset name. Documents are visited
in a seeded order (an exact permutation for local files, datasets' streaming shuffle buffer for
the hub) and tokenized only until the buffer is full: each document contributes at most one
window (its first seq_len tokens), so n_samples windows come from about n_samples documents,
as llm-compressor's calibration does. Only when the documents run out before the buffer is full
(a few long documents) is everything read again without that cap.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from quantkit.calib_sources import Source, open_source
from quantkit.errors import CalibrationError
from quantkit.io import file_lock
from quantkit.paths import cache_dir, calib_data_dir

DEFAULT_SOURCE = "default"
LOADER_VERSION = 2  # part of the cache key: bump when the window selection changes


def read_texts(source: str, split: str = "calib") -> list[str]:
    """Every document of a source as text (evaluation reads the whole held-out split)."""
    path = Path(source).expanduser()
    if source != DEFAULT_SOURCE and path.suffix == ".txt" and path.is_file():
        return [path.read_text(encoding="utf-8")]  # perplexity text: one document, no EOS inserted
    src = open_source(source, split=None if split == "calib" else "test", held_out=split != "calib")
    return [doc for doc in src.documents(seed=None) if isinstance(doc, str)]


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, vocab, tokenizer.eos_token, tokenizer.bos_token,
                       getattr(tokenizer, "chat_template", None)], default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized (no special tokens) and joined with EOS between them -> [T]."""
    ids: list[int] = []
    for text in texts:
        ids.extend(_doc_ids(tokenizer, text, None))
    return torch.tensor(ids, dtype=torch.long)


def _doc_ids(tokenizer, doc: Any, max_tokens: int | None) -> list[int]:
    """One document -> token ids followed by EOS; [] for an empty document."""
    if isinstance(doc, list):  # chat messages: the tokenizer's own template, as the model was trained
        if not getattr(tokenizer, "chat_template", None):
            raise CalibrationError("calib.chat_template is true but the tokenizer has no chat template")
        doc = tokenizer.apply_chat_template(doc, tokenize=False)
    if not isinstance(doc, str) or not doc.strip():
        return []
    kw = {"truncation": True, "max_length": max_tokens} if max_tokens else {}
    ids = list(tokenizer(doc, add_special_tokens=False, **kw)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def _fill(tokenizer, docs: Iterator[Any], need: int, per_doc: int | None) -> list[int]:
    """Token ids from documents in order until `need` are collected (or the documents end)."""
    ids: list[int] = []
    for doc in docs:
        ids.extend(_doc_ids(tokenizer, doc, per_doc))
        if len(ids) >= need:
            break
    return ids


def load_calib(
    tokenizer,
    *,
    source: str = DEFAULT_SOURCE,
    n_samples: int = 16,
    seq_len: int = 512,
    seed: int = 0,
    column: str | None = None,
    split: str | None = None,
    subset: str | None = None,
    revision: str | None = None,
    chat_template: bool = False,
) -> torch.Tensor:
    """n_samples windows of seq_len tokens -> LongTensor [n_samples, seq_len]."""
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    src = open_source(source, split=split, column=column, subset=subset, revision=revision,
                      chat_template=chat_template)
    key = hashlib.sha256(json.dumps(
        [LOADER_VERSION, tokenizer_fingerprint(tokenizer), src.fingerprint(), n_samples, seq_len, seed]
    ).encode()).hexdigest()[:24]
    path = cache_dir() / "calib" / f"{key}.safetensors"
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(cache_dir() / "calib" / f".{key}.lock"):
        if path.exists():
            return load_file(path)["input_ids"]
        ids = _select(tokenizer, src, n_samples, seq_len, seed)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        save_file({"input_ids": ids}, str(tmp))
        tmp.replace(path)
        return ids


def load_calib_config(tokenizer, cfg) -> torch.Tensor:
    """load_calib with the fields of a recipe's `calib` section."""
    return load_calib(
        tokenizer, source=cfg.source, n_samples=cfg.n_samples, seq_len=cfg.seq_len, seed=cfg.seed,
        column=getattr(cfg, "column", None), split=getattr(cfg, "split", None),
        subset=getattr(cfg, "subset", None), revision=getattr(cfg, "revision", None),
        chat_template=getattr(cfg, "chat_template", False),
    )


def _select(tokenizer, src: Source, n_samples: int, seq_len: int, seed: int) -> torch.Tensor:
    need = n_samples * seq_len
    # one window per document first (diverse); if the documents run out, whole documents
    ids = _fill(tokenizer, src.documents(seed=seed), need, per_doc=seq_len)
    if len(ids) < need:
        ids = _fill(tokenizer, src.documents(seed=seed), need, per_doc=None)
    if not ids:
        raise CalibrationError(f"calibration text {src.name} is empty; {n_samples} x {seq_len} tokens are needed")
    if len(ids) < need:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens; {n_samples} x {seq_len} = {need} are needed"
        )
    return torch.tensor(ids[:need], dtype=torch.long).view(n_samples, seq_len)  # [n_samples, seq_len]


def load_eval_text() -> str:
    """The held-out evaluation split, documents separated by blank lines."""
    return "\n\n".join(read_texts(DEFAULT_SOURCE, "eval"))


__all__ = ["DEFAULT_SOURCE", "calib_data_dir", "load_calib", "load_calib_config", "read_texts", "token_stream"]
