"""`make bench` regenerates every committed results file: each one belongs to a job of bench/run_all.py."""

from __future__ import annotations

from pathlib import Path

from bench.run_all import JOBS, main

ROOT = Path(__file__).resolve().parent.parent


def _written_by_jobs() -> set[str]:
    """A job writes the file named after it, and every step's `--name` file (a part of a merge)."""
    names = set(JOBS)
    for steps in JOBS.values():
        names |= {argv[argv.index("--name") + 1] for _, argv in steps if "--name" in argv}
    return names


def test_every_results_file_has_a_job():
    stems = {p.stem for p in (ROOT / "bench" / "results").glob("*.json")}
    orphans = sorted(stems - _written_by_jobs())
    assert orphans == [], f"results files no `make bench` job writes: {orphans}"


def test_every_job_runs_an_existing_bench():
    for job, steps in JOBS.items():
        for module, argv in steps:
            assert (ROOT / "bench" / f"{module}.py").is_file(), (job, module)
            assert all(isinstance(a, str) for a in argv), (job, argv)


def test_unknown_job_is_refused(capsys):
    assert main(["no_such_job"]) == 2
    assert "unknown bench job" in capsys.readouterr().err
