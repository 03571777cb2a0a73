"""The batch job's flow: inputs decoded ahead, batched by size, run through a Runner as one
stream of batches, and gathered back into shards, in input order."""

from __future__ import annotations

import collections
import contextlib
import itertools
import re
from collections.abc import Callable, Generator, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, TypeAlias

import numpy as np

from ..contract.errors import FeatmapError
from ..contract.ops import layer_costs
from ..contract.spec import Pipeline
from ..contract.tensors import single_image_size
from ..contract.wire import EncodedBatch
from .feed import SizeGroups, load_ahead
from .images import (
    ArrayFiles,
    EncodedImage,
    EncodedRule,
    InputError,
    InputItem,
    load_encoded,
    load_item,
)
from .outputs import Results
from .parts import Shard

OnError = Literal["skip", "fail"]


class JobError(Exception):
    """The job cannot go on; `exit_code` is 2 for a usage error, 1 for a failure."""

    def __init__(self, message: str, exit_code: int = 1) -> None:
        super().__init__(message)
        self.exit_code = exit_code


# A batch the runner takes: an array, or image files for a server to decode (RemoteRunner).
JobBatch: TypeAlias = np.ndarray | EncodedBatch
# A server's refusal of one encoded image names it so.
REFUSED_IMAGE = re.compile(r"encoded\.images\[(\d+)\]")


class Runner(Protocol):
    """Runs the pipeline on batches, yielding each batch's outputs in order.

    A batch in the pipeline's input dtype runs through the pipeline; a uint8 batch of a float
    pipeline holds image pixels and runs through the pipeline's pixel variant
    (featmap.contract.pixels), which gives the features the pipeline's rule for pixels does;
    so do encoded image files, which the server decodes (RemoteRunner only).
    """

    def run(self, batches: Iterable[JobBatch]) -> Iterator[dict[str, np.ndarray]]:
        """Outputs of each batch, in order."""
        ...

    def close(self) -> None:
        """Release sessions or channels."""
        ...


@dataclass
class _ShardRun:
    """A shard on its way through the job: what came back so far, and what is still out."""

    shard: Shard
    # Each batch's outputs as they came back, with the shard positions of its rows.
    outputs: list[tuple[list[int], dict[str, np.ndarray]]] = field(default_factory=list)
    rejected: dict[int, InputError] = field(default_factory=dict)
    out: int = 0  # batches sent whose outputs have not come back
    fed: bool = False  # every input was loaded and every batch sent
    failure: JobError | None = None  # an input failed with --on-error fail

    def results(self, output_names: list[str]) -> Results:
        """The shard's results, in input order; rejected inputs as skipped.

        A batch's rows go in as blocks, one per run of consecutive positions (a batch file's
        rows are one run; image files grouped by size may interleave): views, not copies, as
        the shard's outputs are kept until it is saved anyway.
        """
        runs: list[tuple[int, int, dict[str, np.ndarray], int]] = []  # position, rows, of, at
        for positions, outputs in self.outputs:
            start = 0
            while start < len(positions):
                end = start + 1
                while end < len(positions) and positions[end] == positions[end - 1] + 1:
                    end += 1
                runs.append((positions[start], end - start, outputs, start))
                start = end
        runs.sort(key=lambda run: run[0])
        results = Results(output_names)
        items = self.shard.items
        for position, count, outputs, row in runs:
            results.add_rows(
                [item.key for item in items[position : position + count]],
                {name: outputs[name][row : row + count] for name in output_names},
            )
        results.skipped = [(error.path, error.reason) for _, error in sorted(self.rejected.items())]
        return results


@dataclass(frozen=True)
class _Sent:
    """A batch gone to the runner whose outputs have not come back, and where they go."""

    run: _ShardRun
    positions: list[int]
    batch: JobBatch


@dataclass(frozen=True)
class _Piece:
    """What the feed loads at once: `count` consecutive inputs of a shard from `start`."""

    run: _ShardRun
    start: int
    count: int


