"""Number formats. Importing this package registers every format module in this folder."""

import importlib
import pkgutil

from quantkit.formats.base import FORMATS, Format, QTensor, get_format

for _info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
    if _info.name not in ("base", "search"):
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = ["FORMATS", "Format", "QTensor", "get_format"]
