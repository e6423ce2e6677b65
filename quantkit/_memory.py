"""Process memory policy for the CLI.

glibc raises its mmap threshold each time a large block is freed, so later large temporaries
(per-layer fp32 copies while quantizing) come from the heap and their pages are never returned;
after tokenizer threads have run this added ~250 MB to peak RSS when quantizing SmolLM2. Pinning
the threshold at 1 MiB keeps every large tensor buffer mmapped, so freeing it returns the memory.
Only the CLI calls this (the process is quantkit's); the library never changes malloc settings.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

M_MMAP_THRESHOLD = -3  # mallopt parameter number in glibc's malloc.h
MMAP_THRESHOLD_BYTES = 1 << 20


def pin_mmap_threshold() -> bool:
    """-> True if glibc accepted the setting (no-op elsewhere)."""
    if not sys.platform.startswith("linux"):
        return False
    name = ctypes.util.find_library("c")
    if not name:
        return False
    try:
        libc = ctypes.CDLL(name)
        return bool(libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES))
    except (OSError, AttributeError):  # musl and others have no mallopt
        return False
