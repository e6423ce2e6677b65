"""The wheel carries recipes, calibration data and the optimum-cli registration, and an installed
wheel works from any directory; the CLI starts without library noise on stderr.

The wheel is built from a copy of the source (building writes egg-info and build/ next to the
sources). The fresh environment is a new virtual environment with only the quantkit wheel (and
a copy of optimum) installed; the heavy dependencies (torch, transformers) come from this
test's environment through a .pth line, so nothing is downloaded.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from quantkit.cli_common import PROGRESS_PREFIX

ROOT = Path(__file__).resolve().parent.parent
SOURCES = ["pyproject.toml", "setup.py", "README.md", "quantkit", "recipes", "calib_data"]
FAST = ["--set", "calib.n_samples=2", "--set", "calib.seq_len=32", "--set", "eval.max_windows=2",
        "--set", "eval.seq_len=32", "--set", "eval.kl_samples=2"]


def _run(cmd, cwd, env=None, check=True):
    res = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if check:
        assert res.returncode == 0, (cmd, res.stdout[-2000:], res.stderr[-4000:])
    return res


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    src = tmp_path_factory.mktemp("src")
    for name in SOURCES:
        if (ROOT / name).is_dir():
            shutil.copytree(ROOT / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(ROOT / name, src / name)
    dist = tmp_path_factory.mktemp("dist")
    _run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", dist, src], cwd=src)
    (whl,) = dist.glob("quantkit-*.whl")
    return whl


@pytest.fixture(scope="module")
def fresh_env(tmp_path_factory, wheel) -> tuple[Path, dict]:
    """A new venv holding the installed wheel and optimum; returns (bin dir, env)."""
    venv = tmp_path_factory.mktemp("venv")
    _run([sys.executable, "-m", "venv", "--without-pip", "--clear", venv], cwd=venv)
    (site,) = venv.glob("lib/python3*/site-packages")
    here = Path(sysconfig.get_paths()["purelib"])
    # optimum itself is copied in (the registration file must land inside its package folder)
    for name in ("optimum", f"optimum-{_version('optimum')}.dist-info"):
        shutil.copytree(here / name, site / name, ignore=shutil.ignore_patterns("__pycache__"))
    (site / "zz_deps.pth").write_text(str(here) + "\n")  # torch, transformers, ...: after site-packages
    _run([sys.executable, "-m", "pip", "--python", venv / "bin" / "python", "install", "-q", "--no-deps",
          "--no-index", wheel], cwd=venv)
    launcher = venv / "bin" / "optimum-cli"  # what pip writes for optimum's console script
    launcher.write_text(f"#!{venv / 'bin' / 'python'}\nimport sys\nfrom optimum.commands.optimum_cli import main\n"
                        "sys.exit(main())\n")
    launcher.chmod(0o755)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env.update(HF_HUB_OFFLINE="1", COLUMNS="200", QUANTKIT_CACHE=str(tmp_path_factory.mktemp("cache")))
    return venv / "bin", env


def _version(dist: str) -> str:
    from importlib.metadata import version

    return version(dist)


def test_wheel_holds_recipes_calibration_data_and_optimum_registration(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (ROOT / "recipes").glob("*.yaml"):
        assert f"quantkit/recipes/{recipe.name}" in names, recipe.name
    for data in ("wiki_calib.jsonl", "wiki_eval.jsonl", "README.md"):
        assert f"quantkit/calib_data/{data}" in names, data
    assert "optimum/commands/register/quantkit.py" in names
    assert "quantkit/calib_data/build.py" not in names  # the data ships, not the script that built it
    assert not any(n.startswith(("tests/", "bench/", "recipes/", "calib_data/")) for n in names)
    # the optimum namespace must stay a namespace: an __init__.py would shadow optimum itself
    assert not any(n.startswith("optimum/") and n.endswith("__init__.py") for n in names)


def test_installed_wheel_lists_recipes_from_any_directory(fresh_env, tmp_path):
    bin_dir, env = fresh_env
    res = _run([bin_dir / "quantkit", "recipes", "--json"], cwd=tmp_path, env=env)
    import json

    rows = json.loads(res.stdout)["report"]
    assert sorted(r["name"] for r in rows) == sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
    assert all(r["description"] for r in rows)
    where = _run([bin_dir / "python", "-c", "from quantkit.paths import calib_data_dir, recipes_dir;"
                  "print(recipes_dir()); print(calib_data_dir())"], cwd=tmp_path, env=env).stdout.split()
    assert all(str(bin_dir.parent) in w for w in where), where  # package data, not the repository


def test_installed_wheel_applies_a_shipped_recipe_with_shipped_data(fresh_env, tmp_path, tiny_llama_dir):
    bin_dir, env = fresh_env
    out = tmp_path / "out"
    _run([bin_dir / "quantkit", "apply", "int8-w8a8", tiny_llama_dir, "-o", out, *FAST], cwd=tmp_path, env=env)
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()


def test_optimum_cli_runs_quantkit_commands(fresh_env, tmp_path, tiny_llama_dir):
    bin_dir, env = fresh_env
    listed = _run([bin_dir / "optimum-cli", "--help"], cwd=tmp_path, env=env).stdout
    assert "quantkit" in listed
    for command in ("apply", "eval", "sensitivity", "validate"):
        helped = _run([bin_dir / "optimum-cli", "quantkit", command, "--help"], cwd=tmp_path, env=env).stdout
        assert "optimum-cli quantkit " + command in helped
    out = tmp_path / "out"
    _run([bin_dir / "optimum-cli", "quantkit", "apply", "int8-w8a8", tiny_llama_dir, "-o", out, "--no-eval",
          *FAST], cwd=tmp_path, env=env)
    assert (out / "config.json").exists()
    bad = _run([bin_dir / "optimum-cli", "quantkit", "apply", tmp_path / "none.yaml", tiny_llama_dir],
               cwd=tmp_path, env=env, check=False)
    assert bad.returncode == 2
    assert bad.stderr.strip() == f"error: recipe file {tmp_path / 'none.yaml'} does not exist"


# --- a quiet start (this environment, as a user runs it) ---


def _cli(*args, cwd, env_extra=None):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "COLUMNS": "200", **(env_extra or {})}
    return _run([sys.executable, "-m", "quantkit.cli", *args], cwd=cwd, env=env)


@pytest.mark.parametrize("args", [["--help"], ["recipes"], ["formats"], ["apply", "--help"]])
def test_listing_and_help_print_nothing_on_stderr(args, tmp_path):
    assert _cli(*args, cwd=tmp_path).stderr == ""


def _without_summary_table(lines: list[str]) -> list[str]:
    """Drop apply's rich summary table: its (possibly wrapped) title, then box-drawn rows."""
    start = next(i for i, line in enumerate(lines) if line.strip().startswith("quantkit apply:"))
    top = next(i for i, line in enumerate(lines) if line.startswith("┏"))
    end = next(i for i, line in enumerate(lines) if line.startswith("└"))
    assert all(line.startswith(" ") for line in lines[start + 1 : top]), lines[start:top]  # wrapped title
    assert all(line[:1] in set("┃┡│") for line in lines[top + 1 : end]), lines[top:end]
    return lines[:start] + lines[end + 1 :]


def test_apply_stderr_holds_only_quantkit_lines(tmp_path, tiny_llama_dir):
    out = tmp_path / "out"
    res = _cli("apply", "int8-w8a8", tiny_llama_dir, "-o", out, *FAST, cwd=tmp_path)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    foreign = [line for line in _without_summary_table(lines)
               if not (line.startswith(PROGRESS_PREFIX) or line == f"wrote {out}")]
    assert foreign == [], res.stderr
    assert any(line.startswith(PROGRESS_PREFIX) for line in lines)  # stderr is a pipe: plain progress lines
    assert res.stdout == ""  # without --json nothing goes to stdout


def test_verify_stderr_has_no_library_progress_bars(tmp_path, tiny_llama_dir):
    # verify loads the checkpoint in transformers, where compressed-tensors draws its own tqdm bars
    out = tmp_path / "out"
    _cli("apply", "nvfp4-w4a16", tiny_llama_dir, "-o", out, "--no-eval", *FAST, cwd=tmp_path)
    res = _cli("verify", out, cwd=tmp_path)
    assert "it/s]" not in res.stderr and "ompressing model" not in res.stderr, res.stderr
    assert res.stderr.splitlines()[-1].startswith("ok "), res.stderr
