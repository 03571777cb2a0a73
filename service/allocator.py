"""Giving freed memory back to the system: what a request allocated must not stay resident.

glibc's malloc keeps freed memory for reuse: large blocks go back to a heap once its dynamic
mmap threshold has risen past their size, and a thread's arena is trimmed only at its top. A
server that has answered a burst of big requests (or refused them, after receiving and parsing
them) then stays at its peak for good (issue 10 measured 1.8 -> 4.0 GB after streams ended).
Two remedies, both no-ops where malloc is not glibc's:

- `tune_allocator`, for a server under load: one arena for every thread (M_ARENA_MAX 1),
  blocks up to 32 MiB — every ordinary message and tensor — from that arena rather than mapped
  on their own, and no trimming at each free (a high M_TRIM_THRESHOLD). Freed memory then stays
  mapped and faulted in for the next request: mapping each 19 MB batch afresh (a 128 KiB mmap
  threshold) cost 10-15 % of the big-batch paths' throughput in `featmap bench` (page faults
  and zeroing), and trimming at every free did the same. One arena, because malloc_trim can
  return the top of the main arena's heap but not of the per-thread arenas' heaps: with them,
  what a burst left at their tops stayed resident.
- `Trimmer`: malloc_trim(0) once the server is idle after activity, which returns the free
  pages of the heap, its top included. Never while calls are in flight: memory a busy server
  frees is memory its next request would fault back in.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import threading
from collections.abc import Callable

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
# Blocks up to this come from the heap; glibc's largest allowed mmap threshold on 64 bits.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Free memory at the heap's top before a free() gives it back: in practice never (the Trimmer does).
TRIM_THRESHOLD_BYTES = 512 * 1024 * 1024
TRIM_PERIOD_S = 1.0


def _glibc() -> ctypes.CDLL | None:
    """glibc, if this process's malloc is glibc's."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        libc = ctypes.CDLL(name)
        libc.gnu_get_libc_version  # noqa: B018  (only glibc has it)
    except (OSError, AttributeError):
        return None
    return libc


_LIBC = _glibc()


def tune_allocator() -> bool:
    """Set glibc's arenas and thresholds for this process (see the module docstring); False
    where there is no glibc. Call it before the server's threads start."""
    if _LIBC is None:
        return False
    _LIBC.mallopt(M_ARENA_MAX, 1)
    _LIBC.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)
    _LIBC.mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    return True


def trim() -> None:
    """Return free memory in every arena to the system (glibc's malloc_trim)."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class Trimmer:
    """Trims once the server has been quiet for a second after activity (a thread that wakes
    every second): never under load, once after each burst.

    Args:
        activity: a count that grows with every call.
        busy: whether calls are in flight now (a long one may start no new call for a while).
    """

    def __init__(self, activity: Callable[[], int], busy: Callable[[], bool]) -> None:
        self.activity = activity
        self.busy = busy
        self.trims = 0
        self._last = self._trimmed = activity()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="featmap-trimmer", daemon=True)
        if _LIBC is not None:
            self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(TRIM_PERIOD_S):
            now = self.activity()
            quiet = now == self._last and not self.busy()
            self._last = now
            if quiet and now != self._trimmed:
                self._trimmed = now
                trim()
                self.trims += 1

    def close(self) -> None:
        """Stop the thread."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)
