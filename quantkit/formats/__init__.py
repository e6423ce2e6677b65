"""Number formats. Importing this package registers every format."""

from quantkit.formats import int8 as _int8  # noqa: F401
from quantkit.formats.base import FORMATS, Format, QTensor, get_format

__all__ = ["FORMATS", "Format", "QTensor", "get_format"]
