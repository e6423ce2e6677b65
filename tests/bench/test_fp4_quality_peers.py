"""bench/bench_fp4_quality.py: llm-compressor rows join a merged table only when they scored the same
held-out windows (the bf16 rows' per-window NLLs agree to PEER_WINDOW_TOL), and --heldout-every is checked."""

import json

import pytest
import torch

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


def test_calibration_orders_permute_the_same_windows_and_order_zero_keeps_them():
    calib = torch.arange(16 * 3).view(16, 3)
    assert torch.equal(bq.calib_in_order(calib, 0), calib)
    one, two = bq.calib_in_order(calib, 1), bq.calib_in_order(calib, 2)
    assert not torch.equal(one, calib) and not torch.equal(one, two)
    for p in (one, two):  # the same windows, each once
        assert sorted(map(tuple, p.tolist())) == sorted(map(tuple, calib.tolist()))
    assert torch.equal(bq.calib_in_order(calib, 1), one)  # seeded


def test_rows_of_each_calibration_order_are_compared_with_the_peer_of_that_order(tmp_path, monkeypatch):
    """Ratios pair a quantkit row with the llm-compressor row calibrated in the same order (not the luckiest
    order's), and the spread table gives each order's Δ and ratio with their mean, sd and range."""
    monkeypatch.setattr(bq, "RESULTS", tmp_path)
    nll = lambda d: [2.0 + d, 2.0 + d]  # noqa: E731  two windows, Δ in nats per window
    rows = [{"config": "bf16", "heldout_nll": nll(0.0), "heldout_ppl": bq.ppl_of(nll(0.0)), "dev_ppl": 20.0}]
    for order, (mine, theirs) in enumerate([(0.10, 0.20), (0.12, 0.12)]):
        rows.append({"config": "recipe:x", "tool": "quantkit", "recipe": "x", "overrides": [], "dropped": [],
                     "scheme": "mxfp4a16", "heldout_nll": nll(mine), "heldout_ppl": bq.ppl_of(nll(mine)),
                     "dev_ppl": 21.0 + order, **({"calib_order": order} if order else {})})
        rows.append({"config": "llmc:MXFP4A16:quip_gptq", "tool": "llm-compressor", "method": "quip_gptq",
                     "scheme": "mxfp4a16", "heldout_nll": nll(theirs), "heldout_ppl": bq.ppl_of(nll(theirs)),
                     **({"calib_order": order} if order else {})})
    env = {"commit": "c", "tree_dirty": False, "command": "x", "versions": {}, "machine": {"loadavg_start": 0, "cpus": 2}}
    bq.write({"model": "m", "eval": "e", "calib": "c", "environment": env, "rows": rows}, "t")
    base = bq.ppl_of(nll(0.0))
    delta = {d: bq.ppl_of(nll(d)) - base for d in (0.10, 0.12, 0.20)}
    ratios = [delta[0.10] / delta[0.20], delta[0.12] / delta[0.12]]
    text = (tmp_path / "t.md").read_text()
    spread = text[text.index("Calibration-order spread"):]
    line = next(ln for ln in spread.splitlines() if "÷ best llmc Δ" in ln)
    cells = [c.strip() for c in line.split("|")[3:-1]]
    assert cells[:2] == [f"{ratios[0]:.3f}", f"{ratios[1]:.3f}"] and ratios[1] == 1.0  # order 1 against order 1's peer
    mean = sum(ratios) / 2
    sd = ((ratios[0] - mean) ** 2 + (ratios[1] - mean) ** 2) ** 0.5  # n - 1 = 1
    assert cells[2:] == [f"{mean:.3f}", f"{sd:.3f}", f"{min(ratios):.3f}..{max(ratios):.3f}"]
    assert "[calibration order 1]" in text and "mxfp4a16 (calibration order 1): RTN" in text
    dev = next(ln for ln in spread.splitlines() if "dev Δ" in ln and "quantkit" in ln)
    assert [c.strip() for c in dev.split("|")[3:-1]] == ["+1.000", "+2.000", "+1.500", "0.707", "+1.000..+2.000"]


def test_session_16_order_job_names_four_orders_at_each_scheme_with_bf16_once():
    from bench.run_all import JOBS

    parts = [argv for _m, argv in JOBS["fp4_quality_order16"] if "--calib-order" in argv]
    orders = sorted((a[a.index("--peers") + 1], int(a[a.index("--calib-order") + 1])) for a in parts)
    assert orders == [("MXFP4A16:quip_gptq", k) for k in range(4)] + [("NVFP4A16:quip_gptq", k) for k in range(4)]
    assert sum("bf16" in bq.split_specs(a[a.index("--configs") + 1]) for a in parts) == 1
