"""Giving freed memory back to the system: what a request allocated must not stay resident.

glibc's malloc keeps freed memory for reuse: large blocks go back to a heap once its dynamic
mmap threshold has risen past their size, and a thread's arena is trimmed only at its top. A
server that has answered a burst of big requests (or refused them, after receiving and parsing
them) then stays at its peak for good (issue 10 measured 1.8 -> 4.0 GB after streams ended).
Two remedies, both no-ops where malloc is not glibc's:

- `tune_allocator`: a fixed mmap threshold, so blocks of 128 KiB and more (messages, tensors,
  spec texts) are mapped on their own and unmapped when freed, and a low trim threshold;
- `Trimmer`: malloc_trim(0) once the server is idle after activity, which returns the free
  pages inside every arena too. Never while calls are in flight: memory a busy server frees
  is memory its next request would fault back in.
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
THRESHOLD_BYTES = 128 * 1024
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
    """Set glibc's mmap and trim thresholds for this process; False where there is no glibc."""
    if _LIBC is None:
        return False
    _LIBC.mallopt(M_MMAP_THRESHOLD, THRESHOLD_BYTES)
    _LIBC.mallopt(M_TRIM_THRESHOLD, THRESHOLD_BYTES)
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
