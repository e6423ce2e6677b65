"""Calibration text -> fixed-length token batches, seeded, deterministic and cached on disk."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from quantkit.errors import CalibrationError
from quantkit.io import file_lock
from quantkit.paths import cache_dir, calib_data_dir

DEFAULT_SOURCE = "default"


def _read_jsonl(path: Path) -> list[str]:
    texts = []
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationError(f"{path}:{i}: not valid JSON ({e.msg})") from None
            text = row.get("text") if isinstance(row, dict) else None
            if not isinstance(text, str):
                raise CalibrationError(f"{path}:{i}: expected an object with a 'text' string")
            texts.append(text)
    return texts


def read_texts(source: str, split: str = "calib") -> list[str]:
    """Documents from the shipped data, a local .txt/.jsonl/.parquet file, or a hub dataset."""
    if source == DEFAULT_SOURCE:
        path = calib_data_dir() / ("wiki_calib.jsonl" if split == "calib" else "wiki_eval.jsonl")
        if not path.exists():
            raise CalibrationError(f"shipped data {path} is missing; run python calib_data/build.py")
        return _read_jsonl(path)
    path = Path(source).expanduser()
    if path.exists():
        if path.suffix == ".jsonl":
            return _read_jsonl(path)
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pq.read_table(path)
            if "text" not in table.column_names:
                raise CalibrationError(f"{path}: parquet file has no 'text' column")
            return [t for t in table.column("text").to_pylist() if isinstance(t, str)]
        return [path.read_text(encoding="utf-8")]
    if source.startswith((".", "/", "~")) or source.endswith((".txt", ".jsonl", ".parquet")):
        raise CalibrationError(f"calibration file {source} does not exist")
    return _hub_texts(source, split)


def _hub_texts(name: str, split: str) -> list[str]:
    import datasets

    hub_split = "train" if split == "calib" else "test"
    try:
        ds = datasets.load_dataset(name, split=hub_split)
    except Exception as e:  # datasets raises many types for offline / missing
        raise CalibrationError(
            f"dataset {name!r} could not be loaded (not cached and offline?): {str(e).splitlines()[0][:160]}"
        ) from None
    if "text" not in ds.column_names:
        raise CalibrationError(f"dataset {name!r} has no 'text' column; columns: {', '.join(ds.column_names)}")
    return [t for t in ds["text"] if t]


def _source_fingerprint(source: str) -> str:
    if source == DEFAULT_SOURCE:
        path = calib_data_dir() / "wiki_calib.jsonl"
    else:
        path = Path(source).expanduser()
    if path.exists():
        return hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return source


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    blob = json.dumps([type(tokenizer).__name__, vocab, tokenizer.eos_token, tokenizer.bos_token])
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def token_stream(tokenizer, texts: list[str]) -> torch.Tensor:
    """All documents tokenized (no special tokens) and joined with EOS between them -> [T]."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for text in texts:
        if not text.strip():
            continue
        ids.extend(tokenizer(text, add_special_tokens=False)["input_ids"])
        if eos is not None:
            ids.append(eos)
    return torch.tensor(ids, dtype=torch.long)


def load_calib(tokenizer, *, source: str = DEFAULT_SOURCE, n_samples: int = 16, seq_len: int = 512, seed: int = 0):
    """n_samples windows of seq_len tokens -> LongTensor [n_samples, seq_len].

    The token stream is cut into non-overlapping windows and a seeded permutation picks
    n_samples of them, so the buffer is deterministic and never repeats text.
    """
    if n_samples < 1 or seq_len < 2:
        raise CalibrationError(f"need n_samples >= 1 and seq_len >= 2, got {n_samples} and {seq_len}")
    key = hashlib.sha256(
        json.dumps([tokenizer_fingerprint(tokenizer), _source_fingerprint(source), n_samples, seq_len, seed]).encode()
    ).hexdigest()[:24]
    path = cache_dir() / "calib" / f"{key}.safetensors"
    with file_lock(cache_dir() / "calib" / f".{key}.lock"):
        if path.exists():
            return load_file(path)["input_ids"]
        stream = token_stream(tokenizer, read_texts(source, "calib"))
        if stream.numel() == 0:
            raise CalibrationError(f"calibration text {source} is empty; {n_samples} x {seq_len} tokens are needed")
        n_windows = stream.numel() // seq_len
        if n_windows < n_samples:
            raise CalibrationError(
                f"calibration text has {stream.numel()} tokens; {n_samples} x {seq_len} = "
                f"{n_samples * seq_len} are needed"
            )
        windows = stream[: n_windows * seq_len].view(n_windows, seq_len)
        gen = torch.Generator().manual_seed(seed)
        pick = torch.randperm(n_windows, generator=gen)[:n_samples].sort().values
        ids = windows[pick].contiguous()
        tmp = path.with_suffix(".tmp")
        save_file({"input_ids": ids}, str(tmp))
        tmp.replace(path)
        return ids


def load_eval_text() -> str:
    """The held-out evaluation split, documents separated by blank lines."""
    return "\n\n".join(read_texts(DEFAULT_SOURCE, "eval"))