class Job:
    """One `featmap extract` run; see extract.run_extract.

    Inputs are decoded on `decode_threads` threads at most `prefetch` images ahead of the
    runner, grouped by size into batches per shard, and sent to the runner as one stream of
    batches, so that decoding, the wire and onnxruntime overlap across shard boundaries.
    Image files go as uint8 pixels (the pipeline's pixel variant runs them), or with `encoded`
    as the files' bytes for the server to decode (JPEG, PNG, WebP: the server's decoder is the
    job's, so the features are the same). Rows of batch files (.npy, IDX) go as slices of the
    file, up to `batch_size` rows at a time.
    """

    def __init__(
        self,
        pipeline: Pipeline,
        runner: Runner,
        *,
        resize: tuple[int, int] | None,
        batch_size: int,
        on_error: OnError,
        progress: Callable[[int], None],
        decode_threads: int = 0,
        prefetch: int = 0,
        draft: bool = False,
        encoded: EncodedRule | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.runner = runner
        self.resize = resize
        self.batch_size = batch_size
        self.on_error = on_error
        self.progress = progress
        self.decode_threads = decode_threads
        self.prefetch = prefetch or 2 * batch_size
        self.draft = draft
        self.encoded = encoded
        self.arrays = ArrayFiles()
        self.images_computed = 0

    def fits(self, image: np.ndarray | EncodedImage) -> str | None:
        """Why the pipeline cannot take an image of this size (None if it can)."""
        if isinstance(image, EncodedImage):
            height, width = image.height, image.width
        else:
            _, height, width = single_image_size(self.pipeline.input.layout, image.shape)
        try:
            layer_costs(self.pipeline, height, width)  # remembered per pipeline id and size
        except FeatmapError as exc:
            return str(exc)
        return None

    def load(self, item: InputItem) -> np.ndarray | EncodedImage | InputError:
        """One input as the runner takes it, or why it cannot be used (on a decode thread)."""
        try:
            spec = self.pipeline.input
            image: np.ndarray | EncodedImage | None = (
                None
                if self.encoded is None
                else load_encoded(item, spec, self.resize, self.encoded)
            )
            if image is None:
                image = load_item(item, spec, self.resize, draft=self.draft, arrays=self.arrays)
            reason = self.fits(image)
            if reason is not None:
                shape = (
                    [image.height, image.width]
                    if isinstance(image, EncodedImage)
                    else list(image.shape)
                )
                raise InputError(item.key, f"{shape} is too small: {reason}")
        except InputError as exc:
            return exc
        return image

    def load_rows(self, piece: _Piece) -> np.ndarray | InputError:
        """A piece of consecutive rows of one batch file as one batch, or why none of them
        can be used (on a decode thread): one slice, checked once."""
        first = piece.run.shard.items[piece.start]
        assert first.row is not None
        try:
            batch = self.arrays.rows(
                first.file, first.row, first.row + piece.count, self.pipeline.input
            )
            reason = self.fits(batch[0])
            if reason is not None:
                raise InputError(first.file, f"{list(batch.shape[1:])} is too small: {reason}")
        except InputError as exc:
            return exc
        return batch

    def pieces(self, runs: list[_ShardRun]) -> Iterator[_Piece]:
        """The shards' inputs as pieces: an image file alone, or up to a batch of consecutive
        rows of one batch file."""
        for run in runs:
            items = run.shard.items
            position = 0
            while position < len(items):
                item = items[position]
                count = 1
                if item.row is not None:
                    while (
                        count < self.batch_size
                        and position + count < len(items)
                        and items[position + count].file == item.file
                        and items[position + count].row == item.row + count
                    ):
                        count += 1
                yield _Piece(run, position, count)
                position += count

    def _feed(
        self, runs: list[_ShardRun], sent: collections.deque[_Sent]
    ) -> Generator[JobBatch, None, None]:
        """The shards' batches, in order; each noted in `sent` as it goes to the runner.

        Image files are decoded one by one (or read as they are, `encoded`) and grouped by size
        into batches; rows of a batch file go as the batch they were read as (no per-row
        decode, grouping or stacking).
        """

        def load(piece: _Piece) -> tuple[_Piece, np.ndarray | EncodedImage | InputError]:
            item = piece.run.shard.items[piece.start]
            if item.row is None:
                return piece, self.load(item)
            return piece, self.load_rows(piece)

        loaded = load_ahead(
            self.pieces(runs), load, self.decode_threads, self.prefetch, lambda p: p.count
        )
        groups = SizeGroups(self.batch_size, self.resize, self.draft)
        with contextlib.closing(loaded):
            for piece, image in loaded:
                run, positions = piece.run, range(piece.start, piece.start + piece.count)
                items = run.shard.items
                ready: list[tuple[list[int], JobBatch]] = []
                if isinstance(image, InputError):
                    self.progress(piece.count)
                    if self.on_error == "fail":
                        # Stop feeding; the batches already out come back and their shards
                        # are saved before the job fails.
                        key = items[piece.start].key
                        run.failure = JobError(f"{key}: {image.reason}")
                        return
                    for position in positions:
                        run.rejected[position] = InputError(items[position].key, image.reason)
                elif isinstance(image, np.ndarray) and items[piece.start].row is not None:
                    ready = [(list(positions), image)]
                elif (batch := groups.add(piece.start, image)) is not None:
                    ready = [(batch.positions, batch.array)]
                if positions[-1] == len(items) - 1:
                    ready += [(batch.positions, batch.array) for batch in groups.flush()]
                    run.fed = True
                # Counted out before they go, so the shard is not taken for finished between
                # its last batches, and fed before its last batch goes, so that it is saved as
                # soon as that batch is back.
                run.out += len(ready)
                for batch_positions, array in ready:
                    sent.append(_Sent(run, batch_positions, array))
                    yield array

    def refused(self, error: FeatmapError, sent: collections.deque[_Sent]) -> JobError:
        """The job's error for a batch the runner failed (the first in `sent`): it names the
        file when the server refused one of an encoded batch's images."""
        match = REFUSED_IMAGE.fullmatch(error.field or "")
        if match and sent and isinstance(sent[0].batch, EncodedBatch):
            run, positions = sent[0].run, sent[0].positions
            index = int(match[1])
            if index < len(positions):
                return JobError(f"{run.shard.items[positions[index]].key}: {error.message}")
        shard = sent[0].run.shard.index if sent else None
        return JobError(f"shard {shard}: {error}" if shard is not None else str(error))

    def skip_refused(
        self, error: FeatmapError, sent: collections.deque[_Sent]
    ) -> list[_Sent] | None:
        """With --on-error skip, when the server refused one image of an encoded batch (the
        first in `sent`, whose outputs come next): that image rejected as the server said, and
        what must be sent again (the rest of that batch, then every batch sent after it); None
        when the error is not one image's."""
        match = REFUSED_IMAGE.fullmatch(error.field or "")
        if self.on_error != "skip" or match is None or not sent:
            return None
        failed = sent[0]
        index = int(match[1])
        if not isinstance(failed.batch, EncodedBatch) or index >= len(failed.positions):
            return None
        sent.popleft()
        position = failed.positions[index]
        key = failed.run.shard.items[position].key
        failed.run.rejected[position] = InputError(key, f"the server refused it: {error.message}")
        self.progress(1)
        again: list[_Sent] = []
        keep = [i for i in range(len(failed.positions)) if i != index]
        if keep:
            files = tuple(failed.batch.images[i] for i in keep)
            batch = EncodedBatch(files, failed.batch.size, failed.batch.draft)
            again.append(_Sent(failed.run, [failed.positions[i] for i in keep], batch))
        else:
            failed.run.out -= 1
        again += sent
        sent.clear()
        return again

    def run(self, shards: Sequence[Shard]) -> Iterator[tuple[Shard, Results]]:
        """Compute the shards; yield each one's results as soon as it is complete, in order."""
        runs = [_ShardRun(shard) for shard in shards]
        waiting = collections.deque(runs)
        sent: collections.deque[_Sent] = collections.deque()
        names = self.pipeline.output_names

        def finished() -> Iterator[tuple[Shard, Results]]:
            while waiting and waiting[0].fed and not waiting[0].out:
                done = waiting.popleft()
                results = done.results(names)
                done.outputs, done.rejected = [], {}  # the job keeps no shard's outputs
                yield done.shard, results

        def resend(again: list[_Sent]) -> Iterator[JobBatch]:
            for entry in again:
                sent.append(entry)
                yield entry.batch

        feed = self._feed(runs, sent)
        again: list[_Sent] = []
        with contextlib.closing(feed):  # stops the feed and its decode threads
            while True:
                outputs = self.runner.run(itertools.chain(resend(again), feed))
                try:
                    for batch_outputs in outputs:
                        entry = sent.popleft()
                        run, positions = entry.run, entry.positions
                        run.outputs.append((positions, batch_outputs))
                        run.out -= 1
                        self.images_computed += len(positions)
                        self.progress(len(positions))
                        yield from finished()
                    break
                except FeatmapError as exc:  # FeatmapRpcError too
                    retry = self.skip_refused(exc, sent)
                    if retry is None:
                        raise self.refused(exc, sent) from None
                    again = retry
                    yield from finished()
                finally:
                    close = getattr(outputs, "close", None)
                    if close is not None:
                        close()
        yield from finished()
        failure = next((run.failure for run in runs if run.failure is not None), None)
        if failure is not None:
            raise failure
