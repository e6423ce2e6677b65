"""Sections a bench invocation skipped keep their last measured rows, and say which run measured them.

A bench with independent sections (`--skip-latency`, `--skip-ppl`, ...) rewrites its whole results
file on every invocation. A skipped section's rows are copied from the previous file, with the run
that measured them in `section_runs` (commit, command, load), so that the file never shows rows
under a header of a run that did not measure them.
"""

from __future__ import annotations

import json
from pathlib import Path

UNKNOWN_RUN = {"commit": "unknown", "command": "unknown: written before results recorded their provenance"}


def run_record(prov: dict, loadavg_end) -> dict:
    """Which run measured a section: from a bench's provenance dict (bench/provenance.py's shape)."""
    return {"commit": prov["commit"], "command": prov["command"], "loadavg_start": prov["machine"]["loadavg_start"],
            "loadavg_end": loadavg_end}


def carry_sections(result: dict, previous: Path, sections: dict[str, tuple[str, ...]], this_run: dict) -> dict | None:
    """Fill result["section_runs"]: `this_run` for each section in `result`; each section it lacks
    comes from the results file `previous`, with the run that measured it and the section's own
    settings keys (sections: name -> settings, e.g. "latency": ("threads", "reps")).
    -> the previous results, or None when there is no previous file."""
    result["section_runs"] = {k: this_run for k in sections if k in result}
    if not previous.exists():
        return None
    old = json.loads(previous.read_text())
    for key, settings in sections.items():
        if key in result or key not in old:
            continue
        result[key] = old[key]
        result["section_runs"][key] = old.get("section_runs", {}).get(key) or _old_run(old)
        for s in settings:
            result[s] = old.get(s)
    return old


def _old_run(old: dict) -> dict:
    """A file from before it recorded section_runs: its own provenance, if it has one."""
    if "provenance" in old:
        return run_record(old["provenance"], old.get("loadavg_end"))
    return {**UNKNOWN_RUN, "machine": old.get("machine")}
