"""Passes. Importing this package registers every pass module in this folder."""

import importlib
import pkgutil

from quantkit.passes.base import PASSES, Pass, register_pass

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["PASSES", "Pass", "register_pass"]
