"""`make bench` regenerates every committed results file: each one belongs to a job of bench/run_all.py."""

from __future__ import annotations

from pathlib import Path

from bench.run_all import _S4_PARTS, JOBS, main

ROOT = Path(__file__).resolve().parent.parent


def test_every_results_file_has_a_job():
    stems = {p.stem for p in (ROOT / "bench" / "results").glob("*.json")}
    orphans = sorted(stems - set(JOBS) - set(_S4_PARTS))
    assert orphans == [], f"results files no `make bench` job writes: {orphans}"


def test_every_job_runs_an_existing_bench():
    for job, steps in JOBS.items():
        for module, argv in steps:
            assert (ROOT / "bench" / f"{module}.py").is_file(), (job, module)
            assert all(isinstance(a, str) for a in argv), (job, argv)


def test_unknown_job_is_refused(capsys):
    assert main(["no_such_job"]) == 2
    assert "unknown bench job" in capsys.readouterr().err
