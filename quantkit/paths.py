"""Where quantkit keeps shipped data and its on-disk cache.

recipes/ and calib_data/ live at the repository root (the source of truth) and ship inside the
wheel as the data-only packages quantkit.recipes and quantkit.calib_data (setup.py maps them),
so they are found with importlib.resources wherever quantkit is installed.
"""

from __future__ import annotations

import os
from importlib import resources
from importlib.abc import Traversable
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent


def cache_dir() -> Path:
    """$QUANTKIT_CACHE, else ~/.cache/quantkit."""
    root = os.environ.get("QUANTKIT_CACHE") or Path.home() / ".cache" / "quantkit"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _shipped(name: str) -> Traversable:
    """quantkit.<name> package data when installed, else the repository folder (a source checkout)."""
    try:
        root = resources.files(f"quantkit.{name}")
    except ModuleNotFoundError:
        return PROJECT_ROOT / name
    # a data-only package is a namespace package: files() gives a MultiplexedPath; its first
    # folder is the real one (joinpath on it returns plain pathlib.Path objects)
    paths = getattr(root, "_paths", None)
    return paths[0] if paths else root


def recipes_dir() -> Path:
    """The shipped recipes ($QUANTKIT_RECIPES overrides)."""
    return Path(os.environ.get("QUANTKIT_RECIPES") or str(_shipped("recipes")))


def calib_data_dir() -> Path:
    """The shipped calib_data/ folder ($QUANTKIT_CALIB_DATA overrides)."""
    return Path(os.environ.get("QUANTKIT_CALIB_DATA") or str(_shipped("calib_data")))
