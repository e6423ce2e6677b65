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
    monkeypatch.setattr(calib, "read_texts", lambda *a, **k: pytest.fail("cache not used"))
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
