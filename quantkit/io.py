"""Atomic output: write into a temporary sibling, swap it into place.

Rules (issue 12, 2.7):
- The output name is checked before any work: not ".", "..", "/", the working directory or one
  of its parents, not an existing file, and its parent (or nearest existing ancestor) writable.
- --force replaces only an empty directory or one quantkit wrote: it holds the MARKER file that
  atomic_dir puts in every output, or quantkit's report.json.
- Nothing is half-written. The new output is built in ``.NAME.tmp-PID-*`` and swapped in with one
  atomic exchange (Linux renameat2 RENAME_EXCHANGE), so a kill at any moment leaves either the
  previous output or the new one at NAME, never neither. Where the exchange is unavailable the
  previous output is moved to ``.NAME.old-PID`` for the instant between two renames, and the next
  run puts it back if that process died in between.
- Temporaries of killed runs (``.NAME.tmp-PID-*`` whose PID is gone) are removed by the next run.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fcntl
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from quantkit.errors import OutputExistsError, QuantkitError

MARKER = ".quantkit-output"  # written into every atomic_dir output; --force may replace such a directory
REPORT = "report.json"


class OutputPathError(QuantkitError):
    """The output path cannot be written (bad name, not writable, or not ours to replace)."""


# -- checks ------------------------------------------------------------------------------------
def _written_by_quantkit(path: Path) -> bool:
    if (path / MARKER).is_file():
        return True
    report = path / REPORT
    if not report.is_file():
        return False
    try:
        data = json.loads(report.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and "recipe" in data and "model" in data


def _writable_ancestor(path: Path) -> Path:
    p = path
    while not p.exists():
        p = p.parent
    return p


def check_output(path: Path, force: bool) -> None:
    """Fail now, before any model loads, if `path` cannot become this run's output."""
    raw = str(path)
    path = Path(path)
    resolved = path.expanduser().resolve()
    cwd = Path.cwd().resolve()
    if raw.strip() == "" or path.name in ("", ".", "..") or resolved == Path(resolved.anchor):
        raise OutputPathError(f"output {raw!r} is not a directory name; give a new directory, e.g. -o out/model")
    if resolved == cwd or resolved in cwd.parents:
        raise OutputPathError(f"output {raw!r} is the working directory or one of its parents; give a new directory")
    if path.exists() and not path.is_dir():
        raise OutputPathError(f"output {raw} exists and is a file, not a directory")
    parent = _writable_ancestor(resolved.parent)
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"cannot write output {raw}: {parent} is not a writable directory")
    if path.exists():
        if not force:
            raise OutputExistsError(f"output {path} exists; pass --force to overwrite it")
        if any(path.iterdir()) and not _written_by_quantkit(path):
            raise OutputPathError(
                f"refusing to replace {path}: it is not empty and quantkit did not write it "
                f"(no {MARKER} or quantkit {REPORT}); remove it yourself or pick another output"
            )


# -- stale temporaries -------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def clean_stale(path: Path) -> list[Path]:
    """Remove temporaries left beside `path` by killed runs; restore an output a killed swap moved away."""
    path = Path(path)
    parent = path.parent
    if not parent.is_dir():
        return []
    removed = []
    pattern = re.compile(rf"^\.{re.escape(path.name)}\.(tmp|old)-(\d+)(-.*)?$")
    for entry in parent.iterdir():
        m = pattern.match(entry.name)
        if not m or _pid_alive(int(m.group(2))):
            continue
        if m.group(1) == "old" and not path.exists():
            entry.rename(path)  # the previous output, moved away by a run killed mid-swap
            continue
        shutil.rmtree(entry, ignore_errors=True)
        removed.append(entry)
    return removed


# -- the swap ----------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2  # linux/fs.h
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2); False where unsupported."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError, TypeError):
        return False
    renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if renameat2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextlib.contextmanager
def atomic_dir(path: Path, force: bool = False) -> Iterator[Path]:
    """Yield a temporary directory that becomes `path` only if the block succeeds."""
    path = Path(path)
    check_output(path, force)
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private (0700); the output is an ordinary directory
    try:
        (tmp / MARKER).write_text("written by quantkit; `--force` may replace this directory\n")
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if not path.exists():
        tmp.rename(path)
        return
    check_output(path, force)  # it may have appeared, or changed, while we worked
    if _exchange(tmp, path):
        shutil.rmtree(tmp, ignore_errors=True)  # tmp now holds the previous output
        return
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    path.rename(old)
    tmp.rename(path)
    shutil.rmtree(old, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private (0600); the result is an ordinary file
    os.replace(tmp, path)


def _umask() -> int:
    """The process umask (reading it means setting it; put straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Exclusive inter-process lock (cache builds run once even when tests run in parallel)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)
