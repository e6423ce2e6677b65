import json

import pytest
import torch

import quantkit.calib as calib
from quantkit.errors import CalibrationError


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setattr(calib, "cache_dir", lambda: tmp_path)
    return tmp_path


def test_buffer_shape_and_determinism(smollm2_tokenizer, fresh_cache):
    a = calib.load_calib(smollm2_tokenizer, n_samples=4, seq_len=64, seed=1)
    assert a.shape == (4, 64) and a.dtype == torch.long
    (fresh_cache / "calib").exists()
    b = calib.load_calib(smollm2_tokenizer, n_samples=4, seq_len=64, seed=1)  # from the cache
    assert torch.equal(a, b)


def test_cache_file_written_and_reused(smollm2_tokenizer, fresh_cache, monkeypatch):
    calib.load_calib(smollm2_tokenizer, n_samples=2, seq_len=32)
    files = list((fresh_cache / "calib").glob("*.safetensors"))
    assert len(files) == 1
    monkeypatch.setattr(calib, "_select", lambda *a, **k: pytest.fail("cache not used"))
    calib.load_calib(smollm2_tokenizer, n_samples=2, seq_len=32)


def test_seed_changes_the_windows(smollm2_tokenizer, fresh_cache):
    a = calib.load_calib(smollm2_tokenizer, n_samples=4, seq_len=64, seed=0)
    b = calib.load_calib(smollm2_tokenizer, n_samples=4, seq_len=64, seed=1)
    assert not torch.equal(a, b)


def test_too_little_text_says_found_and_needed(smollm2_tokenizer, fresh_cache, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text("A short sentence about calibration.")
    with pytest.raises(CalibrationError, match=r"has \d+ tokens; 4 x 64 = 256 are needed"):
        calib.load_calib(smollm2_tokenizer, source=str(small), n_samples=4, seq_len=64)


def test_empty_text_is_an_error(smollm2_tokenizer, fresh_cache, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CalibrationError, match=r"empty\.txt is empty; 1 x 16 tokens are needed"):
        calib.load_calib(smollm2_tokenizer, source=str(empty), n_samples=1, seq_len=16)


def test_jsonl_source_reads_text_field(smollm2_tokenizer, fresh_cache, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("\n".join(json.dumps({"text": "word " * 50}) for _ in range(4)))
    ids = calib.load_calib(smollm2_tokenizer, source=str(path), n_samples=2, seq_len=32)
    assert ids.shape == (2, 32)


def test_missing_local_file_is_named(smollm2_tokenizer, fresh_cache):
    with pytest.raises(CalibrationError, match="calibration file ./nope.txt does not exist"):
        calib.load_calib(smollm2_tokenizer, source="./nope.txt")


def test_uncached_hub_dataset_offline_is_one_line_error(smollm2_tokenizer, fresh_cache):
    with pytest.raises(CalibrationError, match=r"dataset 'no-such-org/no-such-data' could not be loaded"):
        calib.load_calib(smollm2_tokenizer, source="no-such-org/no-such-data")


def test_calibration_and_evaluation_splits_share_no_article():
    cal = {json.loads(line)["title"] for line in open(calib.calib_data_dir() / "wiki_calib.jsonl")}
    ev = {json.loads(line)["title"] for line in open(calib.calib_data_dir() / "wiki_eval.jsonl")}
    assert cal and ev and not cal & ev


# --- sources: local files of each kind, columns, chat template, early stop, cache key ---

WORDS = "the quick brown fox jumps over the lazy dog while seven wizards quietly hum "


def _docs(n: int) -> list[str]:
    return [f"document {i}: " + WORDS * 8 for i in range(n)]


def _write(path, kind: str, docs: list[str], column: str = "text"):
    if kind == "jsonl":
        path.write_text("\n".join(json.dumps({column: d, "id": i}) for i, d in enumerate(docs)))
    elif kind == "json":
        path.write_text(json.dumps([{column: d} for d in docs]))
    elif kind == "csv":
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[column, "id"])
            w.writeheader()
            w.writerows({column: d, "id": i} for i, d in enumerate(docs))
    elif kind == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({column: docs, "id": list(range(len(docs)))}), path)
    elif kind == "txt":
        path.write_text("\n\n".join(docs))
    return path


@pytest.mark.parametrize("kind", ["jsonl", "json", "csv", "parquet", "txt"])
def test_each_local_file_kind_gives_the_same_windows(kind, smollm2_tokenizer, fresh_cache, tmp_path):
    docs = _docs(12)
    ref = calib.load_calib(smollm2_tokenizer, source=str(_write(tmp_path / "a.jsonl", "jsonl", docs)),
                           n_samples=3, seq_len=32, seed=5)
    ids = calib.load_calib(smollm2_tokenizer, source=str(_write(tmp_path / f"b.{kind}", kind, docs)),
                           n_samples=3, seq_len=32, seed=5)
    assert torch.equal(ids, ref)  # same documents, same seeded order, whatever the container


