"""bench/bench_fp4_quality.py: llm-compressor rows join a merged table only when they scored the same
held-out windows (the bf16 rows' per-window NLLs agree to PEER_WINDOW_TOL), and --heldout-every is checked."""

import json

import pytest

import bench.bench_fp4_quality as bq


def _results(tmp_path, monkeypatch, their_bf16: list[float]) -> None:
    monkeypatch.setattr(bq, "RESULTS", tmp_path)
    rows = [{"config": "bf16", "tool": "quantkit", "heldout_nll": their_bf16},
            {"config": "llmc:NVFP4A16:rtn", "tool": "llm-compressor", "heldout_nll": [2.9, 3.1],
             "dev_nll": [3.0], "dev_ppl": 20.0, "dev_delta": 1.0, "heldout_ppl": 20.0}]
    (tmp_path / "peers.json").write_text(json.dumps({"rows": rows}))


def test_same_windows_in_another_process_join_without_their_dev_columns(tmp_path, monkeypatch):
    _results(tmp_path, monkeypatch, [2.5415585041046143, 3.0001845359802246])
    mine = [{"config": "bf16", "heldout_nll": [2.5415587425231934, 3.0001847743988037]}]  # last-bit differences
    joined = bq.peer_rows_from("peers", mine)
    assert [r["config"] for r in joined] == ["llmc:NVFP4A16:rtn"]
    assert not {"dev_nll", "dev_ppl", "dev_delta"} & set(joined[0])
    assert joined[0]["heldout_nll"] == [2.9, 3.1] and joined[0]["part"] == "peers, held-out only"


@pytest.mark.parametrize("theirs", [[2.5415585, 3.0101845], [2.5415585]])  # another window; fewer windows
def test_other_windows_are_refused(tmp_path, monkeypatch, theirs):
    _results(tmp_path, monkeypatch, theirs)
    with pytest.raises(SystemExit, match="held-out windows differ"):
        bq.peer_rows_from("peers", [{"config": "bf16", "heldout_nll": [2.5415585, 3.0001845]}])


def test_heldout_every_below_one_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as e:
        bq.main(["--heldout-every", "0", "--configs", ""])
    assert e.value.code == 2 and "--heldout-every must be at least 1" in capsys.readouterr().err


def test_config_lists_split_on_commas_outside_brackets():
    text = "bf16,recipe:mxfp4-w4a16-best+passes.1.targets.roles=[q,k,v]+passes.3.refine_sweeps=0,nvfp4a16:minmax:none"
    assert bq.split_specs(text) == ["bf16", "recipe:mxfp4-w4a16-best+passes.1.targets.roles=[q,k,v]+passes.3.refine_sweeps=0",
                                    "nvfp4a16:minmax:none"]
    assert bq.split_specs("") == [] and bq.split_specs("a,,b") == ["a", "b"]
    name, sets, _ = bq.parse_recipe_spec(bq.split_specs(text)[1])
    assert sets == ["passes.1.targets.roles=[q,k,v]", "passes.3.refine_sweeps=0"]


def test_recipe_rows_parse_overrides_and_drops_and_refuse_a_pass_the_recipe_lacks():
    assert bq.parse_recipe_spec("recipe:nvfp4-w4a16-best+passes.3.refine_sweeps=3+drop=awq") == (
        "nvfp4-w4a16-best", ["passes.3.refine_sweeps=3"], ["awq"])
    assert bq.parse_recipe_spec("recipe:nvfp4-w4a16") == ("nvfp4-w4a16", [], [])
    with pytest.raises(ValueError, match="expected recipe:NAME"):
        bq.parse_recipe_spec("recipe:nvfp4-w4a16+refine_sweeps")
    with pytest.raises(ValueError, match="no pass 'awq' to drop"):  # before any model is loaded
        bq.run_recipe("recipe:nvfp4-w4a16+drop=awq", None, None, None)


def test_session_15_recipe_rows_build_the_recipes_the_protocol_names(monkeypatch):
    """Every recipe row of fp4_quality_s15 builds (the candidate file, the overrides' pass indices); the AWQ
    candidates put awq on every role in front of the rotation, and the sweeps land on the gptq pass."""
    from bench.run_all import JOBS

    monkeypatch.chdir(bq.ROOT)  # the candidate's path is relative to the repository root, where the bench runs
    rows = [c for _m, argv in JOBS["fp4_quality_s15"] if "--configs" in argv
            for c in bq.split_specs(argv[argv.index("--configs") + 1]) if c.startswith("recipe:")]
    built = {r: bq.recipe_of(r) for r in rows}
    sweeps = {r: next(p for p in rec.passes if p.name == "gptq").refine_sweeps for r, rec in built.items()}
    awq = {r: [p for p in rec.passes if p.name == "awq"] for r, rec in built.items()}
    assert sorted(sweeps.values()) == [2, 3, 3, 5]
    for r in rows:
        names = [p.name for p in built[r].passes]
        if "best-awq" in r:
            assert names == ["calibrate", "awq", "rotate", "gptq"] and awq[r][0].targets.roles == []  # every role
            assert awq[r][0].rotation == 64
        else:
            assert names == ["calibrate", "rotate", "gptq"]
    # the job chose the AWQ candidate with 3 sweeps: the shipped recipe runs exactly those passes
    chosen = next(rec for r, rec in built.items() if "best-awq" in r and sweeps[r] == 3)
    shipped = bq.recipe_of("recipe:mxfp4-w4a16-best")
    assert [p.model_dump() for p in shipped.passes] == [p.model_dump() for p in chosen.passes]
    assert shipped.calib == chosen.calib
