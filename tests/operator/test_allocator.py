import subprocess
import sys

from regserve_operator.allocator import limit_arenas, release_free_heap


def test_free_heap_is_given_back_on_glibc() -> None:
    assert release_free_heap()  # this machine's C library is glibc: the call exists and is made


def test_the_arena_limit_is_accepted_by_glibc() -> None:
    assert limit_arenas(2)


ARENAS_AFTER_EIGHT_THREADS = """
import ctypes, ctypes.util, sys, threading
from regserve_operator.allocator import limit_arenas
if sys.argv[1] == "limited":
    assert limit_arenas(2)
hold = []
barrier = threading.Barrier(8)
def work():
    barrier.wait()
    hold.append([bytearray(4096) for _ in range(200)])
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(ctypes.util.find_library("c"))
libc.open_memstream.restype = ctypes.c_void_p
libc.malloc_info.argtypes = [ctypes.c_int, ctypes.c_void_p]
libc.fclose.argtypes = [ctypes.c_void_p]
size, buf = ctypes.c_size_t(), ctypes.c_char_p()
stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
libc.malloc_info(0, stream)
libc.fclose(stream)
print(ctypes.string_at(buf, size.value).decode().count("<heap nr="))
"""


def test_threads_share_the_limited_arenas() -> None:
    """Eight threads allocating at once: glibc's malloc_info lists their arenas."""

    def arenas(mode: str) -> int:
        out = subprocess.run(
            [sys.executable, "-c", ARENAS_AFTER_EIGHT_THREADS, mode],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        return int(out.stdout.strip())

    assert arenas("limited") <= 2 < arenas("default")
