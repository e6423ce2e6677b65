"""`quantkit verify --source S --eval-windows N`: perplexity and KL of the checkpoint against its
source on N held-out windows, reported in info and JSON; above the documented KL threshold a
warning, never an error."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from typer.testing import CliRunner

from quantkit.api import apply
from quantkit.cli import app
from quantkit.recipe import load_recipe
from quantkit.verify import VerifyInputError, eval_checks, verify_checkpoint
from tests.verify.factory import edit_tensors

SMALL = ["calib.n_samples=2", "calib.seq_len=32", "calib.batch_size=2", "eval.enabled=false"]


@pytest.fixture(scope="module")
def int8_ckpt(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "q"
    apply(load_recipe("int8-w8a16", overrides=SMALL), str(tiny_llama_dir), output=out)
    return out


def _independent_kl_and_ppl(ckpt, src, windows):
    """The same quantities from quantkit.eval's own functions, both models loaded side by side."""
    from transformers import AutoModelForCausalLM

    from quantkit.eval import mean_kl, nll_sum

    ref = AutoModelForCausalLM.from_pretrained(src, dtype="auto").eval()
    q = AutoModelForCausalLM.from_pretrained(ckpt, dtype="auto").eval()
    kl = mean_kl(q, ref, [windows[i : i + 1] for i in range(windows.shape[0])])
    with torch.inference_mode():
        nll = sum(nll_sum(q(input_ids=windows[i : i + 1]).logits.float(), windows[i : i + 1])
                  for i in range(windows.shape[0]))
    return kl, math.exp(nll / windows[:, 1:].numel())


def test_eval_windows_report_perplexity_and_kl(int8_ckpt, tiny_llama_dir):
    r = verify_checkpoint(int8_ckpt, source=str(tiny_llama_dir), eval_windows=2)
    assert r.ok and not [w for w in r.warnings if w.check.startswith("eval")]
    ev = r.info["eval"]
    assert ev["windows"] == 2 and ev["seq_len"] == 256  # the tiny model's context is 256 tokens
    assert ev["kl_warn"] == eval_checks.KL_WARN
    from quantkit.eval import eval_windows
    from quantkit.models import load_model

    model, tok = load_model(str(tiny_llama_dir))
    windows = eval_windows(model, tok, seq_len=256, max_windows=2)
    kl, ppl = _independent_kl_and_ppl(int8_ckpt, tiny_llama_dir, windows)
    assert ev["kl"] == pytest.approx(kl, rel=1e-4, abs=1e-7) and 0 < ev["kl"] < eval_checks.KL_WARN
    assert ev["ppl_checkpoint"] == pytest.approx(ppl, rel=1e-5)
    assert ev["ppl_increase_pct"] == pytest.approx(100 * (ev["ppl_checkpoint"] / ev["ppl_source"] - 1))


def test_a_broken_scale_raises_kl_and_warns_without_failing(int8_ckpt, tiny_llama_dir, tmp_path, monkeypatch):
    clean = verify_checkpoint(int8_ckpt, source=str(tiny_llama_dir), eval_windows=1, run=False).info["eval"]["kl"]
    broken = tmp_path / "broken"
    shutil.copytree(int8_ckpt, broken)

    def scale_up(t):
        for name in [n for n in t if n.endswith("mlp.down_proj.weight_scale")]:
            t[name] = t[name] * 64

    edit_tensors(broken, scale_up)
    # the tiny random model's logits are nearly flat, so its KLs are far below the real-model
    # threshold; place the threshold between the clean and the broken checkpoint's KL
    r0 = verify_checkpoint(broken, source=str(tiny_llama_dir), eval_windows=1, run=False)
    bad = r0.info["eval"]["kl"]
    assert bad > 20 * clean
    monkeypatch.setattr(eval_checks, "KL_WARN", math.sqrt(clean * bad))
    r = verify_checkpoint(broken, source=str(tiny_llama_dir), eval_windows=1, run=False)
    assert [w.check for w in r.warnings if w.check.startswith("eval")] == ["eval.kl"]
    assert not [e for e in r.errors if e.check.startswith("eval")]
    clean_r = verify_checkpoint(int8_ckpt, source=str(tiny_llama_dir), eval_windows=1, run=False)
    assert not [w for w in clean_r.warnings if w.check.startswith("eval")]


def test_eval_windows_need_a_source(int8_ckpt):
    with pytest.raises(VerifyInputError, match="--eval-windows compares against the source model"):
        verify_checkpoint(int8_ckpt, eval_windows=2)
    result = CliRunner().invoke(app, ["verify", str(int8_ckpt), "--eval-windows", "2"])
    assert result.exit_code == 2


def test_cli_json_carries_the_eval_numbers(int8_ckpt, tiny_llama_dir):
    result = CliRunner().invoke(app, ["verify", str(int8_ckpt), "--source", str(tiny_llama_dir),
                                      "--eval-windows", "1", "--json"])
    assert result.exit_code == 0, result.stderr
    ev = json.loads(result.stdout)["report"]["info"]["eval"]
    assert ev["windows"] == 1 and ev["kl"] >= 0
    assert "held-out windows of 256 tokens: perplexity" in result.stderr


def test_each_model_loads_once_and_never_beside_the_other(int8_ckpt, tiny_llama_dir, monkeypatch):
    """--source with --eval-windows: the source and the checkpoint are each loaded by transformers
    once (the layer comparison reads the source directory's tensors on demand, the evaluation and
    the run checks share one load of the checkpoint), and the source is gone when the checkpoint loads."""
    import gc
    import weakref

    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained
    loads: list[str] = []
    alive: list[weakref.ref] = []

    def counting(path, *args, **kwargs):
        gc.collect()
        loads.append(str(path))
        if str(path) == str(int8_ckpt):
            assert not [r for r in alive if r() is not None], "the source is still in memory"
        model = original(path, *args, **kwargs)
        if str(path) == str(tiny_llama_dir):
            alive.append(weakref.ref(model))
        return model

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", counting)
    r = verify_checkpoint(int8_ckpt, source=str(tiny_llama_dir), eval_windows=1)
    assert r.ok and r.info["eval"]["windows"] == 1 and "runtime_kl" in r.info["run"] and r.info["source"]["layers"]
    assert sorted(loads) == sorted([str(tiny_llama_dir), str(int8_ckpt)])
