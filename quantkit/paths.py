"""Where quantkit keeps shipped data and its on-disk cache."""

from __future__ import annotations

import os
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """$QUANTKIT_CACHE, else ~/.cache/quantkit."""
    root = os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def calib_data_dir() -> Path:
    """The shipped calib_data/ folder ($QUANTKIT_CALIB_DATA overrides)."""
    return Path(os.environ.get("QUANTKIT_CALIB_DATA") or PROJECT_ROOT / "calib_data")
