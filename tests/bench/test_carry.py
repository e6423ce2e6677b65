"""bench/carry.py: a skipped section keeps the previous results' rows, the run that measured them
and its settings; a measured one is this run's."""

import json

from bench.carry import UNKNOWN_RUN, carry_sections, run_record

PROV = {"commit": "new", "command": "bench --skip-b", "machine": {"loadavg_start": [1.0, 1.0, 1.0]}}
SECTIONS = {"a": ("threads",), "b": ("windows",)}


def test_a_skipped_section_keeps_its_rows_run_and_settings(tmp_path):
    old_run = {"commit": "old", "command": "bench", "loadavg_start": [9.0], "loadavg_end": [8.0]}
    prev = tmp_path / "r.json"
    prev.write_text(json.dumps({"a": ["old a"], "b": ["old b"], "threads": 4, "windows": 32,
                                "section_runs": {"a": old_run, "b": old_run}}))
    this = run_record(PROV, [2.0])
    result = {"a": ["new a"], "threads": 1, "windows": 16}
    assert carry_sections(result, prev, SECTIONS, this)["a"] == ["old a"]
    assert result["a"] == ["new a"] and result["threads"] == 1  # measured now: untouched
    assert result["b"] == ["old b"] and result["windows"] == 32  # skipped: the previous rows and settings
    assert result["section_runs"] == {"a": this, "b": old_run}
    assert this == {"commit": "new", "command": "bench --skip-b", "loadavg_start": [1.0, 1.0, 1.0], "loadavg_end": [2.0]}


def test_a_previous_file_without_section_runs_names_its_own_provenance_or_unknown(tmp_path):
    prev = tmp_path / "r.json"
    prev.write_text(json.dumps({"b": ["old b"], "provenance": {**PROV, "commit": "older"}, "loadavg_end": [3.0]}))
    result: dict = {}
    carry_sections(result, prev, SECTIONS, run_record(PROV, [2.0]))
    assert result["section_runs"] == {"b": run_record({**PROV, "commit": "older"}, [3.0])}
    prev.write_text(json.dumps({"b": ["old b"], "machine": "x86_64"}))
    result = {}
    carry_sections(result, prev, SECTIONS, run_record(PROV, [2.0]))
    assert result["section_runs"] == {"b": {**UNKNOWN_RUN, "machine": "x86_64"}}


def test_no_previous_file_carries_nothing(tmp_path):
    result = {"a": [1]}
    assert carry_sections(result, tmp_path / "missing.json", SECTIONS, {"commit": "c"}) is None
    assert result == {"a": [1], "section_runs": {"a": {"commit": "c"}}}
