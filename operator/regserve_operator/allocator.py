"""Keeping the operator's heap small: freed heap given back after large passes, and few malloc arenas.

A pass over thousands of resources frees as much as it allocates, but glibc keeps the freed pages of
its heap mapped until told otherwise: at 5,000 resources ~10 KB per resource of RSS was free heap.
`malloc_trim(0)` returns free pages from anywhere in the heap, not only its top. glibc also gives busy
threads arenas of their own (up to eight per core), each holding its own free pages: the operator's
reconcile workers, the event loop and kopf's threads would each keep a peak. Elsewhere (musl, macOS)
there is nothing to call and nothing is done.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
from collections.abc import Callable

# mallopt's parameter number for the arena limit (glibc's malloc.h).
M_ARENA_MAX = -8


@functools.cache
def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name)
    except OSError:
        return None


def _malloc_trim() -> Callable[[int], int] | None:
    trim: Callable[[int], int] | None = getattr(_libc(), "malloc_trim", None)
    return trim


# A pass that reconciled this many resources gives the heap it freed back (`release_free_heap`);
# smaller passes free too little to be worth the call.
TRIM_AFTER_RESOURCES = 1000


def limit_arenas(count: int) -> bool:
    """At most `count` malloc arenas for the threads started after this; False where it cannot be set."""
    mallopt: Callable[[int, int], int] | None = getattr(_libc(), "mallopt", None)
    return mallopt is not None and mallopt(M_ARENA_MAX, count) == 1


def release_free_heap() -> bool:
    """Return the heap's free pages to the system; False where the C library cannot."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
