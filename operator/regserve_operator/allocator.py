"""Giving freed heap back to the system after a large pass.

A pass over thousands of resources frees as much as it allocates, but glibc keeps the freed pages of
its heap mapped until told otherwise: at 5,000 resources ~10 KB per resource of RSS was free heap.
`malloc_trim(0)` returns free pages from anywhere in the heap, not only its top. Elsewhere (musl,
macOS) there is nothing to call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        trim: Callable[[int], int] = ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):
        return None
    return trim


def release_free_heap() -> bool:
    """Return the heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
