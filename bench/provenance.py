"""What every results file records: commit, exact command, package versions, machine load."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("quantkit", "torch", "transformers", "compressed-tensors", "accelerate", "safetensors")


def _version(pkg: str) -> str | None:
    try:
        return metadata.version(pkg)
    except metadata.PackageNotFoundError:
        return None


# what counts as a code change: results files and the git-ignored work folder (a symlink in a bench
# worktree) are what benches write, so they do not make a run "uncommitted"
CODE_PATHS = ("quantkit", "bench", ":!bench/results", ":!bench/work")


def _git(*args: str) -> str:
    return subprocess.run(["git", *args], capture_output=True, text=True, cwd=ROOT).stdout.strip()


def code_is_dirty() -> bool:
    return bool(_git("status", "--porcelain", "--", *CODE_PATHS))


def provenance(script: str, argv: list[str]) -> dict:
    return {
        "commit": _git("rev-parse", "HEAD"),
        "uncommitted_changes": code_is_dirty(),
        "command": " ".join([Path(sys.executable).name, script, *argv]),
        "versions": {p: _version(p) for p in PACKAGES},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "loadavg_start": os.getloadavg()},
    }


def provenance_markdown(p: dict, loadavg_end) -> list[str]:
    return [f"Commit `{p['commit'][:12]}`{' (with uncommitted changes)' if p['uncommitted_changes'] else ''}; "
            f"command `{p['command']}`.  ",
            f"Machine: {p['machine']['cpus']} CPUs, load average {p['machine']['loadavg_start'][0]:.1f} at start, "
            f"{loadavg_end[0]:.1f} at end.  ",
            "Versions: " + ", ".join(f"{k} {v}" for k, v in p["versions"].items() if v) + ".", ""]