def test_a_window_per_document_in_seeded_order(smollm2_tokenizer, fresh_cache, tmp_path):
    docs = _docs(10)
    src = _write(tmp_path / "d.jsonl", "jsonl", docs)
    ids = calib.load_calib(smollm2_tokenizer, source=str(src), n_samples=3, seq_len=16, seed=2)
    import random

    order = list(range(10))
    random.Random(2).shuffle(order)
    expected = []
    for i in order[:3]:  # each document contributes its first 16 tokens, then EOS
        expected += smollm2_tokenizer(docs[i], add_special_tokens=False)["input_ids"][:16]
        expected.append(smollm2_tokenizer.eos_token_id)
    assert ids.flatten().tolist() == expected[:48]


def test_reads_only_the_documents_it_needs(smollm2_tokenizer, fresh_cache, tmp_path, monkeypatch):
    src = _write(tmp_path / "d.jsonl", "jsonl", _docs(200))
    seen = []
    real = calib._doc_ids
    monkeypatch.setattr(calib, "_doc_ids", lambda tok, doc, cap: seen.append(doc) or real(tok, doc, cap))
    calib.load_calib(smollm2_tokenizer, source=str(src), n_samples=4, seq_len=32)
    assert len(seen) <= 5  # 4 windows of 32 from documents of ~100 tokens each: 4 or 5 tokenized, not 200


def test_custom_column_and_missing_column_error(smollm2_tokenizer, fresh_cache, tmp_path):
    src = _write(tmp_path / "d.csv", "csv", _docs(6), column="body")
    assert calib.load_calib(smollm2_tokenizer, source=str(src), column="body", n_samples=2, seq_len=16).shape == (2, 16)
    with pytest.raises(CalibrationError) as e:
        calib.load_calib(smollm2_tokenizer, source=str(src), n_samples=2, seq_len=16)
    assert str(e.value) == f"{src}:2: no column 'text'; columns: body, id"


def test_parquet_missing_column_names_the_columns(smollm2_tokenizer, fresh_cache, tmp_path):
    src = _write(tmp_path / "d.parquet", "parquet", _docs(3), column="body")
    with pytest.raises(CalibrationError, match=r"d\.parquet: no column 'text'; columns: body, id$"):
        calib.load_calib(smollm2_tokenizer, source=str(src), n_samples=1, seq_len=16)


def test_chat_template_renders_a_messages_column(smollm2_tokenizer, fresh_cache, tmp_path):
    assert smollm2_tokenizer.chat_template  # SmolLM2's tokenizer ships one
    convo = [{"role": "user", "content": "What is two plus two? " * 4},
             {"role": "assistant", "content": "Four. " * 8}]
    src = tmp_path / "chat.jsonl"
    src.write_text("\n".join(json.dumps({"messages": convo}) for _ in range(4)))
    ids = calib.load_calib(smollm2_tokenizer, source=str(src), chat_template=True, n_samples=2, seq_len=16)
    rendered = smollm2_tokenizer.apply_chat_template(convo, tokenize=False)
    assert ids[0].tolist() == smollm2_tokenizer(rendered, add_special_tokens=False)["input_ids"][:16]


def test_chat_template_on_plain_text_is_a_one_line_error(smollm2_tokenizer, fresh_cache, tmp_path):
    src = _write(tmp_path / "d.jsonl", "jsonl", _docs(3), column="messages")
    with pytest.raises(CalibrationError, match=r"column 'messages' is not a list of chat messages"):
        calib.load_calib(smollm2_tokenizer, source=str(src), chat_template=True, n_samples=1, seq_len=16)


def test_cache_key_follows_file_stat_not_a_read(smollm2_tokenizer, fresh_cache, tmp_path, monkeypatch):
    src = _write(tmp_path / "d.jsonl", "jsonl", _docs(6))
    a = calib.load_calib(smollm2_tokenizer, source=str(src), n_samples=2, seq_len=16)
    from quantkit.calib_sources import LocalSource

    monkeypatch.setattr(LocalSource, "_rows", lambda self: pytest.fail("a cache hit must not read the file"))
    assert torch.equal(calib.load_calib(smollm2_tokenizer, source=str(src), n_samples=2, seq_len=16), a)
    monkeypatch.undo()
    _write(src, "jsonl", [d.replace("document", "page") for d in _docs(6)])  # edited: new size
    b = calib.load_calib(smollm2_tokenizer, source=str(src), n_samples=2, seq_len=16)
    assert not torch.equal(a, b)


def test_dataset_folder_streams_through_datasets(smollm2_tokenizer, fresh_cache, tmp_path):
    folder = tmp_path / "my-dataset"
    folder.mkdir()
    docs = _docs(30)
    _write(folder / "train.jsonl", "jsonl", docs)
    ids = calib.load_calib(smollm2_tokenizer, source=str(folder), n_samples=3, seq_len=16, seed=1)
    assert ids.shape == (3, 16)
    firsts = {tuple(smollm2_tokenizer(d, add_special_tokens=False)["input_ids"][:16]) for d in docs}
    assert tuple(ids[0].tolist()) in firsts  # a window is the start of one of the documents
    with pytest.raises(CalibrationError, match=r"no column 'body'; columns: text, id"):
        calib.load_calib(smollm2_tokenizer, source=str(folder), column="body", n_samples=1, seq_len=16)
