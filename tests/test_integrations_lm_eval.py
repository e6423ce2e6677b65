"""`quantkit eval --tasks` through lm-evaluation-harness, offline, on a task defined here.

The task is multiple choice where one answer is one word and the other a long sentence: a
model's summed log-likelihood of ~12 tokens is far below that of one token, so the model picks
the short answer and the accuracy is known by hand: the fraction of documents whose label is
the short answer.
"""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from quantkit.cli import app

pytest.importorskip("lm_eval")

LONG = "and then the very long answer goes on and on for many more words"
N_DOCS = 6


def _labels() -> list[int]:
    return [1 if i % 3 == 0 else 0 for i in range(N_DOCS)]  # 1 = the long answer (docs 0 and 3)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tasks")
    rows = [{"question": f"Question {i}: pick one.", "choices": ["yes", LONG], "label": lab}
            for i, lab in enumerate(_labels())]
    (d / "toy.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (d / "qk_toy.yaml").write_text(
        "task: qk_toy\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {d / 'toy.jsonl'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n"
    )
    return d


def _eval(*args):
    res = CliRunner().invoke(app, ["eval", *map(str, args), "--json"])
    data = json.loads(res.stdout)
    assert res.exit_code == 0 and data["ok"], (res.stdout, res.stderr)
    return data["report"]


def _hand_count(n: int) -> float:
    labels = _labels()[:n]
    return sum(lab == 0 for lab in labels) / len(labels)  # right exactly when the label is the short answer


def test_local_task_score_matches_the_hand_count(tiny_llama_dir, task_dir):
    report = _eval(tiny_llama_dir, "--tasks", "qk_toy", "--task-dir", task_dir)
    assert report["results"]["qk_toy"]["acc"] == pytest.approx(_hand_count(N_DOCS))  # 4/6
    assert report["n_samples"]["qk_toy"]["effective"] == N_DOCS


def test_limit_and_quantkit_runtime_on_a_quantized_checkpoint(tiny_llama_dir, task_dir, tmp_path):
    out = tmp_path / "q"
    res = CliRunner().invoke(app, ["apply", "int8-w8a8", str(tiny_llama_dir), "-o", str(out), "--no-eval",
                                   "--set", "calib.n_samples=2", "--set", "calib.seq_len=32"])
    assert res.exit_code == 0, res.stderr
    report = _eval(out, "--runtime", "quantkit", "--tasks", "qk_toy", "--task-dir", task_dir, "--limit", "3")
    assert report["runtime"] == "quantkit" and report["n_samples"]["qk_toy"]["effective"] == 3
    assert report["results"]["qk_toy"]["acc"] == pytest.approx(_hand_count(3))  # 2/3


@pytest.mark.slow  # a name not in --task-dir is looked up in lm-eval's ~15k built-in tasks (~40 s here)
def test_unknown_task_is_a_one_line_error(tiny_llama_dir, task_dir):
    res = CliRunner().invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "qk_nope", "--task-dir", str(task_dir)])
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1] == "error: unknown lm-eval task 'qk_nope'"


def test_missing_task_dir_is_a_one_line_error(tiny_llama_dir, tmp_path):
    res = CliRunner().invoke(app, ["eval", str(tiny_llama_dir), "--tasks", "x", "--task-dir", str(tmp_path / "no")])
    assert res.exit_code == 2
    assert res.stderr.strip() == f"error: --task-dir {tmp_path / 'no'} is not a folder of task YAML files"
