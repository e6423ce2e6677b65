"""Plain progress text shared by every command: the line prefix a log filter keys on, and clock times."""

from __future__ import annotations

PROGRESS_PREFIX = "[quantkit] "  # every plain progress line starts with it


def clock(seconds: float) -> str:
    """m:ss, or h:mm:ss from an hour on."""
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
