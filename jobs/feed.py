"""The batch job's feed: inputs decoded on threads, a bounded way ahead, grouped into batches.

Pillow releases the GIL while it decodes, converts and resizes, so decoding on a few threads
overlaps with onnxruntime (embedded) or with the wire (remote) instead of taking turns with
them. What is held at any time is bounded by the arguments, never by the job's image count:
`depth` images decoded or decoding ahead of the consumer, plus the images of a shard waiting
for their size group to fill a batch (at most `batch_size - 1` per image size; one size when
--resize is given).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Generator, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TypeAlias, TypeVar

import numpy as np

from ..contract.wire import EncodedBatch
from .images import EncodedImage

Item = TypeVar("Item")
Loaded = TypeVar("Loaded")


def load_ahead(
    items: Iterable[Item],
    load: Callable[[Item], Loaded],
    threads: int,
    depth: int,
    weight: Callable[[Item], int] = lambda item: 1,
) -> Generator[Loaded, None, None]:
    """load(item) for every item, in order, on `threads` threads (0: here, one at a time).

    Items weighing at most `depth` in all (an item weighs `weight(item)` images; at least one
    item) are loading or loaded but not yet taken. `load` must return its failures rather
    than raise them, so that each lands at its item's place in the order. Closing the
    iterator early cancels what has not started.
    """
    if threads < 1:
        yield from map(load, items)
        return
    pending: collections.deque[tuple[Future[Loaded], int]] = collections.deque()
    pool = ThreadPoolExecutor(max_workers=threads, thread_name_prefix="featmap-decode")
    held = 0
    try:
        for item in items:
            images = weight(item)
            while pending and held + images > max(1, depth):
                future, taken = pending.popleft()
                held -= taken
                yield future.result()
            pending.append((pool.submit(load, item), images))
            held += images
        while pending:
            yield pending.popleft()[0].result()
    finally:
        for future, _ in pending:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)


# An encoded batch goes once its files reach this many bytes, full or not: with one more file
# (at most max_encoded_image_bytes) it stays within a message (max_message_bytes, 64 MiB).
ENCODED_BATCH_BYTES = 16 << 20
Image: TypeAlias = np.ndarray | EncodedImage


@dataclass
class Batch:
    """Images of one size and dtype stacked (N, ...), or encoded files of one size, and their
    positions in the shard."""

    positions: list[int]
    array: np.ndarray | EncodedBatch


@dataclass
class SizeGroups:
    """One shard's images grouped by shape and dtype, released as batches of `batch_size`.

    A group is released as soon as it is full (encoded files: or ENCODED_BATCH_BYTES); `flush`
    releases the rest in first-seen order. The batches are those of chunking each group, in
    input order. Encoded files go as EncodedBatch, resized to `resize` and with `draft` as
    the job asks.
    """

    batch_size: int
    resize: tuple[int, int] | None = None
    draft: bool = False
    groups: dict[tuple[tuple[int, ...], str], list[tuple[int, Image]]] = field(default_factory=dict)

    def add(self, position: int, image: Image) -> Batch | None:
        """Add an image; the group's batch when this image filled it."""
        if isinstance(image, EncodedImage):
            key: tuple[tuple[int, ...], str] = ((image.height, image.width), "encoded")
        else:
            key = (image.shape, image.dtype.str)
        group = self.groups.setdefault(key, [])
        group.append((position, image))
        if len(group) < self.batch_size and not self._bytes_reached(group):
            return None
        batch = self._batch(group)
        group.clear()
        return batch

    def flush(self) -> Iterator[Batch]:
        """The groups' remaining images, one batch per group, in first-seen order."""
        for group in self.groups.values():
            if group:
                yield self._batch(group)
        self.groups.clear()

    @staticmethod
    def _bytes_reached(group: list[tuple[int, Image]]) -> bool:
        files = (image.data for _, image in group if isinstance(image, EncodedImage))
        return sum(map(len, files)) >= ENCODED_BATCH_BYTES

    def _batch(self, group: list[tuple[int, Image]]) -> Batch:
        # A group is of one kind: its key says encoded or the arrays' shape and dtype.
        positions = [position for position, _ in group]
        files = tuple(image.data for _, image in group if isinstance(image, EncodedImage))
        if files:
            return Batch(positions, EncodedBatch(files, self.resize, self.draft))
        # np.stack copies each image once, laying out transposed views (HWC pixels read as
        # CHW) as it goes; the batch owns its memory, so the decoded images can go.
        arrays = [image for _, image in group if isinstance(image, np.ndarray)]
        return Batch(positions, np.stack(arrays))
