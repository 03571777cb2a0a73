"""ExtractStream's reading ahead, bounded in messages and bytes, and its idle timeout.

A stream holds a handler thread for its whole life, and what it has received but not yet
answered holds memory. So: the server reads at most `stream_window` messages and
`max_message_bytes` bytes ahead (ReadAhead), and ends a stream whose client has kept it waiting
for `stream_idle_timeout_s`: waiting for the next request message (StreamIdle,
DEADLINE_EXCEEDED, with a message saying so) or for the client to take a response that flow
control holds back (StreamWatchdog cancels the call: the client is not reading, so no message
could reach it). Time the server spends computing never counts.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import grpc

from ..contract.errors import Cancelled, StreamIdle

log = logging.getLogger(__name__)

_END = object()


class ReadAhead:
    """Reads a request stream on its own thread, a bounded number of messages and bytes ahead.

    The handler computes chunk i while chunk i+1 arrives; a full window stops reading, and
    HTTP/2 flow control then stops the client. One message is always let in, however big (the
    transport already bounds it), so a stream of big chunks still moves.
    """

    def __init__(
        self, requests: Iterator[Any], window: int, max_bytes: int, idle_timeout_s: float
    ) -> None:
        self.window = window
        self.max_bytes = max_bytes
        self.idle_timeout_s = idle_timeout_s
        self.peak = 0
        self._items: deque[tuple[object, int]] = deque()
        self._bytes = 0
        self._closed = False
        self._condition = threading.Condition()
        self._thread = threading.Thread(
            target=self._read, args=(requests,), name="featmap-stream-reader", daemon=True
        )
        self._thread.start()

    def _has_room(self, size: int) -> bool:
        if not self._items:
            return True
        return len(self._items) < self.window and self._bytes + size <= self.max_bytes

    def _put(self, item: object, size: int, *, wait: bool) -> bool:
        with self._condition:
            if wait:
                self._condition.wait_for(lambda: self._closed or self._has_room(size))
            if self._closed:
                return False
            self._items.append((item, size))
            self._bytes += size
            if wait:  # a request message, not the end of the stream
                self.peak = max(self.peak, len(self._items))
            self._condition.notify_all()
            return True

    def _read(self, requests: Iterator[Any]) -> None:
        try:
            for request in requests:
                if not self._put(request, getattr(request, "size", 0), wait=True):
                    return  # the handler ended (an error, a timeout): stop reading
                del request  # queued: not held here while the next one arrives
        except Exception:  # gRPC's own error: the client went away, or the call was cancelled
            gone = Cancelled("stream", "the client went away or the stream was cancelled")
            self._put(gone, 0, wait=False)
            return
        self._put(_END, 0, wait=False)

    def close(self) -> None:
        """Stop reading and drop what was read ahead (the handler is done with this stream)."""
        with self._condition:
            self._closed = True
            self._items.clear()
            self._bytes = 0
            self._condition.notify_all()

    def __iter__(self) -> Iterator[Any]:
        while True:
            with self._condition:
                if not self._condition.wait_for(lambda: self._items, self.idle_timeout_s):
                    raise StreamIdle(
                        "stream",
                        f"no request message arrived for {self.idle_timeout_s:g} s "
                        "(stream_idle_timeout_s): the server ended the stream; send the next "
                        "message sooner, or open a new stream when there is more to send",
                    )
                item, size = self._items.popleft()
                self._bytes -= size
                self._condition.notify_all()
            if item is _END:
                return
            if isinstance(item, Exception):
                raise item
            yield item


class StreamWatchdog:
    """Cancels streams whose client has not taken a response for `idle_timeout_s` seconds.

    gRPC sends a stream's response on the handler's thread and returns only once HTTP/2 flow
    control lets it through: a client that stops reading would hold the thread for good.
    Cancelling the call from here releases it.
    """

    def __init__(self, idle_timeout_s: float) -> None:
        self.idle_timeout_s = idle_timeout_s
        self.cancelled = 0
        self._sending: dict[int, tuple[grpc.ServicerContext, float]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, name="featmap-stream-watchdog", daemon=True
        )
        self._thread.start()

    @contextlib.contextmanager
    def sending(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Watch `context` while the response being yielded waits for the client."""
        key = id(context)
        with self._lock:
            self._sending[key] = (context, time.monotonic())
        try:
            yield
        finally:
            with self._lock:
                self._sending.pop(key, None)

    def _run(self) -> None:
        period = min(1.0, self.idle_timeout_s / 4)
        while not self._stop.wait(period):
            now = time.monotonic()
            with self._lock:
                stalled = [
                    key
                    for key, (_, since) in self._sending.items()
                    if now - since >= self.idle_timeout_s
                ]
                contexts = [self._sending.pop(key)[0] for key in stalled]
            for context in contexts:
                log.warning(
                    "stream from %s took no response for %g s (stream_idle_timeout_s): cancelled",
                    context.peer(),
                    self.idle_timeout_s,
                )
                self.cancelled += 1
                context.cancel()

    def close(self) -> None:
        """Stop watching."""
        self._stop.set()
        self._thread.join(timeout=5)
