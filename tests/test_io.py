"""Atomic output (quantkit.io): output-name checks, what --force may replace, kills mid-write."""

import os
import signal
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from quantkit.errors import OutputExistsError
from quantkit.io import MARKER, OutputPathError, atomic_dir, atomic_write_text, check_output, clean_stale


def _write(path: Path, force: bool = False, name: str = "a.txt", text: str = "new") -> None:
    with atomic_dir(path, force=force) as tmp:
        (tmp / name).write_text(text)


@pytest.mark.parametrize("name", [".", "..", "", "/", "sub/.."])
def test_bad_output_names_fail_before_any_work(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(OutputPathError, match="is not a directory name|working directory"):
        check_output(Path(name), force=True)


def test_working_directory_by_absolute_path_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(OutputPathError, match="working directory or one of its parents"):
        check_output(tmp_path, force=True)


def test_unwritable_parent_fails(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root writes anywhere")
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    with pytest.raises(OutputPathError, match="is not a writable directory"):
        check_output(ro / "out", force=False)


def test_existing_file_is_not_an_output_directory(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputPathError, match="exists and is a file"):
        check_output(tmp_path / "f", force=True)


def test_existing_output_needs_force(tmp_path):
    _write(tmp_path / "out")
    with pytest.raises(OutputExistsError, match="pass --force"):
        _write(tmp_path / "out")


def test_force_replaces_what_quantkit_wrote(tmp_path):
    out = tmp_path / "out"
    _write(out, text="old")
    assert (out / MARKER).is_file()
    _write(out, force=True, text="new")
    assert (out / "a.txt").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporaries left


def test_force_replaces_an_empty_directory(tmp_path):
    (tmp_path / "out").mkdir()
    _write(tmp_path / "out", force=True)
    assert (tmp_path / "out" / "a.txt").read_text() == "new"


def test_force_replaces_a_directory_holding_quantkits_report(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.json").write_text('{"model": "m", "recipe": "r"}')
    _write(out, force=True)
    assert not (out / "report.json").exists()


def test_force_refuses_a_directory_quantkit_did_not_write(tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    (home / "thesis.tex").write_text("years of work")
    with pytest.raises(OutputPathError, match="refusing to replace .*quantkit did not write it"):
        _write(home, force=True)
    assert (home / "thesis.tex").read_text() == "years of work"


def test_error_inside_the_block_leaves_nothing(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "a.txt").write_text("half")
        raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


_KILLED_WRITER = textwrap.dedent("""
    import os, signal, sys
    from pathlib import Path
    from quantkit.io import atomic_dir
    with atomic_dir(Path(sys.argv[1]), force=True) as tmp:
        (tmp / "a.txt").write_text("half-written")
        os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_mid_write_keeps_the_previous_output_and_the_next_run_cleans_up(tmp_path):
    out = tmp_path / "out"
    _write(out, text="previous")
    proc = subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == -signal.SIGKILL
    assert (out / "a.txt").read_text() == "previous"
    stale = [p.name for p in tmp_path.iterdir() if p.name != "out"]
    assert len(stale) == 1 and stale[0].startswith(".out.tmp-")
    _write(out, force=True, text="next")
    assert (out / "a.txt").read_text() == "next"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_kill_without_previous_output_leaves_no_output(tmp_path):
    out = tmp_path / "out"
    subprocess.run([sys.executable, "-c", _KILLED_WRITER, str(out)], cwd=Path(__file__).resolve().parents[1])
    assert not out.exists()
    assert [p.name for p in clean_stale(out)][0].startswith(".out.tmp-")
    assert list(tmp_path.iterdir()) == []


def test_a_swap_killed_between_renames_is_undone(tmp_path):
    # the fallback path (no renameat2) moves the old output aside for an instant
    out = tmp_path / "out"
    _write(out, text="previous")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    out.rename(tmp_path / f".out.old-{int(dead.stdout)}")
    clean_stale(out)
    assert (out / "a.txt").read_text() == "previous"


def test_outputs_get_ordinary_permissions_not_private_temp_ones(tmp_path):
    """mkdtemp/mkstemp create 0700/0600; a checkpoint others (a server, a container) read must follow the umask."""
    old = os.umask(0o022)
    try:
        with atomic_dir(tmp_path / "out") as d:
            (d / "w.bin").write_bytes(b"x")
        atomic_write_text(tmp_path / "r.json", "{}")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "out").stat().st_mode) == 0o755
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644
