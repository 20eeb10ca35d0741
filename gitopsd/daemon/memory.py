"""glibc's allocator, told how a long-lived daemon with many threads uses it.

Two habits of glibc malloc cost a daemon like this one memory it does not use:

- an arena per contending thread. glibc gives threads that meet in malloc
  arenas of their own, up to 8 per core: on two cores, 16 heaps of up to
  64 MiB each. Convergence runs ~80 threads (the reconcile pool, the
  fan-out, the informers), each arena keeps the peak its threads once
  reached, and memory freed in one arena cannot serve another. Two arenas
  (`limit_arenas`) keep most of the concurrency and little of the waste —
  the setting MALLOC_ARENA_MAX=2 that Java, Ruby and Python services are
  commonly run with. CPython holds the GIL around almost every
  allocation, so threads rarely contend for an arena anyway;
- freed memory kept. After the convergence peak (thousands of plans, live
  objects and audit records in flight at once) most of it is free but
  scattered in the heaps, and glibc gives memory back to the kernel only
  from the top of a heap. `malloc_trim` also releases the free pages inside
  them (MADV_DONTNEED); `Trimmer` calls it once the process has been quiet
  for a moment after a busy spell, so RSS at steady state is what the
  daemon holds, not what it once held at its peak.

The process sets this itself, through mallopt (M_ARENA_MAX) before it
starts any thread, so the figure is the same however gitopsd is run (the
image, a test, the benchmark) and no environment variable has to be kept in
step. Elsewhere than on glibc (musl, macOS) both are no-ops. CPython's own
small-object allocator (pymalloc) is not glibc's and is left alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from collections.abc import Callable

import structlog

log = structlog.get_logger("gitopsd.daemon.memory")

#: Arenas glibc may create (MALLOC_ARENA_MAX); see the module docstring.
ARENAS = 2
#: mallopt's parameter number for the arena limit (glibc's malloc.h: M_ARENA_MAX).
M_ARENA_MAX = -8
#: How often the trimmer looks, and how much the process must have freed since its last
#: trim (in the heaps glibc reports) for a trim to be worth its walk over the heaps.
TRIM_EVERY = 30.0
TRIM_THRESHOLD = 8 << 20


def _libc() -> ctypes.CDLL | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    needed = ("mallopt", "malloc_trim", "mallinfo2")
    return libc if all(hasattr(libc, name) for name in needed) else None


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                 "keepcost")]


_LIBC = _libc()
if _LIBC is not None:
    _LIBC.mallinfo2.restype = _MallInfo2
    _LIBC.malloc_trim.argtypes = [ctypes.c_size_t]
    _LIBC.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]


def limit_arenas(arenas: int = ARENAS) -> bool:
    """Cap glibc's arenas. Call before the process starts threads (arenas made already stay).
    Returns whether the cap is in place (False off glibc)."""
    return bool(_LIBC is not None and _LIBC.mallopt(M_ARENA_MAX, arenas) == 1)


def free_bytes() -> int:
    """Bytes glibc holds free in its heaps (mallinfo2 fordblks); 0 off glibc."""
    return int(_LIBC.mallinfo2().fordblks) if _LIBC is not None else 0


def trim() -> bool:
    """Give the free pages of glibc's heaps back to the kernel. Whether any were."""
    return bool(_LIBC is not None and _LIBC.malloc_trim(0))


class Trimmer:
    """Trims (see `trim`) every `every` seconds when at least `threshold` bytes lie free.

    One thread that sleeps on the daemon's stop event. A check is one
    mallinfo2 call; a trim walks the heaps' free chunks (milliseconds for
    a hundred MiB) and runs only after memory was freed in bulk, so a quiet
    daemon does not trim at all.
    """

    def __init__(self, *, stopped: threading.Event, every: float = TRIM_EVERY, threshold: int = TRIM_THRESHOLD,
                 free: Callable[[], int] = free_bytes, release: Callable[[], bool] = trim) -> None:
        self.stopped, self.every, self.threshold = stopped, every, threshold
        self._free, self._release = free, release
        self.trims = 0

    def check(self) -> bool:
        """One look: trim when enough lies free. Whether it trimmed."""
        free = self._free()
        if free < self.threshold:
            return False
        self._release()
        self.trims += 1
        log.debug("returned free heap memory to the system", free_mib=round(free / 2**20, 1))
        return True

    def run(self) -> None:
        if _LIBC is None:
            return
        while not self.stopped.wait(self.every):
            self.check()
